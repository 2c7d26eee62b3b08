"""The trajectory batch that crosses the actor -> learner boundary (numpy only, no pickled objects)."""

from __future__ import annotations

import dataclasses
import mmap
import os
import sys
import uuid
import weakref

import numpy as np

from loupe.shm import BUFFER_PREFIX, SHM_DIR, remove_stale_buffers, unlink_quietly


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

    def __init__(
        self,
        num_steps: int,
        num_envs: int,
        obs_shape: tuple[int, ...],
        obs: np.ndarray | None = None,
    ):
        """``obs``: a (T, N, *obs_shape) uint8 array to write the frames into (e.g. a slice of a
        shared-memory buffer the learner reads in place); None allocates one."""
        t, n = num_steps, num_envs
        if obs is None:
            obs = np.empty((t, n, *obs_shape), dtype=np.uint8)
        elif obs.shape != (t, n, *obs_shape) or obs.dtype != np.uint8:
            raise ValueError(f"obs buffer {obs.shape} {obs.dtype}, want {(t, n, *obs_shape)} uint8")
        self.obs = obs
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


def map_shared(path: str, shape: tuple[int, ...]) -> np.ndarray:
    """The writable ``shape`` uint8 array over the shared-memory file ``path`` (FileNotFoundError
    where there is none, ValueError where its size differs)."""
    size = int(np.prod(shape))
    with open(path, "r+b") as f:
        if os.fstat(f.fileno()).st_size != size:
            raise ValueError(f"{path} holds {os.fstat(f.fileno()).st_size} bytes, not {size}")
        buf = mmap.mmap(f.fileno(), size)
    # the array itself, not a reshape of one, so that every view's .base is this array
    return np.ndarray(shape, dtype=np.uint8, buffer=buf)


class SharedObs:
    """(T, N, C, H, W) uint8 observation buffers in shared memory (files in /dev/shm) that
    rollout actors on this machine write their frames into and the learner reads in place: no
    copy into the object store, none out of it, no concatenation of the actors' parts.

    ``acquire()`` reserves a buffer for one batch until ``release``; after that, a buffer is free
    again once nothing outside the pool references it (a Rollout still held keeps its buffer).
    A new one is added while all are in use, up to ``max_buffers`` (then None: that batch goes
    the ordinary way). The files stay while the pool lives, so that an actor Ray restarts maps
    them as the one it replaces did (a restarted actor sending its frames through the object
    store instead would cost a copy per batch, and the learner's memory a step at every actor
    death); they go at ``close`` or exit, and those of a learner that was SIGKILLed go with the
    next pool made in the same directory or the supervisor's clean-up
    (``remove_stale_buffers``).
    """

    def __init__(self, shape: tuple[int, ...], directory: str = SHM_DIR, max_buffers: int = 4):
        self.shape = tuple(int(d) for d in shape)
        self.directory = directory
        self.max_buffers = max_buffers
        remove_stale_buffers(directory)
        self.prefix = os.path.join(
            directory, f"{BUFFER_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"
        )
        self.paths: list[str] = []
        self.arrays: list[np.ndarray] = []
        #: buffers handed out by ``acquire`` and not yet ``release``d (being filled)
        self.reserved: set[int] = set()
        self._finalizer = weakref.finalize(self, _unlink_all, self.paths)

    @staticmethod
    def available(directory: str = SHM_DIR) -> bool:
        """Whether ``directory`` is a writable memory-backed directory here."""
        return os.path.isdir(directory) and os.access(directory, os.W_OK)

    def acquire(self) -> int | None:
        """Index of a buffer free for the next batch, or None when ``max_buffers`` are held."""
        for i in range(len(self.arrays)):
            # references: the pool's list and getrefcount's argument; any more is a user
            if i not in self.reserved and sys.getrefcount(self.arrays[i]) <= 2:
                self.reserved.add(i)
                return i
        if len(self.arrays) >= self.max_buffers:
            return None
        path = f"{self.prefix}-{len(self.paths)}"
        with open(path, "w+b") as f:
            f.truncate(int(np.prod(self.shape)))
        self.paths.append(path)
        self.arrays.append(map_shared(path, self.shape))
        self.reserved.add(len(self.arrays) - 1)
        return len(self.arrays) - 1

    def release(self, i: int) -> None:
        """Buffer ``i`` is filled and handed to its user: from now on, references keep it."""
        self.reserved.discard(i)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)

    def close(self) -> None:
        _unlink_all(self.paths)
        self.arrays = []


def _unlink_all(paths: list[str]) -> None:
    for path in paths:
        unlink_quietly(path)
