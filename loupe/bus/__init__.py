"""The Redis checkpoint bus: one stream entry per checkpoint, consumer groups for probe suites.

    bus = CheckpointBus(connect(url), run_id)
    bus.publish_checkpoint(CheckpointAnnouncement(run_id=..., step=..., uri=..., sha256=..., ...))
    bus.ensure_group("probes")
    for d in bus.follow("probes", consumer="worker-1", block_ms=1000):
        if d.error: ...                     # malformed or unknown-schema entry, already acked
        else: handle(d.announcement); bus.ack("probes", d.entry_id)
    bus.claim_stale("probes", "worker-2", min_idle_ms=30_000)   # a dead worker's entries

Keys of run ``R``: ``loupe:R:checkpoints`` (announcements), ``loupe:R:results`` (probe results),
``loupe:R:rejected`` (entries a follower could not read, with the reason),
``loupe:R:done:<probe>:<sha256>`` (exactly-once marks) and ``loupe:R:done-order:<probe>`` (those
marks, oldest first). Entries are flat string fields (never pickled); result values are JSON.
Streams keep entries while a follower is down, which pub/sub would drop; the server's AOF keeps
them across a server crash.

Everything is bounded for runs of any length: each stream holds about ``maxlen`` entries (XADD
MAXLEN ~, trimmed a whole radix-tree node at a time, so up to ``maxlen`` + 100), each suite keeps
at most ``2 * maxlen`` done marks (the oldest is deleted with the mark that pushes it out: its
announcement left the stream long ago, so it can never be delivered again), and consumers of a
group that are gone (idle, nothing pending) are deleted by ``prune_consumers``.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from loupe.errors import LoupeError

if TYPE_CHECKING:
    import redis

SCHEMA = 1
REQUIRED = ("run_id", "step", "uri", "sha256", "policy", "env")
SHA256 = re.compile(r"[0-9a-f]{64}")

# SET NX of the done mark and XADD of the result in one step: a result is recorded exactly once.
# The mark joins the suite's list of marks; beyond ARGV[3] of them the oldest is deleted.
_RECORD_ONCE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX') then
  if redis.call('RPUSH', KEYS[3], KEYS[1]) > tonumber(ARGV[3]) then
    redis.call('DEL', redis.call('LPOP', KEYS[3]))
  end
  if #ARGV > 3 then
    return redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 4))
  end
  return 1
end
return false
"""

# delete the consumers of group ARGV[1] with nothing pending and idle >= ARGV[2] ms
_PRUNE_CONSUMERS = """
local gone = {}
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local info = {}
  for i = 1, #c, 2 do info[c[i]] = c[i + 1] end
  if tonumber(info['pending']) == 0 and tonumber(info['idle']) >= tonumber(ARGV[2]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
    table.insert(gone, info['name'])
  end
end
return gone
"""


