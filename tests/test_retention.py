"""Retention: probe directories pruned to their summary, TensorBoard points per tag, and the
projection of disk and Redis use to 1e9 steps checked against a calculation by hand."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from loupe.errors import LoupeError
from loupe.retention import (
    MeasuredSizes,
    Retention,
    is_pruned,
    project,
    prune_probe_dirs,
    tb_interval,
)


def probe_dir(root: Path, step: int, index: int | None) -> Path:
    d = root / f"step-{step:012d}-{step:08x}"
    (d / "nmf" / "overlay").mkdir(parents=True)
    summary = {"step": step, "sha256": f"{step:064x}", "top10_attribution_share": 0.5}
    if index is not None:
        summary["index"] = index
    (d / "summary.json").write_text(json.dumps(summary))
    (d / "overview.png").write_bytes(b"p" * 5000)
    (d / "nmf" / "overlay" / "positive-00000.png").write_bytes(b"p" * 3000)
    (d / "nmf" / "features.json").write_text("[" + "1," * 1000 + "1]")
    return d


def du(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


@pytest.mark.unit
def test_probe_dirs_keep_last_and_every_nth_whole_the_rest_their_summary(tmp_path):
    root = tmp_path / "probes"
    root.mkdir()
    dirs = [probe_dir(root, 10_000 + 1000 * i, i) for i in range(25)]
    partial = root / ".step-000000099999-0.partial-123"  # a worker's unfinished work
    partial.mkdir()
    (partial / "x.png").write_bytes(b"x")
    foreign = root / "step-notes"  # no summary.json: not a probe directory
    foreign.mkdir()
    (foreign / "a.txt").write_text("mine")
    files = sorted(str(p.relative_to(dirs[0])) for p in dirs[0].rglob("*"))
    whole_size = max(du(d) for d in dirs)
    pruned = prune_probe_dirs(root, keep_last=3, keep_every=5)
    assert pruned == [d for i, d in enumerate(dirs[:22]) if i % 5]
    for i, d in enumerate(dirs):
        if i >= 22 or i % 5 == 0:
            assert not is_pruned(d) and sorted(str(p.relative_to(d)) for p in d.rglob("*")) == (
                files
            ), d
        else:
            assert sorted(p.name for p in d.iterdir()) == ["pruned.json", "summary.json"]
            assert json.loads((d / "pruned.json").read_text())["bytes_removed"] > 8000
            assert json.loads((d / "summary.json").read_text())["step"] == 10_000 + 1000 * i
    # the stated bound: (keep_last + ceil((n - keep_last) / keep_every)) whole, the rest summaries
    whole = 3 + -(-22 // 5)
    summary_size = max(du(d) for d in dirs if is_pruned(d))
    assert summary_size < 300
    assert du(root) <= whole * whole_size + (25 - whole) * summary_size + 1 + 4
    assert (partial / "x.png").exists() and (foreign / "a.txt").exists()
    assert prune_probe_dirs(root, keep_last=3, keep_every=5) == []  # nothing more to do
    assert prune_probe_dirs(root, keep_last=0, keep_every=5) == []  # 0: keep everything


@pytest.mark.unit
def test_probe_dirs_without_an_index_count_by_position(tmp_path):
    root = tmp_path / "probes"
    root.mkdir()
    dirs = [probe_dir(root, 10 * (i + 1), None) for i in range(6)]
    assert prune_probe_dirs(root, keep_last=1, keep_every=0) == dirs[:5]
    root2 = tmp_path / "probes2"
    root2.mkdir()
    dirs = [probe_dir(root2, 10 * (i + 1), None) for i in range(6)]
    assert prune_probe_dirs(root2, keep_last=1, keep_every=2) == [dirs[1], dirs[3]]
    with pytest.raises(LoupeError, match=">= 0"):
        prune_probe_dirs(root2, keep_last=-1, keep_every=0)
    assert prune_probe_dirs(tmp_path / "none", 1, 1) == []


@pytest.mark.unit
def test_a_worker_reads_each_probe_summary_once_across_checkpoints(tmp_path, monkeypatch):
    """A long run's worker prunes after every checkpoint: each summary.json is read once."""
    root = tmp_path / "probes"
    root.mkdir()
    reads: list[str] = []
    read_text = Path.read_text

    def counting(self, *args, **kw):
        if self.name == "summary.json":
            reads.append(self.parent.name)
        return read_text(self, *args, **kw)

    monkeypatch.setattr(Path, "read_text", counting)
    seen: dict = {}
    dirs, pruned = [], []
    for i in range(12):  # one checkpoint probed, then the worker prunes
        dirs.append(probe_dir(root, 1000 * (i + 1), i))
        pruned += prune_probe_dirs(root, keep_last=2, keep_every=4, seen=seen)
    assert sorted(reads) == sorted(d.name for d in dirs)  # 12 reads, not 1 + 2 + ... + 12
    assert pruned == [d for i, d in enumerate(dirs[:10]) if i % 4]
    # the same outcome as one pass without the cache over a copy of the history
    root2 = tmp_path / "probes2"
    root2.mkdir()
    dirs2 = [probe_dir(root2, 1000 * (i + 1), i) for i in range(12)]
    assert [d.name for d in prune_probe_dirs(root2, 2, 4)] == [d.name for d in pruned]
    assert all(is_pruned(d) == is_pruned(e) for d, e in zip(dirs, dirs2, strict=True))
    # a directory that went away is forgotten
    shutil.rmtree(dirs[0])
    prune_probe_dirs(root, keep_last=2, keep_every=4, seen=seen)
    assert dirs[0].name not in seen and len(seen) == 11


