"""Training on a real local Ray: both inference placements, bounded lag, actor death, learner death."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from actors import EnvConfig
from learner import PPOConfig
from loupe.errors import LoupeError
from loupe.train import TrainConfig, Trainer


def tiny(run_dir: Path, actors: int = 2, inference: str = "actor", total: int = 256, lag: int = 1,
         announce: bool = False, redis: str | None = None) -> TrainConfig:  # fmt: skip
    ppo = PPOConfig.preset("procgen", num_envs=2 * actors, num_steps=16, num_minibatches=2,
                           update_epochs=1, total_steps=total)  # fmt: skip
    env = EnvConfig("procgen:coinrun", num_envs=2 * actors, seed=0, distribution_mode="easy")
    return TrainConfig(env=env, ppo=ppo, run_dir=str(run_dir), policy="nature", actors=actors,
                       inference=inference, max_policy_lag=lag, announce=announce, redis=redis,
                       checkpoint_every=2, device="cpu")  # fmt: skip


@pytest.fixture(scope="module")
def local_ray():
    import ray

    from loupe.distributed import init_ray

    init_ray(None, num_cpus=2)
    yield
    ray.shutdown()


def train(cfg: TrainConfig) -> Trainer:
    from loupe.rundir import RunDir

    trainer = Trainer(cfg, progress=False)
    RunDir(cfg.run_dir).create()
    trainer.train()
    return trainer


def checkpoint_steps(run: Path) -> list[int]:
    return sorted(json.loads(p.read_text())["step"]
                  for p in (run / "checkpoints").glob("ckpt-*[0-9].json"))  # fmt: skip


@pytest.mark.integration
@pytest.mark.parametrize("inference, lag", [("actor", 1), ("actor", 0), ("central", 0)])
def test_ray_training_runs_with_bounded_lag(local_ray, tmp_path, inference, lag):
    stats: list[dict] = []
    cfg = tiny(tmp_path / "run", inference=inference, lag=lag)
    trainer = Trainer(cfg, progress=False)
    from loupe.rundir import RunDir

    RunDir(cfg.run_dir).create()
    original = trainer.learner.update

    def spy(rollout):
        out = original(rollout)
        stats.append({"lag": trainer.version - rollout.policy_version, "n": rollout.num_envs})
        return out

    trainer.learner.update = spy
    trainer.train()
    assert trainer.learner.global_step == 256
    assert checkpoint_steps(tmp_path / "run")[-1] == 256
    assert all(s["n"] == 4 for s in stats)  # both actors' envs in every batch
    assert max(s["lag"] for s in stats) <= (lag if inference == "actor" else 0)
    if inference == "actor" and lag == 1:
        assert max(s["lag"] for s in stats) == 1  # pipelined: exactly one version behind


def recorded_run(cfg: TrainConfig):
    """Train ``cfg`` -> (every rollout the learner consumed, final weights)."""
    from loupe.rundir import RunDir

    trainer = Trainer(cfg, progress=False)
    RunDir(cfg.run_dir).create()
    rollouts = []
    original = trainer.learner.update

    def spy(rollout):
        rollouts.append(rollout)
        return original(rollout)

    trainer.learner.update = spy
    trainer.train()
    return rollouts, trainer.weights()


@pytest.mark.integration
def test_actor_central_and_in_process_sampling_learn_the_same_without_lag(local_ray, tmp_path):
    """Same seed, lag 0: the placement only moves the forward pass, so the runs are the same run
    (and so is the in-process sampler's).

    With one actor the rollout actor's sampling generator and the central one share the seed, so
    every frame, action, reward and log-probability, and the weights after the last update, agree.
    """
    import numpy as np

    actor_run = recorded_run(
        tiny(tmp_path / "actor", actors=1, inference="actor", lag=0, total=128)
    )
    central_run = recorded_run(tiny(tmp_path / "central", actors=1, inference="central", total=128))
    in_process = dataclasses.replace(
        tiny(tmp_path / "in-process", actors=1, lag=0, total=128), actors=0
    )  # a RolloutActor in this process, no Ray
    (ra, wa), (rc, wc) = actor_run, central_run
    ri, wi = recorded_run(in_process)
    assert len(ra) == len(rc) == len(ri) == 4
    for a, c in [*zip(ra, rc), *zip(ri, rc)]:
        assert a.policy_version == c.policy_version
        np.testing.assert_array_equal(a.obs, c.obs)
        np.testing.assert_array_equal(a.actions, c.actions)
        np.testing.assert_array_equal(a.rewards, c.rewards)
        np.testing.assert_array_equal(a.dones, c.dones)
        np.testing.assert_allclose(a.logprobs, c.logprobs, atol=1e-5)
        np.testing.assert_allclose(a.values, c.values, atol=1e-5)
    assert wa.keys() == wc.keys() == wi.keys()
    for name in wa:
        np.testing.assert_allclose(wa[name], wc[name], atol=1e-5, err_msg=name)
        np.testing.assert_allclose(wi[name], wc[name], atol=1e-5, err_msg=name)
    # and the updates did move the weights: the agreement is not two untouched initialisations
    init = Trainer(tiny(tmp_path / "init", actors=1, inference="central", total=128),
                   progress=False)  # fmt: skip
    moved = max(float(np.abs(wa[k] - v).max()) for k, v in init.weights().items())
    init.sampler.close()
    assert moved > 1e-4


@pytest.mark.integration
@pytest.mark.parametrize("inference", ["actor", "central"])
def test_killed_rollout_actor_is_restarted_and_training_completes(local_ray, tmp_path, inference):
    import ray

    cfg = tiny(
        tmp_path / "run", total=512, inference=inference, lag=1 if inference == "actor" else 0
    )
    trainer = Trainer(cfg, progress=False)
    from loupe.rundir import RunDir

    RunDir(cfg.run_dir).create()
    victim = trainer.sampler.actors[0]

    def kill_after_first_checkpoint():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not checkpoint_steps(tmp_path / "run"):
            time.sleep(0.05)
        ray.kill(victim, no_restart=False)  # Ray restarts it (max_restarts)

    killer = threading.Thread(target=kill_after_first_checkpoint)
    killer.start()
    trainer.train()
    killer.join()
    assert trainer.learner.global_step == 512
    # actor: the lost batch was noticed and sampled again; central: the lost stepper's episodes
    # were cut at that step and its fresh envs joined the same rollout
    assert trainer.sampler.actor_failures >= 1


@pytest.mark.integration
def test_checkpoints_are_announced_on_the_private_redis(local_ray, tmp_path):
    from loupe.bus import CheckpointBus, connect
    from loupe.bus.redis_server import RedisServer

    cfg = tiny(tmp_path / "run", announce=True, total=128)
    trainer = train(cfg)
    assert trainer.redis_server is None  # stopped at the end
    with RedisServer(tmp_path / "run" / "redis") as server:  # restarted over the AOF
        anns = [a for _, a in CheckpointBus(connect(server.url), cfg.run_id).announcements()]
    assert [a.step for a in anns] == checkpoint_steps(tmp_path / "run")
    meta = json.loads(Path(anns[-1].uri).read_text())
    assert anns[-1].sha256 == meta["sha256"] and anns[-1].policy == "nature"


@pytest.mark.integration
def test_more_actors_than_cpus_is_refused(local_ray, tmp_path):
    with pytest.raises(LoupeError, match="CPUs needed"):
        Trainer(tiny(tmp_path / "run", actors=5), progress=False)


@pytest.mark.integration
def test_the_local_ray_gcs_runs_with_loupe_s_task_record_bound(local_ray):
    """The bound of ``RAY_TASK_EVENTS`` reaches the GCS process Ray started (its environment)."""
    import ray

    from loupe.distributed import RAY_TASK_EVENTS

    session = Path(ray._private.worker._global_node.get_session_dir_path()).name
    environs = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"gcs_server" in cmdline and session.encode() in cmdline:
                environs.append(Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))
        except OSError:
            continue
    assert len(environs) == 1
    ((name, value),) = RAY_TASK_EVENTS.items()
    assert f"{name}={value}".encode() in environs[0]


@pytest.mark.unit
def test_unreachable_ray_address_fails_fast(tmp_path):
    from loupe.bus.redis_server import free_port
    from loupe.distributed import check_reachable

    t0 = time.monotonic()
    with pytest.raises(LoupeError, match="cannot reach Ray"):
        check_reachable(f"127.0.0.1:{free_port()}")
    assert time.monotonic() - t0 < 5


@pytest.mark.integration
def test_learner_killed_and_resumed_continues_from_last_checkpoint(tmp_path):
    run = tmp_path / "run"
    args = ["--env", "procgen:coinrun", "--policy", "nature", "--num-envs", "2", "--num-steps",
            "16", "--minibatches", "1", "--epochs", "1", "--checkpoint-every", "1",
            "--no-progress", "--no-announce"]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "loupe.cli", "train", *args, "--total-steps", "100000",
         "--run-dir", str(run)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(checkpoint_steps(run) if run.exists() else []) < 3:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = checkpoint_steps(run)[-1]
    assert killed_at >= 96
    resumed = subprocess.run(
        [sys.executable, "-m", "loupe.cli", "train", "--resume", str(run), "--total-steps",
         str(killed_at + 64), "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    steps = checkpoint_steps(run)
    assert steps[-1] == killed_at + 64 and killed_at in steps
    # no checkpoint repeats a step: the counter continued from the last checkpoint
    assert len(steps) == len(set(steps))
