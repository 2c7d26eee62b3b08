"""Feature labels from class masks: constructed attributions with known answers, and a slow loop."""

from __future__ import annotations

import json

import numpy as np
import pytest

from loupe.errors import LoupeError
from probes.labels import class_shares, find_label, label_features

CLASSES = ("background", "saw", "enemy_left")


def one_hot_masks(labels: np.ndarray, c: int = len(CLASSES)) -> np.ndarray:
    """(N, h, w) class ids -> (N, C, h, w) shares."""
    return np.eye(c)[labels].transpose(0, 3, 1, 2)


@pytest.mark.unit
def test_a_feature_that_fires_only_on_saws_is_labelled_saw_with_share_one():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 3, size=(5, 4, 4))  # (N, h, w)
    masks = one_hot_masks(ids)
    t = np.zeros((5, 2, 4, 4))
    t[:, 0][ids == 1] = rng.random((ids == 1).sum()) + 0.1  # feature 0: good news on saws
    t[:, 1][ids == 2] = -(rng.random((ids == 2).sum()) + 0.1)  # feature 1: bad news on enemies
    labels = label_features(t, masks, CLASSES)
    assert labels[0].label == "saw" and labels[0].share == pytest.approx(1.0)
    assert labels[0].positive["saw"] == pytest.approx(1.0) and labels[0].negative["saw"] == 0.0
    assert labels[1].label == "enemy_left" and labels[1].share == pytest.approx(1.0)
    assert labels[1].negative["enemy_left"] == pytest.approx(1.0)
    assert find_label(labels, "saw").feature == 0


@pytest.mark.unit
def test_mixed_feature_shares_follow_the_mass_and_soft_masks():
    # one frame, 1x2 positions: position 0 is half saw half background, position 1 all enemy
    masks = np.array([[[[0.5, 0.0]], [[0.5, 0.0]], [[0.0, 1.0]]]])  # (1, 3, 1, 2)
    t = np.array([[[[3.0, -1.0]]]])  # (1, 1, 1, 2): +3 on position 0, -1 on position 1
    (label,) = label_features(t, masks, CLASSES, activation=np.array([[[[1.0, 3.0]]]]))
    assert label.total == pytest.approx({"background": 0.375, "saw": 0.375, "enemy_left": 0.25})
    assert label.positive == pytest.approx({"background": 0.5, "saw": 0.5, "enemy_left": 0.0})
    assert label.negative == pytest.approx({"background": 0.0, "saw": 0.0, "enemy_left": 1.0})
    assert label.activation == pytest.approx(
        {"background": 0.125, "saw": 0.125, "enemy_left": 0.75}
    )
    assert label.label in ("background", "saw") and label.share == pytest.approx(0.375)
    # by hand: areas are the mean mask per class, lift = total share / area
    assert label.area == pytest.approx({"background": 0.25, "saw": 0.25, "enemy_left": 0.5})
    assert label.lift == pytest.approx({"background": 1.5, "saw": 1.5, "enemy_left": 0.5})


@pytest.mark.unit
def test_lift_finds_a_small_object_detector_that_loses_the_share_to_a_large_class():
    # 10 positions: 1 saw, 9 background. The feature puts 40% of its mass on the saw.
    ids = np.zeros((1, 1, 10), int)
    ids[0, 0, 3] = 1
    t = np.full((1, 1, 1, 10), 0.6 / 9)
    t[0, 0, 0, 3] = 0.4
    (label,) = label_features(t, one_hot_masks(ids), CLASSES)
    assert label.label == "background" and label.share == pytest.approx(0.6)
    assert label.lift["saw"] == pytest.approx(0.4 / 0.1)
    assert label.lift["background"] == pytest.approx(0.6 / 0.9)
    assert label.lift["enemy_left"] == 0.0  # no enemy anywhere: no lift, not a division by zero


@pytest.mark.unit
def test_class_shares_equal_a_slow_loop_and_sum_to_one():
    rng = np.random.default_rng(1)
    maps = rng.random((3, 4, 5, 6))
    raw = rng.random((3, 3, 5, 6))
    masks = raw / raw.sum(1, keepdims=True)
    got = class_shares(maps, masks)
    ref = np.zeros((4, 3))
    for k in range(4):
        total = 0.0
        for n in range(3):
            for y in range(5):
                for x in range(6):
                    total += maps[n, k, y, x]
                    for c in range(3):
                        ref[k, c] += maps[n, k, y, x] * masks[n, c, y, x]
        ref[k] /= total
    np.testing.assert_allclose(got, ref, rtol=1e-12)
    np.testing.assert_allclose(got.sum(1), 1.0)


