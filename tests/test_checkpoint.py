"""Checkpoints: exact round trip, integrity checks, resumable training state, retention."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

import learner.checkpoint as ckpt
from learner import PPOLearner
from learner.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_train_state,
    save_checkpoint,
)
from loupe.errors import LoupeError
from tests.test_ppo import TinyPolicy, build_tiny, small_cfg, tiny_rollout

META = {"run_id": "r1", "env": "procgen:coinrun", "env_options": {"distribution_mode": "easy"}}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make(seed=0, attention=True):
    torch.manual_seed(seed)
    return TinyPolicy(attention=attention)


def refused(path, match, **kw):
    """load_checkpoint must raise a one-line LoupeError matching ``match``."""
    with pytest.raises(LoupeError, match=match) as err:
        load_checkpoint(path, build_policy=build_tiny, **kw)
    assert "\n" not in str(err.value)


@pytest.mark.unit
def test_round_trip_is_exact(tmp_path):
    policy = make()
    path = save_checkpoint(tmp_path, policy, {"step": 128, **META})
    assert path == tmp_path / "checkpoints" / "ckpt-000000000128.json"
    weights = path.with_suffix(".safetensors")
    loaded, meta = load_checkpoint(path, build_policy=build_tiny)
    assert meta["schema"] == 1 and meta["step"] == 128 and meta["run_id"] == "r1"
    assert meta["env"] == "procgen:coinrun" and meta["env_options"] == META["env_options"]
    assert meta["policy"] == policy.spec and meta["created"].endswith("Z")
    assert meta["size"] == weights.stat().st_size
    assert meta["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    a, b = policy.state_dict(), loaded.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    loaded2, _ = load_checkpoint(weights, build_policy=build_tiny)  # by its weights file
    obs = torch.randint(0, 256, (3, 2, 5, 5), dtype=torch.uint8)
    assert torch.equal(loaded2(obs).logits, policy(obs).logits)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, weights.name]


@pytest.mark.unit
def test_real_policy_round_trip_through_the_registry(tmp_path):
    attention = pytest.importorskip("attention", reason="the attention package is not there yet")
    torch.manual_seed(0)
    policy = attention.build_policy("nature", (4, 84, 84), 6)
    path = save_checkpoint(tmp_path, policy, {"step": 7, **META})
    loaded, meta = load_checkpoint(path)  # the default builder: attention.build_policy
    assert meta["policy"]["name"] == "nature" and meta["policy"]["n_actions"] == 6
    obs = torch.randint(0, 256, (2, 4, 84, 84), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(loaded(obs).logits, policy(obs).logits)
    meta_path = json.loads(path.read_text())
    path.write_text(json.dumps({**meta_path, "policy": {**meta_path["policy"], "name": "resnet"}}))
    with pytest.raises(LoupeError, match="unknown policy 'resnet'"):
        load_checkpoint(path)


@pytest.mark.unit
def test_truncated_altered_and_missing_weights_are_refused(tmp_path):
    path = save_checkpoint(tmp_path, make(), {"step": 1})
    weights = path.with_suffix(".safetensors")
    data = bytearray(weights.read_bytes())
    weights.write_bytes(bytes(data[:-100]))
    refused(path, "truncated")
    data[-5] ^= 0xFF  # same size, different content
    weights.write_bytes(bytes(data))
    refused(path, "sha256 does not match")
    weights.unlink()
    refused(path, "missing checkpoint file")


@pytest.mark.unit
def test_bad_metadata_is_refused(tmp_path):
    path = save_checkpoint(tmp_path, make(), {"step": 1})
    meta = json.loads(path.read_text())
    cases = [
        ({**meta, "schema": 99}, "unknown checkpoint schema 99"),
        ({**meta, "policy": {**meta["policy"], "name": "resnet"}}, "unknown policy 'resnet'"),
        ({**meta, "policy": {**meta["policy"], "n_actions": 6}}, "do not fit policy tiny"),
        ({**meta, "policy": {**meta["policy"], "options": {"attention": False}}}, "do not fit"),
        ({**meta, "weights": "../../elsewhere.safetensors"}, "must name a file next to"),
        ({k: v for k, v in meta.items() if k != "sha256"}, "lacks 'sha256'"),
    ]
    for record, match in cases:
        path.write_text(json.dumps(record))
        refused(path, match)
    path.write_text("{not json")
    refused(path, "not valid JSON")
    refused(tmp_path / "nothing.json", "no such checkpoint")


@pytest.mark.unit
def test_training_state_round_trip_gives_the_identical_next_update(tmp_path):
    cfg = small_cfg(normalize_rewards=True, anneal_lr=True, total_steps=320)
    policy = make(1)
    learner = PPOLearner(policy, cfg)
    learner.update(tiny_rollout(policy, seed=1))
    path = save_checkpoint(tmp_path, policy, {"step": learner.global_step},
                           train_state=learner.state_dict())  # fmt: skip
    saved_scale = learner.normalizer.state()
    # the global RNGs were captured: their next draws must come back after a restore
    next_torch, next_numpy = torch.rand(3), np.random.rand(3)
    rollout = tiny_rollout(policy, seed=2)
    expected_stats = learner.update(rollout)  # the original run goes on
    expected = {k: v.clone() for k, v in policy.state_dict().items()}
    expected_opt = learner.optimizer.state_dict()["state"]

    torch.manual_seed(123)  # disturb every RNG, then resume from disk
    np.random.seed(123)
    restored, _ = load_checkpoint(path, build_policy=build_tiny)
    learner2 = PPOLearner(restored, cfg)
    learner2.load_state_dict(load_train_state(path))
    assert (learner2.global_step, learner2.update_index) == (32, 1)
    assert torch.equal(torch.rand(3), next_torch)
    assert np.array_equal(np.random.rand(3), next_numpy)
    assert learner2.normalizer.state() == saved_scale
    stats = learner2.update(rollout)
    assert stats == expected_stats  # same minibatch order, moments, lr and reward scale
    for k, v in restored.state_dict().items():
        assert torch.equal(v, expected[k]), k
    for idx, state in learner2.optimizer.state_dict()["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state[key], expected_opt[idx][key]), (idx, key)


@pytest.mark.unit
def test_damaged_training_state_is_refused(tmp_path):
    policy = make()
    learner = PPOLearner(policy, small_cfg())
    learner.update(tiny_rollout(policy))
    path = save_checkpoint(tmp_path, policy, {"step": 32}, train_state=learner.state_dict())
    state_file = path.with_suffix(".state.safetensors")
    data = bytearray(state_file.read_bytes())
    state_file.write_bytes(bytes(data[:-8]))
    with pytest.raises(LoupeError, match="truncated"):
        load_train_state(path)
    data[-1] ^= 0x01
    state_file.write_bytes(bytes(data))
    with pytest.raises(LoupeError, match="sha256 does not match"):
        load_train_state(path.with_suffix(".safetensors"))
    bare = save_checkpoint(tmp_path, policy, {"step": 64})
    with pytest.raises(LoupeError, match="no training state"):
        load_train_state(bare)


@pytest.mark.unit
def test_a_crash_before_the_metadata_leaves_the_last_checkpoint_latest(tmp_path, monkeypatch):
    policy = make()
    first = save_checkpoint(tmp_path, policy, {"step": 10})

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "_atomic_json", crash)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, policy, {"step": 20})
    assert latest_checkpoint(tmp_path) == first
    load_checkpoint(first, build_policy=build_tiny)  # still whole


@pytest.mark.unit
def test_retention_keeps_last_k_and_every_nth(tmp_path):
    policy = make(attention=False)
    assert latest_checkpoint(tmp_path) is None
    for step in range(1, 11):
        save_checkpoint(tmp_path, policy, {"step": step * 100}, keep_last=3, keep_every=4)
    steps = [json.loads(p.read_text())["step"] for p in list_checkpoints(tmp_path)]
    # write order 0..9 for steps 100..1000: numbers 0, 4, 8 plus the last three
    assert steps == [100, 500, 800, 900, 1000]
    assert latest_checkpoint(tmp_path).name == "ckpt-000000001000.json"
    files = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert len(files) == 10 and not any(f.endswith(".tmp") for f in files)
    everything = tmp_path / "all"
    for step in range(1, 6):
        save_checkpoint(everything, policy, {"step": step}, keep_last=0)
    assert len(list_checkpoints(everything)) == 5


@pytest.mark.unit
def test_retention_bounds_training_state_files_too(tmp_path):
    """keep_last=3, keep_every=4 over 20 checkpoints: weights of 3 + 5 (numbers 0, 4, ..., 16),
    training state of the newest 3 only; the newest resumes, an old kept one says it cannot."""
    policy = make(attention=False)
    learner = PPOLearner(policy, small_cfg(), device="cpu")
    state = learner.state_dict()
    for step in range(1, 21):
        save_checkpoint(tmp_path, policy, {"step": step * 10}, train_state=state,
                        keep_last=3, keep_every=4)  # fmt: skip
        files = list((tmp_path / "checkpoints").iterdir())
        n_state = sum(p.name.endswith(".state.safetensors") for p in files)
        n_weights = sum(p.name.endswith(".safetensors") for p in files) - n_state
        assert n_state <= 3 and n_weights <= 3 + -(-step // 4)  # the stated bound, at every step
    steps = [json.loads(p.read_text())["step"] for p in list_checkpoints(tmp_path)]
    assert steps == [10, 50, 90, 130, 170, 180, 190, 200]
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert [n for n in names if n.endswith(".state.safetensors")] == [
        f"ckpt-{s:012d}.state.safetensors" for s in (180, 190, 200)
    ]
    assert len(names) == 8 * 2 + 3 and not any(n.endswith(".tmp") for n in names)
    load_train_state(latest_checkpoint(tmp_path))
    old = tmp_path / "checkpoints" / "ckpt-000000000050.json"
    assert "state" not in json.loads(old.read_text())
    load_checkpoint(old, build_policy=build_tiny)  # its weights are whole and verified
    with pytest.raises(LoupeError, match="no training state"):
        load_train_state(old)
