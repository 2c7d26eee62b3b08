"""Probe workers on a real Redis with real checkpoints: reclaim after a kill, exactly once, rejects."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loupe.bus import CheckpointAnnouncement, CheckpointBus, connect
from loupe.bus.redis_server import RedisServer

# every kind of output of a probe (bookmarks of two envs, NMF overlays of two frames, two features)
FAST = ["--num-envs", "2", "--num-steps", "16", "--ig-samples", "2", "--smoothgrad-copies", "1",
        "--nmf-components", "2"]  # fmt: skip
# the smallest probe, for tests of what the workers do around it (one frame, one feature)
TINY = ["--num-envs", "1", "--num-steps", "8", "--ig-samples", "1", "--smoothgrad-copies", "1",
        "--nmf-components", "1"]  # fmt: skip
TINY_CONFIG = dict(num_envs=1, num_steps=8, ig_samples=1, smoothgrad_copies=1, nmf_components=1)


def loupe(*args, **kw):
    return subprocess.run([sys.executable, "-m", "loupe.cli", *args], capture_output=True,
                          text=True, timeout=600, **kw)  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "probed"
    proc = loupe("train", "--env", "procgen:coinrun", "--policy", "interpretable", "--num-envs", "2",
                 "--num-steps", "16", "--minibatches", "1", "--epochs", "1", "--total-steps", "64",
                 "--checkpoint-every", "1", "--run-dir", str(run), "--no-progress", "--no-announce")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run


@pytest.fixture(scope="module")
def probed(trained, tmp_path_factory) -> Path:
    """`loupe probe --checkpoint` of the newest checkpoint, shared by the tests that read it."""
    out = tmp_path_factory.mktemp("probed") / "probe"
    proc = loupe("probe", "--checkpoint", str(checkpoints(trained)[-1]), "--out", str(out), *FAST)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


@pytest.fixture
def run_with_bus(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    server = RedisServer(tmp_path / "redis").start()
    bus = CheckpointBus(
        connect(server.url), json.loads((run / "config.json").read_text())["run_id"]
    )
    yield run, server, bus
    server.stop()


def announce(bus, meta_path: Path, sha256: str | None = None) -> None:
    meta = json.loads(meta_path.read_text())
    bus.publish_checkpoint(CheckpointAnnouncement(
        run_id=bus.run_id, step=meta["step"], uri=str(meta_path), sha256=sha256 or meta["sha256"],
        policy=meta["policy"]["name"], env=meta["env"]))  # fmt: skip


def checkpoints(run: Path) -> list[Path]:
    return sorted((run / "checkpoints").glob("ckpt-*[0-9].json"))


def worker(run, server, *extra, **kw):
    return ["probe", "--run", str(run), "--redis", server.url, *TINY, *extra]


def add_checkpoints(run: Path, count: int) -> list[Path]:
    """``count`` more real checkpoints after the newest, each with weights of its own -> all."""
    import torch

    from learner.checkpoint import load_checkpoint, save_checkpoint

    policy, meta = load_checkpoint(checkpoints(run)[-1])
    for k in range(count):
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(1e-3 * torch.randn_like(p))
        save_checkpoint(run, policy, {**meta, "step": meta["step"] + 32 * (k + 1)}, keep_last=0)
    return checkpoints(run)


@pytest.mark.integration
def test_single_checkpoint_probe_writes_summary_and_images(trained, probed):
    out = probed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["layer"] == "2b" and summary["layer_shape"] == [32, 16, 16]
    assert summary["max_completeness_delta"] >= 0 and 0 < summary["top10_attribution_share"] <= 1
    assert len(summary["nmf"]["directions"]) == 2 and len(summary["nmf"]["directions"][0]) == 32
    assert summary["bookmarks"] and {"env", "t", "advantage", "value"} <= set(
        summary["bookmarks"][0]
    )
    assert list((out / "nmf").glob("*.png")) and list((out / "saliency").glob("*.png"))
    # one overview figure per checkpoint; an interpretable CNN has no attention: saliency instead
    assert summary["overview"] == "overview.png" and (out / "overview.png").stat().st_size > 0
    assert "value saliency (no attention in this policy)" in summary["overview_panels"]
    # the same output directory again is refused, and nothing is overwritten
    before = (out / "summary.json").read_bytes()
    again = loupe("probe", "--checkpoint", str(checkpoints(trained)[-1]), "--out", str(out), *FAST)
    assert again.returncode == 2 and "already exists" in again.stderr
    assert (out / "summary.json").read_bytes() == before


@pytest.mark.integration
@pytest.mark.parametrize(
    "args, message",
    [
        (["--layer", "9z"], "valid layers: 1a, 2a, 2b"),
        (["--nmf-components", "0"], "argument --nmf-components: must be from 1 to"),
    ],
)
def test_bad_probe_input(trained, tmp_path, args, message):
    out = tmp_path / "p"
    proc = loupe("probe", "--checkpoint", str(checkpoints(trained)[-1]), "--out", str(out), *FAST,
                 *args)  # fmt: skip
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


@pytest.mark.integration
def test_killed_worker_is_reclaimed_results_are_exactly_once_and_old_probes_pruned(run_with_bus):
    """A worker killed mid-probe leaves its entry pending; a second one reclaims it and probes
    each of the 3 checkpoints once; a worker started later redoes nothing. The rescuer prunes
    (--keep-last 1 --keep-every 2 --tb-images-every 2, write order 0..2): the directories of 0 and
    2 stay whole, 1 keeps summary.json only; the run page still has every checkpoint's scalars,
    TensorBoard the overlays of 0 and 2 and the scalars of all three."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from loupe.bus.probe_worker import ProbeWorker, WorkerConfig
    from loupe.explorer.bundle import run_data
    from loupe.retention import is_pruned

    run, server, bus = run_with_bus
    paths = add_checkpoints(run, 1)  # one more real checkpoint, with weights of its own
    assert [json.loads(p.read_text())["index"] for p in paths] == [0, 1, 2]
    for path in paths:
        announce(bus, path)
    n = len(paths)
    victim = subprocess.Popen(
        [sys.executable, "-m", "loupe.cli", *worker(run, server, "--consumer", "victim")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list((run / "probes").glob(".*partial*")):
        time.sleep(0.05)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    assert bus.pending("probes") >= 1, "the victim should hold an unacknowledged entry"
    rescue = loupe(*worker(run, server, "--consumer", "rescuer", "--claim-idle-ms", "200",
                           "--exit-when-idle", "2", "--keep-last", "1", "--keep-every", "2",
                           "--tb-images-every", "2"))  # fmt: skip
    assert rescue.returncode == 0, rescue.stderr[-2000:]
    assert "probed 3 checkpoint(s)" in rescue.stdout
    results = [f for _, f in bus.read_results() if json.loads(f["kind"]) == "probe"]
    steps = [json.loads(p.read_text())["step"] for p in paths]
    assert sorted(json.loads(f["step"]) for f in results) == steps
    assert len(results) == n and bus.pending("probes") == 0
    dirs = sorted((run / "probes").iterdir())
    assert len(dirs) == n and not any("partial" in d.name for d in dirs)

    # pruned to the summary: the middle one only
    pruned = [d for d in dirs if is_pruned(d)]
    assert [json.loads((d / "summary.json").read_text())["step"] for d in pruned] == [steps[1]]
    assert sorted(p.name for p in pruned[0].iterdir()) == ["pruned.json", "summary.json"]
    assert json.loads((pruned[0] / "pruned.json").read_text())["bytes_removed"] > 10_000
    for d in set(dirs) - set(pruned):
        assert list(d.rglob("*.png")) and (d / "overview.png").is_file()
    points = run_data(run, {})["points"]
    assert [p["step"] for p in points] == steps
    assert all(p["top10_attribution_share"] is not None for p in points)
    events = EventAccumulator(str(run / "tb" / "probes-rescuer"),
                              size_guidance={"images": 0}).Reload()  # fmt: skip
    images = [e.step for e in events.Images("probe/attribution/positive-0")]
    assert sorted(images) == [steps[0], steps[2]]
    assert sorted(e.step for e in events.Scalars("probe/top10_attribution_share")) == steps

    # every worker restarted: nothing is redone
    later = ProbeWorker(bus, run, WorkerConfig(consumer="later", block_ms=300, exit_when_idle=1.0))
    assert later.run() == 0
    assert len(bus.read_results()) == n and bus.pending("probes") == 0


@pytest.mark.integration
def test_sha_mismatch_is_rejected_not_loaded(run_with_bus):
    run, server, bus = run_with_bus
    announce(bus, checkpoints(run)[-1], sha256="0" * 64)
    proc = loupe(*worker(run, server, "--exit-when-idle", "2"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    (_, fields), = bus.read_results()  # fmt: skip
    assert json.loads(fields["kind"]) == "error" and "sha256" in json.loads(fields["error"])
    assert bus.client.xlen(bus.rejected_key) == 1 and bus.pending("probes") == 0
    assert not (run / "probes").exists() or not any((run / "probes").iterdir())


@pytest.mark.integration
def test_edit_from_probe_nmf_direction(trained, probed, tmp_path):
    out = probed  # a probe of the newest checkpoint
    ckpt = checkpoints(trained)[-1]
    edited = tmp_path / "edited"
    proc = loupe("edit", "--checkpoint", str(ckpt), "--layer", "2b", "--direction", "nmf:1",
                 "--nmf", str(out / "summary.json"), "--out", str(edited))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    (meta_path,) = checkpoints(edited)
    meta = json.loads(meta_path.read_text())
    parent = json.loads(ckpt.read_text())
    assert meta["edit"]["parent_sha256"] == parent["sha256"] and meta["edit"]["layer"] == "2b"
    summary = json.loads((out / "summary.json").read_text())
    assert meta["edit"]["direction"] == pytest.approx(summary["nmf"]["directions"][1])
    bad = loupe("edit", "--checkpoint", str(ckpt), "--layer", "2b", "--direction", "nmf:99",
                "--nmf", str(out / "summary.json"), "--out", str(tmp_path / "e2"))  # fmt: skip
    assert bad.returncode == 2 and "nmf:0 .. nmf:1" in bad.stderr


@pytest.mark.integration
def test_worker_waits_out_a_redis_restart_and_goes_on(run_with_bus, caplog):
    """Found by the soak: a worker whose Redis was restarted (killed and started again by the
    learner) ended with an internal error; it now waits, bounded, and takes up the stream again."""
    import logging
    import threading

    from loupe.bus.probe_worker import ProbeWorker, WorkerConfig
    from probes.suite import ProbeConfig

    run, server, bus = run_with_bus
    first, second = checkpoints(run)[-2:]
    announce(bus, first)
    outage_s = 8.0  # longer than the redis client's own retries (about 2-4 s)

    def restart_later() -> None:
        time.sleep(outage_s)
        server.start()  # same port and password; the AOF replays the stream and the group
        announce(bus, second)

    def on_idle(handled: int) -> None:
        if handled == 1 and server.alive():
            server.kill()
            threading.Thread(target=restart_later, daemon=True).start()

    config = WorkerConfig(consumer="w", block_ms=300, max_checkpoints=2, redis_wait_s=60)
    worker = ProbeWorker(bus, run, config, ProbeConfig(**TINY_CONFIG))
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="loupe.probe"):
        assert worker.run(on_idle=on_idle) == 2
    assert time.monotonic() - started > outage_s
    steps = sorted(json.loads(f["step"]) for _, f in bus.read_results())
    assert steps == sorted(json.loads(p.read_text())["step"] for p in (first, second))
    assert bus.pending("probes") == 0
    said = [r.getMessage() for r in caplog.records]
    assert any("Redis stopped answering" in m for m in said)
    assert any("Redis answers again" in m for m in said)


@pytest.mark.integration
def test_worker_gives_up_on_a_redis_that_stays_away(run_with_bus):
    from loupe.bus.probe_worker import ProbeWorker, WorkerConfig
    from loupe.errors import LoupeError

    run, server, bus = run_with_bus
    server.kill()
    worker = ProbeWorker(bus, run, WorkerConfig(consumer="w", block_ms=300, redis_wait_s=2))
    worker.bus.ensure_group = lambda group: None  # the group exists; Redis went away after
    started = time.monotonic()
    with pytest.raises(LoupeError, match=r"did not answer for \d+ s .*run the same command"):
        worker.run()
    assert 2 <= time.monotonic() - started < 30


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.integration
def test_worker_returns_to_its_memory_level_after_each_checkpoint(run_with_bus, monkeypatch):
    """Found by the soak: each probe left ~70k objects (matplotlib figures and artists) in
    reference cycles, freed only at some later collection and then kept by glibc, so a worker's
    RSS swung by ~80 MB and its floor crept. It now collects and trims after every checkpoint.
    Four checkpoints with the smallest probe: without the collection ~30k objects are left each
    time; collected but not trimmed, the level after the third and fourth differs by ~15 MB."""
    import gc

    from loupe.bus.probe_worker import ProbeWorker, WorkerConfig
    from probes.suite import ProbeConfig

    run, server, bus = run_with_bus
    paths = add_checkpoints(run, 2)
    assert len(paths) == 4
    for path in paths:
        announce(bus, path)
    worker = ProbeWorker(
        bus, run, WorkerConfig(consumer="m", exit_when_idle=1.0, keep_last=0, tb_images_every=0),
        ProbeConfig(**TINY_CONFIG),
    )  # fmt: skip
    handle, left, rss = worker.handle, [], []

    def measured(delivery):
        outcome = handle(delivery)
        left.append(gc.collect())  # what the probe left in reference cycles
        rss.append(rss_mb())
        return outcome

    monkeypatch.setattr(worker, "handle", measured)
    assert worker.run() == len(paths)
    assert max(left) < 2000, left  # collected already, inside the worker (was ~30,000 here)
    # each result carries the worker's memory just before its probe: the level the previous
    # checkpoint left, which the soak fits its slope on
    levels = [f for _, f in bus.read_results(decode=True) if f["kind"] == "probe"]
    assert len(levels) == len(paths) and {f["worker_pid"] for f in levels} == {os.getpid()}
    for before, after_previous in zip([f["worker_rss_mb"] for f in levels[1:]], rss):
        assert abs(before - after_previous) < 8, (before, after_previous)
    assert all(0 < f["worker_private_mb"] < f["worker_rss_mb"] for f in levels)
    # after two warm-up checkpoints the worker comes back to the same level every time
    assert max(rss[2:]) - min(rss[2:]) < 8, rss
