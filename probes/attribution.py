"""Integrated gradients on a hidden layer (Hilton et al., Appendix B), all targets in one pass.

Split V(x) = F(A(x)) at ``layer``. With a = A(x) and the zero-activation baseline,
    attr = a * (1/n) * sum_{alpha in {1/n, ..., 1}} grad_a F(alpha a)      (right Riemann sum)
and sum(attr) ~ F(a) - F(0); the difference is reported as ``delta``. Targets are the value, policy
logits (never the softmax) and action groups (sums of logits). Every target is a linear read-out of
the head's output vector [value, logit_0, ..., logit_{A-1}], so one forward pass over the n scaled
copies and one backward per target over that graph give all of them. The prefix up to the layer
runs once per observation; only the suffix runs on the scaled copies, in memory-sized blocks.

Where the layer's only reader is a Conv2d/Linear L (``policy.next_layer``), the backward stops at
L's output: its gradients are summed over the steps and L's input gradient (W^T) is applied once
per observation (sum_alpha W^T g_alpha = W^T sum_alpha g_alpha). L itself still runs forward on
every scaled copy, so the forward is bit for bit that of Captum's ``riemann_right``.

The Riemann points are Captum's to the last bit (``riemann_alphas``): at a near-tie of a max-pool
or ReLU (a margin below float32 rounding of the activation) one ulp in alpha * a decides where a
step's gradient flows, so any other rounding of the points can move an attribution by a whole
step's share. Such observations are ill-conditioned in float32: loupe and Captum then agree with
each other but both differ from a float64 computation.

    ig = IntegratedGradients(policy, "2b", n_steps=10)
    res = ig.attribute(obs, targets="all")      # res.attributions: (K, N, *layer_shape)
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import resource
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
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

    #: with chunk_size None, rows (observation x step pairs) per suffix pass are chosen so that
    #: one pass's activations and gradients stay under about this many bytes (impala s2 at
    #: B=256, 2 quiet CPU cores: 1.85 s at 128 MiB, 1.97 s at 64, 2.25 s at 256, 3.1 s at 4 MiB,
    #: 3.5 s at 1 GiB; interpretable 2b: 2.1 s at 128 MiB, 4.5 s at 1 GiB)
    memory_budget: int = 128 * 2**20
    #: how the K targets' gradients are taken: "loop" (one backward per target over the retained
    #: graph, summed straight into the result) or "batched" (autograd's is_grads_batched)
    backward: str = "loop"
    #: take the sole linear reader's input gradient once per observation, not once per step
    reader_shortcut: bool = True

    def __init__(self, policy, layer: str, n_steps: int = 10, chunk_size: int | None = None):
        """IG at ``layer`` (or "input") with ``n_steps`` Riemann steps; ``chunk_size``:
        (observation, step) rows per pass through the rest of the network (None: sized by
        ``memory_budget``). Any chunking gives the same sums."""
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
            a = policy.forward_to(obs, self.layer)  # (N, *s): the prefix once per observation
        reader = self._sole_linear_reader(a) if self.reader_shortcut else None
        grad_sum = self._step_sums(a, weights, reader)  # (K, N, *s)
        attr = a.unsqueeze(0) * grad_sum / self.n_steps  # (K, N, *s)
        with torch.no_grad():
            f_a = head_outputs(policy, self.layer, a, weights)  # (N, K)
            f_0 = head_outputs(policy, self.layer, torch.zeros_like(a), weights)
        delta = attr.flatten(2).sum(-1) - (f_a - f_0).T
        return Attribution(names, attr.detach(), a, delta.detach(), self.layer)

    def _blocks(self, n_obs: int, row_bytes: int) -> list[tuple[int, int, int, int]]:
        """(obs_start, obs_stop, step_start, step_stop) blocks of about chunk_size rows (or what
        fits the memory budget): whole observations with all their steps where a chunk holds n
        steps or more, else one observation's steps in pieces. Sizes are split evenly and no
        block is a single row where more exist (a batch of one may take other kernels, whose
        rounding can tip a near-tie in a max-pool or ReLU)."""
        n = self.n_steps
        size = self.chunk_size or self.memory_budget // max(row_bytes, 1)
        size = max(2, size)

        def split(count: int, per: int) -> list[int]:
            parts = max(1, min(-(-count // per), count // 2))
            return [count * i // parts for i in range(parts + 1)]

        if size >= n:
            b = split(n_obs, max(size // n, 2 if n == 1 else 1))
            return [(i, j, 0, n) for i, j in zip(b[:-1], b[1:])]
        b = split(n, size)
        return [(i, i + 1, s, t) for i in range(n_obs) for s, t in zip(b[:-1], b[1:])]

    def _step_sums(
        self, a: torch.Tensor, weights: torch.Tensor, reader: nn.Conv2d | nn.Linear | None
    ) -> torch.Tensor:
        """sum over the n steps of grad_a F(alpha a) for every target: (K, N, *s).

        The suffix runs on blocks of (observation, step) rows. With ``reader`` (the layer's
        sole Conv2d/Linear L) the backward stops at L's output z: the gradients w.r.t. z are
        summed over the steps, and L's input gradient (W^T) is applied once per observation
        instead of once per step. The forward is unchanged (L runs on every scaled copy), so the
        max-pool and ReLU decisions are those of the plain sum, and Captum's.
        """
        policy, n, k = self.policy, self.n_steps, weights.shape[0]
        alphas = riemann_alphas(n, a)
        z_shape = a.shape[1:] if reader is None else self._reader_out_shape
        out = torch.zeros((k, a.shape[0], *z_shape), dtype=a.dtype, device=a.device)
        # held per row: the suffix's saved activations (a few layer-sized tensors) and the
        # gradients (one target's in the loop, all K batched)
        per_row = (k if self.backward == "batched" else 1) * math.prod(z_shape)
        row_bytes = (per_row + 8 * math.prod(a.shape[1:])) * a.element_size()
        bcast = [1] * (a.dim() - 1)
        for i0, i1, s0, s1 in self._blocks(a.shape[0], row_bytes):
            with torch.no_grad():
                scaled = alphas[s0:s1].view(1, -1, *bcast) * a[i0:i1, None]  # (P, S, *s)
                scaled = scaled.reshape(-1, *a.shape[1:])  # (P*S, *s)
            if reader is None:
                leaf = scaled.requires_grad_(True)
                y = head_outputs(policy, self.layer, scaled, weights)  # (P*S, K)
            else:
                with torch.no_grad():
                    leaf = reader(_reader_input(reader, scaled))  # L(alpha a), as the module runs
                leaf.requires_grad_(True)
                with _forward_replaced(reader, lambda _inp, z=leaf: z):
                    y = head_outputs(policy, self.layer, scaled, weights)  # (P*S, K)
            acc = out[:, i0:i1]  # (K, P, *z)
            if self.backward == "batched":
                acc += batched_grads(y, leaf).view(k, i1 - i0, s1 - s0, *z_shape).sum(2)
                continue
            ones = torch.ones_like(y[:, 0])
            for t in range(k):
                (g,) = torch.autograd.grad(y[:, t], leaf, ones, retain_graph=t < k - 1)
                acc[t] += g.view(i1 - i0, s1 - s0, *z_shape).sum(1)
        if reader is None:
            return out
        return _reader_input_grad(reader, out, a.shape[1:])

    def _sole_linear_reader(self, a: torch.Tensor) -> nn.Conv2d | nn.Linear | None:
        """The Conv2d/Linear that is the layer's only reader, checked once per activation shape on
        two observations: it receives the activation unchanged, is called once, and no gradient
        reaches the activation past it. None where any of that fails (then the backward runs
        through it on every step)."""
        key = (tuple(a.shape[1:]), a.dtype, a.device)
        if getattr(self, "_reader_key", None) != key:
            self._reader, self._reader_out_shape = self._find_reader(a[:1].expand(2, *a.shape[1:]))
            self._reader_key = key
        return self._reader

    def _find_reader(self, a2: torch.Tensor) -> tuple[nn.Conv2d | nn.Linear | None, Any]:
        # two rows, not one: a batch of one takes slower kernels on CPU
        try:
            m = self.policy.next_layer(self.layer)
        except (LoupeError, AttributeError):
            return None, None
        if type(m) is nn.Conv2d and m.padding_mode == "zeros":
            pass
        elif type(m) is not nn.Linear:
            return None, None
        x = a2.clone().requires_grad_(True)
        want = _reader_input(m, x)
        z = m(want).detach().requires_grad_(True)
        seen: list[bool] = []

        def forward(inp: torch.Tensor) -> torch.Tensor:
            seen.append(inp.shape == want.shape and torch.equal(inp, want))
            return z

        with torch.enable_grad(), _forward_replaced(m, forward):
            logits, value = self.policy.forward_from(self.layer, x)
        if seen != [True]:
            return None, None
        gx, gz = torch.autograd.grad(
            logits.sum() + value.sum(), (x, z), allow_unused=True, materialize_grads=False
        )
        if (gx is None or not gx.any()) and gz is not None:
            return m, z.shape[1:]
        return None, None

    def _input_gradient(self, obs, names, weights) -> Attribution:
        x = obs.float() / 255.0 if obs.dtype == torch.uint8 else obs.clone()
        x.requires_grad_(True)
        out = self.policy(x)
        y = torch.cat([out.value[:, None], out.logits], 1) @ weights.to(x).T
        grads = batched_grads(y, x)
        nan = torch.full((len(names), x.shape[0]), float("nan"), device=x.device)
        return Attribution(names, grads.detach(), x.detach(), nan, "input")


def riemann_alphas(n: int, like: torch.Tensor) -> torch.Tensor:
    """The right Riemann points 1/n, 2/n, ..., 1 bit for bit as Captum's ``riemann_right`` takes
    them (a float32 linspace), in ``like``'s dtype and device.

    They must match to the last bit: at a near-tie of a max-pool or ReLU (a margin below float32
    rounding of the activation), one ulp in alpha * a decides which input the gradient flows to
    at that step, and moves the attribution by a whole step's share.
    """
    return torch.linspace(1.0 / n, 1.0, n).to(dtype=like.dtype, device=like.device)


def _reader_input(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1) if isinstance(m, nn.Linear) else x


def _reader_input_grad(m: nn.Conv2d | nn.Linear, gz: torch.Tensor, in_shape) -> torch.Tensor:
    """W^T of the reader applied to (K, N, *z) output gradients -> (K, N, *in_shape)."""
    k, n = gz.shape[:2]
    flat = gz.reshape(k * n, *gz.shape[2:])
    with torch.no_grad():
        if isinstance(m, nn.Linear):
            g = flat @ m.weight
        else:
            g = torch.nn.grad.conv2d_input(
                (k * n, *in_shape), m.weight, flat, m.stride, m.padding, m.dilation, m.groups
            )
    return g.reshape(k, n, *in_shape)


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
    """Time our one IG call for value + every logit against 1 + A Captum calls.

    Both are warmed up on two observations first, then run alternated (ours, Captum, ours,
    Captum, ...) ``repeats`` times, so load from other work on the machine falls on both. Each
    time is the best of its runs; CPU seconds (user + system of this process, all threads) are
    reported next to the wall seconds. Returns {"ours_s", "captum_s", "ratio" (captum / ours),
    "ours_cpu_s", "captum_cpu_s", "cpu_ratio", "max_abs_diff", "runs"}.
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

    runs: dict[str, list[dict[str, float]]] = {"ours": [], "captum": []}
    for fn in (ours_run, captum_run):
        fn(obs[:2])  # warm-up
    ours = refs = None
    for _ in range(max(1, repeats)):
        for key, fn in (("ours", ours_run), ("captum", captum_run)):
            r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            out = fn(obs)
            wall = time.perf_counter() - t0
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            cpu = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
            runs[key].append({"wall_s": wall, "cpu_s": cpu})
            if key == "ours":
                ours = out
            else:
                refs = out
            del out
    assert ours is not None and refs is not None
    best = {k: min(r["wall_s"] for r in v) for k, v in runs.items()}
    cpu = {k: min(r["cpu_s"] for r in v) for k, v in runs.items()}
    result = {
        "ours_s": best["ours"],
        "captum_s": best["captum"],
        "ratio": best["captum"] / max(best["ours"], 1e-12),
        "ours_cpu_s": cpu["ours"],
        "captum_cpu_s": cpu["captum"],
        "cpu_ratio": cpu["captum"] / max(cpu["ours"], 1e-12),
        "max_abs_diff": (ours - refs).abs().max().item(),
        "runs": runs,
    }
    if result["max_abs_diff"] > 1e-5:
        result["float64_check"] = _float64_arbiter(policy, obs, layer, n_steps, ours, refs)
    return result


def _float64_arbiter(policy, obs, layer, n_steps, ours, refs) -> dict[str, Any]:
    """Where loupe and Captum disagree: both against IG in float64 on the worst observation."""
    import copy

    per_obs = (ours - refs).abs().flatten(2).amax((0, 2))  # (N,)
    i = int(per_obs.argmax())
    p64 = copy.deepcopy(policy).double()
    x = obs[i : i + 1].expand(2, *obs.shape[1:])
    ref = IntegratedGradients(p64, layer, n_steps=n_steps).attribute(x).attributions[:, 0]
    return {
        "observation": i,
        "observations_over_1e-5": int((per_obs > 1e-5).sum()),
        "ours_vs_float64": (ours[:, i].double() - ref).abs().max().item(),
        "captum_vs_float64": (refs[:, i].double() - ref).abs().max().item(),
    }
