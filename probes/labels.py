"""Automatic feature labels: which game objects an NMF feature's attribution falls on.

The seed article named its features by eye ("buzzsaw obstacle", "enemy moving left"). Here the game
state says where each object class is drawn (``actors.coinrun_masks``: per-position class shares at
the analysis layer), so a feature can be labelled by measurement. For feature k with maps
f (N, h, w) >= 0 (its positive attribution, its negative attribution, or its activation):

    share[k, c] = sum_{n,y,x} f[n, y, x] * mask[n, c, y, x] / sum_{n,y,x} f[n, y, x]

Each position's class shares sum to 1, so each feature's shares over the classes sum to 1. The label
is the class with the largest share of the feature's whole attribution, good news plus bad news
(|t| = max(t, 0) + max(-t, 0)), reported with that share. Large classes (background, walls) take
large shares by area alone, so each class's ``area`` (its share of all positions) and each
feature's ``lift`` (share / area) are reported beside them: a saw detector puts many times more
of its attribution on saws than their area would.

    labels = label_features(t, masks, classes, activation=a)   # t: (N, K, h, w) NMF feature maps
    labels[0].label, labels[0].share                            # e.g. "saw", 0.71
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from loupe.errors import LoupeError


def class_shares(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(K, C) share of each feature's mass that falls on each class.

    ``maps`` (N, K, h, w) non-negative feature maps, ``masks`` (N, C, h, w) class shares per
    position. A feature with no mass at all gets shares of 0.
    """
    maps, masks = np.asarray(maps, dtype=np.float64), np.asarray(masks, dtype=np.float64)
    if maps.ndim != 4 or masks.ndim != 4:
        raise LoupeError(
            f"need (N, K, h, w) feature maps and (N, C, h, w) masks, got {maps.shape} and "
            f"{masks.shape}"
        )
    n, _, h, w = maps.shape
    if masks.shape[0] != n or masks.shape[2:] != (h, w):
        raise LoupeError(
            f"feature maps {maps.shape} and masks {masks.shape} differ in frames or positions; "
            "pool the masks to the layer's positions (actors.coinrun_masks.pool_masks)"
        )
    if (maps < 0).any():
        raise LoupeError("feature maps must be non-negative; split signed maps into parts")
    mass = np.einsum("nkyx,ncyx->kc", maps, masks)  # (K, C)
    total = maps.sum(axis=(0, 2, 3))  # (K,)
    with np.errstate(invalid="ignore", divide="ignore"):
        shares = np.where(total[:, None] > 0, mass / total[:, None], 0.0)
    return shares


@dataclasses.dataclass
class FeatureLabel:
    """What one feature is about, measured against the game state."""

    #: feature index
    feature: int
    #: the class with the largest share of the feature's whole attribution
    label: str
    #: that share, in [0, 1]
    share: float
    #: share per class of the positive attribution ("good news")
    positive: dict[str, float]
    #: share per class of the negative attribution ("bad news")
    negative: dict[str, float]
    #: share per class of the whole attribution (positive + negative)
    total: dict[str, float]
    #: share per class of the feature's activation, where given
    activation: dict[str, float] | None = None
    #: share per class of all positions over the frames (what a feature spread evenly would get)
    area: dict[str, float] | None = None
    #: total share / area per class: how much more of the attribution falls on the class than
    #: its area alone gives (1 = none; a small object's detector scores far above 1); 0 where the
    #: class covers nothing
    lift: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def label_features(
    features: np.ndarray,
    masks: np.ndarray,
    classes: Sequence[str],
    activation: np.ndarray | None = None,
) -> list[FeatureLabel]:
    """Label each of the K features of signed NMF feature maps ``features`` (N, K, h, w).

    ``masks`` (N, C, h, w) are the class shares at the same positions, ``classes`` their C names,
    ``activation`` optional (N, K, h, w) non-negative feature activations.
    """
    features = np.asarray(features, dtype=np.float64)
    if len(classes) != np.shape(masks)[1]:
        raise LoupeError(f"{len(classes)} class names for masks of {np.shape(masks)[1]} classes")
    pos, neg = np.maximum(features, 0.0), np.maximum(-features, 0.0)
    parts = {
        "positive": class_shares(pos, masks),
        "negative": class_shares(neg, masks),
        "total": class_shares(pos + neg, masks),
    }
    act = class_shares(np.maximum(activation, 0.0), masks) if activation is not None else None
    area = np.asarray(masks, dtype=np.float64).mean(axis=(0, 2, 3))  # (C,)
    with np.errstate(invalid="ignore", divide="ignore"):
        lift = np.where(area > 0, parts["total"] / np.where(area > 0, area, 1.0), 0.0)  # (K, C)
    names = list(classes)
    labels = []
    for k in range(features.shape[1]):
        best = int(np.argmax(parts["total"][k]))
        labels.append(
            FeatureLabel(
                feature=k,
                label=names[best],
                share=round(float(parts["total"][k, best]), 6),
                positive=_named(parts["positive"][k], names),
                negative=_named(parts["negative"][k], names),
                total=_named(parts["total"][k], names),
                activation=_named(act[k], names) if act is not None else None,
                area=_named(area, names),
                lift=_named(lift[k], names),
            )
        )
    return labels


def _named(row: np.ndarray, names: list[str]) -> dict[str, float]:
    return {name: round(float(v), 6) for name, v in zip(names, row)}


def find_label(labels: Sequence[FeatureLabel], name: str, min_share: float = 0.0) -> FeatureLabel:
    """The feature labelled ``name`` with the largest share; LoupeError listing the labels found."""
    matches = [f for f in labels if f.label == name and f.share >= min_share]
    if not matches:
        found = ", ".join(f"{f.feature}:{f.label} ({f.share:.2f})" for f in labels) or "none"
        raise LoupeError(
            f"no feature is labelled {name!r}"
            + (f" with share >= {min_share}" if min_share else "")
            + f"; labels found: {found}"
        )
    return max(matches, key=lambda f: f.share)


def choose_frames(presence: np.ndarray, k: int, quota: int) -> np.ndarray:
    """``k`` frames of a recording, making sure of rare objects: sorted frame indices.

    ``presence`` (F, H) bool says which frames show each of H object classes (e.g. the hazards).
    Rarest class first, each class gets up to ``quota`` frames that show it, counting those
    already chosen for another class (evenly spaced among the frames that show it); the rest of
    the ``k`` are spread evenly over the frames not chosen yet. A class that no frame shows gets
    none; with ``quota`` 0 this is the evenly spaced choice of frames.
    """
    presence = np.asarray(presence, dtype=bool)
    n = presence.shape[0]
    k = min(k, n)
    chosen = np.zeros(n, dtype=bool)

    def spread(candidates: np.ndarray, take: int) -> None:
        if take > 0 and len(candidates):
            take = min(take, len(candidates))
            chosen[candidates[np.linspace(0, len(candidates) - 1, take).astype(int)]] = True

    for c in np.argsort(presence.sum(0), kind="stable"):
        have = int((chosen & presence[:, c]).sum())
        room = k - int(chosen.sum())
        spread(np.flatnonzero(presence[:, c] & ~chosen), min(quota - have, room))
    spread(np.flatnonzero(~chosen), k - int(chosen.sum()))
    return np.flatnonzero(chosen)
