"""Hand a long-lived process's freed memory back between units of work.

A probe leaves tens of thousands of objects in reference cycles (matplotlib figures, artists,
transforms), which Python frees only at its next full collection; the freed blocks then stay in
glibc's heap. Over days of checkpoints the process's RSS swings up and down by the size of one
probe and its floor creeps. ``release()`` after each unit collects the cycles now and asks glibc
to return its free pages, so the process goes back to the same level every time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import os
import sys

from loupe import interrupt


@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release() -> int:
    """Collect reference cycles and trim the C heap -> the number of objects collected.

    SIGINT/SIGTERM arriving meanwhile are raised after the collection: raised inside one of the
    weakref callbacks the collection runs, the interrupt would be printed as an ignored exception
    and lost.
    """
    with interrupt.deferred():
        collected = gc.collect()
        trim = _malloc_trim()
        if trim is not None:
            trim(0)
    return collected


def memory_mb() -> tuple[float, float] | None:
    """This process's ``(RSS, private memory)`` in MB, or None where /proc is missing.

    Private memory is RSS less its file-backed and shared pages (libraries, mapped files, shared
    frame buffers): what only this process holds.
    """
    try:
        with open("/proc/self/statm") as f:
            fields = f.read().split()
        pages, shared = int(fields[1]), int(fields[2])
    except (OSError, IndexError, ValueError):
        return None
    page = os.sysconf("SC_PAGE_SIZE") / 2**20
    return pages * page, (pages - shared) * page
