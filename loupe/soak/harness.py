"""The soak harness: a real distributed CoinRun training, a probe worker and the run's Redis, a chaos
schedule that SIGKILLs them in turn, and a sampler of every process they run.

    report = Soak(SoakConfig(minutes=20)).run()      # writes bench/soak.json and bench/soak.png

The harness owns every process it measures: they are its descendants (it is their subreaper, so a
process orphaned by a kill stays in its tree), and nothing outside that tree is ever signalled.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loupe.errors import LoupeError
from loupe.rundir import checkpoint_names
from loupe.soak import (
    COMPONENTS,
    Item,
    Kill,
    StallDetector,
    account,
    chaos_schedule,
    longest_gap,
    pooled_slope,
    resume_checks,
    segments_after,
    step_order,
)
from loupe.soak import procs as P

MB = 1 << 20
#: the main loop's period (kill recovery is timed at this resolution)
TICK_S = 0.5
#: log lines worth keeping in the report (warnings, errors, restarts)
_NOTABLE = re.compile(
    r"WARNING|ERROR|error|restart|resumed from|lost its batch|redis-server|interrupted|Traceback"
)
#: the learner's line once it has restored its newest checkpoint (or found none: step 0)
_RESUMED = re.compile(
    r"resumed from \S+ at step (\d+)|no checkpoint in \S+ yet; starting from step (\d+)"
)
#: the probe worker's consumer name, the same after each restart
PROBE_CONSUMER = "soak-probe"


@dataclasses.dataclass
class SoakConfig:
    """One soak run: its length, the chaos schedule, the sampling and the training it runs."""

    #: length of the soak in minutes (chaos and sampling; the drain afterwards is extra)
    minutes: float = 20.0
    #: seconds between samples of every process
    sample_s: float = 5.0
    #: seconds before the first kill and before samples count for slopes (None: a fifth of the
    #: soak, at most 240)
    warmup_s: float | None = None
    #: seconds a restarted process warms up before its samples count for slopes
    segment_warmup_s: float = 150.0
    #: seconds between kills (None: the window after the warm-up split over the components, at
    #: most 180)
    kill_every_s: float | None = None
    #: seconds after the last kill until the soak ends (None: like the warm-up)
    tail_s: float | None = None
    #: no new checkpoint (or probe result while some are waiting) for this long is a stall
    stall_s: float = 180.0
    #: a stall that lasts this long ends the soak (reported, not waited on)
    stall_abort_s: float = 480.0
    #: a killed component must be back within this many seconds (the target)
    recovery_target_s: float = 60.0
    #: how long the harness waits for a killed component before it reports it as not back
    recovery_timeout_s: float = 240.0
    #: seconds the probe worker gets after training stopped to probe what is still announced
    drain_s: float = 300.0
    #: kill components at all (False: only sample, a baseline)
    chaos: bool = True
    #: where the run and the logs go (None: a new temporary directory, removed afterwards)
    work_dir: str | None = None
    #: keep the work directory when it is a temporary one
    keep: bool = False
    #: the training: policy, rollout actors, envs per actor, steps per env per update, minibatches,
    #: epochs, updates per checkpoint (small, so checkpoints come about once a minute on 2 cores)
    policy: str = "nature"
    actors: int = 2
    envs_per_actor: int = 8
    num_steps: int = 64
    minibatches: int = 4
    epochs: int = 1
    checkpoint_every: int = 12
    #: `loupe train --supervise --max-restarts` (when this loupe has --supervise)
    max_restarts: int = 5
    #: the probe worker's sizes (small: one checkpoint in well under a minute)
    probe_num_envs: int = 4
    probe_num_steps: int = 64
    probe_ig_samples: int = 16
    probe_smoothgrad_copies: int = 8

    def __post_init__(self) -> None:
        duration = self.minutes * 60
        if self.minutes <= 0:
            raise LoupeError(f"--minutes must be positive, got {self.minutes:g}")
        if self.warmup_s is None:
            self.warmup_s = min(240.0, duration / 5)
        if self.tail_s is None:
            self.tail_s = min(240.0, duration / 5)
        if self.kill_every_s is None:
            window = duration - self.warmup_s - self.tail_s
            self.kill_every_s = max(20.0, min(180.0, window / (len(COMPONENTS) - 1)))

    @property
    def duration_s(self) -> float:
        """The soak's length in seconds."""
        return self.minutes * 60

    def schedule(self) -> list[Kill]:
        """The kills of this soak (none without chaos)."""
        if not self.chaos:
            return []
        return chaos_schedule(self.duration_s, self.warmup_s, self.kill_every_s, self.tail_s)


