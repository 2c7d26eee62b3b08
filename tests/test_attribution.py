"""Hidden-layer integrated gradients against Captum, closed forms and completeness."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attention import build_policy, list_policies
from loupe.errors import LoupeError
from probes.attribution import IntegratedGradients, benchmark_ig_vs_captum, target_matrix

SHAPES = {"impala": (3, 64, 64), "interpretable": (3, 64, 64)}
LAYERS = {
    "nature": "c2", "impala": "s2", "interpretable": "2b", "region": "c3n",
    "sun-na": "c1", "sun-swa": "block", "sun-cwra": "block", "sun-cwca": "block",
    "sun-cwrca": "block",
}  # fmt: skip


def captum_ig(policy, layer, a, weights, k, n_steps=10):
    from captum.attr import IntegratedGradients as CaptumIG

    def head(act):
        logits, value = policy.forward_from(layer, act)
        return torch.cat([value[:, None], logits], 1) @ weights.to(act.dtype).T

    return CaptumIG(head).attribute(
        a, baselines=0.0, target=k, n_steps=n_steps, method="riemann_right"
    )


@pytest.mark.unit
@pytest.mark.parametrize("name", list_policies())
def test_matches_captum_on_every_policy(name):
    torch.manual_seed(0)
    shape = SHAPES.get(name, (4, 84, 84))
    policy = build_policy(name, shape, 5).double()
    obs = torch.rand(2, *shape, dtype=torch.float64)
    layer = LAYERS.get(name, policy.layer_names[len(policy.layer_names) // 2])
    targets = ["value", "logit:0", "logit:4", ("jump", [1, 2])]
    res = IntegratedGradients(policy, layer).attribute(obs, targets)
    names, weights = target_matrix(targets, 5)
    assert res.targets == ["value", "logit:0", "logit:4", "group:jump"] == names
    a = policy.forward_to(obs, layer).detach()
    for k in range(len(names)):
        ref = captum_ig(policy, layer, a, weights, k)
        torch.testing.assert_close(res.attributions[k], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.unit
def test_chunking_gives_the_same_result():
    torch.manual_seed(1)
    policy = build_policy("region", (4, 84, 84), 4).double()
    obs = torch.rand(2, 4, 84, 84, dtype=torch.float64)
    full = IntegratedGradients(policy, "c3n", n_steps=12).attribute(obs)
    chunked = IntegratedGradients(policy, "c3n", n_steps=12, chunk_size=5).attribute(obs)
    torch.testing.assert_close(full.attributions, chunked.attributions)


class LinearHead(nn.Module):
    """A toy 'policy' whose head is linear in the layer: attr = a * w exactly, delta = 0."""

    def __init__(self):
        super().__init__()
        self.obs_shape, self.n_actions = (1, 2, 2), 2
        self.layer_names = ("h",)
        self.w = torch.tensor([[1.0, -2.0, 0.5, 3.0], [0.0, 1.0, 1.0, -1.0], [2.0, 2.0, 2.0, 2.0]])
        self.spec = {"name": "toy"}

    def forward_to(self, obs, layer):
        return obs.flatten(1) * 2.0

    def forward_from(self, layer, a):
        out = a @ self.w.T + torch.tensor([0.5, 0.1, -0.3])
        return out[:, 1:], out[:, 0]


@pytest.mark.unit
def test_linear_head_closed_form():
    toy = LinearHead()
    obs = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    res = IntegratedGradients(toy, "h", n_steps=3).attribute(obs, "all")
    a = obs.flatten(1) * 2
    torch.testing.assert_close(res["value"], a * toy.w[0])
    torch.testing.assert_close(res["logit:1"], a * toy.w[2])
    torch.testing.assert_close(res.delta, torch.zeros(3, 1), atol=1e-6, rtol=0)


class QuadraticHead(LinearHead):
    """F(a) = sum(a^2): IG with n steps gives a^2 (n+1)/n, so delta = sum(a^2)/n."""

    def forward_from(self, layer, a):
        v = (a**2).sum(1)
        return torch.stack([v, v], 1), v


@pytest.mark.unit
@pytest.mark.parametrize("n", [1, 10, 100])
def test_quadratic_head_riemann_error_is_reported(n):
    toy = QuadraticHead()
    obs = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], dtype=torch.float64)
    res = IntegratedGradients(toy, "h", n_steps=n).attribute(obs, ["value"])
    a = obs.flatten(1) * 2
    torch.testing.assert_close(res["value"], a**2 * (n + 1) / n)
    torch.testing.assert_close(res.delta[0], (a**2).sum(1) / n)


@pytest.mark.unit
def test_completeness_on_a_real_policy():
    torch.manual_seed(2)
    policy = build_policy("interpretable", (3, 64, 64), 15).double()
    obs = torch.rand(1, 3, 64, 64, dtype=torch.float64)
    res = IntegratedGradients(policy, "2b", n_steps=100).attribute(obs, ["value", "logit:3"])
    with torch.no_grad():
        a = policy.forward_to(obs, "2b")
        logits, value = policy.forward_from("2b", a)
        logits0, value0 = policy.forward_from("2b", torch.zeros_like(a))
    gap = torch.stack([value - value0, logits[:, 3] - logits0[:, 3]])  # (2, N)
    torch.testing.assert_close(res.delta, res.attributions.flatten(2).sum(-1) - gap)
    assert (res.delta.abs() <= 2e-2 * gap.abs()).all()  # ReLU kinks: O(1/n) error


@pytest.mark.unit
def test_input_layer_is_the_plain_gradient():
    torch.manual_seed(3)
    policy = build_policy("nature", (4, 84, 84), 4)
    obs = torch.randint(0, 256, (1, 4, 84, 84), dtype=torch.uint8)
    res = IntegratedGradients(policy, "input").attribute(obs, ["logit:2"])
    x = (obs.float() / 255).requires_grad_(True)
    policy(x).logits[:, 2].sum().backward()
    torch.testing.assert_close(res.attributions[0], x.grad)


@pytest.mark.unit
def test_no_hooks_or_grad_state_left_behind_even_after_an_error():
    policy = build_policy("region", (4, 84, 84), 4)
    obs = torch.randint(0, 256, (1, 4, 84, 84), dtype=torch.uint8)
    ig = IntegratedGradients(policy, "c3n")
    ig.attribute(obs)
    with pytest.raises(LoupeError):
        ig.attribute(obs, ["logit:9"])
    real = policy.forward_from

    def failing(layer, a):  # fails after the scaled activations entered the graph
        real(layer, a)
        raise RuntimeError("boom")

    policy.forward_from = failing
    with pytest.raises(RuntimeError, match="boom"):
        ig.attribute(obs)
    del policy.forward_from
    for m in policy.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
    assert all(p.grad is None for p in policy.parameters())
    assert torch.is_grad_enabled()


@pytest.mark.unit
def test_bad_input():
    policy = build_policy("nature", (4, 84, 84), 4)
    with pytest.raises(LoupeError, match="valid layers: input, c1, c2, c3, fc"):
        IntegratedGradients(policy, "conv9")
    ig = IntegratedGradients(policy, "c2")
    with pytest.raises(LoupeError, match="out of range"):
        ig.attribute(torch.zeros(1, 4, 84, 84), ["logit:4"])
    with pytest.raises(LoupeError, match=r"\(N, 4, 84, 84\)"):
        ig.attribute(torch.zeros(1, 3, 64, 64), "all")
    with pytest.raises(LoupeError, match="uint8 or float"):
        ig.attribute(torch.zeros(1, 4, 84, 84, dtype=torch.int64), "all")
    with pytest.raises(LoupeError, match="unknown target"):
        ig.attribute(torch.zeros(1, 4, 84, 84), ["softmax:1"])


@pytest.mark.unit
def test_benchmark_reports_times_and_agreement():
    torch.manual_seed(4)
    policy = build_policy("nature", (4, 84, 84), 3)
    obs = torch.randint(0, 256, (2, 4, 84, 84), dtype=torch.uint8)
    res = benchmark_ig_vs_captum(policy, obs, "c3", n_steps=3, repeats=2)
    assert set(res) == {"ours_s", "captum_s", "ratio", "ours_cpu_s", "captum_cpu_s", "cpu_ratio",
                        "max_abs_diff", "runs"}  # fmt: skip
    assert res["ours_s"] > 0 and res["captum_s"] > 0
    assert res["ratio"] == pytest.approx(res["captum_s"] / res["ours_s"])
    assert [len(res["runs"][k]) for k in ("ours", "captum")] == [2, 2]
    assert res["ours_s"] == min(r["wall_s"] for r in res["runs"]["ours"])
    assert res["max_abs_diff"] < 1e-4


class NearTieHead(LinearHead):
    """F(a) = max(a0 + a1, a2), a2 the float32 sum a0 + a1 (below the exact sum): a near-tie.

    alpha * (a0 + a1) and alpha * a2 differ by less than float32 rounding; which one wins
    depends on the last bit of alpha, at every step. Each step's gradient goes to (a0, a1) or
    to a2 whole, so one ulp in the Riemann points moves the attribution by a step's share.
    """

    def __init__(self):
        super().__init__()
        self.obs_shape = (1, 1, 3)

    def forward_to(self, obs, layer):
        return obs.flatten(1)

    def forward_from(self, layer, a):
        v = torch.maximum(a[:, 0] + a[:, 1], a[:, 2])
        return torch.stack([v, -v], 1), v


NEAR_TIE = [0.6852310299873352, 0.8734173774719238, 1.5586483478546143]


@pytest.mark.unit
def test_near_tie_matches_captum_in_float32():
    """At a near-tie the float32 answer is decided by rounding; loupe's must be Captum's."""
    toy = NearTieHead()
    obs = torch.tensor([[[NEAR_TIE]]], dtype=torch.float32)  # (1, 1, 1, 3)
    res = IntegratedGradients(toy, "h", n_steps=10).attribute(obs, "all")
    names, weights = target_matrix("all", 2)
    a = obs.flatten(1)
    for k in range(len(names)):
        ref = captum_ig(toy, "h", a, weights, k)
        assert (res.attributions[k] - ref).abs().max() <= 1e-5
    # the case is a real near-tie: float32 IG differs from the float64 closed form by whole
    # steps' shares (in float64 every step takes the same branch: attr = (a0, a1, 0) or (0, 0, a2))
    a64 = a.double()
    first = bool(a64[0, 0] + a64[0, 1] > a64[0, 2])
    closed = a64 * torch.tensor([1.0, 1.0, 0.0] if first else [0.0, 0.0, 1.0], dtype=torch.float64)
    res64 = IntegratedGradients(toy, "h", n_steps=10).attribute(obs.double(), ["value"])
    torch.testing.assert_close(res64["value"], closed, rtol=1e-12, atol=1e-12)
    assert (res["value"].double() - closed).abs().max() > 0.1


@pytest.mark.unit
@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 32, 100, 256])
def test_riemann_points_are_captums_to_the_bit(n):
    from captum.attr._utils.approximation_methods import approximation_parameters

    from probes.attribution import riemann_alphas

    got = riemann_alphas(n, torch.zeros((), dtype=torch.float32))
    if n > 1:  # Captum asks for two steps or more
        _, alphas = approximation_parameters("riemann_right")
        assert torch.equal(got, torch.tensor(alphas(n), dtype=torch.float32))
    assert got[-1] == 1.0 and len(got) == n


@pytest.mark.unit
@pytest.mark.parametrize(("name", "layer"), [("impala", "s2"), ("interpretable", "2b")])
def test_reader_shortcut_and_batched_backward_give_the_plain_sum(name, layer):
    torch.manual_seed(5)
    policy = build_policy(name, (3, 64, 64), 15)
    obs = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    fast = IntegratedGradients(policy, layer, n_steps=4)
    assert fast._sole_linear_reader(policy.forward_to(obs[:1], layer)) is policy.next_layer(layer)
    plain = IntegratedGradients(policy, layer, n_steps=4)
    plain.reader_shortcut = False
    batched = IntegratedGradients(policy, layer, n_steps=4, chunk_size=5)
    batched.backward = "batched"
    want = plain.attribute(obs).attributions
    for ig in (fast, batched):
        got = ig.attribute(obs).attributions
        assert (got - want).abs().max() <= 1e-5 * max(1.0, want.abs().max().item())


@pytest.mark.unit
@pytest.mark.parametrize(
    ("n_obs", "n_steps", "chunk"), [(1, 10, 3), (5, 10, 20), (7, 1, 3), (4, 7, 1), (2, 3, 1000)]
)
def test_blocks_cover_every_row_once_and_none_is_a_single_row(n_obs, n_steps, chunk):
    policy = build_policy("nature", (4, 84, 84), 4)
    ig = IntegratedGradients(policy, "c2", n_steps=n_steps, chunk_size=chunk)
    seen = torch.zeros(n_obs, n_steps, dtype=torch.int64)
    for i0, i1, s0, s1 in ig._blocks(n_obs, row_bytes=1):
        seen[i0:i1, s0:s1] += 1
        assert (i1 - i0) * (s1 - s0) >= 2
    assert (seen == 1).all()
