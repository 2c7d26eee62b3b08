"""Attention overlay, entropy and the attention-peak tree against slow references and closed forms."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attention import build_policy
from loupe.errors import LoupeError
from probes.attention_maps import (
    attention_entropy,
    attention_overlay,
    node_centre,
    peak_tree,
    peaks,
    receptive_fields,
    select,
    top_x,
    upsample_map,
)


def overlay_reference(attn: np.ndarray) -> np.ndarray:
    n, _, h, w = attn.shape
    summed = attn.sum(1)
    up = np.zeros((n, (h - 1) * 8 + 36, (w - 1) * 8 + 36))
    for k in range(n):
        for i in range(h):
            for j in range(w):
                up[k, 8 * i : 8 * i + 36, 8 * j : 8 * j + 36] += summed[k, i, j]
    up = np.maximum(up, 0)
    scale = max(np.percentile(frame, 99) for frame in up)
    return np.clip(up / scale, 0, 1)


@pytest.mark.unit
def test_overlay_matches_a_slow_loop():
    rng = np.random.default_rng(0)
    attn = rng.normal(size=(3, 2, 7, 7)) + 0.3  # negative cells exercise the clip at 0
    attn[1] *= 4.0  # the brightest frame sets the scale
    got = attention_overlay(torch.from_numpy(attn))
    assert got.shape == (3, 84, 84)
    np.testing.assert_allclose(got, overlay_reference(attn), rtol=1e-12, atol=1e-12)
    assert got.min() >= 0 and got.max() == 1.0
    softmax = torch.softmax(torch.randn(2, 2, 49), -1).view(2, 2, 7, 7)
    np.testing.assert_allclose(attention_overlay(softmax), overlay_reference(softmax.numpy()))


@pytest.mark.unit
def test_entropy_closed_form_and_loop():
    uniform = torch.full((2, 2, 7, 7), 1 / 49)
    h = attention_entropy(uniform)
    p = 1 / 49 + 1e-7
    assert h.shape == (2,)
    torch.testing.assert_close(h, torch.full((2,), -2 * 49 * p * math.log(p), dtype=torch.float64))
    assert h[0].item() == pytest.approx(2 * math.log(49), abs=1e-4)  # 7.784
    attn = torch.softmax(torch.randn(3, 2, 49), -1).view(3, 2, 7, 7)
    per_map = attention_entropy(attn, per_map=True)
    for n in range(3):
        for m in range(2):
            ref = -sum((q + 1e-7) * math.log(q + 1e-7) for q in attn[n, m].flatten().tolist())
            assert per_map[n, m].item() == pytest.approx(ref, rel=1e-6)
    peaked = torch.zeros(1, 2, 7, 7)
    peaked[0, :, 3, 3] = 1.0
    assert attention_entropy(peaked).item() < 1e-3


@pytest.mark.unit
def test_upsample_map_min_max():
    amap = torch.rand(2, 1, 20, 20)
    up = upsample_map(amap, (84, 84))
    assert up.shape == (2, 84, 84)
    np.testing.assert_allclose(up.reshape(2, -1).min(1), 0, atol=1e-12)
    np.testing.assert_allclose(up.reshape(2, -1).max(1), 1, atol=1e-12)


@pytest.mark.unit
def test_selection_sizes_and_receptive_fields():
    assert [top_x(k) for k in (8, 4, 3, 1)] == [3, 4, 4, 5]
    assert [peaks(k) for k in (8, 4, 3, 1)] == [3, 2, 2, 2]
    fields = receptive_fields()
    assert [fields[n] for n in ("c1", "c2", "c3", "a1", "a2")] == [
        (8, 4), (20, 8), (36, 8), (36, 8), (36, 8)
    ]  # fmt: skip
    # brute force: the pixel span of a unit, composed through the convolutions
    convs = {"c1": (8, 4), "c2": (4, 2), "c3": (3, 1), "a1": (1, 1), "a2": (1, 1)}
    order = list(convs)
    for layer in order:
        for idx in range(4):
            lo, hi = idx, idx
            for name in reversed(order[: order.index(layer) + 1]):
                k, s = convs[name]
                lo, hi = s * lo, s * hi + k - 1
            assert node_centre(layer, idx) == (lo + hi) / 2


@pytest.mark.unit
def test_select_returns_the_real_channel_index():
    r = torch.zeros(6, 3, 3)
    r[5, 0, 1], r[5, 2, 2] = 0.9, 0.2
    r[3, 1, 1], r[3, 0, 0] = 0.8, 0.7
    r[4, 2, 0] = 0.5
    r[0, 0, 0] = 0.1  # the loop indices 0..2 would point at channels 0, 1, 2
    got = select(r, k=2, top_x=4, top_f=3)
    assert [(c, y, x) for c, y, x, _ in got] == [(5, 0, 1), (3, 1, 1), (3, 0, 0), (4, 2, 0)]
    np.testing.assert_allclose([s for *_, s in got], [0.81, 0.64, 0.49, 0.25], rtol=1e-6)
    assert select(r, k=1, top_x=10, top_f=2) == [(5, 0, 1, got[0][3]), (3, 1, 1, got[1][3])]


# -- full tree against an independent reference ------------------------------------------------


def reference_activations(policy, x):
    """Plain forward through the region modules (not the policy's stage machinery)."""
    with torch.no_grad():
        c1 = F.relu(F.conv2d(x, policy.c1.weight, policy.c1.bias, stride=4))
        c2 = F.relu(F.conv2d(c1, policy.c2.weight, policy.c2.bias, stride=2))
        c3 = F.relu(F.conv2d(c2, policy.c3.weight, policy.c3.bias))
        c3n = c3 / c3.norm(dim=1, keepdim=True).clamp(min=1e-12)
        a1 = F.elu(F.conv2d(c3n, policy.a1.weight, policy.a1.bias))
        logits = F.conv2d(a1, policy.a2.weight, policy.a2.bias)
        attn = torch.softmax(logits.flatten(2), -1).view_as(logits)
    return {"c1": c1, "c2": c2, "c3": c3n, "c3_pre": c3, "a1": a1, "a2": attn}


def reference_select(r: np.ndarray, k: int, keep: int, top_f: int = 3):
    c, h, w = r.shape
    chans = sorted(range(c), key=lambda ch: -r[ch].max())[:top_f]
    cands = []
    for ch in chans:
        cells = sorted(((r[ch, i, j], i, j) for i in range(h) for j in range(w)), reverse=True)
        cands += [(ch, i, j, v * v) for v, i, j in cells[:k] if v != 0]
    return sorted(cands, key=lambda t: -t[3])[:keep]


def reference_tree(acts, weights, n):
    geometry = {"c1": (8, 4), "c2": (4, 2), "c3": (3, 1), "a1": (1, 1), "a2": (1, 1)}
    order = list(geometry)

    def build(layer, ch, y, x):
        if layer == "c1":
            return {"layer": layer, "channel": ch, "y": y, "x": x, "children": []}
        below = order[order.index(layer) - 1]
        k, s = geometry[layer]
        win = acts[below][n, :, s * y : s * y + k, s * x : s * x + k].numpy()
        rel = np.abs(win * weights[layer][ch].numpy())
        rel = rel / rel.sum()
        kb = geometry[below][0]
        chosen = reference_select(rel, math.floor(2 * math.exp(0.06 * kb)), top_x(kb))
        kids = [build(below, c, s * y + i, s * x + j) for c, i, j, _ in chosen]
        return {"layer": layer, "channel": ch, "y": y, "x": x, "children": kids}

    roots = reference_select(acts["a2"][n].numpy(), 2, 5)
    return [build("a2", c, i, j) for c, i, j, _ in roots]


def strip(nodes):
    keys = ("layer", "channel", "y", "x")
    return [{**{k: n[k] for k in keys}, "children": strip(n["children"])} for n in nodes]


def walk(nodes):
    for n in nodes:
        yield n
        yield from walk(n["children"])


@pytest.fixture(scope="module")
def region():
    torch.manual_seed(0)
    policy = build_policy("region", (4, 84, 84), 4).double()
    obs = torch.rand(2, 4, 84, 84, dtype=torch.float64)
    return policy, obs


@pytest.mark.unit
def test_tree_matches_an_independent_reference(region):
    policy, obs = region
    trees = peak_tree(policy, obs)
    acts = reference_activations(policy, obs)
    weights = {n: getattr(policy, n).weight.detach() for n in ("c2", "c3", "a1", "a2")}
    for n in range(2):
        assert strip(trees[n]) == strip(reference_tree(acts, weights, n))
        nodes = list(walk(trees[n]))
        assert {m["layer"] for m in nodes} == {"c1", "c2", "c3", "a1", "a2"}
        for m in nodes:
            a = acts[m["layer"]][n, m["channel"], m["y"], m["x"]].item()
            assert m["activation"] == pytest.approx(a, rel=1e-9, abs=1e-12)
            assert m["centre"] == [node_centre(m["layer"], m["y"]), node_centre(m["layer"], m["x"])]
    assert json.loads(json.dumps(trees)) == trees


@pytest.mark.unit
def test_tree_reports_real_channels(region):
    policy, obs = region
    policy = build_policy("region", (4, 84, 84), 4).double()
    policy.load_state_dict(region[0].state_dict())
    with torch.no_grad():
        policy.a2.weight.zero_()
        policy.a2.weight[:, 300:303] = torch.tensor([3.0, -2.0, 1.0]).view(1, 3, 1, 1)
    trees = peak_tree(policy, obs[:1])
    a1_nodes = [m for m in walk(trees[0]) if m["layer"] == "a1"]
    assert a1_nodes and {m["channel"] for m in a1_nodes} <= {300, 301, 302}
    assert {m["channel"] for m in a1_nodes} != {0, 1, 2}
    a1 = reference_activations(policy, obs[:1])["a1"]
    for root in trees[0]:
        rel = (a1[0, :, root["y"], root["x"]] * policy.a2.weight[root["channel"], :, 0, 0]).abs()
        for child in root["children"]:
            assert child["score"] == pytest.approx((rel[child["channel"]] / rel.sum()).item() ** 2)


@pytest.mark.unit
def test_a1_children_read_c3_after_normalisation(region):
    policy = build_policy("region", (4, 84, 84), 4).double()
    policy.load_state_dict(region[0].state_dict())
    with torch.no_grad():
        policy.c3.weight.mul_(25.0)  # c3 norms far from 1: pre- and post-normalisation differ
    obs = region[1][:1]
    acts = reference_activations(policy, obs)
    c3_nodes = [m for m in walk(peak_tree(policy, obs)[0]) if m["layer"] == "c3"]
    assert c3_nodes
    for m in c3_nodes:
        at = (0, m["channel"], m["y"], m["x"])
        post, pre = acts["c3"][at].item(), acts["c3_pre"][at].item()
        assert abs(pre - post) > 0.1 * abs(pre)  # the two readings really differ here
        assert m["activation"] == pytest.approx(post, rel=1e-9)
    parents = [m for m in walk(peak_tree(policy, obs)[0]) if m["layer"] == "a1"]
    for parent in parents:
        for child in parent["children"]:
            w = policy.a1.weight[parent["channel"], child["channel"], 0, 0].item()
            post = acts["c3"][0, child["channel"], child["y"], child["x"]].item()
            assert child["relevance"] == pytest.approx(abs(post * w), rel=1e-9)


@pytest.mark.unit
def test_bad_input():
    nature = build_policy("nature", (4, 84, 84), 4)
    with pytest.raises(LoupeError, match="region-attention policy"):
        peak_tree(nature, torch.zeros(1, 4, 84, 84, dtype=torch.uint8))
    region = build_policy("region", (4, 84, 84), 4)
    with pytest.raises(LoupeError, match=r"\(N, 4, 84, 84\)"):
        peak_tree(region, torch.zeros(1, 3, 84, 84))
    with pytest.raises(LoupeError, match=r"\(N, M, h, w\)"):
        attention_overlay(torch.zeros(7, 7))
