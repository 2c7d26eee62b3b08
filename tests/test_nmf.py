"""Attribution NMF: recovery of planted directions, transform/residual against plain loops, the
dataset-example selection rules, and the PNG/JSON artifacts."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.optimize import nnls

from attention import build_policy
from loupe.errors import LoupeError
from probes import render
from probes.attribution import IntegratedGradients
from probes.editing import edit_policy
from probes.nmf import (
    FeatureVisConfig,
    NMFConfig,
    dataset_example_image,
    dataset_examples,
    fit_attribution_nmf,
    overlay_colours,
    reuse_cap,
    spatial_example_image,
    spatial_examples,
    write_feature_visualisations,
)


def planted(seed: int = 0, n: int = 40, hw: int = 5):
    """Attributions built from 3 known non-negative directions over 6 channels, signs mixed."""
    rng = np.random.default_rng(seed)
    true = np.array(
        [[1, 0.5, 0, 0, 0, 0.2], [0, 1, 1, 0, 0, 0], [0, 0, 0.3, 1, 0.8, 0.0]], dtype=np.float64
    )
    codes = rng.random((n, 3, hw, hw)) ** 4  # sparse-ish non-negative codes
    attr = np.einsum("nkhw,kc->nchw", codes, true)
    attr[::2] *= -1  # negative attributions are factorised through the second half of the stack
    return true, attr


def unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# -- fitting, transform, residual ------------------------------------------------------------------


@pytest.mark.unit
def test_nmf_recovers_planted_directions_up_to_permutation_and_scale():
    true, attr = planted()
    nmf = fit_attribution_nmf(attr, n_components=3, seed=0)
    assert nmf.directions.shape == (3, 6) and (nmf.directions >= 0).all()
    cos = unit_rows(nmf.directions) @ unit_rows(true).T  # (found, true)
    best = max(itertools.permutations(range(3)), key=lambda p: sum(cos[i, p[i]] for i in range(3)))
    assert min(cos[i, best[i]] for i in range(3)) > 0.99
    # the signed features explain almost everything
    assert np.abs(nmf.residual(attr)).max() < 1e-2 * np.abs(attr).max()


@pytest.mark.unit
def test_transform_and_residual_against_plain_loops():
    rng = np.random.default_rng(1)
    attr = rng.normal(size=(3, 5, 2, 3))  # (N, C, H, W)
    nmf = fit_attribution_nmf(attr, n_components=2, seed=0)
    n, c, h, w = attr.shape
    # rows in the order (n, y, x), built one position at a time
    pos_rows = np.array([np.maximum(attr[i, :, y, x], 0) for i in range(n) for y in range(h) for x in range(w)])  # fmt: skip
    neg_rows = np.array([np.maximum(-attr[i, :, y, x], 0) for i in range(n) for y in range(h) for x in range(w)])  # fmt: skip
    codes = nmf.model.transform(pos_rows) - nmf.model.transform(neg_rows)  # (N H W, K)
    t0_ref = np.zeros((n, 2, h, w))
    residual_ref = np.zeros((n, h, w))
    d = nmf.directions
    for r, (i, y, x) in enumerate(itertools.product(range(n), range(h), range(w))):
        t0_ref[i, :, y, x] = codes[r]
        recon = np.maximum(codes[r], 0) @ d - np.maximum(-codes[r], 0) @ d
        residual_ref[i, y, x] = (attr[i, :, y, x] - recon).sum()
    np.testing.assert_allclose(nmf.transform_unscaled(attr), t0_ref, rtol=1e-10, atol=1e-12)
    scaled_ref = t0_ref * d.sum(axis=1)[None, :, None, None]
    np.testing.assert_allclose(nmf.transform(attr), scaled_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(nmf.residual(attr), residual_ref, rtol=1e-10, atol=1e-12)
    # the scaling makes features and residual add up to the attribution at every position
    np.testing.assert_allclose(
        nmf.transform(attr).sum(1) + nmf.residual(attr), attr.sum(1), rtol=1e-10, atol=1e-12
    )
    # torch input gives the same numbers
    np.testing.assert_allclose(nmf.transform(torch.from_numpy(attr)), scaled_ref, atol=1e-12)


@pytest.mark.unit
def test_transform_is_non_negative_least_squares_onto_the_directions():
    """T against scipy's exact NNLS, row by row (an independent solver)."""
    _, attr = planted(seed=3, n=6, hw=3)
    nmf = fit_attribution_nmf(attr, n_components=3, seed=0)
    t0 = nmf.transform_unscaled(attr)  # (N, K, H, W)
    for i, y, x in [(0, 0, 0), (1, 2, 1), (4, 1, 2), (5, 0, 2)]:
        a = attr[i, :, y, x]
        ref = (
            nnls(nmf.directions.T, np.maximum(a, 0))[0]
            - nnls(nmf.directions.T, np.maximum(-a, 0))[0]
        )
        np.testing.assert_allclose(t0[i, :, y, x], ref, atol=1e-3 * max(1.0, np.abs(ref).max()))


