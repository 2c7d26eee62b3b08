"""Policy registry: shapes, hand-counted parameters, the split identity, init, specs, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from attention import build_policy, list_policies, policy_options
from loupe.errors import LoupeError

ATARI, PROCGEN = (4, 84, 84), (3, 64, 64)
SUN = ["sun-na", "sun-swa", "sun-cwra", "sun-cwca", "sun-cwrca"]

# activation shapes (without N) of every layer, worked out by hand from the kernel sizes and strides:
# conv k8 s4: 84 -> 20, 64 -> 15; k4 s2: 20 -> 9, 15 -> 6; k3 s1: 9 -> 7, 6 -> 4;
# impala pools and L2 pools halve rounding up: 84 -> 42 -> 21 -> 11 -> 6, 64 -> 32 -> 16 -> 8 -> 4
NATURE = {
    ATARI: {"c1": (32, 20, 20), "c2": (64, 9, 9), "c3": (64, 7, 7), "fc": (512,)},
    PROCGEN: {"c1": (32, 15, 15), "c2": (64, 6, 6), "c3": (64, 4, 4), "fc": (512,)},
}
LAYER_SHAPES = {
    "nature": NATURE,
    "region": {
        shape: {
            "c1": layers["c1"],
            "c2": layers["c2"],
            "c3": layers["c3"],
            "c3n": layers["c3"],
            "attn_out": layers["c3"],
            "fc": (512,),
        }
        for shape, layers in NATURE.items()
    },
    "impala": {
        ATARI: {"s1": (16, 42, 42), "s2": (32, 21, 21), "s3": (32, 11, 11), "fc": (256,)},
        PROCGEN: {"s1": (16, 32, 32), "s2": (32, 16, 16), "s3": (32, 8, 8), "fc": (256,)},
    },
    "interpretable": {
        ATARI: {
            "1a": (16, 42, 42),
            "2a": (32, 42, 42),
            "2b": (32, 21, 21),
            "3a": (32, 11, 11),
            "4a": (32, 6, 6),
            "fc1": (256,),
            "fc2": (512,),
        },
        PROCGEN: {
            "1a": (16, 32, 32),
            "2a": (32, 32, 32),
            "2b": (32, 16, 16),
            "3a": (32, 8, 8),
            "4a": (32, 4, 4),
            "fc1": (256,),
            "fc2": (512,),
        },
    },
    **{
        name: {
            ATARI: {"c1": (16, 20, 20), "block": (16, 20, 20), "c2": (32, 9, 9), "fc": (256,)},
            PROCGEN: {"c1": (16, 15, 15), "block": (16, 15, 15), "c2": (32, 6, 6), "fc": (256,)},
        }
        for name in SUN
    },
}
LAYER_SHAPES["sun-na"] = {
    shape: {k: v for k, v in layers.items() if k != "block"}
    for shape, layers in LAYER_SHAPES["sun-na"].items()
}
ATTENTION_SHAPES = {"region": {ATARI: (2, 7, 7), PROCGEN: (2, 4, 4)}}
for _name in SUN[1:]:
    ATTENTION_SHAPES[_name] = {ATARI: (1, 20, 20), PROCGEN: (1, 15, 15)}


def n_params(policy) -> int:
    return sum(p.numel() for p in policy.parameters())


@pytest.mark.unit
def test_registry_names():
    assert list_policies() == [
        "nature", "impala", "interpretable", "region",
        "sun-na", "sun-swa", "sun-cwra", "sun-cwca", "sun-cwrca",
    ]  # fmt: skip
    assert policy_options("region") == ["attention"]
    assert policy_options("sun-cwrca") == ["cwrca_scale"]
    assert policy_options("sun-swa") == [] and policy_options("nature") == []


@pytest.mark.unit
@pytest.mark.parametrize("name", list_policies())
@pytest.mark.parametrize("shape", [ATARI, PROCGEN], ids=["atari", "procgen"])
def test_shapes_and_split_identity(name, shape):
    torch.manual_seed(0)
    policy = build_policy(name, shape, 6)
    obs = torch.randint(0, 256, (2, *shape), dtype=torch.uint8)
    with torch.no_grad():
        out = policy(obs)
        acts = policy.activations(obs)
    assert out.logits.shape == (2, 6) and out.value.shape == (2,)
    expected = LAYER_SHAPES[name][shape]
    assert policy.layer_names == tuple(expected)
    assert {k: tuple(a.shape) for k, a in acts.items()} == {k: (2, *s) for k, s in expected.items()}
    if name in ATTENTION_SHAPES:
        assert policy.has_attention
        assert out.attention.shape == (2, *ATTENTION_SHAPES[name][shape])
        assert out.attention_entropy.shape == (2,)
    else:
        assert not policy.has_attention
        assert out.attention is None and out.attention_entropy is None
    assert (out.attention_logits is not None) == (name == "region")
    for layer in policy.layer_names:
        with torch.no_grad():
            a = policy.forward_to(obs, layer)
            logits, value = policy.forward_from(layer, a)
        assert torch.equal(a, acts[layer])
        torch.testing.assert_close(logits, out.logits, rtol=0, atol=1e-6)
        torch.testing.assert_close(value, out.value, rtol=0, atol=1e-6)


@pytest.mark.unit
def test_uint8_is_scaled_and_float_is_differentiable():
    torch.manual_seed(1)
    policy = build_policy("region", ATARI, 4)
    obs = torch.randint(0, 256, (2, *ATARI), dtype=torch.uint8)
    x = (obs.double() / 255).float().requires_grad_(True)
    out = policy(x)
    torch.testing.assert_close(out.logits, policy(obs).logits)
    out.value.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # uint8 follows the parameters' dtype
    assert policy.double()(obs).logits.dtype == torch.float64


@pytest.mark.unit
def test_parameter_counts_by_hand():
    # nature, 4x84x84, 6 actions: c1 4*32*64+32 = 8224, c2 32*64*16+64 = 32832,
    # c3 64*64*9+64 = 36928, fc 3136*512+512 = 1606144, pi 512*6+6 = 3078, v 513
    assert n_params(build_policy("nature", ATARI, 6)) == 1_687_719
    # region, 4 actions: nature trunk 78 - 78 + a1 64*512+512 = 33280, a2 512*2+2 = 1026,
    # fc 1606144, pi 512*4+4 = 2052, v 513
    assert n_params(build_policy("region", ATARI, 4)) == 8224 + 32832 + 36928 + 33280 + 1026 + (
        1606144 + 2052 + 513
    )
    # impala, 3x64x64, 15 actions: stage(cin, c) = conv cin*c*9+c + 4 residual convs (c*c*9+c):
    # 448 + 4*2320 = 9728, 4640 + 4*9248 = 41632, 9248 + 4*9248 = 46240;
    # fc 32*8*8*256+256 = 524544, pi 256*15+15 = 3855, v 257
    assert n_params(build_policy("impala", PROCGEN, 15)) == 626_256
    # interpretable: 1a 3*16*49+16 = 2368, 2a 16*32*25+32 = 12832, 2b/3a/4a 25632 each,
    # fc1 512*256+256 = 131328, fc2 256*512+512 = 131584, pi 512*15+15 = 7695, v 513
    assert n_params(build_policy("interpretable", PROCGEN, 15)) == 363_216
    # sun, 6 actions: c1 4*16*64+16 = 4112, c2 16*32*16+32 = 8224, fc 2592*256+256 = 663808,
    # pi 256*6+6 = 1542, v 257; the block adds q, k, v: 3 * (16*16+16) = 816
    assert n_params(build_policy("sun-na", ATARI, 6)) == 677_943
    for name in SUN[1:]:
        assert n_params(build_policy(name, ATARI, 6)) == 677_943 + 816


@pytest.mark.unit
def test_orthogonal_init_gains_and_zero_biases():
    torch.manual_seed(2)
    policy = build_policy("nature", ATARI, 6)
    for name, gain in [("c1", 2**0.5), ("c3", 2**0.5), ("fc", 2**0.5), ("pi", 0.01), ("v", 1.0)]:
        w = (
            getattr(policy, name).weight.detach().flatten(1).double()
        )  # (out, fan_in), out <= fan_in
        eye = torch.eye(w.shape[0], dtype=torch.float64)
        torch.testing.assert_close(w @ w.T, gain**2 * eye, rtol=0, atol=1e-5 * gain**2)
    for p_name, p in policy.named_parameters():
        if p_name.endswith("bias"):
            assert torch.all(p == 0), p_name


@pytest.mark.unit
@pytest.mark.parametrize(
    "name, options",
    [
        ("region", {"attention": "sigmoid"}),
        ("sun-cwrca", {"cwrca_scale": "W"}),
        ("impala", {"depths": "8,16"}),
        ("sun-cwca", {}),
    ],
)
def test_spec_rebuilds_the_same_network(name, options):
    policy = build_policy(name, PROCGEN, 5, **options)
    spec = json.loads(json.dumps(policy.spec))
    assert spec == policy.spec and spec["name"] == name
    assert spec["obs_shape"] == [3, 64, 64] and spec["n_actions"] == 5
    again = build_policy(spec["name"], spec["obs_shape"], spec["n_actions"], **spec["options"])
    again.load_state_dict(policy.state_dict())
    assert again.spec == policy.spec
    obs = torch.randint(0, 256, (1, *PROCGEN), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(again(obs).logits, policy(obs).logits)
    if name == "impala":
        assert spec["options"] == {"depths": [8, 16]} and again.layer_names == ("s1", "s2", "fc")


# -- next_layer -----------------------------------------------------------------------------------
NEXT = {
    "nature": {"c1": "c2", "c2": "c3", "c3": "fc"},
    "region": {"c1": "c2", "c2": "c3", "c3n": "a1", "attn_out": "fc"},
    "impala": {"s1": "stages.1.conv", "s2": "stages.2.conv"},
    "interpretable": {
        "1a": "conv2a",
        "2a": "conv2b",
        "2b": "conv3a",
        "3a": "conv4a",
        "4a": "fc1",
        "fc1": "fc2",
    },
    "sun-na": {"c1": "c2", "c2": "fc"},
    **{name: {"block": "c2", "c2": "fc"} for name in SUN[1:]},
}


@pytest.mark.unit
@pytest.mark.parametrize("name", list_policies())
def test_next_layer_is_the_direct_consumer(name):
    shape = PROCGEN if name in ("impala", "interpretable") else ATARI
    policy = build_policy(name, shape, 4)
    acts = policy.activations(torch.zeros(1, *shape, dtype=torch.uint8))
    for layer in policy.layer_names:
        if layer not in NEXT[name]:
            with pytest.raises(LoupeError, match="no single linear consumer"):
                policy.next_layer(layer)
            continue
        module = policy.next_layer(layer)
        assert module is policy.get_submodule(NEXT[name][layer])
        a = acts[layer]
        reads = module.in_channels if isinstance(module, torch.nn.Conv2d) else module.in_features
        assert reads == (a.shape[1] if isinstance(module, torch.nn.Conv2d) else a[0].numel())


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.unit
def test_unknown_policy_lists_valid_names():
    with pytest.raises(LoupeError, match="unknown policy 'resnet'.*nature, impala.*sun-cwrca"):
        build_policy("resnet", ATARI, 4)


@pytest.mark.unit
@pytest.mark.parametrize(
    "name, shape",
    # nature/region: 20 -> 4 -> 1 -> -1; sun: 12 -> 2 -> 0
    [("nature", (4, 20, 20)), ("region", (4, 84, 20)), *[(name, (4, 12, 12)) for name in SUN]],
)
def test_too_small_observation_is_refused(name, shape):
    with pytest.raises(LoupeError, match="too small"):
        build_policy(name, shape, 4)


@pytest.mark.unit
@pytest.mark.parametrize(
    "name, shape, n, options, message",
    [
        ("nature", (84, 84), 4, {}, r"\(C, H, W\)"),
        ("impala", (3, 0, 64), 4, {}, r"\(C, H, W\)"),
        ("impala", "3x64x64", 4, {}, r"\(C, H, W\)"),
        ("nature", ATARI, 0, {}, "n_actions"),
        ("nature", ATARI, 4, {"colour": "blue"}, "unknown option.*colour.*takes no options"),
        ("region", ATARI, 4, {"maps": 3}, "unknown option.*maps.*valid options: attention"),
        ("region", ATARI, 4, {"attention": "tanh"}, "softmax, sigmoid"),
        ("sun-cwrca", ATARI, 4, {"cwrca_scale": "H"}, "cwrca_scale must be one of C, W"),
        ("sun-swa", ATARI, 4, {"cwrca_scale": "W"}, "unknown option.*cwrca_scale"),
        ("impala", PROCGEN, 4, {"depths": "16,x"}, "depths"),
        ("impala", PROCGEN, 4, {"depths": [16, 0]}, "depths"),
    ],
)
def test_bad_arguments_are_one_line_errors(name, shape, n, options, message):
    with pytest.raises(LoupeError, match=message) as info:
        build_policy(name, shape, n, **options)
    assert "\n" not in str(info.value)


@pytest.mark.unit
def test_bad_layers_and_observations():
    policy = build_policy("nature", ATARI, 4)
    obs = torch.zeros(1, *ATARI)
    with pytest.raises(LoupeError, match="valid layers: c1, c2, c3, fc"):
        policy.forward_to(obs, "c9")
    with pytest.raises(LoupeError, match="no layer 'c9'"):
        policy.forward_from("c9", obs)
    with pytest.raises(LoupeError, match="no layer 'c9'"):
        policy.next_layer("c9")
    with pytest.raises(LoupeError, match=r"\(N, 4, 84, 84\)"):
        policy(torch.zeros(1, *PROCGEN))
    with pytest.raises(LoupeError, match=r"\(N, 4, 84, 84\)"):
        policy(torch.zeros(*ATARI))
    with pytest.raises(LoupeError, match="uint8 or float"):
        policy(torch.zeros(1, *ATARI, dtype=torch.int32))
    with pytest.raises(LoupeError, match="torch tensor"):
        policy(obs.numpy())
