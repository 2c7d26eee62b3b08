"""Attention modules against their definitions: region maps and entropy, self-attention variants as
plain loops, L2 pooling as a plain loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import attention.nets as nets
from attention import build_policy
from attention.nets import l2_pool, relu_l2_pool
from attention.region import attention_entropy
from attention.selfattn import SelfAttentionBlock

ATARI = (4, 84, 84)


def plain_softmax(scores: list[float]) -> list[float]:
    top = max(scores)
    e = [math.exp(s - top) for s in scores]
    return [x / sum(e) for x in e]


def plain_entropy(p: list[float]) -> float:
    return -sum((x + 1e-7) * math.log(x + 1e-7) for x in p)


# -- region-sensitive attention (METHODS A) -------------------------------------------------------
@pytest.mark.unit
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_region_maps_logits_and_gating(kind):
    torch.manual_seed(1)
    policy = build_policy("region", ATARI, 4, attention=kind).double()
    obs = torch.rand(3, *ATARI, dtype=torch.float64)
    out = policy(obs)
    h = policy.forward_to(obs, "c3")
    hn = policy.forward_to(obs, "c3n")
    # unit L2 norm over channels at each position
    torch.testing.assert_close(hn, h / h.norm(dim=1, keepdim=True))
    logits = policy.a2(F.elu(policy.a1(hn)))
    torch.testing.assert_close(out.attention_logits, logits)
    assert out.attention.shape == (3, 2, 7, 7)
    if kind == "softmax":
        torch.testing.assert_close(
            out.attention.sum(dim=(2, 3)), torch.ones(3, 2, dtype=torch.float64)
        )
        expected = torch.exp(logits) / torch.exp(logits).sum(dim=(2, 3), keepdim=True)
    else:
        expected = 1 / (1 + torch.exp(-logits))
    torch.testing.assert_close(out.attention, expected)
    g = policy.forward_to(obs, "attn_out")
    torch.testing.assert_close(g, hn * (expected[:, :1] + expected[:, 1:]))


@pytest.mark.unit
def test_uniform_region_attention_has_entropy_2_ln_49():
    policy = build_policy("region", ATARI, 4)
    with torch.no_grad():
        policy.a2.weight.zero_()
        policy.a2.bias.zero_()
        out = policy(torch.randint(0, 256, (2, *ATARI), dtype=torch.uint8))
    torch.testing.assert_close(out.attention, torch.full((2, 2, 7, 7), 1 / 49))
    p = 1 / 49 + 1e-7  # two maps of 49 positions, p = attn + 1e-7
    torch.testing.assert_close(out.attention_entropy, torch.full((2,), -2 * 49 * p * math.log(p)))
    assert abs(out.attention_entropy[0].item() - 7.784) < 1e-3  # 2 ln 49 = 7.7836


@pytest.mark.unit
def test_attention_entropy_matches_a_plain_loop():
    torch.manual_seed(2)
    attn = torch.softmax(torch.randn(3, 2, 25, dtype=torch.float64) * 3, dim=-1).view(3, 2, 5, 5)
    expected = [
        sum(plain_entropy(attn[n, m].flatten().tolist()) for m in range(2)) for n in range(3)
    ]
    torch.testing.assert_close(attention_entropy(attn), torch.tensor(expected, dtype=torch.float64))


# -- self-attention (METHODS B) as plain loops ------------------------------------------------------
def naive_swa(q, k, v):
    """Within each (sample, channel), row i attends to rows j: scores q[i,:] . k[j,:] / sqrt(W)."""
    N, C, H, W = q.shape
    out, rows = np.zeros_like(q), []
    for n in range(N):
        for c in range(C):
            for i in range(H):
                w = plain_softmax([float(q[n, c, i] @ k[n, c, j]) / math.sqrt(W) for j in range(H)])
                out[n, c, i] = sum(w[j] * v[n, c, j] for j in range(H))
                rows.append((n, w))
    return out, rows


def naive_cwra(q, k, v, scale):
    """Within each (sample, column x), row y attends to rows y' over channel vectors."""
    N, C, H, W = q.shape
    out, rows = np.zeros_like(q), []
    for n in range(N):
        for x in range(W):
            for y in range(H):
                s = [float(q[n, :, y, x] @ k[n, :, y2, x]) / math.sqrt(scale) for y2 in range(H)]
                w = plain_softmax(s)
                out[n, :, y, x] = sum(w[y2] * v[n, :, y2, x] for y2 in range(H))
                rows.append((n, w))
    return out, rows