def connect(url: str, timeout: float = 5.0) -> redis.Redis:
    """A client for ``url`` (socket timeouts ``timeout`` s), checked with PING; failures are one
    LoupeError line saying what to do."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    parsed = urlparse(url)
    if parsed.scheme not in ("redis", "rediss", "unix"):
        raise LoupeError(f"not a Redis URL: {url!r} (expected redis://[:password@]host:port/db)")
    if timeout <= 0:
        raise LoupeError(f"Redis timeout must be positive, got {timeout}")
    where = f"{parsed.hostname}:{parsed.port or 6379}" if parsed.hostname else url
    kwargs = dict(socket_connect_timeout=timeout, socket_timeout=timeout, decode_responses=True)
    # the check does not retry, so a wrong address fails at once; the client keeps the default
    # retries for a server that restarts under a long-running follower
    try:
        probe = redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0), **kwargs)
        try:
            probe.ping()
        finally:
            probe.close()
    except (redis.exceptions.RedisError, OSError, ValueError) as exc:
        raise LoupeError(_connect_error(exc, where, bool(parsed.password))) from None
    return redis.Redis.from_url(url, **kwargs)


def _connect_error(exc: Exception, where: str, has_password: bool) -> str:
    import redis

    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, ValueError):
        return (
            f"not a valid Redis URL for {where} ({text}); expected redis://[:password@]host:port/db"
        )
    needs_auth = isinstance(exc, redis.exceptions.AuthenticationError) or "NOAUTH" in text
    if needs_auth and not has_password:
        return f"Redis at {where} needs a password; pass redis://:PASSWORD@host:port/0"
    if needs_auth or "WRONGPASS" in text:
        return (
            f"Redis at {where} refused the password; pass the URL with the right password "
            "(redis://:PASSWORD@host:port/0)"
        )
    if isinstance(exc, redis.exceptions.ResponseError):
        return f"Redis at {where} answered with an error: {text}"
    return f"cannot reach Redis at {where} ({text}); start it or leave out --redis for a private server"


@dataclasses.dataclass
class CheckpointAnnouncement:
    """What a stream entry says about one checkpoint."""

    #: run the checkpoint belongs to
    run_id: str
    #: environment steps the learner had taken
    step: int
    #: where the checkpoint's JSON lies (a path or a URI)
    uri: str
    #: sha256 of the checkpoint's weights file (64 lowercase hex digits)
    sha256: str
    #: policy registry name
    policy: str
    #: environment id
    env: str
    #: entry layout version; readers refuse versions they do not know
    schema: int = SCHEMA
    #: anything else, JSON-encoded into one field
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: wall-clock time of the announcement (seconds since the epoch; 0: stamped when published)
    announced: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.step, bool) or not isinstance(self.step, int) or self.step < 0:
            raise LoupeError(f"checkpoint step must be a non-negative int, got {self.step!r}")
        if not SHA256.fullmatch(str(self.sha256)):
            raise LoupeError(
                f"checkpoint sha256 must be 64 lowercase hex digits, got {self.sha256!r}"
            )
        empty = [k for k in ("run_id", "uri", "policy", "env") if not getattr(self, k)]
        if empty:
            raise LoupeError(f"checkpoint announcement has empty {', '.join(empty)}")
        if not isinstance(self.extras, dict):
            raise LoupeError(
                f"announcement extras must be a dict, got {type(self.extras).__name__}"
            )

    def to_fields(self) -> dict[str, str]:
        """Flat string fields for XADD."""
        return {
            "schema": str(self.schema),
            "run_id": self.run_id,
            "step": str(self.step),
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
        missing = [k for k in REQUIRED if k not in fields]
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
        except (ValueError, LoupeError) as exc:  # JSONDecodeError is a ValueError
            raise ValueError(f"malformed field ({exc})") from None


@dataclasses.dataclass
class Delivery:
    """One entry handed to a follower: an announcement, or the reason it could not be read."""

    #: stream entry id (acknowledge it with CheckpointBus.ack when handled)
    entry_id: str
    #: the parsed announcement; None when the entry was rejected
    announcement: CheckpointAnnouncement | None = None
    #: why the entry was rejected (it is already acknowledged and recorded in the rejected stream)
    error: str | None = None


class CheckpointBus:
    """Streams ``loupe:<run>:checkpoints`` and ``loupe:<run>:results`` of one run."""

    def __init__(self, client: redis.Redis, run_id: str, maxlen: int = 10_000):
        if not run_id or any(c.isspace() for c in run_id):
            raise LoupeError(f"run id {run_id!r} must be non-empty without spaces")
        if maxlen < 1:
            raise LoupeError(f"stream maxlen must be at least 1, got {maxlen}")
        self.client = client
        self.run_id = run_id
        self.maxlen = maxlen
        self._record_once = client.register_script(_RECORD_ONCE)
        self._prune_consumers = client.register_script(_PRUNE_CONSUMERS)

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
        """XADD with MAXLEN ~ maxlen; returns the entry id."""
        return self.client.xadd(
            self.checkpoints_key, announcement.to_fields(), maxlen=self.maxlen, approximate=True
        )

    def publish_result(self, result: dict[str, Any]) -> str:
        """XADD a result; every value is stored as its JSON text."""
        return self.client.xadd(
            self.results_key, _json_fields(result), maxlen=self.maxlen, approximate=True
        )

    def read_results(
        self, start: str = "-", count: int = 1000, decode: bool = False
    ) -> list[tuple[str, dict[str, Any]]]:
        """Results from entry ``start`` on (inclusive), oldest first; ``decode`` parses the JSON."""
        entries = self.client.xrange(self.results_key, min=start, count=count)
        if decode:
            return [(i, {k: json.loads(v) for k, v in f.items()}) for i, f in entries]
        return entries

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
        """Create the consumer group (and the stream) unless it exists; ``start`` "0": from the
        first entry still in the stream, "$": only entries announced from now on."""
        import redis

        try:
            self.client.xgroup_create(self.checkpoints_key, group, id=start, mkstream=True)
        except redis.exceptions.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def follow(
        self, group: str, consumer: str, block_ms: int = 1000, count: int = 1
    ) -> list[Delivery]:
        """This consumer's own unacknowledged entries first (after a restart), then new ones,
        waiting at most ``block_ms`` (kept below the client's socket timeout) for them."""
        if count < 1 or block_ms < 0:
            raise LoupeError(f"follow needs count >= 1 and block_ms >= 0, got {count}, {block_ms}")
        entries = self._read_own_pending(group, consumer, count)
        if not entries:
            entries = self._read(group, consumer, ">", count, self._block(block_ms))
        return [self._deliver(group, entry_id, fields) for entry_id, fields in entries]

    def _block(self, block_ms: int) -> int:
        """XREADGROUP BLOCK must end before the socket times out, or redis-py raises."""
        timeout = self.client.connection_pool.connection_kwargs.get("socket_timeout")
        if timeout is None:
            return block_ms
        return max(1, min(block_ms, int(timeout * 1000) - 500))

    def _read_own_pending(self, group: str, consumer: str, count: int):
        while True:
            raw = self._read(group, consumer, "0", count, None, keep_gone=True)
            entries = [(entry_id, fields) for entry_id, fields in raw if fields]
            if entries or not raw:
                return entries
            # only entries trimmed away (acknowledged by _read): look again

    def _read(self, group, consumer, start, count, block, keep_gone: bool = False):
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
        return entries if keep_gone else [(i, f) for i, f in entries if f]

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
                # an entry trimmed away comes back empty (Redis 6.2: without its id); it is now
                # this consumer's, and its next follow() acknowledges it
                if entry_id and fields:
                    claimed.append(self._deliver(group, entry_id, fields))
            if cursor == "0-0":
                return claimed

    def touch(self, group: str, consumer: str, entry_id: str) -> None:
        """Reset the idle time of an entry ``consumer`` is still working on, so that nobody
        reclaims it as stale (XCLAIM to itself; the delivery count stays)."""
        self.client.xclaim(self.checkpoints_key, group, consumer, 0, [entry_id], justid=True)

    def caught_up(self, group: str) -> bool:
        """True when ``group`` has read every entry of the stream and acknowledged them all."""
        import redis

        try:
            last = self.client.xinfo_stream(self.checkpoints_key)["last-generated-id"]
            groups = {g["name"]: g for g in self.client.xinfo_groups(self.checkpoints_key)}
        except redis.exceptions.ResponseError:  # no stream yet: nothing announced
            return True
        info = groups.get(group)
        if info is None:
            return False
        return info["last-delivered-id"] == last and int(info["pending"]) == 0

    def pending(self, group: str) -> int:
        """Entries of the group read but not yet acknowledged."""
        return int(self.client.xpending(self.checkpoints_key, group)["pending"])

    # -- exactly-once handling ------------------------------------------------------------------
    def done_key(self, probe: str, sha256: str) -> str:
        return f"loupe:{self.run_id}:done:{probe}:{sha256}"

    def done_order_key(self, probe: str) -> str:
        """The list of ``probe``'s done marks, oldest first (it bounds their number)."""
        return f"loupe:{self.run_id}:done-order:{probe}"

    @property
    def max_done_marks(self) -> int:
        """Done marks kept per suite: twice the stream length, so a mark outlives its entry."""
        return 2 * self.maxlen

    def mark_done(self, probe: str, sha256: str) -> bool:
        """Record that ``probe`` finished this checkpoint; False if it was already recorded."""
        keys = [self.done_key(probe, sha256), self.results_key, self.done_order_key(probe)]
        args = [str(time.time()), str(self.maxlen), str(self.max_done_marks)]
        return bool(self._record_once(keys=keys, args=args))

    def is_done(self, probe: str, sha256: str) -> bool:
        return bool(self.client.exists(self.done_key(probe, sha256)))

    def record_once(self, probe: str, sha256: str, result: dict[str, Any]) -> str | None:
        """Mark done and publish ``result`` in one atomic step; the result's entry id, or None if
        this (probe, checkpoint) was already recorded (nothing is published then)."""
        fields = [x for k, v in _json_fields(result).items() for x in (k, v)]
        entry = self._record_once(
            keys=[self.done_key(probe, sha256), self.results_key, self.done_order_key(probe)],
            args=[str(time.time()), str(self.maxlen), str(self.max_done_marks), *fields],
        )
        return entry or None

    def prune_consumers(self, group: str, min_idle_ms: int) -> list[str]:
        """Delete the consumers of ``group`` with nothing pending that have not read for
        ``min_idle_ms`` (workers that are gone; a live one is created again by its next read)
        -> their names. Each restarted worker is a new consumer, so without this the group's
        consumer list would grow with every restart."""
        import redis

        try:  # in one script: no read can come in between the look and the delete
            return list(self._prune_consumers(keys=[self.checkpoints_key],
                                              args=[group, int(min_idle_ms)]))  # fmt: skip
        except redis.exceptions.ResponseError as exc:
            if "no such key" in str(exc).lower() or "NOGROUP" in str(exc):
                return []  # no stream or no group yet
            raise

    # -- waiting (tests, demos) -----------------------------------------------------------------
    def wait_for(
        self, count: int | None = None, step: int | None = None, timeout: float = 30.0
    ) -> list[CheckpointAnnouncement]:
        """Poll (bounded by ``timeout`` s) until ``count`` announcements are in the stream, or one
        for ``step`` or later; returns the announcements. LoupeError on timeout."""
        if (count is None) == (step is None):
            raise LoupeError("wait_for needs exactly one of count= and step=")
        deadline = time.monotonic() + timeout
        while True:
            found = [a for _, a in self.announcements()]
            if len(found) >= (count or 0) and (step is None or any(a.step >= step for a in found)):
                return found
            if time.monotonic() > deadline:
                want = f"{count} announcements" if count is not None else f"step {step}"
                raise LoupeError(
                    f"waited {timeout:g} s for {want} on {self.checkpoints_key}, found "
                    f"{len(found)}; is the learner running and announcing (not --no-announce)?"
                )
            time.sleep(0.05)


def _json_fields(values: dict[str, Any]) -> dict[str, str]:
    if not values:
        raise LoupeError("a result needs at least one field")
    return {str(k): json.dumps(v) for k, v in values.items()}
