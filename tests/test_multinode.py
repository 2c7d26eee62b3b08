"""Training across two Ray nodes on this machine: `ray start --head` plus a second `ray start`.

Each node offers one CPU and each rollout actor takes one, so the two actors can only run on
different nodes: a finished run means both nodes sampled. The nodes and the driver share a generated
token (Ray's token authentication), so nothing else can join or submit work.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

RAY = str(Path(sys.executable).with_name("ray"))


def run(*args: str, env) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=300, env=env)


def _cluster(port: int) -> set[int]:
    """Processes of this test's cluster: those naming its GCS port, and their descendants."""
    from loupe.soak.procs import descendants, read_proc, scan_children

    parents = scan_children()
    roots = {pid for pid in parents if (p := read_proc(pid, count_fds=False))
             and (f"127.0.0.1:{port}" in p.title or f"gcs_server_port={port}" in p.title)}  # fmt: skip
    roots.discard(os.getpid())
    return roots.union(*(descendants(pid, parents) for pid in roots))


def _alive(pids: set[int]) -> list[int]:
    from loupe.soak.procs import read_proc

    return [pid for pid in pids if (p := read_proc(pid, count_fds=False)) and p.state != "Z"]


def stop_cluster(port: int) -> None:
    """Stop this test's two nodes only (`ray stop` would stop every Ray on the machine)."""
    mine = _cluster(port)  # once: a worker whose raylet died is no longer its descendant
    # a short grace after SIGTERM: the head's gcs_server does not act on it (it stays until
    # SIGKILL; waiting longer only costs the test time)
    for sig, grace in ((signal.SIGTERM, 3), (signal.SIGKILL, 10)):
        for pid in _alive(mine):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _alive(mine):
            time.sleep(0.2)


@pytest.mark.integration
def test_training_across_two_nodes(tmp_path):
    from loupe.bus.redis_server import free_port

    port = free_port()
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN=secrets.token_hex(32))  # fmt: skip
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats"]
    head = run(RAY, "start", "--head", f"--port={port}", "--include-dashboard=false", *common,
               env=env)  # fmt: skip
    assert head.returncode == 0, head.stderr[-2000:]
    try:
        worker = run(RAY, "start", f"--address=127.0.0.1:{port}", *common, env=env)
        assert worker.returncode == 0, worker.stderr[-2000:]
        # the worker registers with the head shortly after `ray start` returns: wait, bounded
        deadline = time.monotonic() + 60
        while True:
            status = run(RAY, "status", f"--address=127.0.0.1:{port}", env=env)
            if status.stdout.count("node_") >= 2 or "2.0 CPU" in status.stdout:
                break
            assert time.monotonic() < deadline, status.stdout
            time.sleep(1)
        train = run(sys.executable, "-m", "loupe.cli", "train", "--env", "procgen:coinrun",
                    "--policy", "nature", "--actors", "2", "--envs-per-actor", "2",
                    "--num-steps", "16", "--minibatches", "2", "--epochs", "1",
                    "--total-steps", "64", "--checkpoint-every", "2", "--no-announce",
                    "--no-progress", "--ray-address", f"127.0.0.1:{port}",
                    "--run-dir", str(tmp_path / "run"), env=env)  # fmt: skip
        assert train.returncode == 0, train.stderr[-3000:]
        metas = sorted((tmp_path / "run" / "checkpoints").glob("ckpt-*[0-9].json"))
        assert json.loads(metas[-1].read_text())["step"] == 64  # one update of both actors
    finally:
        stop_cluster(port)
    assert not _alive(_cluster(port))
