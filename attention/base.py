"""The Policy base class: a network as an ordered list of named stages, then policy and value heads.

Stages make every layer a place a probe can split the network at:

    a = policy.forward_to(obs, "c3")              # activation of layer c3
    logits, value = policy.forward_from("c3", a)  # the rest of the network
    # forward_from(L, forward_to(x, L)) == forward(x)

A stage maps the previous activation to the next. A stage that computes attention returns
``(activation, extras)``; the extras (attention maps, their logits and entropy) reach ``PolicyOutput``
and are dropped by ``forward_to``/``forward_from``/``activations``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from loupe.errors import LoupeError

#: what a stage returns: the activation, or the activation and named extras for PolicyOutput
StageResult = torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]

#: added to probabilities before the log in every attention entropy (METHODS A)
ENTROPY_EPS = 1e-7


@dataclasses.dataclass
class PolicyOutput:
    """What a policy returns for a batch of N observations."""

    #: (N, A) policy logits
    logits: torch.Tensor
    #: (N,) state value
    value: torch.Tensor
    #: (N, M, h, w) attention maps, or None for a policy without attention
    attention: torch.Tensor | None = None
    #: (N, M, h, w) attention before normalisation, or None where the policy has no such thing
    attention_logits: torch.Tensor | None = None
    #: (N,) entropy of the attention per sample, or None for a policy without attention
    attention_entropy: torch.Tensor | None = None


def orthogonal_init(module: nn.Module, gain: float) -> None:
    """Orthogonal weights with ``gain`` and zero biases for every Conv2d/Linear inside ``module``."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.orthogonal_(m.weight, gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def conv_out(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    """Output length of a convolution or pooling along one axis (floor mode)."""
    return (size + 2 * padding - kernel) // stride + 1


def require_positive(name: str, obs_shape: Sequence[int], *sizes: int) -> None:
    """LoupeError when a feature map of the network would be empty for this observation shape."""
    if min(sizes) <= 0:
        raise LoupeError(
            f"policy {name}: observation shape {tuple(obs_shape)} is too small for this network "
            f"(a feature map would be {sizes}); use a larger observation or another policy"
        )


def entropy(p: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """-sum p log p over ``dims`` with p = p + 1e-7 (METHODS A)."""
    p = p + ENTROPY_EPS
    return -(p * p.log()).sum(dim=tuple(dims))


def check_obs_shape(name: str, obs_shape: Any) -> tuple[int, int, int]:
    """(C, H, W) of positive ints, else LoupeError."""
    try:
        shape = tuple(int(s) for s in obs_shape)
    except (TypeError, ValueError):
        shape = ()
    if len(shape) != 3 or min(shape) <= 0:
        raise LoupeError(
            f"policy {name}: observation shape must be (C, H, W) positive integers, got {obs_shape!r}"
        )
    return shape  # type: ignore[return-value]


def check_n_actions(name: str, n_actions: Any) -> int:
    if isinstance(n_actions, bool) or not isinstance(n_actions, int) or n_actions <= 0:
        raise LoupeError(f"policy {name}: n_actions must be a positive integer, got {n_actions!r}")
    return n_actions


class Policy(nn.Module):
    """Base class of every network in the registry: named stages, then heads ``pi`` and ``v``.

    A subclass builds its modules, then calls ``self._build_heads(stages, feature_dim)`` where
    ``stages`` is an ordered list of (layer name, method name or dotted submodule path); each stage
    maps the previous activation to the next, and the last one gives the (N, feature_dim) features
    the heads read. ``_consumers`` names the Conv2d/Linear that reads each editable layer.
    """

    #: registry name (a subclass or instance overrides it)
    name: str = "policy"

    def __init__(self, obs_shape: Sequence[int], n_actions: int, config: Any) -> None:
        super().__init__()
        self.obs_shape = check_obs_shape(self.name, obs_shape)
        self.n_actions = check_n_actions(self.name, n_actions)
        self.config = config
        self._stages: dict[str, str] = {}

    def _build_heads(self, stages: list[tuple[str, str]], feature_dim: int) -> None:
        """Register the stages, add heads ``pi`` and ``v``, and initialise all weights."""
        self._stages = dict(stages)
        self.pi = nn.Linear(feature_dim, self.n_actions)
        self.v = nn.Linear(feature_dim, 1)
        orthogonal_init(self, math.sqrt(2))
        orthogonal_init(self.pi, 0.01)
        orthogonal_init(self.v, 1.0)

    # -- introspection -----------------------------------------------------------------------------
    @property
    def layer_names(self) -> tuple[str, ...]:
        """Ordered names of the layers a probe can split the network at."""
        return tuple(self._stages)

    @property
    def has_attention(self) -> bool:
        """Whether the forward pass returns attention maps (``PolicyOutput.attention``)."""
        return False

    @property
    def options(self) -> dict[str, Any]:
        """The constructor options as JSON-ready values (tuples become lists)."""
        return _jsonable(dataclasses.asdict(self.config)) if self.config is not None else {}

    @property
    def spec(self) -> dict[str, Any]:
        """Everything ``build_policy`` needs to rebuild this network (weights aside)."""
        return {
            "name": self.name,
            "options": self.options,
            "obs_shape": list(self.obs_shape),
            "n_actions": self.n_actions,
        }

    def next_layer(self, layer: str) -> nn.Module:
        """The Conv2d/Linear that directly consumes ``layer``'s activation (for model editing)."""
        self._check_layer(layer)
        consumers = self._consumers()
        if layer not in consumers:
            raise LoupeError(
                f"policy {self.name}: layer {layer!r} has no single linear consumer; "
                f"editable layers: {', '.join(consumers)}"
            )
        return consumers[layer]

    def _consumers(self) -> dict[str, nn.Module]:
        return {}

    def _check_layer(self, layer: str) -> None:
        if layer not in self._stages:
            raise LoupeError(
                f"policy {self.name} has no layer {layer!r}; valid layers: "
                f"{', '.join(self.layer_names)}"
            )

    # -- forward passes ----------------------------------------------------------------------------
    def prepare(self, obs: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) uint8 -> float in [0, 1] (the parameters' dtype); float is used as given."""
        if not isinstance(obs, torch.Tensor):
            raise LoupeError(
                f"policy {self.name}: observations must be a torch tensor, got {type(obs).__name__}"
            )
        if obs.dim() != 4 or tuple(obs.shape[1:]) != self.obs_shape:
            raise LoupeError(
                f"policy {self.name}: observations must be (N, {', '.join(map(str, self.obs_shape))}), "
                f"got {tuple(obs.shape)}"
            )
        if obs.dtype == torch.uint8:
            return obs.to(self.pi.weight.dtype) / 255.0
        if not obs.dtype.is_floating_point:
            raise LoupeError(
                f"policy {self.name}: observations must be uint8 or float, got {obs.dtype}"
            )
        return obs

    def _stage(self, name: str) -> Callable[[torch.Tensor], StageResult]:
        """A stage is a method of the policy or, given a dotted path, one of its submodules."""
        target = self._stages[name]
        return self.get_submodule(target) if "." in target else getattr(self, target)

    def _run(
        self, x: torch.Tensor, names: Sequence[str], extras: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        for name in names:
            result = self._stage(name)(x)
            if isinstance(result, tuple):
                result, more = result
                if extras is not None:
                    extras.update(more)
            x = result
        return x

    def _heads(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pi(features), self.v(features).squeeze(-1)  # (N, A), (N,)

    def forward(self, obs: torch.Tensor) -> PolicyOutput:
        """(N, C, H, W) observations (uint8, or float in [0, 1]) -> logits (N, A), value (N,)
        and, for attention policies, the attention maps and their entropy."""
        extras: dict[str, torch.Tensor] = {}
        features = self._run(self.prepare(obs), self.layer_names, extras)
        logits, value = self._heads(features)
        return PolicyOutput(logits=logits, value=value, **extras)

    def forward_to(self, obs: torch.Tensor, layer: str) -> torch.Tensor:
        """The activation of ``layer``: (N, C, h, w) for a convolutional layer, (N, D) for a dense one."""
        self._check_layer(layer)
        names = self.layer_names
        return self._run(self.prepare(obs), names[: names.index(layer) + 1])

    def forward_from(
        self, layer: str, activation: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The rest of the network after ``layer``: -> (logits (N, A), value (N,))."""
        self._check_layer(layer)
        names = self.layer_names
        return self._heads(self._run(activation, names[names.index(layer) + 1 :]))

    def activations(self, obs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every layer's activation in one pass, keyed by layer name in ``layer_names`` order."""
        acts: dict[str, torch.Tensor] = {}
        x = self.prepare(obs)
        for name in self.layer_names:
            x = self._run(x, (name,))
            acts[name] = x
        return acts


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