@pytest.mark.unit
def test_episodes_become_one_point_of_means_and_a_count():
    from loupe.train import episode_scalars

    assert episode_scalars([]) == {}
    assert episode_scalars([(10.0, 100), (0.0, 50), (5.0, 30)]) == {
        "episode/return": 5.0,
        "episode/length": 60.0,
        "episode/count": 3.0,
    }


@pytest.mark.unit
def test_tb_interval_bounds_points_per_tag():
    assert tb_interval(61_035, 100_000) == 1
    assert tb_interval(31_250_000, 100_000) == 313  # 31.25M updates -> 99,841 points
    assert -(-31_250_000 // 313) <= 100_000
    assert tb_interval(0, 100_000) == 1 and tb_interval(10**9, 0) == 1


SIZES = MeasuredSizes(
    checkpoint_weights=2_508_240,
    checkpoint_state=5_034_880,
    checkpoint_meta=1_100,
    probe_full=1_485_044,
    probe_pruned=23_000,
    tb_train_per_point=1_000,
    tb_probe_scalars=400,
    tb_probe_images=360_000,
    redis_checkpoint_entry=500,
    redis_result_entry=700,
    redis_done_mark=150,
)


@pytest.mark.unit
def test_projection_to_a_billion_steps_by_hand():
    # the procgen preset: 64 envs x 256 steps = 16,384 steps per update, a checkpoint every 10
    got = project(SIZES, Retention(), steps_per_update=16_384, checkpoint_every=10)
    # 1e9 / 16384 = 61035.16 -> 61,036 updates; / 10 -> 6,104 checkpoints, all probed
    assert got["updates"] == 61_036 and got["checkpoints"] == 6_104 and got["probed"] == 6_104
    # checkpoints: 5 whole (weights + state + meta), keep_every 0 -> nothing older
    assert got["checkpoints_bytes"] == 5 * (2_508_240 + 5_034_880 + 1_100)  # 37,721,100
    # probes: the newest 10 whole + every 10th of the other 6,094 (610) whole; 5,484 pruned
    assert got["probes_bytes"] == 620 * 1_485_044 + 5_484 * 23_000  # 1,046,859,280
    # TensorBoard: 61,036 points (under 100,000 per tag); 6,104 x scalars + 611 x images
    assert got["tb_train_bytes"] == 61_036_000
    assert got["tb_probe_bytes"] == 6_104 * 400 + 611 * 360_000  # 222,401,600
    # Redis: every entry still in the streams (6,104 < 10,000), 6,104 marks (< 20,000)
    assert got["redis_memory_bytes"] == 6_104 * (500 + 700 + 150)  # 8,240,400
    assert got["redis_aof_bytes"] == 16 << 20  # 2 x 8.24 MB is below the 16 MiB rewrite minimum
    assert got["disk_bytes"] == 37_721_100 + 1_046_859_280 + 61_036_000 + 222_401_600 + (16 << 20)
    assert got["disk_bytes"] < 50e9  # the target with default retention


@pytest.mark.unit
def test_projection_of_a_small_batch_run_hits_every_cap():
    # 2 envs x 16 steps, a checkpoint every update: 31.25M updates and checkpoints
    r = Retention(checkpoint_keep_every=1000)
    got = project(SIZES, r, steps_per_update=32, checkpoint_every=1, probed_fraction=0.5)
    c, p = 31_250_000, 15_625_000
    assert got["checkpoints"] == c and got["probed"] == p
    older = -(-(c - 5) // 1000)  # 31,250 weights kept by keep_every
    assert got["checkpoints_bytes"] == 5 * (2_508_240 + 5_034_880 + 1_100) + older * (
        2_508_240 + 1_100
    )
    assert got["tb_train_bytes"] == -(-c // 313) * 1_000  # 99,841 points per tag
    full = 10 + -(-(p - 10) // 10)
    assert got["probes_bytes"] == full * 1_485_044 + (p - full) * 23_000
    assert got["redis_memory_bytes"] == 10_000 * 500 + 10_000 * 700 + 20_000 * 150
    assert got["redis_aof_bytes"] == 2 * got["redis_memory_bytes"]  # 30 MB > the 16 MB minimum
    # keep_last 0 keeps every checkpoint whole: linear, and the projection says so
    every = project(SIZES, Retention(checkpoint_keep_last=0), 16_384, 10)
    assert every["checkpoints_bytes"] == 6_104 * (2_508_240 + 5_034_880 + 1_100)


@pytest.mark.unit
def test_projection_refuses_nonsense_and_reads_configs():
    with pytest.raises(LoupeError):
        project(SIZES, Retention(), steps_per_update=0, checkpoint_every=1)
    with pytest.raises(LoupeError):
        project(SIZES, Retention(), 32, 1, probed_fraction=2.0)
    from loupe.bus.probe_worker import WorkerConfig

    @dataclasses.dataclass
    class Train:  # the three TrainConfig fields Retention.of reads
        keep_last: int = 7
        keep_every: int = 3
        tb_max_points: int = 50

    r = Retention.of(Train(), WorkerConfig(keep_last=2, keep_every=4, tb_images_every=8), 99)
    assert (r.checkpoint_keep_last, r.checkpoint_keep_every, r.tb_max_points) == (7, 3, 50)
    assert (r.probe_keep_last, r.probe_keep_every, r.tb_images_every) == (2, 4, 8)
    assert r.stream_maxlen == 99 and Retention.of() == Retention()


@pytest.mark.unit
def test_the_projection_defaults_are_the_components_defaults():
    # Retention's defaults repeat those of TrainConfig, WorkerConfig and the bus: they must agree
    import inspect

    from loupe.bus import CheckpointBus
    from loupe.bus.probe_worker import WorkerConfig
    from loupe.train import TrainConfig

    maxlen = inspect.signature(CheckpointBus).parameters["maxlen"].default
    train = {f.name: f.default for f in dataclasses.fields(TrainConfig)
             if f.name in ("keep_last", "keep_every", "tb_max_points")}  # fmt: skip
    train = dataclasses.make_dataclass("Train", list(train))(**train)
    assert Retention.of(train, WorkerConfig(), maxlen) == Retention()


@pytest.mark.integration
def test_train_bounds_tensorboard_points_and_checkpoints(tmp_path):
    """10 updates with --tb-max-points 3: a point every 4 updates and at the end (3 per tag);
    --keep-last 2 --keep-every 3: 2 whole checkpoints, the weights
    of numbers 0, 3 and 6."""
    import subprocess
    import sys

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "loupe.cli", "train", "--env", "procgen:coinrun", "--policy",
         "nature", "--num-envs", "2", "--num-steps", "16", "--minibatches", "1", "--epochs", "1",
         "--total-steps", "320", "--checkpoint-every", "1", "--keep-last", "2", "--keep-every",
         "3", "--tb-max-points", "3", "--env-option", "num_levels=1", "--no-announce",
         "--no-progress", "--run-dir", str(run)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((run / "config.json").read_text())
    assert (config["keep_last"], config["keep_every"], config["tb_max_points"]) == (2, 3, 3)
    events = EventAccumulator(str(run / "tb")).Reload()
    for tag in ("train/policy_loss", "train/steps_per_s"):
        assert [e.step for e in events.Scalars(tag)] == [128, 256, 320], tag
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    steps = [32 * (i + 1) for i in (0, 3, 6)]
    assert names == sorted(
        [f"ckpt-{s:012d}{x}" for s in steps for x in (".json", ".safetensors")]
        + [f"ckpt-{s:012d}{x}" for s in (288, 320)
           for x in (".json", ".safetensors", ".state.safetensors")]
    )  # fmt: skip
