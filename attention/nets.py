"""Plain CNN policies: Nature-DQN, IMPALA, and Hilton et al.'s interpretable network."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attention.base import Policy, conv_out
from loupe.errors import LoupeError


def _require_positive(name: str, *sizes: int) -> None:
    if min(sizes) <= 0:
        raise LoupeError(
            f"{name}: the observation is too small for this network (a feature map would be "
            f"{sizes}); choose a policy for smaller inputs"
        )


class NatureCNN(Policy):
    """Mnih et al. 2015: conv 32 8x8/4, 64 4x4/2, 64 3x3/1, fc 512."""

    name = "nature"

    def __init__(self, obs_shape, n_actions: int):
        super().__init__(obs_shape, n_actions, {})
        c, h, w = self.obs_shape
        h1, w1 = conv_out(h, 8, 4), conv_out(w, 8, 4)
        h2, w2 = conv_out(h1, 4, 2), conv_out(w1, 4, 2)
        h3, w3 = conv_out(h2, 3, 1), conv_out(w2, 3, 1)
        _require_positive(self.name, h3, w3)
        self.c1 = nn.Conv2d(c, 32, 8, 4)
        self.c2 = nn.Conv2d(32, 64, 4, 2)
        self.c3 = nn.Conv2d(64, 64, 3, 1)
        self.fc = nn.Linear(64 * h3 * w3, 512)
        self._finish([("c1", "_c1"), ("c2", "_c2"), ("c3", "_c3"), ("fc", "_fc")], 512)

    def _c1(self, x):
        return F.relu(self.c1(x))

    def _c2(self, x):
        return F.relu(self.c2(x))

    def _c3(self, x):
        return F.relu(self.c3(x))

    def _fc(self, x):
        return F.relu(self.fc(x.flatten(1)))

    def _consumers(self):
        return {"c1": self.c2, "c2": self.c3, "c3": self.fc}


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv0 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv1(F.relu(self.conv0(F.relu(x))))


class ImpalaStage(nn.Module):
    """conv3x3 -> maxpool 3/2 -> two residual blocks."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.res0 = ResidualBlock(out_channels)
        self.res1 = ResidualBlock(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.conv(x), 3, 2, padding=1)
        return self.res1(self.res0(x))


class ImpalaCNN(Policy):
    """Espeholt et al. 2018: stages of depth (16, 32, 32), ReLU, fc 256."""

    name = "impala"

    def __init__(self, obs_shape, n_actions: int, depths=(16, 32, 32)):
        super().__init__(obs_shape, n_actions, {"depths": list(depths)})
        c, h, w = self.obs_shape
        stages = []
        for depth in depths:
            stages.append(ImpalaStage(c, depth))
            c, h, w = depth, conv_out(h, 3, 2, 1), conv_out(w, 3, 2, 1)
            _require_positive(self.name, h, w)
        self.stages = nn.ModuleList(stages)
        self.fc = nn.Linear(c * h * w, 256)
        names = [(f"s{i + 1}", f"stages.{i}") for i in range(len(depths))]
        self._finish([*names, ("fc", "_fc")], 256)

    def _fc(self, x):
        return F.relu(self.fc(F.relu(x).flatten(1)))


def l2_pool(x: torch.Tensor) -> torch.Tensor:
    """sqrt(avgpool2(x^2) + 1e-8), 2x2 windows, stride 2."""
    return torch.sqrt(F.avg_pool2d(x * x, 2, 2) + 1e-8)


class InterpretableCNN(Policy):
    """Hilton et al. 2020, App. C: convolutions with L2 pooling; analysis layer 2b.

    Each layer's activation is after its ReLU and, where the architecture pools after that layer,
    after the pooling, so it is exactly what the next layer reads.
    """

    name = "interpretable"

    def __init__(self, obs_shape, n_actions: int):
        super().__init__(obs_shape, n_actions, {})
        c, h, w = self.obs_shape
        for _ in range(4):
            h, w = h // 2, w // 2
        _require_positive(self.name, h, w)
        self.conv1a = nn.Conv2d(c, 16, 7, padding=3)
        self.conv2a = nn.Conv2d(16, 32, 5, padding=2)
        self.conv2b = nn.Conv2d(32, 32, 5, padding=2)
        self.conv3a = nn.Conv2d(32, 32, 5, padding=2)
        self.conv4a = nn.Conv2d(32, 32, 5, padding=2)
        self.fc1 = nn.Linear(32 * h * w, 256)
        self.fc2 = nn.Linear(256, 512)
        self._finish(
            [
                ("1a", "_1a"),
                ("2a", "_2a"),
                ("2b", "_2b"),
                ("3a", "_3a"),
                ("4a", "_4a"),
                ("fc1", "_fc1"),
                ("fc2", "_fc2"),
            ],
            512,
        )

    def _1a(self, x):
        return l2_pool(F.relu(self.conv1a(x)))

    def _2a(self, x):
        return F.relu(self.conv2a(x))

    def _2b(self, x):
        return l2_pool(F.relu(self.conv2b(x)))

    def _3a(self, x):
        return l2_pool(F.relu(self.conv3a(x)))

    def _4a(self, x):
        return l2_pool(F.relu(self.conv4a(x)))

    def _fc1(self, x):
        return F.relu(self.fc1(x.flatten(1)))

    def _fc2(self, x):
        return F.relu(self.fc2(x))

    def _consumers(self):
        return {
            "1a": self.conv2a,
            "2a": self.conv2b,
            "2b": self.conv3a,
            "3a": self.conv4a,
            "4a": self.fc1,
            "fc1": self.fc2,
        }
