"""GAE anomaly scan: bookmark the timesteps whose advantage is unusually high or low.

An unusually high advantage marks a pleasant surprise for the value function, an unusually low one
a disappointment or a miscalibrated value (the agent "hallucinating" a reward). Advantages use
gamma .999 and lambda .95 by default over recorded trajectories (T, N):

    marks, advantages = gae_scan(rollout.rewards, rollout.values, rollout.dones,
                                 rollout.last_value, k=16)
    high = [m for m in marks if m.kind == "high"]   # strongest first

Bookmarks are the top k and the bottom k timesteps by advantage, at most one per episode in each
list, so one long surprising episode cannot fill it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from learner.gae import compute_gae
from loupe.errors import LoupeError


@dataclasses.dataclass
class GAEScanConfig:
    """Settings of the anomaly scan."""

    gamma: float = 0.999
    """discount of the advantage estimate"""
    lam: float = 0.95
    """GAE lambda"""
    k: int = 16
    """bookmarks per list (high and low)"""

    def __post_init__(self) -> None:
        if not (0.0 <= self.gamma <= 1.0 and 0.0 <= self.lam <= 1.0):
            raise LoupeError(f"gamma and lam must be in [0, 1], got {self.gamma} and {self.lam}")
        if self.k < 1:
            raise LoupeError(f"k (bookmarks per list) must be at least 1, got {self.k}")


@dataclasses.dataclass
class Bookmark:
    """One timestep worth a look."""

    kind: str
    """"high" (advantage among the top k) or "low" (among the bottom k)"""
    env: int
    """environment index in the batch"""
    t: int
    """timestep in the recording"""
    advantage: float
    """GAE advantage at (t, env)"""
    value: float
    """the value estimate V(s_t)"""
    reward: float
    """the reward of step t"""
    episode: int
    """episode index within env ``env``, 0 for the first recorded (possibly partial) episode"""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def episode_ids(dones: np.ndarray) -> np.ndarray:
    """(T, N) done flags -> (T, N) episode index per env; a step belongs to the episode it ends."""
    ends = np.asarray(dones).astype(np.int64)
    return np.cumsum(ends, axis=0) - ends


def _check(rewards, values, dones, last_value) -> tuple[np.ndarray, ...]:
    rewards = np.asarray(rewards, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    dones = np.asarray(dones, dtype=bool)
    last_value = np.asarray(last_value, dtype=np.float64)
    if rewards.ndim != 2 or values.shape != rewards.shape or dones.shape != rewards.shape:
        raise LoupeError(
            f"rewards, values and dones must all be (T, N); got {rewards.shape}, "
            f"{values.shape} and {dones.shape}"
        )
    if last_value.shape != rewards.shape[1:]:
        raise LoupeError(f"last_value must be (N,) = {rewards.shape[1:]}, got {last_value.shape}")
    if not (np.isfinite(rewards).all() and np.isfinite(values).all()):
        raise LoupeError("rewards or values contain NaN or infinite entries; check the recording")
    return rewards, values, dones, last_value


def select_bookmarks(score: np.ndarray, episodes: np.ndarray, k: int) -> list[tuple[int, int]]:
    """The (t, env) of the k largest ``score`` (T, N) entries, at most one per (env, episode)."""
    order = np.argsort(-score, axis=None, kind="stable")  # flat (t, env) indices, largest first
    used: set[tuple[int, int]] = set()
    picked: list[tuple[int, int]] = []
    for flat in order:
        t, env = divmod(int(flat), score.shape[1])
        key = (env, int(episodes[t, env]))
        if key in used:
            continue
        used.add(key)
        picked.append((t, env))
        if len(picked) == k:
            break
    return picked


def gae_scan(
    rewards: Any,
    values: Any,
    dones: Any,
    last_value: Any,
    gamma: float = 0.999,
    lam: float = 0.95,
    k: int = 16,
) -> tuple[list[Bookmark], np.ndarray]:
    """Scan (T, N) trajectories -> (bookmarks, advantages (T, N) float32).

    ``dones[t]`` means the episode ended with step t; ``last_value`` (N,) bootstraps the end of the
    recording. Bookmarks list the "high" ones (largest advantage first), then the "low" ones
    (smallest first); within each list no two come from the same episode.
    """
    config = GAEScanConfig(gamma=gamma, lam=lam, k=k)
    rewards, values, dones, last_value = _check(rewards, values, dones, last_value)
    advantages, _ = compute_gae(rewards, values, dones, last_value, config.gamma, config.lam)
    episodes = episode_ids(dones)
    marks: list[Bookmark] = []
    for kind, sign in (("high", 1.0), ("low", -1.0)):
        for t, env in select_bookmarks(sign * advantages, episodes, config.k):
            marks.append(
                Bookmark(
                    kind=kind,
                    env=env,
                    t=t,
                    advantage=float(advantages[t, env]),
                    value=float(values[t, env]),
                    reward=float(rewards[t, env]),
                    episode=int(episodes[t, env]),
                )
            )
    return marks, advantages


def scan_rollout(rollout: Any, config: GAEScanConfig | None = None) -> list[Bookmark]:
    """Bookmarks of a recorded ``learner.Rollout`` (its rewards, values, dones and last_value)."""
    config = config or GAEScanConfig()
    marks, _ = gae_scan(
        rollout.rewards,
        rollout.values,
        rollout.dones,
        rollout.last_value,
        config.gamma,
        config.lam,
        config.k,
    )
    return marks
