"""Vector environments: configs and ids (unit), and real ale-py and procgen games (integration)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from actors import (
    EnvConfig,
    EpisodeRecord,
    list_env_families,
    list_games,
    make_vec_env,
    measure_env_sps,
)
from actors.atari import thread_count, usable_cores
from actors.procgen_env import ARTICLE_ACTIONS, ARTICLE_COMBOS, COMBOS, read_state_header
from loupe.config import from_dict, to_dict
from loupe.errors import LoupeError

NOOP = 4  # procgen's action without buttons


def coinrun(**kw) -> EnvConfig:
    kw.setdefault("num_envs", 2)
    return EnvConfig("procgen:coinrun", **kw)


class EpisodeTracker:
    """Reference bookkeeping written independently of the adapters: per-env sums and counts."""

    def __init__(self, n: int):
        self.ret = np.zeros(n)
        self.length = np.zeros(n, dtype=int)

    def update(self, reward: np.ndarray, done: np.ndarray) -> list[tuple[int, float, int]]:
        self.ret += reward
        self.length += 1
        ended = [(int(i), float(self.ret[i]), int(self.length[i])) for i in np.flatnonzero(done)]
        self.ret[done] = 0.0
        self.length[done] = 0
        return ended


# -- unit: ids, families, options -----------------------------------------------------------------
@pytest.mark.unit
@pytest.mark.parametrize(
    "env_id, match",
    [
        ("procgen:nosuch", r"unknown procgen game 'nosuch'.*list_games\('procgen'\)"),
        ("procgen:CoinRun", "did you mean coinrun"),
        (
            "ALE/Breakot-v5",
            r"unknown ALE game 'Breakot'.*did you mean Breakout.*list_games\('ALE'\)",
        ),
        ("ALE/Breakout-v4", "only v5 ALE ids"),
        ("ALE/Combat-v5", "no single-player mode"),
        ("ALE/", "ALE ids look like ALE/<Game>-v5"),
        ("CartPole-v1", r"families are ALE: ALE/Breakout-v5, procgen: procgen:coinrun.*list_games"),
        ("", "unknown environment id"),
    ],
)
def test_unknown_env_ids_say_what_exists(env_id, match):
    with pytest.raises(LoupeError, match=match):
        EnvConfig(env_id)


@pytest.mark.unit
def test_families_and_games():
    procgen = pytest.importorskip("procgen.env")
    assert list_env_families() == ["ALE", "procgen"]
    assert list_games("procgen") == procgen.ENV_NAMES
    ale = list_games("ALE")
    assert {"Breakout", "Pong", "MontezumaRevenge", "SpaceInvaders", "TicTacToe3D"} <= set(ale)
    assert "Combat" not in ale and len(ale) > 100
    assert EnvConfig("ALE/MontezumaRevenge-v5").game == "montezuma_revenge"
    assert EnvConfig("ALE/TicTacToe3D-v5").game == "tic_tac_toe_3d"
    assert (EnvConfig("procgen:maze").family, EnvConfig("procgen:maze").game) == ("procgen", "maze")
    with pytest.raises(LoupeError, match="families: ALE, procgen"):
        list_games("mujoco")


@pytest.mark.unit
def test_options_dict_and_typed_fields_are_one_thing():
    a = coinrun(options={"num_levels": 200, "distribution_mode": "easy"})
    b = coinrun(num_levels=200, distribution_mode="easy")
    assert a == b and a.num_levels == 200 and a.distribution_mode == "easy"
    assert a.options == {} and a.changed_options() == {
        "num_levels": 200,
        "distribution_mode": "easy",
    }
    assert coinrun(options={"num_levels": 0}).changed_options() == {}
    assert dataclasses.replace(a, num_levels=5).num_levels == 5
    # JSON round trip (loupe.config) and back through keyword arguments (probes, bench)
    assert from_dict(EnvConfig, to_dict(a)) == a
    kwargs = {k: v for k, v in to_dict(a).items() if k != "env_id"}
    assert EnvConfig("procgen:coinrun", **kwargs) == a
    assert EnvConfig("ALE/Pong-v5", options={"sticky_actions": 0}).sticky_actions == 0.0


@pytest.mark.unit
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            {"options": {"num_level": 3}},
            r"unknown procgen option 'num_level' \(did you mean num_levels",
        ),
        ({"options": {"frobnicate": 1}}, "valid options: num_levels, start_level"),
        ({"options": {"sticky_actions": 0.0}}, "sticky_actions applies to ALE environments only"),
        ({"sticky_actions": 0.0}, "do not apply to procgen"),
        ({"num_levels": 3, "options": {"num_levels": 4}}, "given twice"),
        ({"num_levels": "3"}, "num_levels must be an integer"),
        ({"use_backgrounds": 1}, "use_backgrounds must be true or false"),
        ({"options": ["num_levels"]}, "options must be a dict"),
        ({"distribution_mode": "medium"}, "unknown distribution_mode 'medium'"),
        ({"distribution_mode": "memory"}, "procgen:coinrun has no memory mode; memory exists for"),
        ({"distribution_mode": "extreme"}, "no extreme mode"),
        ({"distribution_mode": "exploration", "num_levels": 5}, "exploration fixes the level"),
        ({"num_levels": -1}, "must be >= 0"),
        ({"action_set": "minimal"}, "action_set must be 'full' or 'article'"),
        ({"num_envs": 0}, "num_envs must be positive"),
        ({"seed": -1}, r"seed must be in \[0, 2\*\*31\)"),
    ],
)
def test_bad_procgen_options(kwargs, match):
    with pytest.raises(LoupeError, match=match):
        coinrun(**kwargs)


@pytest.mark.unit
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            {"num_levels": 200},
            r"num_levels do not apply to ALE environments \(ALE/Pong-v5\); ALE options: sticky",
        ),
        ({"sticky_actions": 2.0}, r"sticky_actions must be in \[0, 1\]"),
        ({"frame_skip": 0}, "frame_skip must be positive"),
        ({"noop_max": -1}, "noop_max must be >= 0"),
        ({"options": {"episodic_lives": True}}, "did you mean episodic_life"),
    ],
)
def test_bad_ale_options(kwargs, match):
    with pytest.raises(LoupeError, match=match):
        EnvConfig("ALE/Pong-v5", **kwargs)


@pytest.mark.unit
def test_article_actions_are_the_articles_combos():
    assert len(ARTICLE_ACTIONS) == len(ARTICLE_COMBOS) == 9
    # (), R, L, U, R+U, L+U, D land on the procgen combos with exactly those buttons
    for index, combo in zip(ARTICLE_ACTIONS[:7], ARTICLE_COMBOS[:7]):
        assert set(COMBOS[index]) == set(combo)
    assert COMBOS[ARTICLE_ACTIONS[7]] == ("A",) and ARTICLE_ACTIONS[8] >= 9  # B: a special key
    with pytest.raises(LoupeError, match="coinrun only"):
        EnvConfig("procgen:starpilot", action_set="article")


@pytest.mark.unit
def test_ale_thread_count_is_bounded_by_cores_and_envs():
    cores = usable_cores()
    assert thread_count(EnvConfig("ALE/Pong-v5", num_envs=64)) == min(cores, 64)
    assert thread_count(EnvConfig("ALE/Pong-v5", num_envs=1)) == 1
    assert thread_count(EnvConfig("ALE/Pong-v5", num_envs=3, ale_threads=8)) == 3
    assert thread_count(EnvConfig("ALE/Pong-v5", num_envs=8, ale_threads=1)) == 1


# -- integration: procgen -------------------------------------------------------------------------
@pytest.mark.integration
def test_procgen_episode_records_match_a_reference_loop():
    n = 4
    env = make_vec_env(coinrun(num_envs=n, seed=0, distribution_mode="easy"))
    obs = env.reset()
    assert obs.shape == (n, 3, 64, 64) and obs.dtype == np.uint8
    assert env.obs_shape == (3, 64, 64) and env.n_actions == 15 and env.num_envs == n
    rng = np.random.default_rng(0)
    ref = EpisodeTracker(n)
    records: list[EpisodeRecord] = []
    for _ in range(400):
        seeds_before = env.level_seeds()
        assert seeds_before.dtype == np.int64 and seeds_before.shape == (n,)
        # right+up half of the time: finishes easy levels and dies often
        actions = np.where(rng.random(n) < 0.5, 8, rng.integers(0, 15, n))
        obs, reward, done, episodes = env.step(actions)
        assert obs.shape == (n, 3, 64, 64) and obs.dtype == np.uint8
        assert reward.dtype == np.float32 and done.dtype == bool and done.shape == (n,)
        expected = ref.update(reward, done)
        assert [(e.env_index, e.ret, e.length) for e in episodes] == expected
        for e in episodes:
            assert e.level_seed == seeds_before[e.env_index]
        records += episodes
    outcomes = [e.outcome for e in records]
    assert len(records) >= 5 and "complete" in outcomes and "failure" in outcomes
    for e in records:
        if e.outcome == "complete":
            assert e.ret == 10.0 and e.length <= 1000
        else:
            assert e.outcome == "failure" and e.ret == 0.0 and e.length < 1000
    env.close()


@pytest.mark.integration
@pytest.mark.parametrize("game, limit", [("coinrun", 1000), ("maze", 500)])
def test_procgen_timeouts_at_the_games_time_limit(game, limit):
    env = make_vec_env(
        EnvConfig(f"procgen:{game}", num_envs=2, seed=1, start_level=7, num_levels=1)
    )
    env.reset()
    for t in range(limit):
        _, _, done, episodes = env.step(np.full(2, NOOP))  # standing still never ends a level
        if t < limit - 1:
            assert not done.any() and not episodes
    assert done.all()
    assert [(e.outcome, e.length, e.ret, e.level_seed) for e in episodes] == [
        ("timeout", limit, 0.0, 7)
    ] * 2


@pytest.mark.integration
def test_procgen_options_reach_the_game():
    cfg = coinrun(
        num_levels=1,
        start_level=42,
        distribution_mode="easy",
        paint_vel_info=True,
        use_backgrounds=False,
        restrict_themes=True,
        use_monochrome_assets=True,
        center_agent=False,
        use_sequential_levels=True,
    )
    env = make_vec_env(cfg)
    env.reset()
    head = read_state_header(env.get_state()[0])  # what the C++ game was built with
    assert head["game_name"] == "coinrun" and head["distribution_mode"] == 0  # easy
    for name in ("paint_vel_info", "use_backgrounds", "restrict_themes", "use_monochrome_assets",
                 "center_agent", "use_sequential_levels"):  # fmt: skip
        assert head[name] == int(getattr(cfg, name)), name
    assert (head["level_seed_low"], head["level_seed_high"]) == (42, 43)
    assert list(env.level_seeds()) == [42, 42]
    other = make_vec_env(coinrun(num_envs=4, seed=3))
    assert len(set(other.level_seeds().tolist())) == 4  # unbounded levels: all different


@pytest.mark.integration
def test_procgen_single_level_repeats_and_done_brings_its_first_frame():
    env = make_vec_env(coinrun(num_envs=1, num_levels=1, start_level=5, distribution_mode="easy"))
    first = env.reset().copy()
    rng = np.random.default_rng(1)
    seeds = []
    for _ in range(300):
        action = 8 if rng.random() < 0.5 else rng.integers(0, 15)
        obs, _, done, episodes = env.step(np.array([action]))
        seeds += [e.level_seed for e in episodes]
        if done[0]:
            assert np.array_equal(obs, first)  # the same level restarts inside step
    assert len(seeds) >= 2 and set(seeds) == {5}


@pytest.mark.integration
def test_procgen_sequential_levels_continue_after_a_completed_level():
    env = make_vec_env(
        coinrun(
            num_envs=4,
            num_levels=1,
            start_level=3,
            distribution_mode="easy",
            use_sequential_levels=True,
        )  # fmt: skip
    )
    env.reset()
    rng = np.random.default_rng(0)
    completed_without_done = 0
    records = []
    for _ in range(300):
        _, reward, done, episodes = env.step(
            np.where(rng.random(4) < 0.7, 8, rng.integers(0, 15, 4))
        )
        records += episodes
        won = (reward == 10.0) & ~done
        completed_without_done += int(won.sum())
        assert set(env.level_seeds()[won].tolist()) <= {3 + 997 * k for k in range(1, 10)}
    assert completed_without_done >= 2
    assert any(e.ret >= 10.0 for e in records)  # an episode spanning a completed level
    assert all(e.outcome in ("failure", "timeout") and e.ret % 10 == 0 for e in records)


@pytest.mark.integration
def test_procgen_state_roundtrip_reset_and_bad_states():
    env = make_vec_env(coinrun(num_envs=2, seed=2))
    env.reset()
    env.step(np.array([7, 7]))
    states = env.get_state()
    assert len(states) == 2 and all(isinstance(s, bytes) for s in states)
    actions = np.random.default_rng(0).integers(0, 15, (20, 2))
    first_run = [env.step(a)[0].copy() for a in actions]
    seeds = env.level_seeds()
    restored = env.set_state(states)
    assert restored.shape == (2, 3, 64, 64)
    second_run = [env.step(a)[0].copy() for a in actions]
    assert all(np.array_equal(x, y) for x, y in zip(first_run, second_run))
    assert np.array_equal(env.level_seeds(), seeds)
    maze_state = make_vec_env(EnvConfig("procgen:maze", num_envs=1)).get_state()[0]
    with pytest.raises(LoupeError, match="a maze state cannot be loaded into procgen:coinrun"):
        env.set_state([maze_state, states[1]])
    with pytest.raises(LoupeError, match="end marker"):
        env.set_state([states[0][:-100], states[1]])
    with pytest.raises(LoupeError, match="needs 2 states"):
        env.set_state(states[:1])
    # reset() after steps starts new levels, reports no episodes and restarts the counters
    before = env.level_seeds()
    env.reset()
    assert not np.array_equal(env.level_seeds(), before)
    _, _, _, episodes = env.step(np.full(2, NOOP))
    assert episodes == []


@pytest.mark.integration
def test_article_action_set_maps_onto_procgen_actions():
    article = make_vec_env(coinrun(num_envs=1, seed=4, action_set="article"))
    full = make_vec_env(coinrun(num_envs=1, seed=4))
    assert article.n_actions == 9 and full.n_actions == 15
    article.reset()
    full.reset()
    for k in [1, 1, 4, 3, 0, 2, 5, 6, 7, 8, 1, 4, 4]:
        a, _, _, _ = article.step(np.array([k]))
        f, _, _, _ = full.step(np.array([ARTICLE_ACTIONS[k]]))
        assert np.array_equal(a, f)
    # A and B do nothing in CoinRun: the same frames as no buttons at all
    state = full.get_state()
    frames = []
    for action in (NOOP, ARTICLE_ACTIONS[7], ARTICLE_ACTIONS[8]):
        full.set_state(state)
        frames.append(full.step(np.array([action]))[0].copy())
    assert np.array_equal(frames[0], frames[1]) and np.array_equal(frames[0], frames[2])
    with pytest.raises(ValueError, match=r"actions must be in \[0, 9\)"):
        article.step(np.array([9]))


@pytest.mark.integration
def test_step_before_reset_and_bad_actions():
    env = make_vec_env(coinrun(num_envs=2))
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros(2, dtype=np.int64))
    env.reset()
    with pytest.raises(ValueError, match="integer actions"):
        env.step(np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError, match=r"\[0, 15\)"):
        env.step(np.array([-1, 0]))


@pytest.mark.integration
def test_measure_env_sps():
    cfg = coinrun(num_envs=2)
    assert measure_env_sps(cfg, 20) > 0
    assert measure_env_sps(cfg, 20, backend=True) > 0
    with pytest.raises(LoupeError, match="steps must be positive"):
        measure_env_sps(cfg, 0)


# -- integration: Atari ---------------------------------------------------------------------------
def breakout(**kw) -> EnvConfig:
    kw.setdefault("sticky_actions", 0.0)
    return EnvConfig("ALE/Breakout-v5", **kw)


@pytest.mark.integration
def test_atari_same_step_autoreset_and_records():
    n = 2
    env = make_vec_env(breakout(num_envs=n, seed=0, clip_rewards=False))
    obs = env.reset()
    assert obs.shape == (n, 4, 84, 84) and obs.dtype == np.uint8 and env.n_actions == 4
    # a fresh game's stack holds one frame and three zero frames
    assert not obs[:, :3].any() and obs[:, 3].any()
    rng = np.random.default_rng(0)
    ref = EpisodeTracker(n)
    records = []
    for _ in range(600):
        prev = obs
        obs, reward, done, episodes = env.step(rng.integers(0, 4, n))
        assert reward.dtype == np.float32 and done.dtype == bool
        assert [(e.env_index, e.ret, e.length) for e in episodes] == ref.update(reward, done)
        for i in np.flatnonzero(done):
            # SAME_STEP: obs[i] is already the first observation of the next game
            assert prev[i, :3].any() and not obs[i, :3].any() and obs[i, 3].any()
        records += episodes
        if len(records) >= 2:
            break
    assert len(records) >= 2
    assert all(e.outcome is None and e.level_seed is None and e.length > 0 for e in records)
    assert np.array_equal(env.level_seeds(), [-1, -1])
    env.close()


@pytest.mark.integration
def test_atari_episodic_life_ends_learning_episodes_but_returns_cover_the_game():
    env = make_vec_env(breakout(num_envs=1, seed=0, episodic_life=True, clip_rewards=False))
    env.reset()
    rng = np.random.default_rng(0)
    dones, total, steps = 0, 0.0, 0
    for _ in range(2000):
        obs, reward, done, episodes = env.step(rng.integers(0, 4, 1))
        dones, total, steps = dones + int(done[0]), total + float(reward[0]), steps + 1
        if done[0] and not episodes:
            assert obs[0, :3].any()  # a life loss: the game goes on, no fresh frame stack
        if episodes:
            break
    assert episodes, "no game ended"
    assert dones == 5  # Breakout: 5 lives, each loss is a learning-episode end
    assert (episodes[0].ret, episodes[0].length) == (total, steps)


@pytest.mark.integration
def test_atari_reward_clipping_keeps_raw_returns():
    def make(clip):
        cfg = EnvConfig("ALE/SpaceInvaders-v5", num_envs=2, seed=3, sticky_actions=0.0,
                        clip_rewards=clip, max_episode_frames=1600)  # fmt: skip
        env = make_vec_env(cfg)
        env.reset()
        return env

    clipped, raw = make(True), make(False)
    rng = np.random.default_rng(0)
    ref_clipped, ref_raw = EpisodeTracker(2), EpisodeTracker(2)
    clipped_rewards, raw_rewards, clipped_eps, raw_eps, clipped_sums = [], [], [], [], []
    for _ in range(400):
        a = rng.integers(0, clipped.n_actions, 2)
        _, r_c, d_c, e_c = clipped.step(a)
        _, r_r, d_r, e_r = raw.step(a)
        assert np.array_equal(d_c, d_r)
        clipped_sums += ref_clipped.update(r_c, d_c)
        assert [(e.env_index, e.ret, e.length) for e in e_r] == ref_raw.update(r_r, d_r)
        clipped_rewards.append(r_c)
        raw_rewards.append(r_r)
        clipped_eps += e_c
        raw_eps += e_r
    raw_rewards, clipped_rewards = np.array(raw_rewards), np.array(clipped_rewards)
    assert raw_rewards.max() > 1.0  # Space Invaders scores 5 to 30 per alien
    assert np.array_equal(clipped_rewards, np.sign(raw_rewards))
    assert clipped_eps and clipped_eps == raw_eps  # returns are raw either way
    # the clipped training rewards of those episodes add up to less than the raw returns
    assert all(c[1] < e.ret for c, e in zip(clipped_sums, clipped_eps) if e.ret > 0)


@pytest.mark.integration
def test_atari_truncation_ends_the_game():
    env = make_vec_env(EnvConfig("ALE/Pong-v5", num_envs=1, max_episode_frames=200))
    env.reset()
    steps = 0
    while steps < 60:
        _, _, done, episodes = env.step(np.array([0]))
        steps += 1
        if done[0]:
            break
    assert done[0] and episodes[0].length == steps <= 50


@pytest.mark.unit
def test_episode_record_is_a_frozen_dataclass():
    e = EpisodeRecord(0, 1.0, 2)
    assert (e.outcome, e.level_seed) == (None, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.ret = 3.0  # type: ignore[misc]


@pytest.mark.integration
def test_envs_made_one_per_level_leave_no_library_handles_behind():
    """gym3's cached FFI kept every env's library handle: ~10 kB per env, forever."""
    from actors.evaluator import EvaluatorConfig, make_level_env
    from actors.procgen_env import import_procgen, unpin_library

    def ffi_lists(env):
        return len(env._ffi._libraries), len(env._ffi._function_caches)

    first = make_level_env(EvaluatorConfig(), 0)
    base = ffi_lists(first)
    for level in range(1, 301):
        env = make_level_env(EvaluatorConfig(), level)
        env.act(np.zeros(1, dtype=np.int32))
        assert env.observe()[1]["rgb"].shape == (1, 64, 64, 3)
        del env
    vec = make_vec_env(EnvConfig(env_id="procgen:coinrun", num_envs=2))
    vec.reset()
    vec.step(np.zeros(2, dtype=np.int64))
    assert ffi_lists(first) == base  # one handle kept for the process, none per env
    # without loupe's unpinning the lists grow by one per env: the test measures a real leak
    raw = import_procgen().ProcgenGym3Env(num=1, env_name="coinrun")
    assert ffi_lists(first) == (base[0] + 1, base[1] + 1)
    unpin_library(raw)
    assert ffi_lists(first) == base
    # the first env still steps after all the others went
    first.act(np.zeros(1, dtype=np.int32))
    assert first.observe()[1]["rgb"].shape == (1, 64, 64, 3)
