"""Input saliency: gradient, SmoothGrad, VarGrad (METHODS A) and perturbation saliency (METHODS E).

Gradient views differentiate a scalar target per observation with respect to the float input
(uint8 observations are scaled by 1/255 first) and square the gradient. Targets:
    "attention"            sum of the pre-normalisation attention logits (policies with attention)
    "value", "logit:I"     the value or one policy logit
    ("name", [a, b, ...])  an action group: the sum of its logits

SmoothGrad and VarGrad average (mean, variance) the squared gradient over ``n`` noisy copies of each
observation, the first copy noise-free, noise std = sigma * (max - min) of that observation.

Perturbation saliency (Greydanus et al. 2017) blurs a soft disk around each point of a grid on the
newest frame and scores the change of the policy logits or the value.

    sal = smoothgrad(policy, obs, target="attention", n=50)       # (N, C, H, W)
    view = newest_frame(sal)                                       # (N, H, W)
    pert = perturbation_saliency(policy, obs, target="value")      # (N, H, W)
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from loupe.errors import LoupeError
from probes.attribution import check_obs, target_matrix


@dataclasses.dataclass
class NoiseConfig:
    """Noisy copies for SmoothGrad / VarGrad."""

    #: copies per observation, the first one without noise
    n: int = 50
    #: noise standard deviation as a fraction of each observation's value range (max - min)
    sigma: float = 0.15
    #: seed of the noise generator (the same seed gives the same copies)
    seed: int = 0
    #: square the gradient of every copy before aggregating (METHODS A); False: raw gradients
    square: bool = True
    #: copies pushed through the policy at once
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.n < 1:
            raise LoupeError(f"SmoothGrad needs n >= 1 copies, got {self.n}")
        if self.sigma < 0:
            raise LoupeError(f"noise sigma must be >= 0, got {self.sigma}")
        if self.batch_size < 1:
            raise LoupeError(f"batch_size must be positive, got {self.batch_size}")


def float_input(policy, obs: torch.Tensor) -> torch.Tensor:
    """Checked observations as float in the policy's input scale (uint8 / 255)."""
    obs = check_obs(policy, obs)
    return obs.float() / 255.0 if obs.dtype == torch.uint8 else obs


def target_fn(policy, target):
    """A function x (M, C, H, W) float -> (M,) per-observation scalar target."""
    if target == "attention":
        if not policy.has_attention:
            raise LoupeError(
                f"policy {policy.spec['name']} has no attention; use target 'value' or 'logit:I'"
            )

        def attention_target(x: torch.Tensor) -> torch.Tensor:
            logits = policy(x).attention_logits
            if logits is None:
                raise LoupeError(
                    f"policy {policy.spec['name']} exposes no attention logits; "
                    "use target 'value' or 'logit:I'"
                )
            return logits.flatten(1).sum(1)

        return attention_target
    if target == "all" or isinstance(target, list):
        raise LoupeError(f"saliency takes one target, got {target!r}")
    _, weights = target_matrix([target], policy.n_actions)  # (1, 1 + A)

    def head_target(x: torch.Tensor) -> torch.Tensor:
        out = policy(x)
        return (torch.cat([out.value[:, None], out.logits], 1) @ weights.to(x).T)[:, 0]

    return head_target


def _grad(fn, x: torch.Tensor) -> torch.Tensor:
    """Gradient of fn(x).sum() w.r.t. x: per-observation gradients (observations are independent)."""
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(fn(x).sum(), x)
    return grad


def input_gradient(policy, obs: torch.Tensor, target="value") -> torch.Tensor:
    """Signed gradient of the target w.r.t. the float input -> (N, C, H, W)."""
    return _grad(target_fn(policy, target), float_input(policy, obs))


def gradient_saliency(policy, obs: torch.Tensor, target="value") -> torch.Tensor:
    """Squared input gradient of the target -> (N, C, H, W)."""
    return input_gradient(policy, obs, target) ** 2


def attention_gradient(policy, obs: torch.Tensor) -> torch.Tensor:
    """Squared gradient of the summed pre-softmax attention logits -> (N, C, H, W)."""
    return gradient_saliency(policy, obs, "attention")


