"""Checkpoints: exact round trip, integrity checks, resumable training state, retention."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from attention import build_policy
from learner import PPOConfig, PPOLearner
from learner.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_train_state,
    save_checkpoint,
)
from loupe.errors import LoupeError
from tests.test_learner import tiny_rollout

SHAPE = (4, 84, 84)


def make(seed=0, name="region"):
    torch.manual_seed(seed)
    return build_policy(name, SHAPE, 4)


@pytest.mark.unit
def test_round_trip_is_exact(tmp_path):
    policy = make()
    path = save_checkpoint(tmp_path, policy, {"step": 128, "run_id": "r", "env": "ALE/Pong-v5"})
    loaded, meta = load_checkpoint(path)
    assert meta["step"] == 128 and meta["env"] == "ALE/Pong-v5" and meta["schema"] == 1
    assert meta["policy"] == policy.spec
    for (k, a), (k2, b) in zip(policy.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    # also addressable by its weights file
    loaded2, _ = load_checkpoint(path.with_suffix(".safetensors"))
    obs = torch.randint(0, 256, (2, *SHAPE), dtype=torch.uint8)
    assert torch.equal(loaded2(obs).logits, policy(obs).logits)


@pytest.mark.unit
def test_truncated_and_altered_checkpoints_are_refused(tmp_path):
    path = save_checkpoint(tmp_path, make(), {"step": 1})
    weights = path.with_suffix(".safetensors")
    data = bytearray(weights.read_bytes())
    weights.write_bytes(bytes(data[:-100]))
    with pytest.raises(LoupeError, match="truncated"):
        load_checkpoint(path)
    data[-5] ^= 0xFF  # same size, different content
    weights.write_bytes(bytes(data))
    with pytest.raises(LoupeError, match="sha256 does not match"):
        load_checkpoint(path)
    weights.unlink()
    with pytest.raises(LoupeError, match="missing checkpoint file"):
        load_checkpoint(path)


@pytest.mark.unit
def test_bad_metadata_is_refused(tmp_path):
    path = save_checkpoint(tmp_path, make(), {"step": 1})
    meta = json.loads(path.read_text())
    path.write_text(json.dumps({**meta, "schema": 99}))
    with pytest.raises(LoupeError, match="unknown checkpoint schema 99"):
        load_checkpoint(path)
    path.write_text(json.dumps({**meta, "policy": {**meta["policy"], "name": "resnet"}}))
    with pytest.raises(LoupeError, match="unknown policy 'resnet'"):
        load_checkpoint(path)
    path.write_text(json.dumps({**meta, "policy": {**meta["policy"], "n_actions": 6}}))
    with pytest.raises(LoupeError, match="do not fit policy region"):
        load_checkpoint(path)
    path.write_text("{not json")
    with pytest.raises(LoupeError, match="not valid JSON"):
        load_checkpoint(path)
    with pytest.raises(LoupeError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "nothing.json")


@pytest.mark.unit
def test_training_state_round_trip_gives_the_identical_next_update(tmp_path):
    cfg = PPOConfig(num_envs=4, num_steps=8, num_minibatches=2, update_epochs=2,
                    normalize_rewards=True, total_steps=1000)  # fmt: skip
    policy = make(1, "sun-na")
    learner = PPOLearner(policy, cfg)
    learner.update(tiny_rollout(policy, seed=1))
    state = learner.state_dict()
    # the global RNGs were captured: their next draws must come back after a restore
    next_torch, next_numpy = torch.rand(3), np.random.rand(3)
    path = save_checkpoint(tmp_path, policy, {"step": learner.global_step}, train_state=state)
    rollout = tiny_rollout(policy, seed=2)
    learner.update(rollout)  # the original run continues
    expected = {k: v.clone() for k, v in policy.state_dict().items()}

    torch.manual_seed(123)  # disturb everything, then resume from disk
    np.random.seed(123)
    restored, _ = load_checkpoint(path)
    learner2 = PPOLearner(restored, cfg)
    learner2.load_state_dict(load_train_state(path))
    assert learner2.global_step == 32 and learner2.update_index == 1
    assert torch.equal(torch.rand(3), next_torch)
    assert np.array_equal(np.random.rand(3), next_numpy)
    learner2.update(rollout)
    for k, v in restored.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=0)


@pytest.mark.unit
def test_checkpoint_without_state_cannot_resume(tmp_path):
    path = save_checkpoint(tmp_path, make(), {"step": 1})
    with pytest.raises(LoupeError, match="no training state"):
        load_train_state(path)


@pytest.mark.unit
def test_retention_keeps_last_k_and_every_nth(tmp_path):
    policy = make(name="sun-na")
    for step in range(1, 11):
        save_checkpoint(tmp_path, policy, {"step": step}, keep_last=3, keep_every=4)
    steps = [json.loads(p.read_text())["step"] for p in list_checkpoints(tmp_path)]
    # indices 0..9 for steps 1..10: every 4th index (0, 4, 8) plus the last three
    assert steps == [1, 5, 8, 9, 10]
    assert json.loads(latest_checkpoint(tmp_path).read_text())["step"] == 10
    files = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert len(files) == 10 and not any(f.endswith(".tmp") for f in files)
