"""`loupe train --supervise`: the restart logic with a tiny stand-in child (real processes, real
signals, in-process supervisor), then a real training whose learner is killed with SIGKILL."""

from __future__ import annotations

import glob
import io
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from loupe.supervise import (
    SuperviseConfig,
    Supervisor,
    backoff,
    describe_exit,
    exit_status,
    is_abnormal,
    newest_checkpoint,
    read_state,
    remove_ray_sessions,
)

#: the stand-in learner: attempt k (counted in RUN/attempts) does PLAN[k], one of
#: "ckpt:N" (write checkpoint N, then SIGKILL itself), "kill", "exit:K", "ok", "sleep" (wait for
#: SIGTERM, then exit 143 as loupe does), "orphan" (start a grandchild `sleep`, then SIGKILL itself)
CHILD = r"""
import json, os, signal, subprocess, sys, time
from pathlib import Path
run, which, plan = Path(sys.argv[1]), sys.argv[2], sys.argv[3].split(",")
run.mkdir(exist_ok=True)
attempts = run / "attempts"
k = len(attempts.read_text().split()) if attempts.exists() else 0
with attempts.open("a") as f:
    f.write(which + "\n")
(run / "config.json").write_text("{}")
what = plan[min(k, len(plan) - 1)]
if what.startswith("ckpt:"):
    (run / "checkpoints").mkdir(exist_ok=True)
    step = int(what[5:])
    (run / "checkpoints" / f"ckpt-{step:012d}.json").write_text(json.dumps({"step": step}))
    os.kill(os.getpid(), signal.SIGKILL)
if what == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
if what.startswith("exit:"):
    sys.exit(int(what[5:]))
if what == "sleep":
    signal.signal(signal.SIGTERM, lambda *a: (run.joinpath("got").write_text("TERM"), sys.exit(143)))
    run.joinpath("ready").write_text(str(os.getpid()))
    time.sleep(60)
if what == "orphan":
    p = subprocess.Popen(["sleep", "60"])
    run.joinpath("orphan").write_text(str(p.pid))
    os.kill(os.getpid(), signal.SIGKILL)
"""


def supervisor(run: Path, plan: str, **config) -> tuple[Supervisor, io.StringIO]:
    out = io.StringIO()
    cmd = [sys.executable, "-c", CHILD, str(run)]
    config.setdefault("backoff_s", 0.0)
    sup = Supervisor(
        first=cmd + ["first", plan],
        resume=cmd + ["resume", plan],
        run_dir=run,
        config=SuperviseConfig(**config),
        out=out,
        resume_hint=f"loupe train --resume {run} --supervise",
    )
    return sup, out


def attempts(run: Path) -> list[str]:
    return (run / "attempts").read_text().split()


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


