"""Integrated gradients on a hidden layer (Hilton et al., Appendix B), all targets in one pass.

Split V(x) = F(A(x)) at ``layer``. With a = A(x) and the zero-activation baseline,
    attr = a * (1/n) * sum_{alpha in {1/n, ..., 1}} grad_a F(alpha a)      (right Riemann sum)
and sum(attr) ~ F(a) - F(0); the difference is reported as ``delta``. Targets are the value, policy
logits (never the softmax) and action groups (sums of logits). Every target is a linear read-out of
the head's output vector [value, logit_0, ..., logit_{A-1}], so one forward pass over the n scaled
copies and one batched backward give all of them.

    ig = IntegratedGradients(policy, "2b", n_steps=10)
    res = ig.attribute(obs, targets="all")      # res.attributions: (K, N, *layer_shape)
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import torch

from loupe.errors import LoupeError

TargetSpec = str | tuple[str, Sequence[int]]


@dataclasses.dataclass
class Attribution:
    """IG result for K targets and N observations."""

    targets: list[str]  # K names: "value", "logit:3", "group:jump"
    attributions: torch.Tensor  # (K, N, *layer_shape)
    activation: torch.Tensor  # (N, *layer_shape), a = A(x)
    delta: torch.Tensor  # (K, N): sum(attr) - (F(a) - F(0)); NaN for layer "input"
    layer: str

    def __getitem__(self, target: str) -> torch.Tensor:
        """The (N, *layer_shape) attributions of one target by name, e.g. ``res["value"]``."""
        if target not in self.targets:
            raise LoupeError(
                f"no target {target!r}; this attribution has {', '.join(self.targets)}"
            )
        return self.attributions[self.targets.index(target)]

    def __repr__(self) -> str:
        k, n, *shape = self.attributions.shape
        names = self.targets if k <= 6 else [*self.targets[:5], f"... ({k - 5} more)"]
        finite = self.delta[torch.isfinite(self.delta)].abs()
        delta = f"{finite.max().item():.3g}" if finite.numel() else "n/a"
        return (
            f"Attribution(layer={self.layer!r}, {n} observation(s) x {k} target(s) "
            f"[{', '.join(names)}], layer shape {tuple(shape)}, "
            f"max |completeness delta| {delta})"
        )

    def summary(self) -> dict[str, Any]:
        """Shape, targets and completeness gap as plain Python values (no tensors)."""
        finite = self.delta[torch.isfinite(self.delta)].abs()
        return {
            "layer": self.layer,
            "targets": list(self.targets),
            "observations": int(self.attributions.shape[1]),
            "layer_shape": list(self.attributions.shape[2:]),
            "max_abs_delta": float(finite.max()) if finite.numel() else None,
        }


def check_obs(policy, obs: torch.Tensor) -> torch.Tensor:
    """Observations as the policy takes them, or a LoupeError that says what is wrong."""
    if not isinstance(obs, torch.Tensor):
        raise LoupeError(f"observations must be a torch tensor, got {type(obs).__name__}")
    if obs.dim() != 4 or tuple(obs.shape[1:]) != tuple(policy.obs_shape):
        raise LoupeError(
            f"observations must be (N, {', '.join(map(str, policy.obs_shape))}), got "
            f"{tuple(obs.shape)}"
        )
    if obs.dtype != torch.uint8 and not obs.dtype.is_floating_point:
        raise LoupeError(f"observations must be uint8 or float, got {obs.dtype}")
    return obs


def target_matrix(targets, n_actions: int) -> tuple[list[str], torch.Tensor]:
    """Target specs -> (names, W) with W (K, 1 + A) over [value, logits]."""
    if targets == "all":
        targets = ["value", *[f"logit:{i}" for i in range(n_actions)]]
    if isinstance(targets, (str, tuple)):
        targets = [targets]
    names, rows = [], []
    for spec in targets:
        row = torch.zeros(1 + n_actions, dtype=torch.float64)
        if spec == "value":
            row[0] = 1.0
            names.append("value")
        elif isinstance(spec, str) and spec.startswith("logit:"):
            i = _action(spec.split(":", 1)[1], n_actions)
            row[1 + i] = 1.0
            names.append(f"logit:{i}")
        elif isinstance(spec, tuple) and len(spec) == 2:
            label, actions = spec
            for a in actions:
                row[1 + _action(a, n_actions)] = 1.0
            names.append(f"group:{label}")
        else:
            raise LoupeError(
                f"unknown target {spec!r}; use 'value', 'logit:I', ('name', [actions]) or 'all'"
            )
        rows.append(row)
    if not rows:
        raise LoupeError("no targets given")
    return names, torch.stack(rows)


def _action(value: Any, n_actions: int) -> int:
    try:
        i = int(value)
    except (TypeError, ValueError):
        raise LoupeError(f"target action {value!r} is not an integer") from None
    if not 0 <= i < n_actions:
        raise LoupeError(f"target action {i} out of range: the policy has {n_actions} actions")
    return i


def head_outputs(policy, layer: str, activation: torch.Tensor, weights: torch.Tensor):
    """F at ``layer`` read out through target rows ``weights`` (K, 1+A) -> (M, K)."""
    logits, value = policy.forward_from(layer, activation)
    out = torch.cat([value[:, None], logits], dim=1)
    return out @ weights.to(out).T


class IntegratedGradients:
    """Hidden-layer integrated gradients with a zero-activation baseline."""

    def __init__(self, policy, layer: str, n_steps: int = 10, chunk_size: int | None = None):
        if layer != "input" and layer not in policy.layer_names:
            raise LoupeError(
                f"{policy.spec['name']} has no layer {layer!r}; valid layers: input, "
                f"{', '.join(policy.layer_names)}"
            )
        if n_steps <= 0:
            raise LoupeError(f"n_steps must be positive, got {n_steps}")
        if chunk_size is not None and chunk_size <= 0:
            raise LoupeError(f"chunk_size must be positive or None, got {chunk_size}")
        self.policy = policy
        self.layer = layer
        self.n_steps = n_steps
        self.chunk_size = chunk_size or n_steps

    def attribute(self, obs: torch.Tensor, targets="all") -> Attribution:
        """Integrated gradients of ``targets`` at this layer for a batch of observations.

        ``obs``: (N, *policy.obs_shape), uint8 or float in [0, 1]. ``targets``: ``"all"`` (the
        value and every logit), or a list of ``"value"``, ``"logit:I"`` and ``(name, [actions])``
        groups (the sum of those logits). Returns an ``Attribution`` with attributions
        (K, N, *layer_shape), the layer's activation, and the completeness gap ``delta`` (K, N):
        sum of attributions minus (F(a) - F(0)), which shrinks as ``n_steps`` grows. At layer
        ``"input"`` it is the plain input gradient and ``delta`` is NaN. LoupeError for bad
        observations or targets.
        """
        policy = self.policy
        obs = check_obs(policy, obs)
        names, weights = target_matrix(targets, policy.n_actions)
        if self.layer == "input":
            return self._input_gradient(obs, names, weights)
        with torch.no_grad():
            a = policy.forward_to(obs, self.layer)  # (N, *s)
        n, k = self.n_steps, len(names)
        grad_sum = torch.zeros((k, *a.shape), dtype=a.dtype, device=a.device)
        for start in range(0, n, self.chunk_size):
            stop = min(start + self.chunk_size, n)
            alphas = torch.arange(start + 1, stop + 1, dtype=a.dtype, device=a.device) / n
            scaled = (alphas.view(-1, *[1] * a.dim()) * a).reshape(-1, *a.shape[1:])
            scaled.requires_grad_(True)  # (c*N, *s)
            y = head_outputs(policy, self.layer, scaled, weights)  # (c*N, K)
            grads = batched_grads(y, scaled)  # (K, c*N, *s)
            grad_sum += grads.reshape(k, len(alphas), *a.shape).sum(1)
        attr = a.unsqueeze(0) * grad_sum / n  # (K, N, *s)
        with torch.no_grad():
            f_a = head_outputs(policy, self.layer, a, weights)  # (N, K)
            f_0 = head_outputs(policy, self.layer, torch.zeros_like(a), weights)
        delta = attr.flatten(2).sum(-1) - (f_a - f_0).T
        return Attribution(names, attr.detach(), a, delta.detach(), self.layer)

    def _input_gradient(self, obs, names, weights) -> Attribution:
        x = obs.float() / 255.0 if obs.dtype == torch.uint8 else obs.clone()
        x.requires_grad_(True)
        out = self.policy(x)
        y = torch.cat([out.value[:, None], out.logits], 1) @ weights.to(x).T
        grads = batched_grads(y, x)
        nan = torch.full((len(names), x.shape[0]), float("nan"), device=x.device)
        return Attribution(names, grads.detach(), x.detach(), nan, "input")


def batched_grads(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Gradients of every column of y (M, K) w.r.t. x (M, ...) in one batched backward -> (K, M, ...)."""
    k = y.shape[1]
    eye = torch.eye(k, dtype=y.dtype, device=y.device)[:, None, :].expand(k, y.shape[0], k)
    try:
        (grads,) = torch.autograd.grad(
            y, x, grad_outputs=eye, is_grads_batched=True, retain_graph=True
        )
    except RuntimeError:
        # some ops have no batching rule for their backward: one backward per target instead
        grads = torch.stack(
            [torch.autograd.grad(y[:, i].sum(), x, retain_graph=i < k - 1)[0] for i in range(k)]
        )
    return grads


