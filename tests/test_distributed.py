"""Training on a real local Ray: both inference placements, bounded lag, actor death, learner death;
the tiny `loupe compare-placements`, rollout actors writing frames into shared memory, and two
gloo learners against one. (The tests that need a local Ray in this process share this module's
one: each start costs seconds.)"""

from __future__ import annotations

import copy
import dataclasses
import glob
import json
import os
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
from learner.rollout import Rollout, SharedObs
from loupe.errors import LoupeError
from loupe.train import TrainConfig, Trainer
from tests.test_learners import ENVS, STEPS, assert_same, tiny_config
from tests.test_learners import weights as policy_weights


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


def checkpoint_steps(run: Path) -> list[int]:
    return sorted(json.loads(p.read_text())["step"]
                  for p in (run / "checkpoints").glob("ckpt-*[0-9].json"))  # fmt: skip


@pytest.mark.integration
@pytest.mark.parametrize("inference, lag, announce", [("actor", 1, False), ("central", 0, True)],
                         ids=["actor-1", "central-0-announced"])  # fmt: skip
def test_ray_training_runs_with_bounded_lag_through_an_actor_death(
    local_ray, tmp_path, inference, lag, announce
):
    """Every batch holds both actors' envs and lags at most ``lag`` versions behind (``actor``
    with lag 1: exactly one, pipelined; ``actor`` with lag 0 samples what ``central`` does, in
    the test below). A rollout actor is killed during the first update: Ray restarts it and the
    run completes (actor: the lost batch was noticed and sampled again; central: the lost
    stepper's episodes were cut at that step and its fresh envs joined the same rollout). With
    ``announce``, every checkpoint is announced on the run's private Redis, which is stopped at
    the end."""
    import ray

    stats: list[dict] = []
    cfg = tiny(tmp_path / "run", inference=inference, lag=lag, announce=announce)
    trainer = Trainer(cfg, progress=False)
    from loupe.rundir import RunDir

    RunDir(cfg.run_dir).create()
    original = trainer.learner.update
    victim = trainer.sampler.actors[0]

    def spy(rollout):
        if not stats:
            # actor: the next batch is sampling (or, done already, the one after it is sent to
            # the restarting actor); central: the next rollout's first step finds it gone
            ray.kill(victim, no_restart=False)  # Ray restarts it (max_restarts)
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
    assert trainer.sampler.actor_failures >= 1
    if announce:
        from loupe.bus import CheckpointBus, connect
        from loupe.bus.redis_server import RedisServer

        assert trainer.redis_server is None  # stopped at the end
        with RedisServer(tmp_path / "run" / "redis") as server:  # restarted over the AOF
            anns = [a for _, a in CheckpointBus(connect(server.url), cfg.run_id).announcements()]
        assert [a.step for a in anns] == checkpoint_steps(tmp_path / "run")
        meta = json.loads(Path(anns[-1].uri).read_text())
        assert anns[-1].sha256 == meta["sha256"] and anns[-1].policy == "nature"


