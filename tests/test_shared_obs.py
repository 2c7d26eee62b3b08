"""Shared-memory observation buffers between rollout actors and the learner (real /dev/shm files,
real procgen, a real local Ray)."""

from __future__ import annotations

import dataclasses
import glob
import os

import numpy as np
import pytest

from learner.rollout import Rollout, RolloutBuilder, SharedObs, map_shared

pytestmark = pytest.mark.skipif(not SharedObs.available(), reason="no /dev/shm")


def files(pool: SharedObs) -> list[str]:
    return sorted(glob.glob(pool.prefix + "-*"))


@pytest.mark.unit
def test_a_buffer_is_handed_out_again_only_once_nothing_holds_it(tmp_path):
    pool = SharedObs((2, 3, 1, 2, 2), directory=str(tmp_path), max_buffers=2)
    i = pool.acquire()
    held = pool.arrays[i][:, 1:]  # a view, as a Rollout or a torch tensor keeps one
    pool.release(i)
    j = pool.acquire()  # reserved while its batch is sampled
    assert (i, j) == (0, 1) and pool.acquire() is None  # both in use: the batch goes the usual way
    pool.release(j)
    assert pool.acquire() == 1  # released and nothing holds it
    pool.release(1)
    del held
    assert pool.acquire() == 0
    # another mapping of the same file (an actor's) writes what the learner's array reads
    other = map_shared(pool.paths[1], pool.shape)
    other[1, 2] = 7
    assert (pool.arrays[1][1, 2] == 7).all() and pool.arrays[1].sum() == 7 * 4
    # the files stay while the pool lives: an actor started later (a restarted one) maps them
    assert files(pool) == sorted(pool.paths)
    later = map_shared(pool.paths[1], pool.shape)
    later[0, 0] = 3
    assert (pool.arrays[1][0, 0] == 3).all() and (other[0, 0] == 3).all()
    with pytest.raises(ValueError, match="bytes"):
        map_shared(pool.paths[0], (5,))
    pool.close()
    assert files(pool) == []


def dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.unit
def test_buffers_of_a_dead_learner_are_removed_and_no_others(tmp_path):
    from loupe.shm import remove_stale_buffers

    gone = dead_pid()
    d = str(tmp_path)
    names = {
        "dead": f"loupe-obs-{gone}-0123456789ab-0",
        "dead2": f"loupe-obs-{gone}-0123456789ab-1",
        "alive": f"loupe-obs-{os.getpid()}-ba9876543210-0",
        "other": f"other-{gone}-0",  # not a buffer
        "odd": "loupe-obs-x-0",
    }
    for name in names.values():
        (tmp_path / name).write_bytes(b"0")
    # a SIGKILLed learner's files go with the next pool made in the directory
    pool = SharedObs((1, 1, 1, 1, 4), directory=d)
    left = sorted(os.listdir(d))
    assert left == sorted([names["alive"], names["other"], names["odd"]]), left
    pool.acquire()
    # by pid (the supervisor, once its child is dead): that process's files only
    assert remove_stale_buffers(d, pid=os.getpid() + 10**7) == []
    removed = remove_stale_buffers(d, pid=os.getpid())
    assert removed == sorted([os.path.join(d, names["alive"]), pool.paths[0]])
    assert sorted(os.listdir(d)) == sorted([names["other"], names["odd"]])
    assert remove_stale_buffers(str(tmp_path / "missing")) == []


@pytest.mark.unit
def test_files_go_when_the_pool_is_dropped(tmp_path):
    pool = SharedObs((1, 1, 1, 1, 4), directory=str(tmp_path))
    pool.acquire()
    pattern = pool.prefix + "-*"
    assert glob.glob(pattern)
    del pool
    assert not glob.glob(pattern)


def part(t: int, n: int, fill: int | None, seed: int) -> Rollout:
    rng = np.random.default_rng(seed)
    b = RolloutBuilder(t, n, (1, 2, 2))
    for s in range(t):
        b.observe(s, np.full((n, 1, 2, 2), 0 if fill is None else fill + s, np.uint8))
        b.record(s, rng.integers(0, 3, n), rng.random(n).astype(np.float32),
                 rng.random(n).astype(np.float32), rng.random(n).astype(np.float32),
                 rng.random(n) < 0.3, [])  # fmt: skip
    r = b.build(np.zeros((n, 1, 2, 2), np.uint8), np.zeros(n, np.float32), 0)
    return dataclasses.replace(r, obs=None) if fill is None else r


