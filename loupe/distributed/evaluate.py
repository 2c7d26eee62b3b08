"""`loupe evaluate`: N procgen levels per checkpoint on Ray evaluator actors, resumable.

Per checkpoint, results go to ``<out>/<id>.jsonl`` one line per level as chunks finish (flushed
and fsynced), so a killed evaluation resumes without replaying finished levels. ``<out>/eval.json``
pins what is being evaluated (checkpoints, first level, seed, options); an output directory holding
a different evaluation is refused with a line naming what differs. The same command with a larger
``--levels`` extends a finished evaluation: only the new levels run.

Each checkpoint is named by what it is: ``--label NAME=PATH``, else the edit recorded in an edited
checkpoint ("nmf:3 of 2b projected out of coinrun step 2000000"), else its run and step. Per outcome
category each checkpoint is tested against the first with Fisher's exact test (two-sided); the
p-values go to the table, ``results.json`` and ``eval.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from actors.evaluator import EvaluatorConfig, LevelEvaluator, LevelResult
from loupe.config import load_json, save_json
from loupe.errors import LoupeError

log = logging.getLogger("loupe.distributed.evaluate")

CATEGORIES = ("complete", "timeout", "saw", "enemy_left", "enemy_right", "lava", "multiple")


@dataclasses.dataclass
class EvalConfig:
    """One evaluation: which checkpoints, which levels, how parallel."""

    #: checkpoint paths (.json or .safetensors)
    checkpoints: list[str]
    #: output directory
    out: str
    #: number of levels per checkpoint
    levels: int = 10_000
    #: first level seed; levels are start_level .. start_level + levels - 1
    start_level: int = 0
    #: "easy" or "hard"; None takes the checkpoint's training setting
    distribution_mode: str | None = None
    #: Ray evaluator actors (0: evaluate in this process)
    workers: int = 2
    #: levels played at once inside one evaluator (batched inference)
    slots: int = 16
    #: levels per task sent to an evaluator
    chunk: int = 32
    #: classify failure causes (CoinRun only)
    causes: bool = True
    #: seed of the per-level action sampling
    seed: int = 0
    #: Ray address (None: local Ray)
    ray_address: str | None = None
    #: hazard groups that stay deadly but are never drawn (saw, enemy_left, enemy_right)
    invisible: list[str] = dataclasses.field(default_factory=list)
    #: display names: checkpoint path (as in ``checkpoints``) -> name; others are named by their
    #: edit provenance, or run and step
    labels: dict[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if not self.checkpoints:
            raise LoupeError("give at least one --checkpoint")
        given = {_same_file(c): c for c in self.checkpoints}
        for path, name in self.labels.items():
            if not name.strip():
                raise LoupeError(f"--label for {path} has an empty name; use --label NAME=PATH")
            if _same_file(path) not in given:
                raise LoupeError(
                    f"--label {name}={path}: {path} is not one of the --checkpoint paths; "
                    "label a checkpoint that is evaluated"
                )
        names = list(self.labels.values())
        if len(set(names)) != len(names):
            raise LoupeError(
                f"two checkpoints have the same --label name ({names}); use distinct names"
            )
        if self.levels <= 0:
            raise LoupeError(f"--levels must be positive, got {self.levels}")
        if self.start_level < 0:
            raise LoupeError(f"--start-level must be >= 0, got {self.start_level}")
        if self.workers < 0 or self.slots <= 0 or self.chunk <= 0:
            raise LoupeError("--workers must be >= 0 and --slots, --chunk positive")
        if self.invisible:
            from actors.invisible import check_groups

            self.invisible = list(check_groups(self.invisible))
        if self.distribution_mode not in (None, "easy", "hard", "extreme", "memory", "exploration"):
            raise LoupeError(f"unknown --distribution-mode {self.distribution_mode!r}")


def _same_file(path: str) -> str:
    """A checkpoint path (.json, .safetensors ...) -> the absolute path of its JSON file."""
    from learner.checkpoint import resolve

    return str(resolve(Path(path)).resolve())


@dataclasses.dataclass
class Target:
    """A checkpoint to evaluate, loaded and verified."""

    path: str
    #: id: ``<file stem>-<sha256[:8]>``, the records file name and the key in results.json
    label: str
    sha256: str
    spec: dict[str, Any]
    weights: dict[str, Any]
    evaluator: EvaluatorConfig
    #: run_id, step and edit provenance from the checkpoint's metadata
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: what the checkpoint is, for tables and charts (``name_targets``)
    name: str = ""


def load_target(path: str, cfg: EvalConfig) -> Target:
    from learner.checkpoint import load_checkpoint

    policy, meta = load_checkpoint(path)
    env_id = meta.get("env") or ""
    if not env_id.startswith("procgen:"):
        raise LoupeError(
            f"{path} was trained on {env_id or 'an unknown env'}; evaluation plays procgen levels"
        )
    game = env_id.split(":", 1)[1]
    if cfg.causes and game != "coinrun":
        raise LoupeError(
            f"{path} plays {game}: failure causes exist for CoinRun only; pass --no-causes "
            "for plain success rates"
        )
    env_opts = dict(meta.get("env_options") or {})
    options = {
        k: env_opts[k]
        for k in (
            "distribution_mode",
            "use_backgrounds",
            "restrict_themes",
            "use_monochrome_assets",
            "paint_vel_info",
            "center_agent",
        )
        if env_opts.get(k) is not None
    }
    if cfg.distribution_mode:
        options["distribution_mode"] = cfg.distribution_mode
    weights = {k: v.detach().cpu().numpy() for k, v in policy.state_dict().items()}
    stem = Path(path).name.split(".")[0]
    return Target(
        path=str(Path(path).resolve()),
        label=f"{stem}-{meta['sha256'][:8]}",
        sha256=meta["sha256"],
        spec=dict(policy.spec),
        weights=weights,
        meta={
            "run_id": meta.get("run_id") or Path(path).resolve().parent.parent.name,
            "step": int(meta["step"]),
            "edit": meta.get("edit"),
        },
        evaluator=EvaluatorConfig(
            game=game,
            env_options=options,
            slots=cfg.slots,
            causes=cfg.causes,
            seed=cfg.seed,
            action_set=env_opts.get("action_set") or "full",
            invisible=list(cfg.invisible),
        ),
    )


# -- names ---------------------------------------------------------------------------------------
def _source_name(source: str) -> str:
    """An edit's direction source for a name: paths shortened to their file names."""
    return " ".join(Path(w).name if "/" in w else w for w in str(source).split())


