"""Where each object of a CoinRun state is drawn: per-pixel class masks from the game state.

procgen draws a CoinRun frame with a camera centred on the agent (``center_agent``, the default) that
shows ``visibility`` grid cells across (13 in CoinRun). A world point (x, y), y up, lands on the
pixel (procgen ``BasicAbstractGame::get_screen_rect`` and ``prepare_for_drawing``)

    unit = size / visibility                     # pixels per grid cell
    px   = (x - cx) * unit + size / 2            # cx, cy: the camera centre (the agent)
    py   = (cy - y) * unit + size / 2

An entity covers the box ``[x - rx, x + rx] x [y - ry, y + ry]``; grid cell (i, j) the unit square
with corner (i, j), grown by procgen's render epsilon 0.02. procgen paints the background, entities
with ``render_z = -1``, the grid, entities with ``render_z`` 0 then 1, and last the two velocity
patches (``paint_vel_info``) in the top-left corner. ``class_masks`` paints the same boxes in the same
order at 4x supersampling and averages, so each pixel gets the share of its area that each class
covers (the shares sum to 1). Boxes are the sprites' bounding boxes: the transparent corners of a
sprite count for its class.

    masks = class_masks(CoinRunState.parse(env.get_state()[0]))    # (C, 64, 64), C = len(CLASSES)
    layer = pool_masks(masks, (16, 16))                               # shares per layer position
"""

from __future__ import annotations

import dataclasses

import numpy as np

from actors.coinrun_state import (
    CRATE,
    ENEMY,
    GOAL,
    LAVA,
    PLAYER,
    SAW,
    TRAIL,
    WALLS,
    CoinRunState,
    Entity,
)
from actors.failure import enemy_group
from loupe.errors import LoupeError

#: object classes, in mask order; "background" is what no object covers
CLASSES = (
    "background",
    "wall",
    "lava",
    "coin",
    "saw",
    "enemy_left",
    "enemy_right",
    "agent",
    "velocity",
)
CLASS_INDEX = {name: i for i, name in enumerate(CLASSES)}

#: procgen's RENDER_EPS: grid cells are drawn this much larger on every side
RENDER_EPS = 0.02
#: supersampling per pixel side for the area shares
SUPERSAMPLE = 4


@dataclasses.dataclass(frozen=True)
class Camera:
    """The world-to-pixel transform of one frame of ``size`` x ``size`` pixels."""

    #: camera centre in world cells (x right, y up)
    cx: float
    cy: float
    #: grid cells across the frame
    visibility: float
    #: frame side in pixels
    size: int = 64

    @property
    def unit(self) -> float:
        """Pixels per grid cell."""
        return self.size / self.visibility

    def to_pixels(self, x: float, y: float) -> tuple[float, float]:
        """World point -> (column, row) in pixels, fractional, row 0 at the top."""
        return (
            (x - self.cx) * self.unit + self.size / 2,
            (self.cy - y) * self.unit + self.size / 2,
        )

    def box(self, left: float, bottom: float, right: float, top: float) -> tuple[float, ...]:
        """World box -> pixel box (col0, row0, col1, row1), fractional, not clipped."""
        c0, r0 = self.to_pixels(left, top)
        c1, r1 = self.to_pixels(right, bottom)
        return c0, r0, c1, r1


def camera(state: CoinRunState, size: int = 64) -> Camera:
    """The camera procgen uses to draw ``state`` at ``size`` pixels (``prepare_for_drawing``)."""
    if size <= 0:
        raise LoupeError(f"frame size must be positive, got {size}")
    if int(state.game["center_agent"]):
        agent = state.agent
        return Camera(agent.x, agent.y, float(state.world["visibility"]), size)
    w, h = int(state.world["main_width"]), int(state.world["main_height"])
    visibility = max(w, h, float(state.world["min_visibility"]))
    return Camera(w / 2, h / 2, float(visibility), size)


def entity_class(entity: Entity, state: CoinRunState) -> str | None:
    """The class an entity is drawn as, or None for what draws nothing of interest."""
    if entity.type == PLAYER:
        return "agent"
    if entity.type == SAW:
        return "saw"
    if entity.type == ENEMY:
        return enemy_group(entity)
    if entity.type == CRATE:
        return "wall"
    if entity.type == TRAIL:
        owner = _trail_owner(entity, state)
        return enemy_group(owner) if owner is not None else None
    return None


def _trail_owner(trail: Entity, state: CoinRunState) -> Entity | None:
    """The enemy that left a trail: the nearest enemy within 1.5 cells (trails stay 8 steps)."""
    best, best_d = None, 1.5
    for e in state.entities_of(ENEMY):
        d = abs(e.x - trail.x) + abs(e.y - trail.y)
        if d < best_d:
            best, best_d = e, d
    return best


