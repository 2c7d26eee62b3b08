"""The checkpoint bus against a real redis-server (started by RedisServer in a tmp dir)."""

from __future__ import annotations

import json
import os
import time

import pytest

from loupe.bus import CheckpointAnnouncement, CheckpointBus, connect
from loupe.bus.redis_server import RedisServer, free_port
from loupe.errors import LoupeError


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with RedisServer(tmp_path_factory.mktemp("redis")) as srv:
        yield srv


@pytest.fixture
def bus(server, request):
    client = connect(server.url)
    run = request.node.name.replace("[", "_").replace("]", "_")
    yield CheckpointBus(client, run, maxlen=1000)
    for key in client.scan_iter(f"loupe:{run}:*"):
        client.delete(key)


def ann(step: int, run: str = "r") -> CheckpointAnnouncement:
    return CheckpointAnnouncement(
        run_id=run, step=step, uri=f"/runs/{run}/ckpt-{step}.json", sha256=f"{step:064x}",
        policy="impala", env="procgen:coinrun",
    )  # fmt: skip


@pytest.mark.integration
def test_publish_follow_ack(bus):
    bus.ensure_group("probes")
    ids = [bus.publish_checkpoint(ann(s, bus.run_id)) for s in (100, 200)]
    got = bus.follow("probes", "w1", block_ms=100, count=10)
    assert [d.entry_id for d in got] == ids
    assert [d.announcement.step for d in got] == [100, 200]
    assert got[0].announcement.sha256 == f"{100:064x}"
    for d in got:
        bus.ack("probes", d.entry_id)
    assert bus.pending("probes") == 0
    assert bus.follow("probes", "w1", block_ms=50) == []


@pytest.mark.integration
def test_two_consumers_share_without_duplicates(bus):
    bus.ensure_group("probes")
    for s in range(10):
        bus.publish_checkpoint(ann(s, bus.run_id))
    seen = []
    while True:
        a = bus.follow("probes", "a", block_ms=20)
        b = bus.follow("probes", "b", block_ms=20)
        if not a and not b:
            break
        for d in a + b:
            seen.append(d.announcement.step)
            bus.ack("probes", d.entry_id)
    assert sorted(seen) == list(range(10))


@pytest.mark.integration
def test_dead_consumers_entries_are_reclaimed(bus):
    bus.ensure_group("probes")
    bus.publish_checkpoint(ann(1, bus.run_id))
    taken = bus.follow("probes", "dies", block_ms=50)
    assert len(taken) == 1  # read, never acknowledged: the worker "dies"
    assert bus.claim_stale("probes", "rescuer", min_idle_ms=60_000) == []
    time.sleep(0.12)
    rescued = bus.claim_stale("probes", "rescuer", min_idle_ms=100)
    assert [d.announcement.step for d in rescued] == [1]
    bus.ack("probes", rescued[0].entry_id)
    assert bus.pending("probes") == 0


@pytest.mark.integration
def test_restarted_follower_gets_its_own_pending_entries_again(bus, server):
    bus.ensure_group("probes")
    bus.publish_checkpoint(ann(5, bus.run_id))
    first = bus.follow("probes", "w", block_ms=50)
    bus.publish_checkpoint(ann(6, bus.run_id))
    # the process dies; a new one with the same consumer name and a new connection
    restarted = CheckpointBus(connect(server.url), bus.run_id)
    again = restarted.follow("probes", "w", block_ms=50)
    assert [d.entry_id for d in again] == [d.entry_id for d in first]
    restarted.ack("probes", again[0].entry_id)
    assert [d.announcement.step for d in restarted.follow("probes", "w", block_ms=50)] == [6]


@pytest.mark.integration
def test_maxlen_trims_old_entries(server):
    bus = CheckpointBus(connect(server.url), "trim", maxlen=10)
    for s in range(300):
        bus.publish_checkpoint(ann(s, "trim"))
    length = bus.client.xlen(bus.checkpoints_key)
    assert 10 <= length < 300  # approximate trimming keeps at least maxlen
    steps = [a.step for _, a in bus.announcements()]
    assert steps == list(range(300 - length, 300))  # the newest are kept
    bus.client.delete(bus.checkpoints_key)


