"""The Redis checkpoint bus: one stream entry per checkpoint, consumer groups for probe suites.

    bus = CheckpointBus(connect(url), run_id)
    bus.publish_checkpoint(CheckpointAnnouncement(run_id=..., step=..., uri=..., sha256=..., ...))
    bus.ensure_group("probes")
    for d in bus.follow("probes", consumer="worker-1", block_ms=1000):
        if d.error: ...                     # malformed or unknown-schema entry, already acked
        else: handle(d.announcement); bus.ack("probes", d.entry_id)
    bus.claim_stale("probes", "worker-2", min_idle_ms=30_000)   # a dead worker's entries

Entries are flat string fields (never pickled). Streams keep entries while a follower is down,
which pub/sub would drop; the server's AOF keeps them across a server crash.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any
from urllib.parse import urlparse

from loupe.errors import LoupeError

SCHEMA = 1


def connect(url: str, timeout: float = 5.0):
    """A redis client for ``url``, checked with PING; every failure is one LoupeError line."""
    import redis

    parsed = urlparse(url)
    if parsed.scheme not in ("redis", "rediss", "unix"):
        raise LoupeError(f"not a Redis URL: {url!r} (expected redis://[:password@]host:port/db)")
    where = f"{parsed.hostname}:{parsed.port or 6379}" if parsed.hostname else url
    try:
        client = redis.Redis.from_url(
            url, socket_connect_timeout=timeout, socket_timeout=timeout, decode_responses=True
        )
        client.ping()
    except redis.exceptions.AuthenticationError:
        if not parsed.password:
            raise LoupeError(
                f"Redis at {where} needs a password; pass redis://:PASSWORD@host:port/0"
            ) from None
        raise LoupeError(
            f"Redis at {where} refused the password; pass the URL with the right password "
            "(redis://:PASSWORD@host:port/0)"
        ) from None
    except redis.exceptions.ResponseError as exc:
        if "NOAUTH" in str(exc) or "AUTH" in str(exc).upper():
            raise LoupeError(
                f"Redis at {where} needs a password; pass redis://:PASSWORD@host:port/0"
            ) from None
        raise LoupeError(f"Redis at {where} answered with an error: {exc}") from None
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LoupeError(
            f"cannot reach Redis at {where} ({first}); start it or leave out --redis for a "
            "private server"
        ) from None
    return client


@dataclasses.dataclass
class CheckpointAnnouncement:
    """What a stream entry says about one checkpoint."""

    run_id: str
    step: int
    #: where the checkpoint's JSON lies (a path or a URI)
    uri: str
    #: sha256 of the checkpoint's weights file
    sha256: str
    #: policy registry name
    policy: str
    #: environment id
    env: str
    schema: int = SCHEMA
    #: anything else, JSON-encoded
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: wall-clock time of the announcement (seconds since the epoch)
    announced: float = 0.0

    def to_fields(self) -> dict[str, str]:
        return {
            "schema": str(self.schema),
            "run_id": self.run_id,
            "step": str(int(self.step)),
            "uri": self.uri,
            "sha256": self.sha256,
            "policy": self.policy,
            "env": self.env,
            "extras": json.dumps(self.extras),
            "announced": repr(self.announced or time.time()),
        }

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> CheckpointAnnouncement:
        """Parse a stream entry; raises ValueError with the reason when it is not one we read."""
        schema = fields.get("schema")
        if schema != str(SCHEMA):
            raise ValueError(f"unknown schema {schema!r} (this loupe reads {SCHEMA})")
        missing = [
            k for k in ("run_id", "step", "uri", "sha256", "policy", "env") if k not in fields
        ]
        if missing:
            raise ValueError(f"missing field(s) {', '.join(missing)}")
        try:
            return cls(
                run_id=fields["run_id"],
                step=int(fields["step"]),
                uri=fields["uri"],
                sha256=fields["sha256"],
                policy=fields["policy"],
                env=fields["env"],
                extras=json.loads(fields.get("extras") or "{}"),
                announced=float(fields.get("announced") or 0.0),
            )
        except (ValueError, json.JSONDecodeError) as exc:
            raise ValueError(f"malformed field ({exc})") from None


@dataclasses.dataclass
class Delivery:
    """One entry handed to a follower: an announcement, or the reason it could not be read."""

    entry_id: str
    announcement: CheckpointAnnouncement | None = None
    error: str | None = None


class CheckpointBus:
    """Streams ``loupe:<run>:checkpoints`` and ``loupe:<run>:results`` of one run."""

    def __init__(self, client, run_id: str, maxlen: int = 10_000):
        self.client = client
        self.run_id = run_id
        self.maxlen = maxlen

    @property
    def checkpoints_key(self) -> str:
        return f"loupe:{self.run_id}:checkpoints"

    @property
    def results_key(self) -> str:
        return f"loupe:{self.run_id}:results"

    @property
    def rejected_key(self) -> str:
        return f"loupe:{self.run_id}:rejected"

    # -- publishing -----------------------------------------------------------------------------
    def publish_checkpoint(self, announcement: CheckpointAnnouncement) -> str:
        return self.client.xadd(
            self.checkpoints_key, announcement.to_fields(), maxlen=self.maxlen, approximate=True
        )

    def publish_result(self, result: dict[str, Any]) -> str:
        """Append a result; every value is JSON-encoded (read back with ``json.loads``)."""
        fields = {k: json.dumps(v) for k, v in result.items()}
        return self.client.xadd(self.results_key, fields, maxlen=self.maxlen, approximate=True)

    def read_results(self, count: int = 1000) -> list[tuple[str, dict[str, str]]]:
        return self.client.xrange(self.results_key, count=count)

    def announcements(self) -> list[tuple[str, CheckpointAnnouncement]]:
        """Every readable announcement still in the stream, oldest first."""
        out = []
        for entry_id, fields in self.client.xrange(self.checkpoints_key):
            try:
                out.append((entry_id, CheckpointAnnouncement.from_fields(fields)))
            except ValueError:
                continue
        return out

    # -- following ------------------------------------------------------------------------------
    def ensure_group(self, group: str, start: str = "0") -> None:
        import redis

        try:
            self.client.xgroup_create(self.checkpoints_key, group, id=start, mkstream=True)
        except redis.exceptions.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def follow(
        self, group: str, consumer: str, block_ms: int = 1000, count: int = 1
    ) -> list[Delivery]:
        """This consumer's own unacknowledged entries first (after a restart), then new ones."""
        entries = self._read(group, consumer, "0", count, None)
        if not entries:
            entries = self._read(group, consumer, ">", count, block_ms)
        return [self._deliver(group, entry_id, fields) for entry_id, fields in entries]

    def _read(self, group, consumer, start, count, block):
        reply = self.client.xreadgroup(
            group, consumer, {self.checkpoints_key: start}, count=count, block=block
        )
        if not reply:
            return []
        _, entries = reply[0]
        # a pending entry trimmed away by MAXLEN comes back with no fields: acknowledge and skip
        gone = [entry_id for entry_id, fields in entries if not fields]
        if gone:
            self.client.xack(self.checkpoints_key, group, *gone)
        return [(entry_id, fields) for entry_id, fields in entries if fields]

    def _deliver(self, group: str, entry_id: str, fields: dict[str, str]) -> Delivery:
        try:
            return Delivery(entry_id, announcement=CheckpointAnnouncement.from_fields(fields))
        except ValueError as exc:
            reason = f"entry {entry_id} of {self.checkpoints_key} rejected: {exc}"
            self.reject(group, entry_id, reason)
            return Delivery(entry_id, error=reason)

    def reject(self, group: str, entry_id: str, reason: str) -> None:
        """Acknowledge an entry that cannot be processed and record why, for the user to see."""
        self.client.xadd(
            self.rejected_key,
            {"entry": entry_id, "group": group, "reason": reason},
            maxlen=self.maxlen,
            approximate=True,
        )
        self.ack(group, entry_id)

    def ack(self, group: str, entry_id: str) -> None:
        self.client.xack(self.checkpoints_key, group, entry_id)

    def claim_stale(self, group: str, consumer: str, min_idle_ms: int) -> list[Delivery]:
        """Take over entries other consumers read but did not acknowledge for ``min_idle_ms``."""
        claimed: list[Delivery] = []
        cursor = "0-0"
        while True:
            reply = self.client.xautoclaim(
                self.checkpoints_key, group, consumer, min_idle_ms, start_id=cursor, count=100
            )
            cursor, entries = reply[0], reply[1]
            for entry_id, fields in entries:
                if fields:
                    claimed.append(self._deliver(group, entry_id, fields))
            if cursor in ("0-0", b"0-0"):
                return claimed

    def pending(self, group: str) -> int:
        return int(self.client.xpending(self.checkpoints_key, group)["pending"])

    # -- exactly-once handling ------------------------------------------------------------------
    def _done_key(self, probe: str, sha256: str) -> str:
        return f"loupe:{self.run_id}:done:{probe}:{sha256}"

    def mark_done(self, probe: str, sha256: str) -> bool:
        """Record that ``probe`` finished this checkpoint; False if it was already recorded."""
        return bool(self.client.set(self._done_key(probe, sha256), str(time.time()), nx=True))

    def is_done(self, probe: str, sha256: str) -> bool:
        return bool(self.client.exists(self._done_key(probe, sha256)))

    def wait_for_checkpoints(self, count: int, timeout: float) -> list[CheckpointAnnouncement]:
        """Block (bounded) until at least ``count`` announcements are in the stream."""
        deadline = time.monotonic() + timeout
        while True:
            found = [a for _, a in self.announcements()]
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise LoupeError(
                    f"only {len(found)} of {count} checkpoint announcements after {timeout:.0f} s"
                )
            time.sleep(0.05)
