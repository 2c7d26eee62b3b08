"""Failure causes on constructed CoinRun situations with a known cause, and on a random agent."""

from __future__ import annotations

import collections
import copy
import functools

import numpy as np
import pytest

from actors.coinrun_state import (
    ENEMY,
    LAVA_TOP,
    PLAYER,
    SAW,
    SPACE,
    TRAIL,
    WALLS,
    CoinRunState,
)
from actors.failure import (
    CAUSES,
    HAZARD_GROUPS,
    FailureClassifier,
    FailureConfig,
    OutcomeTracker,
    enemy_group,
)
from loupe.errors import LoupeError

procgen = pytest.importorskip("procgen")

NOOP, RIGHT, RIGHT_UP = 4, 7, 8  # procgen action indices
AGENT_RY = 0.5787
LEVELS = range(40)


@functools.cache
def level_state(level: int) -> CoinRunState:
    env = procgen.ProcgenGym3Env(
        num=1,
        env_name="coinrun",
        num_levels=1,
        start_level=level,
        distribution_mode="hard",
        num_threads=0,
    )
    return CoinRunState.parse(env.callmethod("get_state")[0])


@pytest.fixture(scope="module")
def classifier():
    return FailureClassifier(FailureConfig(env_options={"distribution_mode": "hard"}))


def free_spot(state: CoinRunState, x: float, y: float, hazard) -> bool:
    """The agent's box at (x, y) overlaps only space, and no other entity is near."""
    cells = {
        state.cell(cx, cy)
        for cx in (x - 0.52, x, x + 0.52)
        for cy in (y - AGENT_RY + 0.01, y, y + AGENT_RY)
    }
    near = [
        e
        for e in state.entities
        if e is not hazard and e.type not in (PLAYER, TRAIL)
        if abs(e.x - x) < 1.8 and abs(e.y - y) < 1.8
    ]
    return cells == {SPACE} and not near


def agent_beside(hazard_type: int, side: int) -> tuple[CoinRunState, int]:
    """A state with the agent standing on a hazard's ground, 1.05 cells to its `side` (+-1)."""
    for level in LEVELS:
        state = level_state(level)
        for i, h in enumerate(state.entities):
            x, y = h.x + side * 1.05, h.y - 0.5 + AGENT_RY
            ground = state.cell(h.x + side, h.y - 1)
            if h.type == hazard_type and ground in WALLS and free_spot(state, x, y, h):
                edited = state.copy()
                a = edited.agent
                a.x, a.y, a.vx, a.vy = x, y, 0.0, 0.0
                return edited, i
    raise AssertionError(f"no level in {LEVELS} has a free spot beside type {hazard_type}")


def check(classifier, state: CoinRunState, action: int, cause: str):
    raw = state.to_bytes()
    # determinism: the unmodified state and action die, every time
    for _ in range(3):
        assert classifier.replay(raw, action).failed
    analysis = classifier.analyse(raw, action)
    assert analysis.cause == cause and analysis.avoided_by == (cause,)
    assert classifier.classify(raw, action) == cause
    return analysis


@pytest.mark.integration
def test_walking_into_a_saw(classifier):
    state, _ = agent_beside(SAW, side=-1)
    check(classifier, state, RIGHT, "saw")
    # standing still next to the saw is safe: the death comes from the move
    assert not classifier.replay(state.to_bytes(), NOOP).done


def enemy_walks_into_agent(side: int) -> CoinRunState:
    """Agent beside an enemy that walks towards it; a decoy enemy moving the other way far off."""
    state, i = agent_beside(ENEMY, side)
    enemy = state.entities[i]
    enemy.vx = 0.15 * side  # towards the agent
    decoy = copy.deepcopy(enemy)
    decoy.vx, decoy.y = -enemy.vx, enemy.y + 20.0  # in the sky, far from the agent
    state.entities.append(decoy)
    return state


@pytest.mark.integration
@pytest.mark.parametrize("side, cause", [(-1, "enemy_left"), (1, "enemy_right")])
def test_enemy_walking_into_the_agent(classifier, side, cause):
    state = enemy_walks_into_agent(side)
    analysis = check(classifier, state, NOOP, cause)
    assert {"enemy_left", "enemy_right"} <= set(analysis.present)


def enemy_at(state: CoinRunState, x: float, y: float):
    (found,) = [e for e in state.entities_of(ENEMY) if abs(e.x - x) < 1e-4 and abs(e.y - y) < 1e-4]
    return found


@pytest.mark.integration
@pytest.mark.parametrize("vx", [0.0, -0.0])
def test_walking_into_a_still_enemy_is_enemy_left(classifier, vx):
    """An enemy with vx == 0 is drawn facing left, so it is in enemy_left; it never moves again."""
    state, i = agent_beside(ENEMY, side=-1)  # the agent stands just left of the enemy
    enemy = state.entities[i]
    enemy.vx = vx
    raw = state.to_bytes()
    assert CoinRunState.parse(raw).entities[i].vx == 0.0
    # procgen keeps it still: ten steps later it stands where it stood, vx still 0
    classifier.env.callmethod("set_state", [raw])
    for _ in range(10):
        classifier.env.act(np.array([NOOP], dtype=np.int32))
    later = CoinRunState.parse(classifier.env.callmethod("get_state")[0])
    assert enemy_at(later, enemy.x, enemy.y).vx == 0.0
    assert not classifier.replay(raw, NOOP).done  # standing beside it is safe
    analysis = check(classifier, state, RIGHT, "enemy_left")  # walking into it is not
    assert "enemy_left" in analysis.present


