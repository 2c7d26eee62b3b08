"""Image helpers and figures for probe artifacts: PNG and JSON writing, feature hues, smoothing,
checkerboards, and the readable figures the probe suite writes.

Images here are numpy arrays laid out (H, W, 3) or (H, W, 4) with float values in [0, 1] (uint8 is
accepted where noted); observations arrive NCHW uint8 as everywhere else in loupe.

Figures are matplotlib ``Figure`` objects drawn off screen (the Agg canvas, no pyplot state), so they
are deterministic: the same arrays give the same PNG bytes. Observations are shown with
nearest-neighbour upscaling (``upscale_factor``: 64 px -> x5, 84 px -> x4), every figure has a title,
heat maps have a colour bar in their own units, and NMF overlays carry a legend in the feature colours.
Overlays are alpha-composited on the frame with at most ``OVERLAY_MAX_ALPHA`` opacity, so the frame
stays visible everywhere.
"""

from __future__ import annotations

import colorsys
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from loupe.errors import LoupeError


def save_png(path: str | Path, image: np.ndarray) -> Path:
    """Write ``image`` ((H, W), (H, W, 3) or (H, W, 4); float in [0, 1] or uint8) as a PNG."""
    image = np.asarray(image)
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (3, 4)):
        raise LoupeError(f"cannot write an image of shape {image.shape}; expected (H, W[, 3|4])")
    if image.dtype != np.uint8:
        image = np.round(np.clip(np.nan_to_num(image), 0.0, 1.0) * 255.0).astype(np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(image).save(tmp, format="PNG")
    tmp.replace(path)
    return path


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON (write-then-rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    return path


def hue_rgb(degrees: float) -> np.ndarray:
    """The fully saturated, full-brightness colour of a hue angle -> (3,) float in [0, 1]."""
    return np.array(colorsys.hsv_to_rgb((degrees % 360.0) / 360.0, 1.0, 1.0))


def feature_hues(k: int) -> np.ndarray:
    """Colours of K features, feature i at hue 360 i / K -> (K, 3)."""
    return np.stack([hue_rgb(360.0 * i / k) for i in range(k)])


def colourise(features: np.ndarray) -> np.ndarray:
    """(N, K, H, W) non-negative feature maps -> (N, 3, H, W), sum_k t_k hue(360 k / K)."""
    hues = feature_hues(features.shape[1])  # (K, 3)
    return np.einsum("nkhw,kc->nchw", features, hues)


def disk_kernel(radius: int = 7) -> np.ndarray:
    """exp(-d) on a disk of ``radius`` (d = distance to the centre), zero outside; not normalised."""
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    d = np.hypot(offsets[:, None], offsets[None, :])  # (2r+1, 2r+1)
    return np.where(d <= radius, np.exp(-d), 0.0)


def smooth(maps: np.ndarray, radius: int = 7) -> np.ndarray:
    """Convolve each (H, W) plane of (N, C, H, W) with ``disk_kernel(radius)``, zero padding."""
    n, c, h, w = maps.shape
    kernel = torch.from_numpy(disk_kernel(radius))[None, None]  # (1, 1, 2r+1, 2r+1)
    x = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float64)).reshape(n * c, 1, h, w)
    out = F.conv2d(x, kernel, padding=radius)  # (N*C, 1, H, W); the kernel is symmetric
    return out.reshape(n, c, h, w).numpy()


