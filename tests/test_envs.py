"""Vector environments on real ale-py and procgen."""

from __future__ import annotations

import numpy as np
import pytest

from actors import EnvConfig, list_env_families, list_games, make_vec_env
from actors.envs import ARTICLE_ACTIONS, PROCGEN_TIMEOUT
from loupe.errors import LoupeError


def run_random(env, steps, seed=0, actions=None):
    rng = np.random.default_rng(seed)
    episodes, dones = [], 0
    for _ in range(steps):
        a = rng.integers(0, env.n_actions, env.num_envs) if actions is None else actions()
        obs, reward, done, eps = env.step(a)
        episodes += eps
        dones += int(done.sum())
    return obs, episodes, dones


@pytest.mark.integration
def test_procgen_shapes_and_outcomes():
    env = make_vec_env(EnvConfig("procgen:coinrun", num_envs=4, seed=0, distribution_mode="easy"))
    obs = env.reset()
    assert obs.shape == (4, 3, 64, 64) and obs.dtype == np.uint8 and env.n_actions == 15
    # a right-leaning random agent finishes and dies in a few hundred steps
    rng = np.random.default_rng(0)
    obs, episodes, dones = run_random(
        env, 1200, actions=lambda: np.where(rng.random(4) < 0.5, 8, rng.integers(0, 15, 4))
    )
    assert obs.shape == (4, 3, 64, 64)
    assert len(episodes) == dones > 0
    outcomes = {e.outcome for e in episodes}
    assert outcomes <= {"complete", "failure", "timeout"} and "complete" in outcomes
    for e in episodes:
        assert e.level_seed is not None and 0 <= e.env_index < 4
        if e.outcome == "complete":
            assert e.ret == 10.0 and e.length < PROCGEN_TIMEOUT
        if e.outcome == "failure":
            assert e.ret == 0.0 and e.length < PROCGEN_TIMEOUT
        if e.outcome == "timeout":
            assert e.length == PROCGEN_TIMEOUT


@pytest.mark.integration
def test_procgen_level_options_reach_the_env():
    env = make_vec_env(
        EnvConfig(
            "procgen:coinrun", num_envs=2, num_levels=1, start_level=42, distribution_mode="easy"
        )  # fmt: skip
    )
    env.reset()
    _, episodes, _ = run_random(env, 600)
    assert episodes and {e.level_seed for e in episodes} == {42}
    assert set(env.level_seeds()) == {42}
    many = make_vec_env(EnvConfig("procgen:coinrun", num_envs=8, num_levels=0, seed=3))
    assert len(set(many.level_seeds())) > 1


@pytest.mark.integration
def test_procgen_done_comes_with_the_next_levels_first_frame():
    env = make_vec_env(EnvConfig("procgen:coinrun", num_envs=1, num_levels=1, start_level=5,
                                 distribution_mode="easy"))  # fmt: skip
    first = env.reset()
    rng = np.random.default_rng(1)
    for _ in range(PROCGEN_TIMEOUT + 5):
        obs, _, done, eps = env.step(rng.integers(0, 15, 1))
        if done[0]:
            assert len(eps) == 1
            # the same single level restarts: the frame equals the very first one
            assert np.array_equal(obs, first)
            return
    pytest.fail("no episode ended")


@pytest.mark.integration
def test_article_action_set_has_nine_actions():
    env = make_vec_env(EnvConfig("procgen:coinrun", num_envs=2, action_set="article"))
    assert env.n_actions == 9 == len(ARTICLE_ACTIONS)
    env.step(np.array([0, 8]))
    with pytest.raises(LoupeError, match="coinrun only"):
        EnvConfig("procgen:starpilot", action_set="article")


@pytest.mark.integration
def test_atari_shapes_autoreset_and_raw_returns():
    env = make_vec_env(EnvConfig("ALE/Breakout-v5", num_envs=2, seed=0, sticky_actions=0.0))
    obs = env.reset()
    assert obs.shape == (2, 4, 84, 84) and obs.dtype == np.uint8 and env.n_actions == 4
    rng = np.random.default_rng(0)
    total_clipped = np.zeros(2)
    episodes = []
    for _ in range(3000):
        obs, reward, done, eps = env.step(rng.integers(0, 4, 2))
        assert set(np.unique(reward)) <= {0.0, 1.0}  # clipped training reward
        total_clipped += reward
        for e in eps:
            assert done[e.env_index]
            # SAME_STEP auto-reset: the newest frames of a fresh game differ from a played one
            assert obs[e.env_index].shape == (4, 84, 84)
        episodes += eps
        if len(episodes) >= 2:
            break
    assert episodes and all(e.outcome is None and e.level_seed is None for e in episodes)
    assert all(e.ret >= 0 and e.length > 0 for e in episodes)


@pytest.mark.integration
def test_atari_episodic_life_ends_learning_episodes_but_not_games():
    env = make_vec_env(EnvConfig("ALE/Breakout-v5", num_envs=1, seed=0, episodic_life=True))
    env.reset()
    _, episodes, dones = run_random(env, 1500)
    assert episodes, "no game ended"
    # Breakout has 5 lives: about 5 learning episodes per game
    assert dones >= 4 * len(episodes)


@pytest.mark.integration
def test_reward_clipping_keeps_raw_returns():
    raw = make_vec_env(EnvConfig("ALE/Pong-v5", num_envs=1, seed=0, clip_rewards=False))
    raw.reset()
    rewards = []
    for _ in range(300):
        _, r, _, _ = raw.step(np.array([0]))
        rewards.append(r[0])
    assert -1.0 in rewards  # Pong scores -1 when the opponent scores


@pytest.mark.unit
@pytest.mark.parametrize(
    "env_id, match",
    [
        ("procgen:nosuch", "unknown procgen game 'nosuch'"),
        ("ALE/NoSuchGame-v5", "unknown Atari game"),
        ("CartPole-v1", "families: ALE/<Game>-v5"),
        ("", "unknown environment id"),
    ],
)
def test_unknown_env_ids(env_id, match):
    with pytest.raises(LoupeError, match=match):
        EnvConfig(env_id)


@pytest.mark.unit
def test_bad_options():
    with pytest.raises(LoupeError, match="do not apply to procgen"):
        EnvConfig("procgen:coinrun", sticky_actions=0.0)
    with pytest.raises(LoupeError, match="do not apply to ALE"):
        EnvConfig("ALE/Pong-v5", num_levels=200)
    with pytest.raises(LoupeError, match="distribution_mode"):
        EnvConfig("procgen:coinrun", distribution_mode="medium")
    with pytest.raises(LoupeError, match="num_envs"):
        EnvConfig("procgen:coinrun", num_envs=0)
    with pytest.raises(LoupeError, match="sticky_actions"):
        EnvConfig("ALE/Pong-v5", sticky_actions=2.0)


@pytest.mark.unit
def test_families_and_games():
    assert list_env_families() == ["ALE", "procgen"]
    assert "coinrun" in list_games("procgen") and len(list_games("procgen")) == 16
    assert {"breakout", "pong", "montezuma_revenge"} <= set(list_games("ALE"))
    EnvConfig("ALE/MontezumaRevenge-v5")  # CamelCase ids map to ROM names
