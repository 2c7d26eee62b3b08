"""Probe figures: readable sizes, titles, colour bars and legends, frames kept visible, the overview."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from probes import render


def png_pixels(fig) -> np.ndarray:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=render.DPI)
    return np.asarray(Image.open(buf).convert("RGB"))


def frame(h=64, w=64, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).random((h, w, 3)) * 0.5


@pytest.mark.unit
def test_upscaling_is_nearest_neighbour_to_a_readable_size():
    assert render.upscale_factor(64, 64) == 5 and render.upscale_factor(84, 84) == 4
    image = np.arange(6.0).reshape(2, 3)
    up = render.upscale(image, 3)
    assert up.shape == (6, 9) and (up[:3, :3] == 0).all() and (up[3:, 6:] == 5).all()


@pytest.mark.unit
def test_bright_feature_mixtures_keep_their_hue_instead_of_turning_white():
    colour, alpha = render.brightness_to_opacity(np.array([[3.0, 1.5, 0.0], [0.3, 0.0, 0.0]]))
    np.testing.assert_allclose(colour, [[1.0, 0.5, 0.0], [1.0, 0.0, 0.0]])
    np.testing.assert_allclose(alpha, [1.0, 0.3])
    # a fully opaque overlay still lets the frame through
    base = np.zeros((2, 2, 3))
    out = render.overlay_on_frame(base + 0.4, np.ones((2, 2, 3)), np.ones((2, 2)))
    np.testing.assert_allclose(out, 0.4 * (1 - render.OVERLAY_MAX_ALPHA) + render.OVERLAY_MAX_ALPHA)


@pytest.mark.unit
def test_heatmap_figure_has_title_colour_bar_and_readable_size(tmp_path):
    heat = np.zeros((64, 64))
    heat[10:20, 30:40] = 2.5
    fig = render.heatmap_figure(frame(), heat, "saliency, frame 0", "0.5 (V(I) - V(I'))^2")
    texts = render.figure_texts(fig)
    assert "saliency, frame 0" in texts and "0.5 (V(I) - V(I'))^2" in texts
    assert len(fig.axes) == 3  # frame, overlay, colour bar
    path = render.save_figure(tmp_path / "h.png", fig)
    with Image.open(path) as im:
        assert im.size[0] >= 2 * 64 * 5 and im.size[1] >= 64 * 5
    # deterministic: the same arrays give the same bytes
    again = render.save_figure(
        tmp_path / "h2.png",
        render.heatmap_figure(frame(), heat, "saliency, frame 0", "0.5 (V(I) - V(I'))^2"),
    )
    assert path.read_bytes() == again.read_bytes()


@pytest.mark.unit
def test_nmf_overlay_legend_swatches_have_the_feature_colours():
    k = 6
    hues = render.feature_hues(k)
    grey = np.full((64, 64, 3), 0.5)
    fig = render.nmf_overlay_figure(grey, np.zeros((64, 64, 3)), np.zeros((64, 64)), hues, "NMF")
    texts = render.figure_texts(fig)
    assert "NMF" in texts and "NMF features" in texts
    assert [f"feature {i}" for i in range(k)] == [t for t in texts if t.startswith("feature ")]
    pixels = png_pixels(fig).reshape(-1, 3).astype(int)
    for hue in np.round(hues * 255).astype(int):
        assert (np.abs(pixels - hue).max(axis=1) <= 1).sum() >= 50, hue  # a swatch of that colour
    # a colour not among the features has no swatch
    assert (np.abs(pixels - [128, 0, 255]).max(axis=1) <= 1).sum() == 0


@pytest.mark.unit
def test_examples_figure_is_a_labelled_grid_of_upscaled_patches():
    patches = [np.full((16, 16, 3), i / 16.0) for i in range(16)]
    captions = [f"obs {i} (0,0) 1" for i in range(16)]
    fig = render.examples_figure(patches, captions, 4, render.hue_rgb(0.0), "feature 0 of 8")
    texts = render.figure_texts(fig)
    assert "feature 0 of 8" in texts and set(captions) <= set(texts)
    pixels = png_pixels(fig)
    assert pixels.shape[0] >= 4 * 16 * 6 and pixels.shape[1] >= 4 * 16 * 6  # x6 patches + gaps
    # each patch is drawn large: a run of one patch's grey spans at least 5 x 16 pixels
    grey = np.round(5 / 16 * 255)
    rows, cols = np.nonzero((np.abs(pixels.astype(int) - grey) <= 1).all(axis=-1))
    assert cols.max() - cols.min() >= 80 and rows.max() - rows.min() >= 80


def overview_views(with_attention: bool) -> dict:
    k = 4
    rng = np.random.default_rng(1)
    views = {
        "title": "sun-swa on procgen:coinrun, checkpoint step 1024",
        "frame": frame(),
        "nmf": {
            "hues": render.feature_hues(k),
            "positive": (rng.random((64, 64, 3)), rng.random((64, 64))),
            "negative": (rng.random((64, 64, 3)), rng.random((64, 64))),
        },
        "saliency": {"heat": rng.random((64, 64)), "label": "0.5 (V(I) - V(I'))^2"},
        "bookmarks": [(frame(seed=i), f"t {i}", "high" if i < 2 else "low") for i in range(4)],
        "values": rng.random((32, 6)),
        "dones": rng.random((32, 6)) > 0.9,
        "marks": [(0, 3, 0.5, "high"), (5, 7, 0.2, "low")],
        "curve_envs": [5],
    }
    if with_attention:
        views["attention"] = {"heat": rng.random((64, 64)), "entropy": 4.2, "max_entropy": 5.4}
    return views


@pytest.mark.unit
def test_overview_has_every_panel():
    fig = render.overview_figure(overview_views(with_attention=True))
    titles = [ax.get_title() for ax in fig.axes]
    for expected in ("frame", "good news: features raising V", "bad news: features lowering V",
                     "attention, entropy 4.20 nats (uniform 5.40)", "high advantage",
                     "low advantage"):  # fmt: skip
        assert expected in titles, (expected, titles)
    assert any(t.startswith("value estimate") for t in titles)
    texts = render.figure_texts(fig)
    assert "NMF features" in texts and "feature 3" in texts and "high-advantage bookmark" in texts
    # the value curve plots the bookmarked environment first, four environments in all
    assert "env 5" in texts and "env 2" in texts and "env 3" not in texts
    assert png_pixels(fig).shape[:2] == (1060, 1320)
    # without attention, the value saliency takes the attention's place
    titles = [ax.get_title() for ax in render.overview_figure(overview_views(False)).axes]
    assert "value saliency (no attention in this policy)" in titles


@pytest.mark.integration
def test_breakout_positive_overlay_keeps_the_real_frame_visible():
    """Real Atari frames, a real region policy, IG at c3n, NMF: the overlay is not near-white."""
    from actors import EnvConfig
    from actors.envs import make_vec_env
    from attention.registry import build_policy
    from probes.attribution import IntegratedGradients
    from probes.nmf import fit_attribution_nmf, overlay_colours

    env = make_vec_env(EnvConfig(env_id="ALE/Breakout-v5", num_envs=2, seed=0))
    try:
        rng = np.random.default_rng(0)
        frames = [env.reset()]
        for _ in range(15):
            frames.append(env.step(rng.integers(0, env.n_actions, 2))[0])
    finally:
        env.close()
    obs = torch.from_numpy(np.concatenate(frames[::2]))  # (16, 4, 84, 84) uint8
    torch.manual_seed(0)
    policy = build_policy("region", tuple(obs.shape[1:]), 4).eval()
    attr = IntegratedGradients(policy, "c3n", n_steps=4).attribute(obs, "value")["value"]
    nmf = fit_attribution_nmf(attr, n_components=8, seed=0)
    colour, alpha, _ = overlay_colours(nmf.transform(attr), (84, 84), sign=1)
    shares = []
    for i in range(len(obs)):
        base = render.obs_to_rgb(obs[i].numpy())
        assert render.near_white_share(base) < 0.01  # a Breakout frame is dark
        shares.append(render.near_white_share(render.overlay_on_frame(base, colour[i], alpha[i])))
    assert max(shares) < 0.05, shares
    # the frame shows through: the composite still correlates with the frame
    base = render.obs_to_rgb(obs[0].numpy())
    image = render.overlay_on_frame(base, colour[0], alpha[0])
    assert np.corrcoef(base.mean(-1).ravel(), image.mean(-1).ravel())[0, 1] > 0.3


@pytest.mark.integration
def test_suite_on_an_attention_policy_writes_readable_figures_and_overview(tmp_path):
    """In-process probe of a real sun-swa policy on real CoinRun: attention maps, entropy, figures."""
    from attention.registry import build_policy
    from probes.suite import ProbeConfig, run_suite

    torch.manual_seed(0)
    policy = build_policy("sun-swa", (3, 64, 64), 15)
    meta = {"env": "procgen:coinrun", "env_options": {"num_levels": 10, "distribution_mode": "easy"},
            "sha256": "0" * 64, "step": 0, "policy": policy.spec}  # fmt: skip
    config = ProbeConfig(num_envs=2, num_steps=16, ig_samples=8, ig_steps=2, nmf_components=4,
                         smoothgrad_copies=2, bookmarks=4)  # fmt: skip
    summary = run_suite("mem", tmp_path / "p", config, policy=policy, meta=meta)
    out = tmp_path / "p"
    assert summary["attention_entropy"] > 0 and summary["overview"] == "overview.png"
    panels = summary["overview_panels"]
    assert "good news: features raising V" in panels and "bad news: features lowering V" in panels
    assert any(
        p.startswith("attention, entropy") and p.endswith("(uniform 2.71)") for p in panels
    ), panels  # log 15: rows over 15 rows
    with Image.open(out / "overview.png") as im:
        assert im.size == (1320, 1060)
    for pattern, min_w in (("attention/overlay-*.png", 640), ("saliency/*.png", 640),
                           ("nmf/overlay/*.png", 640), ("nmf/feature*-examples.png", 400),
                           ("bookmarks/*.png", 320)):  # fmt: skip
        files = sorted(out.glob(pattern))
        assert files, pattern
        with Image.open(files[0]) as im:
            assert im.size[0] >= min_w and im.size[1] >= 300, (pattern, im.size)
    assert summary["timings"]["render_s"] > 0
