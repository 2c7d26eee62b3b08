"""Generalised advantage estimation (Schulman et al. 2016)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def compute_gae(
    rewards: Any,
    values: Any,
    dones: Any,
    last_value: Any,
    gamma: float,
    lam: float,
) -> tuple[Any, Any]:
    """(T, N) rewards, values, dones and (N,) last_value -> (advantages, returns), both (T, N).

    ``dones[t]`` means the episode ended with step t, so V(s_{t+1}) is not bootstrapped across it:
        delta_t = r_t + gamma * V_{t+1} * (1 - done_t) - V_t,   V_T = last_value
        A_t     = delta_t + gamma * lam * (1 - done_t) * A_{t+1}
        returns = A + V
    Computed in float64; returned as float32 numpy arrays, or as float32 tensors on the rewards'
    device when ``rewards`` is a tensor.
    """
    as_torch = isinstance(rewards, torch.Tensor)
    device = rewards.device if as_torch else None
    r, v, d, last = (_float64(x) for x in (rewards, values, dones, last_value))
    if r.ndim != 2 or v.shape != r.shape or d.shape != r.shape or last.shape != r.shape[1:]:
        raise ValueError(
            f"compute_gae wants (T, N) rewards/values/dones and (N,) last_value, got "
            f"{r.shape}, {v.shape}, {d.shape}, {last.shape}"
        )
    notdone = 1.0 - d  # (T, N)
    advantages = np.zeros_like(r)  # (T, N)
    next_value, next_adv = last, np.zeros_like(last)  # (N,), (N,)
    for t in range(r.shape[0] - 1, -1, -1):
        delta = r[t] + gamma * next_value * notdone[t] - v[t]
        next_adv = delta + gamma * lam * notdone[t] * next_adv
        advantages[t] = next_adv
        next_value = v[t]
    returns = advantages + v
    if as_torch:
        return (
            torch.from_numpy(advantages).float().to(device),
            torch.from_numpy(returns).float().to(device),
        )
    return advantages.astype(np.float32), returns.astype(np.float32)


def _float64(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)
