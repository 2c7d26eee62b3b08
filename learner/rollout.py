"""The trajectory batch that crosses the actor -> learner boundary (numpy only, no pickled objects)."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class Rollout:
    """T steps of N environments collected with one policy version."""

    #: (T, N, C, H, W) uint8 observations, obs[t] is the input of step t
    obs: np.ndarray
    #: (T, N) int64 actions taken
    actions: np.ndarray
    #: (T, N) float32 behaviour log-probabilities of the actions
    logprobs: np.ndarray
    #: (T, N) float32 behaviour value estimates V(obs[t])
    values: np.ndarray
    #: (T, N) float32 training rewards
    rewards: np.ndarray
    #: (T, N) bool: the episode ended with step t (obs[t + 1] starts the next one)
    dones: np.ndarray
    #: (N, C, H, W) uint8 observation after the last step
    last_obs: np.ndarray
    #: (N,) float32 V(last_obs), the bootstrap value
    last_value: np.ndarray
    #: (T, N) int64 procgen level seed of each step (-1 where unknown)
    level_seeds: np.ndarray
    #: version of the weights that sampled this batch
    policy_version: int = 0
    #: actors.EpisodeRecord of every episode that ended inside the batch
    episodes: list = dataclasses.field(default_factory=list)

    @property
    def num_steps(self) -> int:
        return int(self.actions.shape[0])

    @property
    def num_envs(self) -> int:
        return int(self.actions.shape[1])
