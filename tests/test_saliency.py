"""Input saliency against closed forms, finite differences and slow reference loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter
from torch import nn

from attention import PolicyOutput, build_policy, list_policies
from loupe.errors import LoupeError
from probes.saliency import (
    NoiseConfig,
    attention_gradient,
    gaussian_blur,
    gradient_saliency,
    input_gradient,
    newest_frame,
    noisy_copies,
    perturbation_saliency,
    smoothgrad,
    vargrad,
)


class TinyPolicy(nn.Module):
    """A small policy on the probe interface: attention logits are linear in the input.

    attention_logits = conv1x1(x) so d(sum logits)/dx[c] = (sum over maps of w[m, c]) * 1.
    """

    def __init__(self, obs_shape=(3, 10, 12), n_actions=3, reads=None):
        super().__init__()
        torch.manual_seed(0)
        self.obs_shape, self.n_actions = obs_shape, n_actions
        self.spec = {"name": "tiny"}
        self.has_attention = True
        c = obs_shape[0]
        self.reads = reads if reads is not None else list(range(c))
        self.att = nn.Conv2d(c, 2, 1)
        self.conv = nn.Conv2d(len(self.reads), 4, 3)
        feat = 4 * (obs_shape[1] - 2) * (obs_shape[2] - 2)
        self.pi, self.v = nn.Linear(feat, n_actions), nn.Linear(feat, 1)

    def forward(self, obs):
        x = obs.float() / 255 if obs.dtype == torch.uint8 else obs
        logits = self.att(x)
        h = torch.tanh(self.conv(x[:, self.reads])).flatten(1)
        return PolicyOutput(self.pi(h), self.v(h)[:, 0], torch.sigmoid(logits), logits)


def loop_gradients(policy, x, target):
    """Reference: one forward/backward per observation."""
    out = []
    for xi in x:
        xi = xi[None].clone().requires_grad_(True)
        o = policy(xi)
        if target == "attention":
            y = o.attention_logits.sum()
        else:
            y = o.value[0] if target == "value" else o.logits[0, 1]
        (g,) = torch.autograd.grad(y, xi)
        out.append(g[0])
    return torch.stack(out)


@pytest.mark.unit
def test_attention_gradient_closed_form():
    policy = TinyPolicy()
    obs = torch.randint(0, 256, (2, 3, 10, 12), dtype=torch.uint8)
    expected = policy.att.weight.detach().sum(0)[:, 0, 0] ** 2  # (C,)
    got = attention_gradient(policy, obs)
    assert got.shape == (2, 3, 10, 12)
    torch.testing.assert_close(got, expected.view(1, 3, 1, 1).expand_as(got))


@pytest.mark.unit
def test_region_attention_gradient_matches_finite_differences():
    torch.manual_seed(1)
    policy = build_policy("region", (4, 84, 84), 4).double()
    x = torch.rand(1, 4, 84, 84, dtype=torch.float64)
    grad = input_gradient(policy, x, "attention")
    torch.testing.assert_close(attention_gradient(policy, x), grad**2)
    eps = 1e-6
    for idx in [(0, 3, 40, 40), (0, 0, 10, 70), (0, 2, 83, 0)]:
        bumped = [x.clone(), x.clone()]
        bumped[0][idx] += eps
        bumped[1][idx] -= eps
        f = [policy(b).attention_logits.sum().item() for b in bumped]
        assert grad[idx].item() == pytest.approx((f[0] - f[1]) / (2 * eps), rel=1e-4, abs=1e-9)


@pytest.mark.unit
@pytest.mark.parametrize("target", ["value", "logit:1", "attention"])
def test_gradient_saliency_matches_a_per_observation_loop(target):
    policy = TinyPolicy()
    obs = torch.randint(0, 256, (3, 3, 10, 12), dtype=torch.uint8)
    ref = loop_gradients(policy, obs.float() / 255, target)
    torch.testing.assert_close(input_gradient(policy, obs, target), ref)
    torch.testing.assert_close(gradient_saliency(policy, obs, target), ref**2)


@pytest.mark.unit
def test_noisy_copies():
    x = torch.rand(2, 4, 30, 30) * torch.tensor([1.0, 0.5]).view(2, 1, 1, 1)
    cfg = NoiseConfig(n=40, sigma=0.15, seed=3)
    copies = noisy_copies(x, cfg)
    assert copies.shape == (2, 40, 4, 30, 30)
    torch.testing.assert_close(copies[:, 0], x)  # first copy noise-free
    spread = x.flatten(1).amax(1) - x.flatten(1).amin(1)
    std = (copies[:, 1:] - x[:, None]).flatten(1).std(1)
    torch.testing.assert_close(std, 0.15 * spread, rtol=0.02, atol=0)
    torch.testing.assert_close(noisy_copies(x, cfg), copies)  # same seed, same copies


@pytest.mark.unit
@pytest.mark.parametrize("square", [True, False])
def test_smoothgrad_and_vargrad_match_a_slow_loop(square):
    policy = TinyPolicy()
    obs = torch.randint(0, 256, (2, 3, 10, 12), dtype=torch.uint8)
    kw = {"n": 6, "sigma": 0.2, "seed": 7, "square": square, "batch_size": 4}
    copies = noisy_copies(obs.float() / 255, NoiseConfig(**kw))
    grads = np.stack([loop_gradients(policy, c, "logit:1").numpy() for c in copies])
    grads = grads**2 if square else grads
    sg = smoothgrad(policy, obs, "logit:1", **kw)
    vg = vargrad(policy, obs, "logit:1", **kw)
    np.testing.assert_allclose(sg.numpy(), grads.mean(1), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(vg.numpy(), grads.var(1), rtol=1e-4, atol=1e-9)
    assert vg.abs().max() > 0


@pytest.mark.unit
def test_smoothgrad_with_one_copy_is_the_plain_gradient():
    torch.manual_seed(2)
    policy = build_policy("region", (4, 84, 84), 4)
    obs = torch.randint(0, 256, (1, 4, 84, 84), dtype=torch.uint8)
    plain = attention_gradient(policy, obs)
    torch.testing.assert_close(smoothgrad(policy, obs, "attention", n=1), plain)
    torch.testing.assert_close(
        smoothgrad(policy, obs, "attention", n=1, square=False),
        input_gradient(policy, obs, "attention"),
    )
    assert vargrad(policy, obs, "attention", n=1).abs().max() == 0


@pytest.mark.unit
def test_newest_frame():
    x = torch.arange(2 * 4 * 3 * 3, dtype=torch.float32).view(2, 4, 3, 3)
    torch.testing.assert_close(newest_frame(x), x[:, 3])
    rgb = x[:, :3]
    torch.testing.assert_close(newest_frame(rgb), rgb.sum(1))
    torch.testing.assert_close(newest_frame(x, frame_channels=2), x[:, 2] + x[:, 3])
    with pytest.raises(LoupeError):
        newest_frame(x, frame_channels=5)


@pytest.mark.unit
@pytest.mark.parametrize("name", list_policies())
def test_every_policy(name):
    torch.manual_seed(4)
    shape = (3, 64, 64) if name in ("impala", "interpretable") else (4, 84, 84)
    policy = build_policy(name, shape, 5)
    obs = torch.randint(0, 256, (1, *shape), dtype=torch.uint8)
    sal = gradient_saliency(policy, obs, "value")
    assert sal.shape == (1, *shape) and torch.isfinite(sal).all() and sal.max() > 0
    if policy.has_attention and policy(obs).attention_logits is not None:
        sal = attention_gradient(policy, obs)
        assert sal.shape == (1, *shape) and sal.min() >= 0 and sal.max() > 0
    else:
        with pytest.raises(LoupeError, match="attention"):
            attention_gradient(policy, obs)


# -- perturbation saliency --------------------------------------------------------------------


def greydanus_reference(policy, x, target, stride, radius):
    """Slow loop over grid points in numpy/scipy, perturbing the last channel of one (C, H, W)."""
    c, h, w = x.shape
    xn = x.numpy().astype(np.float64)

    def readout(arr):
        with torch.no_grad():
            o = policy(torch.from_numpy(arr[None]).to(x.dtype))
        return (o.value[:, None] if target == "value" else o.logits)[0].double().numpy()

    base = readout(xn)
    blurred = gaussian_filter(xn[-1], sigma=3)
    ys, xs = list(range(0, h, stride)), list(range(0, w, stride))
    grid = np.zeros((len(ys), len(xs)))
    for a, i in enumerate(ys):
        for b, j in enumerate(xs):
            yy, xx = np.ogrid[-i : h - i, -j : w - j]
            mask = np.zeros((h, w))
            mask[xx * xx + yy * yy <= 1] = 1
            mask = gaussian_filter(mask, sigma=radius)
            mask /= mask.max()
            pert = xn.copy()
            pert[-1] = xn[-1] * (1 - mask) + blurred * mask
            grid[a, b] = 0.5 * ((base - readout(pert)) ** 2).sum()
    return grid


@pytest.mark.unit
@pytest.mark.parametrize("target", ["value", "logits"])
def test_perturbation_saliency_matches_a_slow_loop(target):
    policy = TinyPolicy((2, 16, 13), n_actions=3).double()
    obs = torch.rand(2, 2, 16, 13, dtype=torch.float64)
    grid = perturbation_saliency(policy, obs, target, stride=3, radius=2.0, upsample=False)
    assert grid.shape == (2, 6, 5)
    for k in range(2):
        ref = greydanus_reference(policy, obs[k], target, 3, 2.0)
        np.testing.assert_allclose(grid[k].numpy(), ref, rtol=1e-8, atol=1e-14)
        assert ref.max() > 0
    full = perturbation_saliency(policy, obs, target, stride=3, radius=2.0, batch_size=7)
    assert full.shape == (2, 16, 13)
    for k in range(2):  # bilinear upsampling of the grid, checked against PIL's resize
        img = Image.fromarray(grid[k].numpy().astype(np.float32), mode="F")
        ref = np.asarray(img.resize((13, 16), Image.BILINEAR))
        np.testing.assert_allclose(full[k].numpy(), ref, rtol=1e-4, atol=1e-6 * ref.max())


@pytest.mark.unit
def test_perturbation_on_a_real_policy_matches_the_loop():
    torch.manual_seed(3)
    policy = build_policy("nature", (4, 84, 84), 4).double()
    obs = torch.randint(0, 256, (1, 4, 84, 84), dtype=torch.uint8)
    x = obs.double() / 255
    grid = perturbation_saliency(policy, x, "logits", stride=21, upsample=False)
    ref = greydanus_reference(policy, x[0], "logits", 21, 5.0)
    np.testing.assert_allclose(grid[0].numpy(), ref, rtol=1e-7, atol=1e-16)


@pytest.mark.unit
def test_only_the_newest_frame_is_perturbed():
    obs = torch.rand(1, 3, 12, 12)
    blind = TinyPolicy((3, 12, 12), reads=[0, 1])  # ignores the newest frame (channel 2)
    seeing = TinyPolicy((3, 12, 12), reads=[2])
    kw = {"stride": 4, "radius": 2.0, "frame_channels": 1}
    # batched and single forward passes may differ in the last bits
    assert perturbation_saliency(blind, obs, "value", **kw).abs().max() < 1e-12
    assert perturbation_saliency(seeing, obs, "value", **kw).abs().max() > 1e-6


@pytest.mark.unit
def test_gaussian_blur_matches_scipy():
    img = torch.rand(3, 20, 9, dtype=torch.float64)  # narrower than the kernel: repeated mirroring
    for sigma in (1.0, 3.0, 5.0):
        ref = np.stack([gaussian_filter(i, sigma=sigma) for i in img.numpy()])
        np.testing.assert_allclose(gaussian_blur(img, sigma).numpy(), ref, atol=1e-12)


@pytest.mark.unit
def test_bad_input():
    nature = build_policy("nature", (4, 84, 84), 4)
    obs = torch.zeros(1, 4, 84, 84, dtype=torch.uint8)
    with pytest.raises(LoupeError, match="has no attention"):
        attention_gradient(nature, obs)
    with pytest.raises(LoupeError, match="out of range"):
        gradient_saliency(nature, obs, "logit:7")
    with pytest.raises(LoupeError, match="one target"):
        gradient_saliency(nature, obs, "all")
    with pytest.raises(LoupeError, match=r"\(N, 4, 84, 84\)"):
        smoothgrad(nature, torch.zeros(1, 84, 84, 4, dtype=torch.uint8))
    with pytest.raises(LoupeError, match="uint8 or float"):
        smoothgrad(nature, obs.long())
    with pytest.raises(LoupeError, match="n >= 1"):
        smoothgrad(nature, obs, n=0)
    with pytest.raises(LoupeError, match="'value' or 'logits'"):
        perturbation_saliency(nature, obs, "logit:1")
    with pytest.raises(LoupeError, match="stride"):
        perturbation_saliency(nature, obs, stride=0)
