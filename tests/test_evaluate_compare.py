"""`loupe evaluate` output: checkpoint names, tests against the first checkpoint, extension."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attention import build_policy
from learner.checkpoint import save_checkpoint
from loupe.distributed.evaluate import (
    EvalConfig,
    Target,
    compare_to_first,
    edit_name,
    evaluate,
    fisher_p,
    format_table,
    identity_difference,
    name_targets,
    read_records,
)
from loupe.errors import LoupeError


# -- statistics ------------------------------------------------------------------------------------
def log_comb(n: int, r: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(r + 1) - math.lgamma(n - r + 1)


def fisher_closed_form(k1: int, n1: int, k2: int, n2: int) -> float:
    """Two-sided Fisher's exact p from its definition: the hypergeometric probabilities of the
    tables with the observed margins that are no more likely than the observed one (ties within
    a relative 1e-7, as scipy counts them), summed."""
    k, n = k1 + k2, n1 + n2

    def log_prob(a: int) -> float:  # a of the k events fall in the first sample
        return log_comb(k, a) + log_comb(n - k, n1 - a) - log_comb(n, n1)

    observed = log_prob(k1)
    probs = [log_prob(a) for a in range(max(0, k - n2), min(k, n1) + 1)]
    return math.fsum(math.exp(lp) for lp in probs if lp <= observed + math.log1p(1e-7))


@pytest.mark.unit
@pytest.mark.parametrize(
    "k1, n1, k2, n2",
    [
        (37, 10_000, 1276, 10_000),  # the article: saw failures, original vs buzzsaw-blind edit
        (16, 10_000, 469, 10_000),  # enemy moving left, original vs left-enemy-blind edit
        (16, 10_000, 16, 10_000),  # no change
        (12, 10_000, 8, 10_000),
        (0, 50, 4, 50),
        (3, 7, 0, 9),
        (0, 10, 0, 10),
        (5, 5, 0, 5),
        (9120, 10_000, 8511, 10_000),  # completion rates
    ],
)
def test_fisher_p_matches_the_closed_form(k1, n1, k2, n2):
    p = fisher_p(k1, n1, k2, n2)
    assert p == pytest.approx(fisher_closed_form(k1, n1, k2, n2), rel=1e-8, abs=1e-300)
    assert p == pytest.approx(fisher_p(k2, n2, k1, n1), rel=1e-12)  # symmetric
    assert 0.0 <= p <= 1.0


@pytest.mark.unit
def test_fisher_p_known_values():
    # the textbook tea-tasting table [[3, 1], [1, 3]]: p = 34/70
    assert fisher_p(3, 4, 1, 4) == pytest.approx(34 / 70, rel=1e-12)
    assert fisher_p(0, 10, 0, 10) == 1.0
    assert fisher_p(37, 10_000, 1276, 10_000) < 1e-200


def stats(levels: int, **counts: int) -> dict:
    return {
        "levels": levels,
        "by_category": {
            c: {"count": k, "percent": 100 * k / levels, "ci95": [0, 0]} for c, k in counts.items()
        },  # fmt: skip
    }


@pytest.mark.unit
def test_compare_to_first_writes_p_values_and_differences():
    summary = {
        "config": {"levels": 10_000, "start_level": 100},
        "checkpoints": {
            "a": stats(10_000, complete=9900, saw=37, enemy_left=16, multiple=47),
            "b": stats(10_000, complete=8600, saw=1276, enemy_left=16, multiple=108, failure=1),
        },
    }
    tests = compare_to_first(summary)
    b = summary["checkpoints"]["b"]["by_category"]
    assert "vs_first" not in summary["checkpoints"]["a"]["by_category"]["saw"]
    assert b["saw"]["vs_first"]["p"] == fisher_p(1276, 10_000, 37, 10_000)
    assert b["saw"]["vs_first"]["diff_pp"] == pytest.approx(12.39)
    assert b["enemy_left"]["vs_first"]["p"] == 1.0
    assert b["failure"]["vs_first"]["p"] == fisher_p(1, 10_000, 0, 10_000)  # absent from a: 0
    assert tests["reference"] == "a" and "Fisher" in tests["method"]
    assert tests["p"]["b"]["complete"] == fisher_p(8600, 10_000, 9900, 10_000)
    assert set(tests["p"]["b"]) == {"complete", "saw", "enemy_left", "multiple", "failure"}
    summary["checkpoints"]["a"]["label"] = "original"
    summary["checkpoints"]["b"]["label"] = "nmf:3 of 2b projected out of original"
    table = format_table(summary)
    assert "A  original  (a)" in table and "B  nmf:3 of 2b projected out of original  (b)" in table
    (saw_row,) = [line for line in table.splitlines() if line.startswith("saw ")]
    assert f"p={fisher_p(1276, 10_000, 37, 10_000):.2g}" in saw_row
    assert "levels 100..10099" in table


# -- names -----------------------------------------------------------------------------------------
def target(sha: str, path: str, step: int = 2_000_000, run_id: str = "coinrun", edit=None):
    return Target(path=path, label=f"ckpt-{sha}", sha256=sha * 8, spec={}, weights={},
                  evaluator=None, meta={"run_id": run_id, "step": step, "edit": edit})  # fmt: skip


def edit(parent: str, source: str = "nmf:3", layer: str = "2b", parent_edit=None) -> dict:
    e = {"parent_sha256": parent * 8, "layer": layer, "direction_source": source,
         "parent_step": 2_000_000}  # fmt: skip
    if parent_edit:
        e["parent_edit"] = parent_edit
    return e


@pytest.mark.unit
def test_names_from_labels_provenance_and_run(tmp_path):
    p = {k: str(tmp_path / f"{k}.json") for k in "abcdef"}
    targets = [
        target("a", p["a"]),
        target("b", p["b"], edit=edit("a")),  # parent evaluated: called by its name
        target("c", p["c"], edit=edit("x", source="/tmp/dirs/v.npy", layer="s2")),  # parent not
        target("d", p["d"], edit=edit("b", source="nmf:1", parent_edit=edit("a"))),  # edit of b
        target("e", p["e"], edit=edit("y", source="nmf:0", parent_edit=edit("z", "nmf:5"))),
    ]
    name_targets(targets, {p["a"]: "original"})
    names = [t.name for t in targets]
    assert names == [
        "original",
        "nmf:3 of 2b projected out of original",
        "v.npy of s2 projected out of coinrun step 2000000",
        "nmf:1 of 2b projected out of nmf:3 of 2b projected out of original",
        "nmf:0 of 2b projected out of nmf:5 of 2b projected out of coinrun step 2000000",
    ]
    # an edit listed before its parent still names it; coinciding names get the sha256 prefix
    later = [target("b", p["b"], edit=edit("a")), target("a", p["a"]), target("f", p["f"])]
    name_targets(later, {})
    assert later[0].name == "nmf:3 of 2b projected out of coinrun step 2000000"
    assert later[1].name == "coinrun step 2000000 [aaaaaaaa]"
    assert later[2].name == "coinrun step 2000000 [ffffffff]"
    assert edit_name(edit("q"), "run", {"q" * 8: "base"}) == "nmf:3 of 2b projected out of base"


@pytest.mark.unit
def test_label_config_is_checked(tmp_path):
    a, b = str(tmp_path / "a.json"), str(tmp_path / "b.json")
    EvalConfig(checkpoints=[a, b], out="o", labels={a: "x", str(tmp_path / "b.safetensors"): "y"})
    with pytest.raises(LoupeError, match="is not one of the --checkpoint paths"):
        EvalConfig(checkpoints=[a], out="o", labels={b: "x"})
    with pytest.raises(LoupeError, match="the same --label name"):
        EvalConfig(checkpoints=[a, b], out="o", labels={a: "x", b: "x"})
    with pytest.raises(LoupeError, match="empty name"):
        EvalConfig(checkpoints=[a], out="o", labels={a: " "})


# -- what an output directory holds ----------------------------------------------------------------
def ident(**change) -> dict:
    base = {
        "schema": 1,
        "checkpoints": [{"label": "ckpt-a", "sha256": "a" * 64}, {"label": "ckpt-b", "sha256": "b" * 64}],
        "levels": 1000, "start_level": 0, "seed": 0, "causes": True,
        "env_options": [{"distribution_mode": "hard"}, {"distribution_mode": "hard"}],
    }  # fmt: skip
    return {**base, **change}


@pytest.mark.unit
def test_identity_difference_names_what_differs():
    have = ident()
    assert identity_difference(have, ident()) is None
    assert identity_difference(have, ident(levels=2000)) is None  # an extension
    swapped = ident(checkpoints=ident()["checkpoints"][::-1], env_options=ident()["env_options"])
    assert identity_difference(have, swapped) is None  # order does not matter
    assert identity_difference(have, ident(start_level=5)) == (
        "its first level is 0, not --start-level 5"
    )
    assert "more than --levels 500" in identity_difference(have, ident(levels=500))
    assert identity_difference(have, ident(seed=2)) == "its seed is 0, not --seed 2"
    assert "add --no-causes" in identity_difference(ident(causes=False), ident())
    assert "drop --no-causes" in identity_difference(have, ident(causes=False))
    one = ident(checkpoints=ident()["checkpoints"][:1], env_options=ident()["env_options"][:1])
    assert identity_difference(have, one) == "its checkpoints are ckpt-a, ckpt-b, not ckpt-a"
    easy = ident(env_options=[{"distribution_mode": "hard"}, {"distribution_mode": "easy"}])
    assert "it played ckpt-b with {'distribution_mode': 'hard'}" in identity_difference(have, easy)
    both = identity_difference(have, ident(start_level=5, seed=1))
    assert "--start-level 5" in both and "--seed 1" in both and "\n" not in both


# -- real evaluations ------------------------------------------------------------------------------
def jumpy(run: Path, name: str = "interpretable") -> Path:
    """An untrained policy pushed towards RIGHT+UP so that levels end quickly."""
    torch.manual_seed(0)
    policy = build_policy(name, (3, 64, 64), 15)
    with torch.no_grad():
        policy.pi.bias[8] = 4.0
    meta = {"step": 2048, "run_id": run.name, "env": "procgen:coinrun",
            "env_options": {"distribution_mode": "easy"}}  # fmt: skip
    return save_checkpoint(run, policy, meta)


def loupe(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loupe.cli", *args], capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    (line,) = [l for l in done.stderr.splitlines() if l.startswith("loupe: error:")]
    return line


def start_loupe(*args: str) -> subprocess.Popen:
    """`loupe ARGS` started, to run while the test goes on (``finish`` collects it)."""
    return subprocess.Popen([sys.executable, "-m", "loupe.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def finish(proc: subprocess.Popen, timeout: int = 600) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.integration
def test_labels_from_the_provenance_of_a_real_edit(tmp_path):
    """probe -> `loupe edit --direction nmf:1` -> evaluate: the edit is named by what it is."""
    parent = jumpy(tmp_path / "coinrun-a")
    # bad --label values are refused with one line; these commands run while the probe does
    bad_labels = [("original", "wants NAME=PATH"), (f"x={parent}.nope", "is not a checkpoint")]
    refusals = [start_loupe("evaluate", "--checkpoint", str(parent), "--levels", "2",
                            "--out", str(tmp_path / "bad"), "--label", bad)
                for bad, _ in bad_labels]  # fmt: skip
    probe = loupe("probe", "--checkpoint", str(parent), "--out", str(tmp_path / "probe"),
                  "--num-envs", "2", "--num-steps", "16", "--ig-samples", "4",
                  "--nmf-components", "2", "--smoothgrad-copies", "2")  # fmt: skip
    assert probe.returncode == 0, probe.stderr[-2000:]
    for (_, says), proc in zip(bad_labels, refusals):
        assert says in error_line(finish(proc))
    assert not (tmp_path / "bad").exists()
    edited = tmp_path / "edit"
    done = loupe("edit", "--checkpoint", str(parent), "--layer", "2b", "--direction", "nmf:1",
                 "--nmf", str(tmp_path / "probe" / "summary.json"), "--out", str(edited))  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    (child,) = edited.glob("checkpoints/*.json")
    out = tmp_path / "ev"
    summary = evaluate(EvalConfig(checkpoints=[str(parent), str(child)], out=str(out), levels=2,
                                  workers=0, slots=2), progress=False)  # fmt: skip
    names = [s["label"] for s in summary["checkpoints"].values()]
    assert names == ["coinrun-a step 2048", "nmf:1 of 2b projected out of coinrun-a step 2048"]
    # the JSON files are written with sorted keys: look checkpoints up by their ids
    parent_id, child_id = list(summary["checkpoints"])
    results = json.loads((out / "results.json").read_text())
    edit_rec = results["checkpoints"][child_id]["edit"]
    assert edit_rec["layer"] == "2b" and edit_rec["direction_source"] == "nmf:1"
    assert results["checkpoints"][parent_id]["edit"] is None
    marker = json.loads((out / "eval.json").read_text())
    assert [marker["labels"][parent_id], marker["labels"][child_id]] == names
    assert marker["tests"]["p"][child_id] == {
        c: v["vs_first"]["p"] for c, v in results["checkpoints"][child_id]["by_category"].items()
    }
    # --label renames the parent; the edit then names its parent by that label (CLI, resumed)
    done = loupe("evaluate", "--checkpoint", str(parent), "--checkpoint", str(child), "--levels",
                 "2", "--workers", "0", "--out", str(out), "--no-progress",
                 "--label", f"original={parent}")  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "A  original  (" in done.stdout
    assert "B  nmf:1 of 2b projected out of original  (" in done.stdout
    assert "p=" in done.stdout
    relabelled = json.loads((out / "eval.json").read_text())["labels"]
    assert [relabelled[parent_id], relabelled[child_id]] == [
        "original", "nmf:1 of 2b projected out of original"]  # fmt: skip


@pytest.mark.integration
def test_more_levels_extend_an_evaluation_without_rerunning_finished_ones(tmp_path):
    ckpt = str(jumpy(tmp_path / "run"))
    out = tmp_path / "ev"
    # in-process evaluators (--workers 0): extending is the same on Ray, where the resumed runs of
    # test_restarted_server_is_reached_with_wait_for_ready_and_resumes (test_service.py) play
    # levels that do not start at the first
    base = ["evaluate", "--checkpoint", ckpt, "--out", str(out), "--no-progress", "--slots", "2",
            "--chunk", "2", "--workers", "0"]  # fmt: skip
    # the first four levels in this process; the command extends them below
    evaluate(EvalConfig(checkpoints=[ckpt], out=str(out), levels=4, slots=2, chunk=2, workers=0),
             progress=False)  # fmt: skip
    (records,) = out.glob("*.jsonl")
    before = records.read_bytes()
    assert sorted(read_records(records)) == [0, 1, 2, 3]

    more = loupe(*base, "--levels", "8")
    assert more.returncode == 0, more.stderr[-2000:]
    assert f"extending {out} from 4 to 8 levels per checkpoint: levels 4..7 run" in more.stdout
    after = records.read_bytes()
    assert after.startswith(before)  # the first four records are untouched
    lines = after.decode().splitlines()
    assert len(lines) == 8 and sorted(json.loads(l)["level"] for l in lines) == list(range(8))
    (stats,) = json.loads((out / "results.json").read_text())["checkpoints"].values()
    assert stats["levels"] == 8 and stats["levels_this_run"] == 4
    assert sum(c["count"] for c in stats["by_category"].values()) == 8
    assert json.loads((out / "eval.json").read_text())["levels"] == 8

    cfg = dict(checkpoints=[ckpt], out=str(out), levels=8, slots=2, chunk=2, workers=1)
    evaluate(EvalConfig(**cfg), progress=False)  # nothing left to run: no Ray is started
    assert records.read_bytes() == after
    (stats,) = json.loads((out / "results.json").read_text())["checkpoints"].values()
    assert stats["levels_this_run"] == 0

    line = error_line(loupe(*base, "--levels", "8", "--start-level", "1"))
    assert line == (
        f"loupe: error: {out} holds another evaluation: its first level is 0, not --start-level 1. "
        "Repeat its checkpoints and options to resume or extend it, or choose another --out"
    )
    other = str(jumpy(tmp_path / "other", name="impala"))
    for change, says in [
        ({"levels": 4}, "it has 8 levels per checkpoint, more than --levels 4"),
        ({"checkpoints": [ckpt, other]}, "its checkpoints are"),
        ({"seed": 5}, "its seed is 0, not --seed 5"),
        ({"causes": False}, "it has failure causes (drop --no-causes)"),
    ]:
        with pytest.raises(LoupeError, match=f"holds another evaluation: {re.escape(says)}"):
            evaluate(EvalConfig(**{**cfg, **change}), progress=False)
    assert records.read_bytes() == after and len(list(out.glob("*.jsonl"))) == 1
