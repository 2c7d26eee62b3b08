"""Plain CNN policies: Nature-DQN, IMPALA, and Hilton et al.'s interpretable network (SPEC 2.2)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attention.base import Policy, conv_out, require_positive
from loupe.errors import LoupeError


@dataclasses.dataclass
class NatureConfig:
    """The Nature-DQN network has no options."""


class NatureTrunk:
    """The Nature-DQN convolutions c1-c3 (32 8x8/4, 64 4x4/2, 64 3x3/1, ReLU), for Policy subclasses.

    Shared by ``NatureCNN`` and the region-attention policies; the modules keep the names c1, c2, c3.
    """

    def _build_trunk(self) -> tuple[int, int]:
        """Create c1-c3 for ``self.obs_shape`` -> (height, width) of the c3 output."""
        c, h, w = self.obs_shape
        h3 = conv_out(conv_out(conv_out(h, 8, 4), 4, 2), 3, 1)
        w3 = conv_out(conv_out(conv_out(w, 8, 4), 4, 2), 3, 1)
        require_positive(self.name, self.obs_shape, h3, w3)
        self.c1 = nn.Conv2d(c, 32, 8, 4)
        self.c2 = nn.Conv2d(32, 64, 4, 2)
        self.c3 = nn.Conv2d(64, 64, 3, 1)
        return h3, w3

    def _c1(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.c1(x))  # (N, 32, 20, 20) at 84x84

    def _c2(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.c2(x))  # (N, 64, 9, 9)

    def _c3(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.c3(x))  # (N, 64, 7, 7)


class NatureCNN(NatureTrunk, Policy):
    """Mnih et al. 2015: conv 32 8x8/4, 64 4x4/2, 64 3x3/1, fc 512; layers c1, c2, c3, fc."""

    name = "nature"

    def __init__(self, obs_shape: Sequence[int], n_actions: int, config: NatureConfig) -> None:
        super().__init__(obs_shape, n_actions, config)
        h3, w3 = self._build_trunk()
        self.fc = nn.Linear(64 * h3 * w3, 512)  # 3136 at 84x84
        stages = [("c1", "_c1"), ("c2", "_c2"), ("c3", "_c3"), ("fc", "_fc")]
        self._build_heads(stages, 512)

    def _fc(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(x.flatten(1)))  # (N, 512)

    def _consumers(self) -> dict[str, nn.Module]:
        return {"c1": self.c2, "c2": self.c3, "c3": self.fc}


@dataclasses.dataclass
class ImpalaConfig:
    """Options of the IMPALA CNN."""

    #: output channels of each stage; "16,32,32" is accepted from the command line
    depths: tuple[int, ...] = (16, 32, 32)

    def __post_init__(self) -> None:
        depths = self.depths
        if isinstance(depths, str):
            depths = depths.replace("_", ",").split(",")
        try:
            self.depths = tuple(int(d) for d in depths)
        except (TypeError, ValueError):
            self.depths = ()
        if not self.depths or min(self.depths) <= 0:
            raise LoupeError(
                f"policy impala: depths must be positive integers such as 16,32,32, got {depths!r}"
            )


class ResidualBlock(nn.Module):
    """x + conv1(relu(conv0(relu(x)))), 3x3 convolutions keeping the size."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv1(F.relu(self.conv0(F.relu(x))))


class ImpalaStage(nn.Module):
    """conv3x3 -> maxpool 3/2 (output ceil(H/2)) -> two residual blocks."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.res0 = ResidualBlock(out_channels)
        self.res1 = ResidualBlock(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.conv(x), 3, 2, padding=1)  # (N, out, ceil(H/2), ceil(W/2))
        return self.res1(self.res0(x))


class ImpalaCNN(Policy):
    """Espeholt et al. 2018: stages of depth (16, 32, 32), ReLU, fc 256; layers s1, s2, s3, fc.

    A stage's activation is its raw output (the next stage's conv reads it directly); fc reads
    relu(s3), so s3 has no linear consumer.
    """

    name = "impala"

    def __init__(self, obs_shape: Sequence[int], n_actions: int, config: ImpalaConfig) -> None:
        super().__init__(obs_shape, n_actions, config)
        c, h, w = self.obs_shape
        stages = []
        for depth in config.depths:
            stages.append(ImpalaStage(c, depth))
            c, h, w = depth, conv_out(h, 3, 2, 1), conv_out(w, 3, 2, 1)
        self.stages = nn.ModuleList(stages)
        self.fc = nn.Linear(c * h * w, 256)  # 32 * 8 * 8 at 64x64
        names = [(f"s{i + 1}", f"stages.{i}") for i in range(len(stages))]
        self._build_heads([*names, ("fc", "_fc")], 256)

    def _fc(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(F.relu(x).flatten(1)))  # (N, 256)

    def _consumers(self) -> dict[str, nn.Module]:
        # stage i+1's first conv reads s_i as it is; fc reads relu(s3)
        convs = [stage.conv for stage in self.stages if isinstance(stage, ImpalaStage)]
        return {f"s{i + 1}": conv for i, conv in enumerate(convs[1:])}


@dataclasses.dataclass
class InterpretableConfig:
    """The interpretable network has no options."""


def l2_pool(x: torch.Tensor) -> torch.Tensor:
    """sqrt(avgpool(x^2) + 1e-8) over 2x2 windows, stride 2; an odd edge averages what it has.

    (N, C, H, W) -> (N, C, ceil(H/2), ceil(W/2)), like "same" padding in the original network.
    """
    return torch.sqrt(F.avg_pool2d(x * x, 2, 2, ceil_mode=True) + 1e-8)


def _avg_pool_backward(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The input gradient of ``F.avg_pool2d(x, 2, 2, ceil_mode=True)`` for output gradient ``grad``."""
    return torch.ops.aten.avg_pool2d_backward(grad, x, [2, 2], [2, 2], [0, 0], True, True, None)


