"""GAE anomaly scan: planted surprises are bookmarked, one bookmark per episode, against a plain
reference loop."""

from __future__ import annotations

import numpy as np
import pytest

from learner import Rollout
from loupe.errors import LoupeError
from probes.gae_scan import GAEScanConfig, episode_ids, gae_scan, scan_rollout


def reference_advantages(rewards, values, dones, last_value, gamma, lam):
    """Per env, per step: A_t = sum_l (gamma lam)^l delta_{t+l}, stopping after the episode's end."""
    steps, n = rewards.shape
    adv = np.zeros((steps, n))
    for env in range(n):
        for t in range(steps):
            total, factor = 0.0, 1.0
            for u in range(t, steps):
                nxt = last_value[env] if u + 1 == steps else values[u + 1, env]
                delta = rewards[u, env] + gamma * nxt * (1 - dones[u, env]) - values[u, env]
                total += factor * delta
                if dones[u, env]:
                    break
                factor *= gamma * lam
            adv[t, env] = total
    return adv


def reference_bookmarks(adv, dones, k, sign):
    """Each episode's best step, then the k best episodes (a plain two-stage loop)."""
    steps, n = adv.shape
    best = {}
    for env in range(n):
        episode = 0
        for t in range(steps):
            score = sign * adv[t, env]
            key = (env, episode)
            if key not in best or score > best[key][0]:
                best[key] = (score, t, env)
            episode += int(dones[t, env])
    ranked = sorted(best.values(), key=lambda s: -s[0])
    return [(t, env) for _, t, env in ranked[:k]]


@pytest.mark.unit
def test_planted_reward_spike_is_the_top_bookmark():
    steps, n = 60, 3
    rewards = np.zeros((steps, n), np.float32)
    values = np.zeros((steps, n), np.float32)
    dones = np.zeros((steps, n), bool)
    dones[29, :] = True  # two episodes per env
    dones[44, 0] = True  # a third in env 0
    rewards[17, 1] = 10.0  # the surprise
    rewards[5, 1] = 2.0  # a smaller surprise in the same episode: no second bookmark there
    values[40, 2] = 5.0  # a value the future does not pay: the bottom bookmark
    marks, adv = gae_scan(rewards, values, dones, np.zeros(n, np.float32), k=4)
    high = [m for m in marks if m.kind == "high"]
    low = [m for m in marks if m.kind == "low"]
    assert (high[0].env, high[0].t, high[0].episode, high[0].reward) == (1, 17, 0, 10.0)
    assert high[0].advantage == pytest.approx(10.0 - 0.0) and adv[17, 1] == high[0].advantage
    assert (low[0].env, low[0].t, low[0].value) == (2, 40, 5.0)
    assert low[0].advantage == pytest.approx(-5.0)
    for group in (high, low):
        keys = [(m.env, m.episode) for m in group]
        assert len(keys) == len(set(keys)) == 4  # never two bookmarks from one episode
    assert [m.t for m in high if m.env == 1] == [17]
    assert adv[5, 1] > sorted(m.advantage for m in high)[0]  # it would have made the list


@pytest.mark.unit
def test_scan_matches_plain_loops_on_random_trajectories():
    rng = np.random.default_rng(0)
    steps, n, k = 40, 4, 5
    rewards = rng.normal(size=(steps, n)).astype(np.float32)
    values = rng.normal(size=(steps, n)).astype(np.float32)
    dones = rng.random((steps, n)) < 0.1
    last_value = rng.normal(size=n).astype(np.float32)
    marks, adv = gae_scan(rewards, values, dones, last_value, gamma=0.99, lam=0.9, k=k)
    ref = reference_advantages(rewards, values, dones, last_value, 0.99, 0.9)
    np.testing.assert_allclose(adv, ref, rtol=1e-5, atol=1e-5)
    for kind, sign in (("high", 1), ("low", -1)):
        got = [(m.t, m.env) for m in marks if m.kind == kind]
        assert got == reference_bookmarks(adv, dones, k, sign)
    for m in marks:
        assert m.value == pytest.approx(values[m.t, m.env])
        assert m.reward == pytest.approx(rewards[m.t, m.env])


@pytest.mark.unit
def test_episode_ids_count_ends_per_env():
    dones = np.array([[0, 1], [1, 0], [0, 0], [0, 1], [1, 0], [0, 0]], bool)
    assert episode_ids(dones).tolist() == [[0, 0], [0, 1], [1, 1], [1, 1], [1, 2], [2, 2]]


@pytest.mark.unit
def test_scan_of_a_rollout_and_bad_input():
    steps, n = 8, 2
    rollout = Rollout(
        obs=np.zeros((steps, n, 3, 4, 4), np.uint8),
        actions=np.zeros((steps, n), np.int64),
        logprobs=np.zeros((steps, n), np.float32),
        values=np.zeros((steps, n), np.float32),
        rewards=np.eye(steps, n, k=-3, dtype=np.float32),  # reward at t=3 (env 0) and t=4 (env 1)
        dones=np.zeros((steps, n), bool),
        last_obs=np.zeros((n, 3, 4, 4), np.uint8),
        last_value=np.zeros(n, np.float32),
        level_seeds=np.full((steps, n), -1, np.int64),
        policy_version=0,
        episodes=[],
    )
    marks = scan_rollout(rollout, GAEScanConfig(k=2))
    high = [(m.t, m.env) for m in marks if m.kind == "high"]
    assert high == [(3, 0), (4, 1)]  # one per episode: the rewarded steps themselves
    with pytest.raises(LoupeError, match=r"must all be \(T, N\)"):
        gae_scan(np.zeros((4, 2)), np.zeros((4, 3)), np.zeros((4, 2)), np.zeros(2))
    with pytest.raises(LoupeError, match="last_value"):
        gae_scan(np.zeros((4, 2)), np.zeros((4, 2)), np.zeros((4, 2)), np.zeros(3))
    with pytest.raises(LoupeError, match="at least 1"):
        gae_scan(np.zeros((4, 2)), np.zeros((4, 2)), np.zeros((4, 2)), np.zeros(2), k=0)
    with pytest.raises(LoupeError, match="NaN"):
        gae_scan(np.full((4, 2), np.nan), np.zeros((4, 2)), np.zeros((4, 2)), np.zeros(2))
