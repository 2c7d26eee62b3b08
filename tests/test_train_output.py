"""What `loupe train` tells the user: a --total-steps that is not whole updates is rounded up in one
line up front, the progress bar counts real environment steps up to the real total, a run without
a finished episode says so (not ret=nan), and config.json holds the options of its env family."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from actors import EnvConfig
from actors.envs import option_names
from loupe.config import from_dict
from loupe.heap import memory_mb
from loupe.train import TrainConfig, planned_end, rounding_note

TINY = ["--num-envs", "2", "--num-steps", "16", "--minibatches", "1", "--epochs", "1"]


def loupe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loupe.cli", *args], capture_output=True,
                          text=True, timeout=600)  # fmt: skip


@pytest.mark.unit
def test_rounding_note_counts_whole_updates():
    assert rounding_note(0, 8192, 64, 256) == (
        "--total-steps 8192 is rounded up to 16384 = 1 update of 64 envs x 256 steps"
    )
    assert rounding_note(0, 20000, 64, 256) == (
        "--total-steps 20000 is rounded up to 32768 = 2 updates of 64 envs x 256 steps"
    )
    assert rounding_note(0, 32768, 64, 256) is None  # whole updates: nothing to say
    assert rounding_note(16384, 20000, 64, 256).endswith(
        "1 update of 64 envs x 256 steps from step 16384"
    )
    assert rounding_note(32768, 20000, 64, 256) is None  # a resumed run already past the total
    # against a slow loop: train whole updates until the total is reached
    for done, total, batch in [(0, 1, 7), (0, 7, 7), (14, 15, 7), (0, 100, 32), (64, 64, 32)]:
        step = done
        while step < total:
            step += batch
        assert planned_end(done, total, batch) == step


@pytest.mark.unit
@pytest.mark.parametrize("env_id, own, other", [("ALE/Breakout-v5", "ALE", "procgen"),
                                                ("procgen:coinrun", "procgen", "ALE")])  # fmt: skip
def test_env_config_dict_holds_its_own_family_only(env_id, own, other):
    cfg = EnvConfig(env_id=env_id, num_envs=2)
    d = cfg.to_dict()
    assert set(option_names(own)) <= set(d)
    assert not set(option_names(other)) & set(d)
    assert {"env_id", "num_envs", "seed", "options"} <= set(d)
    assert from_dict(EnvConfig, json.loads(json.dumps(d))) == cfg
    # an old dict listing every option (at their defaults) still loads
    assert from_dict(EnvConfig, dataclasses.asdict(cfg)) == cfg


@pytest.fixture(scope="module")
def rounded_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """`loupe train --total-steps 40` (2 envs x 16 steps a batch), with its progress bar."""
    run = tmp_path_factory.mktemp("rounded") / "run"
    proc = loupe("train", "--env", "procgen:coinrun", "--policy", "nature", *TINY,
                 "--total-steps", "40", "--run-dir", str(run), "--no-announce")  # fmt: skip
    return proc, run


def train_in_process(capsys, *args: str) -> str:
    """`loupe train ARGS` in this process (its CLI entry point) -> its stdout."""
    from loupe.cli import main

    capsys.readouterr()
    status = main(["train", *args])
    out, err = capsys.readouterr()
    assert status == 0, err[-2000:]
    return out


@pytest.mark.integration
def test_atari_config_json_lists_no_procgen_options_and_resumes(tmp_path, capsys):
    run = tmp_path / "breakout"
    train_in_process(capsys, "--env", "ALE/Breakout-v5", "--policy", "nature", *TINY,
                     "--total-steps", "32", "--run-dir", str(run), "--no-progress",
                     "--no-announce")  # fmt: skip
    saved = json.loads((run / "config.json").read_text())
    assert not set(option_names("procgen")) & set(saved["env"]), saved["env"]
    assert set(option_names("ALE")) <= set(saved["env"])
    (meta,) = [json.loads(p.read_text()) for p in (run / "checkpoints").glob("ckpt-*[0-9].json")]
    assert not set(option_names("procgen")) & set(meta["env_options"])
    assert TrainConfig.load(run / "config.json").env.family == "ALE"
    out = train_in_process(capsys, "--resume", str(run), "--total-steps", "64", "--no-progress")
    assert "done at step 64" in out


@pytest.mark.integration
def test_old_config_json_with_every_option_still_resumes(rounded_run, tmp_path, capsys):
    proc, trained = rounded_run
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = tmp_path / "old"
    shutil.copytree(trained, run)
    config = json.loads((run / "config.json").read_text())
    config["env"] |= {"sticky_actions": 0.25, "episodic_life": False, "frame_stack": 4,
                      "ale_threads": 0}  # fmt: skip  # as config.json files were written before
    (run / "config.json").write_text(json.dumps(config))
    out = train_in_process(capsys, "--resume", str(run), "--total-steps", "96", "--no-progress")
    assert "done at step 96" in out


@pytest.mark.integration
def test_rounded_total_is_said_and_the_bar_counts_real_steps(rounded_run):
    proc, _ = rounded_run
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[1] == "--total-steps 40 is rounded up to 64 = 2 updates of 2 envs x 16 steps"
    assert "done at step 64" in proc.stdout
    # CoinRun episodes outlast 32 steps per env: none finished
    assert lines[-1] == "mean return: no episode finished yet"
    bar = proc.stderr.replace("\r", "\n")
    counts = [float(m) for m in re.findall(r"([\d.]+)/64\.0 ", bar)]
    assert counts and max(counts) == 64 and not re.search(r"/40\.0 ", bar)
    assert "no episode finished yet" in bar and "ret=nan" not in bar


@pytest.mark.integration
def test_rollout_reports_every_environment_step():
    from actors.rollout import RolloutActor, RolloutConfig
    from attention import build_policy

    actor = RolloutActor(
        RolloutConfig(env=EnvConfig("procgen:coinrun", num_envs=3), policy="impala")
    )
    policy = build_policy("impala", actor.obs_shape, actor.n_actions)
    actor.set_weights(0, {k: v.numpy() for k, v in policy.state_dict().items()})
    seen: list[int] = []
    try:
        rollout = actor.rollout(5, on_step=seen.append)
    finally:
        actor.close()
    assert seen == [3] * 5 and rollout.actions.size == sum(seen)


@pytest.mark.integration
def test_trainer_history_keeps_only_the_newest_updates(tmp_path, monkeypatch):
    """Trainer.history gained one entry per update for good: ~1 kB per update, days of updates."""
    import loupe.train
    from learner import PPOConfig

    monkeypatch.setattr(loupe.train, "HISTORY_LEN", 3)
    ppo = PPOConfig.preset("procgen", num_envs=2, num_steps=16, num_minibatches=1,
                           update_epochs=1, total_steps=32 * 5)  # fmt: skip
    cfg = TrainConfig(env=EnvConfig("procgen:coinrun", num_envs=2), ppo=ppo, policy="nature",
                      run_dir=str(tmp_path / "run"), announce=False, device="cpu")  # fmt: skip
    trainer = loupe.train.Trainer(cfg, progress=False)
    trainer.train()
    assert [h["step"] for h in trainer.history] == [96.0, 128.0, 160.0]
    assert all("steps_per_s" in h for h in trainer.history)
    # each checkpoint records the learner's memory as it wrote it (the soak's level series)
    (meta,) = [json.loads(p.read_text())
               for p in (tmp_path / "run" / "checkpoints").glob("ckpt-*[0-9].json")]  # fmt: skip
    proc = meta["process"]
    rss_now, _ = memory_mb()
    assert proc["pid"] == os.getpid()
    assert 0 < proc["private_mb"] <= proc["rss_mb"] <= rss_now * 1.5
