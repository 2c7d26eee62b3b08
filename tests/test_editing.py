"""Model editing: the edited next layer sees projected activations, on real registry policies; bad
directions are refused; edited checkpoints carry their provenance."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from attention import build_policy
from learner.checkpoint import load_checkpoint, save_checkpoint
from loupe.errors import LoupeError
from probes.editing import (
    edit_policy,
    edit_provenance,
    project_out,
    project_weight,
    projector,
    write_edited_checkpoint,
)


def project_activation(a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Reference: at every position, a - (a . v) v / |v|^2 over the channel axis 1."""
    out = a.clone()
    flat = out.reshape(a.shape[0], a.shape[1], -1)  # (N, C, positions)
    for n in range(flat.shape[0]):
        for p in range(flat.shape[2]):
            col = flat[n, :, p]
            flat[n, :, p] = col - (col @ v) * v / (v @ v)
    return out


CASES = [
    ("interpretable", (3, 64, 64), "2b"),  # conv -> conv 5x5
    ("nature", (4, 84, 84), "c3"),  # conv -> Linear over the flattened map
    ("region", (4, 84, 84), "c3n"),  # normalised map -> 1x1 attention conv
    ("sun-cwca", (4, 84, 84), "block"),  # self-attention block -> conv
]


@pytest.mark.unit
@pytest.mark.parametrize("name, shape, layer", CASES)
def test_edited_next_layer_equals_original_on_projected_activations(name, shape, layer):
    torch.manual_seed(0)
    policy = build_policy(name, shape, 5)
    obs = torch.randint(0, 256, (2, *shape), dtype=torch.uint8)
    with torch.no_grad():
        a = policy.forward_to(obs, layer)
        v = torch.rand(a.shape[1]) + 0.1
        edited = edit_policy(policy, layer, v.numpy())
        original_next, edited_next = policy.next_layer(layer), edited.next_layer(layer)
        flat = isinstance(original_next, torch.nn.Linear)
        reshape = (lambda x: x.flatten(1)) if flat else (lambda x: x)
        lhs = edited_next(reshape(a))
        rhs = original_next(reshape(project_activation(a, v)))
        torch.testing.assert_close(lhs, rhs, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(edited_next.weight, original_next.weight)
        # the original policy is untouched, and only one weight tensor changed
        torch.testing.assert_close(policy.forward_to(obs, layer), a)
        changed = [
            k
            for (k, x), y in zip(policy.state_dict().items(), edited.state_dict().values())
            if not torch.equal(x, y)
        ]
        assert len(changed) == 1 and changed[0].endswith("weight")


@pytest.mark.unit
@pytest.mark.parametrize("name, shape, layer", [CASES[0], CASES[1]])
def test_edited_policy_is_blind_to_the_direction(name, shape, layer):
    """Where the layer has one consumer, the whole edited network equals the original network run
    on projected activations, and moving the activation along v changes nothing."""
    torch.manual_seed(1)
    policy = build_policy(name, shape, 4).double()
    obs = torch.rand(3, *shape, dtype=torch.float64)
    with torch.no_grad():
        a = policy.forward_to(obs, layer)
        v = torch.rand(a.shape[1], dtype=torch.float64)
        edited = edit_policy(policy, layer, v)
        out = edited(obs)
        logits, value = policy.forward_from(layer, project_activation(a, v))
        torch.testing.assert_close(out.logits, logits)
        torch.testing.assert_close(out.value, value)
        shifted = a + 3.0 * v[None, :, None, None]
        torch.testing.assert_close(
            edited.forward_from(layer, shifted)[0], edited.forward_from(layer, a)[0]
        )


@pytest.mark.unit
def test_project_out_against_explicit_matrices():
    torch.manual_seed(2)
    v = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
    p = torch.eye(3, dtype=torch.float64) - torch.outer(v, v) / 6.0
    torch.testing.assert_close(projector(v, 3), p)
    torch.testing.assert_close(p @ p, p)  # idempotent
    torch.testing.assert_close(p @ v, torch.zeros(3, dtype=torch.float64))
    conv = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    ref = torch.zeros_like(conv)
    for o in range(4):
        for y in range(2):
            for x in range(2):
                ref[o, :, y, x] = p.T @ conv[o, :, y, x]  # W'[o, i] = sum_j W[o, j] P[j, i]
    torch.testing.assert_close(project_out(conv, v), ref)
    linear = torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close(project_out(linear, v), linear @ p)
    torch.testing.assert_close(project_out(linear.T.contiguous(), v, in_dim=0), p @ linear.T)
    flattened = torch.randn(5, 3 * 4, dtype=torch.float64)  # reads a (3, 2, 2) map, flattened
    ref = (flattened.reshape(5, 3, 4).transpose(1, 2) @ p).transpose(1, 2).reshape(5, 12)
    torch.testing.assert_close(project_weight(flattened, p), ref)
    assert project_out(conv.float(), v).dtype == torch.float32


@pytest.mark.unit
def test_bad_directions_and_layers_are_refused():
    policy = build_policy("interpretable", (3, 64, 64), 5)
    with pytest.raises(LoupeError, match="has 3 entries but the layer has 32 channels"):
        edit_policy(policy, "2b", [1, 2, 3])
    with pytest.raises(LoupeError, match="zero"):
        edit_policy(policy, "2b", np.zeros(32))
    with pytest.raises(LoupeError, match="not finite"):
        edit_policy(policy, "2b", np.full(32, np.nan))
    with pytest.raises(LoupeError, match="no layer"):
        edit_policy(policy, "9z", np.ones(32))
    with pytest.raises(LoupeError, match="no single linear consumer"):
        edit_policy(policy, "fc2", np.ones(512))
    with pytest.raises(LoupeError, match="list of numbers"):
        edit_policy(policy, "2b", ["a"] * 32)
    with pytest.raises(LoupeError, match="no input axis"):
        project_weight(torch.zeros(4, 7), projector(np.ones(3), 3))


@pytest.mark.unit
def test_edited_checkpoint_records_parent_and_edit(tmp_path):
    torch.manual_seed(3)
    policy = build_policy("interpretable", (3, 64, 64), 15)
    parent = save_checkpoint(
        tmp_path / "run",
        policy,
        {"step": 7, "run_id": "r1", "env": "procgen:coinrun",
         "process": {"pid": 1, "rss_mb": 500.0, "private_mb": 300.0}},
    )  # fmt: skip
    parent_meta = json.loads(parent.read_text())
    direction = np.linspace(0.1, 1.0, 32)
    out = write_edited_checkpoint(parent, "2b", direction, "nmf:2b/3", tmp_path / "edited")
    edited, meta = load_checkpoint(out)  # verifies the new sha256
    assert meta["edit"] == {
        **edit_provenance(parent_meta["sha256"], "2b", direction, "nmf:2b/3"),
        "parent_step": 7,
    }
    assert set(edit_provenance("x", "2b", direction, "s")) == {
        "parent_sha256",
        "layer",
        "direction",
        "direction_source",
    }
    np.testing.assert_allclose(meta["edit"]["direction"], direction)
    assert (meta["step"], meta["run_id"], meta["env"]) == (7, "r1", "procgen:coinrun")
    assert meta["sha256"] != parent_meta["sha256"] and "state" not in meta
    assert "process" in parent_meta and "process" not in meta  # the learner's memory stays behind
    expected = edit_policy(policy, "2b", direction)
    for (k, a), b in zip(expected.state_dict().items(), edited.state_dict().values()):
        assert torch.equal(a, b), k
    assert json.loads(parent.read_text()) == parent_meta  # the parent is untouched
    with pytest.raises(LoupeError, match="already exists"):
        write_edited_checkpoint(parent, "2b", direction, "x", tmp_path / "edited")
    # an edit of an edit keeps the chain
    again = write_edited_checkpoint(out, "2b", np.ones(32), "manual", tmp_path / "edited2")
    chained = json.loads(again.read_text())["edit"]
    assert chained["parent_sha256"] == meta["sha256"]
    assert chained["parent_edit"]["parent_sha256"] == parent_meta["sha256"]