def edit_name(edit: dict[str, Any], run_id: str, known: dict[str, str]) -> str:
    """The name of an edited checkpoint: "<source> of <layer> projected out of <parent>".

    ``known`` maps sha256 -> the name of an evaluated checkpoint; a parent not in it is named by
    its own edit (``parent_edit``) or by run and step.
    """
    parent = known.get(edit.get("parent_sha256", ""))
    if parent is None:
        if edit.get("parent_edit"):
            parent = edit_name(edit["parent_edit"], run_id, known)
        else:
            parent = f"{run_id} step {edit.get('parent_step', '?')}"
    source = _source_name(edit.get("direction_source", "a direction"))
    return f"{source} of {edit['layer']} projected out of {parent}"


def name_targets(targets: list[Target], labels: dict[str, str]) -> None:
    """Set each target's ``name``: its --label, else its edit provenance, else run and step.

    An edit's parent is called by its name in this evaluation when it is evaluated too. Names that
    would coincide get the checkpoint's sha256 prefix.
    """
    by_file = {_same_file(path): name for path, name in labels.items()}
    known: dict[str, str] = {}
    for t in targets:
        user = by_file.get(_same_file(t.path))
        if user is not None:
            t.name = user
        elif not t.meta.get("edit"):
            t.name = f"{t.meta['run_id']} step {t.meta['step']}"
        if t.name:
            known.setdefault(t.sha256, t.name)
    pending = [t for t in targets if not t.name]
    while pending:  # parents before their edits, so that an edit names an evaluated parent
        waiting = {t.sha256 for t in pending}
        ready = [t for t in pending if t.meta["edit"].get("parent_sha256") not in waiting]
        for t in ready or pending:
            t.name = edit_name(t.meta["edit"], t.meta["run_id"], known)
            known.setdefault(t.sha256, t.name)
        pending = [t for t in pending if not t.name]
    counts = Counter(t.name for t in targets)
    for t in targets:
        if counts[t.name] > 1:
            t.name = f"{t.name} [{t.sha256[:8]}]"