@pytest.mark.unit
def test_joined_rollout_reads_the_shared_buffer_and_copies_in_parts_that_brought_frames():
    from loupe.distributed import concat_rollouts

    t, envs = 3, [2, 1]
    shared = np.zeros((t, 3, 1, 2, 2), np.uint8)
    shared[:, :2] = 9  # actor 0 wrote its frames in place
    parts = [part(t, 2, None, 0), part(t, 1, 40, 1)]  # actor 1 (another node) sent its own
    joined = concat_rollouts(parts, envs, obs=shared)
    assert joined.obs is shared
    assert (shared[:, :2] == 9).all()
    assert [int(shared[s, 2].max()) for s in range(t)] == [40, 41, 42]
    np.testing.assert_array_equal(joined.actions, np.concatenate([p.actions for p in parts], 1))
    with pytest.raises(ValueError, match="obs buffer"):
        RolloutBuilder(t, 2, (1, 2, 2), obs=np.zeros((t, 3, 1, 2, 2), np.uint8))


@pytest.fixture(scope="module")
def local_ray():
    import ray

    from loupe.distributed import init_ray

    init_ray(None, num_cpus=2)
    yield
    ray.shutdown()


@pytest.mark.integration
def test_ray_actors_write_frames_in_place_and_the_batches_equal_the_object_store_ones(
    local_ray, tmp_path
):
    from attention import build_policy
    from loupe.bench import _train_config
    from loupe.distributed import RaySampler

    cfg = _train_config("procgen:coinrun", "nature", 4, 8, 10**6, str(tmp_path), actors=2,
                        distribution_mode="easy")  # fmt: skip
    weights = {
        k: v.numpy() for k, v in build_policy("nature", (3, 64, 64), 15).state_dict().items()
    }
    batches = {}
    for shared in (True, False):
        sampler = RaySampler(cfg, shared_obs=shared)
        try:
            sampler.start(weights, 0)
            got = [sampler.collect() for _ in range(3)]  # all three held: three buffers
            prefix = sampler.shared.prefix if shared else None
        finally:
            sampler.close()
        assert [s["shared_obs"] for _, s in got] == [float(shared)] * 3
        assert all(s["transfer_s"] >= 0 for _, s in got)
        batches[shared] = [r for r, _ in got]
        if shared:
            assert not glob.glob(prefix + "-*")  # files gone at close
            assert len({id(r.obs) for r in batches[shared]}) == 3
    for a, b in zip(batches[True], batches[False]):
        assert a.obs.shape == (8, 4, 3, 64, 64) and a.obs.any()
        np.testing.assert_array_equal(a.obs, b.obs)
        np.testing.assert_array_equal(a.actions, b.actions)
        np.testing.assert_array_equal(a.rewards, b.rewards)
    assert not any(os.path.basename(p).startswith(f"loupe-obs-{os.getpid()}-")
                   for p in os.listdir("/dev/shm"))  # fmt: skip


@pytest.mark.integration
def test_an_actor_ray_restarts_writes_its_frames_in_place_too(local_ray, tmp_path):
    """Found by the soak, two faults behind the learner's memory stepping up at every actor
    death: the batch being sampled stayed referenced for good (through the error Ray keeps for
    the lost ref, its traceback and collect's frame), and the files went once every actor had
    mapped them, so the actor Ray started in place of the dead one sent its frames through the
    object store for the rest of the run (a copy per batch)."""
    import ray

    from attention import build_policy
    from loupe.bench import _train_config
    from loupe.distributed import RaySampler

    cfg = _train_config("procgen:coinrun", "nature", 4, 8, 10**6, str(tmp_path), actors=2,
                        distribution_mode="easy")  # fmt: skip
    cfg = dataclasses.replace(cfg, max_policy_lag=0)
    weights = {
        k: v.numpy() for k, v in build_policy("nature", (3, 64, 64), 15).state_dict().items()
    }
    sampler = RaySampler(cfg)
    try:
        sampler.start(weights, 0)
        rollout, first = sampler.collect()
        del rollout  # its buffer is the one handed out next, the one the dead actor had mapped
        old = ray.get(sampler.actors[1].__ray_call__.remote(lambda self: os.getpid()))
        ray.kill(sampler.actors[1], no_restart=False)  # Ray restarts it
        stats = []
        for v in (1, 2, 3):
            sampler.publish(weights, v)
            stats.append(sampler.collect()[1])
        new = ray.get(sampler.actors[1].__ray_call__.remote(lambda self: os.getpid()))
    finally:
        sampler.close()
    assert new != old
    # nothing holds the batch the death interrupted (Ray keeps the lost ref's error, and the
    # error held the traceback with collect's frame): one buffer served every batch
    assert len(sampler.shared.paths) == 1, sampler.shared.paths
    assert first["obs_copied_actors"] == 0.0 and first["shared_obs"] == 1.0
    assert stats[-1]["actor_failures"] >= 1.0, stats
    # after the restart every batch is written in place by both actors
    assert [s["shared_obs"] for s in stats[1:]] == [1.0, 1.0], stats
    assert [s["obs_copied_actors"] for s in stats[1:]] == [0.0, 0.0], stats
