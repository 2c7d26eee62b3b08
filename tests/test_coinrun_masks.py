"""Object masks from the CoinRun state, checked against procgen's own rendering; invisible hazards."""

from __future__ import annotations

import numpy as np
import pytest

from actors.coinrun_masks import (
    CLASS_INDEX,
    CLASSES,
    camera,
    class_masks,
    entity_class,
    pool_masks,
)
from actors.coinrun_state import CRATE, ENEMY, GOAL, LAVA, SAW, SPACE, TRAIL, CoinRunState
from actors.invisible import InvisibleHazards, check_groups, hide_hazards
from loupe.errors import LoupeError

procgen = pytest.importorskip("procgen")


def make_env(level: int, **options):
    options.setdefault("distribution_mode", "hard")
    return procgen.ProcgenGym3Env(
        num=1, env_name="coinrun", num_levels=1, start_level=level, num_threads=0, **options
    )


def walked_state(env, steps: int, seed: int) -> CoinRunState:
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        env.act(np.array([rng.choice([7, 8, 8, 4, 1, 5])], dtype=np.int32))
    return CoinRunState.parse(env.callmethod("get_state")[0])


def render(env, state: CoinRunState) -> np.ndarray:
    """procgen's own frame of ``state`` (set_state draws the observation again)."""
    env.callmethod("set_state", [state.to_bytes()])
    return env.observe()[1]["rgb"][0].astype(np.int32)  # (64, 64, 3)


def box_region(cam, left, bottom, right, top) -> np.ndarray:
    """Pixels touched by a world box (whole pixels, rounded outwards)."""
    c0, r0, c1, r1 = cam.box(left, bottom, right, top)
    region = np.zeros((cam.size, cam.size), dtype=bool)
    rows = slice(max(int(np.floor(r0)), 0), max(int(np.ceil(r1)), 0))
    cols = slice(max(int(np.floor(c0)), 0), max(int(np.ceil(c1)), 0))
    region[rows, cols] = True
    return region


OPTIONS = [
    {"distribution_mode": "hard"},
    {"distribution_mode": "easy", "paint_vel_info": True},
    {"distribution_mode": "hard", "center_agent": False},
]


@pytest.mark.integration
@pytest.mark.parametrize("options", OPTIONS)
def test_removing_an_entity_changes_the_frame_only_inside_its_computed_box(options):
    checked = visible = 0
    for level in range(10):
        env = make_env(level, **options)
        state = walked_state(env, 25, seed=level)
        cam = camera(state)
        base = render(env, state)
        for i, e in enumerate(state.entities):
            if e.type not in (SAW, ENEMY, CRATE):
                continue
            edited = state.copy()
            del edited.entities[i]
            diff = np.abs(render(env, edited) - base).sum(-1) > 0
            inside = box_region(cam, e.x - e.rx, e.y - e.ry, e.x + e.rx, e.y + e.ry)
            assert not (diff & ~inside).any(), (level, e.type_name, np.argwhere(diff & ~inside)[:4])
            col, row = cam.to_pixels(e.x, e.y)
            if 4 < col < 60 and 4 < row < 60 and cam.unit >= 3:
                # well on screen and large enough: a hazard must be drawn (crates may be stacked)
                assert diff.any() or e.type == CRATE, (level, e.type_name)
                visible += int(diff.any())
            checked += 1
    assert checked >= 10
    if camera(state).unit >= 3:
        assert visible >= 3


@pytest.mark.integration
@pytest.mark.parametrize("cells,name", [(LAVA, "lava"), ((GOAL,), "coin")])
def test_grid_objects_are_drawn_where_the_grid_says(cells, name):
    found = 0
    for level in range(30):
        env = make_env(level)
        state = walked_state(env, 1, seed=level)
        where = np.argwhere(np.isin(state.grid, cells))  # (row j, column i), row 0 at the bottom
        if not len(where):
            continue
        j, i = where[len(where) // 2]
        state.agent.x, state.agent.y = i + 0.5, j + 2.5  # the camera follows the agent
        masks = class_masks(state)
        drawn = masks[CLASS_INDEX[name]] > 0
        edited = state.copy()
        edited.set_grid_cells(cells, SPACE)
        diff = np.abs(render(env, edited) - render(env, state)).sum(-1) > 0
        # every changed pixel is covered by the class (the 0.02-cell margin is in the boxes)
        assert drawn.any() and diff.any() and not (diff & ~drawn).any(), level
        found += 1
        if found == 2:
            break
    assert found == 2, f"fewer than 2 levels with {name} in the first 30"


@pytest.mark.integration
@pytest.mark.parametrize("options", OPTIONS)
def test_masks_are_shares_that_sum_to_one_and_put_the_agent_where_it_is(options):
    env = make_env(3, **options)
    state = walked_state(env, 10, seed=3)
    masks = class_masks(state)
    assert masks.shape == (len(CLASSES), 64, 64) and masks.dtype == np.float32
    np.testing.assert_allclose(masks.sum(0), 1.0, atol=1e-6)
    assert masks.min() >= 0
    agent = state.agent
    col, row = camera(state).to_pixels(agent.x, agent.y)
    assert masks[CLASS_INDEX["agent"], int(row), int(col)] > 0
    if options.get("center_agent", True):
        assert abs(col - 32) < 1e-4 and abs(row - 32) < 1e-4
    vel = masks[CLASS_INDEX["velocity"]]
    if options.get("paint_vel_info"):
        assert vel[:12, :25].min() == 1.0 and vel[14:].max() == 0
    else:
        assert vel.max() == 0


@pytest.mark.unit
def test_pool_masks_averages_blocks_and_adaptive_bins():
    masks = np.random.default_rng(0).random((2, 3, 8, 8))
    pooled = pool_masks(masks, (4, 2))
    ref = np.zeros((2, 3, 4, 2))
    for y in range(4):
        for x in range(2):
            ref[:, :, y, x] = masks[:, :, 2 * y : 2 * y + 2, 4 * x : 4 * x + 4].mean(axis=(2, 3))
    np.testing.assert_allclose(pooled, ref)
    # a layer whose size does not divide the frame's: torch's adaptive average pooling
    import torch

    odd = pool_masks(masks, (3, 5))
    want = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(masks), (3, 5)).numpy()
    np.testing.assert_allclose(odd, want, rtol=1e-12)
    np.testing.assert_allclose(pool_masks(masks / masks.sum(1, keepdims=True), (3, 5)).sum(1), 1)
    with pytest.raises(LoupeError, match="no larger than the frame"):
        pool_masks(masks, (9, 9))