@pytest.mark.unit
def test_bad_inputs_are_refused():
    with pytest.raises(LoupeError, match="NMF rank 9 is not in 1..4"):
        fit_attribution_nmf(np.ones((2, 4, 3, 3)), n_components=9)
    with pytest.raises(LoupeError, match="all zero"):
        fit_attribution_nmf(np.zeros((2, 4, 3, 3)), n_components=2)
    with pytest.raises(LoupeError, match=r"\(N, C, H, W\)"):
        fit_attribution_nmf(np.ones((2, 4)), n_components=2)
    with pytest.raises(LoupeError, match="NaN"):
        fit_attribution_nmf(np.full((2, 4, 3, 3), np.nan), n_components=2)
    with pytest.raises(LoupeError, match="unknown NMF init"):
        NMFConfig(init="svd")
    with pytest.raises(LoupeError, match="top_frac"):
        FeatureVisConfig(top_frac=0.0)
    nmf = fit_attribution_nmf(planted()[1], n_components=3)
    with pytest.raises(LoupeError, match="fitted on 6"):
        nmf.transform(np.ones((1, 5, 2, 2)))


# -- dataset examples ------------------------------------------------------------------------------


@pytest.mark.unit
def test_dataset_examples_cap_four_per_position_and_keep_the_top_16():
    n, h, w = 40, 3, 3
    act = np.zeros((n, 2, h, w))
    for i in range(10):  # ten observations peak at (0, 0), strengths 100, 99, ...
        act[i, 1, 0, 0] = 100 - i
        act[i, 1, 2, 2] = 50 - i  # a weaker second peak elsewhere must not be used
    for i in range(10, 40):  # thirty spread over the other positions, weaker
        act[i, 1, 1 + (i % 2), i % 3] = 60 - i
    picked = dataset_examples(act, 1)
    assert len(picked) == 16
    at_origin = [p for p in picked if (p.y, p.x) == (0, 0)]
    assert [p.obs_index for p in at_origin] == [0, 1, 2, 3]  # capped at 4, the strongest
    assert [p.activation for p in picked] == sorted((p.activation for p in picked), reverse=True)
    counts: dict[tuple[int, int], int] = {}
    for p in picked:
        assert act[p.obs_index, 1, p.y, p.x] == act[p.obs_index, 1].max()  # its argmax position
        counts[(p.y, p.x)] = counts.get((p.y, p.x), 0) + 1
    assert max(counts.values()) <= 4
    # reference: the 16 strongest after dropping the 5th and later at each position
    best = act[:, 1].reshape(n, -1)
    order = sorted(range(n), key=lambda i: -best[i].max())
    kept, seen = [], {}
    for i in order:
        pos = int(best[i].argmax())
        seen[pos] = seen.get(pos, 0) + 1
        if seen[pos] <= 4:
            kept.append(i)
    assert [p.obs_index for p in picked] == kept[:16]
    assert len(dataset_examples(act, 1, top=3)) == 3
    with pytest.raises(LoupeError, match="0 <= k < K"):
        dataset_examples(act, 2)


