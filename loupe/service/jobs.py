"""Evaluations for the service: queued, run one at a time by `loupe evaluate`'s own code on the Ray
evaluators, persisted so that a restarted server knows them and a resubmitted id resumes.

    <state_dir>/evaluations/<request_id>/job.json   the request and its last state
    <state_dir>/evaluations/<request_id>/out/       eval.json, <label>.jsonl, results.json, chart

Each evaluation is `loupe evaluate` itself, run as a child process (the same records, resumable);
one worker thread runs them in submission order and reads progress from the records files. The gRPC
layer reads ``Job.snapshot()`` and waits on ``Job.version``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from loupe.config import load_json, save_json
from loupe.errors import LoupeError
from loupe.service.catalog import Catalog, NotFound

log = logging.getLogger("loupe.service.jobs")

REQUEST_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
FINAL = ("succeeded", "failed", "cancelled")
INTERRUPTED = "interrupted by a server restart; submit the same request id again to resume"


class Conflict(LoupeError):
    """A request id already used by a different evaluation."""


@dataclasses.dataclass
class EvalDefaults:
    """How the server runs evaluations (clients choose what, the server how)."""

    #: Ray evaluator actors per evaluation (0: in the server process)
    workers: int = 1
    #: levels played at once per evaluator
    slots: int = 16
    #: levels per Ray task (the granularity of progress and of Cancel)
    chunk: int = 16
    #: Ray address (None: a local Ray)
    ray_address: str | None = None
    #: most levels per checkpoint one evaluation may ask for
    max_levels: int = 100_000


def check_request_id(request_id: str) -> str:
    if not REQUEST_ID.fullmatch(request_id or ""):
        raise LoupeError(
            f"request id {request_id!r} is malformed; use 1-64 characters of A-Z a-z 0-9 _ - "
            "(e.g. a UUID)"
        )
    return request_id


class Job:
    def __init__(self, request_id: str, request: dict[str, Any], directory: Path):
        self.request_id = request_id
        self.request = request
        self.dir = directory
        self.state = "queued"
        self.error = ""
        self.progress: dict[str, dict[str, Any]] = {}  # label -> {"levels_done", "counts"}
        self.results: dict[str, Any] | None = None
        self.cancel_requested = False
        #: process id of the running `loupe evaluate`
        self.pid: int | None = None
        self.version = 0
        self.lock = threading.Lock()

    @property
    def out(self) -> Path:
        return self.dir / "out"

    @property
    def levels_total(self) -> int:
        return int(self.request["levels"]) * len(self.request["checkpoints"])

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                "request_id": self.request_id,
                "state": self.state,
                "error": self.error,
                "levels_total": self.levels_total,
                "levels_done": sum(p["levels_done"] for p in self.progress.values()),
                "checkpoints": {k: dict(v) for k, v in self.progress.items()},
                "results": self.results,
                "out_dir": str(self.out),
                "version": self.version,
            }

    def set(self, **values: Any) -> None:
        with self.lock:
            for key, value in values.items():
                setattr(self, key, value)
            self.version += 1
        self.save()

    def save(self) -> None:
        with self.lock:
            record = {
                "request_id": self.request_id,
                "request": self.request,
                "state": self.state,
                "error": self.error,
            }
        save_json(self.dir / "job.json", record)

    def scan(self, label: str) -> None:
        """Levels done and counts by cause of ``label``, from its records file."""
        from loupe.distributed.evaluate import category, read_records

        records = read_records(self.out / f"{label}.jsonl")
        progress = {
            "levels_done": len(records),
            "counts": dict(Counter(category(r) for r in records.values())),
        }
        with self.lock:
            if self.progress.get(label) != progress:
                self.progress[label] = progress
                self.version += 1


class EvaluationJobs:
    """Evaluations by request id; one worker thread runs them in submission order."""

    def __init__(self, catalog: Catalog, state_dir: str | Path, defaults: EvalDefaults):
        self.catalog = catalog
        self.root = Path(state_dir) / "evaluations"
        self.root.mkdir(parents=True, exist_ok=True)
        self.defaults = defaults
        self.jobs: dict[str, Job] = {}
        self.lock = threading.Lock()
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.closing = False
        self._load()
        self.thread = threading.Thread(target=self._work, name="loupe-evaluations", daemon=True)
        self.thread.start()

    def _load(self) -> None:
        """Jobs of earlier server processes; unfinished ones wait for their id to be resubmitted."""
        for path in sorted(self.root.glob("*/job.json")):
            try:
                record = load_json(path)
                job = Job(record["request_id"], record["request"], path.parent)
            except (LoupeError, KeyError, TypeError):
                log.warning("%s: unreadable evaluation record, skipped", path)
                continue
            job.state = record.get("state", "failed")
            job.error = record.get("error", "")
            if job.state not in FINAL:
                job.state, job.error = "failed", INTERRUPTED
            if job.state == "succeeded" and (job.out / "results.json").is_file():
                job.results = load_json(job.out / "results.json")
            self._scan_all(job)
            self.jobs[job.request_id] = job

    def _scan_all(self, job: Job) -> None:
        for path in sorted(job.out.glob("*.jsonl")):
            job.scan(path.stem)

    # -- the calls --------------------------------------------------------------------------------
    def submit(
        self,
        request_id: str,
        checkpoints: list[tuple[str, str]],
        levels: int,
        start_level: int = 0,
        causes: bool = True,
        seed: int = 0,
        distribution_mode: str | None = None,
    ) -> dict[str, Any]:
        """Queue an evaluation (or return the one with this id) -> its snapshot at submission."""
        check_request_id(request_id)
        if not checkpoints:
            raise LoupeError("give at least one checkpoint to evaluate")
        if levels > self.defaults.max_levels:
            raise LoupeError(
                f"levels {levels} is over this server's limit of {self.defaults.max_levels}; "
                "split the evaluation"
            )
        paths = [str(self.catalog.checkpoint_path(run, name)) for run, name in checkpoints]
        request = {
            "checkpoints": [[run, name] for run, name in checkpoints],
            "paths": paths,
            "levels": int(levels),
            "start_level": int(start_level),
            "causes": bool(causes),
            "seed": int(seed),
            "distribution_mode": distribution_mode or None,
        }
        self._config(request, Path("."))  # validates levels, start level, mode
        with self.lock:
            job = self.jobs.get(request_id)
            if job is not None:
                if job.request != request:
                    raise Conflict(
                        f"request id {request_id} belongs to a different evaluation; choose a new "
                        "id, or repeat that evaluation's checkpoints and options"
                    )
                if job.state in ("failed", "cancelled"):  # resume from its records
                    job.set(state="queued", error="", cancel_requested=False)
                    snap = job.snapshot()
                    self.queue.put(job)
                    return snap
                return job.snapshot()
            job = Job(request_id, request, self.root / request_id)
            job.dir.mkdir(parents=True, exist_ok=True)
            job.save()
            self.jobs[request_id] = job
            snap = job.snapshot()
            self.queue.put(job)
        return snap

    def get(self, request_id: str) -> Job:
        check_request_id(request_id)
        try:
            return self.jobs[request_id]
        except KeyError:
            raise NotFound(f"no evaluation with request id {request_id}; Submit it first") from None

    def cancel(self, request_id: str) -> Job:
        job = self.get(request_id)
        with job.lock:
            final = job.state in FINAL
            queued = job.state == "queued"
            job.cancel_requested = not final
        if queued:
            job.set(state="cancelled", error="cancelled before it started")
        return job

    def close(self) -> None:
        """Stop the running evaluation (it stays resumable) and the worker."""
        self.closing = True
        for job in list(self.jobs.values()):
            if job.state in ("queued", "running"):
                job.cancel_requested = True
        self.queue.put(None)
        self.thread.join(timeout=30)

    # -- the worker ---------------------------------------------------------------------------------
    def _config(self, request: dict[str, Any], out: Path):
        from loupe.distributed.evaluate import EvalConfig

        d = self.defaults
        return EvalConfig(
            checkpoints=list(request["paths"]),
            out=str(out),
            levels=request["levels"],
            start_level=request["start_level"],
            distribution_mode=request["distribution_mode"],
            workers=d.workers,
            slots=d.slots,
            chunk=d.chunk,
            causes=request["causes"],
            seed=request["seed"],
            ray_address=d.ray_address,
        )

    def _work(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            if job.state != "queued" or job.cancel_requested:
                continue
            self._run(job)

    def command(self, request: dict[str, Any], out: Path) -> list[str]:
        """The `loupe evaluate` command line of an evaluation."""
        d = self.defaults
        cmd = [sys.executable, "-m", "loupe.cli", "evaluate"]
        for path in request["paths"]:
            cmd += ["--checkpoint", path]
        cmd += ["--levels", str(request["levels"]), "--start-level", str(request["start_level"]),
                "--workers", str(d.workers), "--slots", str(d.slots), "--chunk", str(d.chunk),
                "--seed", str(request["seed"]), "--out", str(out), "--no-progress"]  # fmt: skip
        if not request["causes"]:
            cmd.append("--no-causes")
        if request["distribution_mode"]:
            cmd += ["--distribution-mode", request["distribution_mode"]]
        if d.ray_address:
            cmd += ["--ray-address", d.ray_address]
        return cmd

    def _run(self, job: Job) -> None:
        """`loupe evaluate` in a child process: its Ray driver (and a Ray failure) stays out of
        the server; Cancel interrupts it (its evaluators are killed, finished levels kept)."""
        job.set(state="running")
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])  # where this loupe is imported from
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        log_path = job.dir / "evaluate.log"
        with open(log_path, "ab") as log_file:
            proc = subprocess.Popen(
                self.command(job.request, job.out),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
            job.pid = proc.pid
            interrupted_at = None
            while proc.poll() is None:
                if job.cancel_requested and interrupted_at is None:
                    proc.send_signal(
                        signal.SIGINT
                    )  # the evaluator actors are killed on the way out
                    interrupted_at = time.monotonic()
                if interrupted_at is not None and time.monotonic() - interrupted_at > 30:
                    os.killpg(proc.pid, signal.SIGKILL)
                self._scan_all(job)
                time.sleep(0.2)
        self._scan_all(job)
        if proc.returncode == 0 and not job.cancel_requested:
            job.set(state="succeeded", results=load_json(job.out / "results.json"))
        elif job.cancel_requested:
            if self.closing:
                job.set(state="failed", error=INTERRUPTED, cancel_requested=False)
            else:
                job.set(state="cancelled", error="cancelled", cancel_requested=False)
        else:
            job.set(state="failed", error=_failure(log_path, proc.returncode))


def _failure(log_path: Path, returncode: int) -> str:
    """The one-line error of a failed `loupe evaluate`, or where to look."""
    lines = log_path.read_text(errors="replace").splitlines()
    for line in reversed(lines):
        if line.startswith("loupe: error: "):
            return line[len("loupe: error: ") :]
    return (
        f"loupe evaluate exited with status {returncode}; see {log_path}; finished levels are "
        "kept, submit the same request id again to resume"
    )
