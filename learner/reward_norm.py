"""Reward scaling by the running std of the discounted return (the usual reward-normalising wrapper).

Per env a discounted return ``ret = gamma * ret + r`` is kept (reset after an episode end); the
variance of all returns seen so far is tracked with Chan et al.'s parallel update, starting from a
pseudo-sample of weight 1e-4, mean 0 and variance 1; each reward is divided by sqrt(var + eps) and
clipped. Rewards are not shifted by a mean.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from loupe.errors import LoupeError


class RewardNormalizer:
    """Scales (T, N) reward batches in time order; the state carries over between batches."""

    def __init__(self, num_envs: int, gamma: float, clip: float = 10.0, epsilon: float = 1e-8):
        self.gamma, self.clip, self.epsilon = gamma, clip, epsilon
        self.ret = np.zeros(num_envs, dtype=np.float64)  # (N,) running discounted return
        self.mean, self.var, self.count = 0.0, 1.0, 1e-4

    def _update(self, x: np.ndarray) -> None:
        b_mean, b_var, b_count = float(x.mean()), float(x.var()), x.size
        delta, total = b_mean - self.mean, self.count + b_count
        m2 = self.var * self.count + b_var * b_count + delta**2 * self.count * b_count / total
        self.mean, self.var, self.count = self.mean + delta * b_count / total, m2 / total, total

    def __call__(self, rewards: np.ndarray, dones: np.ndarray) -> np.ndarray:
        """(T, N) rewards and dones in time order -> (T, N) float32 scaled rewards."""
        if rewards.shape[1:] != self.ret.shape:
            raise ValueError(f"rewards of {rewards.shape[1:]} envs, normaliser of {self.ret.shape}")
        out = np.empty(rewards.shape, dtype=np.float32)
        for t in range(rewards.shape[0]):
            self.ret = self.ret * self.gamma + rewards[t]
            self._update(self.ret)
            scaled = rewards[t] / np.sqrt(self.var + self.epsilon)
            out[t] = np.clip(scaled, -self.clip, self.clip) if self.clip > 0 else scaled
            self.ret[np.asarray(dones[t], dtype=bool)] = 0.0
        return out

    def state(self) -> dict[str, Any]:
        """JSON-ready state."""
        return {"ret": self.ret.tolist(), "mean": self.mean, "var": self.var, "count": self.count}

    def load(self, state: dict[str, Any]) -> None:
        """Restore the state written by ``state()``; LoupeError if it is for another env count."""
        ret = np.asarray(state["ret"], dtype=np.float64)
        if ret.shape != self.ret.shape:
            raise LoupeError(
                f"the saved reward normaliser tracks {ret.size} envs, this run {self.ret.size}; "
                "resume with the run's own num_envs"
            )
        self.ret = ret
        self.mean, self.var = float(state["mean"]), float(state["var"])
        self.count = float(state["count"])
