"""`loupe train --supervise`: a small parent process that restarts a learner that died.

The training runs as a child process (the same `loupe train` command; ``--resume RUN_DIR`` once the
run directory holds the run). When the child dies abnormally (a signal such as SIGKILL from the
OOM killer, or a non-zero exit other than bad input, 2, or an interrupt, 130/143), the supervisor
cleans up what it left (its process group, the run's private redis-server) and starts it again
from the newest checkpoint, writing one line per restart:

    loupe: learner exited (signal 9, SIGKILL); restart 1/5 from ckpt-000000065536 (step 65536) in 1 s

Restarts are bounded: ``max_restarts`` in a row without a new checkpoint in between (a learner that
dies again before it wrote a checkpoint counts towards the limit; one that made progress starts the
count afresh), with a backoff that doubles for each of them. SIGINT and SIGTERM to the supervisor
are forwarded to the child, which checkpoints as always (``loupe.interrupt``); the supervisor then
exits with the child's status and restarts nothing.

The supervisor imports neither torch nor Ray: it stays small for the days a run takes. It writes
``<run_dir>/supervise.json`` (its pid, the child's pid, counts) once the run directory exists.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

from loupe.errors import LoupeError
from loupe.rundir import CHECKPOINT_JSON, checkpoint_names
from loupe.shm import remove_stale_buffers

#: exit statuses that are never restarted: done, bad input, interrupted (SIGINT, SIGTERM)
DONE, BAD_INPUT = 0, 2
INTERRUPTED = (128 + signal.SIGINT, 128 + signal.SIGTERM)
#: the file the supervisor keeps in the run directory
STATE_NAME = "supervise.json"
#: most recent exits kept in supervise.json
EVENTS_KEPT = 20


@dataclasses.dataclass
class SuperviseConfig:
    """How `loupe train --supervise` restarts its learner; saved in ``<run_dir>/supervise.json``."""

    #: restarts in a row without a new checkpoint in between; one more death ends the run
    max_restarts: int = 5
    #: seconds before a restart; doubled for each further restart in a row without a checkpoint
    backoff_s: float = 1.0
    #: the longest wait before a restart, in seconds
    max_backoff_s: float = 30.0
    #: seconds the child gets to exit after a forwarded SIGINT/SIGTERM before it is killed
    #: (0: wait as long as it takes; a second signal to the supervisor is forwarded at once)
    stop_timeout_s: float = 0.0

    def __post_init__(self) -> None:
        if self.max_restarts < 0:
            raise LoupeError(f"--max-restarts must be >= 0, got {self.max_restarts}")
        if self.backoff_s < 0 or self.max_backoff_s < self.backoff_s:
            raise LoupeError(
                f"backoff {self.backoff_s} s must be >= 0 and at most the maximum "
                f"{self.max_backoff_s} s"
            )
        if self.stop_timeout_s < 0:
            raise LoupeError(f"stop_timeout_s must be >= 0, got {self.stop_timeout_s}")


def exit_status(returncode: int) -> int:
    """A Popen return code as a shell reports it: 128 + N for a child killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def describe_exit(returncode: int) -> str:
    """``signal 9, SIGKILL`` or ``status 1``."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
        return f"signal {-returncode}, {name}"
    return f"status {returncode}"


def is_abnormal(returncode: int) -> bool:
    """True for a death worth a restart: a signal, or a non-zero status other than bad input (2)
    and an interrupt (130, 143, also when the signal itself killed the child)."""
    status = exit_status(returncode)
    return status not in (DONE, BAD_INPUT, *INTERRUPTED)


def backoff(config: SuperviseConfig, in_a_row: int) -> float:
    """Seconds before restart number ``in_a_row`` (1, 2, ...) of a streak without checkpoints."""
    return min(config.backoff_s * 2 ** max(in_a_row - 1, 0), config.max_backoff_s)


def newest_checkpoint(run_dir: Path) -> tuple[int, str] | None:
    """(step, name) of the newest complete checkpoint of a run, or None (read without torch)."""
    names = checkpoint_names(run_dir)
    if not names:
        return None
    return int(CHECKPOINT_JSON.search(names[-1]).group(1)), names[-1].removesuffix(".json")


def ray_temp_root() -> Path:
    """Where a local Ray keeps its session directories (Ray's rule: ``$RAY_TMPDIR`` or /tmp)."""
    return Path(os.environ.get("RAY_TMPDIR") or "/tmp") / "ray"


def remove_ray_sessions(pid: int, root: Path | None = None) -> list[Path]:
    """Remove the session directories of local Rays started by process ``pid`` -> those removed.

    Ray names them ``session_<date>_<time>_<microseconds>_<pid of the starting process>``; a
    learner killed by a signal never removed its own, and a supervised run restarted for days
    would leave one per death (logs, ~2 MB each). ``session_latest`` goes too when it points
    at one of them.
    """
    root = ray_temp_root() if root is None else root
    removed = []
    with contextlib.suppress(OSError):
        for d in root.glob(f"session_*_{int(pid)}"):
            if d.is_dir() and not d.is_symlink() and d.name.rsplit("_", 1)[1] == str(pid):
                removed.append(d)
    latest = root / "session_latest"
    with contextlib.suppress(OSError):
        if latest.is_symlink() and Path(os.path.realpath(latest)) in {
            Path(os.path.realpath(d)) for d in removed
        }:
            latest.unlink()
    for d in removed:
        shutil.rmtree(d, ignore_errors=True)
    return removed


def _kill_on_parent_death() -> Callable[[], None] | None:
    """A preexec function: the child gets SIGTERM (and checkpoints) if the supervisor dies."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the supervisor died before the prctl took effect
            os._exit(143)

    return preexec


class Supervisor:
    """Runs ``first`` (then ``resume`` once ``run_dir`` holds a run) until it ends normally.

    Plain Python: the commands are argv lists, so tests drive it with a tiny stand-in child.
    ``cleanup`` is called after every exit of the child (the CLI stops the run's leftover
    redis-server there). ``out`` receives the one line per restart.
    """

    def __init__(
        self,
        first: Sequence[str],
        resume: Sequence[str],
        run_dir: str | Path,
        config: SuperviseConfig | None = None,
        out: TextIO | None = None,
        cleanup: Callable[[], None] | None = None,
        resume_hint: str = "",
    ):
        self.first = list(first)
        self.resume = list(resume)
        self.run_dir = Path(run_dir)
        self.config = config or SuperviseConfig()
        self.out = out
        self.cleanup = cleanup
        #: the command that continues the run, for the line that gives up
        self.resume_hint = resume_hint
        self.child: subprocess.Popen | None = None
        #: the signal the supervisor received (forwarded to the child); no restart after one
        self.signalled: int | None = None
        self.starts = 0
        #: restarts in all, and in a row without a new checkpoint (the one that counts)
        self.restarts = 0
        self.in_a_row = 0
        self.events: list[dict] = []
        self._state_written_for: int | None = None

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> int:
        """Supervise until the child ends normally -> the exit status of the command."""
        with self._signals():
            while True:
                before = newest_checkpoint(self.run_dir)
                returncode = self._run_child()
                after = newest_checkpoint(self.run_dir)
                self._clean_up()
                self._record(returncode, after)
                if self.signalled is not None or not is_abnormal(returncode):
                    return exit_status(returncode)
                progressed = after is not None and (before is None or after[0] > before[0])
                self.in_a_row = 1 if progressed else self.in_a_row + 1
                if self.in_a_row > self.config.max_restarts:
                    self._give_up(returncode)
                    return exit_status(returncode)
                wait = backoff(self.config, self.in_a_row)
                self._say(
                    f"loupe: learner exited ({describe_exit(returncode)}); restart "
                    f"{self.in_a_row}/{self.config.max_restarts} from {self._where(after)} "
                    f"in {wait:g} s"
                )
                self.restarts += 1
                self._write_state()
                if not self._sleep(wait):
                    self._say(f"loupe: interrupted ({signal.Signals(self.signalled).name}) "
                              "before the restart" + self._hint())  # fmt: skip
                    return 128 + self.signalled

    def command(self) -> list[str]:
        """The command of the next start: ``resume`` once the run directory holds the run."""
        return self.resume if (self.run_dir / "config.json").is_file() else self.first

    def _run_child(self) -> int:
        self.child = subprocess.Popen(
            self.command(), process_group=0, preexec_fn=_kill_on_parent_death()
        )
        self.starts += 1
        self._state_written_for = None
        if self.signalled is not None:  # arrived while no child ran
            self._forward(self.signalled)
        stop_deadline = None
        while True:
            try:
                return self.child.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                pass
            if (
                self._state_written_for != self.child.pid
                and self.run_dir.joinpath("config.json").is_file()
            ):
                self._write_state()
            if self.signalled is not None and self.config.stop_timeout_s:
                stop_deadline = stop_deadline or time.monotonic() + self.config.stop_timeout_s
                if time.monotonic() > stop_deadline:
                    self.child.kill()

    def _clean_up(self) -> None:
        """Kill whatever the dead child left in its process group, remove the session directory
        of the local Ray a SIGKILLed child started (one that could exit removed its own, or
        kept it after a defect, for its logs) and its shared-memory frame buffers, then the
        caller's cleanup."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.child.pid, signal.SIGKILL)  # the group outlives its leader
        if self.child.returncode == -signal.SIGKILL:
            remove_ray_sessions(self.child.pid)
            remove_stale_buffers(pid=self.child.pid)
        if self.cleanup is not None:
            self.cleanup()

    def _give_up(self, returncode: int) -> None:
        self._say(
            f"loupe: learner exited ({describe_exit(returncode)}); no restart left "
            f"({self.config.max_restarts} in a row without a new checkpoint), the newest is "
            f"{self._where(newest_checkpoint(self.run_dir))}" + self._hint()
        )

    def _hint(self) -> str:
        return f"; to resume: {self.resume_hint}" if self.resume_hint else ""

    @staticmethod
    def _where(ckpt: tuple[int, str] | None) -> str:
        return "step 0 (no checkpoint yet)" if ckpt is None else f"{ckpt[1]} (step {ckpt[0]})"

    def _say(self, line: str) -> None:
        out = self.out or sys.stderr
        print(line, file=out, flush=True)

    def _sleep(self, seconds: float) -> bool:
        """Wait ``seconds``; False when a signal ended the wait."""
        deadline = time.monotonic() + seconds
        while self.signalled is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            time.sleep(min(left, 0.1))
        return False

    # -- signals -----------------------------------------------------------------------------
    def _forward(self, signum: int) -> None:
        if self.child is not None and self.child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.child.pid, signum)

    def _handler(self, signum, frame) -> None:
        self.signalled = signum
        self._forward(signum)  # a second one is forwarded too: the child then stops at once

    @contextlib.contextmanager
    def _signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        signals = (signal.SIGINT, signal.SIGTERM)
        # a signal the supervisor was started to ignore stays ignored (the child ignores it too)
        old = {s: signal.signal(s, self._handler) for s in signals
               if signal.getsignal(s) != signal.SIG_IGN}  # fmt: skip
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    # -- supervise.json ----------------------------------------------------------------------
    def _record(self, returncode: int, ckpt: tuple[int, str] | None) -> None:
        self.events.append(
            {
                "time": round(time.time(), 3),
                "pid": self.child.pid,
                "exit": exit_status(returncode),
                "cause": describe_exit(returncode),
                "checkpoint_step": None if ckpt is None else ckpt[0],
            }
        )
        del self.events[:-EVENTS_KEPT]
        self._write_state()

    def state(self) -> dict:
        """What supervise.json holds."""
        running = self.child is not None and self.child.poll() is None
        return {
            "config": dataclasses.asdict(self.config),
            "supervisor_pid": os.getpid(),
            "child_pid": self.child.pid if running else None,
            "starts": self.starts,
            "restarts": self.restarts,
            "restarts_in_a_row": self.in_a_row,
            "exits": self.events,
        }

    def _write_state(self) -> None:
        if not self.run_dir.joinpath("config.json").is_file():
            return  # the run directory is the first child's to create
        path = self.run_dir / STATE_NAME
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state(), indent=1) + "\n")
        tmp.replace(path)
        self._state_written_for = self.child.pid if self.child else None


def read_state(run_dir: str | Path) -> dict:
    """The supervise.json of a run ({} when there is none)."""
    try:
        return json.loads((Path(run_dir) / STATE_NAME).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
