"""Names and clean-up of the shared-memory files that hold rollout frames (``learner.rollout.
SharedObs``), without numpy or torch: the supervisor uses it after a SIGKILLed learner."""

from __future__ import annotations

import contextlib
import os

#: file-name prefix of ``SharedObs`` buffers; the owner's pid follows
BUFFER_PREFIX = "loupe-obs-"
#: where they live
SHM_DIR = "/dev/shm"


def unlink_quietly(path: str) -> None:
    """Remove ``path``; one already gone is fine."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def remove_stale_buffers(directory: str = SHM_DIR, pid: int | None = None) -> list[str]:
    """Remove the buffer files of ``SharedObs`` pools whose process is gone -> those removed.

    Files are named ``loupe-obs-<pid>-<id>-<n>``; a SIGKILLed learner cannot remove its own,
    and /dev/shm is memory. ``pid``: remove that process's files (the supervisor, after its
    child's death); None: those of every process that no longer runs.
    """
    removed = []
    with contextlib.suppress(OSError):
        for name in os.listdir(directory):
            if not name.startswith(BUFFER_PREFIX):
                continue
            owner = name[len(BUFFER_PREFIX) :].split("-", 1)[0]
            if not owner.isdigit():
                continue
            if (int(owner) == pid) if pid is not None else not _alive(int(owner)):
                path = os.path.join(directory, name)
                unlink_quietly(path)
                removed.append(path)
    return sorted(removed)
