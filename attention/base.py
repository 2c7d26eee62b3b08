"""The Policy base class: a network as an ordered list of named stages, then policy and value heads.

Stages make every layer a place a probe can split the network at:

    a = policy.forward_to(obs, "c3")            # activation of layer c3
    logits, value = policy.forward_from("c3", a)  # the rest of the network
    # forward_from(L, forward_to(x, L)) == forward(x)

A stage whose module computes attention returns ``(activation, extras)`` from ``attend``; the extras
(attention maps, their logits and entropy) reach ``PolicyOutput``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from loupe.errors import LoupeError


@dataclasses.dataclass
class PolicyOutput:
    """What a policy returns for a batch of N observations."""

    logits: torch.Tensor  # (N, A) policy logits
    value: torch.Tensor  # (N,)
    attention: torch.Tensor | None = None  # (N, M, h, w) attention maps
    attention_logits: torch.Tensor | None = None  # (N, M, h, w) before normalisation
    attention_entropy: torch.Tensor | None = None  # (N,)


def orthogonal_init(module: nn.Module, gain: float) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.orthogonal_(m.weight, gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def conv_out(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    return (size + 2 * padding - kernel) // stride + 1


class Policy(nn.Module):
    """Base class of every network in the registry.

    Subclasses build their modules, then call ``self._finish(stages, feature_dim)`` with ``stages`` an
    ordered list of (layer name, method name or dotted submodule path) pairs; each maps the previous
    activation to the next. Heads ``pi`` and ``v`` read the last stage's (N, feature_dim) output.
    """

    name = "policy"

    def __init__(self, obs_shape: tuple[int, ...], n_actions: int, options: dict[str, Any]):
        super().__init__()
        if len(obs_shape) != 3 or min(obs_shape) <= 0:
            raise LoupeError(f"{self.name}: observation shape must be (C, H, W), got {obs_shape}")
        if n_actions <= 0:
            raise LoupeError(f"{self.name}: n_actions must be positive, got {n_actions}")
        self.obs_shape = tuple(int(s) for s in obs_shape)
        self.n_actions = int(n_actions)
        self.options = dict(options)
        self._stage_methods: dict[str, str] = {}

    def _finish(self, stages: list[tuple[str, str]], feature_dim: int) -> None:
        self._stage_methods = dict(stages)
        self.pi = nn.Linear(feature_dim, self.n_actions)
        self.v = nn.Linear(feature_dim, 1)
        orthogonal_init(self, math.sqrt(2))
        orthogonal_init(self.pi, 0.01)
        orthogonal_init(self.v, 1.0)

    # -- introspection ---------------------------------------------------------------------------
    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(self._stage_methods)

    @property
    def has_attention(self) -> bool:
        return False

    @property
    def spec(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "options": dict(self.options),
            "obs_shape": list(self.obs_shape),
            "n_actions": self.n_actions,
        }

    def next_layer(self, layer: str) -> nn.Module:
        """The Conv2d/Linear that consumes ``layer``'s activation directly (for model editing)."""
        self._check_layer(layer)
        consumers = self._consumers()
        if layer not in consumers:
            raise LoupeError(
                f"{self.name}: layer {layer!r} has no single linear consumer; "
                f"editable layers: {', '.join(consumers)}"
            )
        return consumers[layer]

    def _consumers(self) -> dict[str, nn.Module]:
        return {}

    def _check_layer(self, layer: str) -> None:
        if layer not in self._stage_methods:
            raise LoupeError(
                f"{self.name} has no layer {layer!r}; valid layers: {', '.join(self.layer_names)}"
            )

    # -- forward passes ----------------------------------------------------------------------------
    def prepare(self, obs: torch.Tensor) -> torch.Tensor:
        """uint8 -> float in [0, 1]; float is taken as already scaled. Shape is checked."""
        if not isinstance(obs, torch.Tensor):
            raise LoupeError(f"{self.name}: observations must be a torch tensor, got {type(obs)}")
        if tuple(obs.shape[1:]) != self.obs_shape or obs.dim() != 4:
            raise LoupeError(
                f"{self.name}: observations must be (N, {', '.join(map(str, self.obs_shape))}), "
                f"got {tuple(obs.shape)}"
            )
        if obs.dtype == torch.uint8:
            return obs.float().div_(255.0)
        if not obs.dtype.is_floating_point:
            raise LoupeError(f"{self.name}: observations must be uint8 or float, got {obs.dtype}")
        return obs

    def _stage_fn(self, name: str):
        """A stage is a method of the policy or, with a dotted path, one of its submodules."""
        target = self._stage_methods[name]
        return self.get_submodule(target) if "." in target else getattr(self, target)

    def _run(self, x: torch.Tensor, names, extras: dict | None = None) -> torch.Tensor:
        for name in names:
            x = self._stage_fn(name)(x)
            if isinstance(x, tuple):
                x, more = x
                if extras is not None:
                    extras.update(more)
        return x

    def _heads(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pi(features), self.v(features).squeeze(-1)

    def forward(self, obs: torch.Tensor) -> PolicyOutput:
        extras: dict[str, torch.Tensor] = {}
        features = self._run(self.prepare(obs), self.layer_names, extras)
        logits, value = self._heads(features)
        return PolicyOutput(logits=logits, value=value, **extras)

    def forward_to(self, obs: torch.Tensor, layer: str) -> torch.Tensor:
        self._check_layer(layer)
        names = self.layer_names
        return self._run(self.prepare(obs), names[: names.index(layer) + 1])

    def forward_from(
        self, layer: str, activation: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_layer(layer)
        names = self.layer_names
        return self._heads(self._run(activation, names[names.index(layer) + 1 :]))

    def activations(self, obs: torch.Tensor) -> dict[str, torch.Tensor]:
        acts: dict[str, torch.Tensor] = {}
        x = self.prepare(obs)
        for name in self.layer_names:
            x = self._stage_fn(name)(x)
            if isinstance(x, tuple):
                x = x[0]
            acts[name] = x
        return acts