def recorded_run(cfg: TrainConfig, initial: dict | None = None):
    """Train ``cfg`` -> (every rollout the learner consumed, final weights); the initial weights
    go into ``initial``."""
    from loupe.rundir import RunDir

    trainer = Trainer(cfg, progress=False)
    RunDir(cfg.run_dir).create()
    if initial is not None:
        initial.update({k: v.copy() for k, v in trainer.weights().items()})
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

    init: dict = {}
    actor_run = recorded_run(
        tiny(tmp_path / "actor", actors=1, inference="actor", lag=0, total=128), init
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
    moved = max(float(np.abs(wa[k] - v).max()) for k, v in init.items())
    assert moved > 1e-4


@pytest.mark.integration
def test_tiny_comparison_trains_both_placements_and_resumes(local_ray, tmp_path):
    """`loupe compare-placements` (test_placement.py has its statistics and checks)."""
    from loupe.placement import PlacementConfig, compare_placements

    # BigFish: random play ends episodes within the tiny budget (CoinRun's rarely do); 2
    # updates of 8 envs x 32 steps: central inference makes one Ray call per step, so few
    # steps per env, with envs enough for every run to end episodes (3 to 5 each)
    cfg = PlacementConfig(env_id="procgen:bigfish", num_envs=8, num_steps=32, minibatches=2,
                          epochs=1, total_steps=512, seeds=(1, 2),
                          out=str(tmp_path / "cmp"))  # fmt: skip
    summary = compare_placements(cfg, echo=lambda _: None, progress=False)
    runs = tmp_path / "cmp" / "runs"
    results = {p.name: json.loads(p.read_text()) for p in runs.glob("*.json")}
    assert sorted(results) == [f"{p}-seed{s}.json" for p in ("actor", "central") for s in (1, 2)]
    assert all(r["steps"] == 512 and len(r["curve"]) == 2 for r in results.values())
    assert summary["placements"]["actor"]["max_policy_lag"] == 1.0
    assert summary["placements"]["central"]["max_policy_lag"] == 0.0
    assert (tmp_path / "cmp" / "curves.png").stat().st_size > 5_000
    for metric in ("final_return", "late_return"):
        test = summary["actor_minus_central"][metric]
        assert set(test) >= {"diff", "p", "ci95", "paired_diffs", "paired_p", "within_noise"}
    # a second call trains nothing: every run is read back from its result file
    stamps = {p: p.stat().st_mtime_ns for p in runs.glob("*.json")}
    again = compare_placements(cfg, echo=lambda _: None, progress=False)
    assert {p: p.stat().st_mtime_ns for p in runs.glob("*.json")} == stamps
    assert again["placements"] == summary["placements"]
    # the same out dir with other settings is refused instead of mixing two comparisons
    other = dataclasses.replace(cfg, epochs=2)
    saved = (tmp_path / "cmp" / "config.json").read_text()
    with pytest.raises(LoupeError, match=r"other settings \(epochs\)"):
        compare_placements(other, echo=lambda _: None, progress=False)
    assert (tmp_path / "cmp" / "config.json").read_text() == saved


def sample(sampler, weights, n: int) -> list[tuple[Rollout, dict]]:
    """Start ``sampler`` and take ``n`` batches, all held."""
    sampler.start(weights, 0)
    return [sampler.collect() for _ in range(n)]


def assert_same_batches(shared: list[Rollout], store: list[Rollout]) -> None:
    assert len({id(r.obs) for r in shared}) == len(shared)  # all held: a buffer each
    for a, b in zip(shared, store, strict=True):
        assert a.obs.shape == (8, 4, 3, 64, 64) and a.obs.any()
        np.testing.assert_array_equal(a.obs, b.obs)
        np.testing.assert_array_equal(a.actions, b.actions)
        np.testing.assert_array_equal(a.rewards, b.rewards)


@pytest.mark.integration
@pytest.mark.skipif(not SharedObs.available(), reason="no /dev/shm")
def test_ray_actors_write_frames_in_place_and_an_actor_ray_restarts_does_too(local_ray, tmp_path):
    """Two actors write their frames in place into the shared buffers, and those batches equal
    the ones sent through the object store (same seeds). Then one actor is killed and Ray
    restarts it; found by the soak, two faults behind the learner's memory stepping up at every
    actor death: the batch being sampled stayed referenced for good (through the error Ray keeps
    for the lost ref, its traceback and collect's frame), and the files went once every actor had
    mapped them, so the actor Ray started in place of the dead one sent its frames through the
    object store for the rest of the run (a copy per batch)."""
    import ray

    from attention import build_policy
    from loupe.bench import _train_config
    from loupe.distributed import RaySampler

    cfg = _train_config("procgen:coinrun", "nature", 4, 8, 10**6, str(tmp_path), actors=2,
                        distribution_mode="easy")  # fmt: skip
    weights = {
        k: v.numpy() for k, v in build_policy("nature", (3, 64, 64), 15).state_dict().items()
    }
    sampler = RaySampler(cfg, shared_obs=False)
    try:
        store = sample(sampler, weights, 3)
    finally:
        sampler.close()
    assert [s["shared_obs"] for _, s in store] == [0.0] * 3
    sampler = RaySampler(cfg)
    try:
        got = sample(sampler, weights, 3)  # and the next batch samples (lag 1)
        assert [s["shared_obs"] for _, s in got] == [1.0] * 3
        assert [s["obs_copied_actors"] for _, s in got] == [0.0] * 3
        assert all(s["transfer_s"] >= 0 for _, s in got)
        assert_same_batches([r for r, _ in got], [r for r, _ in store])
        del got, store  # every buffer is free again, but the one being filled
        old = ray.get(sampler.actors[1].__ray_call__.remote(lambda self: os.getpid()))
        ray.kill(sampler.actors[1], no_restart=False)  # Ray restarts it
        stats = []
        for v in (1, 2, 3):
            sampler.publish(weights, v)
            stats.append(sampler.collect()[1])
        new = ray.get(sampler.actors[1].__ray_call__.remote(lambda self: os.getpid()))
        pool, prefix = sampler.shared, sampler.shared.prefix
        # nothing holds the batch the death interrupted (Ray keeps the lost ref's error, and the
        # error held the traceback with collect's frame): only the batch sampling now is in use
        in_use = [i for i in range(len(pool.arrays))
                  if i in pool.reserved or sys.getrefcount(pool.arrays[i]) > 2]  # fmt: skip
        assert in_use == [sampler.pending_buffer], (in_use, sampler.pending_buffer)
    finally:
        sampler.close()
    assert not glob.glob(prefix + "-*")  # files gone at close
    assert new != old
    assert stats[-1]["actor_failures"] >= 1.0, stats
    # after the restart every batch is written in place by both actors
    assert [s["shared_obs"] for s in stats[1:]] == [1.0, 1.0], stats
    assert [s["obs_copied_actors"] for s in stats[1:]] == [0.0, 0.0], stats
    assert not any(os.path.basename(p).startswith(f"loupe-obs-{os.getpid()}-")
                   for p in os.listdir("/dev/shm"))  # fmt: skip


# -- data-parallel learners (test_learners.py has the rest) ---------------------------------------
@pytest.fixture(scope="module")
def gloo_rollouts():
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


@pytest.mark.integration
def test_two_gloo_learners_take_one_learners_steps_and_resume_exactly(local_ray, gloo_rollouts,
                                                                      tmp_path):  # fmt: skip
    """After every update the weights of 2 learners (each on half of every minibatch) equal those of
    one learner on the combined minibatches; the stats are the whole batch's; a checkpoint taken
    after update 2 and loaded into two fresh learners gives update 3's weights again."""
    from learner.checkpoint import load_checkpoint, load_train_state, save_checkpoint
    from loupe.distributed.learners import DataParallelLearner

    init, batches = gloo_rollouts
    cfg = tiny_config(tmp_path / "run")
    ref = PPOLearner(copy.deepcopy(init), cfg.ppo, shards=2)
    dp = DataParallelLearner(cfg, copy.deepcopy(init), torch.device("cpu"))
    try:
        for u, rollout in enumerate(batches):
            expected = ref.update(rollout)
            got = dp.update(rollout)
            assert_same(policy_weights(dp.policy), policy_weights(ref.policy))
            assert_same(dp.rank_weights(1), policy_weights(ref.policy))
            assert dp.global_step == ref.global_step == (u + 1) * ENVS * STEPS
            assert got.keys() == expected.keys()
            for key in expected:
                assert got[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key
            assert got["decoupled"] == float(u > 0)  # stale batches: the decoupled branch too
            if u == 1:
                ckpt = save_checkpoint(tmp_path / "run", dp.policy, {"step": dp.global_step},
                                       train_state=dp.state_dict())  # fmt: skip
        final = policy_weights(dp.policy)
    finally:
        dp.close()
    # the updates moved the weights: the agreement is not two untouched copies
    assert max(float(np.abs(final[k] - v).max()) for k, v in policy_weights(init).items()) > 1e-4

    policy, _ = load_checkpoint(ckpt)
    resumed = DataParallelLearner(cfg, policy, torch.device("cpu"))
    try:
        resumed.load_state_dict(load_train_state(ckpt))
        assert resumed.global_step == 2 * ENVS * STEPS
        resumed.update(batches[2])
        assert_same(policy_weights(resumed.policy), final)
    finally:
        resumed.close()


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
@pytest.mark.slow  # test_supervise.py's SIGKILLed learner, resumed with --resume, covers it
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