@pytest.mark.integration
def test_every_key_of_a_run_stays_bounded(server):
    """Many more checkpoints, results, rejections and worker restarts than ``maxlen``: each key
    loupe writes for the run stays within its stated bound, and exactly-once still holds for the
    marks kept."""
    maxlen, n = 10, 300
    bus = CheckpointBus(connect(server.url), "bounded", maxlen=maxlen)
    node = int(bus.client.config_get("stream-node-max-entries")["stream-node-max-entries"])
    bus.ensure_group("probes")
    for s in range(n):
        bus.publish_checkpoint(ann(s, "bounded"))
        # a worker that reads one entry, records and acknowledges it, and is then gone
        (d,) = bus.follow("probes", f"worker-{s}", block_ms=10)
        assert bus.record_once("probes", d.announcement.sha256, {"step": s}) is not None
        bus.ack("probes", d.entry_id)
        bus.reject("probes", d.entry_id, "a reason")
    time.sleep(0.02)
    gone = bus.prune_consumers("probes", min_idle_ms=10)
    assert len(gone) == n
    assert bus.client.xinfo_groups(bus.checkpoints_key)[0]["consumers"] == 0
    sizes = {}
    for key in bus.client.scan_iter("loupe:bounded:*", count=1000):
        kind = bus.client.type(key)
        sizes[key] = {"stream": bus.client.xlen, "list": bus.client.llen,
                      "string": lambda k: 1}[kind](key)  # fmt: skip
    streams = [bus.checkpoints_key, bus.results_key, bus.rejected_key]
    for key in streams:
        assert maxlen <= sizes.pop(key) <= maxlen + node, key
    assert sizes.pop(bus.done_order_key("probes")) == 2 * maxlen
    marks = [k for k in sizes if k.startswith("loupe:bounded:done:probes:")]
    assert len(marks) == len(sizes) == 2 * maxlen, sorted(sizes)  # nothing else is left
    # the newest marks are the ones kept: a second worker on a recent checkpoint records nothing
    assert bus.record_once("probes", f"{n - 1:064x}", {"step": n - 1}) is None
    assert not bus.is_done("probes", f"{0:064x}")
    assert bus.mark_done("probes", f"{n:064x}") and not bus.mark_done("probes", f"{n:064x}")
    assert bus.client.llen(bus.done_order_key("probes")) == 2 * maxlen
    # a consumer with an entry pending is never pruned, however long it has been idle
    bus.publish_checkpoint(ann(n, "bounded"))
    assert len(bus.follow("probes", "busy", block_ms=10)) == 1
    time.sleep(0.02)
    assert bus.prune_consumers("probes", min_idle_ms=10) == [] and bus.pending("probes") == 1
    assert bus.prune_consumers("nosuchgroup", 0) == []
    for key in bus.client.scan_iter("loupe:bounded:*", count=1000):
        bus.client.delete(key)


@pytest.mark.integration
def test_pending_entries_trimmed_away_are_skipped(bus):
    bus.ensure_group("probes")
    for s in range(3):
        bus.publish_checkpoint(ann(s, bus.run_id))
    assert len(bus.follow("probes", "dies", block_ms=50, count=2)) == 2
    assert len(bus.follow("probes", "mine", block_ms=50, count=1)) == 1
    bus.client.xtrim(bus.checkpoints_key, maxlen=0)
    bus.publish_checkpoint(ann(3, bus.run_id))
    time.sleep(0.02)
    assert bus.claim_stale("probes", "mine", min_idle_ms=1) == []  # nothing readable to take
    got = bus.follow("probes", "mine", block_ms=50, count=5)
    assert [d.announcement.step for d in got] == [3]
    bus.ack("probes", got[0].entry_id)
    assert bus.pending("probes") == 0


@pytest.mark.integration
def test_unknown_schema_is_reported_not_fatal(bus):
    bus.ensure_group("probes")
    bus.client.xadd(bus.checkpoints_key, {"schema": "7", "step": "1"})
    bus.client.xadd(bus.checkpoints_key, {"schema": "1", "step": "x"})
    bus.publish_checkpoint(ann(3, bus.run_id))
    got = bus.follow("probes", "w", block_ms=50, count=10)
    assert [d.error is not None for d in got] == [True, True, False]
    assert "unknown schema '7'" in got[0].error
    assert got[2].announcement.step == 3
    assert bus.client.xlen(bus.rejected_key) == 2
    (_, rejected), _ = bus.client.xrange(bus.rejected_key)  # fmt: skip
    assert rejected["entry"] == got[0].entry_id and "unknown schema" in rejected["reason"]
    assert bus.pending("probes") == 1  # the two bad entries were acknowledged


@pytest.mark.integration
def test_mark_done_is_exactly_once(bus):
    assert bus.mark_done("suite", "abc") is True
    assert bus.mark_done("suite", "abc") is False
    assert bus.is_done("suite", "abc") and not bus.is_done("suite", "other")


@pytest.mark.integration
def test_results_stream(bus):
    first = bus.publish_result({"step": 3, "probe": "suite", "summary": {"a": 1}})
    bus.publish_result({"step": 4, "probe": "suite"})
    (entry_id, fields), _ = bus.read_results()  # fmt: skip
    assert entry_id == first
    assert json.loads(fields["probe"]) == "suite" and json.loads(fields["summary"]) == {"a": 1}
    decoded = bus.read_results(decode=True)
    assert [f["step"] for _, f in decoded] == [3, 4] and decoded[0][1]["summary"] == {"a": 1}
    assert [f["step"] for _, f in bus.read_results(start=decoded[1][0], decode=True)] == [4]
    with pytest.raises(LoupeError, match="at least one field"):
        bus.publish_result({})


@pytest.mark.integration
def test_record_once_publishes_one_result_per_probe_and_checkpoint(bus):
    sha = "ab" * 32
    assert bus.record_once("suite", sha, {"step": 7}) is not None
    assert bus.record_once("suite", sha, {"step": 7}) is None  # a second worker, same checkpoint
    assert bus.record_once("other", sha, {"step": 7}) is not None
    assert bus.is_done("suite", sha) and len(bus.read_results()) == 2


