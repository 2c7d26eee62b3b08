"""The trajectory batch that crosses the actor -> learner boundary (numpy only, no pickled objects)."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class Rollout:
    """T steps of N environments collected with one policy version."""

    obs: np.ndarray  # (T, N, C, H, W) uint8
    actions: np.ndarray  # (T, N) int64
    logprobs: np.ndarray  # (T, N) float32, behaviour log-probabilities
    values: np.ndarray  # (T, N) float32, behaviour value estimates
    rewards: np.ndarray  # (T, N) float32
    dones: np.ndarray  # (T, N) bool: the episode ended with step t
    last_obs: np.ndarray  # (N, C, H, W) uint8, the observation after the last step
    last_value: np.ndarray  # (N,) float32, V(last_obs)
    level_seeds: np.ndarray  # (T, N) int64, procgen level seed (-1 where unknown)
    policy_version: int = 0
    episodes: list = dataclasses.field(default_factory=list)

    @property
    def num_steps(self) -> int:
        return int(self.actions.shape[0])

    @property
    def num_envs(self) -> int:
        return int(self.actions.shape[1])
