"""Image helpers for probe artifacts: PNG and JSON writing, feature hues, smoothing, checkerboards.

Images here are numpy arrays laid out (H, W, 3) or (H, W, 4) with float values in [0, 1] (uint8 is
accepted where noted); observations arrive NCHW uint8 as everywhere else in loupe.
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
    """(..., 3) colour -> (colour scaled to unit brightness where brighter, opacity min(1, |rgb|))."""
    norm = np.linalg.norm(rgb, axis=-1, keepdims=True)  # (..., 1)
    alpha = np.minimum(1.0, norm)
    colour = np.divide(rgb, alpha, out=np.zeros_like(rgb), where=alpha > 0)
    return np.clip(colour, 0.0, 1.0), alpha[..., 0]


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