@pytest.mark.integration
def test_bad_urls_and_passwords_fail_fast(server):
    t0 = time.monotonic()
    with pytest.raises(LoupeError, match="refused the password"):
        connect(f"redis://:wrong@127.0.0.1:{server.port}/0")
    with pytest.raises(LoupeError, match="needs a password"):
        connect(f"redis://127.0.0.1:{server.port}/0")
    with pytest.raises(LoupeError, match="cannot reach Redis"):
        connect(f"redis://127.0.0.1:{free_port()}/0", timeout=1.0)
    with pytest.raises(LoupeError, match="not a Redis URL"):
        connect("http://localhost:6379")
    with pytest.raises(LoupeError, match="cannot reach Redis at 10.255.255.1:6379"):
        connect("redis://10.255.255.1:6379/0", timeout=0.5)  # unroutable: the connect times out
    assert time.monotonic() - t0 < 5


@pytest.mark.integration
def test_follow_blocks_no_longer_than_the_socket_timeout(server):
    bus = CheckpointBus(connect(server.url, timeout=1.0), "block")
    bus.ensure_group("probes")
    t0 = time.monotonic()
    assert bus.follow("probes", "w", block_ms=10_000) == []
    assert time.monotonic() - t0 < 1.0
    bus.client.delete(bus.checkpoints_key)


@pytest.mark.integration
def test_wait_for_is_bounded(bus):
    for s in (10, 20):
        bus.publish_checkpoint(ann(s, bus.run_id))
    assert [a.step for a in bus.wait_for(count=2, timeout=1)] == [10, 20]
    assert len(bus.wait_for(step=15, timeout=1)) == 2
    t0 = time.monotonic()
    with pytest.raises(LoupeError, match="waited 0.3 s for step 30 .* found 2"):
        bus.wait_for(step=30, timeout=0.3)
    assert time.monotonic() - t0 < 2
    with pytest.raises(LoupeError, match="exactly one of"):
        bus.wait_for(timeout=1)


@pytest.mark.integration
def test_sigkill_and_restart_loses_no_announcement(tmp_path):
    srv = RedisServer(tmp_path / "redis").start()
    try:
        bus = CheckpointBus(connect(srv.url), "crash")
        bus.ensure_group("probes")
        for s in range(50):
            bus.publish_checkpoint(ann(s, "crash"))
        for d in bus.follow("probes", "w", block_ms=50, count=20):
            bus.ack("probes", d.entry_id)
        pid = srv.pid
        srv.kill()
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        # a new server object over the same directory: same port and password, AOF replayed
        srv2 = RedisServer(tmp_path / "redis").start()
        try:
            assert srv2.port == srv.port and srv2.password == srv.password
            bus2 = CheckpointBus(connect(srv2.url), "crash")
            assert [a.step for _, a in bus2.announcements()] == list(range(50))
            # the group's position and acknowledgements survived too
            assert bus2.pending("probes") == 0
            assert [d.announcement.step for d in bus2.follow("probes", "w", block_ms=50)] == [20]
        finally:
            srv2.stop()
    finally:
        srv.stop()


@pytest.mark.unit
def test_announcement_round_trip_and_rejections():
    a = ann(42)
    assert CheckpointAnnouncement.from_fields(a.to_fields()).step == 42
    with pytest.raises(ValueError, match="unknown schema"):
        CheckpointAnnouncement.from_fields({**a.to_fields(), "schema": "2"})
    fields = a.to_fields()
    del fields["sha256"]
    with pytest.raises(ValueError, match="missing field"):
        CheckpointAnnouncement.from_fields(fields)
    with pytest.raises(ValueError, match="malformed field .*sha256"):
        CheckpointAnnouncement.from_fields({**a.to_fields(), "sha256": "not-a-hash"})
    with pytest.raises(ValueError, match="malformed field"):
        CheckpointAnnouncement.from_fields({**a.to_fields(), "extras": "{oops"})
    extras = CheckpointAnnouncement.from_fields(
        CheckpointAnnouncement(**{**vars(a), "extras": {"lr": 5e-4}}).to_fields()
    )
    assert extras.extras == {"lr": 5e-4} and extras.announced > 0


@pytest.mark.unit
@pytest.mark.parametrize(
    "change, message",
    [
        ({"step": -1}, "non-negative int"),
        ({"sha256": "ABC"}, "64 lowercase hex"),
        ({"uri": ""}, "empty uri"),
    ],
)
def test_bad_announcements_are_refused_before_publishing(change, message):
    with pytest.raises(LoupeError, match=message):
        CheckpointAnnouncement(**{**vars(ann(1)), **change})


@pytest.mark.unit
def test_bus_settings_are_checked():
    with pytest.raises(LoupeError, match="maxlen must be at least 1"):
        CheckpointBus(None, "run", maxlen=0)
    with pytest.raises(LoupeError, match="without spaces"):
        CheckpointBus(None, "my run")