@pytest.mark.unit
def test_bad_shapes_and_missing_labels_say_what_to_do():
    with pytest.raises(LoupeError, match="pool the masks"):
        class_shares(np.ones((2, 1, 4, 4)), np.ones((2, 3, 8, 8)) / 3)
    with pytest.raises(LoupeError, match="non-negative"):
        class_shares(-np.ones((1, 1, 2, 2)), np.ones((1, 3, 2, 2)) / 3)
    labels = label_features(np.ones((1, 1, 2, 2)), one_hot_masks(np.zeros((1, 2, 2), int)), CLASSES)
    with pytest.raises(
        LoupeError, match=r"no feature is labelled 'saw'; labels found: 0:background"
    ):
        find_label(labels, "saw")


def untrained_coinrun_checkpoint(run):
    """A checkpoint of a fresh interpretable policy (seed 0) trained on nothing, for CoinRun."""
    import torch

    from attention import build_policy
    from learner.checkpoint import save_checkpoint

    torch.manual_seed(0)
    policy = build_policy("interpretable", (3, 64, 64), 15)
    meta = {"step": 0, "run_id": "t", "env": "procgen:coinrun",
            "env_options": {"distribution_mode": "easy"}}  # fmt: skip
    return save_checkpoint(run, policy, meta)


@pytest.mark.integration
def test_probe_suite_labels_every_coinrun_feature_from_recorded_states(tmp_path):
    """A real probe of a CoinRun interpretable policy: labels come from the recorded game states."""
    from probes.suite import ProbeConfig, run_suite

    ckpt = untrained_coinrun_checkpoint(tmp_path / "run")
    config = ProbeConfig(num_envs=2, num_steps=16, ig_samples=8, smoothgrad_copies=2,
                         nmf_components=3)  # fmt: skip
    summary = run_suite(ckpt, tmp_path / "probe", config)
    nmf = summary["nmf"]
    assert nmf["classes"][0] == "background" and "saw" in nmf["classes"]
    assert len(nmf["labels"]) == 3
    for k, label in enumerate(nmf["labels"]):
        assert label["feature"] == k and label["label"] in nmf["classes"]
        assert sum(label["total"].values()) == pytest.approx(1.0, abs=1e-5)
        assert label["share"] == max(label["total"].values())
        assert sum(label["activation"].values()) == pytest.approx(1.0, abs=1e-5)
    saved = json.loads((tmp_path / "probe" / "summary.json").read_text())
    assert saved["nmf"]["labels"] == nmf["labels"]
    # the label is an edit direction: `loupe edit --direction label:NAME`
    from loupe.cli import main

    name = nmf["labels"][0]["label"]
    best = max((f for f in nmf["labels"] if f["label"] == name), key=lambda f: f["share"])[
        "feature"
    ]
    summary_path = tmp_path / "probe" / "summary.json"
    argv = ["edit", "--checkpoint", str(ckpt), "--layer", "2b", "--nmf", str(summary_path),
            "--direction", f"label:{name}", "--out", str(tmp_path / "edited")]  # fmt: skip
    assert main(argv) == 0
    (edited,) = (tmp_path / "edited").rglob("ckpt-*[0-9].json")
    provenance = json.loads(edited.read_text())["edit"]
    assert provenance["direction_source"].startswith(f"label:{name} = nmf:{best} ")
    np.testing.assert_allclose(provenance["direction"], nmf["directions"][best], rtol=1e-6)
    missing = "lava" if name != "lava" else "saw"
    argv[argv.index(f"label:{name}")] = f"label:{missing}"
    argv[-1] = str(tmp_path / "edited2")
    assert main(argv) == 2 and not (tmp_path / "edited2").exists()


@pytest.mark.unit
def test_summary_direction_by_index_and_by_label():
    from probes.editing import summary_direction

    labels = [
        {
            "feature": k,
            "label": name,
            "share": share,
            "positive": {},
            "negative": {},
            "total": {},
            "activation": None,
        }  # fmt: skip
        for k, (name, share) in enumerate([("saw", 0.4), ("wall", 0.9), ("saw", 0.7)])
    ]
    summary = {"layer": "2b", "nmf": {"directions": [[1, 0], [0, 1], [1, 1]], "labels": labels}}
    d, source = summary_direction(summary, "label:saw", "2b")
    assert d.tolist() == [1, 1] and source == "label:saw = nmf:2 (share 0.70)"
    d, source = summary_direction(summary, "nmf:1", "2b")
    assert d.tolist() == [0, 1] and source == "nmf:1"
    with pytest.raises(LoupeError, match="labels found: 0:saw"):
        summary_direction(summary, "label:enemy_left", "2b")
    with pytest.raises(LoupeError, match="choose nmf:0 .. nmf:2"):
        summary_direction(summary, "nmf:3", "2b")
    with pytest.raises(LoupeError, match="not 2a"):
        summary_direction(summary, "nmf:0", "2a")