# -- the output directory --------------------------------------------------------------------------
def identity(cfg: EvalConfig, targets: list[Target]) -> dict[str, Any]:
    """What eval.json pins (``labels`` and ``tests`` are added when the evaluation finishes)."""
    return {
        "schema": 1,
        "checkpoints": [{"label": t.label, "sha256": t.sha256, "path": t.path} for t in targets],
        "levels": cfg.levels,
        "start_level": cfg.start_level,
        "seed": cfg.seed,
        "causes": cfg.causes,
        "env_options": [t.evaluator.env_options for t in targets],
        **({"invisible": list(cfg.invisible)} if cfg.invisible else {}),
    }


def identity_difference(have: dict[str, Any], want: dict[str, Any]) -> str | None:
    """What makes evaluation ``want`` other than the one recorded as ``have`` -> None when it is
    the same one or extends it to more levels; checkpoint order does not matter."""
    if have.get("schema") != want["schema"]:
        return f"its eval.json has schema {have.get('schema')!r}, not {want['schema']}"
    diffs = []
    old = {c["sha256"]: c["label"] for c in have.get("checkpoints", [])}
    new = {c["sha256"]: c["label"] for c in want["checkpoints"]}
    if set(old) != set(new):
        diffs.append(
            f"its checkpoints are {', '.join(old.values())}, not {', '.join(new.values())}"
        )
    if have.get("start_level") != want["start_level"]:
        diffs.append(
            f"its first level is {have.get('start_level')}, not --start-level {want['start_level']}"
        )
    if have.get("levels", 0) > want["levels"]:
        diffs.append(
            f"it has {have['levels']} levels per checkpoint, more than --levels {want['levels']} "
            "(a larger --levels extends it)"
        )
    if have.get("seed") != want["seed"]:
        diffs.append(f"its seed is {have.get('seed')}, not --seed {want['seed']}")
    if have.get("causes") != want["causes"]:
        diffs.append(
            "it has failure causes (drop --no-causes)"
            if have.get("causes")
            else "it has no failure causes (add --no-causes)"
        )
    old_opts = dict(zip(old, have.get("env_options", [])))
    new_opts = dict(zip(new, want["env_options"]))
    changed = [k for k in new if k in old_opts and old_opts[k] != new_opts[k]]
    if changed:
        k = changed[0]
        diffs.append(f"it played {new[k]} with {old_opts[k]}, not {new_opts[k]}")
    if have.get("invisible", []) != want.get("invisible", []):
        shown = ", ".join(have.get("invisible", [])) or "none"
        diffs.append(f"its invisible hazards are {shown}, not --invisible as given")
    return "; ".join(diffs) or None


