"""`--learners N`: data-parallel PPO learners (real Ray actors, real torch.distributed gloo on
loopback) take exactly one learner's steps on the combined minibatches, checkpoint and resume like
one learner, and a dead learner stops the run with one line."""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from actors import EnvConfig
from learner import PPOConfig, PPOLearner
from loupe.errors import LoupeError
from loupe.train import TrainConfig

ENVS, STEPS = 4, 16


def tiny_config(run_dir: Path, learners: int = 2, **ppo) -> TrainConfig:
    ppo = PPOConfig.preset("procgen", num_envs=ENVS, num_steps=STEPS, num_minibatches=2,
                           update_epochs=2, total_steps=10_000, **ppo)  # fmt: skip
    env = EnvConfig("procgen:coinrun", num_envs=ENVS, seed=0, distribution_mode="easy")
    return TrainConfig(env=env, ppo=ppo, run_dir=str(run_dir), policy="nature", learners=learners,
                       announce=False, device="cpu")  # fmt: skip


@pytest.fixture(scope="module")
def local_ray():
    import ray

    from loupe.distributed import init_ray

    init_ray(None, num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def rollouts():
    """Three real CoinRun batches (4 envs x 16 steps), all sampled by the initial weights."""
    from actors.rollout import RolloutActor, RolloutConfig
    from attention import build_policy

    torch.manual_seed(1)
    policy = build_policy("nature", (3, 64, 64), 15)
    env = EnvConfig("procgen:coinrun", num_envs=ENVS, seed=0, distribution_mode="easy")
    actor = RolloutActor(RolloutConfig(env=env, policy="nature", seed=1))
    actor.set_weights(0, {k: v.numpy() for k, v in policy.state_dict().items()})
    out = [actor.rollout(STEPS) for _ in range(3)]
    actor.close()
    return policy, out


def weights(policy) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in policy.state_dict().items()}


def assert_same(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=atol, rtol=0, err_msg=name)


# -- the math, in-process ---------------------------------------------------------------------
@pytest.mark.unit
def test_one_shard_keeps_the_plain_minibatch_order():
    from attention import build_policy

    cfg = PPOConfig(num_envs=4, num_steps=8, num_minibatches=4)
    learner = PPOLearner(build_policy("nature", (3, 64, 64), 15), cfg)
    expected = torch.randperm(32, generator=torch.Generator().manual_seed(cfg.seed)).view(4, 8)
    assert torch.equal(learner._minibatch_order(32), expected)


@pytest.mark.unit
def test_sharded_minibatches_take_one_slice_of_every_share():
    from attention import build_policy

    cfg = PPOConfig(num_envs=4, num_steps=8, num_minibatches=4)
    learner = PPOLearner(build_policy("nature", (3, 64, 64), 15), cfg, shards=2)
    order = learner._minibatch_order(32)  # (4 minibatches, 8)
    assert order.shape == (4, 8)
    assert sorted(order.reshape(-1).tolist()) == list(range(32))  # each sample once per epoch
    low, high = order[:, :4], order[:, 4:]
    assert bool((low < 16).all()) and bool((high >= 16).all())  # 4 from each half
    assert torch.equal(high - 16, low)  # one order for both halves
    with pytest.raises(LoupeError, match="does not split"):
        PPOLearner(build_policy("nature", (3, 64, 64), 15), cfg, shards=3)


@pytest.mark.unit
def test_learner_counts_that_do_not_fit_are_refused(tmp_path):
    from loupe.distributed.learners import available_cpus, check_learners

    with pytest.raises(LoupeError, match="does not split evenly over 3 learners"):
        tiny_config(tmp_path, learners=3)  # minibatch of 32
    with pytest.raises(LoupeError, match="at least 1"):
        tiny_config(tmp_path, learners=0)
    with pytest.raises(LoupeError, match="at least 1"):
        tiny_config(tmp_path, learners=-2)
    cpus = available_cpus()
    with pytest.raises(LoupeError, match=f"this machine has {cpus}"):
        check_learners(cpus + 1, torch.device("cpu"))
    with pytest.raises(LoupeError, match="rollout actors"):
        check_learners(cpus, torch.device("cpu"), actors=1)
    check_learners(cpus, torch.device("cpu"))  # as many as there are CPUs is fine


