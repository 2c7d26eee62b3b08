"""Attribution NMF: a few non-negative channel directions that explain a layer's attributions.

Hilton et al. (2020): factorise the positive and negative parts of value-function attributions of a
hidden layer with NMF over channels; each component is a "feature" (a direction in channel space).

    nmf = fit_attribution_nmf(attr, n_components=8, seed=0)   # attr (N, C, H, W)
    t = nmf.transform(attr)                                    # (N, K, H, W) signed feature maps
    t0 = nmf.transform_unscaled(attr)                          # the same before the scaling
    r = nmf.residual(attr)                                     # (N, H, W) what the features miss
    write_feature_visualisations("out/", nmf, attr, obs)       # overlays + dataset examples

Definitions (exact): rows = [max(a, 0); max(-a, 0)] stacked on the batch axis and flattened to
(2 N H W, C); directions = sklearn ``NMF.components_`` (K, C). With T the fitted NMF's transform,
``t0 = T(max(a, 0)) - T(max(-a, 0))``, ``transform = t0 * directions.sum(-1)`` and
``residual = (a - (Tinv(max(t0, 0)) - Tinv(max(-t0, 0)))).sum(channels)`` with Tinv(w) = w @ directions.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from sklearn.decomposition import NMF
from sklearn.exceptions import ConvergenceWarning

from loupe.errors import LoupeError
from probes import render


@dataclasses.dataclass
class NMFConfig:
    """How the attribution NMF is fitted."""

    n_components: int = 8
    """number of features K (must not exceed the layer's channel count)"""
    seed: int = 0
    """random state handed to sklearn (initialisation and coordinate order)"""
    max_iter: int = 1000
    """iteration limit of the NMF solver"""
    tol: float = 1e-4
    """stopping tolerance of the NMF solver"""
    init: str = "nndsvda"
    """sklearn initialisation: nndsvda (deterministic), nndsvd, nndsvdar or random"""

    def __post_init__(self) -> None:
        if self.n_components < 1:
            raise LoupeError(f"n_components must be at least 1, got {self.n_components}")
        if self.max_iter < 1 or self.tol <= 0:
            raise LoupeError("NMF max_iter must be >= 1 and tol > 0")
        if self.init not in ("nndsvda", "nndsvd", "nndsvdar", "random"):
            raise LoupeError(
                f"unknown NMF init {self.init!r}; use nndsvda, nndsvd, nndsvdar or random"
            )


def _as_maps(attr: Any, what: str = "attributions") -> np.ndarray:
    """numpy or torch (N, C, H, W) -> float numpy (float32 or float64 kept), checked."""
    if isinstance(attr, torch.Tensor):
        attr = attr.detach().cpu().numpy()
    attr = np.asarray(attr)
    if attr.dtype not in (np.float32, np.float64):
        attr = attr.astype(np.float32)
    if attr.ndim != 4 or min(attr.shape) == 0:
        raise LoupeError(
            f"{what} must be a non-empty (N, C, H, W) array of a convolutional layer, "
            f"got shape {attr.shape}"
        )
    if not np.isfinite(attr).all():
        raise LoupeError(f"{what} contain NaN or infinite values; check the attribution run")
    return attr


def _rows(maps: np.ndarray) -> np.ndarray:
    """(N, C, H, W) -> (N H W, C), one row per position."""
    return maps.transpose(0, 2, 3, 1).reshape(-1, maps.shape[1])


def _unrows(rows: np.ndarray, n: int, h: int, w: int) -> np.ndarray:
    """(N H W, K) -> (N, K, H, W)."""
    return rows.reshape(n, h, w, -1).transpose(0, 3, 1, 2)


class AttributionNMF:
    """A fitted attribution NMF: ``directions`` (K, C) plus the signed transform and residual."""

    def __init__(self, model: NMF, config: NMFConfig):
        self.model = model
        self.config = config

    @classmethod
    def fit(cls, attr: Any, config: NMFConfig) -> AttributionNMF:
        """Fit on (N, C, H, W) attributions (positive and negative parts stacked on the batch axis)."""
        maps = _as_maps(attr)
        channels = maps.shape[1]
        if config.n_components > channels:
            raise LoupeError(
                f"NMF rank {config.n_components} is not in 1..{channels}; choose n_components "
                f"no larger than the layer's {channels} channels"
            )
        stacked = np.concatenate([np.maximum(maps, 0.0), np.maximum(-maps, 0.0)], axis=0)
        rows = _rows(stacked)  # (2 N H W, C)
        if not rows.any():
            raise LoupeError("attributions are all zero; there is nothing to factorise")
        model = NMF(
            n_components=config.n_components,
            init=config.init,
            random_state=config.seed,
            max_iter=config.max_iter,
            tol=config.tol,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(rows)
        return cls(model, config)

    @classmethod
    def from_directions(cls, directions: Any, config: NMFConfig | None = None) -> AttributionNMF:
        """A fitted NMF rebuilt from saved (K, C) directions (a probe summary's ``nmf.directions``):
        the transform with the components fixed, without repeating the fit."""
        d = np.asarray(directions, dtype=np.float64)
        if d.ndim != 2 or not d.size or (d < 0).any():
            raise LoupeError(f"NMF directions must be a non-negative (K, C) array, got {d.shape}")
        k, c = d.shape
        config = config or NMFConfig(n_components=k)
        model = NMF(n_components=k, init=config.init, random_state=config.seed,
                    max_iter=config.max_iter, tol=config.tol)  # fmt: skip
        model.components_ = d
        model.n_components_ = k
        model._n_components = k
        model.n_features_in_ = c
        return cls(model, config)

    @property
    def directions(self) -> np.ndarray:
        """(K, C) non-negative channel directions, sklearn's ``components_``."""
        return self.model.components_

    @property
    def n_components(self) -> int:
        return int(self.directions.shape[0])

    @property
    def channels(self) -> int:
        return int(self.directions.shape[1])

    def _t(self, rows: np.ndarray) -> np.ndarray:
        """T: (M, C) non-negative rows -> (M, K) NMF coefficients with the directions fixed."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            return self.model.transform(rows.astype(self.directions.dtype, copy=False))

    def transform_unscaled(self, attr: Any) -> np.ndarray:
        """t0 = T(max(a, 0)) - T(max(-a, 0)), unscaled -> (N, K, H, W)."""
        maps = _as_maps(attr)
        n, c, h, w = maps.shape
        if c != self.channels:
            raise LoupeError(
                f"attributions have {c} channels but the NMF was fitted on {self.channels}; "
                "use attributions of the same layer"
            )
        pos = self._t(_rows(np.maximum(maps, 0.0)))  # (N H W, K)
        neg = self._t(_rows(np.maximum(-maps, 0.0)))  # (N H W, K)
        return _unrows(pos - neg, n, h, w)

    def transform(self, attr: Any) -> np.ndarray:
        """Feature maps t = t0 * directions.sum(-1) -> (N, K, H, W)."""
        scale = self.directions.sum(-1)  # (K,)
        return self.transform_unscaled(attr) * scale[None, :, None, None]

    def inverse(self, coefficients: np.ndarray) -> np.ndarray:
        """Tinv: (N, K, H, W) coefficients -> (N, C, H, W), sum_k w_k directions_k."""
        return np.einsum("nkhw,kc->nchw", coefficients, self.directions)

    def residual(self, attr: Any) -> np.ndarray:
        """Per position, the attribution the features do not explain -> (N, H, W)."""
        maps = _as_maps(attr)
        t0 = self.transform_unscaled(maps)  # (N, K, H, W), unscaled
        approx = self.inverse(np.maximum(t0, 0.0)) - self.inverse(np.maximum(-t0, 0.0))
        return (maps - approx).sum(axis=1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description: config, directions and the fit's reconstruction error."""
        return {
            "config": dataclasses.asdict(self.config),
            "directions": self.directions.tolist(),
            "channels": self.channels,
            "reconstruction_err": float(self.model.reconstruction_err_),
        }


def fit_attribution_nmf(
    attr: Any, n_components: int = 8, seed: int = 0, max_iter: int = 1000
) -> AttributionNMF:
    """Fit the attribution NMF on (N, C, H, W) attributions (numpy or torch)."""
    return AttributionNMF.fit(
        attr, NMFConfig(n_components=n_components, seed=seed, max_iter=max_iter)
    )


# -- example selection -----------------------------------------------------------------------------


class Example(NamedTuple):
    """One dataset example of a feature: an observation and the layer position it is shown at."""

    obs_index: int
    y: int
    x: int
    activation: float


def _feature(act: Any, k: int) -> np.ndarray:
    """Feature ``k`` of (N, K, H, W) feature maps -> (N, H, W)."""
    act = np.asarray(act)
    if act.ndim != 4 or not 0 <= k < act.shape[1]:
        raise LoupeError(
            f"need (N, K, H, W) feature maps and 0 <= k < K, got shape {act.shape} and k={k}"
        )
    return act[:, k]


def dataset_examples(act: Any, k: int, top: int = 16, per_position: int = 4) -> list[Example]:
    """The strongest examples of feature ``k`` of (N, K, H, W) feature maps, strongest first.

    Each observation is placed at its argmax position; of the observations placed at one position
    only the ``per_position`` strongest are kept; of those, the ``top`` strongest are returned.
    """
    if top < 1 or per_position < 1:
        raise LoupeError("top and per_position must be at least 1")
    feature = _feature(act, k)
    n, h, w = feature.shape
    flat = feature.reshape(n, h * w)
    best = flat.argmax(axis=1)  # (N,) argmax position
    strength = flat[np.arange(n), best]  # (N,)
    used = np.zeros(h * w, dtype=np.int64)
    examples: list[Example] = []
    for obs in np.argsort(-strength, kind="stable"):
        pos = int(best[obs])
        if used[pos] >= per_position:
            continue
        used[pos] += 1
        examples.append(Example(int(obs), pos // w, pos % w, float(strength[obs])))
        if len(examples) == top:
            break
    return examples


def spatial_examples(act: Any, k: int, top_frac: float = 0.1) -> np.ndarray:
    """For each position of feature ``k``, the observation shown there -> (H, W) int indices.

    Each cell takes the observation with the highest activation there, each observation used at
    most ceil(H W / (top_frac N)) times: taking (cell, observation) pairs by decreasing activation,
    a cell takes the observation if the cell is still empty and the observation under its cap.
    """
    if not 0.0 < top_frac <= 1.0:
        raise LoupeError(f"top_frac must be in (0, 1], got {top_frac}")
    feature = _feature(act, k)
    n, h, w = feature.shape
    cap = reuse_cap(n, h, w, top_frac)
    flat = feature.reshape(-1)  # index = obs * (H W) + cell
    chosen = np.full(h * w, -1, dtype=np.int64)
    uses = np.zeros(n, dtype=np.int64)
    left = h * w
    for index in np.argsort(-flat, kind="stable"):
        obs, cell = divmod(int(index), h * w)
        if chosen[cell] >= 0 or uses[obs] >= cap:
            continue
        chosen[cell] = obs
        uses[obs] += 1
        left -= 1
        if left == 0:
            break
    return chosen.reshape(h, w)


def reuse_cap(n: int, h: int, w: int, top_frac: float = 0.1) -> int:
    """How often one observation may appear in a spatially aware grid: ceil(H W / (top_frac N))."""
    return int(math.ceil(h * w / (top_frac * n) - 1e-9))


# -- images ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class FeatureVisConfig:
    """How NMF features are drawn."""

    per_position: int = 4
    """dataset examples: at most this many observations share one layer position"""
    grid: int = 4
    """dataset examples: the top grid x grid observations, in a grid x grid layout"""
    expand: float = 4.0
    """dataset examples: patch side = expand x (observation size / layer size) pixels"""
    top_frac: float = 0.1
    """spatially aware examples: each observation reused at most ceil(H W / (top_frac N)) times"""
    smooth_radius: int = 7
    """overlay: radius (layer cells) of the exp(-d) smoothing disk"""
    overlay_frames: int = 16
    """overlay: how many frames get an overlay PNG when no frames are named"""

    def __post_init__(self) -> None:
        if self.per_position < 1 or self.grid < 1 or self.expand <= 0:
            raise LoupeError("per_position and grid must be >= 1 and expand > 0")
        if not 0.0 < self.top_frac <= 1.0:
            raise LoupeError(f"top_frac must be in (0, 1], got {self.top_frac}")
        if self.smooth_radius < 0 or self.overlay_frames < 0:
            raise LoupeError("smooth_radius and overlay_frames must be >= 0")


def _patch_geometry(obs_hw: tuple[int, int], layer_hw: tuple[int, int], expand: float):
    """(pixels per layer cell (y, x), patch size (h, w)) for patches of ``expand`` cells."""
    unit = (obs_hw[0] / layer_hw[0], obs_hw[1] / layer_hw[1])
    size = (max(1, round(expand * unit[0])), max(1, round(expand * unit[1])))
    return unit, size


def _padded(obs: np.ndarray, index: int, pad: int) -> np.ndarray:
    """Observation ``index`` as (H + 2 pad, W + 2 pad, 3) RGB inside a checkerboard border."""
    return render.pad_with_checkerboard(render.obs_to_rgb(obs[index]), pad)


def _patch(padded: np.ndarray, pad: int, y: int, x: int, unit, size) -> np.ndarray:
    """The ``size`` patch around layer cell (y, x) of a padded image; off-screen is checkered."""
    return render.crop_around(padded, pad, ((y + 0.5) * unit[0], (x + 0.5) * unit[1]), size)


def dataset_example_image(
    obs: np.ndarray, examples: list[Example], layer_hw: tuple[int, int], expand=4.0, grid=4
) -> np.ndarray:
    """(grid x grid) patches of the examples, strongest first, row-major -> (H, W, 3) float."""
    unit, size = _patch_geometry(tuple(obs.shape[-2:]), layer_hw, expand)
    pad = max(size)
    patches = [_patch(_padded(obs, e.obs_index, pad), pad, e.y, e.x, unit, size) for e in examples]
    if not patches:
        patches = [render.checkerboard(*size)]
    return render.tile(patches, grid, grid)


def spatial_example_image(obs: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """Each layer cell shows its chosen observation's patch of that cell -> (H, W, 3) float."""
    h, w = chosen.shape
    unit, size = _patch_geometry(tuple(obs.shape[-2:]), (h, w), 1.0)
    pad = max(size)
    padded = {int(i): _padded(obs, int(i), pad) for i in np.unique(chosen)}
    out = np.zeros((h * size[0], w * size[1], 3))
    for y in range(h):
        for x in range(w):
            patch = _patch(padded[int(chosen[y, x])], pad, y, x, unit, size)
            out[y * size[0] : (y + 1) * size[0], x * size[1] : (x + 1) * size[1]] = patch
    return out


def overlay_colours(
    features: np.ndarray,
    obs_hw: tuple[int, int],
    sign: int = 1,
    radius: int = 7,
    scale: float | None = None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Coloured feature overlay of (N, K, h, w) feature maps at observation size.

    Takes the ``sign`` part max(sign t, 0), divides by ``scale`` (default: the median over frames
    of each frame's max), colours sum_k t_k hue(360 k / K), smooths at layer resolution with the
    exp(-d) disk kernel and upsamples. Returns (colour (N, H, W, 3): the hue at full brightness,
    opacity (N, H, W) = min(1, |rgb|), the divisor).
    """
    part = np.maximum(sign * np.asarray(features, dtype=np.float64), 0.0)  # (N, K, h, w)
    if scale is None:
        scale = part_scale(features, sign)
    rgb = render.smooth(render.colourise(part / scale), radius)  # (N, 3, h, w)
    rgb = render.upsample(rgb, obs_hw).transpose(0, 2, 3, 1)  # (N, H, W, 3)
    colour, alpha = render.brightness_to_opacity(rgb)
    return colour, alpha, scale


def write_feature_visualisations(
    out_dir: str | Path,
    nmf: AttributionNMF,
    attr: Any,
    obs: Any,
    activations: Any = None,
    frames: list[int] | None = None,
    config: FeatureVisConfig | None = None,
    features: np.ndarray | None = None,
) -> dict[str, Any]:
    """Write overlays and dataset examples of every feature as PNG figures plus ``features.json``.

    ``attr`` (N, C, h, w) attributions give the overlays; ``activations`` (same shape, default
    ``attr``) give the feature activations the dataset examples rank by; ``obs`` (N, C, H, W);
    ``features`` is ``nmf.transform(attr)`` when the caller has it already. Overlays
    (``overlay/positive-NNNNN.png``, ``overlay/negative-NNNNN.png``) show the frame, the frame with
    the features composited on it and a legend in the feature colours; ``featureK-examples.png`` is
    a captioned grid of upscaled patches, ``featureK-spatial.png`` the spatially aware grid.
    Returns the JSON index that was written.
    """
    config = config or FeatureVisConfig()
    out = Path(out_dir)
    obs = _as_obs(obs)
    attr = _as_maps(attr)
    acts = attr if activations is None else _as_maps(activations, "activations")
    if obs.shape[0] != attr.shape[0] or acts.shape != attr.shape:
        raise LoupeError(
            f"observations {obs.shape}, attributions {attr.shape} and activations {acts.shape} "
            "must describe the same frames of one layer"
        )
    index: dict[str, Any] = {"nmf": nmf.to_dict(), "layer_hw": list(attr.shape[-2:])}
    index["hues"] = render.feature_hues(nmf.n_components).tolist()
    if features is None:
        features = nmf.transform(attr)  # (N, K, h, w); sklearn's transform is an iterative solve
    index["overlays"] = _write_overlays(out, features, obs, frames, config)
    feature_acts = features if activations is None else nmf.transform(acts)
    index["features"] = [
        _write_feature(out, k, feature_acts, obs, config) for k in range(nmf.n_components)
    ]
    render.write_json(out / "features.json", index)
    return index


def _as_obs(obs: Any) -> np.ndarray:
    if isinstance(obs, torch.Tensor):
        obs = obs.detach().cpu().numpy()
    obs = np.asarray(obs)
    if obs.ndim != 4:
        raise LoupeError(f"observations must be (N, C, H, W), got shape {obs.shape}")
    return obs


def _write_overlays(out: Path, features, obs, frames, config: FeatureVisConfig) -> dict[str, Any]:
    frames = list(range(min(len(obs), config.overlay_frames))) if frames is None else list(frames)
    written: dict[str, Any] = {"frames": frames}
    hues = render.feature_hues(features.shape[1])
    for sign, name, news in ((1, "positive", "good news"), (-1, "negative", "bad news")):
        colour, alpha, scale = overlay_colours(
            features[frames] if frames else features[:1], tuple(obs.shape[-2:]), sign,
            config.smooth_radius, scale=part_scale(features, sign),
        )  # fmt: skip
        written[f"{name}_scale"] = scale
        for j, i in enumerate(frames):
            title = f"NMF features of {name} value attribution ({news}), frame {i}"
            fig = render.nmf_overlay_figure(render.obs_to_rgb(obs[i]), colour[j], alpha[j], hues,
                                            title)  # fmt: skip
            render.save_figure(out / "overlay" / f"{name}-{i:05d}.png", fig)
    return written


def part_scale(features: np.ndarray, sign: int) -> float:
    """The display divisor of the ``sign`` part: the median over frames of each frame's max."""
    part = np.maximum(sign * np.asarray(features, dtype=np.float64), 0.0)
    scale = float(np.median(part.reshape(part.shape[0], -1).max(axis=1)))
    return scale if scale > 0 else 1.0


def _write_feature(out: Path, k: int, act, obs, config: FeatureVisConfig) -> dict[str, Any]:
    """Dataset-example and spatially aware PNGs of feature ``k`` of (N, K, h, w) ``act``."""
    layer_hw = tuple(act.shape[-2:])
    hue = render.feature_hues(act.shape[1])[k]
    examples = dataset_examples(act, k, config.grid**2, config.per_position)
    unit, size = _patch_geometry(tuple(obs.shape[-2:]), layer_hw, config.expand)
    pad = max(size)
    patches = [_patch(_padded(obs, e.obs_index, pad), pad, e.y, e.x, unit, size) for e in examples]
    captions = [f"obs {e.obs_index} ({e.y},{e.x}) {e.activation:.2g}" for e in examples]
    title = f"feature {k} of {act.shape[1]}: its {len(examples)} strongest dataset examples"
    fig = render.examples_figure(patches or [render.checkerboard(*size)], captions, config.grid,
                                 hue, title)  # fmt: skip
    render.save_figure(out / f"feature{k}-examples.png", fig)
    chosen = spatial_examples(act, k, config.top_frac)
    fig = render.image_figure(
        spatial_example_image(obs, chosen),
        f"feature {k}: spatially aware dataset examples",
        f"each cell: the observation where feature {k} is strongest at that position",
    )
    render.save_figure(out / f"feature{k}-spatial.png", fig)
    return {
        "feature": k,
        "examples": [e._asdict() for e in examples],
        "spatial": chosen.tolist(),
        "reuse_cap": reuse_cap(act.shape[0], *layer_hw, config.top_frac),
    }
