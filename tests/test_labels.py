"""Feature labels from class masks: constructed attributions with known answers, and a slow loop."""

from __future__ import annotations

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
