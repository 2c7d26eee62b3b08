"""Attention maps (METHODS A): input-sized overlay, entropy, and the attention-peak tree.

    overlay = attention_overlay(policy(obs).attention)    # (N, 84, 84) in [0, 1]
    h = attention_entropy(policy(obs).attention)          # (N,), or (N, M) with per_map=True
    trees = peak_tree(region_policy, obs)                 # one JSON-ready list of roots per obs

The peak tree explains the region policy's attention bottom-up through c1 (k8 s4), c2 (k4 s2),
c3 (k3 s1), a1 (1x1), a2 (1x1). Roots are peaks of the attention maps; the children of a node
(layer L, channel c, position y, x) are peaks of the relevance R = |A * W_L[c]| over L's receptive
window A in the layer below, R normalised to sum 1. Two bugs of the original are fixed: ``select``
returns the real channel index (not the loop index), and a1's children read c3 after the L2
normalisation ("c3n", which is what a1 consumes). Since that normalisation rescales all channels of a
position by the same factor, it leaves the sum-normalised selection unchanged; it changes the
recorded activations and raw relevances of c3 nodes.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from attention.base import entropy
from loupe.errors import LoupeError
from probes.attribution import check_obs

#: the tree's layers bottom-up, with kernel size and stride of each
TREE_LAYERS = ("c1", "c2", "c3", "a1", "a2")
KERNELS = {"c1": 8, "c2": 4, "c3": 3, "a1": 1, "a2": 1}
STRIDES = {"c1": 4, "c2": 2, "c3": 1, "a1": 1, "a2": 1}


def _as_tensor(attn) -> torch.Tensor:
    attn = torch.as_tensor(attn).detach()
    if attn.dim() != 4:
        raise LoupeError(f"attention maps must be (N, M, h, w), got shape {tuple(attn.shape)}")
    return attn.to(torch.float64)


def attention_entropy(attn, per_map: bool = False) -> torch.Tensor:
    """Entropy -sum_pos p log p with p = attn + 1e-7 -> (N,) summed over maps, or (N, M)."""
    h = entropy(_as_tensor(attn).flatten(2), dims=(-1,))  # (N, M), float64
    return h if per_map else h.sum(-1)


def attention_overlay(attn, kernel: int = 36, stride: int = 8) -> np.ndarray:
    """(N, M, 7, 7) maps -> (N, 84, 84) overlay in [0, 1] (float64).

    Sum the maps, spread each cell over its 36x36 receptive field with a transposed convolution
    of ones (stride 8), clip at 0, divide by the max over frames of each frame's 99th percentile,
    clip to [0, 1]. Output size is (h - 1) * stride + kernel.
    """
    summed = _as_tensor(attn).sum(1, keepdim=True)  # (N, 1, h, w)
    ones = torch.ones(1, 1, kernel, kernel, dtype=torch.float64)
    up = F.conv_transpose2d(summed, ones, stride=stride)[:, 0].clamp(min=0).numpy()  # (N, H, W)
    scale = np.percentile(up.reshape(len(up), -1), 99, axis=1).max() if len(up) else 0.0
    return np.clip(up / scale if scale > 0 else up, 0.0, 1.0)


def upsample_map(amap, size: tuple[int, int]) -> np.ndarray:
    """Self-attention map as Sun et al. plot it: (N, 1, h, w) -> bilinear to ``size``, min-max
    normalised per frame -> (N, H, W)."""
    up = F.interpolate(_as_tensor(amap), size=size, mode="bilinear", align_corners=False)[:, 0]
    lo = up.flatten(1).amin(1).view(-1, 1, 1)
    hi = up.flatten(1).amax(1).view(-1, 1, 1)
    return ((up - lo) / (hi - lo).clamp(min=1e-12)).numpy()


# -- attention-peak tree --------------------------------------------------------------------------


def top_x(k: int) -> int:
    """How many nodes a selection keeps in a layer of kernel size k."""
    return math.floor(4 * math.exp(-0.1 * k) + 2)


def peaks(k: int) -> int:
    """How many peak positions per channel a selection considers in a layer of kernel size k."""
    return math.floor(2 * math.exp(0.06 * k))


def receptive_fields() -> dict[str, tuple[int, int]]:
    """Layer -> (receptive size, stride) in input pixels: c1 (8, 4), c2 (20, 8), c3..a2 (36, 8)."""
    size, stride, out = 1, 1, {}
    for name in TREE_LAYERS:
        size, stride = size + (KERNELS[name] - 1) * stride, stride * STRIDES[name]
        out[name] = (size, stride)
    return out


def node_centre(layer: str, idx: int) -> float:
    """Input-pixel centre of index ``idx`` of ``layer`` along one axis:
    ((k - 1) / 2 + s * idx) * prev_stride + (prev_size - 1) / 2."""
    i = TREE_LAYERS.index(layer)
    prev_size, prev_stride = receptive_fields()[TREE_LAYERS[i - 1]] if i else (1, 1)
    return ((KERNELS[layer] - 1) / 2 + STRIDES[layer] * idx) * prev_stride + (prev_size - 1) / 2


def select(
    relevance: torch.Tensor, k: int, top_x: int, top_f: int = 3
) -> list[tuple[int, int, int, float]]:
    """Peaks of a relevance map R (C, h, w) -> [(channel, y, x, score)], best first.

    The top_f channels by spatial max; in each, its top k positions; score R^2; the best top_x.
    Channels are the real indices into R. Positions with zero relevance are never selected.
    """
    c, h, w = relevance.shape
    flat = relevance.reshape(c, h * w)
    maxima = flat.amax(1)  # (C,)
    channels = _descending(maxima)[: min(top_f, c)]
    candidates = []
    for ch in channels:
        for pos in _descending(flat[ch])[: min(k, h * w)]:
            value = float(flat[ch, pos])
            if value != 0.0:
                candidates.append((int(ch), int(pos) // w, int(pos) % w, value * value))
    candidates.sort(key=lambda cand: -cand[3])  # stable: ties keep channel / position order
    return candidates[:top_x]


def _descending(values: torch.Tensor) -> list[int]:
    return np.argsort(-values.detach().cpu().numpy(), kind="stable").tolist()


def _require_region(policy) -> None:
    missing = [n for n in ("c1", "c2", "c3", "a1", "a2") if not hasattr(policy, n)]
    if missing or "c3n" not in getattr(policy, "layer_names", ()):
        name = getattr(policy, "spec", {}).get("name", type(policy).__name__)
        raise LoupeError(
            f"peak_tree needs a region-attention policy (modules c1, c2, c3, a1, a2 and layer "
            f"c3n); {name} is not one: build it with build_policy('region', ...)"
        )


@torch.no_grad()
def _tree_inputs(policy, obs: torch.Tensor) -> dict[str, Any]:
    """Per layer: the activation that layer's nodes report and that the layer above reads."""
    acts = policy.activations(obs)
    a1 = F.elu(policy.a1(acts["c3n"]))  # (N, 512, h, w)
    attention, _ = policy.attention_maps(acts["c3n"])  # (N, M, h, w), no second forward pass
    return {
        "act": {"c1": acts["c1"], "c2": acts["c2"], "c3": acts["c3n"], "a1": a1, "a2": attention},
        "weight": {n: getattr(policy, n).weight.detach() for n in ("c2", "c3", "a1", "a2")},
    }