@pytest.mark.integration
def test_enemy_groups_split_all_enemies():
    state = level_state(next(lv for lv in LEVELS if level_state(lv).entities_of(ENEMY)))
    template = state.entities_of(ENEMY)[0]
    for vx in (-0.15, -1e-6, -0.0, 0.0, 1e-6, 0.15):
        edited = state.copy()
        edited.entities = [e for e in edited.entities if e.type != ENEMY]
        lone = copy.deepcopy(template)
        lone.vx = vx
        edited.entities.append(lone)
        removed = {
            name: HAZARD_GROUPS[name](edited.copy()) for name in ("enemy_left", "enemy_right")
        }
        assert sorted(removed.values()) == [0, 1], (vx, removed)  # in exactly one group
        assert removed[enemy_group(lone)] == 1
        assert enemy_group(lone) == ("enemy_right" if vx > 0 else "enemy_left")


@pytest.mark.integration
def test_falling_into_lava(classifier):
    for level in LEVELS:
        state = level_state(level)
        spots = [
            (x + 0.5, y + 1 + AGENT_RY + 0.05)
            for y, x in np.argwhere(state.grid == LAVA_TOP)
            if state.cell(x - 1, y) == LAVA_TOP and state.cell(x + 1, y) == LAVA_TOP
        ]
        spots = [(x, y) for x, y in spots if free_spot(state, x, y, None)]
        if spots:
            break
    else:
        raise AssertionError(f"no level in {LEVELS} has open lava")
    edited = state.copy()
    a = edited.agent
    (a.x, a.y), a.vx, a.vy = spots[0], 0.0, -0.3
    check(classifier, edited, NOOP, "lava")


@pytest.mark.integration
def test_two_hazards_at_once_is_multiple(classifier):
    state, _ = agent_beside(SAW, side=-1)
    enemy = copy.deepcopy(enemy_walks_into_agent(-1).entities[-1])
    enemy.x, enemy.y, enemy.vx = state.agent.x + 0.5, state.agent.y, -0.15  # touching the agent
    state.entities.append(enemy)
    raw = state.to_bytes()
    assert classifier.replay(raw, RIGHT).failed
    analysis = classifier.analyse(raw, RIGHT)
    assert analysis.cause == "multiple" and analysis.avoided_by == ()
    assert {"saw", "enemy_left"} <= set(analysis.present)


@pytest.mark.integration
def test_a_step_that_does_not_die_is_refused(classifier):
    state, _ = agent_beside(SAW, side=-1)
    with pytest.raises(LoupeError, match="does not end in a failure"):
        classifier.classify(state.to_bytes(), NOOP)
    with pytest.raises(LoupeError, match="procgen action"):
        classifier.classify(state.to_bytes(), 15)
    # the same deadly move on the last step of the episode is a timeout, not a failure
    state.game["cur_time"] = state.timeout - 1
    result = classifier.replay(state.to_bytes(), RIGHT)
    assert result.done and result.timeout and not result.failed


@pytest.mark.integration
def test_random_agent_outcomes_and_causes(classifier):
    num = 4
    env = procgen.ProcgenGym3Env(
        num=num,
        env_name="coinrun",
        num_levels=0,
        start_level=0,
        distribution_mode="hard",
        rand_seed=3,
        num_threads=0,
    )
    tracker = OutcomeTracker(env, classifier)
    rng = np.random.default_rng(0)
    outcomes, replayed, steps = [], 0, 250
    for _ in range(steps):
        actions = np.where(rng.random(num) < 0.6, rng.choice([RIGHT, RIGHT_UP], num), 4)
        actions = np.where(rng.random(num) < 0.2, rng.integers(0, 15, num), actions)
        ended = tracker.step(actions)
        for o in ended:
            if o.outcome == "failure":  # the kept pre-step state reproduces the death
                assert classifier.replay(
                    tracker.pre_states[o.env_index], actions[o.env_index]
                ).failed
                replayed += 1
        outcomes += ended
    counts = collections.Counter((o.outcome, o.cause) for o in outcomes)
    failures = [o for o in outcomes if o.outcome == "failure"]
    assert len(failures) >= 3 and replayed == len(failures), counts
    assert counts["complete", None] >= 1, counts
    assert all(o.cause in CAUSES for o in failures)
    assert all(o.cause is None for o in outcomes if o.outcome != "failure")
    assert all(1 <= o.length <= steps and o.level_seed >= 0 for o in outcomes)
    assert all(o.ret == 10.0 for o in outcomes if o.outcome == "complete")
    assert all(o.ret == 0.0 for o in failures)
    # the tracker's episode lengths add up with the steps of unfinished episodes
    assert sum(o.length for o in outcomes) + tracker.lengths.sum() == steps * num


@pytest.mark.integration
def test_tracker_without_classifier_keeps_no_states():
    env = procgen.ProcgenGym3Env(num=2, env_name="coinrun", num_levels=0, rand_seed=1)
    tracker = OutcomeTracker(env)
    outcomes = []
    for _ in range(300):
        outcomes += tracker.step(np.full(2, RIGHT_UP))
    assert tracker.pre_states is None and outcomes
    assert {o.outcome for o in outcomes} <= {"complete", "failure", "timeout"}
    assert all(o.cause is None for o in outcomes)


@pytest.mark.unit
def test_config_validation():
    with pytest.raises(LoupeError):
        FailureConfig(env_options={"env_name": "jumper"})
    with pytest.raises(LoupeError):
        FailureClassifier(FailureConfig(), distribution_mode="hard")


@pytest.mark.integration
def test_side_env_options_do_not_change_the_verdict():
    # the loaded state brings its own level, options and RNGs
    other = FailureClassifier(
        distribution_mode="easy", num_levels=5, start_level=100, use_backgrounds=False
    )
    state, _ = agent_beside(SAW, side=-1)
    assert other.classify(state.to_bytes(), RIGHT) == "saw"
