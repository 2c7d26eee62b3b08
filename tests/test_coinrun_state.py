"""CoinRunState on real procgen states: exact round trip, layout facts from coinrun.cpp, edits."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from actors.coinrun_state import (
    CRATE,
    END_MARKER,
    ENEMY,
    ENTITY_SIZE,
    GOAL,
    LAVA,
    PLAYER,
    SAW,
    SPACE,
    TRAIL,
    WALL_MID,
    WALL_TOP,
    CoinRunState,
)
from loupe.errors import LoupeError

procgen = pytest.importorskip("procgen")

KNOWN_TYPES = {PLAYER, SAW, ENEMY, CRATE, TRAIL}
AGENT_RY = 0.5787  # coinrun.cpp game_reset: agent->ry


def make_env(level: int, num: int = 1, **options):
    options.setdefault("distribution_mode", "hard")
    return procgen.ProcgenGym3Env(
        num=num, env_name="coinrun", num_levels=1, start_level=level, num_threads=0, **options
    )


def get_state(env) -> bytes:
    return env.callmethod("get_state")[0]


def walk(env, steps: int, seed: int = 0) -> list[bytes]:
    """States before each of `steps` right-biased random steps."""
    rng = np.random.default_rng(seed)
    states = []
    for _ in range(steps):
        states.append(get_state(env))
        env.act(np.array([rng.choice([7, 8, 8, 4, 1, 5])], dtype=np.int32))
    return states


@pytest.mark.integration
@pytest.mark.parametrize(
    "options",
    [
        {"distribution_mode": "hard"},
        {"distribution_mode": "easy", "center_agent": False, "paint_vel_info": True},
        {"distribution_mode": "hard", "use_backgrounds": False, "restrict_themes": True},
    ],
)
def test_round_trip_is_exact_and_ends_at_the_marker(options):
    states = []
    for level in (1, 7, 21):
        states += walk(make_env(level, **options), 40, seed=level)
    for raw in states:
        state = CoinRunState.parse(raw)
        assert state.to_bytes() == raw
        assert state.offsets["end"] == len(raw) - 4
        assert struct.unpack_from("<I", raw, state.offsets["end"])[0] == END_MARKER
        assert state.game["game_name"] == "coinrun" and state.timeout == 1000
    assert len({CoinRunState.parse(s).cur_time for s in states}) > 10


@pytest.mark.integration
def test_fields_match_coinrun_source():
    env = make_env(21)
    states = [CoinRunState.parse(s) for s in walk(env, 30)]
    start = states[0]
    # game_reset: agent at (1 + rx, 1 + ry), 64 x 64 world, floor and walls around it
    assert start.cur_time == 0 and start.level_seed == 21
    assert (start.agent.x, start.agent.rx) == (1.5, 0.5)
    assert start.agent.y == pytest.approx(1 + AGENT_RY)
    assert start.agent.ry == pytest.approx(AGENT_RY)
    assert start.grid.shape == (64, 64) and start.grid_size == 64 * 64
    assert (start.grid[-1] == WALL_MID).all()  # top row
    assert (start.grid[0, 1:5] == WALL_TOP).all()  # floor under the start: row 0 is y = 0
    assert (start.grid[:, 0] == WALL_MID).all() and (start.grid[:, -1] == WALL_MID).all()
    assert start.cell(1.5, 1.5) == SPACE and (start.grid == GOAL).sum() == 1
    assert start.world["main_width"] == 64 and start.coinrun["gravity"] == pytest.approx(0.2)
    # cur_time counts steps
    assert [s.cur_time for s in states] == list(range(30))
    for s in states:
        types = [e.type for e in s.entities]
        assert set(types) <= KNOWN_TYPES and types.count(PLAYER) == 1
        assert 1 < len(types) < 200
        assert all(e.vx == 0 for e in s.entities_of(SAW))
        assert all(abs(e.vx) == pytest.approx(0.15) for e in s.entities_of(ENEMY))
    # level 21 has saws, enemies and lava
    assert start.entities_of(SAW) and start.entities_of(ENEMY) and np.isin(start.grid, LAVA).any()


@pytest.mark.integration
def test_offsets_point_at_the_fields():
    raw = walk(make_env(7), 12)[-1]
    state = CoinRunState.parse(raw)
    assert struct.unpack_from("<i", raw, state.offsets["cur_time"])[0] == state.cur_time == 11
    assert struct.unpack_from("<i", raw, state.offsets["entities"])[0] == len(state.entities)
    for i, e in enumerate(state.entities):
        at = state.offsets[f"entity[{i}]"]
        assert at == state.offsets["entities"] + 4 + i * ENTITY_SIZE
        assert struct.unpack_from("<6fi", raw, at) == pytest.approx(
            (e.x, e.y, e.vx, e.vy, e.rx, e.ry, e.type)
        )
    w, h, n = struct.unpack_from("<3i", raw, state.offsets["grid"])
    assert (w, h, n) == (64, 64, 64 * 64)
    cells = np.frombuffer(raw, "<i4", n, state.offsets["grid.values"])
    y, x = 5, 9
    assert cells[y * w + x] == state.grid[y, x] == state.cell(x + 0.5, y + 0.5)


@pytest.mark.integration
def test_bad_bytes_are_refused():
    raw = get_state(make_env(3))
    for bad in (raw[:-4], raw[:1000], raw + b"\0\0\0\0", raw[:-4] + b"\0\0\0\0"):
        with pytest.raises(LoupeError):
            CoinRunState.parse(bad)
    other = procgen.ProcgenGym3Env(num=1, env_name="jumper", num_threads=0)
    with pytest.raises(LoupeError, match="not a CoinRun state"):
        CoinRunState.parse(get_state(other))


@pytest.mark.integration
def test_agent_position_is_where_the_frame_draws_it():
    # center_agent=False: one pixel per cell, column floor(x), row floor(64 - y)
    env = make_env(5, center_agent=False, use_backgrounds=False)
    state = CoinRunState.parse(get_state(env))
    spots = [(10.5, 30.0 + AGENT_RY), (21.5, 43.0 + AGENT_RY)]
    frames = []
    for x, y in spots:
        moved = state.copy()
        moved.agent.x, moved.agent.y = x, y
        env.callmethod("set_state", [moved.to_bytes()])
        frames.append(env.observe()[1]["rgb"][0].astype(np.int32))  # (64, 64, 3)
        assert CoinRunState.parse(get_state(env)).agent.x == x
    changed = np.argwhere(np.abs(frames[0] - frames[1]).sum(-1) > 0)  # (K, 2) rows, cols
    expected = np.array([(int(64 - y), int(x)) for x, y in spots])
    assert len(changed) > 0
    dist = np.abs(changed[:, None, :] - expected[None]).max(-1)  # (K, 2)
    assert (dist.min(1) <= 1).all()  # every changed pixel is at one of the two spots
    assert (dist.min(0) <= 1).all()  # and both spots changed


@pytest.mark.integration
def test_edited_state_loads_and_the_env_continues():
    env = make_env(7)
    walk(env, 5)
    state = CoinRunState.parse(get_state(env))
    crates = len(state.entities_of(CRATE))
    saws = len(state.entities_of(SAW))
    assert crates > 0 and saws > 0
    first = state.entities_of(CRATE)[0]
    assert state.remove_entities(lambda e: e is first) == 1
    assert state.remove_entities(lambda e: e.type == SAW) == saws
    state.agent.x += 1.0
    lava_before = int(np.isin(state.grid, LAVA).sum())
    assert state.set_grid_cells([WALL_TOP], SPACE) > 0 and not (state.grid == WALL_TOP).any()
    assert int(np.isin(state.grid, LAVA).sum()) == lava_before

    env.callmethod("set_state", [state.to_bytes()])
    loaded = CoinRunState.parse(get_state(env))
    assert loaded.agent.x == state.agent.x and len(loaded.entities_of(CRATE)) == crates - 1
    assert not loaded.entities_of(SAW) and not (loaded.grid == WALL_TOP).any()
    for _ in range(20):
        env.act(np.array([7], dtype=np.int32))
    _, obs, _ = env.observe()
    after = CoinRunState.parse(get_state(env))
    assert obs["rgb"].shape == (1, 64, 64, 3) and after.cur_time != loaded.cur_time


@pytest.mark.integration
def test_the_player_cannot_be_removed():
    state = CoinRunState.parse(get_state(make_env(1)))
    n = len(state.entities)
    with pytest.raises(LoupeError, match="player"):
        state.remove_entities(lambda e: True)
    assert len(state.entities) == n
    copy = state.copy()
    copy.agent.x = 30.0
    assert state.agent.x == 1.5  # copies are independent
