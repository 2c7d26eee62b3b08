"""Policy networks: shapes, parameter counts by hand, attention properties, naive-loop references."""

from __future__ import annotations

import math

import pytest
import torch

from attention import build_policy, list_policies
from attention.selfattn import cwca, cwra, swa
from loupe.errors import LoupeError

ATARI, PROCGEN = (4, 84, 84), (3, 64, 64)


def conv_params(cin, cout, k):
    return cin * cout * k * k + cout


def linear_params(din, dout):
    return din * dout + dout


@pytest.mark.unit
@pytest.mark.parametrize("name", list_policies())
@pytest.mark.parametrize("shape", [ATARI, PROCGEN])
def test_output_shapes_and_split_identity(name, shape):
    torch.manual_seed(0)
    policy = build_policy(name, shape, 6)
    obs = torch.randint(0, 256, (3, *shape), dtype=torch.uint8)
    out = policy(obs)
    assert out.logits.shape == (3, 6) and out.value.shape == (3,)
    assert (out.attention is not None) == policy.has_attention
    acts = policy.activations(obs)
    assert list(acts) == list(policy.layer_names)
    for layer in policy.layer_names:
        a = policy.forward_to(obs, layer)
        assert torch.equal(a, acts[layer])
        logits, value = policy.forward_from(layer, a)
        torch.testing.assert_close(logits, out.logits, rtol=0, atol=1e-6)
        torch.testing.assert_close(value, out.value, rtol=0, atol=1e-6)
    # uint8 input is scaled by 1/255 inside; the same frames as floats give the same output
    out_f = policy(obs.float() / 255)
    torch.testing.assert_close(out_f.logits, out.logits)


@pytest.mark.unit
def test_nature_parameter_count_by_hand():
    policy = build_policy("nature", ATARI, 6)
    expected = (
        conv_params(4, 32, 8)
        + conv_params(32, 64, 4)
        + conv_params(64, 64, 3)
        + linear_params(64 * 7 * 7, 512)
        + linear_params(512, 6)
        + linear_params(512, 1)
    )
    assert expected == 1_687_719
    assert sum(p.numel() for p in policy.parameters()) == expected


@pytest.mark.unit
def test_region_parameter_count_by_hand():
    policy = build_policy("region", ATARI, 4)
    expected = (
        conv_params(4, 32, 8)
        + conv_params(32, 64, 4)
        + conv_params(64, 64, 3)
        + conv_params(64, 512, 1)
        + conv_params(512, 2, 1)
        + linear_params(3136, 512)
        + linear_params(512, 4)
        + linear_params(512, 1)
    )
    assert sum(p.numel() for p in policy.parameters()) == expected


@pytest.mark.unit
def test_impala_parameter_count_by_hand():
    policy = build_policy("impala", PROCGEN, 15)
    stage = lambda cin, c: conv_params(cin, c, 3) + 4 * conv_params(c, c, 3)  # noqa: E731
    expected = (
        stage(3, 16)
        + stage(16, 32)
        + stage(32, 32)
        + linear_params(32 * 8 * 8, 256)
        + linear_params(256, 15)
        + linear_params(256, 1)
    )
    assert sum(p.numel() for p in policy.parameters()) == expected


@pytest.mark.unit
def test_interpretable_parameter_count_and_layer_2b_shape():
    policy = build_policy("interpretable", PROCGEN, 15)
    expected = (
        conv_params(3, 16, 7)
        + conv_params(16, 32, 5)
        + 3 * conv_params(32, 32, 5)
        + linear_params(32 * 4 * 4, 256)
        + linear_params(256, 512)
        + linear_params(512, 15)
        + linear_params(512, 1)
    )
    assert sum(p.numel() for p in policy.parameters()) == expected
    obs = torch.zeros(1, *PROCGEN, dtype=torch.uint8)
    assert policy.forward_to(obs, "2b").shape == (1, 32, 16, 16)