# -- invisible hazards -------------------------------------------------------------------------


def _level_with(group: str) -> tuple[object, CoinRunState]:
    """A walked CoinRun state with an entity of ``group`` well on screen."""
    for level in range(60):
        env = make_env(level)
        state = walked_state(env, 12, seed=level)
        cam = camera(state)
        for e in state.entities:
            c, r = cam.to_pixels(e.x, e.y)
            well_on_screen = 4 < c < 60 and 4 < r < 60
            if e.type in (SAW, ENEMY) and entity_class(e, state) == group and well_on_screen:
                return env, state
    raise AssertionError(f"no level with a {group} on screen in the first 60")


@pytest.mark.integration
@pytest.mark.parametrize("group", ["saw", "enemy_left", "enemy_right"])
def test_a_hidden_group_renders_exactly_like_the_group_removed(group):
    env, state = _level_with(group)
    hidden = state.copy()
    assert hide_hazards(hidden, [group]) >= 1
    removed = state.copy()
    removed.remove_entities(
        lambda e: e.type in (SAW, ENEMY, TRAIL) and entity_class(e, state) == group
    )
    np.testing.assert_array_equal(render(env, hidden), render(env, removed))
    assert not np.array_equal(render(env, hidden), render(env, state))


@pytest.mark.integration
def test_an_invisible_saw_still_ends_the_episode():
    env, state = _level_with("saw")
    saw = state.entities_of(SAW)[0]
    agent = state.agent
    saw.x, saw.y = agent.x, agent.y  # the agent stands inside the saw: the next step dies
    outcomes = {}
    for invisible in (False, True):
        env.callmethod("set_state", [state.to_bytes()])
        wrapped = InvisibleHazards(env, ["saw"] if invisible else [])
        wrapped.act(np.array([0], dtype=np.int32))
        reward, _, first = wrapped.observe()
        info = wrapped.get_info()[0]
        outcomes[invisible] = (bool(first[0]), int(info["prev_level_complete"]), float(reward[0]))
    assert outcomes[False] == outcomes[True] == (True, 0, 0.0)


@pytest.mark.integration
def test_invisible_hazards_env_never_shows_the_saws_over_an_episode():
    env, state = _level_with("saw")
    env.callmethod("set_state", [state.to_bytes()])
    wrapped = InvisibleHazards(env, ["saw"])
    rng = np.random.default_rng(0)
    for _ in range(20):
        wrapped.act(np.array([rng.choice([7, 8, 1])], dtype=np.int32))
        now = CoinRunState.parse(env.callmethod("get_state")[0])
        assert all(e.alpha == 0 for e in now.entities_of(SAW))
        obs = wrapped.observe()[1]["rgb"][0].astype(np.int32)
        removed = now.copy()
        removed.remove_entities(lambda e: e.type == SAW)
        side = make_env(0)
        np.testing.assert_array_equal(obs, render(side, removed))


@pytest.mark.unit
def test_unknown_invisible_group_is_refused_with_the_valid_ones():
    with pytest.raises(LoupeError, match="choose from saw, enemy_left, enemy_right"):
        check_groups(["lava"])
    assert check_groups(("saw",)) == ("saw",)


@pytest.mark.integration
def test_level_evaluator_with_invisible_saws_plays_levels_it_never_shows_saws_in():
    import torch

    from actors.evaluator import EvaluatorConfig, LevelEvaluator
    from attention import build_policy

    torch.manual_seed(0)
    policy = build_policy("interpretable", (3, 64, 64), 15)
    weights = {k: v.numpy() for k, v in policy.state_dict().items()}
    config = EvaluatorConfig(slots=4, invisible=["saw"], env_options={"distribution_mode": "easy"})
    evaluator = LevelEvaluator(dict(policy.spec), weights, config)
    seen = []
    original = evaluator._actions

    def spy(slots):  # every observation the policy is given: no saw drawn in it
        for slot in slots:
            state = CoinRunState.parse(slot.env.callmethod("get_state")[0])
            seen.append(all(e.alpha == 0 for e in state.entities_of(SAW)))
        return original(slots)

    evaluator._actions = spy
    # levels this untrained policy ends quickly (94, 353 and 413 steps): 1 and 5 on a saw
    results = evaluator.evaluate([1, 4, 5])
    assert sorted(r.level for r in results) == [1, 4, 5] and all(seen) and len(seen) > 6
    assert "saw" in {r.cause for r in results}  # there were saws, deadly but never drawn
    with pytest.raises(LoupeError, match="cannot make 'lava' invisible"):
        EvaluatorConfig(invisible=["lava"])


@pytest.mark.integration
def test_evaluate_command_refuses_a_bad_invisible_group(tmp_path):
    from loupe.cli import main

    code = main(["evaluate", "--checkpoint", str(tmp_path / "x.json"), "--invisible", "lava",
                 "--out", str(tmp_path / "e")])  # fmt: skip
    assert code == 2 and not (tmp_path / "e").exists()