@pytest.mark.unit
def test_spatial_examples_take_the_best_observation_per_cell_under_the_reuse_cap():
    rng = np.random.default_rng(2)
    n, h, w = 20, 4, 4
    act = rng.random((n, 1, h, w))
    act[3] += 10  # one observation dominates everywhere
    grid = spatial_examples(act, 0)
    cap = reuse_cap(n, h, w)
    assert cap == math.ceil(h * w / (0.1 * n)) == 8
    assert (grid == 3).sum() == cap  # used exactly up to its cap
    uses = np.bincount(grid.ravel(), minlength=n)
    assert uses.max() <= cap
    # greedy optimality: any observation stronger at a cell than the one shown there is full
    for y, x in itertools.product(range(h), range(w)):
        shown = act[grid[y, x], 0, y, x]
        for o in range(n):
            if act[o, 0, y, x] > shown:
                assert uses[o] == cap
    # with no dominance every cell shows its own argmax
    plain = rng.random((50, 1, 2, 2))
    np.testing.assert_array_equal(spatial_examples(plain, 0), plain[:, 0].argmax(axis=0))


# -- images --------------------------------------------------------------------------------------


@pytest.mark.unit
def test_disk_kernel_and_smoothing_against_a_loop():
    k = render.disk_kernel(7)
    assert k.shape == (15, 15) and k[7, 7] == 1.0
    assert k[7, 0] == pytest.approx(math.exp(-7)) and k[0, 0] == 0.0  # corner is outside the disk
    rng = np.random.default_rng(4)
    maps = rng.random((1, 2, 5, 6))
    ref = np.zeros_like(maps)
    for c, y, x, dy, dx in itertools.product(range(2), range(5), range(6), range(-7, 8), range(-7, 8)):  # fmt: skip
        d = math.hypot(dy, dx)
        if d <= 7 and 0 <= y + dy < 5 and 0 <= x + dx < 6:
            ref[0, c, y, x] += math.exp(-d) * maps[0, c, y + dy, x + dx]
    np.testing.assert_allclose(render.smooth(maps, 7), ref, rtol=1e-12)


@pytest.mark.unit
def test_overlay_colour_is_the_feature_hue_and_opacity_is_brightness():
    features = np.zeros((3, 4, 8, 8))
    features[0, 2, 4, 4] = 5.0  # feature 2 of 4: hue 180 (cyan)
    features[1, 1, 2, 2] = 5.0
    features[2, 0, 6, 1] = 5.0
    colour, alpha, scale = overlay_colours(features, (32, 32), radius=7)
    assert scale == 5.0  # median over frames of each frame's max
    assert colour.shape == (3, 32, 32, 3) and alpha.shape == (3, 32, 32)
    assert alpha.max() <= 1.0 and alpha.min() >= 0.0
    y, x = np.unravel_index(alpha[0].argmax(), alpha[0].shape)
    hue = render.hue_rgb(180.0)
    np.testing.assert_allclose(unit_rows(colour[0, y, x][None]), unit_rows(hue[None]), atol=1e-9)
    # opacity = min(1, |rgb|) of the smoothed, upsampled colour
    rgb = render.upsample(render.smooth(render.colourise(features / 5.0)), (32, 32))
    norm = np.linalg.norm(rgb.transpose(0, 2, 3, 1), axis=-1)
    np.testing.assert_allclose(alpha, np.minimum(1.0, norm), atol=1e-12)
    # negative parts are drawn separately
    _, alpha_neg, _ = overlay_colours(-features, (32, 32), sign=-1)
    np.testing.assert_allclose(alpha_neg, alpha)


@pytest.mark.unit
def test_patches_show_the_screen_and_a_checkerboard_off_screen():
    obs = np.zeros((2, 3, 16, 16), np.uint8)
    obs[1] = 200
    act = np.zeros((2, 1, 4, 4))
    act[1, 0, 0, 0] = 1.0  # observation 1 peaks in the corner cell
    act[0, 0, 2, 2] = 0.5
    examples = dataset_examples(act, 0)
    image = dataset_example_image(obs, examples, (4, 4), expand=4, grid=2)
    assert image.shape == (32, 32, 3)  # 2 x 2 patches of 4 x (16 / 4) pixels
    first = image[:16, :16]  # corner cell: centre at pixel (2, 2), patch [-6, 10)
    assert set(np.unique(first[:6, :6])) <= {0.75, 1.0}  # off screen: checkerboard
    np.testing.assert_allclose(first[8:, 8:], 200 / 255)  # on screen: the observation
    grid = spatial_examples(act, 0)
    assert spatial_example_image(obs, grid).shape == (16, 16, 3)


