"""Data-parallel PPO: one of N learners, each on its share of every batch, gradients averaged.

    learner = DataParallelPPOLearner(policy, cfg, collective, device="cpu")
    stats = learner.update(rollout)   # the whole rollout; this learner trains on its share

With N learners the batch of B samples is cut into N contiguous shares of B/N (learner r holds
samples r*B/N ...). Every learner draws the same minibatch order over its share (the same seeded
generator), so minibatch j is the union of every learner's j-th slice: the minibatch that
``PPOLearner(policy, cfg, shards=N)`` takes on the whole batch. Each learner averages its loss over
its slice; the averaged gradient is then the gradient of the whole minibatch's mean loss, the
advantages are normalised with the whole minibatch's mean and std, and the stats are averaged
over learners, so N learners take exactly (to float rounding) that one learner's steps.

The math is here; how the learners talk (torch.distributed, Ray) is the ``Collective`` passed in
(``loupe.distributed.learners``).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from torch import nn

from learner.config import PPOConfig
from learner.ppo import PPOLearner, explained_variance
from learner.rollout import Rollout
from loupe.errors import LoupeError


class Collective(Protocol):
    """All-reduce among the learners (every learner calls it in the same order)."""

    #: this learner's index, 0 .. world_size - 1
    rank: int
    #: number of learners
    world_size: int

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce ``tensor`` in place over all learners ("sum" or "max") and return it."""
        ...


def check_split(cfg: PPOConfig, learners: int) -> None:
    """Refuse a learner count that does not split every minibatch evenly."""
    if learners < 1:
        raise LoupeError(f"--learners must be at least 1, got {learners}")
    if cfg.minibatch_size % learners:
        raise LoupeError(
            f"a minibatch of {cfg.minibatch_size} samples ({cfg.num_envs} envs x {cfg.num_steps} "
            f"steps / {cfg.num_minibatches} minibatches) does not split evenly over {learners} "
            "learners; choose --learners dividing it, or change --num-envs, --num-steps or "
            "--minibatches"
        )


class DataParallelPPOLearner(PPOLearner):
    """One learner of ``collective.world_size``; ``update`` takes the whole rollout."""

    def __init__(
        self,
        policy: nn.Module,
        cfg: PPOConfig,
        collective: Collective,
        device: str | torch.device = "cpu",
    ):
        check_split(cfg, collective.world_size)
        super().__init__(policy, cfg, device)
        self.collective = collective
        self._whole: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def share(self) -> slice:
        """This learner's samples of the flattened batch."""
        n = self.cfg.batch_size // self.collective.world_size
        return slice(self.collective.rank * n, (self.collective.rank + 1) * n)

    def update(self, rollout: Rollout) -> dict[str, float]:
        result = super().update(rollout)
        # explained variance of the whole batch: every learner computed the whole batch's returns
        values, returns = self._whole
        result["explained_variance"] = explained_variance(values, returns)
        if "behaviour_weight_max" in result:
            t = torch.tensor([result["behaviour_weight_max"]], device=self.device)
            result["behaviour_weight_max"] = float(self.collective.all_reduce(t, "max"))
            t = torch.tensor([result["behaviour_kl"]], device=self.device)
            result["behaviour_kl"] = float(self.collective.all_reduce(t)) / self._world
        return result

    @property
    def _world(self) -> int:
        return self.collective.world_size

    def _flatten(self, rollout: Rollout) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """GAE (and the reward normaliser) on the whole rollout, then this learner's share only."""
        b, share = rollout.actions.size, self.share
        obs_all = rollout.obs.reshape(b, *rollout.obs.shape[2:])
        # only the share is copied (the rollout may be a read-only view of shared memory)
        obs = torch.from_numpy(np.array(obs_all[share])).to(self.device)
        flat = self._targets(rollout)
        self._whole = (flat["values"].cpu().numpy(), flat["returns"].cpu().numpy())
        return obs, {k: v[share] for k, v in flat.items()}

    def _advantage_moments(self, adv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = adv.numel() * self._world
        mean = self.collective.all_reduce(adv.sum().reshape(1)) / n
        sq = self.collective.all_reduce(((adv - mean) ** 2).sum().reshape(1))
        return mean[0], (sq[0] / (n - 1)).sqrt()  # unbiased, as torch.std

    def _reduce_gradients(self) -> None:
        grads = [p.grad for p in self.policy.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.collective.all_reduce(flat).div_(self._world)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def _reduce_stats(self, sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        keys = sorted(sums)
        if not keys:
            return sums
        stacked = torch.stack([sums[k].float().reshape(()) for k in keys])
        stacked = self.collective.all_reduce(stacked) / self._world
        return dict(zip(keys, stacked))