class _ReluL2Pool(torch.autograd.Function):
    """l2_pool(relu(z)) with a shorter backward; the same forward and the same gradient.

    Autograd's chain would write four full-size tensors (pooling backward, the two products of
    x * x's backward, their sum) and a fifth for the ReLU's mask; here the pooling backward is
    scaled in place by 2x. The ReLU mask is not needed: where relu(z) = 0 the gradient 2x g is 0.
    """

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor) -> torch.Tensor:
        x = F.relu(z)
        y = l2_pool(x)
        ctx.save_for_backward(x, y)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        x, y = ctx.saved_tensors
        g = _avg_pool_backward(grad / (2 * y), x)  # through sqrt (d sqrt(u) = du / 2 sqrt(u))
        return g.mul_(x).mul_(2)  # through x * x: g x + g x, and no ReLU mask (see above)


def relu_l2_pool(z: torch.Tensor) -> torch.Tensor:
    """l2_pool(F.relu(z)): the same values and gradients, computed with less memory traffic
    when a gradient is needed (``_ReluL2Pool``)."""
    if torch.is_grad_enabled() and z.requires_grad:
        return _ReluL2Pool.apply(z)
    return l2_pool(F.relu(z))


class InterpretableCNN(Policy):
    """Hilton et al. 2020, App. C: convolutions with L2 pooling, fc 256, fc 512; analysis layer 2b.

    Layers 1a, 2a, 2b, 3a, 4a, fc1, fc2. Each activation is after its ReLU and, where the network
    pools after that layer, after the pooling, so it is exactly what the next layer reads
    (2b is (N, 32, 16, 16) at 64x64).
    """

    name = "interpretable"

    def __init__(
        self, obs_shape: Sequence[int], n_actions: int, config: InterpretableConfig
    ) -> None:
        super().__init__(obs_shape, n_actions, config)
        c, h, w = self.obs_shape
        for _ in range(4):  # four L2 pools
            h, w = -(-h // 2), -(-w // 2)
        self.conv1a = nn.Conv2d(c, 16, 7, padding=3)
        self.conv2a = nn.Conv2d(16, 32, 5, padding=2)
        self.conv2b = nn.Conv2d(32, 32, 5, padding=2)
        self.conv3a = nn.Conv2d(32, 32, 5, padding=2)
        self.conv4a = nn.Conv2d(32, 32, 5, padding=2)
        self.fc1 = nn.Linear(32 * h * w, 256)  # 32 * 4 * 4 at 64x64
        self.fc2 = nn.Linear(256, 512)
        names = ["1a", "2a", "2b", "3a", "4a", "fc1", "fc2"]
        self._build_heads([(n, f"_{n}") for n in names], 512)

    def _1a(self, x: torch.Tensor) -> torch.Tensor:
        return relu_l2_pool(self.conv1a(x))  # (N, 16, 32, 32) at 64x64

    def _2a(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2a(x))  # (N, 32, 32, 32)

    def _2b(self, x: torch.Tensor) -> torch.Tensor:
        return relu_l2_pool(self.conv2b(x))  # (N, 32, 16, 16)

    def _3a(self, x: torch.Tensor) -> torch.Tensor:
        return relu_l2_pool(self.conv3a(x))  # (N, 32, 8, 8)

    def _4a(self, x: torch.Tensor) -> torch.Tensor:
        return relu_l2_pool(self.conv4a(x))  # (N, 32, 4, 4)

    def _fc1(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc1(x.flatten(1)))  # (N, 256)

    def _fc2(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc2(x))  # (N, 512)

    def _consumers(self) -> dict[str, nn.Module]:
        return {
            "1a": self.conv2a,
            "2a": self.conv2b,
            "2b": self.conv3a,
            "3a": self.conv4a,
            "4a": self.fc1,
            "fc1": self.fc2,
        }
