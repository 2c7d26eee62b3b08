"""Generalised advantage estimation."""

from __future__ import annotations

import numpy as np


def compute_gae(
    rewards: np.ndarray,
    values: np.ndarray,
    dones: np.ndarray,
    last_value: np.ndarray,
    gamma: float,
    lam: float,
) -> tuple[np.ndarray, np.ndarray]:
    """(T, N) arrays -> (advantages, returns), both (T, N) float32.

    ``dones[t]`` means the episode ended with step t, so V(s_{t+1}) is not bootstrapped across it:
        delta_t = r_t + gamma * V_{t+1} * (1 - done_t) - V_t,   V_T = last_value
        A_t     = delta_t + gamma * lam * (1 - done_t) * A_{t+1}
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    notdone = 1.0 - np.asarray(dones, dtype=np.float64)
    steps = rewards.shape[0]
    advantages = np.zeros_like(rewards)
    next_value = np.asarray(last_value, dtype=np.float64)
    next_adv = np.zeros_like(next_value)
    for t in range(steps - 1, -1, -1):
        delta = rewards[t] + gamma * next_value * notdone[t] - values[t]
        next_adv = delta + gamma * lam * notdone[t] * next_adv
        advantages[t] = next_adv
        next_value = values[t]
    returns = advantages + values
    return advantages.astype(np.float32), returns.astype(np.float32)