# -- real Ray actors, real gloo -----------------------------------------------------------------
@pytest.mark.integration
def test_two_gloo_learners_take_one_learners_steps_and_resume_exactly(local_ray, rollouts,
                                                                      tmp_path):  # fmt: skip
    """After every update the weights of 2 learners (each on half of every minibatch) equal those of
    one learner on the combined minibatches; the stats are the whole batch's; a checkpoint taken
    after update 2 and loaded into two fresh learners gives update 3's weights again."""
    from learner.checkpoint import load_checkpoint, load_train_state, save_checkpoint
    from loupe.distributed.learners import DataParallelLearner

    init, batches = rollouts
    cfg = tiny_config(tmp_path / "run")
    ref = PPOLearner(copy.deepcopy(init), cfg.ppo, shards=2)
    dp = DataParallelLearner(cfg, copy.deepcopy(init), torch.device("cpu"))
    try:
        for u, rollout in enumerate(batches):
            expected = ref.update(rollout)
            got = dp.update(rollout)
            assert_same(weights(dp.policy), weights(ref.policy))
            assert_same(dp.rank_weights(1), weights(ref.policy))
            assert dp.global_step == ref.global_step == (u + 1) * ENVS * STEPS
            assert got.keys() == expected.keys()
            for key in expected:
                assert got[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key
            assert got["decoupled"] == float(u > 0)  # stale batches: the decoupled branch too
            if u == 1:
                ckpt = save_checkpoint(tmp_path / "run", dp.policy, {"step": dp.global_step},
                                       train_state=dp.state_dict())  # fmt: skip
        final = weights(dp.policy)
    finally:
        dp.close()
    # the updates moved the weights: the agreement is not two untouched copies
    assert max(float(np.abs(final[k] - v).max()) for k, v in weights(init).items()) > 1e-4

    policy, _ = load_checkpoint(ckpt)
    resumed = DataParallelLearner(cfg, policy, torch.device("cpu"))
    try:
        resumed.load_state_dict(load_train_state(ckpt))
        assert resumed.global_step == 2 * ENVS * STEPS
        resumed.update(batches[2])
        assert_same(weights(resumed.policy), final)
    finally:
        resumed.close()


def checkpoint_steps(run: Path) -> list[int]:
    if not (run / "checkpoints").is_dir():
        return []
    return sorted(json.loads(p.read_text())["step"]
                  for p in (run / "checkpoints").glob("ckpt-*[0-9].json"))  # fmt: skip


CLI = [sys.executable, "-m", "loupe.cli", "train"]
TINY = ["--env", "procgen:coinrun", "--policy", "nature", "--num-envs", "2", "--num-steps", "16",
        "--minibatches", "2", "--epochs", "1", "--checkpoint-every", "1", "--no-progress",
        "--no-announce", "--device", "cpu", "--env-option", "distribution_mode=easy"]  # fmt: skip


@pytest.mark.integration
def test_killed_learner_stops_the_run_in_one_line_and_resume_continues(tmp_path):
    run, log = tmp_path / "run", tmp_path / "stderr.txt"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    with open(log, "w") as err:
        proc = subprocess.Popen([*CLI, *TINY, "--learners", "2", "--total-steps", "100000",
                                 "--run-dir", str(run)], stdout=subprocess.DEVNULL, stderr=err,
                                env=env, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        pids = None
        while time.monotonic() < deadline and (pids is None or len(checkpoint_steps(run)) < 2):
            found = re.search(r"learners \(gloo\): pids (\d+), (\d+)", log.read_text())
            pids = [int(p) for p in found.groups()] if found else None
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.1)
        assert pids is not None and len(checkpoint_steps(run)) >= 2, log.read_text()[-3000:]
        os.kill(pids[1], signal.SIGKILL)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert rc == 2, text[-3000:]
    lines = [l for l in text.splitlines() if l.startswith("loupe: error:")]
    assert len(lines) == 1, text[-3000:]
    assert "Traceback" not in text
    assert "learner 1" in lines[0] and f"pid {pids[1]}" in lines[0], lines[0]
    assert f"loupe train --resume {run}" in lines[0], lines[0]
    killed_at = checkpoint_steps(run)[-1]
    resumed = subprocess.run([*CLI, "--resume", str(run), "--total-steps", str(killed_at + 64),
                              "--no-progress"], capture_output=True, text=True, timeout=300,
                             env=env)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    steps = checkpoint_steps(run)
    assert steps[-1] == killed_at + 64 and killed_at in steps
    assert len(steps) == len(set(steps))
    assert json.loads((run / "config.json").read_text())["learners"] == 2
    # a learner count this machine cannot run is refused on resume too, and the run is untouched
    from loupe.distributed.learners import available_cpus

    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    too_many = str(1 << available_cpus().bit_length())
    proc = subprocess.run([*CLI, "--resume", str(run), "--learners", too_many, "--no-progress"],
                          capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len([l for l in proc.stderr.splitlines() if l.startswith("loupe: error:")]) == 1
    assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == before


@pytest.mark.integration
@pytest.mark.parametrize("learners, needle", [
    ("0", "argument --learners: must be from 1 to 1024, got 0"),
    ("3", "does not split evenly over 3 learners"),
    ("cpus", "CPUs (one each) but this machine has"),
])  # fmt: skip
def test_bad_learner_counts_give_one_line_and_write_nothing(tmp_path, learners, needle):
    from loupe.distributed.learners import available_cpus

    extra = []
    if learners == "cpus":  # more learners than CPUs, with a minibatch they would split
        n = 1 << available_cpus().bit_length()
        learners, extra = str(n), ["--num-steps", str(16 * n)]
    run = tmp_path / "run"
    proc = subprocess.run([*CLI, *TINY, *extra, "--learners", learners, "--total-steps", "64",
                           "--run-dir", str(run)], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.startswith("loupe: error:")]
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not run.exists()