def upsample(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of (N, C, h, w) to (N, C, *size)."""
    x = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float64))
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False).numpy()


def brightness_to_opacity(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(..., 3) non-negative colour -> (its hue at full brightness, opacity min(1, |rgb|)).

    The colour is divided by its largest channel, so a bright mixture of features keeps its hue
    instead of being clipped to white; the opacity is METHODS D's min(1, |rgb|).
    """
    norm = np.linalg.norm(rgb, axis=-1)  # (...)
    peak = rgb.max(axis=-1, keepdims=True)  # (..., 1)
    colour = np.divide(rgb, peak, out=np.zeros_like(rgb), where=peak > 0)
    return np.clip(colour, 0.0, 1.0), np.minimum(1.0, norm)


def composite(base: np.ndarray, colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Alpha-blend (H, W, 3) ``colour`` over (H, W, 3) ``base`` with (H, W) ``alpha``."""
    a = alpha[..., None]
    return base * (1.0 - a) + colour * a


def obs_to_rgb(obs: np.ndarray | torch.Tensor) -> np.ndarray:
    """One observation (C, H, W), uint8 or float in [0, 1] -> (H, W, 3) float in [0, 1].

    Three channels are taken as RGB (procgen); otherwise the last channel, the newest frame of an
    Atari stack, is shown in grey.
    """
    if isinstance(obs, torch.Tensor):
        obs = obs.detach().cpu().numpy()
    obs = np.asarray(obs)
    if obs.ndim != 3:
        raise LoupeError(f"an observation must be (C, H, W), got shape {obs.shape}")
    image = obs.astype(np.float64) / (255.0 if obs.dtype == np.uint8 else 1.0)
    if image.shape[0] == 3:
        return image.transpose(1, 2, 0)
    return np.repeat(image[-1][:, :, None], 3, axis=2)


def checkerboard(h: int, w: int, square: int = 2, light: float = 1.0, dark: float = 0.75):
    """(h, w, 3) grey checkerboard of ``square``-pixel squares: marks area outside the screen."""
    ys, xs = np.indices((h, w)) // max(1, square)
    board = np.where((ys + xs) % 2 == 0, light, dark)
    return np.repeat(board[:, :, None], 3, axis=2)


def pad_with_checkerboard(image: np.ndarray, pad: int) -> np.ndarray:
    """(H, W, 3) image inside a ``pad``-pixel checkerboard border -> (H + 2 pad, W + 2 pad, 3)."""
    h, w = image.shape[:2]
    out = checkerboard(h + 2 * pad, w + 2 * pad)
    out[pad : pad + h, pad : pad + w] = image
    return out


def crop_around(
    padded: np.ndarray, pad: int, centre: tuple[float, float], size: tuple[int, int]
) -> np.ndarray:
    """A (size_h, size_w) crop of a ``pad``-padded image, centred on pixel coordinates ``centre``
    (y, x) of the unpadded image, where pixel i covers [i, i + 1)."""
    sh, sw = size
    top = int(math.floor(pad + centre[0] - sh / 2.0 + 0.5))
    left = int(math.floor(pad + centre[1] - sw / 2.0 + 0.5))
    top = min(max(top, 0), padded.shape[0] - sh)
    left = min(max(left, 0), padded.shape[1] - sw)
    return padded[top : top + sh, left : left + sw]


def tile(images: list[np.ndarray], rows: int, cols: int, fill: float = 1.0) -> np.ndarray:
    """Lay out equally sized (h, w, 3) images row-major in a rows x cols grid; empty cells ``fill``."""
    if not images:
        raise LoupeError("nothing to tile: no images were given")
    h, w, c = images[0].shape
    out = np.full((rows * h, cols * w, c), fill, dtype=np.float64)
    for i, image in enumerate(images[: rows * cols]):
        r, q = divmod(i, cols)
        out[r * h : (r + 1) * h, q * w : (q + 1) * w] = image
    return out


# -- figures ---------------------------------------------------------------------------------------

#: the most an overlay covers the frame: at full attribution 1 - OVERLAY_MAX_ALPHA of the frame shows
OVERLAY_MAX_ALPHA = 0.65
#: figures are laid out in pixels at this resolution
DPI = 100
#: an observation is upscaled (nearest neighbour) until its longer side reaches this many pixels
READABLE_PX = 300
#: share of pixels with every channel above 0.9: what ``near_white_share`` counts
NEAR_WHITE = 0.9


def upscale_factor(h: int, w: int, target: int = READABLE_PX) -> int:
    """The integer nearest-neighbour factor that brings max(h, w) to at least ``target`` pixels."""
    return max(1, math.ceil(target / max(h, w, 1)))


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscaling of an (H, W[, C]) image by an integer ``factor``."""
    return np.repeat(np.repeat(np.asarray(image), factor, axis=0), factor, axis=1)


def near_white_share(image: np.ndarray, threshold: float = NEAR_WHITE) -> float:
    """Share of the pixels of an (H, W, 3) float image whose channels all exceed ``threshold``."""
    return float((np.asarray(image)[..., :3].min(axis=-1) > threshold).mean())


def robust_max(heat: np.ndarray, q: float = 99.5) -> float:
    """The ``q``-th percentile of a heat map (its max where that is 0): a colour-bar top that a few
    extreme pixels do not set."""
    heat = np.asarray(heat, dtype=np.float64)
    top = float(np.percentile(heat, q)) if heat.size else 0.0
    return top if top > 0 else float(heat.max(initial=0.0))


def overlay_on_frame(frame: np.ndarray, colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Composite an (H, W, 3) overlay with (H, W) opacity on the frame, opacity scaled by
    ``OVERLAY_MAX_ALPHA`` so that the frame is never hidden."""
    return composite(frame, colour, np.clip(alpha, 0.0, 1.0) * OVERLAY_MAX_ALPHA)


def new_figure(width_px: int, height_px: int):
    """A matplotlib Figure of the given pixel size on an Agg canvas (no pyplot, no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(path: str | Path, fig) -> Path:
    """Write ``fig`` as a PNG (write-then-rename; no timestamp or version metadata)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})
    tmp.replace(path)
    return path


def figure_texts(fig) -> list[str]:
    """Every text a figure shows: suptitle, axes titles and labels, texts, legend entries."""
    texts = []
    for part in [fig, *fig.subfigs]:
        texts += [t.get_text() for t in part.texts]  # the suptitle is one of them
    for ax in fig.axes:
        texts += [ax.get_title(), ax.get_xlabel(), ax.get_ylabel()]
        texts += [t.get_text() for t in ax.texts]
        legend = ax.get_legend()
        if legend is not None:
            texts += [legend.get_title().get_text(), *(t.get_text() for t in legend.get_texts())]
    return [t for t in texts if t]


def _show(ax, image: np.ndarray, title: str | None = None, **kw) -> None:
    ax.imshow(np.clip(image, 0.0, 1.0), interpolation="nearest", **kw)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=10)


def _panel_px(h: int, w: int) -> tuple[int, int]:
    f = upscale_factor(h, w)
    return h * f, w * f


def heatmap_figure(frame: np.ndarray, heat: np.ndarray, title: str, label: str,
                   cmap: str = "inferno", vmin: float | None = None, vmax: float | None = None):  # fmt: skip
    """The frame beside the frame with a heat map over it (opacity grows with the value), and a
    colour bar of the heat map in its own units ``label``."""
    h, w = frame.shape[:2]
    ph, pw = _panel_px(h, w)
    fig = new_figure(2 * pw + 160, ph + 70)
    fig.suptitle(title, fontsize=11)
    ax0, ax1 = fig.subplots(1, 2)
    _show(ax0, frame, "frame")
    heat = np.asarray(heat, dtype=np.float64)
    lo = float(heat.min()) if vmin is None else vmin
    hi = float(heat.max()) if vmax is None else vmax
    rel = np.clip((heat - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(heat)
    _show(ax1, frame, "overlay")
    im = ax1.imshow(heat, cmap=cmap, vmin=lo, vmax=hi if hi > lo else lo + 1e-12,
                    alpha=OVERLAY_MAX_ALPHA * rel, interpolation="nearest")  # fmt: skip
    bar = fig.colorbar(im, ax=ax1, fraction=0.08, pad=0.02)
    bar.solids.set_alpha(1.0)
    bar.set_label(label, fontsize=9)
    return fig


def feature_legend(ax, hues: np.ndarray, labels: list[str] | None = None, ncol: int = 1) -> None:
    """A legend of the NMF features, one swatch per feature in its colour hue(360 k / K)."""
    from matplotlib.patches import Patch

    labels = labels or [f"feature {k}" for k in range(len(hues))]
    handles = [Patch(facecolor=tuple(h), edgecolor="black", label=lab)
               for h, lab in zip(hues, labels)]  # fmt: skip
    ax.axis("off")
    ax.legend(handles=handles, loc="center", ncol=ncol, fontsize=9, title="NMF features",
              title_fontsize=9, frameon=False, handlelength=2.0, handleheight=1.4)  # fmt: skip


def nmf_overlay_figure(frame: np.ndarray, colour: np.ndarray, alpha: np.ndarray,
                       hues: np.ndarray, title: str):  # fmt: skip
    """The frame, the frame with the NMF feature overlay composited on it, and the feature legend."""
    h, w = frame.shape[:2]
    ph, pw = _panel_px(h, w)
    fig = new_figure(2 * pw + 150, ph + 60)
    fig.suptitle(title, fontsize=11)
    axes = fig.subplots(1, 3, width_ratios=[pw, pw, 130])
    _show(axes[0], frame, "frame")
    _show(axes[1], overlay_on_frame(frame, colour, alpha), "features on the frame")
    feature_legend(axes[2], hues)
    return fig


def examples_figure(patches: list[np.ndarray], captions: list[str], grid: int, hue: np.ndarray,
                    title: str):  # fmt: skip
    """A grid x grid of dataset-example patches, each upscaled and framed in the feature colour,
    captioned (e.g. with its observation, position and activation)."""
    ph, pw = patches[0].shape[:2] if patches else (16, 16)
    f = upscale_factor(ph, pw, target=96)
    gap, border, cap = 18, 3, 14  # pixels: between patches, coloured frame, caption line
    cell_h, cell_w = ph * f + 2 * border + cap, pw * f + 2 * border
    canvas = np.ones((grid * cell_h + (grid - 1) * gap // 2, grid * cell_w + (grid - 1) * gap, 3))
    spots = []
    for i, patch in enumerate(patches[: grid * grid]):
        r, q = divmod(i, grid)
        top, left = r * (cell_h + gap // 2), q * (cell_w + gap)
        canvas[top : top + ph * f + 2 * border, left : left + pw * f + 2 * border] = hue
        canvas[top + border : top + border + ph * f, left + border : left + border + pw * f] = (
            upscale(patch, f)
        )
        spots.append((top + ph * f + 2 * border + cap / 2, left + cell_w / 2))
    ch, cw = canvas.shape[:2]
    fig = new_figure(cw + 20, ch + 50)
    fig.suptitle(title, fontsize=11)
    ax = fig.subplots()
    _show(ax, canvas)
    ax.axis("off")
    ax.set_title("caption: observation, layer cell (y, x), feature activation", fontsize=8)
    for (y, x), text in zip(spots, captions):
        ax.text(x, y, text, ha="center", va="center", fontsize=7)
    return fig


def image_figure(image: np.ndarray, title: str, caption: str | None = None, target: int = 300):
    """One image, upscaled (nearest neighbour) to a readable size, with a title and a caption."""
    h, w = image.shape[:2]
    f = upscale_factor(h, w, target)
    fig = new_figure(max(w * f + 20, 420), h * f + (100 if caption else 60))
    fig.suptitle(title, fontsize=11)
    ax = fig.subplots()
    _show(ax, upscale(image, f))
    if caption:
        ax.set_xlabel(caption, fontsize=9)
    return fig


def _missing(ax, title: str, why: str) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=10)
    ax.text(0.5, 0.5, why, ha="center", va="center", fontsize=9, transform=ax.transAxes,
            wrap=True)  # fmt: skip


def overview_figure(views: dict[str, Any]):
    """One checkpoint at a glance.

    Top row: a frame, its NMF features of positive ("good news") and negative ("bad news") value
    attribution, and the attention map with its entropy (or, for a policy without attention, the
    value saliency). Middle row: the NMF legend and the first high and low GAE bookmarks. Bottom row:
    the value estimate over the recording, bookmarks marked. ``views`` keys (each may be missing):
    ``title``; ``frame`` (H, W, 3); ``nmf`` {positive: (colour, alpha), negative: (colour, alpha),
    hues (K, 3)}; ``attention`` {heat (H, W) in [0, 1], entropy, max_entropy}; ``saliency``
    {heat (H, W), label}; ``bookmarks`` [(image, caption, kind)]; ``values`` (T, N), ``dones``
    (T, N), ``marks`` [(env, t, value, kind)], ``curve_envs`` (environments to plot first).
    """
    fig = new_figure(1320, 1060)
    fig.suptitle(views.get("title", "probe overview"), fontsize=13)
    top, middle, bottom = fig.subfigures(3, 1, height_ratios=[1.25, 0.95, 0.9])
    frame = views.get("frame")
    axes = top.subplots(1, 4)
    if frame is None:
        _missing(axes[0], "frame", "no frame recorded")
    else:
        _show(axes[0], frame, "frame")
    nmf = views.get("nmf")
    for ax, key, name in ((axes[1], "positive", "good news: features raising V"),
                          (axes[2], "negative", "bad news: features lowering V")):  # fmt: skip
        if nmf is None or frame is None:
            _missing(ax, name, "no NMF features\n(the layer is not spatial)")
        else:
            _show(ax, overlay_on_frame(frame, *nmf[key]), name)
    attention, saliency = views.get("attention"), views.get("saliency")
    if attention is not None and frame is not None:
        _show(axes[3], frame)
        im = axes[3].imshow(attention["heat"], cmap="inferno", vmin=0.0, vmax=1.0,
                            alpha=OVERLAY_MAX_ALPHA * np.clip(attention["heat"], 0, 1),
                            interpolation="nearest")  # fmt: skip
        entropy = attention.get("entropy")
        axes[3].set_title(
            "attention" + ("" if entropy is None else f", entropy {entropy:.2f} nats"
                           + (f" (uniform {attention['max_entropy']:.2f})"
                              if attention.get("max_entropy") else "")),
            fontsize=10,
        )  # fmt: skip
        bar = top.colorbar(im, ax=axes[3], fraction=0.06, pad=0.02)
        bar.solids.set_alpha(1.0)
        bar.set_label("attention (normalised)", fontsize=8)
    elif saliency is not None and frame is not None:
        heat = np.asarray(saliency["heat"], dtype=np.float64)
        rel = heat / heat.max() if heat.max() > 0 else heat
        _show(axes[3], frame, "value saliency (no attention in this policy)")
        im = axes[3].imshow(heat, cmap="viridis", alpha=OVERLAY_MAX_ALPHA * rel,
                            interpolation="nearest")  # fmt: skip
        bar = top.colorbar(im, ax=axes[3], fraction=0.06, pad=0.02)
        bar.solids.set_alpha(1.0)
        bar.set_label(saliency.get("label", "saliency"), fontsize=8)
    else:
        _missing(axes[3], "attention", "this policy has no attention")

    marks = views.get("bookmarks") or []
    axes = middle.subplots(1, 5, width_ratios=[1.1, 1, 1, 1, 1])
    if nmf is not None:
        feature_legend(axes[0], nmf["hues"], ncol=1 if len(nmf["hues"]) <= 8 else 2)
    else:
        axes[0].axis("off")
    for ax, i in zip(axes[1:], range(4)):
        if i < len(marks):
            image, caption, kind = marks[i]
            _show(ax, image, f"{kind} advantage")
            ax.set_xlabel(caption, fontsize=8)
            for spine in ax.spines.values():
                spine.set_edgecolor("tab:green" if kind == "high" else "tab:red")
                spine.set_linewidth(3)
        else:
            ax.axis("off")

    ax = bottom.subplots()
    values = views.get("values")
    if values is None:
        _missing(ax, "value estimate", "no recording")
    else:
        values = np.asarray(values)
        dones = np.asarray(views.get("dones", np.zeros_like(values, dtype=bool)))
        # the environments of the bookmarks shown above first, then the others, four in all
        first = [e for e in views.get("curve_envs", []) if 0 <= e < values.shape[1]]
        shown = list(dict.fromkeys(first + list(range(values.shape[1]))))[:4]
        for env in shown:
            (line,) = ax.plot(values[:, env], lw=1.2, label=f"env {env}")
            for t in np.flatnonzero(dones[:, env]):
                ax.axvline(t, color=line.get_color(), lw=0.6, ls=":")
        for kind, marker, colour in (("high", "^", "tab:green"), ("low", "v", "tab:red")):
            pts = [(t, v) for env, t, v, k in views.get("marks", []) if k == kind and env in shown]
            if pts:
                ts, vs = zip(*pts)
                ax.scatter(ts, vs, marker=marker, s=60, color=colour, zorder=3,
                           label=f"{kind}-advantage bookmark")  # fmt: skip
        ax.set_title("value estimate V(s_t) over the recording (dotted: episode ends)", fontsize=10)
        ax.set_xlabel("recording step t")
        ax.set_ylabel("V")
        ax.legend(fontsize=8, loc="best", ncol=3)
        ax.grid(alpha=0.3)
    return fig
