"""SIGINT and SIGTERM take one path: both raise ``Interrupted`` (a KeyboardInterrupt) in the main
thread, so that every component's ``finally`` and context manager runs: the trainer writes its
checkpoint, the private redis-server and a local Ray that loupe started are stopped.

    with interrupt.handlers():          # the `loupe` command installs them for its whole run
        with interrupt.deferred():      # a section that must not be torn (a PPO update)
            ...                         # a signal here is raised when the section ends

A second signal during a deferred section is raised at once (the user insists). ``resume_hint``
is the command that continues the interrupted work; the CLI prints it.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

#: the signals handled, and the exit status of a command they stop (128 + the signal number)
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """Raised in the main thread for SIGINT or SIGTERM."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


#: depth of nested deferred() sections, and the signal that arrived inside one
_deferring = 0
_pending: int | None = None
#: how many handlers() contexts are active
_installed = 0
#: the command that continues the interrupted work (set by the command that runs)
resume_hint: str | None = None


def _handler(signum, frame) -> None:
    global _pending
    if _deferring and _pending is None:
        _pending = signum
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def handlers() -> Iterator[None]:
    """Install the handlers for SIGINT and SIGTERM (main thread only), restore the old ones after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    global _installed
    # a signal the process was started to ignore (SIGINT of a background job) stays ignored
    old = {s: signal.signal(s, _handler) for s in SIGNALS if signal.getsignal(s) != signal.SIG_IGN}
    _installed += 1
    try:
        yield
    finally:
        _installed -= 1
        for s, h in old.items():
            signal.signal(s, h)


def rearm() -> None:
    """Install the handlers again where a library replaced them (``ray.init`` puts its own
    SIGTERM handler in place, which aborts the process); nothing when ``handlers()`` is not active."""
    if _installed and threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            if signal.getsignal(s) != signal.SIG_IGN:
                signal.signal(s, _handler)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A signal arriving inside is raised when the section ends (a second one at once)."""
    global _deferring, _pending
    _deferring += 1
    try:
        yield
    except BaseException:
        _deferring -= 1
        if not _deferring:
            _pending = None  # the exception in flight ends the work anyway
        raise
    _deferring -= 1
    if not _deferring and _pending is not None:
        signum, _pending = _pending, None
        raise Interrupted(signum)


def pending() -> int | None:
    """The signal waiting for the end of the current deferred section, if any."""
    return _pending


def reset() -> None:
    """Forget a pending signal and the resume hint (tests, a new command in one process)."""
    global _pending, resume_hint, _deferring
    _pending, resume_hint, _deferring = None, None, 0