def noisy_copies(x: torch.Tensor, cfg: NoiseConfig) -> torch.Tensor:
    """Float observations (N, C, H, W) -> (N, n, C, H, W) copies; copy 0 is x itself."""
    gen = torch.Generator(device=x.device).manual_seed(cfg.seed)
    noise = torch.randn((x.shape[0], cfg.n, *x.shape[1:]), generator=gen, device=x.device)
    noise[:, 0] = 0.0
    spread = (x.flatten(1).amax(1) - x.flatten(1).amin(1)) * cfg.sigma  # (N,)
    return x[:, None] + noise.to(x.dtype) * spread.view(-1, 1, 1, 1, 1)


def noisy_gradients(policy, obs: torch.Tensor, target="value", cfg: NoiseConfig | None = None):
    """Gradients of ``n`` noisy copies per observation -> (N, n, C, H, W), squared if cfg.square."""
    cfg = cfg or NoiseConfig()
    fn = target_fn(policy, target)
    copies = noisy_copies(float_input(policy, obs), cfg)  # (N, n, C, H, W)
    flat = copies.reshape(-1, *copies.shape[2:])
    grads = torch.cat([_grad(fn, chunk) for chunk in flat.split(cfg.batch_size)])
    grads = grads.view_as(copies)
    return grads**2 if cfg.square else grads


def smoothgrad(policy, obs: torch.Tensor, target="value", **noise) -> torch.Tensor:
    """SmoothGrad: mean over noisy copies of the (squared) gradient -> (N, C, H, W).

    Keyword arguments are NoiseConfig fields (n=50, sigma=0.15, seed=0, square=True, batch_size).
    """
    return noisy_gradients(policy, obs, target, NoiseConfig(**noise)).mean(1)


def vargrad(policy, obs: torch.Tensor, target="value", **noise) -> torch.Tensor:
    """VarGrad: population variance over the same noisy copies as smoothgrad -> (N, C, H, W)."""
    return noisy_gradients(policy, obs, target, NoiseConfig(**noise)).var(1, correction=0)


def newest_frame(x: torch.Tensor, frame_channels: int | None = None) -> torch.Tensor:
    """The newest frame of stacked observations or maps (N, C, H, W) -> (N, H, W).

    Frames are stacked oldest first; the newest frame is the last ``frame_channels`` channels,
    summed. Default: 3 for a single RGB frame (C == 3), else 1 (grayscale stacks).
    """
    k = _frame_channels(x.shape[1], frame_channels)
    return x[:, -k:].sum(1)


def _frame_channels(channels: int, frame_channels: int | None) -> int:
    k = frame_channels or (3 if channels == 3 else 1)
    if not 1 <= k <= channels:
        raise LoupeError(f"frame_channels must be in 1..{channels}, got {k}")
    return k


# -- perturbation saliency ------------------------------------------------------------------------