@pytest.mark.unit
def test_choose_frames_makes_sure_of_rare_classes_and_spreads_the_rest():
    from probes.labels import choose_frames

    presence = np.zeros((100, 2), dtype=bool)
    presence[[7, 8, 60], 0] = True  # a rare class on 3 frames
    presence[::2, 1] = True  # a common one on every other frame
    got = choose_frames(presence, 10, 2)
    assert len(got) == 10 and list(got) == sorted(set(got.tolist()))
    assert presence[got, 0].sum() == 2 and {7, 60} <= set(got.tolist())  # the ends of its frames
    assert presence[got, 1].sum() >= 2
    # quota 0: the evenly spaced frames, as "even" chooses them
    np.testing.assert_array_equal(choose_frames(presence, 10, 0),
                                  np.linspace(0, 99, 10).astype(int))  # fmt: skip
    # a frame chosen for one class counts for the others it shows
    both = np.zeros((50, 2), dtype=bool)
    both[10, :] = True
    both[30:40, 1] = True
    got = choose_frames(both, 5, 1)
    assert 10 in got and both[got, 1].sum() == 1 + int(np.isin(np.arange(30, 40), got).sum())
    # more frames asked for than recorded: every frame; a class no frame shows gets none
    np.testing.assert_array_equal(choose_frames(np.zeros((6, 1), bool), 9, 3), np.arange(6))
    # every class at its quota when there is room: a slow check over random recordings
    rng = np.random.default_rng(0)
    for _ in range(50):
        p = rng.random((rng.integers(1, 200), 4)) < rng.random(4) * 0.1
        k = int(rng.integers(1, 64))
        got = choose_frames(p, k, k // 8)
        assert len(got) == min(k, len(p)) and len(set(got.tolist())) == len(got)
        for c in range(4):
            assert p[got, c].sum() >= min(k // 8, p[:, c].sum()), (c, k)


@pytest.mark.unit
def test_probe_frames_setting_is_checked():
    from probes.suite import ProbeConfig

    with pytest.raises(LoupeError, match="probe frames must be one of even, hazards"):
        ProbeConfig(frames="rare")


@pytest.mark.integration
def test_hazard_frames_are_chosen_from_the_recorded_game_states(tmp_path):
    """A real CoinRun probe with frames "hazards": the counts it reports equal a slow recount of
    the same recording's game states, every hazard gets its quota of the attributed frames where
    the recording has them, and a non-CoinRun checkpoint is refused before anything is written."""
    from actors.coinrun_masks import CLASS_INDEX, class_masks
    from actors.coinrun_state import CoinRunState
    from learner.checkpoint import load_checkpoint, save_checkpoint
    from probes.suite import HAZARDS, ProbeConfig, record_with_states, run_suite

    ckpt = untrained_coinrun_checkpoint(tmp_path / "run")
    config = ProbeConfig(num_envs=16, num_steps=16, ig_samples=16, smoothgrad_copies=1,
                         nmf_components=2, frames="hazards")  # fmt: skip
    summary = run_suite(ckpt, tmp_path / "probe", config)
    frames = summary["frames"]
    assert frames["selection"] == "hazards" and frames["recorded"] == 256
    assert summary["ig_observations"] == 16
    # the same recording again (same seeds), counted frame by frame
    loaded, meta = load_checkpoint(ckpt)
    _, states = record_with_states(loaded, meta, config, range(16))
    counts = {c: 0 for c in HAZARDS}
    for t in range(16):
        for s in states[t]:
            masks = class_masks(CoinRunState.parse(s))
            for c in HAZARDS:
                counts[c] += bool(masks[CLASS_INDEX[c]].any())
    assert frames["recorded_showing"] == counts
    assert counts["saw"] > 0  # saws are in most levels: the choice had something to do
    for c in HAZARDS:
        assert frames["attributed_showing"][c] >= min(16 // 8, counts[c]), c
    # Atari or another procgen game has no such state: refused, nothing written
    other = save_checkpoint(tmp_path / "bigfish", loaded, {**meta, "env": "procgen:bigfish"})
    with pytest.raises(LoupeError, match="use frames 'even'"):
        run_suite(other, tmp_path / "other", config)
    assert not (tmp_path / "other").exists()
