"""Shared-memory observation buffers between rollout actors and the learner (real /dev/shm files,
real procgen; real Ray actors writing into them are in test_distributed.py)."""

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


# the real Ray actors writing in place (and after a restart) are in test_distributed.py, on
# that module's local Ray