def gaussian_blur(img: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Separable Gaussian blur of (..., H, W) with mirror ('reflect' as in scipy.ndimage) edges.

    Kernel exp(-d^2 / 2 sigma^2) on |d| <= int(truncate * sigma + 0.5), normalised to sum 1.
    """
    radius = int(truncate * sigma + 0.5)
    d = torch.arange(-radius, radius + 1, dtype=img.dtype, device=img.device)
    kernel = torch.exp(-0.5 * (d / sigma) ** 2)
    kernel = kernel / kernel.sum()
    out = _blur_axis(img, kernel, radius, dim=-1)
    return _blur_axis(out, kernel, radius, dim=-2)


def _blur_axis(img: torch.Tensor, kernel: torch.Tensor, radius: int, dim: int) -> torch.Tensor:
    n = img.shape[dim]
    idx = torch.arange(-radius, n + radius, device=img.device) % (2 * n)
    idx = torch.where(idx >= n, 2 * n - 1 - idx, idx)  # half-sample symmetric extension
    padded = img.movedim(dim, -1).index_select(-1, idx)  # (..., n + 2r)
    windows = padded.unfold(-1, 2 * radius + 1, 1)  # (..., n, 2r + 1)
    return (windows @ kernel).movedim(-1, dim)


def grid_centres(size: int, stride: int) -> list[int]:
    return list(range(0, size, stride))


def perturbation_masks(
    h: int, w: int, stride: int, radius: float, dtype=torch.float32, device=None
) -> torch.Tensor:
    """Soft masks for every grid point -> (gh * gw, H, W), row-major over the grid.

    Each is the unit disk x^2 + y^2 <= 1 around the point, Gaussian-blurred with sigma ``radius``
    and divided by its max (Greydanus et al.).
    """
    ys = torch.arange(h, device=device).view(-1, 1)
    xs = torch.arange(w, device=device).view(1, -1)
    disks = [
        (((ys - i) ** 2 + (xs - j) ** 2) <= 1).to(dtype)
        for i in grid_centres(h, stride)
        for j in grid_centres(w, stride)
    ]
    masks = gaussian_blur(torch.stack(disks), radius)  # (P, H, W)
    return masks / masks.flatten(1).amax(1).view(-1, 1, 1)


def _readout(policy, x: torch.Tensor, target: str) -> torch.Tensor:
    out = policy(x)
    return out.value[:, None] if target == "value" else out.logits  # (M, D)


def perturbation_saliency(
    policy,
    obs: torch.Tensor,
    target: str = "value",
    stride: int = 5,
    radius: float = 5.0,
    blur_sigma: float = 3.0,
    frame_channels: int | None = None,
    batch_size: int = 128,
    upsample: bool = True,
) -> torch.Tensor:
    """Greydanus perturbation saliency -> (N, H, W) (or the (N, gh, gw) grid when not upsampling).

    At each grid point (stride ``stride``) the newest frame becomes I' = I (1 - M) + G(I) M with M
    the soft disk mask and G a Gaussian blur (sigma ``blur_sigma``); score 0.5 |L(I) - L(I')|^2 with L
    the policy logits (target "logits") or the value ("value"). The grid is bilinearly upsampled.
    """
    if target not in ("value", "logits"):
        raise LoupeError(f"perturbation target must be 'value' or 'logits', got {target!r}")
    if stride < 1 or radius <= 0 or blur_sigma <= 0:
        raise LoupeError("stride must be >= 1 and radius, blur_sigma > 0")
    x = float_input(policy, obs)  # (N, C, H, W)
    n, c, h, w = x.shape
    k = _frame_channels(c, frame_channels)
    masks = perturbation_masks(h, w, stride, radius, x.dtype, x.device)  # (P, H, W)
    gh, gw = grid_shape(h, w, stride)
    scores = torch.stack(
        [_scores(policy, xi, masks, k, blur_sigma, target, batch_size) for xi in x]
    )
    grid = scores.view(n, gh, gw)
    if not upsample:
        return grid
    return F.interpolate(grid[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]


@torch.no_grad()
def _scores(policy, x, masks, k, blur_sigma, target, batch_size) -> torch.Tensor:
    """Scores of one observation x (C, H, W) under every mask -> (P,)."""
    base = _readout(policy, x[None], target)  # (1, D)
    newest = x[-k:]  # (k, H, W)
    blurred = gaussian_blur(newest, blur_sigma)
    out = []
    for m in masks.split(batch_size):  # (B, H, W)
        m = m[:, None]  # (B, 1, H, W)
        perturbed = newest * (1 - m) + blurred * m  # (B, k, H, W)
        older = x[:-k].expand(len(m), -1, -1, -1) if k < x.shape[0] else perturbed[:, :0]
        batch = torch.cat([older, perturbed], 1)  # (B, C, H, W)
        out.append(0.5 * ((base - _readout(policy, batch, target)) ** 2).sum(1))
    return torch.cat(out)


def grid_shape(h: int, w: int, stride: int) -> tuple[int, int]:
    """Shape of the perturbation grid for an (h, w) frame."""
    return math.ceil(h / stride), math.ceil(w / stride)
