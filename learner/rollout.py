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
        """T, the steps per environment in this rollout."""
        return int(self.actions.shape[0])

    @property
    def num_envs(self) -> int:
        """N, the environments in this rollout."""
        return int(self.actions.shape[1])


class RolloutBuilder:
    """Fills the (T, N) arrays of a Rollout one step at a time (used by every sampler)."""

    def __init__(self, num_steps: int, num_envs: int, obs_shape: tuple[int, ...]):
        t, n = num_steps, num_envs
        self.obs = np.empty((t, n, *obs_shape), dtype=np.uint8)
        self.actions = np.empty((t, n), dtype=np.int64)
        self.logprobs = np.empty((t, n), dtype=np.float32)
        self.values = np.empty((t, n), dtype=np.float32)
        self.rewards = np.empty((t, n), dtype=np.float32)
        self.dones = np.empty((t, n), dtype=bool)
        self.level_seeds = np.full((t, n), -1, dtype=np.int64)
        self.episodes: list = []

    def observe(self, t: int, obs, level_seeds=None) -> None:
        """Copy step t's input frames; call before stepping (envs may reuse their frame buffers)."""
        self.obs[t] = obs
        if level_seeds is not None:
            self.level_seeds[t] = level_seeds

    def record(self, t: int, actions, logprobs, values, rewards, dones, episodes) -> None:
        """Step t's action and what the environment returned for it."""
        self.actions[t], self.logprobs[t], self.values[t] = actions, logprobs, values
        self.rewards[t], self.dones[t] = rewards, dones
        self.episodes.extend(episodes)

    def build(self, last_obs: np.ndarray, last_value: np.ndarray, policy_version: int) -> Rollout:
        return Rollout(
            obs=self.obs,
            actions=self.actions,
            logprobs=self.logprobs,
            values=self.values,
            rewards=self.rewards,
            dones=self.dones,
            last_obs=last_obs.copy(),
            last_value=np.asarray(last_value, dtype=np.float32),
            level_seeds=self.level_seeds,
            policy_version=policy_version,
            episodes=self.episodes,
        )
