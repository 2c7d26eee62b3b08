"""Self-attention after the first convolution (Sun et al.), four variants and a no-attention trunk.

    sdpa(q, k, v, n) = softmax(q @ k^T / sqrt(n), dim=-1) @ v     over the last two dims
    SWA   on (N, C, H, W), n = W: rows attend to rows within each channel
    CWRA  permute to (N, W, H, C), n = C: rows attend to rows within each column
    CWCA  permute to (N, H, W, C), n = C: columns attend to columns within each row
    CWRCA CWRA + CWCA (n = C by default; the original code used n = W: option cwrca_scale="W")
Block: q, k, v = 1x1 convs with bias; out = attention(q, k, v) + h (residual, no norm).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from attention.base import Policy, conv_out
from attention.nets import _require_positive
from loupe.errors import LoupeError


def sdpa(q, k, v, n: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (output, attention weights); weights are softmax rows over the last dim."""
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(n), dim=-1)
    return weights @ v, weights


def swa(q, k, v):
    return sdpa(q, k, v, q.shape[-1])  # (N, C, H, W), n = W


def _permuted(q, k, v, order, n_scale):
    # order: permutation from (N, C, H, W); the inverse restores the layout
    inv = [order.index(i) for i in range(4)]
    qp, kp, vp = (t.permute(*order) for t in (q, k, v))
    out, weights = sdpa(qp, kp, vp, n_scale)
    return out.permute(*inv), weights


def cwra(q, k, v, n: float | None = None):
    return _permuted(q, k, v, [0, 3, 2, 1], n or q.shape[1])  # (N, W, H, C)


def cwca(q, k, v, n: float | None = None):
    return _permuted(q, k, v, [0, 2, 3, 1], n or q.shape[1])  # (N, H, W, C)


VARIANTS = ("swa", "cwra", "cwca", "cwrca")


class SelfAttentionBlock(nn.Module):
    def __init__(self, channels: int, variant: str, cwrca_scale: str = "C"):
        super().__init__()
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.variant = variant
        self.cwrca_scale = cwrca_scale

    def attend(self, h: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """-> (pre-residual output (N, C, H, W), list of attention weight tensors)."""
        q, k, v = self.q(h), self.k(h), self.v(h)
        if self.variant == "swa":
            out, w = swa(q, k, v)
            return out, [w]
        if self.variant == "cwra":
            out, w = cwra(q, k, v)
            return out, [w]
        if self.variant == "cwca":
            out, w = cwca(q, k, v)
            return out, [w]
        n = q.shape[1] if self.cwrca_scale == "C" else q.shape[-1]
        out_r, w_r = cwra(q, k, v, n)
        out_c, w_c = cwca(q, k, v, n)
        return out_r + out_c, [w_r, w_c]

    def forward(self, h: torch.Tensor):
        out, weights = self.attend(h)
        entropy = torch.stack(
            [-(w * (w + 1e-7).log()).sum(-1).flatten(1).mean(1) for w in weights]
        ).mean(0)  # (N,) mean entropy of the softmax rows
        amap = out.sum(dim=1, keepdim=True)  # (N, 1, H, W), the plotted map
        return out + h, {"attention": amap, "attention_entropy": entropy}


class SunPolicy(Policy):
    """conv(4->16, k8, s4) relu -> [block] -> conv(16->32, k4, s2) relu -> fc 256 relu -> heads."""

    name = "sun-na"

    def __init__(self, obs_shape, n_actions: int, variant: str = "na", cwrca_scale: str = "C"):
        if variant not in ("na", *VARIANTS):
            raise LoupeError(f"sun: unknown attention variant {variant!r}")
        if cwrca_scale not in ("C", "W"):
            raise LoupeError(f"sun: cwrca_scale must be 'C' or 'W', not {cwrca_scale!r}")
        self.name = f"sun-{variant}"
        opts = {"cwrca_scale": cwrca_scale} if variant == "cwrca" else {}
        super().__init__(obs_shape, n_actions, opts)
        c, h, w = self.obs_shape
        h1, w1 = conv_out(h, 8, 4), conv_out(w, 8, 4)
        h2, w2 = conv_out(h1, 4, 2), conv_out(w1, 4, 2)
        _require_positive(self.name, h2, w2)
        self.variant = variant
        self.c1 = nn.Conv2d(c, 16, 8, 4)
        stages = [("c1", "_c1")]
        if variant != "na":
            self.block = SelfAttentionBlock(16, variant, cwrca_scale)
            stages.append(("block", "block"))
        self.c2 = nn.Conv2d(16, 32, 4, 2)
        self.fc = nn.Linear(32 * h2 * w2, 256)
        self._finish([*stages, ("c2", "_c2"), ("fc", "_fc")], 256)

    @property
    def has_attention(self) -> bool:
        return self.variant != "na"

    def _c1(self, x):
        return F.relu(self.c1(x))

    def _c2(self, x):
        return F.relu(self.c2(x))

    def _fc(self, x):
        return F.relu(self.fc(x.flatten(1)))

    def _consumers(self):
        consumers = {"c2": self.fc}
        consumers["block" if self.variant != "na" else "c1"] = self.c2
        return consumers
