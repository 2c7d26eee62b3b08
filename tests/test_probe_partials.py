"""Unfinished probe directories: which are removed, and no per-checkpoint pattern caching."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

from probes.suite import _remove_stale_partials


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.unit
def test_only_the_partials_of_dead_processes_and_this_one_are_removed(tmp_path):
    out = tmp_path / "step-1"
    dead = dead_pid()
    names = {
        f".step-1.partial-{dead}": False,  # killed mid-checkpoint
        f".step-1.partial-{os.getpid()}": False,  # this process's own earlier try
        ".step-1.partial-1": True,  # a live process (pid 1) still works on it
        f".step-10.partial-{dead}": True,  # another checkpoint's
        ".step-1.partial-notapid": False,
        "step-1-other": True,
    }
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "frame.png").write_bytes(b"x")
    _remove_stale_partials(out)
    assert {n: (tmp_path / n).exists() for n in names} == names


@pytest.mark.unit
def test_many_checkpoints_add_no_compiled_patterns(tmp_path):
    _remove_stale_partials(tmp_path / "step-0")
    before_re = len(re._cache)
    selector = getattr(pathlib, "_make_selector", None)
    before_sel = selector.cache_info().currsize if selector else 0
    for step in range(1, 60):
        _remove_stale_partials(tmp_path / f"step-{step}")
    assert len(re._cache) == before_re
    if selector:
        assert selector.cache_info().currsize == before_sel