def prepare_out(
    cfg: EvalConfig, targets: list[Target], echo: Callable[[str], None] | None = None
) -> Path:
    """Create or check ``cfg.out``; an evaluation recorded there may be resumed or extended."""
    out = Path(cfg.out)
    want = identity(cfg, targets)
    marker = out / "eval.json"
    record = dict(want)
    if marker.is_file():
        have = load_json(marker)
        diff = identity_difference(have, want)
        if diff:
            raise LoupeError(
                f"{out} holds another evaluation: {diff}. Repeat its checkpoints and options to "
                "resume or extend it, or choose another --out"
            )
        if have["levels"] < want["levels"] and echo is not None:
            echo(
                f"extending {out} from {have['levels']} to {want['levels']} levels per checkpoint: "
                f"levels {cfg.start_level + have['levels']}..{cfg.start_level + want['levels'] - 1} run"
            )
        record = {**have, **want}  # keeps labels and tests until they are written anew
    elif out.exists() and any(out.iterdir()):
        raise LoupeError(f"{out} is not empty and holds no evaluation; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    save_json(marker, record)
    return out


def read_records(path: Path) -> dict[int, LevelResult]:
    """Finished levels of a records file; a torn last line (a kill mid-write) is dropped."""
    done: dict[int, LevelResult] = {}
    if not path.exists():
        return done
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
            result = LevelResult(**rec)
        except (json.JSONDecodeError, TypeError):
            log.warning("%s: skipping a torn record line", path)
            continue
        done[result.level] = result
    return done


class RecordWriter:
    def __init__(self, path: Path):
        # drop a torn final line before appending
        if path.exists():
            text = path.read_text()
            if text and not text.endswith("\n"):
                path.write_text(text[: text.rfind("\n") + 1])
        self.file = open(path, "a")  # noqa: SIM115 (closed in close())

    def write(self, results: list[LevelResult]) -> None:
        for r in results:
            self.file.write(json.dumps(dataclasses.asdict(r)) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


# -- running ------------------------------------------------------------------------------------------
def _chunks(levels: list[int], size: int) -> list[list[int]]:
    return [levels[i : i + size] for i in range(0, len(levels), size)]


def run_target(target: Target, todo: list[int], cfg: EvalConfig, writer, bar) -> None:
    if not todo:
        return
    if cfg.workers == 0:
        evaluator = LevelEvaluator(target.spec, target.weights, target.evaluator)
        for chunk in _chunks(todo, cfg.chunk):
            results = evaluator.evaluate(chunk)
            writer.write(results)
            bar.update(len(results))
        return
    _run_on_ray(target, todo, cfg, writer, bar)


def _run_on_ray(target: Target, todo: list[int], cfg: EvalConfig, writer, bar) -> None:
    import ray
    from ray.exceptions import RayActorError

    from loupe.distributed import check_cpus, forget_frames, init_ray

    init_ray(cfg.ray_address)
    check_cpus(cfg.workers)
    # a dead evaluator is replaced here, not restarted by Ray: Ray restarts of an actor whose
    # constructor arguments live in the object store are unsafe (and logged as an error)
    remote_cls = ray.remote(num_cpus=1, max_restarts=0, max_task_retries=0)(LevelEvaluator)
    spec_ref, weights_ref = ray.put(target.spec), ray.put(target.weights)

    def start() -> Any:
        return remote_cls.remote(spec_ref, weights_ref, target.evaluator)

    workers = [start() for _ in range(cfg.workers)]
    queue = _chunks(todo, cfg.chunk)[::-1]
    in_flight: dict[Any, tuple[int, list[int], Any]] = {}
    failures = 0

    def submit(w: int) -> None:
        if queue:
            chunk = queue.pop()
            in_flight[workers[w].evaluate.remote(chunk)] = (w, chunk, workers[w])

    try:
        for w in range(len(workers)):
            submit(w)
            submit(w)  # two chunks per worker keep it busy while results travel back
        while in_flight:
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            w, chunk, actor = in_flight.pop(ready[0])
            try:
                results = ray.get(ready[0])
            except RayActorError as exc:
                forget_frames(exc)  # or this frame, and the results so far, outlive the run
                if workers[w] is actor:  # the first of its lost chunks replaces the evaluator
                    workers[w] = start()
                failures += 1
                if failures > 3 * cfg.workers:
                    raise LoupeError(
                        "evaluator actors keep dying; finished levels are saved, rerun the same "
                        "command to resume"
                    ) from None
                log.warning(
                    "evaluator %d lost a chunk of %d levels; it is re-queued", w, len(chunk)
                )
                queue.append(chunk)
                submit(w)
                continue
            writer.write(results)
            bar.update(len(results))
            submit(w)
    finally:
        for worker in workers:
            ray.kill(worker, no_restart=True)


def evaluate(
    cfg: EvalConfig, progress: bool = True, echo: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Evaluate every checkpoint on the levels of ``cfg`` -> the summary (also ``results.json``).

    ``echo`` receives a line when an evaluation is extended to more levels.
    """
    from tqdm import tqdm

    targets = [load_target(p, cfg) for p in cfg.checkpoints]
    labels = [t.label for t in targets]
    if len(set(labels)) != len(labels):
        raise LoupeError("the same checkpoint is given twice")
    name_targets(targets, cfg.labels)
    out = prepare_out(cfg, targets, echo)
    all_levels = list(range(cfg.start_level, cfg.start_level + cfg.levels))
    summary: dict[str, Any] = {"config": dataclasses.asdict(cfg), "checkpoints": {}}
    for target in targets:
        records = out / f"{target.label}.jsonl"
        done = read_records(records)
        todo = [level for level in all_levels if level not in done]
        bar = tqdm(
            total=len(all_levels),
            initial=len(all_levels) - len(todo),
            desc=target.label,
            unit="level",
            disable=not progress,
            dynamic_ncols=True,
        )
        writer = RecordWriter(records)
        t0 = time.perf_counter()
        try:
            run_target(target, todo, cfg, writer, bar)
        finally:
            writer.close()
            bar.close()
        elapsed = time.perf_counter() - t0
        results = read_records(records)
        missing = set(all_levels) - set(results)
        if missing:
            raise LoupeError(
                f"{len(missing)} levels of {target.label} have no result; rerun to resume"
            )
        stats = summarise(results[level] for level in all_levels)
        stats.update(
            label=target.name,
            edit=_edit_record(target.meta.get("edit")),
            path=target.path,
            sha256=target.sha256,
            records=str(records),
            seconds_this_run=elapsed,
            levels_this_run=len(todo),
            levels_per_s=len(todo) / elapsed if todo and elapsed > 0 else None,
        )
        summary["checkpoints"][target.label] = stats
    tests = compare_to_first(summary)
    summary["reference"] = targets[0].label
    save_json(out / "results.json", summary)
    marker = load_json(out / "eval.json")
    marker["labels"] = {t.label: t.name for t in targets}
    marker["tests"] = tests
    save_json(out / "eval.json", marker)
    plot_causes(summary, out / "failure_causes.png")
    return summary


def _edit_record(edit: dict[str, Any] | None) -> dict[str, Any] | None:
    """An edit's provenance without its direction vector (that stays in the checkpoint)."""
    if not edit:
        return None
    record = {k: edit[k] for k in ("layer", "direction_source", "parent_sha256", "parent_step")
              if k in edit}  # fmt: skip
    if edit.get("parent_edit"):
        record["parent_edit"] = _edit_record(edit["parent_edit"])
    return record


# -- statistics and the chart ---------------------------------------------------------------------------
def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n."""
    if n == 0:
        return (0.0, 0.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def fisher_p(k1: int, n1: int, k2: int, n2: int) -> float:
    """Two-sided Fisher's exact test of k1/n1 against k2/n2 -> p-value (scipy)."""
    from scipy.stats import fisher_exact

    if n1 <= 0 or n2 <= 0:
        raise ValueError("both samples need levels")
    return float(fisher_exact([[k1, n1 - k1], [k2, n2 - k2]], alternative="two-sided").pvalue)


#: how ``compare_to_first`` tests, as written into results.json and eval.json
TEST_METHOD = (
    "Fisher's exact test, two-sided, of each category's share against the first checkpoint"
)


def compare_to_first(summary: dict[str, Any]) -> dict[str, Any]:
    """Test every checkpoint against the first, per outcome category.

    Adds ``vs_first: {"p": ..., "diff_pp": ...}`` to each category of every checkpoint but the
    first (a category absent from one side counts 0 there) -> the tests for eval.json.
    """
    labels = list(summary["checkpoints"])
    first = summary["checkpoints"][labels[0]]
    p_values: dict[str, dict[str, float]] = {}
    for label in labels[1:]:
        stats = summary["checkpoints"][label]
        p_values[label] = {}
        for cat in (*CATEGORIES, "failure"):
            mine, ref = stats["by_category"].get(cat), first["by_category"].get(cat)
            if mine is None and ref is None:
                continue
            k, k0 = (mine or {}).get("count", 0), (ref or {}).get("count", 0)
            p = fisher_p(k, stats["levels"], k0, first["levels"])
            diff = 100 * (k / stats["levels"] - k0 / first["levels"])
            if mine is None:
                mine = stats["by_category"][cat] = {
                    "count": 0,
                    "percent": 0.0,
                    "ci95": [0.0, 100 * wilson(0, stats["levels"])[1]],
                }
            mine["vs_first"] = {"p": p, "diff_pp": diff}
            p_values[label][cat] = p
    return {"method": TEST_METHOD, "reference": labels[0], "p": p_values}


def category(r: LevelResult) -> str:
    if r.outcome != "failure":
        return r.outcome
    return r.cause or "failure"


def summarise(results) -> dict[str, Any]:
    results = list(results)
    n = len(results)
    counts = Counter(category(r) for r in results)
    table = {}
    for cat in (*CATEGORIES, "failure"):
        if cat == "failure" and not counts.get("failure"):
            continue
        k = counts.get(cat, 0)
        lo, hi = wilson(k, n)
        table[cat] = {"count": k, "percent": 100 * k / n, "ci95": [100 * lo, 100 * hi]}
    return {
        "levels": n,
        "by_category": table,
        "mean_return": sum(r.ret for r in results) / n,
        "mean_length": sum(r.length for r in results) / n,
    }


def _letter(i: int) -> str:
    return chr(ord("A") + i) if i < 26 else f"#{i + 1}"


def format_table(summary: dict[str, Any]) -> str:
    """Categories down, checkpoints across (as letters, named above the table), p-values vs A."""
    labels = list(summary["checkpoints"])
    rows = summary["checkpoints"]
    cats = [c for c in (*CATEGORIES, "failure") if any(c in rows[l]["by_category"] for l in labels)]
    cfg = summary["config"]
    first, last = cfg["start_level"], cfg["start_level"] + cfg["levels"] - 1
    lines = [
        f"levels {first}..{last} ({cfg['levels']} per checkpoint): % of levels [95% Wilson interval]"
    ]
    if len(labels) > 1:
        lines[0] += "; p: Fisher's exact test against A (two-sided)"
    for i, label in enumerate(labels):
        lines.append(f"  {_letter(i)}  {rows[label].get('label') or label}  ({label})")
    cells = {}
    for i, label in enumerate(labels):
        for c in cats:
            cell = rows[label]["by_category"].get(c)
            text = "-"
            if cell:
                text = f"{cell['percent']:6.2f} [{cell['ci95'][0]:5.2f},{cell['ci95'][1]:6.2f}]"
                if "vs_first" in cell:
                    text += f" p={cell['vs_first']['p']:.2g}"
            cells[i, c] = text
    widths = [max(len(_letter(i)), *(len(cells[i, c]) for c in cats)) for i in range(len(labels))]
    head = max(len("category"), *(len(c) for c in cats))
    lines.append("")
    lines.append(
        f"{'category':<{head}}  " + "  ".join(f"{_letter(i):<{w}}" for i, w in enumerate(widths))
    )
    for c in cats:
        lines.append(
            f"{c:<{head}}  " + "  ".join(f"{cells[i, c]:<{w}}" for i, w in enumerate(widths))
        )
    return "\n".join(line.rstrip() for line in lines)


def plot_causes(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = list(summary["checkpoints"])
    cats = [
        c
        for c in ("saw", "enemy_left", "enemy_right", "lava", "multiple", "failure", "timeout")
        if any(c in summary["checkpoints"][l]["by_category"] for l in labels)
    ]
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(cats), 3.6), dpi=120)
    width = 0.8 / max(len(labels), 1)
    x = np.arange(len(cats))
    for i, label in enumerate(labels):
        row = summary["checkpoints"][label]["by_category"]
        pct = np.array([row.get(c, {"percent": 0})["percent"] for c in cats])
        lo = np.array([row.get(c, {"ci95": [0, 0]})["ci95"][0] for c in cats])
        hi = np.array([row.get(c, {"ci95": [0, 0]})["ci95"][1] for c in cats])
        ax.bar(
            x + (i - (len(labels) - 1) / 2) * width,
            pct,
            width,
            yerr=[pct - lo, hi - pct],
            capsize=3,
            label=f"{_letter(i)}: {summary['checkpoints'][label].get('label') or label}",
        )
    ax.set_xticks(x, [c.replace("_", " ") for c in cats])
    ax.set_ylabel("% of levels (95% CI)")
    ax.set_title(f"failures by cause over {summary['config']['levels']} levels")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
