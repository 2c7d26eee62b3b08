"""The checkpoint bus and the embedded server, against a real redis-server."""

from __future__ import annotations

import json
import os
import stat
import time

import pytest

from loupe.bus import CheckpointAnnouncement, CheckpointBus, connect
from loupe.errors import LoupeError
from loupe.redis_server import RedisServer, free_port


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
def test_server_is_private(server):
    assert server.host == "127.0.0.1" and server.password and len(server.password) >= 24
    mode = stat.S_IMODE(os.stat(server.info_path).st_mode)
    assert mode == 0o600
    import redis

    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(host=server.host, port=server.port).ping()


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
def test_restarted_follower_gets_its_own_pending_entries_again(bus):
    bus.ensure_group("probes")
    bus.publish_checkpoint(ann(5, bus.run_id))
    first = bus.follow("probes", "w", block_ms=50)
    again = bus.follow("probes", "w", block_ms=50)  # same consumer name after a restart
    assert [d.entry_id for d in again] == [d.entry_id for d in first]


@pytest.mark.integration
def test_maxlen_trims_old_entries(server):
    bus = CheckpointBus(connect(server.url), "trim", maxlen=10)
    for s in range(300):
        bus.publish_checkpoint(ann(s, "trim"))
    length = bus.client.xlen(bus.checkpoints_key)
    assert 10 <= length < 300  # approximate trimming keeps at least maxlen
    bus.client.delete(bus.checkpoints_key)


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
    assert bus.pending("probes") == 1  # the two bad entries were acknowledged


@pytest.mark.integration
def test_mark_done_is_exactly_once(bus):
    assert bus.mark_done("suite", "abc") is True
    assert bus.mark_done("suite", "abc") is False
    assert bus.is_done("suite", "abc") and not bus.is_done("suite", "other")


@pytest.mark.integration
def test_results_stream(bus):
    bus.publish_result({"step": 3, "probe": "suite", "summary": {"a": 1}})
    (entry_id, fields), = bus.read_results()  # fmt: skip
    assert json.loads(fields["probe"]) == "suite" and json.loads(fields["summary"]) == {"a": 1}


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
    assert time.monotonic() - t0 < 5


@pytest.mark.integration
def test_sigkill_and_restart_loses_no_announcement(tmp_path):
    srv = RedisServer(tmp_path / "redis").start()
    try:
        bus = CheckpointBus(connect(srv.url), "crash")
        for s in range(50):
            bus.publish_checkpoint(ann(s, "crash"))
        pid = srv.pid
        srv.kill()
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        # a new server object over the same directory: same port and password, AOF replayed
        srv2 = RedisServer(tmp_path / "redis").start()
        try:
            assert srv2.port == srv.port and srv2.password == srv.password
            steps = [a.step for _, a in CheckpointBus(connect(srv2.url), "crash").announcements()]
            assert steps == list(range(50))
        finally:
            srv2.stop()
    finally:
        srv.stop()


@pytest.mark.integration
def test_stop_leaves_no_process(tmp_path):
    srv = RedisServer(tmp_path / "r").start()
    pid = srv.pid
    srv.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.unit
def test_binding_beyond_loopback_needs_a_password(tmp_path):
    with pytest.raises(LoupeError, match="without a password"):
        RedisServer(tmp_path, bind="0.0.0.0", password="")


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