def benchmark_ig_vs_captum(
    policy, obs: torch.Tensor, layer: str, n_steps: int = 10, repeats: int = 1
) -> dict:
    """Time our one batched IG call for value + every logit against 1 + A Captum calls.

    Both are warmed up on one observation first; each time is the best of ``repeats`` runs.
    Returns {"ours_s", "captum_s", "ratio" (captum / ours), "max_abs_diff"}.
    """
    from captum.attr import IntegratedGradients as CaptumIG

    ig = IntegratedGradients(policy, layer, n_steps=n_steps)
    names, weights = target_matrix("all", policy.n_actions)
    captum = CaptumIG(lambda act: head_outputs(policy, layer, act, weights))

    def ours_run(x: torch.Tensor) -> torch.Tensor:
        return ig.attribute(x, names).attributions  # (K, N, *s)

    def captum_run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            a = policy.forward_to(check_obs(policy, x), layer)
        refs = [
            captum.attribute(a, baselines=0.0, target=k, n_steps=n_steps, method="riemann_right")
            for k in range(len(names))
        ]
        return torch.stack(refs)  # (K, N, *s)

    ours_s, ours = _best_time(ours_run, obs, repeats)
    captum_s, refs = _best_time(captum_run, obs, repeats)
    return {
        "ours_s": ours_s,
        "captum_s": captum_s,
        "ratio": captum_s / max(ours_s, 1e-12),
        "max_abs_diff": (ours - refs).abs().max().item(),
    }


def _best_time(fn, obs: torch.Tensor, repeats: int) -> tuple[float, torch.Tensor]:
    fn(obs[:1])  # warm-up
    best, out = float("inf"), None
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        out = fn(obs)
        best = min(best, time.perf_counter() - start)
    return best, out
