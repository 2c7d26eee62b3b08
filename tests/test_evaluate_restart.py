"""An evaluator actor killed mid-evaluation is replaced by loupe and its levels are played again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def descendants(pid: int) -> list[int]:
    """Processes below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


#: levels 0..5 of this untrained policy last 1000, 665, 742, 151, 1000 and 430 steps (its actions
#: hardly depend on its weights): when the first level ends (742 steps, the second evaluator's first
#: chunk), both evaluators still hold chunks of hundreds of steps, so the one killed loses one
LEVELS = 6


@pytest.mark.integration
def test_killed_evaluator_is_replaced_and_every_level_is_played(tmp_path):
    import torch

    from attention import build_policy
    from learner.checkpoint import save_checkpoint

    torch.manual_seed(0)
    policy = build_policy("nature", (3, 64, 64), 15)
    meta = {"step": 32, "run_id": "run", "env": "procgen:coinrun", "env_options": {}}
    ckpt = save_checkpoint(tmp_path / "run", policy, meta)
    out = tmp_path / "eval"
    proc = subprocess.Popen(
        [sys.executable, "-m", "loupe.cli", "evaluate", "--checkpoint", str(ckpt), "--levels",
         str(LEVELS), "--workers", "2", "--slots", "1", "--chunk", "1", "--no-causes",
         "--no-progress", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        records = out / f"{ckpt.stem}-{meta_sha(ckpt)}.jsonl"
        deadline = time.time() + 240
        while time.time() < deadline and not (records.exists() and records.read_text().strip()):
            time.sleep(0.5)
        assert records.exists(), "no level finished"
        victims = [p for p in descendants(proc.pid) if "ray::LevelEvaluator" in cmdline(p)]
        assert victims, "no evaluator process found"
        os.kill(victims[0], signal.SIGKILL)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err
    levels = [json.loads(line)["level"] for line in records.read_text().splitlines()]
    assert sorted(set(levels)) == list(range(LEVELS))
    assert "lost a chunk" in err and "core_worker" not in err and "Traceback" not in err


def meta_sha(ckpt: Path) -> str:
    return json.loads(ckpt.read_text())["sha256"][:8]