def _cell_class(value: int) -> str | None:
    if value in WALLS:
        return "wall"
    if value in LAVA:
        return "lava"
    if value == GOAL:
        return "coin"
    return None  # SPACE, enemy barriers and anything procgen does not draw


def draw_list(state: CoinRunState, cam: Camera) -> list[tuple[str, tuple[float, ...]]]:
    """(class, pixel box) of everything drawn, in procgen's painting order."""
    items: list[tuple[str, tuple[float, ...]]] = []

    def entities(render_z: int) -> None:
        for e in state.entities:
            if e.render_z != render_z or e.alpha <= 0:
                continue
            name = entity_class(e, state)
            if name is not None:
                items.append((name, cam.box(e.x - e.rx, e.y - e.ry, e.x + e.rx, e.y + e.ry)))

    entities(-1)
    margin = cam.visibility / 2 + 1
    i0, i1 = int(cam.cx - margin), int(cam.cx + margin)
    j0, j1 = int(cam.cy - margin), int(cam.cy + margin)
    for i in range(max(i0, 0), min(i1, state.width - 1) + 1):
        for j in range(max(j0, 0), min(j1, state.height - 1) + 1):
            name = _cell_class(int(state.grid[j, i]))
            if name is not None:
                e = RENDER_EPS
                items.append((name, cam.box(i - e, j - e, i + 1 + e, j + 1 + e)))
    entities(0)
    entities(1)
    if int(state.game["paint_vel_info"]) and int(state.world["has_useful_vel_info"]):
        side = 0.2 * cam.size
        items.append(("velocity", (0.0, 0.0, 2 * side, side)))
    return items


def class_masks(state: CoinRunState, size: int = 64) -> np.ndarray:
    """(C, size, size) float32 share of each pixel's area covered by each class of ``CLASSES``."""
    cam = camera(state, size)
    s = SUPERSAMPLE
    labels = np.zeros((size * s, size * s), dtype=np.int8)  # background
    for name, (c0, r0, c1, r1) in draw_list(state, cam):
        # supersample pixels whose centre lies inside the box
        a0, a1 = _span(c0 * s, c1 * s, size * s)
        b0, b1 = _span(r0 * s, r1 * s, size * s)
        if a0 < a1 and b0 < b1:
            labels[b0:b1, a0:a1] = CLASS_INDEX[name]
    onehot = np.eye(len(CLASSES), dtype=np.float32)[labels]  # (S, S, C)
    shares = onehot.reshape(size, s, size, s, len(CLASSES)).mean(axis=(1, 3))
    return np.ascontiguousarray(shares.transpose(2, 0, 1))  # (C, size, size)


def _span(lo: float, hi: float, limit: int) -> tuple[int, int]:
    """Indices k with lo <= k + 0.5 < hi, clipped to [0, limit)."""
    return max(int(np.ceil(lo - 0.5)), 0), min(int(np.ceil(hi - 0.5)), limit)


def pool_masks(masks: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Average (..., C, H, W) shares down to (..., C, h, w) positions of an analysis layer.

    Position i of h covers rows floor(i H / h) .. ceil((i + 1) H / h) - 1 (adaptive average
    pooling, as torch's ``adaptive_avg_pool2d``): exact blocks when h divides H, overlapping bins
    otherwise (a 15 x 15 layer of a 64-pixel frame). Shares still sum to 1 per position.
    """
    masks = np.asarray(masks)
    h, w = shape
    if h <= 0 or w <= 0 or h > masks.shape[-2] or w > masks.shape[-1]:
        raise LoupeError(
            f"cannot pool {masks.shape[-2]}x{masks.shape[-1]} masks to {h}x{w} positions; "
            "the layer must be no larger than the frame"
        )
    rows = _bins(masks.shape[-2], h)  # (h, H)
    cols = _bins(masks.shape[-1], w)  # (w, W)
    return np.einsum("...yx,iy,jx->...ij", masks, rows, cols)


def _bins(size: int, n: int) -> np.ndarray:
    """(n, size) averaging weights of adaptive pooling from ``size`` to ``n``."""
    weights = np.zeros((n, size))
    for i in range(n):
        lo, hi = (i * size) // n, -((-(i + 1) * size) // n)
        weights[i, lo:hi] = 1.0 / (hi - lo)
    return weights


__all__ = [
    "CLASSES",
    "CLASS_INDEX",
    "Camera",
    "camera",
    "class_masks",
    "draw_list",
    "entity_class",
    "pool_masks",
]