@pytest.mark.unit
def test_feature_visualisations_are_written_with_the_right_sizes(tmp_path):
    true, attr = planted(seed=5, n=24, hw=8)  # layer 8 x 8
    obs = np.random.default_rng(5).integers(0, 256, (24, 3, 32, 32), dtype=np.uint8)
    nmf = fit_attribution_nmf(attr, n_components=3, seed=0)
    config = FeatureVisConfig(overlay_frames=2)
    index = write_feature_visualisations(tmp_path, nmf, attr, obs, config=config)
    for k in range(3):
        with Image.open(tmp_path / f"feature{k}-examples.png") as im:
            # 4 x 4 patches of 4 x (32 / 8) = 16 pixels, each shown x6 with a frame and caption
            assert im.size[0] >= 4 * 16 * 6 and im.size[1] >= 4 * 16 * 6
        with Image.open(tmp_path / f"feature{k}-spatial.png") as im:
            assert im.size[0] >= 32 * render.upscale_factor(32, 32) >= 300
    for name in ("positive-00000.png", "negative-00001.png"):
        with Image.open(tmp_path / "overlay" / name) as im:
            # the frame and the frame with the overlay, side by side, each upscaled
            assert im.size[0] >= 2 * 32 * render.upscale_factor(32, 32) and im.mode in (
                "RGB",
                "RGBA",
            )
    saved = json.loads((tmp_path / "features.json").read_text())
    assert saved == json.loads(json.dumps(index))
    assert np.allclose(saved["nmf"]["directions"], nmf.directions)
    assert len(saved["features"]) == 3 and len(saved["features"][0]["examples"]) == 16
    with pytest.raises(LoupeError, match="same frames"):
        write_feature_visualisations(tmp_path, nmf, attr, obs[:3])


@pytest.mark.unit
def test_value_attribution_features_of_a_real_policy(tmp_path):
    """IG on the interpretable network's layer 2b -> NMF -> views -> blind the net to a feature."""
    torch.manual_seed(0)
    policy = build_policy("interpretable", (3, 64, 64), 15)
    obs = torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8)
    result = IntegratedGradients(policy, "2b", n_steps=2).attribute(obs, targets="value")
    attr = result["value"]  # (8, 32, 16, 16)
    nmf = fit_attribution_nmf(attr, n_components=4, seed=0)
    assert nmf.directions.shape == (4, 32)
    t = nmf.transform(attr)
    assert t.shape == (8, 4, 16, 16)
    total = attr.double().numpy().sum(1)
    np.testing.assert_allclose(t.sum(1) + nmf.residual(attr), total, rtol=1e-4, atol=1e-6)
    index = write_feature_visualisations(
        tmp_path, nmf, attr, obs, activations=result.activation, frames=[0, 5]
    )
    with Image.open(tmp_path / "feature3-examples.png") as im:
        assert im.size[0] >= 4 * 16 * 6  # 4 x 4 patches of 4 x (64 / 16) pixels, shown x6
    with Image.open(tmp_path / "overlay" / "positive-00005.png") as im:
        assert im.size[0] >= 2 * 64 * render.upscale_factor(64, 64)
    assert index["overlays"]["frames"] == [0, 5]
    edited = edit_policy(policy, "2b", nmf.directions[0])
    with torch.no_grad():
        a = policy.forward_to(obs[:2], "2b")
        d = torch.from_numpy(nmf.directions[0]).float()
        moved = a + 5.0 * d[None, :, None, None]
        torch.testing.assert_close(
            edited.forward_from("2b", moved)[1],
            edited.forward_from("2b", a)[1],
            atol=1e-4,
            rtol=1e-4,
        )
