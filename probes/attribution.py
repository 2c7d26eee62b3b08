"""Integrated gradients on a hidden layer (Hilton et al., Appendix B), all targets in one pass.

Split V(x) = F(A(x)) at ``layer``. With a = A(x) and the zero-activation baseline,
    attr = a * (1/n) * sum_{alpha in {1/n, ..., 1}} grad_a F(alpha a)      (right Riemann sum)
and sum(attr) ~ F(a) - F(0); the difference is reported as ``delta``. Targets are the value, policy
logits (never the softmax) and action groups (sums of logits). Every target is a linear read-out of
the head's output vector [value, logit_0, ..., logit_{A-1}], so one forward pass over the n scaled
copies and one batched backward give all of them.

Where the layer's only reader is a Conv2d/Linear L(a) = W a + b (``policy.next_layer``), that
first op is taken out of the n-fold work: L(alpha a) = alpha W a + b is formed from one W a, the
backward stops at L's output, and W^T is applied once to the gradients summed over the steps
(sum_alpha W^T g_alpha = W^T sum_alpha g_alpha). The result is the same sum, in other order.

    ig = IntegratedGradients(policy, "2b", n_steps=10)
    res = ig.attribute(obs, targets="all")      # res.attributions: (K, N, *layer_shape)
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

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
        return self.attributions[self.targets.index(target)]


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

    #: with chunk_size None, steps per chunk are chosen so one chunk's K x gradient tensor stays
    #: under this many bytes
    memory_budget: int = 256 * 2**20

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
        self.chunk_size = chunk_size

    def _chunk(self, per_step_bytes: int) -> int:
        if self.chunk_size is not None:
            return self.chunk_size
        return max(1, min(self.n_steps, self.memory_budget // max(per_step_bytes, 1)))

    def attribute(self, obs: torch.Tensor, targets="all") -> Attribution:
        policy = self.policy
        obs = check_obs(policy, obs)
        names, weights = target_matrix(targets, policy.n_actions)
        if self.layer == "input":
            return self._input_gradient(obs, names, weights)
        with torch.no_grad():
            a = policy.forward_to(obs, self.layer)  # (N, *s)
        n, k = self.n_steps, len(names)
        consumer = self._sole_linear_reader(a)
        if consumer is not None:
            grad_sum = self._grads_through(consumer, a, weights, k)
        else:
            grad_sum = torch.zeros((k, *a.shape), dtype=a.dtype, device=a.device)
            chunk = self._chunk(k * a.numel() * a.element_size())
            for start in range(0, n, chunk):
                alphas = self._alphas(start, min(start + chunk, n), a)
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

    def _alphas(self, start: int, stop: int, a: torch.Tensor) -> torch.Tensor:
        return torch.arange(start + 1, stop + 1, dtype=a.dtype, device=a.device) / self.n_steps

    def _sole_linear_reader(self, a: torch.Tensor) -> nn.Conv2d | nn.Linear | None:
        """The Conv2d/Linear that is the layer's only reader, checked on one sample: it receives
        the activation unchanged, is called once, and no gradient reaches the activation past it.
        None where any of that fails (then every op runs on the n scaled copies)."""
        try:
            m = self.policy.next_layer(self.layer)
        except (LoupeError, AttributeError):
            return None
        if type(m) not in (nn.Conv2d, nn.Linear):
            return None
        x = a[:1].clone().requires_grad_(True)
        z = m(x.flatten(1) if isinstance(m, nn.Linear) else x).detach().requires_grad_(True)
        seen: list[bool] = []

        def forward(inp: torch.Tensor) -> torch.Tensor:
            want = x.flatten(1) if isinstance(m, nn.Linear) else x
            seen.append(inp.shape == want.shape and torch.equal(inp, want))
            return z

        with torch.enable_grad(), _forward_replaced(m, forward):
            logits, value = self.policy.forward_from(self.layer, x)
        if seen != [True]:
            return None
        gx, gz = torch.autograd.grad(
            logits.sum() + value.sum(), (x, z), allow_unused=True, materialize_grads=False
        )
        return m if (gx is None or not gx.any()) and gz is not None else None

    def _grads_through(
        self, m: nn.Conv2d | nn.Linear, a: torch.Tensor, weights: torch.Tensor, k: int
    ) -> torch.Tensor:
        """sum over the n steps of grad_a F(alpha a), F's first op L = m taken out of the loop."""
        n, policy = self.n_steps, self.policy
        linear: Callable[[torch.Tensor], torch.Tensor]
        if isinstance(m, nn.Conv2d):
            linear = lambda x: m._conv_forward(x, m.weight, None)  # noqa: E731
        else:
            linear = lambda x: F.linear(x.flatten(1), m.weight)  # noqa: E731
        with torch.no_grad():
            u = linear(a)  # (N, *z): W a
        bias = (
            torch.zeros((), dtype=u.dtype, device=u.device)
            if m.bias is None
            else m.bias.detach().view(1, -1, *[1] * (u.dim() - 2))
        )
        gz_sum = torch.zeros((k, *u.shape), dtype=u.dtype, device=u.device)
        chunk = self._chunk(k * u.numel() * u.element_size())
        for start in range(0, n, chunk):
            alphas = self._alphas(start, min(start + chunk, n), a)
            c = len(alphas)
            with torch.no_grad():
                scaled = (alphas.view(-1, *[1] * a.dim()) * a).reshape(-1, *a.shape[1:])
                z = (alphas.view(-1, *[1] * u.dim()) * u + bias).reshape(-1, *u.shape[1:])
            z.requires_grad_(True)  # (c*N, *z) = L(alpha a)
            with _forward_replaced(m, lambda _inp, z=z: z):
                y = head_outputs(policy, self.layer, scaled, weights)  # (c*N, K)
            gz_sum += batched_grads(y, z).reshape(k, c, *u.shape).sum(1)
        x = a.detach().requires_grad_(True)
        with torch.enable_grad():
            (grad_sum,) = torch.autograd.grad(
                linear(x), x, grad_outputs=gz_sum, is_grads_batched=True
            )  # (K, N, *s): W^T applied once
        return grad_sum

    def _input_gradient(self, obs, names, weights) -> Attribution:
        x = obs.float() / 255.0 if obs.dtype == torch.uint8 else obs.clone()
        x.requires_grad_(True)
        out = self.policy(x)
        y = torch.cat([out.value[:, None], out.logits], 1) @ weights.to(x).T
        grads = batched_grads(y, x)
        nan = torch.full((len(names), x.shape[0]), float("nan"), device=x.device)
        return Attribution(names, grads.detach(), x.detach(), nan, "input")


@contextlib.contextmanager
def _forward_replaced(module: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor]):
    """``module(x)`` calls ``forward(x)`` inside the block (an instance attribute, removed after)."""
    module.forward = forward
    try:
        yield
    finally:
        del module.forward


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