@pytest.mark.unit
@pytest.mark.parametrize("variant", ["na", "swa", "cwra", "cwca", "cwrca"])
def test_sun_parameter_count_by_hand(variant):
    policy = build_policy(f"sun-{variant}", ATARI, 6)
    block = 3 * conv_params(16, 16, 1) if variant != "na" else 0
    expected = (
        conv_params(4, 16, 8)
        + block
        + conv_params(16, 32, 4)
        + linear_params(2592, 256)
        + linear_params(256, 6)
        + linear_params(256, 1)
    )
    assert sum(p.numel() for p in policy.parameters()) == expected


@pytest.mark.unit
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_region_attention_maps(kind):
    torch.manual_seed(1)
    policy = build_policy("region", ATARI, 4, attention=kind)
    out = policy(torch.randint(0, 256, (5, *ATARI), dtype=torch.uint8))
    assert out.attention.shape == (5, 2, 7, 7)
    assert out.attention_logits.shape == (5, 2, 7, 7)
    if kind == "softmax":
        torch.testing.assert_close(out.attention.sum(dim=(2, 3)), torch.ones(5, 2))
    else:
        torch.testing.assert_close(out.attention, torch.sigmoid(out.attention_logits))


@pytest.mark.unit
def test_uniform_region_attention_has_entropy_2_ln_49():
    policy = build_policy("region", ATARI, 4)
    with torch.no_grad():
        policy.a2.weight.zero_()
        policy.a2.bias.zero_()
    out = policy(torch.randint(0, 256, (2, *ATARI), dtype=torch.uint8))
    torch.testing.assert_close(out.attention, torch.full((2, 2, 7, 7), 1 / 49))
    # p = 1/49 + 1e-7, two maps of 49 positions
    p = 1 / 49 + 1e-7
    assert out.attention_entropy.shape == (2,)
    torch.testing.assert_close(
        out.attention_entropy, torch.full((2,), -2 * 49 * p * math.log(p)), rtol=1e-6, atol=1e-6
    )
    assert abs(out.attention_entropy[0].item() - 2 * math.log(49)) < 1e-3


@pytest.mark.unit
def test_region_gating_multiplies_normalised_features_by_summed_attention():
    torch.manual_seed(2)
    policy = build_policy("region", ATARI, 4)
    obs = torch.randint(0, 256, (2, *ATARI), dtype=torch.uint8)
    h = policy.forward_to(obs, "c3")
    hn = policy.forward_to(obs, "c3n")
    torch.testing.assert_close(hn.norm(dim=1), torch.ones(2, 7, 7), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hn, h / h.norm(dim=1, keepdim=True))
    g = policy.forward_to(obs, "attn_out")
    attn = policy(obs).attention
    torch.testing.assert_close(g, hn * attn.sum(1, keepdim=True))


# -- self-attention against naive loops -----------------------------------------------------------
def naive_sdpa_rows(q, k, v, n):
    """Generic: for each leading index, softmax(q[i] . k[j] / sqrt(n)) over j, weighted sum of v."""
    *lead, L, D = q.shape
    out = torch.zeros_like(q)
    for idx in torch.cartesian_prod(*[torch.arange(s) for s in lead]):
        idx = tuple(idx.tolist())
        for i in range(L):
            scores = torch.tensor([float(q[idx][i] @ k[idx][j]) / math.sqrt(n) for j in range(L)])
            w = torch.softmax(scores, 0)
            out[idx][i] = sum(w[j] * v[idx][j] for j in range(L))
    return out


def naive_swa(q, k, v):
    # within each (sample, channel): row i of the HxW map attends to row j; n = W
    return naive_sdpa_rows(q, k, v, q.shape[-1])


def naive_cwra(q, k, v):
    # within each (sample, column x): row y attends to row y' using channel vectors; n = C
    N, C, H, W = q.shape
    out = torch.zeros_like(q)
    for n in range(N):
        for x in range(W):
            for y in range(H):
                scores = torch.tensor(
                    [
                        float((q[n, :, y, x] @ k[n, :, y2, x]).detach()) / math.sqrt(C)
                        for y2 in range(H)
                    ]
                )
                w = torch.softmax(scores, 0)
                out[n, :, y, x] = sum(w[y2] * v[n, :, y2, x] for y2 in range(H))
    return out