def naive_cwca(q, k, v, scale):
    """Within each (sample, row y), column x attends to columns x' over channel vectors."""
    N, C, H, W = q.shape
    out, rows = np.zeros_like(q), []
    for n in range(N):
        for y in range(H):
            for x in range(W):
                s = [float(q[n, :, y, x] @ k[n, :, y, x2]) / math.sqrt(scale) for x2 in range(W)]
                w = plain_softmax(s)
                out[n, :, y, x] = sum(w[x2] * v[n, :, y, x2] for x2 in range(W))
                rows.append((n, w))
    return out, rows


def naive_attention(variant, q, k, v, cwrca_scale="C"):
    C, W = q.shape[1], q.shape[3]
    if variant == "swa":
        return naive_swa(q, k, v)
    if variant == "cwra":
        return naive_cwra(q, k, v, C)
    if variant == "cwca":
        return naive_cwca(q, k, v, C)
    scale = C if cwrca_scale == "C" else W
    rows_out, rows = naive_cwra(q, k, v, scale)
    cols_out, cols = naive_cwca(q, k, v, scale)
    return rows_out + cols_out, rows + cols


def random_block(variant, cwrca_scale="C", channels=4):
    block = SelfAttentionBlock(channels, variant, cwrca_scale).double()
    with torch.no_grad():
        for conv in (block.q, block.k, block.v):
            conv.weight.normal_()
            conv.bias.normal_()
    return block


@pytest.mark.unit
@pytest.mark.parametrize(
    "variant, scale",
    [("swa", "C"), ("cwra", "C"), ("cwca", "C"), ("cwrca", "C"), ("cwrca", "W")],
)
def test_self_attention_block_matches_plain_loops(variant, scale):
    torch.manual_seed(3)
    block = random_block(variant, scale)
    h = torch.rand(2, 4, 5, 6, dtype=torch.float64)  # H != W != C so a wrong axis shows
    with torch.no_grad():
        q, k, v = (m(h).numpy() for m in (block.q, block.k, block.v))
        out, extras = block(h)
    ref, rows = naive_attention(variant, q, k, v, scale)
    torch.testing.assert_close(out, torch.from_numpy(ref) + h)
    torch.testing.assert_close(extras["attention"], torch.from_numpy(ref).sum(1, keepdim=True))
    entropy = [np.mean([plain_entropy(w) for n, w in rows if n == i]) for i in range(2)]
    torch.testing.assert_close(
        extras["attention_entropy"], torch.tensor(entropy, dtype=torch.float64)
    )


@pytest.mark.unit
@pytest.mark.parametrize("variant", ["swa", "cwra", "cwca", "cwrca"])
def test_uniform_self_attention_entropy_is_log_length(variant):
    # zero query weights -> all scores equal -> uniform rows of length H (swa, cwra) or W (cwca)
    block = random_block(variant)
    with torch.no_grad():
        block.q.weight.zero_()
        block.q.bias.zero_()
        _, extras = block(torch.rand(1, 4, 5, 6, dtype=torch.float64))

    def h_uniform(length):
        p = 1 / length + 1e-7
        return -length * p * math.log(p)

    expected = {
        "swa": h_uniform(5),
        "cwra": h_uniform(5),
        "cwca": h_uniform(6),
        "cwrca": (h_uniform(5) + h_uniform(6)) / 2,  # the same number of rows in each direction
    }[variant]
    assert extras["attention_entropy"].item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.unit
@pytest.mark.parametrize("name", ["sun-swa", "sun-cwca"])
def test_sun_policy_block_matches_plain_loops(name):
    torch.manual_seed(4)
    policy = build_policy(name, (4, 36, 36), 3).double()  # c1: 36 -> 8x8, c2: 8 -> 3x3
    obs = torch.rand(1, 4, 36, 36, dtype=torch.float64)
    with torch.no_grad():
        h = policy.forward_to(obs, "c1")
        q, k, v = (m(h).numpy() for m in (policy.block.q, policy.block.k, policy.block.v))
        out = policy(obs)
    ref, _ = naive_attention(name.split("-")[1], q, k, v)
    torch.testing.assert_close(policy.forward_to(obs, "block"), torch.from_numpy(ref) + h)
    torch.testing.assert_close(out.attention, torch.from_numpy(ref).sum(1, keepdim=True))
    assert out.attention_logits is None


