"""Argument types and the parser class of the `loupe` command: every bad value is one line.

A value argparse refuses (a non-number, a number out of range, an empty path) ends the command
with ``loupe: error: argument --flag: ...`` and exit status 2, before anything is read or written.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path

from loupe.errors import LoupeError

#: the largest count any option takes (a signed 64-bit integer)
INT64_MAX = 2**63 - 1
#: level and action-sampling seeds are 31-bit in procgen
SEED_MAX = 2**31 - 1


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, ``loupe: error: ...``, and exit status 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # noqa: D102 - argparse's hook
        message = " ".join(message.split())
        print(f"loupe: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


class DefaultsFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to an option's help unless the help already names its default.

    Options whose default is None or False (a switch) say in their help what happens when they
    are left out.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default is None
            or default is False
            or default == argparse.SUPPRESS
            or (isinstance(default, list) and not default)
            or not action.option_strings
        ):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else "%(default)s"
        return f"{text} (default: {shown})"


def int_range(lo: int = 0, hi: int = INT64_MAX) -> Callable[[str], int]:
    """An argparse type: a whole number in ``[lo, hi]``."""

    def parse(text: str) -> int:
        try:
            value = int(text.strip().replace("_", ""))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a whole number from {lo} to {hi}, got {text!r}"
            ) from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be from {lo} to {hi}, got {value}")
        return value

    parse.__name__ = "int"
    parse.bounds = (lo, hi)  # type: ignore[attr-defined]
    return parse


def float_range(
    lo: float = -math.inf, hi: float = math.inf, lo_open: bool = False
) -> Callable[[str], float]:
    """An argparse type: a finite number in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``)."""
    low = f"above {lo:g}" if lo_open else f"at least {lo:g}"
    span = low if hi == math.inf else f"{low} and at most {hi:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number {span}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number {span}, got {text!r}")
        if value < lo or (lo_open and value == lo) or value > hi:
            raise argparse.ArgumentTypeError(f"must be {span}, got {value:g}")
        return value

    parse.__name__ = "float"
    parse.bounds = (lo, hi)  # type: ignore[attr-defined]
    return parse


def path_arg(text: str) -> str:
    """An argparse type: a non-empty path."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; give a file or directory name")
    return text


path_arg.is_path = True  # type: ignore[attr-defined]


#: procgen's level distributions
DISTRIBUTION_MODES = ("easy", "hard", "extreme", "memory", "exploration")


#: device names taken without asking torch (importing it costs a process some 250 MB)
_PLAIN_DEVICE = re.compile(r"(auto|cpu|mps|cuda(:\d+)?)")


def device_arg(text: str) -> str:
    """An argparse type: ``auto`` or a torch device name (cpu, cuda, cuda:N, ...).

    The common names are checked here, so that a small process that only passes the option on
    (`loupe train --supervise`) never imports torch; other names are torch's to judge.
    """
    if _PLAIN_DEVICE.fullmatch(text):
        return text
    import torch

    try:
        torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a device; use auto, cpu, cuda or cuda:N"
        ) from None
    return text


def check_out(path: str | Path, flag: str, kind: str = "directory") -> Path:
    """Refuse an output path loupe cannot create: one whose place is taken by the other kind
    (a file where a directory goes, or the reverse) or whose parent is a file."""
    out = Path(path)
    if kind == "directory" and out.exists() and not out.is_dir():
        raise LoupeError(f"{flag} {out} is a file, not a directory; choose a directory name")
    if kind == "file" and out.is_dir():
        raise LoupeError(
            f"{flag} {out} is a directory; give a file name such as {out}/results.json"
        )
    for parent in out.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise LoupeError(f"{flag} {out}: {parent} is a file, so {out} cannot be created")
            break
    return out