def peak_tree(policy, obs: torch.Tensor, top_f: int = 3) -> list[list[dict[str, Any]]]:
    """Attention-peak trees of a region policy for N observations -> N lists of root nodes.

    A node is a JSON-serialisable dict: layer, channel, y, x (layer grid), centre [y, x] and size
    (receptive field in input pixels), activation (the layer's value there; c3 after the L2
    normalisation), relevance (R before normalising to sum 1; attention for roots), score (R^2 of the
    normalised R), children.
    """
    _require_region(policy)
    obs = check_obs(policy, obs)
    inputs = _tree_inputs(policy, obs)
    trees = []
    for n in range(obs.shape[0]):
        attn = inputs["act"]["a2"][n]  # (M, h, w)
        roots = select(attn, peaks(KERNELS["a2"]), top_x(KERNELS["a2"]), top_f)
        trees.append(
            [
                _node(inputs, n, "a2", ch, y, x, score, float(attn[ch, y, x]), top_f)
                for ch, y, x, score in roots
            ]
        )
    return trees


def _node(inputs, n, layer, channel, y, x, score, relevance, top_f) -> dict[str, Any]:
    size, _ = receptive_fields()[layer]
    node = {
        "layer": layer,
        "channel": channel,
        "y": y,
        "x": x,
        "centre": [node_centre(layer, y), node_centre(layer, x)],
        "size": size,
        "activation": float(inputs["act"][layer][n, channel, y, x]),
        "relevance": relevance,
        "score": score,
        "children": [],
    }
    if layer != "c1":
        node["children"] = _children(inputs, n, layer, channel, y, x, top_f)
    return node


def _children(inputs, n, layer, channel, y, x, top_f) -> list[dict[str, Any]]:
    below = TREE_LAYERS[TREE_LAYERS.index(layer) - 1]
    k, s = KERNELS[layer], STRIDES[layer]
    y0, x0 = s * y, s * x
    window = inputs["act"][below][n, :, y0 : y0 + k, x0 : x0 + k]  # (C_below, k, k)
    raw = (window * inputs["weight"][layer][channel]).abs()  # (C_below, k, k)
    total = raw.sum()
    rel = raw / total if total > 0 else raw
    chosen = select(rel, peaks(KERNELS[below]), top_x(KERNELS[below]), top_f)
    return [
        _node(inputs, n, below, ch, y0 + dy, x0 + dx, score, float(raw[ch, dy, dx]), top_f)
        for ch, dy, dx, score in chosen
    ]