# -- pure logic ---------------------------------------------------------------------------------
@pytest.mark.unit
def test_exit_classes_and_backoff():
    assert [is_abnormal(rc) for rc in (0, 2, 130, 143, -2, -15)] == [False] * 6
    assert [is_abnormal(rc) for rc in (1, 3, 137, -9, -11, -6)] == [True] * 6
    assert exit_status(-9) == 137 and exit_status(1) == 1 and exit_status(-15) == 143
    assert describe_exit(-9) == "signal 9, SIGKILL" and describe_exit(1) == "status 1"
    config = SuperviseConfig(backoff_s=1.0, max_backoff_s=5.0)
    assert [backoff(config, n) for n in (1, 2, 3, 4, 5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    with pytest.raises(Exception, match="max-restarts"):
        SuperviseConfig(max_restarts=-1)


@pytest.mark.unit
def test_newest_checkpoint_reads_names_only(tmp_path):
    assert newest_checkpoint(tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    for step in (64, 128, 32):
        (tmp_path / "checkpoints" / f"ckpt-{step:012d}.json").write_text("{}")
    (tmp_path / "checkpoints" / "ckpt-000000000256.safetensors").write_text("")  # no JSON: torn
    assert newest_checkpoint(tmp_path) == (128, "ckpt-000000000128")


# -- the supervisor with a stand-in child --------------------------------------------------------
@pytest.mark.unit
def test_restarts_from_checkpoints_until_done(tmp_path):
    run = tmp_path / "run"
    sup, out = supervisor(run, "ckpt:32,ckpt:64,ok")
    assert sup.run() == 0
    lines = out.getvalue().splitlines()
    assert lines == [
        "loupe: learner exited (signal 9, SIGKILL); restart 1/5 from ckpt-000000000032 "
        "(step 32) in 0 s",
        "loupe: learner exited (signal 9, SIGKILL); restart 1/5 from ckpt-000000000064 "
        "(step 64) in 0 s",
    ]
    assert attempts(run) == ["first", "resume", "resume"]
    state = read_state(run)
    assert state["starts"] == 3 and state["restarts"] == 2 and state["child_pid"] is None
    assert [e["exit"] for e in state["exits"]] == [137, 137, 0]
    assert [e["checkpoint_step"] for e in state["exits"]] == [32, 64, 64]
    assert state["config"]["max_restarts"] == 5 and state["supervisor_pid"] == os.getpid()


@pytest.mark.unit
def test_deaths_without_a_new_checkpoint_are_bounded(tmp_path):
    run = tmp_path / "run"
    sup, out = supervisor(run, "ckpt:32,kill,kill,kill,ok", max_restarts=2)
    assert sup.run() == 137
    lines = out.getvalue().splitlines()
    assert len(lines) == 3, lines
    assert "restart 1/2" in lines[0] and "restart 2/2" in lines[1]
    assert lines[2] == (
        "loupe: learner exited (signal 9, SIGKILL); no restart left (2 in a row without a new "
        f"checkpoint), the newest is ckpt-000000000032 (step 32); to resume: loupe train "
        f"--resume {run} --supervise"
    )
    assert attempts(run) == ["first", "resume", "resume"]


@pytest.mark.unit
def test_a_new_checkpoint_starts_the_count_afresh(tmp_path):
    run = tmp_path / "run"
    sup, out = supervisor(run, "kill,ckpt:32,kill,ckpt:64,kill,ok", max_restarts=2)
    assert sup.run() == 0
    counts = [line.split("restart ")[1].split()[0] for line in out.getvalue().splitlines()]
    assert counts == ["1/2", "1/2", "2/2", "1/2", "2/2"]
    assert sup.restarts == 5 and sup.starts == 6


@pytest.mark.unit
@pytest.mark.parametrize("code", [0, 2, 130, 143])
def test_done_bad_input_and_interrupts_are_not_restarted(tmp_path, code):
    run = tmp_path / "run"
    sup, out = supervisor(run, f"exit:{code},ok")
    assert sup.run() == code
    assert out.getvalue() == "" and attempts(run) == ["first"]


@pytest.mark.unit
def test_an_internal_error_is_restarted_and_zero_restarts_gives_up_at_once(tmp_path):
    sup, out = supervisor(tmp_path / "a", "exit:1,ok")
    assert sup.run() == 0 and "(status 1); restart 1/5 from step 0 (no checkpoint yet)" in (
        out.getvalue()
    )
    sup, out = supervisor(tmp_path / "b", "exit:1,ok", max_restarts=0)
    assert sup.run() == 1 and "no restart left (0 in a row" in out.getvalue()


@pytest.mark.unit
def test_sigterm_is_forwarded_and_nothing_restarts(tmp_path):
    run = tmp_path / "run"
    sup, out = supervisor(run, "sleep,ok")
    seen: dict = {}

    def send() -> None:
        deadline = time.monotonic() + 30
        while not (run / "ready").exists() or not read_state(run).get("child_pid"):
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)
        seen.update(read_state(run))
        os.kill(os.getpid(), signal.SIGTERM)  # to the supervisor, i.e. this process

    threading.Thread(target=send, daemon=True).start()
    assert sup.run() == 143
    assert (run / "got").read_text() == "TERM"
    assert seen["child_pid"] == int((run / "ready").read_text())
    assert attempts(run) == ["first"] and out.getvalue() == ""


@pytest.mark.unit
def test_a_killed_supervisor_takes_its_learner_along(tmp_path):
    """SIGKILL to the supervisor: the learner gets SIGTERM (it checkpoints and exits)."""
    import subprocess

    run = tmp_path / "run"
    code = (
        "import sys; from loupe.supervise import Supervisor, SuperviseConfig; "
        "cmd = [sys.executable, '-c', sys.argv[1], sys.argv[2]]; "
        "Supervisor(cmd + ['first', 'sleep'], cmd + ['resume', 'sleep'], sys.argv[2]).run()"
    )
    sup = subprocess.Popen([sys.executable, "-c", code, CHILD, str(run)])
    deadline = time.monotonic() + 30
    while not (run / "ready").exists():
        assert time.monotonic() < deadline and sup.poll() is None
        time.sleep(0.05)
    child = int((run / "ready").read_text())
    sup.kill()
    sup.wait()
    while alive(child):
        assert time.monotonic() < deadline + 30, "the learner outlived its supervisor"
        time.sleep(0.05)
    assert (run / "got").read_text() == "TERM"


@pytest.mark.unit
def test_what_a_killed_child_left_in_its_process_group_is_killed(tmp_path):
    run = tmp_path / "run"
    cleaned = []
    sup, out = supervisor(run, "orphan,ok")
    sup.cleanup = lambda: cleaned.append(True)
    assert sup.run() == 0
    orphan = int((run / "orphan").read_text())
    deadline = time.monotonic() + 5
    while alive(orphan) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(orphan)
    assert cleaned == [True, True]  # after each exit of the child
    assert json.loads((run / "supervise.json").read_text())["restarts"] == 1


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.unit
def test_ray_sessions_of_a_dead_pid_are_removed_and_no_other(tmp_path):
    root = tmp_path / "ray"
    mine = root / "session_2026-12-01_10-00-00_123456_4242"
    older = root / "session_2026-11-30_09-00-00_000001_4242"
    other = root / "session_2026-12-01_10-00-01_123456_14242"  # ends in the pid's digits
    for d in (mine, older, other):
        (d / "logs").mkdir(parents=True)
        (d / "logs" / "raylet.out").write_text("log")
    (root / "session_latest").symlink_to(mine)
    assert sorted(remove_ray_sessions(4242, root)) == sorted([mine, older])
    assert not mine.exists() and not older.exists() and other.is_dir()
    assert not (root / "session_latest").is_symlink()
    (root / "session_latest").symlink_to(other)
    assert remove_ray_sessions(4242, root) == [] and (root / "session_latest").is_symlink()
    assert remove_ray_sessions(1, tmp_path / "none") == []


# -- a real training ---------------------------------------------------------------------------
@pytest.mark.integration
def test_sigkilled_learner_is_restarted_and_the_run_completes(tmp_path):
    from loupe.bus import CheckpointBus, connect
    from loupe.bus.redis_server import RedisServer
    from tests.test_interrupts import TINY, Loupe, checkpoint_steps

    run = tmp_path / "run"
    total = 320  # 10 updates of 2 envs x 16 steps, a checkpoint every 2
    # a short path of its own: Ray's socket paths must fit in 107 bytes
    ray_tmp = Path(tempfile.mkdtemp(prefix="ls", dir="/tmp"))
    # the nature network: its updates are several times quicker than the interpretable one's
    train = Loupe("train", *TINY, "--policy", "nature", "--total-steps", str(total),
                  "--checkpoint-every", "2", "--actors", "1", "--no-progress", "--run-dir",
                  str(run), "--supervise", env={"RAY_TMPDIR": str(ray_tmp)})  # fmt: skip
    train.wait_for(lambda: checkpoint_steps(run) and read_state(run).get("child_pid")
                   and {"raylet", "redis-server"} <= set(train.seen.values()),
                   what="a first checkpoint with Ray and Redis up")  # fmt: skip
    first = read_state(run)["child_pid"]
    buffers = glob.glob(f"/dev/shm/loupe-obs-{first}-*")  # the learner's shared frame buffers
    before = rss_mb(train.proc.pid)
    os.kill(first, signal.SIGKILL)
    train.wait_for(lambda: read_state(run).get("restarts") == 1, what="the restart")
    # a SIGKILLed learner cannot remove its buffers from /dev/shm (memory): the clean-up does
    assert buffers and not glob.glob(f"/dev/shm/loupe-obs-{first}-*"), buffers
    # found by the soak: the clean-up's first use of the Redis client stepped the supervisor's
    # memory up by ~13 MB at the first restart
    assert rss_mb(train.proc.pid) < before + 3, (before, rss_mb(train.proc.pid))
    status = train.proc.wait(300)
    text = train.text
    assert status == 0, text[-3000:]
    assert "Traceback" not in text
    restarts = [line for line in text.splitlines() if line.startswith("loupe: learner exited")]
    assert len(restarts) == 1, text[-3000:]
    assert restarts[0].startswith("loupe: learner exited (signal 9, SIGKILL); restart 1/5 from ")
    assert f"done at step {total}" in text
    # every checkpoint either learner wrote, in order: the step counter never goes back
    written = [int(line.rsplit("ckpt-", 1)[1].split(".")[0]) for line in "".join(train.out)
               .splitlines() if line.startswith("checkpoint ")]  # fmt: skip
    assert written == sorted(set(written)) and written[-1] == total, written
    assert checkpoint_steps(run)[-1] == total
    state = read_state(run)
    assert state["starts"] == 2 and state["restarts"] == 1 and state["child_pid"] is None
    assert state["exits"][0]["pid"] == first and state["exits"][0]["exit"] == 137
    # nothing of either learner is left: its Ray, its workers, the private redis-server
    left = train.left_behind()
    assert not left, f"left running: {left}"
    # nor a Ray session directory: the killed learner's is removed by the supervisor, the
    # second learner's by itself
    used = (ray_tmp / "ray").is_dir()
    sessions = list((ray_tmp / "ray").glob("session_*"))
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert used and not sessions, sessions
    # each checkpoint written is announced once, in order (the AOF of the run's Redis, replayed)
    with RedisServer(run / "redis") as server:
        bus = CheckpointBus(connect(server.url), run.name)
        announced = [a.step for _, a in bus.announcements()]
        bus.client.close()
    assert announced == written, (announced, written)


@pytest.mark.integration
def test_supervise_bad_input_is_one_line(tmp_path, capfd):
    from loupe.cli import main

    assert main(["train", "--env", "procgen:coinrun", "--total-steps", "32", "--supervise"]) == 2
    assert "--supervise needs --run-dir" in capfd.readouterr().err
    assert main(["train", "--resume", str(tmp_path), "--supervise"]) == 2
    assert "holds no loupe run" in capfd.readouterr().err
    assert main(["train", "--resume", str(tmp_path), "--max-restarts", "3"]) == 2
    assert "--max-restarts needs --supervise" in capfd.readouterr().err
    assert main(["train", "--resume", str(tmp_path), "--supervise", "--max-restarts", "-1"]) == 2
    assert "--max-restarts" in capfd.readouterr().err
    # a bad value the learner finds: its one line, exit 2, no restart
    run = tmp_path / "new"
    status = main(["train", "--env", "procgen:nosuchgame", "--total-steps", "32", "--run-dir",
                   str(run), "--supervise"])  # fmt: skip
    err = capfd.readouterr().err
    assert status == 2 and not (run / "supervise.json").exists()
    lines = [line for line in err.splitlines() if line.startswith("loupe:")]
    assert len(lines) == 1 and "nosuchgame" in lines[0], err
