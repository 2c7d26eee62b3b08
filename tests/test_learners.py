"""`--learners N`: data-parallel PPO learners (real Ray actors, real torch.distributed gloo on
loopback) take exactly one learner's steps on the combined minibatches, checkpoint and resume like
one learner (that test runs on the local Ray of test_distributed.py), and a dead learner stops the
run with one line."""

from __future__ import annotations

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
# the 2 gloo learners against one learner (every update, and a resume) run on the local Ray of
# test_distributed.py, which the tests that need one in this process share


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
def test_killed_learner_stops_the_run_in_one_line_and_keeps_a_checkpoint_to_resume(tmp_path):
    """A SIGKILLed learner stops `loupe train` with one line naming it and the resume command;
    the newest checkpoint is the last one written before the death, whole (weights and training
    state; that two fresh learners resume such a checkpoint exactly is the gloo test in
    test_distributed.py), and
    a learner count this machine cannot run is refused on resume without touching the run."""
    from learner.checkpoint import latest_checkpoint, load_checkpoint, load_train_state

    run, log, out = tmp_path / "run", tmp_path / "stderr.txt", tmp_path / "stdout.txt"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    with open(log, "w") as err, open(out, "w") as stdout:
        proc = subprocess.Popen([*CLI, *TINY, "--learners", "2", "--total-steps", "100000",
                                 "--run-dir", str(run)], stdout=stdout, stderr=err, env=env,
                                start_new_session=True)  # fmt: skip
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
    # the newest checkpoint is the last one written (none on the way out: the dead learner took
    # its optimiser state along), and it is whole
    steps = checkpoint_steps(run)
    written = [int(line.rsplit("ckpt-", 1)[1].split(".")[0]) for line in
               out.read_text().splitlines() if line.startswith("checkpoint ")]  # fmt: skip
    assert len(steps) >= 2 and set(steps) <= set(written) and steps[-1] == written[-1], written
    newest = latest_checkpoint(run)
    _, meta = load_checkpoint(newest)  # size and sha256 verified
    assert meta["step"] == steps[-1] == load_train_state(newest).meta["global_step"]
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