# -- L2 pooling (interpretable network) -----------------------------------------------------------
@pytest.mark.unit
def test_l2_pool_matches_a_plain_loop_including_odd_edges():
    torch.manual_seed(5)
    x = torch.randn(1, 2, 5, 7, dtype=torch.float64)
    out = l2_pool(x)
    assert out.shape == (1, 2, 3, 4)
    for c in range(2):
        for i in range(3):
            for j in range(4):
                window = x[0, c, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].flatten().tolist()
                expected = math.sqrt(sum(a * a for a in window) / len(window) + 1e-8)
                assert out[0, c, i, j].item() == pytest.approx(expected, rel=1e-12)


def _autograd_relu_l2_pool(z: torch.Tensor) -> torch.Tensor:
    """The chain relu_l2_pool replaces: autograd's own backward through every op."""
    return l2_pool(F.relu(z))


def _value_and_grad(fn, z: torch.Tensor, seed: int = 0):
    z = z.detach().clone().requires_grad_(True)
    y = fn(z)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.dtype)
    (dz,) = torch.autograd.grad(y, z, g)
    return y.detach(), dz


@pytest.mark.unit
@pytest.mark.parametrize(
    ("shape", "dtype", "channels_last"),
    [
        ((2, 3, 5, 7), torch.float64, False),  # odd edges: windows of 2 and 1
        ((4, 16, 64, 64), torch.float32, False),
        ((4, 16, 64, 64), torch.float32, True),
        ((2, 8, 21, 11), torch.float32, True),
        ((4, 32, 32, 32), torch.bfloat16, True),  # what runs under bf16 autocast
    ],
)
def test_relu_l2_pool_gives_autograds_values_and_gradients_bit_for_bit(shape, dtype, channels_last):
    """The shorter backward reorders nothing: 2 g x equals g x + g x exactly, the ReLU mask is
    implied by x = 0, so values and input gradients equal autograd's chain bitwise."""
    torch.manual_seed(1)
    z = torch.randn(shape, dtype=torch.float64).to(dtype)
    if channels_last:
        z = z.contiguous(memory_format=torch.channels_last)
    want_y, want_dz = _value_and_grad(_autograd_relu_l2_pool, z)
    got_y, got_dz = _value_and_grad(relu_l2_pool, z)
    assert got_y.dtype == dtype and got_dz.dtype == dtype
    assert torch.equal(got_y, want_y)
    assert torch.equal(got_dz, want_dz)
    assert (got_dz[z <= 0] == 0).all()  # no gradient through the ReLU's zeros
    if channels_last:
        assert got_dz.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.unit
def test_relu_l2_pool_passes_gradcheck_and_needs_no_graph_without_gradients():
    torch.manual_seed(2)
    z = torch.randn(1, 2, 5, 7, dtype=torch.float64)
    z = torch.where(z.abs() < 1e-3, torch.full_like(z, 0.5), z)  # away from the ReLU's kink
    assert torch.autograd.gradcheck(relu_l2_pool, (z.requires_grad_(),))
    with torch.no_grad():
        y = relu_l2_pool(z)
    assert y.grad_fn is None
    assert torch.equal(y, l2_pool(F.relu(z.detach())))


@pytest.mark.unit
@pytest.mark.parametrize("channels_last", [False, True])
def test_interpretable_network_trains_exactly_as_with_autograds_l2_pool(monkeypatch, channels_last):
    """The whole interpretable CNN: logits, value and every weight gradient equal those of the
    plain autograd chain bit for bit (so checkpoints and runs are unchanged), fp32 and under
    bf16 autocast."""
    torch.manual_seed(3)
    policy = build_policy("interpretable", (3, 64, 64), 15)
    if channels_last:
        policy.to(memory_format=torch.channels_last)
    obs = torch.randint(0, 256, (6, 3, 64, 64), dtype=torch.uint8)

    def run(bf16: bool):
        policy.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = policy(obs)
        (out.logits.float().square().sum() + out.value.float().sum()).backward()
        return [out.logits.detach(), out.value.detach()] + [p.grad for p in policy.parameters()]

    for bf16 in (False, True):
        got = run(bf16)
        with monkeypatch.context() as m:
            m.setattr(nets, "relu_l2_pool", _autograd_relu_l2_pool)
            want = run(bf16)
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b)
