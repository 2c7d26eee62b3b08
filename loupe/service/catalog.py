"""The runs a server follows: their checkpoints, Redis, probe summaries and loaded policies.

Plain Python (no gRPC): the servicers in server.py translate its LoupeErrors into status codes.
``NotFound`` is the LoupeError for an unknown run, checkpoint or summary (gRPC NOT_FOUND).
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from loupe.config import load_json
from loupe.errors import LoupeError


class NotFound(LoupeError):
    """An unknown run, checkpoint or probe summary."""


@dataclasses.dataclass
class RunInfo:
    """One run directory the server follows."""

    #: the run id (Redis keys, the name clients use)
    run_id: str
    #: the run directory
    path: Path
    #: redis:// URL of the run's checkpoint bus (None: none known)
    redis_url: str | None
    #: environment id from the run's config
    env: str = ""
    #: policy name from the run's config
    policy: str = ""


def open_run(path: str | Path, redis_url: str | None = None) -> RunInfo:
    """A run directory -> RunInfo; its Redis is ``redis_url``, the run's configured one, or its
    private server's saved address."""
    from loupe.bus.redis_server import saved_url
    from loupe.rundir import RunDir, run_id_for

    run = RunDir(path)
    if not run.path.is_dir():
        raise LoupeError(f"--run {path}: no such directory; pass a run directory of `loupe train`")
    config: dict[str, Any] = {}
    if run.config_path.is_file():
        config = load_json(run.config_path)
    elif not run.checkpoints.is_dir():
        raise LoupeError(f"--run {path} holds no loupe run (no config.json, no checkpoints/)")
    env = config.get("env")
    return RunInfo(
        run_id=config.get("run_id") or run_id_for(run.path),
        path=run.path.resolve(),
        redis_url=redis_url or config.get("redis") or saved_url(run.redis),
        env=(env or {}).get("env_id", "") if isinstance(env, dict) else str(env or ""),
        policy=str(config.get("policy") or ""),
    )


class Catalog:
    """Runs by id, checkpoint lookup and a small cache of loaded policies."""

    def __init__(self, runs: list[RunInfo], max_policies: int = 4, device: str = "cpu"):
        ids = [r.run_id for r in runs]
        if len(set(ids)) != len(ids):
            raise LoupeError(f"two --run directories have the same run id ({', '.join(ids)})")
        self.runs = {r.run_id: r for r in runs}
        self.max_policies = max_policies
        self.device = device
        self._policies: OrderedDict[str, tuple[Any, dict[str, Any]]] = OrderedDict()
        self._lock = threading.Lock()

    def run(self, run_id: str) -> RunInfo:
        try:
            return self.runs[run_id]
        except KeyError:
            known = ", ".join(sorted(self.runs)) or "none"
            raise NotFound(
                f"unknown run {run_id!r}; this server follows: {known} (see ListRuns)"
            ) from None

    def checkpoints(self, run_id: str) -> list[dict[str, Any]]:
        """Metadata of the run's checkpoints, oldest first, each with its ``name``."""
        from learner.checkpoint import list_checkpoints, read_meta

        out = []
        for path in list_checkpoints(self.run(run_id).path):
            try:
                meta = read_meta(path)
            except LoupeError:
                continue  # an unreadable checkpoint is not offered
            out.append({**meta, "name": path.stem, "path": str(path)})
        return out

    def checkpoint_path(self, run_id: str, name: str) -> Path:
        """``name``: "ckpt-000000065536", a step ("65536") or "latest" -> the checkpoint JSON."""
        from learner.checkpoint import checkpoint_dir, latest_checkpoint

        run = self.run(run_id)
        if name == "latest":
            path = latest_checkpoint(run.path)
        elif name.isdigit():
            path = checkpoint_dir(run.path) / f"ckpt-{int(name):012d}.json"
        elif name.startswith("ckpt-") and "/" not in name and name[5:].isdigit():
            path = checkpoint_dir(run.path) / f"{name}.json"
        else:
            raise LoupeError(
                f"checkpoint {name!r} is not a name like ckpt-000000065536, a step or 'latest'"
            )
        if path is None or not path.is_file():
            raise NotFound(
                f"run {run_id} has no checkpoint {name!r}; see ListCheckpoints for the ones it has"
            )
        return path

    def policy(self, run_id: str, name: str) -> tuple[Any, dict[str, Any]]:
        """The checkpoint's policy (eval mode) and metadata, loaded once and cached."""
        from learner.checkpoint import load_checkpoint

        path = self.checkpoint_path(run_id, name)
        key = str(path)
        with self._lock:
            if key in self._policies:
                self._policies.move_to_end(key)
                return self._policies[key]
        policy, meta = load_checkpoint(path, device=self.device)  # size and sha256 verified
        policy.eval()
        for p in policy.parameters():
            p.requires_grad_(False)
        with self._lock:
            self._policies[key] = (policy, meta)
            while len(self._policies) > self.max_policies:
                self._policies.popitem(last=False)
        return policy, meta

    def probe_summary(self, run_id: str, name: str) -> dict[str, Any]:
        """The probe suite's summary.json of a checkpoint (written by `loupe probe --run`)."""
        from learner.checkpoint import read_meta
        from loupe.bus.probe_worker import ProbeWorker, WorkerConfig

        run = self.run(run_id)
        meta = read_meta(self.checkpoint_path(run_id, name))
        out = ProbeWorker(None, run.path, WorkerConfig()).out_dir(int(meta["step"]), meta["sha256"])
        path = out / "summary.json"
        if not path.is_file():
            raise NotFound(
                f"no probe summary for step {meta['step']} of {run_id} yet; run "
                f"`loupe probe --run {run.path}` to compute it"
            )
        return {"step": int(meta["step"]), "sha256": meta["sha256"], "summary": load_json(path)}
