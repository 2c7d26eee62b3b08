"""Self-attention after the first convolution (Sun et al.; METHODS B): four variants and none.

    sdpa(q, k, v, n) = softmax(q @ k^T / sqrt(n), dim=-1) @ v     over the last two dims
    SWA   on (N, C, H, W), n = W: rows attend to rows within each channel
    CWRA  permute to (N, W, H, C), n = C: rows attend to rows within each column ("vertical")
    CWCA  permute to (N, H, W, C), n = C: columns attend to columns within each row ("horizontal")
    CWRCA CWRA + CWCA, both with n = C by default; the original code used n = W for both, which the
          option cwrca_scale="W" reproduces
Block: q, k, v = 1x1 convs with bias; out = attention(q, k, v) + h (residual, no norm, no projection).
Trunk: conv(4->16, k8, s4) relu -> block -> conv(16->32, k4, s2) relu -> fc 256 relu -> heads.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from attention.base import Policy, conv_out, entropy, require_positive
from loupe.errors import LoupeError

#: an attention variant: (q, k, v) each (N, C, H, W) -> (output (N, C, H, W), softmax weights)
Attention = Callable[..., tuple[torch.Tensor, list[torch.Tensor]]]


def sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., L, D) each -> (output (..., L, D), weights (..., L, L) whose rows are softmaxes)."""
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(n), dim=-1)
    return weights @ v, weights


def _permuted(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, order: tuple[int, ...], n: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """sdpa in the layout ``order`` (a permutation of (N, C, H, W)), output back in NCHW."""
    inverse = tuple(order.index(i) for i in range(4))
    out, weights = sdpa(q.permute(order), k.permute(order), v.permute(order), n)
    return out.permute(inverse), weights


def swa(q, k, v) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Rows attend to rows within each channel, n = W; weights (N, C, H, H)."""
    out, weights = sdpa(q, k, v, q.shape[-1])
    return out, [weights]


def cwra(q, k, v, n: float | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Rows attend to rows within each column over channel vectors, n = C; weights (N, W, H, H)."""
    out, weights = _permuted(q, k, v, (0, 3, 2, 1), n or q.shape[1])
    return out, [weights]


def cwca(q, k, v, n: float | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Columns attend to columns within each row over channel vectors, n = C; weights (N, H, W, W)."""
    out, weights = _permuted(q, k, v, (0, 2, 3, 1), n or q.shape[1])
    return out, [weights]


def cwrca(q, k, v, scale: str = "C") -> tuple[torch.Tensor, list[torch.Tensor]]:
    """CWRA + CWCA, both scaled by n = C (scale "C") or n = W (scale "W", the original code)."""
    n = q.shape[1] if scale == "C" else q.shape[-1]
    rows, w_rows = cwra(q, k, v, n)
    cols, w_cols = cwca(q, k, v, n)
    return rows + cols, w_rows + w_cols


#: variant name -> attention function
VARIANTS: dict[str, Attention] = {"swa": swa, "cwra": cwra, "cwca": cwca, "cwrca": cwrca}
#: values of the cwrca_scale option
CWRCA_SCALES = ("C", "W")


def mean_row_entropy(weights: list[torch.Tensor]) -> torch.Tensor:
    """Softmax weight tensors (N, ..., L, L) -> (N,) mean entropy of all their rows."""
    per_row = torch.cat([entropy(w, dims=(-1,)).flatten(1) for w in weights], dim=1)
    return per_row.mean(dim=1)


class SelfAttentionBlock(nn.Module):
    """q, k, v = 1x1 convs of h; out = attention(q, k, v) + h."""

    def __init__(self, channels: int, variant: str, cwrca_scale: str = "C") -> None:
        super().__init__()
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.variant = variant
        self.cwrca_scale = cwrca_scale

    def attend(self, h: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(N, C, H, W) -> (pre-residual output (N, C, H, W), list of softmax weight tensors)."""
        q, k, v = self.q(h), self.k(h), self.v(h)
        if self.variant == "cwrca":
            return cwrca(q, k, v, self.cwrca_scale)
        return VARIANTS[self.variant](q, k, v)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out, weights = self.attend(h)
        extras = {
            "attention": out.sum(dim=1, keepdim=True),  # (N, 1, H, W), the map Sun et al. plot
            "attention_entropy": mean_row_entropy(weights),  # (N,)
        }
        return out + h, extras


@dataclasses.dataclass
class SunConfig:
    """Sun et al.'s networks without the combined CWRCA block have no options."""


@dataclasses.dataclass
class CwrcaConfig:
    """Options of the combined row-and-column attention network."""

    #: scale of the attention logits: "C" divides by sqrt(channels), "W" by sqrt(width) as the
    #: original code did
    cwrca_scale: str = "C"

    def __post_init__(self) -> None:
        if self.cwrca_scale not in CWRCA_SCALES:
            raise LoupeError(
                f"policy sun-cwrca: cwrca_scale must be one of {', '.join(CWRCA_SCALES)}, "
                f"got {self.cwrca_scale!r}"
            )


class SunPolicy(Policy):
    """conv(C->16, k8, s4) relu -> [self-attention block] -> conv(16->32, k4, s2) relu -> fc 256.

    Modules: c1, block (q, k, v; absent for "na"), c2, fc, pi, v. Layers: c1, [block], c2, fc.
    """

    def __init__(
        self,
        obs_shape: Sequence[int],
        n_actions: int,
        config: SunConfig | CwrcaConfig,
        variant: str = "na",
    ) -> None:
        if variant != "na" and variant not in VARIANTS:
            raise ValueError(f"unknown self-attention variant {variant!r}")
        self.name = f"sun-{variant}"
        super().__init__(obs_shape, n_actions, config)
        self.variant = variant
        c, h, w = self.obs_shape
        h1, w1 = conv_out(h, 8, 4), conv_out(w, 8, 4)
        h2, w2 = conv_out(h1, 4, 2), conv_out(w1, 4, 2)
        require_positive(self.name, self.obs_shape, h2, w2)
        self.c1 = nn.Conv2d(c, 16, 8, 4)
        stages = [("c1", "_c1")]
        if variant != "na":
            scale = getattr(config, "cwrca_scale", "C")
            self.block = SelfAttentionBlock(16, variant, scale)
            stages.append(("block", "block"))
        self.c2 = nn.Conv2d(16, 32, 4, 2)
        self.fc = nn.Linear(32 * h2 * w2, 256)  # 2592 at 84x84
        self._build_heads([*stages, ("c2", "_c2"), ("fc", "_fc")], 256)

    @property
    def has_attention(self) -> bool:
        return self.variant != "na"

    def _c1(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.c1(x))  # (N, 16, 20, 20) at 84x84

    def _c2(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.c2(x))  # (N, 32, 9, 9)

    def _fc(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(x.flatten(1)))  # (N, 256)

    def _consumers(self) -> dict[str, nn.Module]:
        # with a block, c1 is read by q, k, v and the residual: no single consumer
        before_c2 = "block" if self.has_attention else "c1"
        return {before_c2: self.c2, "c2": self.fc}