def naive_cwca(q, k, v):
    # within each (sample, row y): column x attends to column x' using channel vectors; n = C
    N, C, H, W = q.shape
    out = torch.zeros_like(q)
    for n in range(N):
        for y in range(H):
            for x in range(W):
                scores = torch.tensor(
                    [
                        float((q[n, :, y, x] @ k[n, :, y, x2]).detach()) / math.sqrt(C)
                        for x2 in range(W)
                    ]
                )
                w = torch.softmax(scores, 0)
                out[n, :, y, x] = sum(w[x2] * v[n, :, y, x2] for x2 in range(W))
    return out


@pytest.mark.unit
@pytest.mark.parametrize(
    "fast, naive", [(swa, naive_swa), (cwra, naive_cwra), (cwca, naive_cwca)], ids=str
)
def test_self_attention_matches_naive_loops(fast, naive):
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 3, 4, 5, dtype=torch.float64) for _ in range(3))
    out, _ = fast(q, k, v)
    torch.testing.assert_close(out, naive(q, k, v))


@pytest.mark.unit
@pytest.mark.parametrize("scale", ["C", "W"])
def test_cwrca_block_is_sum_of_both_directions_plus_residual(scale):
    torch.manual_seed(4)
    policy = build_policy("sun-cwrca", ATARI, 6, cwrca_scale=scale).double()
    obs = torch.rand(1, *ATARI, dtype=torch.float64)
    h = policy.forward_to(obs, "c1")
    block = policy.block
    with torch.no_grad():
        q, k, v = block.q(h), block.k(h), block.v(h)
    n = 16 if scale == "C" else 20
    rows = naive_cwra(q, k, v) if scale == "C" else cwra(q, k, v, n)[0]
    cols = naive_cwca(q, k, v) if scale == "C" else cwca(q, k, v, n)[0]
    torch.testing.assert_close(policy.forward_to(obs, "block"), rows + cols + h)


@pytest.mark.unit
def test_sun_attention_map_is_pre_residual_output_summed_over_channels():
    torch.manual_seed(5)
    policy = build_policy("sun-swa", ATARI, 6)
    obs = torch.randint(0, 256, (2, *ATARI), dtype=torch.uint8)
    h = policy.forward_to(obs, "c1")
    out = policy(obs)
    pre = policy.forward_to(obs, "block") - h
    torch.testing.assert_close(out.attention, pre.sum(1, keepdim=True), rtol=1e-5, atol=1e-5)
    # entropy of softmax rows of length 20 lies in (0, ln 20]
    assert torch.all(out.attention_entropy > 0)
    assert torch.all(out.attention_entropy <= math.log(20) + 1e-6)


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.unit
def test_unknown_policy_lists_valid_names():
    with pytest.raises(LoupeError, match="impala.*region"):
        build_policy("resnet", ATARI, 4)


@pytest.mark.unit
def test_too_small_observation_is_refused():
    with pytest.raises(LoupeError, match="too small"):
        build_policy("nature", (4, 20, 20), 4)


@pytest.mark.unit
def test_bad_option_and_layer_and_obs():
    with pytest.raises(LoupeError, match="attention"):
        build_policy("region", ATARI, 4, attention="tanh")
    with pytest.raises(LoupeError, match="bad option"):
        build_policy("nature", ATARI, 4, colour="blue")
    policy = build_policy("nature", ATARI, 4)
    with pytest.raises(LoupeError, match="valid layers: c1, c2, c3, fc"):
        policy.forward_to(torch.zeros(1, *ATARI), "c9")
    with pytest.raises(LoupeError, match=r"\(N, 4, 84, 84\)"):
        policy(torch.zeros(1, 3, 64, 64))
    with pytest.raises(LoupeError, match="uint8 or float"):
        policy(torch.zeros(1, *ATARI, dtype=torch.int32))


@pytest.mark.unit
def test_next_layer_consumers():
    region = build_policy("region", ATARI, 4)
    assert region.next_layer("c3n") is region.a1
    interp = build_policy("interpretable", PROCGEN, 15)
    assert interp.next_layer("2b") is interp.conv3a
    with pytest.raises(LoupeError, match="no single linear consumer"):
        interp.next_layer("fc2")
