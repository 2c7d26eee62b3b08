"""Region-sensitive attention on the Nature trunk (Yang et al. 2018; Nikulin et al. 2019).

h = relu(c3(relu(c2(relu(c1(x))))))        # (N, 64, 7, 7) at 84x84
h = h / |h|_2 over channels                 # layer "c3n"
logits = a2(elu(a1(h)))                     # (N, 2, 7, 7) attention logits
attn = softmax over positions, per map      # or sigmoid
g = h * attn.sum(maps)                      # layer "attn_out"
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attention.base import Policy, conv_out
from attention.nets import _require_positive
from loupe.errors import LoupeError

#: added to attention probabilities before the log in the entropy (METHODS A)
ENTROPY_EPS = 1e-7


def attention_entropy(attn: torch.Tensor) -> torch.Tensor:
    """(N, M, h, w) maps -> (N,) summed over maps of -sum_pos p log p, with p = attn + 1e-7."""
    p = attn.flatten(2) + ENTROPY_EPS
    return -(p * p.log()).sum(-1).sum(-1)


class RegionAttention(nn.Module):
    def __init__(self, channels: int = 64, hidden: int = 512, maps: int = 2, kind: str = "softmax"):
        super().__init__()
        self.a1 = nn.Conv2d(channels, hidden, 1)
        self.a2 = nn.Conv2d(hidden, maps, 1)
        self.kind = kind

    def maps(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.a2(F.elu(self.a1(h)))  # (N, M, h, w)
        if self.kind == "softmax":
            attn = torch.softmax(logits.flatten(2), dim=-1).view_as(logits)
        else:
            attn = torch.sigmoid(logits)
        return attn, logits


class RegionPolicy(Policy):
    name = "region"

    def __init__(self, obs_shape, n_actions: int, attention: str = "softmax"):
        if attention not in ("softmax", "sigmoid"):
            raise LoupeError(f"region: attention must be 'softmax' or 'sigmoid', not {attention!r}")
        super().__init__(obs_shape, n_actions, {"attention": attention})
        c, h, w = self.obs_shape
        h3 = conv_out(conv_out(conv_out(h, 8, 4), 4, 2), 3, 1)
        w3 = conv_out(conv_out(conv_out(w, 8, 4), 4, 2), 3, 1)
        _require_positive(self.name, h3, w3)
        self.c1 = nn.Conv2d(c, 32, 8, 4)
        self.c2 = nn.Conv2d(32, 64, 4, 2)
        self.c3 = nn.Conv2d(64, 64, 3, 1)
        self.attention = RegionAttention(64, 512, 2, attention)
        self.fc = nn.Linear(64 * h3 * w3, 512)
        self._finish(
            [
                ("c1", "_c1"),
                ("c2", "_c2"),
                ("c3", "_c3"),
                ("c3n", "_c3n"),
                ("attn_out", "_attend"),
                ("fc", "_fc"),
            ],
            512,
        )

    @property
    def a1(self) -> nn.Conv2d:
        return self.attention.a1

    @property
    def a2(self) -> nn.Conv2d:
        return self.attention.a2

    @property
    def has_attention(self) -> bool:
        return True

    def _c1(self, x):
        return F.relu(self.c1(x))

    def _c2(self, x):
        return F.relu(self.c2(x))

    def _c3(self, x):
        return F.relu(self.c3(x))

    def _c3n(self, x):
        return F.normalize(x, p=2, dim=1)

    def _attend(self, h):
        attn, logits = self.attention.maps(h)
        g = h * attn.sum(dim=1, keepdim=True)
        return g, {
            "attention": attn,
            "attention_logits": logits,
            "attention_entropy": attention_entropy(attn),
        }

    def _fc(self, x):
        return F.relu(self.fc(x.flatten(1)))

    def _consumers(self):
        # c3n feeds both a1 and the gating; a1 is the linear consumer an edit targets
        return {"c1": self.c2, "c2": self.c3, "c3n": self.attention.a1, "attn_out": self.fc}
