"""The soak's view of its own processes, from ``/proc`` (Linux): the tree under the harness, each
process's role, RSS, open descriptors and CPU time.

Only descendants of the harness are ever looked at, signalled or killed. The harness makes itself a
child subreaper (``PR_SET_CHILD_SUBREAPER``), so a process orphaned by a killed parent (the
learner's redis-server, Ray's agents) is re-parented to the harness and stays in its tree.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import re
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")
PR_SET_CHILD_SUBREAPER = 36

#: roles reported separately; "loupe" roles are the processes loupe itself runs
LOUPE_ROLES = ("learner", "supervisor", "rollout_actor", "probe_worker", "redis")
RAY_ROLES = ("raylet", "gcs", "ray_agent", "ray_worker")

_SESSION = re.compile(r"(/\S*?/session_[\w.\-]+)")


@dataclasses.dataclass
class Proc:
    """One process as seen in one scan."""

    pid: int
    ppid: int
    #: start time in clock ticks since boot: (pid, start) names a process even after pid reuse
    start: int
    state: str
    cmdline: list[str]
    rss_bytes: int
    cpu_s: float
    fds: int | None
    role: str = "other"
    #: resident pages backed by files or shared memory (libraries, Ray's object store, /dev/shm
    #: frame buffers): rss_bytes minus this is the process's private (anonymous) memory
    shared_bytes: int = 0

    @property
    def key(self) -> str:
        """A stable name of this process for series: ``pid-start``."""
        return f"{self.pid}-{self.start}"

    @property
    def title(self) -> str:
        """The command line as one string (Ray workers put their task name here)."""
        return " ".join(self.cmdline)


def become_subreaper() -> bool:
    """Make orphaned descendants children of this process (Linux); True when it worked."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def classify(cmdline: list[str], train_depth: int = 0, supervised: bool = False) -> str:
    """The role of a process from its command line (pure).

    ``train_depth`` is the number of `loupe train` processes above a `loupe train` process: with
    ``supervised`` the top one is the supervisor and its child the learner, else the top one is
    the learner; anything deeper is a fork on its way to another program ("fork", transient).
    """
    text = " ".join(cmdline)
    # a process that set its title (redis-server, Ray) has one argument holding spaces
    exe = Path(text.split(" ", 1)[0]).name if text else ""
    if exe == "redis-server":
        return "redis"
    if text.startswith(("ray::RolloutActor", "ray::EnvStepper")):
        return "rollout_actor"
    if text.startswith(("ray::DashboardAgent", "ray::RuntimeEnvAgent")):
        return "ray_agent"
    if text.startswith("ray::"):
        return "ray_worker"
    if exe == "raylet":
        return "raylet"
    if exe == "gcs_server":
        return "gcs"
    if any(part.endswith(("dashboard.py", "log_monitor.py", "monitor.py", "agent.py"))
           for part in cmdline[:3]):  # fmt: skip
        return "ray_agent"
    if "loupe.cli" in cmdline or any(Path(c).name == "loupe" for c in cmdline[:2]):
        if "train" in cmdline:
            if train_depth == 0:
                return "supervisor" if supervised else "learner"
            return "learner" if supervised and train_depth == 1 else "fork"
        if "probe" in cmdline:
            return "probe_worker"
    return "other"


def _read_stat(pid: int) -> tuple[int, int, str, float] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name is in parentheses and may hold spaces: split after the last ')'
    rest = raw[raw.rfind(")") + 2 :].split()
    state, ppid = rest[0], int(rest[1])
    utime, stime, start = int(rest[11]), int(rest[12]), int(rest[19])
    return ppid, start, state, (utime + stime) / TICKS


def scan_children() -> dict[int, int]:
    """pid -> ppid of every process on the machine (one pass over /proc)."""
    parents = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            stat = _read_stat(int(entry.name))
            if stat is not None:
                parents[int(entry.name)] = stat[0]
    return parents


def descendants(root: int, parents: dict[int, int]) -> list[int]:
    """Every pid below ``root`` in the parent map (pure)."""
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return sorted(out)


def read_proc(pid: int, count_fds: bool = True) -> Proc | None:
    """One process's figures, or None when it is gone."""
    stat = _read_stat(pid)
    if stat is None:
        return None
    ppid, start, state, cpu = stat
    try:
        cmdline = [c for c in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if c]
        statm = Path(f"/proc/{pid}/statm").read_text().split()
        pages, shared = int(statm[1]), int(statm[2])
    except (OSError, IndexError, ValueError):
        return None
    fds = None
    if count_fds:
        try:
            fds = len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            fds = None
    return Proc(pid, ppid, start, state, [c.decode(errors="replace") for c in cmdline],
                pages * PAGE, cpu, fds, shared_bytes=shared * PAGE)  # fmt: skip


def tree(root: int | None = None, count_fds: bool = True, supervised: bool = False) -> list[Proc]:
    """The processes below ``root`` (default: this process), classified (``supervised``: the
    training runs under `loupe train --supervise`)."""
    root = os.getpid() if root is None else root
    parents = scan_children()
    procs = [p for p in (read_proc(pid, count_fds) for pid in descendants(root, parents)) if p]
    by_pid = {p.pid: p for p in procs}
    trains = {p.pid for p in procs if classify(p.cmdline) == "learner"}
    for p in procs:
        depth, up = 0, by_pid.get(p.ppid)
        while up is not None:
            depth += up.pid in trains
            up = by_pid.get(up.ppid)
        p.role = "zombie" if p.state == "Z" else classify(p.cmdline, depth, supervised)
    return procs


def reap_orphans(keep: set[int]) -> list[int]:
    """Collect the exit status of zombie children this process adopted as a subreaper (not those
    in ``keep``: their Popen objects wait for them) -> the pids reaped."""
    reaped = []
    me = os.getpid()
    for pid, ppid in scan_children().items():
        if ppid != me or pid in keep:
            continue
        stat = _read_stat(pid)
        if stat is None or stat[2] != "Z":
            continue
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                reaped.append(pid)
        except ChildProcessError:
            pass
    return reaped


def ray_session_dir(procs: list[Proc]) -> Path | None:
    """The Ray session directory named on the command line of a raylet or GCS in ``procs``."""
    for p in procs:
        if p.role in ("raylet", "gcs"):
            match = _SESSION.search(p.title)
            if match:
                return Path(match.group(1))
    return None


def redis_port(p: Proc) -> int | None:
    """The port of a redis-server from its process title (``redis-server 127.0.0.1:PORT``)."""
    match = re.search(r":(\d+)\b", p.title)
    return int(match.group(1)) if match else None


def read_info_port(data_dir: Path) -> int | None:
    """The port in a run's ``redis/redis.json`` (None when there is none yet)."""
    from loupe.bus.redis_server import read_info

    port = read_info(data_dir).get("port")
    return int(port) if port else None


def dir_bytes(path: Path) -> int:
    """Bytes in the regular files under ``path`` (files that vanish while walking are skipped)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):  # a file deleted while walking
                total += os.lstat(os.path.join(root, name)).st_size
    return total
