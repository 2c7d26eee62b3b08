"""`loupe evaluate`: exact level accounting, kill-and-resume, two checkpoints, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from attention import build_policy
from learner.checkpoint import save_checkpoint
from loupe.distributed.evaluate import EvalConfig, evaluate, read_records, wilson
from loupe.errors import LoupeError

#: levels of the evaluations below; the killed Ray run has 4 of them when it is killed
LEVELS = 12
SLOTS, CHUNK = 4, 2


def jumpy_checkpoint(run: Path, bias: float, env: str = "procgen:coinrun") -> Path:
    """An untrained IMPALA policy pushed towards RIGHT+UP so that levels end quickly."""
    torch.manual_seed(0)
    policy = build_policy("impala", (3, 64, 64), 15)
    with torch.no_grad():
        policy.pi.bias[8] = bias
    meta = {"step": 1, "env": env, "env_options": {"distribution_mode": "easy"}}
    return save_checkpoint(run, policy, meta)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    return jumpy_checkpoint(root / "a", 4.0), jumpy_checkpoint(root / "b", 2.0)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "loupe.cli", "evaluate", *args, "--no-progress"]


def per_level(out: Path) -> dict[int, tuple]:
    (records,) = sorted(out.glob("*.jsonl"))
    return {k: (r.outcome, r.cause, r.ret, r.length) for k, r in read_records(records).items()}


@pytest.fixture(scope="module")
def in_process(checkpoints, tmp_path_factory):
    """The first checkpoint evaluated in this process on LEVELS levels: the uninterrupted run that
    the killed and resumed run below is checked against (same slots and chunks)."""
    out = tmp_path_factory.mktemp("in-process") / "ev"
    summary = evaluate(
        EvalConfig(
            checkpoints=[str(checkpoints[0])],
            out=str(out),
            levels=LEVELS,
            workers=0,
            slots=SLOTS,
            chunk=CHUNK,
        ),  # fmt: skip
        progress=False,
    )
    return out, summary


@pytest.mark.integration
def test_in_process_counts_and_causes(in_process):
    out, summary = in_process
    (stats,) = summary["checkpoints"].values()
    counts = {k: v["count"] for k, v in stats["by_category"].items()}
    assert sum(counts.values()) == LEVELS == stats["levels"]
    levels = per_level(out)
    assert sorted(levels) == list(range(LEVELS))
    for outcome, cause, ret, _ in levels.values():
        if outcome == "failure":
            assert cause in ("saw", "enemy_left", "enemy_right", "lava", "multiple")
        if outcome == "complete":
            assert ret == 10.0
    assert (out / "failure_causes.png").stat().st_size > 1000
    assert json.loads((out / "results.json").read_text())["config"]["levels"] == LEVELS


@pytest.mark.integration
def test_ray_run_killed_and_resumed_matches_uninterrupted(checkpoints, in_process, tmp_path):
    """`loupe evaluate` on Ray (two evaluators) killed with SIGKILL after a few records, then
    resumed by the same command: only the missing levels run, and every level's record equals the
    uninterrupted in-process evaluation's. The resume plays in-process (--workers 0): a resume on
    Ray of an interrupted `loupe evaluate` is
    test_restarted_server_is_reached_with_wait_for_ready_and_resumes in test_service.py, also
    checked there against an uninterrupted in-process evaluation."""
    ckpt = str(checkpoints[0])
    base = ["--checkpoint", ckpt, "--levels", str(LEVELS), "--slots", str(SLOTS),
            "--chunk", str(CHUNK)]  # fmt: skip
    cut = tmp_path / "cut"
    proc = subprocess.Popen(cli(*base, "--workers", "2", "--out", str(cut)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 300
    records = None
    while time.monotonic() < deadline:
        found = list(cut.glob("*.jsonl"))
        if found and len(found[0].read_text().splitlines()) >= 4:
            records = found[0]
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert records is not None, "no records written before the deadline"
    partial = len(read_records(records))
    assert 0 < partial < LEVELS
    resumed = subprocess.run(cli(*base, "--workers", "0", "--out", str(cut)),
                             capture_output=True, text=True, timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert per_level(cut) == per_level(in_process[0])
    summary = json.loads((cut / "results.json").read_text())
    (stats,) = summary["checkpoints"].values()
    assert stats["levels_this_run"] == LEVELS - partial


@pytest.mark.integration
def test_two_checkpoints_side_by_side(checkpoints, tmp_path):
    out = tmp_path / "both"
    summary = evaluate(
        EvalConfig(
            checkpoints=[str(c) for c in checkpoints],
            out=str(out),
            levels=4,
            workers=0,
            slots=8,
            causes=False,
        ),  # fmt: skip
        progress=False,
    )
    assert len(summary["checkpoints"]) == 2
    for stats in summary["checkpoints"].values():
        assert sum(v["count"] for v in stats["by_category"].values()) == 4
    assert len(list(out.glob("*.jsonl"))) == 2


@pytest.mark.integration
def test_bad_input(checkpoints, tmp_path):
    with pytest.raises(LoupeError, match="--levels must be positive"):
        EvalConfig(checkpoints=["x"], out=str(tmp_path), levels=0)
    out = tmp_path / "ev"
    cfg = dict(checkpoints=[str(checkpoints[0])], levels=2, workers=0, slots=2)
    evaluate(EvalConfig(out=str(out), **cfg), progress=False)
    with pytest.raises(
        LoupeError,
        match="holds another evaluation: it has 2 levels per checkpoint, more than --levels 1",
    ):
        evaluate(EvalConfig(out=str(out), **{**cfg, "levels": 1}), progress=False)
    atari = save_checkpoint(tmp_path / "atari", build_policy("nature", (4, 84, 84), 4),
                            {"step": 1, "env": "ALE/Pong-v5"})  # fmt: skip
    with pytest.raises(LoupeError, match="evaluation plays procgen levels"):
        evaluate(EvalConfig(checkpoints=[str(atari)], out=str(tmp_path / "a"), levels=2,
                            workers=0), progress=False)  # fmt: skip
    star = jumpy_checkpoint(tmp_path / "star", 1.0, env="procgen:starpilot")
    with pytest.raises(LoupeError, match="CoinRun only"):
        evaluate(EvalConfig(checkpoints=[str(star)], out=str(tmp_path / "s"), levels=2,
                            workers=0), progress=False)  # fmt: skip


@pytest.mark.unit
def test_wilson_interval():
    lo, hi = wilson(37, 10_000)
    assert lo < 0.0037 < hi and hi - lo < 0.003
    assert wilson(0, 10) == (0.0, pytest.approx(0.2775, abs=1e-3))


@pytest.mark.integration
def test_article_action_policy_is_mapped_to_procgen_actions(tmp_path):
    """A 9-action policy always choosing index 4 (R+U) must play procgen's action 8 (RIGHT+UP)."""
    from actors.evaluator import EvaluatorConfig, LevelEvaluator

    torch.manual_seed(0)
    policy = build_policy("impala", (3, 64, 64), 9)
    with torch.no_grad():
        policy.pi.bias[4] = 50.0
    weights = {k: v.numpy() for k, v in policy.state_dict().items()}
    played: list[int] = []
    cfg = EvaluatorConfig(env_options={"distribution_mode": "easy"}, slots=2, causes=False,
                          action_set="article")  # fmt: skip
    evaluator = LevelEvaluator(policy.spec, weights, cfg)
    original = evaluator._step

    def spy(slot, action):
        played.append(int(evaluator.action_map[action]))
        return original(slot, action)

    evaluator._step = spy
    results = evaluator.evaluate([0, 1])
    assert len(results) == 2 and set(played) == {8}
    with pytest.raises(LoupeError, match="action_set"):
        EvaluatorConfig(action_set="nine")
