"""GAE against an explicit per-episode-segment sum and closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from learner import compute_gae


def gae_reference(rewards, values, dones, last_value, gamma, lam):
    """Per env and step: A_t = sum_k (gamma lam)^k delta_{t+k}, summed until the episode ends."""
    T, N = rewards.shape
    adv = np.zeros((T, N))
    for n in range(N):
        for t in range(T):
            total, discount = 0.0, 1.0
            for u in range(t, T):
                ended = bool(dones[u, n])
                if ended:
                    next_v = 0.0
                elif u == T - 1:
                    next_v = float(last_value[n])
                else:
                    next_v = float(values[u + 1, n])
                delta = float(rewards[u, n]) + gamma * next_v - float(values[u, n])
                total += discount * delta
                if ended:
                    break
                discount *= gamma * lam
            adv[t, n] = total
    return adv, adv + values


def random_batch(seed, T=13, N=4, p_done=0.25):
    rng = np.random.default_rng(seed)
    rewards = rng.normal(size=(T, N)).astype(np.float32)
    values = rng.normal(size=(T, N)).astype(np.float32)
    dones = rng.random((T, N)) < p_done
    dones[-1, 0] = True  # one env ends exactly at the batch end: its last_value is not used
    dones[:, 1] = False  # one env never ends: bootstrapped from last_value
    last = rng.normal(size=N).astype(np.float32)
    return rewards, values, dones, last


@pytest.mark.unit
@pytest.mark.parametrize("gamma,lam", [(0.99, 0.95), (0.999, 0.95), (0.9, 0.0), (0.8, 1.0)])
def test_gae_matches_the_segment_sum_reference(gamma, lam):
    rewards, values, dones, last = random_batch(0)
    adv, ret = compute_gae(rewards, values, dones, last, gamma, lam)
    ref_adv, ref_ret = gae_reference(rewards, values, dones, last, gamma, lam)
    assert adv.dtype == np.float32 and adv.shape == rewards.shape
    np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, ref_ret, rtol=1e-5, atol=1e-5)


@pytest.mark.unit
def test_no_bootstrap_across_an_episode_end():
    rewards, values, dones, last = random_batch(1)
    adv, _ = compute_gae(rewards, values, dones, last, 0.99, 0.95)
    other = last.copy()
    other[0] += 100.0  # env 0 ended at the last step: its bootstrap value must not matter
    other[1] += 100.0  # env 1 never ended: every step of it must change
    adv2, _ = compute_gae(rewards, values, dones, other, 0.99, 0.95)
    np.testing.assert_array_equal(adv2[:, 0], adv[:, 0])
    assert np.all(np.abs(adv2[:, 1] - adv[:, 1]) > 1e-3)


@pytest.mark.unit
def test_constant_reward_closed_form():
    # r = 1, V = 0, no episode end, bootstrap c: with x = gamma lam,
    # A_t = sum_{k < T-t} x^k + x^(T-t-1) gamma c = (1 - x^(T-t)) / (1 - x) + x^(T-t-1) gamma c
    T, g, lam, c = 10, 0.9, 0.8, 2.5
    rewards, values = np.ones((T, 1)), np.zeros((T, 1))
    adv, ret = compute_gae(rewards, values, np.zeros((T, 1), bool), np.array([c]), g, lam)
    x = g * lam
    expected = [(1 - x ** (T - t)) / (1 - x) + x ** (T - t - 1) * g * c for t in range(T)]
    np.testing.assert_allclose(adv[:, 0], expected, rtol=1e-6)
    np.testing.assert_allclose(ret[:, 0], expected, rtol=1e-6)  # V = 0


@pytest.mark.unit
def test_lambda_one_is_the_bootstrapped_discounted_return():
    rng = np.random.default_rng(2)
    T, g = 9, 0.97
    r, v, last = rng.normal(size=(T, 1)), rng.normal(size=(T, 1)), rng.normal(size=1)
    _, ret = compute_gae(r, v, np.zeros((T, 1), bool), last, g, 1.0)
    expected = [
        sum(g**k * r[t + k, 0] for k in range(T - t)) + g ** (T - t) * last[0] for t in range(T)
    ]
    np.testing.assert_allclose(ret[:, 0], expected, rtol=1e-5)


@pytest.mark.unit
def test_torch_input_gives_torch_output():
    rewards, values, dones, last = random_batch(3)
    adv_np, ret_np = compute_gae(rewards, values, dones, last, 0.99, 0.95)
    adv, ret = compute_gae(
        torch.from_numpy(rewards),
        torch.from_numpy(values),
        torch.from_numpy(dones),
        torch.from_numpy(last),
        0.99,
        0.95,
    )
    assert isinstance(adv, torch.Tensor) and adv.dtype == torch.float32
    np.testing.assert_array_equal(adv.numpy(), adv_np)
    np.testing.assert_array_equal(ret.numpy(), ret_np)


@pytest.mark.unit
def test_mismatched_shapes_are_refused():
    rewards, values, dones, last = random_batch(4)
    with pytest.raises(ValueError, match=r"\(N,\) last_value"):
        compute_gae(rewards, values, dones, last[:2], 0.99, 0.95)
    with pytest.raises(ValueError):
        compute_gae(rewards, values[:-1], dones, last, 0.99, 0.95)