def has_supervise() -> bool:
    """True when this loupe's `train` has --supervise (loupe.supervise exists)."""
    return importlib.util.find_spec("loupe.supervise") is not None


@dataclasses.dataclass
class Watch:
    """A kill whose recovery is being timed."""

    component: str
    t: float
    pid: int
    detail: dict[str, Any]
    #: the condition: called each tick with the harness, returns a note when the component is back
    back: Callable[[Soak], str | None]
    back_s: float | None = None
    note: str | None = None


class Soak:
    """One soak run; ``run()`` returns the report (also written to ``out`` with the plot)."""

    def __init__(
        self,
        config: SoakConfig,
        out: str | Path | None = "bench/soak.json",
        plot: str | Path | None = "bench/soak.png",
        echo: Callable[[str], None] = print,
    ):
        self.config = config
        self.out = Path(out) if out else None
        self.plot = Path(plot) if plot else None
        self.echo = echo
        self.supervise = has_supervise()
        self.temp = config.work_dir is None
        self.work = Path(config.work_dir or tempfile.mkdtemp(prefix="loupe-soak-"))
        self.run_dir = self.work / "run"
        self.t0 = time.monotonic()
        self.wall0 = time.time()
        self.train: subprocess.Popen | None = None
        self.probe: subprocess.Popen | None = None
        self.stopping = False
        self.samples: list[dict[str, Any]] = []
        self.checkpoints: dict[str, dict[str, Any]] = {}  # sha256 -> record (first seen)
        self.events: list[dict[str, Any]] = []  # notable log lines and harness actions
        self.resumes: list[tuple[float, int]] = []
        self.kills: list[Watch] = []
        self.watch: Watch | None = None
        self.probe_starts: list[float] = []
        self.train_starts: list[float] = []
        self.results_seen = 0
        self.announced_seen = 0
        self.redis_client = None
        self.sessions: set[Path] = set()
        self.seen_pids: dict[str, dict[str, Any]] = {}
        self.stall = {
            "learner": StallDetector("learner: no new checkpoint", config.stall_s),
            "probe": StallDetector(
                "probe worker: no new result while checkpoints wait", config.stall_s
            ),  # fmt: skip
        }
        self.cpu_stall: dict[str, StallDetector] = {}
        self.aborted: str | None = None
        self._logs: dict[str, int] = {}
        self.skipped: list[Kill] = []
        self.t_end: float | None = None
        self.t_drained: float | None = None
        #: (announcements, results) read from the streams after the drain
        self.streams: tuple[list, list] | None = None
        #: Redis memory per entry and done mark, measured after the drain
        self.redis_sizes: dict[str, float] | None = None
        self._server = None
        self.leftovers: list[dict[str, Any]] = []

    # -- time ----------------------------------------------------------------------------------
    def now(self) -> float:
        """Seconds since the soak started."""
        return time.monotonic() - self.t0

    def from_wall(self, wall: float) -> float:
        """A wall-clock time as seconds since the soak started."""
        return wall - self.wall0

    def say(self, text: str) -> None:
        """One progress line on the terminal, stamped with the soak's clock."""
        self.echo(f"[soak {self.now() / 60:5.1f} min] {text}")

    def note(self, kind: str, text: str, **extra: Any) -> None:
        """Record an event for the report."""
        self.events.append({"t": round(self.now(), 2), "kind": kind, "text": text, **extra})

    # -- processes -------------------------------------------------------------------------------
    def loupe_argv(self, *args: str) -> list[str]:
        """A `loupe` command line run with this interpreter."""
        return [sys.executable, "-m", "loupe.cli", *args]

    def train_argv(self, resume: bool = False) -> list[str]:
        """The training command of the soak (or its resumption)."""
        cfg = self.config
        if resume:
            return self.loupe_argv("train", "--resume", str(self.run_dir), "--no-progress")
        argv = self.loupe_argv(
            "train", "--env", "procgen:coinrun", "--policy", cfg.policy,
            "--env-option", "distribution_mode=easy",
            "--actors", str(cfg.actors), "--envs-per-actor", str(cfg.envs_per_actor),
            "--num-steps", str(cfg.num_steps), "--minibatches", str(cfg.minibatches),
            "--epochs", str(cfg.epochs), "--checkpoint-every", str(cfg.checkpoint_every),
            "--total-steps", str(10**8), "--device", "cpu", "--run-dir", str(self.run_dir),
            "--no-progress",
        )  # fmt: skip
        if self.supervise:
            argv += ["--supervise", "--max-restarts", str(cfg.max_restarts)]
        return argv

    def probe_argv(self) -> list[str]:
        """The probe worker: one process following the run, a fixed consumer name so that a
        restarted worker takes up its own unfinished entry at once."""
        cfg = self.config
        return self.loupe_argv(
            "probe", "--run", str(self.run_dir), "--consumer", PROBE_CONSUMER,
            "--num-envs", str(cfg.probe_num_envs), "--num-steps", str(cfg.probe_num_steps),
            "--ig-samples", str(cfg.probe_ig_samples),
            "--smoothgrad-copies", str(cfg.probe_smoothgrad_copies),
        )  # fmt: skip

    def _spawn(self, argv: list[str], log_name: str) -> subprocess.Popen:
        with open(self.work / log_name, "ab") as log:
            return subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches the harness, which stops them in order
            )  # fmt: skip

    def start_train(self, resume: bool = False) -> None:
        """Start the training (the supervisor with --supervise)."""
        self.train = self._spawn(self.train_argv(resume), "train.log")
        self.train_starts.append(self.now())
        self.note("start", f"training started (pid {self.train.pid}, resume={resume})")

    def start_probe(self) -> None:
        """Start the probe worker (again)."""
        self.probe = self._spawn(self.probe_argv(), "probe.log")
        self.probe_starts.append(self.now())
        self.note("start", f"probe worker started (pid {self.probe.pid})")

    def tree(self, count_fds: bool = False) -> list[P.Proc]:
        """The harness's processes now."""
        procs = P.tree(count_fds=count_fds, supervised=self.supervise)
        for p in procs:
            if p.key not in self.seen_pids:
                self.seen_pids[p.key] = {"pid": p.pid, "role": p.role, "first": self.now()}
            self.seen_pids[p.key]["last"] = self.now()
            if p.role != "zombie":
                self.seen_pids[p.key]["role"] = p.role
        return procs

    def ours(self, pid: int) -> bool:
        """True when ``pid`` is a live descendant of the harness (never signal anything else)."""
        return pid in P.descendants(os.getpid(), P.scan_children())

    def kill_pid(self, pid: int, sig: int = signal.SIGKILL) -> bool:
        """Signal one of the harness's own processes."""
        if not self.ours(pid):
            return False
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return False
        return True

    # -- Redis -----------------------------------------------------------------------------------
    def redis(self):
        """A client of the run's Redis (from its redis.json), or None when there is none yet."""
        from loupe.bus.redis_server import saved_url

        if self.redis_client is None:
            url = saved_url(self.run_dir / "redis")
            if url is None:
                return None
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry

            self.redis_client = redis.Redis.from_url(
                url, socket_timeout=1.0, socket_connect_timeout=1.0, decode_responses=True,
                retry=Retry(NoBackoff(), 0),
            )  # fmt: skip
        return self.redis_client

    def redis_call(self, fn: Callable[[Any], Any]) -> Any:
        """``fn(client)``, or None when Redis does not answer (the client is made afresh)."""
        import redis

        client = self.redis()
        if client is None:
            return None
        try:
            return fn(client)
        except (redis.exceptions.RedisError, OSError):
            client.close()
            self.redis_client = None
            return None

    def consumer_idle_s(self, consumer: str) -> float | None:
        """Seconds since ``consumer`` of the probe group last talked to Redis (None: unknown)."""

        def idle(client) -> float | None:
            for c in client.xinfo_consumers(self.stream_key("checkpoints"), "probes"):
                if c["name"] == consumer:
                    return c["idle"] / 1000
            return None

        return self.redis_call(idle)

    @property
    def run_id(self) -> str:
        from loupe.rundir import run_id_for

        return run_id_for(self.run_dir)

    def stream_key(self, name: str) -> str:
        """``loupe:<run>:<name>``."""
        return f"loupe:{self.run_id}:{name}"

    # -- observation -----------------------------------------------------------------------------
    def read_logs(self) -> None:
        """New lines of the training and probe logs: restarts, resumes, warnings."""
        for name in ("train.log", "probe.log"):
            path = self.work / name
            try:
                with open(path, "rb") as f:
                    f.seek(self._logs.get(name, 0))
                    data = f.read()
            except FileNotFoundError:
                continue
            cut = data.rfind(b"\n") + 1
            self._logs[name] = self._logs.get(name, 0) + cut
            for line in data[:cut].decode(errors="replace").splitlines():
                self._log_line(name.split(".")[0], line)

    def _log_line(self, source: str, line: str) -> None:
        t = round(self.now(), 2)
        resumed = _RESUMED.search(line)
        if resumed:
            self.resumes.append((t, int(resumed.group(1) or resumed.group(2))))
        if source == "probe" and line.startswith("waiting for checkpoints"):
            return
        if _NOTABLE.search(line) and len(self.events) < 2000:
            self.events.append({"t": t, "kind": source, "text": line.strip()[:400]})

    def scan_checkpoints(self) -> None:
        """Record every checkpoint JSON the first time it is seen (retention deletes old ones)."""
        directory = self.run_dir / "checkpoints"
        names = checkpoint_names(self.run_dir)
        known = {c["name"] for c in self.checkpoints.values()}
        for name in sorted(set(names) - known):
            try:
                meta = json.loads((directory / name).read_text())
            except (OSError, json.JSONDecodeError):
                continue  # deleted or being replaced: the next scan sees it
            if meta["sha256"] in self.checkpoints:
                continue
            self.checkpoints[meta["sha256"]] = {
                "name": name, "step": int(meta["step"]), "index": int(meta.get("index", -1)),
                "sha256": meta["sha256"], "seen": round(self.now(), 2),
                "created": meta.get("created"), "size": int(meta.get("size", 0)),
                "state_size": int(meta.get("state_size", 0)),
                "json_size": (directory / name).stat().st_size
                if (directory / name).exists() else 0,
                "process": meta.get("process"),
            }  # fmt: skip
            self.say(f"checkpoint at step {meta['step']} (index {meta.get('index')})")

    def newest_step(self) -> int | None:
        """The highest checkpoint step seen so far."""
        return max((c["step"] for c in self.checkpoints.values()), default=None)

    def sample(self) -> None:
        """One sample of every series."""
        t = round(self.now(), 2)
        procs = self.tree(count_fds=True)
        rows = [
            {"key": p.key, "pid": p.pid, "role": p.role, "rss_mb": p.rss_bytes / MB,
             "private_mb": (p.rss_bytes - p.shared_bytes) / MB, "fds": p.fds, "cpu_s": p.cpu_s}
            for p in procs if p.role != "zombie"
        ]  # fmt: skip
        session = P.ray_session_dir(procs)
        if session is not None:
            self.sessions.add(session)
        info = self.redis_call(lambda c: (c.info("memory"), c.info("server"),
                                          c.xlen(self.stream_key("checkpoints")),
                                          c.xlen(self.stream_key("results"))))  # fmt: skip
        redis_row = None
        if info is not None:
            memory, server, n_ann, n_res = info
            self.announced_seen, self.results_seen = n_ann, n_res
            redis_row = {"used_memory_mb": memory["used_memory"] / MB,
                         "process": f"{server['process_id']}-{server['run_id'][:8]}",
                         "announced": n_ann, "results": n_res}  # fmt: skip
        run_dir = {sub: P.dir_bytes(self.run_dir / sub) / MB
                   for sub in ("checkpoints", "probes", "tb", "redis")}  # fmt: skip
        run_dir["total"] = P.dir_bytes(self.run_dir) / MB
        self.samples.append({
            "t": t, "procs": rows, "redis": redis_row,
            "object_store": self.object_store(session), "run_dir_mb": run_dir,
            "ray_sessions_mb": sum(P.dir_bytes(s) for s in self.sessions) / MB,
            "newest_step": self.newest_step(), "checkpoints_seen": len(self.checkpoints),
        })  # fmt: skip
        self.check_stalls(t, procs)

    def object_store(self, session: Path | None) -> dict[str, Any] | None:
        """Ray object-store bytes in use, from the raylet's metrics endpoint (no Ray client)."""
        if session is None:
            return None
        ports = sorted(session.glob("metrics_export_port_*"))
        if not ports:
            return None
        try:
            port = int(ports[0].read_text().strip())
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                text = r.read().decode()
        except (OSError, ValueError):
            return None
        used = 0.0
        objects = None
        for line in text.splitlines():
            if line.startswith("ray_object_store_memory{"):
                used += float(line.rsplit(" ", 1)[1])
            elif line.startswith("ray_object_store_num_local_objects{"):
                objects = float(line.rsplit(" ", 1)[1])
        return {"used_mb": used / MB, "objects": objects, "session": session.name}

    def check_stalls(self, t: float, procs: list[P.Proc]) -> None:
        """Progress of the learner (checkpoints), the probe worker (results while checkpoints
        wait) and each rollout actor (CPU time); a stall is reported once, when it is found."""
        events = [self.stall["learner"].update(t, self.newest_step())]
        waiting = self.announced_seen > self.results_seen
        det = self.stall["probe"]
        events.append(det.update(t, self.results_seen) if waiting else det.reset(t))
        for p in procs:
            if p.role == "rollout_actor":
                d = self.cpu_stall.setdefault(
                    p.key, StallDetector(f"rollout actor {p.pid}: no CPU time", self.config.stall_s)
                )
                events.append(d.update(t, p.cpu_s))
        for event in events:
            if event is not None:
                self.say(f"STALL: {event.name} for {event.length:.0f} s")
                self.note("stall", event.name, since=event.since)

    # -- chaos ------------------------------------------------------------------------------------
    def kill(self, component: str) -> Watch | None:
        """SIGKILL one process of ``component`` and start timing its recovery."""
        procs = self.tree()
        t = self.now()
        if component == "rollout_actor":
            actors = sorted((p for p in procs if p.role == "rollout_actor"), key=lambda p: p.pid)
            if not actors:
                return self._no_target(component)
            victim = actors[len(self.kills) % len(actors)]
            before = {p.key for p in actors}

            def back(soak: Soak) -> str | None:
                for p in soak.tree():
                    if p.role == "rollout_actor" and p.key not in before and ".rollout" in p.title:
                        return f"replacement actor pid {p.pid} samples again"
                return None

        elif component == "probe_worker":
            if self.probe is None or self.probe.poll() is not None:
                return self._no_target(component)
            victim = next((p for p in procs if p.pid == self.probe.pid), None)
            if victim is None:
                return self._no_target(component)

            def back(soak: Soak) -> str | None:
                # the consumer name is fixed: once the dead worker's name talks to Redis again,
                # the restarted worker follows the stream (its unfinished entry first)
                started = [s for s in soak.probe_starts if s > t]
                if not started:
                    return None
                idle = soak.consumer_idle_s(PROBE_CONSUMER)
                if idle is not None and idle < soak.now() - started[0]:
                    return "the restarted worker reads the stream again"
                return None

        elif component == "redis":
            port = P.read_info_port(self.run_dir / "redis")
            servers = [p for p in procs if p.role == "redis" and P.redis_port(p) == port]
            if not servers:
                return self._no_target(component)
            victim = servers[0]

            def back(soak: Soak) -> str | None:
                pong = soak.redis_call(lambda c: c.ping())
                if not pong:
                    return None
                owner = next((p for p in soak.tree() if p.role == "redis"
                              and P.redis_port(p) == port), None)  # fmt: skip
                parent = next((p for p in soak.tree() if owner and p.pid == owner.ppid), None)
                return f"answers again (pid {owner.pid if owner else '?'}, started by " + (
                    f"{parent.role})" if parent else "?)"
                )

        elif component == "learner":
            learners = [p for p in procs if p.role == "learner"]
            if not learners:
                return self._no_target(component)
            victim = learners[0]
            resumes_before = len(self.resumes)

            def back(soak: Soak) -> str | None:
                if len(soak.resumes) > resumes_before:
                    return f"resumed at step {soak.resumes[-1][1]}"
                return None

        else:
            raise LoupeError(f"unknown component {component!r}")
        if not self.kill_pid(victim.pid):
            return self._no_target(component)
        self.say(f"KILL {component} pid {victim.pid}")
        watch = Watch(component, t, victim.pid, {"role": victim.role, "rss_mb": victim.rss_bytes / MB},
                      back)  # fmt: skip
        self.note("kill", f"SIGKILL {component} pid {victim.pid}")
        self.kills.append(watch)
        return watch

    def _no_target(self, component: str) -> None:
        self.say(f"no {component} to kill right now; skipped")
        self.note("kill-skipped", f"no {component} process to kill")
        return None

    def check_watch(self) -> None:
        """Is the killed component back?"""
        w = self.watch
        if w is None:
            return
        note = w.back(self)
        elapsed = self.now() - w.t
        if note is not None:
            w.back_s, w.note = elapsed, note
            self.say(f"{w.component} back after {elapsed:.1f} s: {note}")
            self.watch = None
        elif elapsed > self.config.recovery_timeout_s:
            w.note = f"not back after {self.config.recovery_timeout_s:g} s"
            self.say(f"{w.component} {w.note}")
            self.note("not-back", f"{w.component} {w.note}")
            self.watch = None

    # -- the keeper: what a supervisor does for the probe worker (and the learner without
    # --supervise) ---------------------------------------------------------------------------
    def keep_alive(self) -> None:
        """Restart a probe worker that exited; report a training command that exited."""
        if self.stopping:
            return
        if self.probe is not None and self.probe.poll() is not None:
            rc = self.probe.returncode
            self.note("exit", f"probe worker exited ({rc}); restarted")
            self.say(f"probe worker exited ({rc}); restarting it")
            self.start_probe()
        if self.train is not None and self.train.poll() is not None:
            rc = self.train.returncode
            if self.supervise:
                self.note("exit", f"the supervised training ended ({rc}); resumed by the harness")
            self.say(f"training exited ({rc}); resuming it")
            self.start_train(resume=True)

    # -- the soak ---------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Run the soak; returns the report, written to ``out`` (and the plot to ``plot``)."""
        cfg = self.config
        kills = cfg.schedule()
        subreaper = P.become_subreaper()
        self.say(
            f"soak of {cfg.minutes:g} min in {self.work}: {len(kills)} kills "
            f"({', '.join(f'{k.component}@{k.t / 60:.1f}' for k in kills)}), sampling every "
            f"{cfg.sample_s:g} s, supervise={self.supervise}"
        )
        self.run_dir.parent.mkdir(parents=True, exist_ok=True)
        try:
            try:
                self.start_train()
                self._wait_for_run()
                self.start_probe()
                self._loop(kills)
                self._finish()
            finally:
                self._stop_all()
            report = self.report(kills, subreaper)
            (self.work / "samples.json").write_text(json.dumps(self.samples))
            if self.out is not None:
                from loupe.config import save_json

                self.out.parent.mkdir(parents=True, exist_ok=True)
                save_json(self.out, report)
                self.say(f"report written to {self.out}")
            if self.plot is not None:
                from loupe.soak.plot import plot_soak

                plot_soak(report, self.samples, self.plot)
                self.say(f"plot written to {self.plot}")
        finally:
            if self.temp and not self.config.keep:
                shutil.rmtree(self.work, ignore_errors=True)
        return report

    def _wait_for_run(self, timeout: float = 180.0) -> None:
        """Until the run directory holds its config and Redis details (the probe needs both)."""
        deadline = time.monotonic() + timeout
        while (
            not (self.run_dir / "config.json").is_file()
            or P.read_info_port(self.run_dir / "redis") is None
        ):
            if self.train.poll() is not None:
                raise LoupeError(
                    f"the soak's training exited ({self.train.returncode}) before it started; "
                    f"see {self.work / 'train.log'}"
                )
            if time.monotonic() > deadline:
                raise LoupeError(f"the soak's training did not start in {timeout:g} s")
            time.sleep(TICK_S)
            self.read_logs()

    def _loop(self, kills: list[Kill]) -> None:
        cfg = self.config
        pending = list(kills)
        next_sample = 0.0
        while self.now() < cfg.duration_s:
            t = self.now()
            P.reap_orphans(self._popen_pids())
            self.read_logs()
            self.scan_checkpoints()
            self.keep_alive()
            if t >= next_sample:
                self.sample()
                next_sample = t + cfg.sample_s
                if self._stalled_too_long():
                    break
            self.check_watch()
            if pending and t >= pending[0].t and self.watch is None:
                self.watch = self.kill(pending.pop(0).component)
            time.sleep(TICK_S)
        while self.watch is not None:  # the last kill's recovery, bounded by its timeout
            self.read_logs()
            self.scan_checkpoints()
            self.keep_alive()
            self.check_watch()
            time.sleep(TICK_S)
        self.skipped = list(pending)

    def _stalled_too_long(self) -> bool:
        for det in self.stall.values():
            if det.open is not None and self.now() - det.open.since > self.config.stall_abort_s:
                self.aborted = f"{det.name} for over {self.config.stall_abort_s:g} s"
                self.say(f"ending the soak: {self.aborted}")
                self.note("abort", self.aborted)
                return True
        return False

    def _popen_pids(self) -> set[int]:
        return {p.pid for p in (self.train, self.probe) if p is not None}

    def _finish(self) -> None:
        """Stop training (SIGTERM: it writes and announces a last checkpoint), then let the probe
        worker probe every announced checkpoint, bounded by ``drain_s``."""
        self.stopping = True
        self.t_end = self.now()
        self.say("stopping the training (SIGTERM)")
        self._terminate(self.train, "training", timeout=180)
        self.read_logs()
        self.scan_checkpoints()
        server = None
        if self.redis_call(lambda c: c.ping()) is None:
            from loupe.bus.redis_server import RedisServer

            server = RedisServer(self.run_dir / "redis").start()  # as `loupe probe --run` would
            self.note("drain", "the harness started the run's Redis for the drain")
        self._server = server
        deadline = self.now() + self.config.drain_s
        self.say("waiting for the probe worker to probe every announced checkpoint")
        while self.now() < deadline:
            P.reap_orphans(self._popen_pids())
            self.read_logs()
            if self.probe is None or self.probe.poll() is not None:
                self.note("exit", "probe worker exited during the drain; restarted")
                self.start_probe()
            state = self.redis_call(lambda c: (c.xlen(self.stream_key("checkpoints")),
                                               c.xlen(self.stream_key("results"))))  # fmt: skip
            if state is not None and state[1] >= state[0] and self._group_caught_up():
                break
            time.sleep(1.0)
        self.t_drained = self.now()
        self.redis_sizes = self.redis_call(self._redis_sizes)
        self.streams = self.redis_call(lambda c: (
            c.xrange(self.stream_key("checkpoints")), c.xrange(self.stream_key("results")),
        ))  # fmt: skip
        self._terminate(self.probe, "probe worker", timeout=60)

    def _redis_sizes(self, client) -> dict[str, float]:
        """Redis memory per checkpoint entry, result entry and done mark (MEMORY USAGE)."""
        out = {}
        for name, key in (("checkpoint_entry", "checkpoints"), ("result_entry", "results")):
            n = client.xlen(self.stream_key(key))
            out[name] = (client.memory_usage(self.stream_key(key), samples=0) or 0) / max(n, 1)
        marks = list(client.scan_iter(match=f"loupe:{self.run_id}:done:*", count=1000))
        order = client.memory_usage(f"loupe:{self.run_id}:done-order:probes", samples=0) or 0
        used = sum(client.memory_usage(k, samples=0) or 0 for k in marks) + order
        out["done_mark"] = used / max(len(marks), 1)
        return out

    def _group_caught_up(self) -> bool:
        def check(c) -> bool:
            last = c.xinfo_stream(self.stream_key("checkpoints"))["last-generated-id"]
            groups = {g["name"]: g for g in c.xinfo_groups(self.stream_key("checkpoints"))}
            g = groups.get("probes")
            return bool(g) and g["last-delivered-id"] == last and g["pending"] == 0

        return bool(self.redis_call(check))

    def _terminate(self, proc: subprocess.Popen | None, what: str, timeout: float) -> None:
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.note("stop", f"{what} did not stop within {timeout:g} s of SIGTERM; killed")
            proc.kill()
            proc.wait()

    def _stop_all(self) -> None:
        """Whatever of the harness's tree is still running: stopped, and reported as leftover."""
        self.stopping = True
        for proc in (self.train, self.probe):
            if proc is not None and proc.poll() is None:
                self._terminate(proc, "process", timeout=60)
        if self._server is not None:
            self._server.stop()
        if self.redis_client is not None:
            self.redis_client.close()
        deadline = time.monotonic() + 15
        left = []
        while time.monotonic() < deadline:
            P.reap_orphans(set())
            left = [p for p in P.tree(count_fds=False) if p.state != "Z"]
            if not left:
                break
            time.sleep(0.5)
        self.leftovers = [{"pid": p.pid, "role": p.role, "title": p.title[:120]} for p in left]
        for p in left:
            self.kill_pid(p.pid)
        time.sleep(0.5)
        P.reap_orphans(set())

    # -- the report --------------------------------------------------------------------------------
    def report(self, kills: list[Kill], subreaper: bool) -> dict[str, Any]:
        """Everything measured, as one JSON-ready dict."""
        from loupe.soak.report import build_report

        return build_report(self, kills, subreaper)


def written_items(soak: Soak) -> list[Item]:
    """Checkpoints the harness saw written."""
    return [Item(c["step"], c["sha256"]) for c in soak.checkpoints.values()]


__all__ = [
    "SoakConfig",
    "Soak",
    "account",
    "longest_gap",
    "pooled_slope",
    "resume_checks",
    "segments_after",
    "step_order",
]
