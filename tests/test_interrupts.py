"""Real signals to real `loupe` processes: the resume line is printed, the exit status is 128 + the
signal, nothing the command started (redis-server, raylet, gcs_server, probe workers) is left, and
the printed command continues the work. Probe workers share the run's one private Redis."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from loupe import interrupt

# the smallest probe: these tests are about the processes around it
FAST = ["--num-envs", "1", "--num-steps", "8", "--ig-samples", "1", "--smoothgrad-copies", "1",
        "--nmf-components", "1"]  # fmt: skip
TINY = ["--env", "procgen:coinrun", "--policy", "interpretable", "--num-envs", "2", "--num-steps",
        "16", "--minibatches", "1", "--epochs", "1"]  # fmt: skip


def descendants(pid: int) -> dict[int, str]:
    """pid -> command name of every process below ``pid`` (from /proc, one pass)."""
    children: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
        names[int(entry.name)] = name
    found: dict[int, str] = {}
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found[child] = names[child]
            todo.append(child)
    return found


def parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def alive(pid: int) -> bool:
    """True for a running process (a zombie counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


class Loupe:
    """`python -m loupe.cli ...` in the background; stdout and stderr collected by threads, and
    every process below it recorded while it runs."""

    def __init__(self, *args: str, cwd: Path | None = None, env: dict[str, str] | None = None):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "loupe.cli", *args], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, cwd=cwd, start_new_session=True,
            env=None if env is None else os.environ | env,
        )  # fmt: skip
        self.out: list[str] = []
        self.err: list[str] = []
        self.seen: dict[int, str] = {}
        for stream, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=self._drain, args=(stream, sink), daemon=True).start()

    @staticmethod
    def _drain(stream, sink: list[str]) -> None:
        for line in stream:
            sink.append(line)

    @property
    def text(self) -> str:
        return "".join(self.out) + "".join(self.err)

    def wait_for(self, predicate, timeout: float = 300, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.seen |= descendants(self.proc.pid)
            if predicate():
                return
            assert self.proc.poll() is None, f"exited early ({what}):\n{self.text[-3000:]}"
            time.sleep(0.2)
        self.kill()
        pytest.fail(f"timed out waiting for {what}:\n{self.text[-3000:]}")

    def signal(self, signum: int, timeout: float = 120) -> int:
        self.seen |= descendants(self.proc.pid)
        self.proc.send_signal(signum)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"did not exit within {timeout} s of the signal:\n{self.text[-3000:]}")

    def kill(self) -> None:
        for pid in [self.proc.pid, *descendants(self.proc.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()

    def left_behind(self, grace: float = 15) -> dict[int, str]:
        """Recorded descendants still running after ``grace`` seconds."""
        deadline = time.monotonic() + grace
        while True:
            left = {pid: name for pid, name in self.seen.items() if alive(pid)}
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.2)


def resume_line(text: str) -> str:
    (line,) = [x for x in text.splitlines() if x.startswith("loupe: interrupted")]
    return line.split("; to resume: ", 1)[1]


def run_resumed(hint: str, *extra: str, timeout: float = 600) -> subprocess.CompletedProcess:
    argv = shlex.split(hint)
    assert argv[0] == "loupe"
    return subprocess.run([sys.executable, "-m", "loupe.cli", *argv[1:], *extra],
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def checkpoint_steps(run: Path) -> list[int]:
    return sorted(
        json.loads(p.read_text())["step"] for p in (run / "checkpoints").glob("ckpt-*[0-9].json")
    )


# -- pure logic ---------------------------------------------------------------------------------
@pytest.mark.unit
def test_deferred_section_raises_the_signal_when_it_ends():
    before = signal.getsignal(signal.SIGTERM)  # Ray, once started in this process, installs its own
    interrupt.reset()
    with interrupt.handlers():
        done = []
        with pytest.raises(interrupt.Interrupted) as caught, interrupt.deferred():
            signal.raise_signal(signal.SIGTERM)
            done.append("rest of the section")  # still runs
        assert done == ["rest of the section"]
        assert caught.value.signum == signal.SIGTERM and caught.value.exit_status == 143
        # outside a deferred section the signal is raised at once, as KeyboardInterrupt
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
            done.append("never")
        assert done == ["rest of the section"]
        # a second signal inside a section is raised at once
        with pytest.raises(interrupt.Interrupted), interrupt.deferred():
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
            done.append("never")
        assert done == ["rest of the section"] and interrupt.pending() is None
    assert signal.getsignal(signal.SIGTERM) is before  # the handler in place before is back


# -- train ----------------------------------------------------------------------------------------
@pytest.mark.integration
def test_sigterm_to_train_checkpoints_stops_redis_and_ray_and_resumes(tmp_path):
    run = tmp_path / "run"
    # many small updates, a checkpoint only at the end: the one written on SIGTERM
    train = Loupe("train", *TINY, "--total-steps", "1000000", "--checkpoint-every", "100000",
                  "--actors", "1", "--run-dir", str(run))  # fmt: skip
    # the bar shows steps per second once an update is complete
    train.wait_for(lambda: "sps=" in "".join(train.err) and "redis-server" in train.seen.values()
                   and {"raylet", "gcs_server"} <= set(train.seen.values()),
                   what="an update with Ray and Redis up")  # fmt: skip
    status = train.signal(signal.SIGTERM)
    assert status == 143, train.text[-3000:]
    assert "Traceback" not in train.text
    hint = resume_line(train.text)
    assert hint == f"loupe train --resume {run}"
    steps = checkpoint_steps(run)
    assert steps and steps[-1] > 0 and steps[-1] % 32 == 0, train.text[-3000:]
    left = train.left_behind()
    assert not left, f"left running after SIGTERM: {left}"
    assert {"raylet", "gcs_server", "redis-server"} <= set(train.seen.values())

    # the printed command continues from that checkpoint (bounded here by --total-steps)
    end = steps[-1] + 32  # one more update
    resumed = run_resumed(hint, "--total-steps", str(end), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints'}" in resumed.stderr
    assert f"done at step {end}" in resumed.stdout
    assert checkpoint_steps(run)[-1] == end


@pytest.mark.integration
def test_sigint_to_train_in_process_writes_a_checkpoint_and_stops_redis(tmp_path):
    run = tmp_path / "run"
    train = Loupe("train", *TINY, "--total-steps", "1000000", "--checkpoint-every", "100000",
                  "--run-dir", str(run))  # fmt: skip
    train.wait_for(lambda: "sps=" in "".join(train.err) and "redis-server" in train.seen.values(),
                   what="an update")  # fmt: skip
    assert train.signal(signal.SIGINT) == 130, train.text[-3000:]
    assert "Traceback" not in train.text
    assert resume_line(train.text) == f"loupe train --resume {run}"
    assert checkpoint_steps(run) and checkpoint_steps(run)[-1] > 0
    assert not train.left_behind()


# -- evaluate -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def announced_run(tmp_path_factory) -> Path:
    """A run with two checkpoints announced on its own private redis-server (stopped now); the
    evaluation test takes its newest checkpoint."""
    run = tmp_path_factory.mktemp("runs") / "announced"
    proc = subprocess.run([sys.executable, "-m", "loupe.cli", "train", *TINY, "--total-steps", "64",
                           "--checkpoint-every", "1", "--run-dir", str(run), "--no-progress"],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(checkpoint_steps(run)) == 2
    return run


@pytest.mark.integration
def test_sigint_to_evaluate_keeps_results_stops_ray_and_prints_the_same_command(
    announced_run, tmp_path
):
    ckpt = sorted((announced_run / "checkpoints").glob("ckpt-*[0-9].json"))[-1]
    out = tmp_path / "eval"
    args = ["evaluate", "--checkpoint", str(ckpt), "--levels", "400", "--workers", "1",
            "--slots", "1", "--chunk", "1", "--out", str(out), "--no-progress"]  # fmt: skip
    ev = Loupe(*args)
    records = out / f"{ckpt.name.split('.')[0]}-"

    def some_levels() -> bool:
        files = list(out.glob("*.jsonl")) if out.is_dir() else []
        return bool(files) and len(files[0].read_text().splitlines()) >= 2

    ev.wait_for(some_levels, what="the first levels")
    assert ev.signal(signal.SIGINT) == 130, ev.text[-3000:]
    assert "Traceback" not in ev.text
    assert resume_line(ev.text) == "loupe " + shlex.join(args)
    assert {"raylet", "gcs_server"} <= set(ev.seen.values())
    assert not ev.left_behind()
    (jsonl,) = out.glob("*.jsonl")
    assert jsonl.name.startswith(records.name)
    assert len(jsonl.read_text().splitlines()) >= 2  # kept for the resumed evaluation


# -- probe workers ---------------------------------------------------------------------------------
def copy_run(run: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(run, dest)
    return dest


def run_id(run: Path) -> str:
    return json.loads((run / "config.json").read_text())["run_id"]


def probe_results(run: Path) -> list[dict]:
    """Probe results recorded in the run's stream (reads the AOF through a fresh server)."""
    from loupe.bus import CheckpointBus, connect
    from loupe.bus.redis_server import RedisServer

    with RedisServer(run / "redis") as server:
        bus = CheckpointBus(connect(server.url), run_id(run))
        fields = [f for _, f in bus.read_results()]
        bus.client.close()
    return [{k: json.loads(v) for k, v in f.items()} for f in fields]


@pytest.mark.integration
@pytest.mark.slow  # the SIGTERM test of three workers below shares one Redis as well
@pytest.mark.timeout(1200)  # two probes on two cores
def test_two_probe_workers_share_the_runs_redis_and_probe_each_checkpoint_once(
    announced_run, tmp_path
):
    run = copy_run(announced_run, tmp_path / "run")
    probe = Loupe("probe", "--run", str(run), "--workers", "2", *FAST, "--exit-when-idle", "3")
    probe.wait_for(lambda: probe.proc.poll() is not None, timeout=900, what="the workers to finish")
    assert probe.proc.returncode == 0, probe.text[-3000:]
    servers = [pid for pid, name in probe.seen.items() if name == "redis-server"]
    assert len(servers) == 1, probe.seen  # started once, by the parent
    assert "Failed listening" not in (run / "redis" / "redis.log").read_text()
    assert f"waiting for checkpoints of {run_id(run)}" in probe.text
    assert not probe.left_behind()
    results = probe_results(run)
    assert [r["kind"] for r in results] == ["probe"] * 2, results
    assert sorted(r["step"] for r in results) == checkpoint_steps(run)
    assert len(list((run / "probes").iterdir())) == 2


@pytest.mark.integration
@pytest.mark.timeout(1200)
def test_sigterm_to_three_probe_workers_stops_them_and_redis_and_resumes(announced_run, tmp_path):
    run = copy_run(announced_run, tmp_path / "run")
    probe = Loupe("probe", "--run", str(run), "--workers", "3", *FAST)
    # no --exit-when-idle: the workers wait for new checkpoints, and the parent says so; two
    # checkpoints for three workers: one of them has nothing to do, each checkpoint is probed once
    waiting = f"waiting for checkpoints of {run_id(run)} (2 announced so far); Ctrl-C to stop"
    probe.wait_for(lambda: waiting in probe.text, timeout=900,
                   what="the waiting line")  # fmt: skip
    # the parent's own children, all waiting now (a worker's child between fork and exec is named
    # python as well: not counted)
    workers = [pid for pid, name in probe.seen.items()
               if name.startswith("python") and parent_of(pid) == probe.proc.pid]  # fmt: skip
    assert len(workers) == 3 and list(probe.seen.values()).count("redis-server") == 1
    assert probe.signal(signal.SIGTERM) == 143, probe.text[-3000:]
    assert "Traceback" not in probe.text
    hint = resume_line(probe.text)
    assert hint == f"loupe probe --run {run} --workers 3 " + shlex.join(FAST)
    assert not probe.left_behind(), probe.seen
    results = probe_results(run)
    assert sorted(r["step"] for r in results if r["kind"] == "probe") == checkpoint_steps(run)
    assert all(r["kind"] == "probe" for r in results), results

    # the printed command again: nothing is redone
    again = run_resumed(hint, "--exit-when-idle", "2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(probe_results(run)) == 2
