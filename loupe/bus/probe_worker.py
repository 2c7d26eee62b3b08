"""Probe workers on the bus: follow a run's checkpoint stream and run the probe suite on each one.

Workers of one suite share a consumer group, so each checkpoint goes to one of them. A checkpoint is
handled at most once per suite: its result is published and marked done in one atomic step (a Redis
script), and a worker that finds the mark only acknowledges. A worker that dies mid-checkpoint leaves
its entry pending; the others reclaim it with XAUTOCLAIM once it has been idle ``claim_idle_ms``.
A worker that is still busy with a checkpoint renews its claim every ``claim_idle_ms / 4``, so that a
slow probe is never taken over while it runs.

Several workers of one command share the run's Redis, which their parent process starts (or finds)
once: the parent hands its URL to the workers in ``$LOUPE_PROBE_REDIS`` and they only connect.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from loupe import heap
from loupe.config import load_json
from loupe.errors import LoupeError

log = logging.getLogger("loupe.probe")

#: environment of a worker process started by a parent: the Redis URL to connect to (never start
#: a server), and the parent's pid (the worker stops when its parent is gone)
PARENT_REDIS_ENV = "LOUPE_PROBE_REDIS"
PARENT_PID_ENV = "LOUPE_PROBE_PARENT"
#: a consumer with nothing pending that has not read for this long (or claim_idle_ms, if longer)
#: is a worker that is gone: it is deleted from the group
GONE_MS = 60_000


@dataclasses.dataclass
class WorkerConfig:
    """One probe worker."""

    #: consumer group = the probe suite's name
    group: str = "probes"
    #: this worker's consumer name (unique within the group)
    consumer: str = dataclasses.field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}"
    )
    #: reclaim entries other workers left unacknowledged this long
    claim_idle_ms: int = 60_000
    #: block this long waiting for new entries
    block_ms: int = 1_000
    #: stop after this many idle seconds (None: run until interrupted)
    exit_when_idle: float | None = None
    #: stop after handling this many checkpoints (None: no limit)
    max_checkpoints: int | None = None
    #: how long to wait for a Redis that stopped answering (restarted, or killed and started
    #: again by the learner) before giving up with one line
    redis_wait_s: float = 300.0
    #: probe directories kept whole: the newest ``keep_last`` and those of every ``keep_every``-th
    #: checkpoint (by write order; 0: none of the older ones); the others keep summary.json only
    #: (``keep_last`` 0: keep every directory whole)
    keep_last: int = 10
    keep_every: int = 10
    #: overlays go to TensorBoard for every ``tb_images_every``-th checkpoint (by write order;
    #: 0: none); the scalars for every one
    tb_images_every: int = 10

    def __post_init__(self) -> None:
        if min(self.keep_last, self.keep_every, self.tb_images_every) < 0:
            raise LoupeError("probe keep_last, keep_every and tb_images_every must be >= 0")


class ProbeWorker:
    """Runs the probe suite for each checkpoint announced on ``bus``, writing into ``run_dir``."""

    def __init__(self, bus, run_dir: str | Path, config: WorkerConfig, probe_config=None):
        from probes.suite import ProbeConfig

        self.bus = bus
        self.run_dir = Path(run_dir)
        self.config = config
        self.probe_config = probe_config or ProbeConfig()
        self.handled = 0
        self.writer = None
        #: step and index of each finished probe directory, read once (see ``prune_probe_dirs``)
        self._seen: dict[str, tuple[int, Any]] = {}

    # -- one entry ----------------------------------------------------------------------------
    def out_dir(self, step: int, sha256: str) -> Path:
        return self.run_dir / "probes" / f"step-{step:012d}-{sha256[:8]}"

    def handle(self, delivery) -> str:
        """Process one delivery -> "done", "skipped", "rejected"."""
        group = self.config.group
        if delivery.error is not None:
            log.warning("%s", delivery.error)
            return "rejected"
        ann = delivery.announcement
        if self.bus.is_done(group, ann.sha256):
            self.bus.ack(group, delivery.entry_id)
            return "skipped"
        started = time.time()
        latency = started - ann.announced if ann.announced else None
        # the worker's memory before each probe: the level it returns to between checkpoints (a
        # probe allocates and frees ~100 MB, so samples at random times scatter by that much)
        level = heap.memory_mb()
        try:
            with self._keep_claimed(delivery.entry_id):
                summary = self._summary(ann)
        except LoupeError as exc:
            reason = f"checkpoint at step {ann.step} ({ann.uri}) rejected: {exc}"
            log.error("%s", reason)
            self.bus.publish_result({"kind": "error", "step": ann.step, "sha256": ann.sha256,
                                     "uri": ann.uri, "error": str(exc)})  # fmt: skip
            self.bus.reject(group, delivery.entry_id, reason)
            return "rejected"
        result = {
            "kind": "probe", "suite": group, "step": ann.step, "sha256": ann.sha256,
            "out": str(self.out_dir(ann.step, ann.sha256)), "consumer": self.config.consumer,
            "start_latency_s": latency, "seconds": time.time() - started,
            "scalars": scalars(summary), "worker_pid": os.getpid(),
            "worker_rss_mb": None if level is None else round(level[0], 3),
            "worker_private_mb": None if level is None else round(level[1], 3),
        }  # fmt: skip
        first = self.bus.record_once(group, ann.sha256, result)  # mark + publish, atomically
        if first:
            self._log_scalars(ann.step, result["scalars"], latency, level)
            index = summary.get("index")
            every = self.config.tb_images_every
            if every and (not isinstance(index, int) or index % every == 0):
                from loupe.explorer.tensorboard import log_probe_images

                log_probe_images(self.writer, result["out"], ann.step)
        self.bus.ack(group, delivery.entry_id)
        self._prune()
        heap.release()  # one probe's cycles and freed pages: the worker returns to its level
        return "done" if first else "skipped"

    def _prune(self) -> None:
        """Old probe directories down to summary.json (see ``loupe.retention``)."""
        from loupe.retention import prune_probe_dirs

        try:
            pruned = prune_probe_dirs(
                self.run_dir / "probes",
                self.config.keep_last,
                self.config.keep_every,
                seen=self._seen,
            )
        except OSError as exc:  # a full disk or a permission: the probing goes on
            log.warning("could not prune old probe directories: %s", exc)
            return
        for d in pruned:
            log.debug("pruned %s to its summary.json", d)

    @contextlib.contextmanager
    def _keep_claimed(self, entry_id: str) -> Iterator[None]:
        """While the block runs, renew this consumer's claim on ``entry_id`` (see the module doc)."""
        import redis

        stop = threading.Event()
        every = max(self.config.claim_idle_ms / 4000, 0.05)

        def renew() -> None:
            while not stop.wait(every):
                try:
                    self.bus.touch(self.config.group, self.config.consumer, entry_id)
                except (redis.exceptions.RedisError, OSError) as exc:
                    log.debug("renewing the claim on %s failed: %s", entry_id, exc)

        thread = threading.Thread(target=renew, name=f"claim-{entry_id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def _summary(self, ann) -> dict[str, Any]:
        from learner.checkpoint import load_checkpoint, resolve
        from probes.suite import run_suite

        out = self.out_dir(ann.step, ann.sha256)
        summary_path = out / "summary.json"
        if summary_path.is_file():  # finished by a worker that died before recording it
            return load_json(summary_path)
        policy, meta = load_checkpoint(ann.uri)  # verifies the file against its metadata
        if meta["sha256"] != ann.sha256:
            raise LoupeError(
                f"sha256 of {resolve(ann.uri)} is {meta['sha256'][:12]}..., the announcement says "
                f"{ann.sha256[:12]}...; the file was replaced after it was announced"
            )
        return run_suite(ann.uri, out, self.probe_config, policy=policy, meta=meta)

    def _log_scalars(
        self,
        step: int,
        values: dict[str, float],
        latency: float | None,
        level: tuple[float, float] | None = None,
    ) -> None:
        from torch.utils.tensorboard import SummaryWriter

        if self.writer is None:
            self.writer = SummaryWriter(str(self.run_dir / "tb" / f"probes-{self.config.consumer}"))
        for key, value in values.items():
            self.writer.add_scalar(f"probe/{key}", value, step)
        if latency is not None:
            self.writer.add_scalar("probe/start_latency_s", latency, step)
        if level is not None:
            self.writer.add_scalar("probe/worker_rss_mb", level[0], step)
            self.writer.add_scalar("probe/worker_private_mb", level[1], step)
        self.writer.flush()

    # -- the loop -----------------------------------------------------------------------------
    def run(
        self,
        on_idle: Callable[[int], None] | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> int:
        """Follow the stream until idle, the checkpoint limit or ``stop()``; returns checkpoints
        handled. ``on_idle(handled)`` is called each time the worker runs out of work."""
        import redis

        cfg = self.config
        self.bus.ensure_group(cfg.group)
        idle_since = time.monotonic()
        busy = True
        outage: _Outage | None = None
        pruned_at = -float("inf")
        try:
            while cfg.max_checkpoints is None or self.handled < cfg.max_checkpoints:
                if stop is not None and stop():
                    break
                try:
                    gone_ms = max(cfg.claim_idle_ms, GONE_MS)
                    if time.monotonic() - pruned_at > gone_ms / 1000:
                        # workers that are gone (each restart is a new consumer) leave the group
                        self.bus.prune_consumers(cfg.group, gone_ms)
                        pruned_at = time.monotonic()
                    deliveries = self.bus.claim_stale(cfg.group, cfg.consumer, cfg.claim_idle_ms)
                    if not deliveries:
                        deliveries = self.bus.follow(cfg.group, cfg.consumer, block_ms=cfg.block_ms)
                    if outage is not None:
                        outage = outage.over()
                    if not deliveries:
                        if busy and on_idle is not None:
                            on_idle(self.handled)
                        busy = False
                        if cfg.exit_when_idle is not None and (
                            time.monotonic() - idle_since > cfg.exit_when_idle
                        ):
                            break
                        continue
                    busy = True
                    for delivery in deliveries:
                        outcome = self.handle(delivery)
                        log.info("%s entry %s: %s", cfg.consumer, delivery.entry_id, outcome)
                        if outcome == "done":
                            self.handled += 1
                    idle_since = time.monotonic()
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                    # the entry being handled stays pending for this consumer: once Redis is
                    # back, follow() hands it out again and record_once keeps it exactly once
                    outage = outage or _Outage(self.bus, cfg.redis_wait_s)
                    outage.wait(exc)
        finally:
            if self.writer is not None:
                self.writer.close()
        return self.handled


class _Outage:
    """A Redis that stopped answering: one warning, waits with a growing pause, a bounded time."""

    def __init__(self, bus, limit_s: float):
        self.bus = bus
        self.limit_s = limit_s
        self.since = time.monotonic()
        self.tries = 0

    def wait(self, exc: Exception) -> None:
        """Sleep before the next try; LoupeError once the outage has lasted ``limit_s``."""
        waited = time.monotonic() - self.since
        if self.tries == 0:
            log.warning("Redis stopped answering (%s); waiting up to %g s for it to come back",
                        type(exc).__name__, self.limit_s)  # fmt: skip
        if waited > self.limit_s:
            kwargs = self.bus.client.connection_pool.connection_kwargs
            where = f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"
            raise LoupeError(
                f"Redis at {where} did not answer for {waited:.0f} s ({type(exc).__name__}); "
                "start the run's redis-server (or the learner) again, then run the same "
                "command: unfinished checkpoints are taken up again"
            ) from None
        self.tries += 1
        time.sleep(min(0.25 * 2**self.tries, 5.0))

    def over(self) -> None:
        """Redis answers again: say so (the outage ends)."""
        log.warning("Redis answers again after %.1f s", time.monotonic() - self.since)
        return None


def scalars(summary: dict[str, Any]) -> dict[str, float]:
    """The numbers worth plotting against training steps."""
    out = {
        "max_completeness_delta": summary.get("max_completeness_delta"),
        "top10_attribution_share": summary.get("top10_attribution_share"),
        "anomaly_count": summary.get("anomaly_count"),
        "attention_entropy": summary.get("attention_entropy"),
        "mean_return": summary.get("mean_return"),
        "nmf_mean_abs_residual": (summary.get("nmf") or {}).get("mean_abs_residual"),
    }
    return {k: float(v) for k, v in out.items() if v is not None}


def connect_run(run_dir: str | Path, url: str | None):
    """-> (redis client, server we started or None). No URL: the run's private server, started
    again over its AOF if it is not running."""
    from loupe.bus import connect
    from loupe.bus.redis_server import RedisServer, saved_url

    if url:
        return connect(url), None
    data = Path(run_dir) / "redis"
    saved = saved_url(data)
    if saved is not None:
        try:
            return connect(saved, 2.0), None
        except LoupeError:
            pass  # not running: start it over the same data directory
    if not data.is_dir():
        raise LoupeError(
            f"{run_dir} has no Redis data (redis/); pass --redis URL of the run's server"
        )
    server = RedisServer(data).start()
    return connect(server.url), server
