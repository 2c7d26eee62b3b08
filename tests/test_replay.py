"""Failed levels replayed from their level seed and recorded actions: the evaluator's action
records, a real replay of real failed episodes of the shipped agent, and the explorer's replayed
trajectory pages (data; the pages in Chromium are in test_explorer.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from loupe.errors import LoupeError

ROOT = Path(__file__).resolve().parents[1]
AGENT = ROOT / "agents" / "coinrun-interpretable"
#: levels of the shipped agent's evaluation in these tests (a few of them fail, into saws)
LEVELS = 8


@pytest.mark.unit
def test_actions_round_trip_as_base64_bytes():
    from actors.evaluator import decode_actions, encode_actions

    actions = [0, 14, 7, 255, 3]
    text = encode_actions(actions)
    assert isinstance(text, str) and len(text) == 8  # 5 bytes -> 8 base64 characters
    assert decode_actions(text).tolist() == actions
    assert decode_actions(encode_actions([])).tolist() == []
    with pytest.raises(ValueError):
        encode_actions([256])
    with pytest.raises(LoupeError, match="base64"):
        decode_actions("not base64!")


@pytest.mark.unit
def test_replay_choices_take_the_first_levels_of_each_cause_and_the_levels_asked_for():
    from loupe.explorer.bundle import replay_choices

    data = {"checkpoints": [
        {"label": "a", "failed_levels": {"saw": [3, 5, 9], "timeout": [4]}},
        {"label": "b", "failed_levels": {"lava": [5, 6]}},
        {"label": "c"},
    ]}  # fmt: skip
    assert replay_choices(data, 1) == [("a", 3), ("a", 4), ("b", 5)]
    assert replay_choices(data, 0, [9, 6, 7]) == [("a", 9), ("b", 6)]
    assert replay_choices(data, 0) == []


def shipped_checkpoint() -> Path:
    from learner.checkpoint import find_checkpoint

    return Path(find_checkpoint(str(AGENT)))


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> dict:
    """The shipped agent evaluated on levels 0..LEVELS-1 in-process, as `loupe evaluate` does."""
    from loupe.distributed.evaluate import EvalConfig, evaluate, read_records

    out = tmp_path_factory.mktemp("replay") / "eval"
    ckpt = shipped_checkpoint()
    cfg = EvalConfig(checkpoints=[str(ckpt)], out=str(out), levels=LEVELS, workers=0, slots=4,
                     chunk=4)  # fmt: skip
    summary = evaluate(cfg, progress=False)
    (label,) = summary["checkpoints"]
    records = read_records(out / f"{label}.jsonl")
    failed = [r for r in records.values() if r.outcome != "complete"]
    assert failed, f"the shipped agent failed none of {LEVELS} levels; evaluate more levels here"
    return {"out": out, "label": label, "records": records, "failed": failed, "ckpt": ckpt}


@pytest.mark.integration
def test_failed_levels_record_their_actions_and_completed_ones_do_not(evaluated):
    from actors.evaluator import decode_actions

    for r in evaluated["records"].values():
        if r.outcome == "complete":
            assert r.actions is None
        else:
            actions = decode_actions(r.actions)
            assert len(actions) == r.length and actions.max() < 15
    marker = json.loads((evaluated["out"] / "eval.json").read_text())
    assert Path(marker["checkpoints"][0]["path"]) == evaluated["ckpt"].resolve()


@pytest.mark.integration
def test_replay_of_a_real_failed_episode_ends_the_same_way(evaluated):
    """Each failed level played again from its seed and recorded actions (a fresh procgen env,
    its own random rand_seed) ends with the same outcome, cause, length and return; and the
    replayed frames are the ones the evaluator saw: the policy, sampling with the evaluator's
    per-level generator on them, picks the recorded actions again."""
    import torch

    from actors.evaluator import decode_actions, replay_level
    from learner.checkpoint import load_checkpoint
    from loupe.explorer.bundle import replay_target

    target = replay_target(evaluated["out"], evaluated["label"])
    policy, _ = load_checkpoint(evaluated["ckpt"])
    policy.eval()
    for rec in evaluated["failed"]:
        rp = replay_level(target.evaluator, rec.level, rec.actions)
        got = rp.result
        assert (got.outcome, got.cause, got.length) == (rec.outcome, rec.cause, rec.length)
        assert got.ret == pytest.approx(rec.ret)
        assert rp.obs.shape == (rec.length, 3, 64, 64) and rp.obs.dtype == np.uint8
        rng = np.random.default_rng([target.evaluator.seed, rec.level])
        with torch.no_grad():
            probs = torch.softmax(policy(torch.from_numpy(rp.obs)).logits.double(), -1).numpy()
        u = np.array([rng.random() for _ in range(rec.length)])
        again = np.minimum((np.cumsum(probs, 1) < u[:, None]).sum(1), probs.shape[1] - 1)
        assert (again == decode_actions(rec.actions)).mean() >= 0.99
    # fewer actions than recorded: the replay says the episode did not end
    rec = evaluated["failed"][0]
    short = decode_actions(rec.actions)[:-3]
    rp = replay_level(target.evaluator, rec.level, short)
    assert rp.result.outcome is None and rp.result.length == rec.length - 3


@pytest.mark.integration
def test_explorer_replays_a_failed_level_into_a_trajectory_page(evaluated, tmp_path):
    from loupe.explorer import bundle

    out = tmp_path / "view"
    cfg = bundle.BundleConfig(ig_steps=4, smoothgrad_copies=2, perturbation_stride=16)
    data = bundle.build_eval_bundle(evaluated["out"], out, cfg, replays=1)
    (row,) = data["checkpoints"]
    rec = evaluated["failed"][0]
    first = {cat: levels[0] for cat, levels in row["failed_levels"].items()}
    assert sorted(int(k) for k in row["replays"]) == sorted(first.values())
    assert row["without_actions"] == 0
    key = row["replays"][str(min(first.values()))]
    meta = json.loads((out / "data" / key / "meta.json").read_text())
    rec = evaluated["records"][meta["replay"]["level"]]
    assert meta["replay"]["match"] is True
    assert meta["replay"]["replayed"]["length"] == rec.length == meta["frames"]
    assert meta["trajectories"] == 1 and meta["targets"][0] == "value"
    assert meta["nmf_source"] == "trajectories"  # the shipped agent's run has no probe
    traj = json.loads((out / "data" / key / "traj-0.json").read_text())
    assert traj["level_seed"] == [rec.level] * rec.length and traj["done"][-1] == 1
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    assert {c["key"] for c in manifest["checkpoints"]} == set(row["replays"].values())
    # a completed level and a level never played are refused with one line
    done = next(r.level for r in evaluated["records"].values() if r.outcome == "complete")
    with pytest.raises(LoupeError, match="was completed"):
        bundle.build_replay(out, evaluated["out"], evaluated["label"], done, cfg)
    with pytest.raises(LoupeError, match="no result"):
        bundle.build_replay(out, evaluated["out"], evaluated["label"], 10**6, cfg)


@pytest.mark.integration
def test_a_moved_or_changed_checkpoint_is_named_not_replayed(evaluated, tmp_path):
    import shutil

    from loupe.explorer import bundle

    moved = tmp_path / "eval"
    shutil.copytree(evaluated["out"], moved)
    marker = json.loads((moved / "eval.json").read_text())
    marker["checkpoints"][0]["path"] = str(tmp_path / "gone" / "ckpt-000000000001.json")
    (moved / "eval.json").write_text(json.dumps(marker))
    level = evaluated["failed"][0].level
    with pytest.raises(LoupeError, match="is not there any more"):
        bundle.build_replay(tmp_path / "v", moved, evaluated["label"], level)
    marker["checkpoints"][0]["path"] = str(evaluated["ckpt"])
    marker["checkpoints"][0]["sha256"] = "0" * 64
    (moved / "eval.json").write_text(json.dumps(marker))
    with pytest.raises(LoupeError, match="sha256 differs"):
        bundle.build_replay(tmp_path / "v", moved, evaluated["label"], level)
    # records from before actions were recorded
    records = moved / f"{evaluated['label']}.jsonl"
    lines = [json.loads(line) for line in records.read_text().splitlines()]
    records.write_text("".join(json.dumps({**r, "actions": None}) + "\n" for r in lines))
    with pytest.raises(LoupeError, match="without recording its actions"):
        bundle.build_replay(tmp_path / "v", moved, evaluated["label"], level)
    assert not (tmp_path / "v").exists()


@pytest.mark.integration
def test_view_eval_export_replays_by_default_and_refuses_bad_replay_options(evaluated, tmp_path):
    out = tmp_path / "export"

    def start(*args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "loupe.cli", "view", *args], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip

    # the refusals run while the export does (each is its own command)
    refusals = [(start(*args), says) for args, says in [
        (["--probe", str(out), "--replays", "2"], "use --eval"),
        (["--eval", str(evaluated["out"]), "--replays", "-1"], "--replays")]]  # fmt: skip
    proc = start("--eval", str(evaluated["out"]), "--export", str(out), "--ig-steps", "4",
                 "--no-embedding", "--target", "value",
                 "--replay", str(evaluated["failed"][-1].level))  # fmt: skip
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    data = json.loads((out / "data" / "eval.json").read_text())
    assert str(evaluated["failed"][-1].level) in data["checkpoints"][0]["replays"]
    for refused, says in refusals:
        _, err = refused.communicate(timeout=600)
        assert refused.returncode == 2 and err.startswith("loupe: error: ")
        assert says in err and "Traceback" not in err
