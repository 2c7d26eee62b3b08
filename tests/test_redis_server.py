"""The embedded redis-server: private, persistent, restartable, and never left running."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from loupe.bus.redis_server import RedisServer, find_redis_server, free_port, saved_url
from loupe.errors import LoupeError


def gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for a parent that is not us counts as exited)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return gone(pid)


@pytest.mark.integration
def test_private_server_with_saved_password(tmp_path):
    with RedisServer(tmp_path / "redis") as srv:
        assert srv.host == "127.0.0.1" and len(srv.password) >= 24
        assert srv.url == f"redis://:{srv.password}@127.0.0.1:{srv.port}/0"
        assert stat.S_IMODE(os.stat(srv.info_path).st_mode) == 0o600
        info = json.loads(srv.info_path.read_text())
        assert info == {"host": "127.0.0.1", "port": srv.port, "password": srv.password}
        assert saved_url(srv.data_dir) == srv.url
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(host=srv.host, port=srv.port, retry=Retry(NoBackoff(), 0)).ping()
        client = redis.Redis.from_url(srv.url, decode_responses=True)
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("appendfsync") == {"appendfsync": "always"}
        assert client.config_get("save") == {"save": ""}
        assert client.config_get("bind") == {"bind": "127.0.0.1"}
        client.close()
        pid = srv.pid
    assert gone(pid)
    # SHUTDOWN, not a signal, ended it
    assert "User requested shutdown" in srv.log_path.read_text()


@pytest.mark.integration
def test_kill_then_restart_keeps_port_password_and_data(tmp_path):
    srv = RedisServer(tmp_path / "redis").start()
    try:
        port, password, pid = srv.port, srv.password, srv.pid
        redis.Redis.from_url(srv.url).set("k", "v")
        srv.kill()
        assert gone(pid) and not srv.alive()
        srv.restart()
        assert (srv.port, srv.password) == (port, password) and srv.pid != pid
        assert redis.Redis.from_url(srv.url).get("k") == b"v"
    finally:
        srv.stop()
    assert gone(srv.pid)


@pytest.mark.integration
def test_never_two_servers_over_one_data_dir(tmp_path):
    with RedisServer(tmp_path / "redis") as srv:
        with pytest.raises(LoupeError, match="already runs on"):
            RedisServer(tmp_path / "redis", take_over=False).start()
        assert srv.alive()
        redis.Redis.from_url(srv.url).set("k", "v")
        # the default takes over a server left running (by a killed learner, say): it is shut
        # down cleanly and the new one replays its AOF on the same port
        with RedisServer(tmp_path / "redis") as heir:
            srv.process.wait(5)
            assert heir.port == srv.port and heir.pid != srv.pid
            assert redis.Redis.from_url(heir.url).get("k") == b"v"


@pytest.mark.integration
def test_saved_port_taken_by_someone_else_moves(tmp_path):
    with RedisServer(tmp_path / "redis") as srv:
        port = srv.port
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        with RedisServer(tmp_path / "redis") as again:
            assert again.port != port
            assert json.loads(again.info_path.read_text())["port"] == again.port


@pytest.mark.integration
def test_failed_start_reports_the_log_tail_quickly(tmp_path):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        t0 = time.monotonic()
        srv = RedisServer(tmp_path / "redis", port=port, start_timeout=5.0)
        with pytest.raises(LoupeError, match="exited: .*(Address already in use|bind)") as err:
            srv.start()
        assert time.monotonic() - t0 < 5.0
        assert "\n" not in str(err.value) and str(srv.log_path) in str(err.value)
        assert gone(srv.pid)


@pytest.mark.integration
def test_server_dies_with_the_process_that_forgot_to_stop_it(tmp_path):
    code = (
        "import sys; from loupe.bus.redis_server import RedisServer; "
        "print(RedisServer(sys.argv[1]).start().pid, flush=True)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "redis")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert wait_gone(int(out.stdout.split()[-1]))


@pytest.mark.integration
def test_server_orphaned_by_a_killed_process_is_taken_over(tmp_path):
    code = (
        "import os, signal, sys; from loupe.bus.redis_server import RedisServer; "
        "print(RedisServer(sys.argv[1]).start().pid, flush=True); os.kill(os.getpid(), 9)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "redis")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    orphan = int(out.stdout.split()[-1])
    assert out.returncode == -9 and not gone(orphan)  # SIGKILL: no atexit, the server lives on
    with RedisServer(tmp_path / "redis") as heir:
        assert heir.alive() and wait_gone(orphan)


@pytest.mark.integration
def test_append_only_file_stays_bounded(tmp_path):
    """The AOF is compacted whenever it passes aof_rewrite_min_mb (and twice its size after the last
    rewrite): 50 overwrites of one 100 kB value (5 MB of commands, 100 kB of data) never leave it
    above 1 MB once the server's cron has had its turn.

    Each write waits for a rewrite it made due, so no write lands in a rewrite's buffer: those are
    appended to the new file whole, and how many there are depends on how fast the machine forks."""
    with RedisServer(tmp_path, appendfsync="no", aof_rewrite_min_mb=1) as srv:
        client = redis.Redis(host=srv.host, port=srv.port, password=srv.password)
        assert client.config_get("auto-aof-rewrite-min-size") == {
            "auto-aof-rewrite-min-size": str(1 << 20)
        }
        assert client.config_get("auto-aof-rewrite-percentage")["auto-aof-rewrite-percentage"] == (
            "100"
        )
        value = os.urandom(100_000)
        rewrites = 0
        for _ in range(50):
            client.set("big", value)
            aof = client.info("persistence")
            if aof["aof_current_size"] < 1 << 20:
                continue
            # the cron (10 Hz) starts the rewrite; a loaded machine forks late
            deadline = time.monotonic() + 30
            while aof["aof_current_size"] >= 1 << 20 or aof["aof_rewrite_in_progress"]:
                assert time.monotonic() < deadline, aof
                time.sleep(0.05)
                aof = client.info("persistence")
            assert aof["aof_last_bgrewrite_status"] == "ok"
            rewrites += 1
        assert rewrites >= 3  # 5 MB of commands past a 1 MB threshold, each rewrite back to ~100 kB
        assert 0 < client.info("persistence")["aof_base_size"] < 1 << 20
        assert (tmp_path / "appendonly.aof").stat().st_size < 1 << 20
        client.close()
        assert client.get("big") == value  # nothing lost by the rewrites


@pytest.mark.unit
def test_binding_beyond_loopback_needs_a_password(tmp_path):
    with pytest.raises(LoupeError, match="refusing to bind Redis to 0.0.0.0 without a password"):
        RedisServer(tmp_path, bind="0.0.0.0", password="")
    srv = RedisServer(tmp_path, bind="0.0.0.0")  # a generated password is fine
    assert srv.password and srv.host == "127.0.0.1"
    assert RedisServer(tmp_path / "open", password="").url.startswith("redis://127.0.0.1:")


@pytest.mark.unit
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"port": 70000}, "not in 1..65535"),
        ({"start_timeout": 0}, "start_timeout must be positive"),
        ({"appendfsync": "sometimes"}, "appendfsync 'sometimes' is not one of"),
        ({"bind": ""}, "bind address is empty"),
        ({"aof_rewrite_min_mb": 0}, "aof_rewrite_min_mb must be at least 1"),
    ],
)
def test_bad_settings_are_one_line_errors(tmp_path, kwargs, message):
    with pytest.raises(LoupeError, match=message):
        RedisServer(tmp_path, **kwargs)


@pytest.mark.unit
def test_find_redis_server(monkeypatch, tmp_path):
    assert os.access(find_redis_server(), os.X_OK)
    monkeypatch.setenv("LOUPE_REDIS_SERVER", str(tmp_path / "nope"))
    with pytest.raises(LoupeError, match="LOUPE_REDIS_SERVER=.* is not a file"):
        find_redis_server()


@pytest.mark.unit
def test_free_port_is_bindable():
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
    assert 0 < port < 65536
