"""Region-sensitive attention on the Nature trunk (Yang et al. 2018; Nikulin et al. 2019; METHODS A).

h = relu(c3(relu(c2(relu(c1(x))))))        # layer "c3": (N, 64, 7, 7) at 84x84
h = h / |h|_2 over channels                 # layer "c3n"
logits = a2(elu(a1(h)))                     # (N, 2, 7, 7) attention logits
attn = softmax over positions, per map      # or sigmoid (option attention="sigmoid")
g = h * attn.sum(maps)                      # layer "attn_out"
z = relu(fc(flatten(g)))                    # layer "fc": (N, 512), then heads pi and v
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from attention.base import Policy, entropy
from attention.nets import NatureTrunk
from loupe.errors import LoupeError

#: the ways to turn attention logits into maps
ATTENTION_KINDS = ("softmax", "sigmoid")


def attention_entropy(attn: torch.Tensor) -> torch.Tensor:
    """(N, M, h, w) maps -> (N,): sum over maps of -sum_pos p log p with p = attn + 1e-7."""
    return entropy(attn.flatten(2), dims=(1, 2))


def normalise_attention(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """(N, M, h, w) logits -> maps: softmax over the h*w positions of each map, or sigmoid."""
    if kind == "softmax":
        return torch.softmax(logits.flatten(2), dim=-1).view_as(logits)
    return torch.sigmoid(logits)


@dataclasses.dataclass
class RegionConfig:
    """Options of the region-sensitive attention policy."""

    #: "softmax" (each map sums to 1 over positions) or "sigmoid" (each position in (0, 1))
    attention: str = "softmax"

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_KINDS:
            raise LoupeError(
                f"policy region: attention must be one of {', '.join(ATTENTION_KINDS)}, "
                f"got {self.attention!r}"
            )


class RegionPolicy(NatureTrunk, Policy):
    """Nature trunk -> L2 normalisation -> two attention maps gating the features -> fc 512.

    Modules: c1, c2, c3 (Conv2d), a1 (1x1, 64->512), a2 (1x1, 512->2), fc, pi, v.
    Layers: c1, c2, c3, c3n, attn_out, fc.
    """

    name = "region"
    #: number of attention maps
    maps = 2

    def __init__(self, obs_shape: Sequence[int], n_actions: int, config: RegionConfig) -> None:
        super().__init__(obs_shape, n_actions, config)
        h3, w3 = self._build_trunk()
        self.a1 = nn.Conv2d(64, 512, 1)
        self.a2 = nn.Conv2d(512, self.maps, 1)
        self.fc = nn.Linear(64 * h3 * w3, 512)  # 3136 at 84x84
        stages = [
            ("c1", "_c1"),
            ("c2", "_c2"),
            ("c3", "_c3"),
            ("c3n", "_c3n"),
            ("attn_out", "_attend"),
            ("fc", "_fc"),
        ]
        self._build_heads(stages, 512)

    @property
    def has_attention(self) -> bool:
        return True

    def _c3n(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, p=2, dim=1)  # unit L2 norm over channels at each position

    def attention_maps(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised features (N, 64, h, w) -> (maps, logits), both (N, 2, h, w)."""
        logits = self.a2(F.elu(self.a1(h)))
        return normalise_attention(logits, self.config.attention), logits

    def _attend(self, h: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        attn, logits = self.attention_maps(h)
        g = h * attn.sum(dim=1, keepdim=True)  # (N, 64, h, w)
        extras = {
            "attention": attn,
            "attention_logits": logits,
            "attention_entropy": attention_entropy(attn),
        }
        return g, extras

    def _fc(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(x.flatten(1)))  # (N, 512)

    def _consumers(self) -> dict[str, nn.Module]:
        # c3n is read by a1 and by the gating h * attn; a1 is returned, so an edit there blinds the
        # attention to a direction while the gated features keep it (edit attn_out -> fc for those).
        # c3 goes through the normalisation and has no linear consumer.
        return {"c1": self.c2, "c2": self.c3, "c3n": self.a1, "attn_out": self.fc}
