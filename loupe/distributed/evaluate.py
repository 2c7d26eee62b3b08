"""`loupe evaluate`: N procgen levels per checkpoint on Ray evaluator actors, resumable.

Per checkpoint, results go to ``<out>/<label>.jsonl`` one line per level as chunks finish (flushed
and fsynced), so a killed evaluation resumes without replaying finished levels. ``<out>/eval.json``
pins what is being evaluated; an output directory holding a different evaluation is refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections import Counter
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

    def __post_init__(self):
        if not self.checkpoints:
            raise LoupeError("give at least one --checkpoint")
        if self.levels <= 0:
            raise LoupeError(f"--levels must be positive, got {self.levels}")
        if self.start_level < 0:
            raise LoupeError(f"--start-level must be >= 0, got {self.start_level}")
        if self.workers < 0 or self.slots <= 0 or self.chunk <= 0:
            raise LoupeError("--workers must be >= 0 and --slots, --chunk positive")
        if self.distribution_mode not in (None, "easy", "hard", "extreme", "memory", "exploration"):
            raise LoupeError(f"unknown --distribution-mode {self.distribution_mode!r}")


@dataclasses.dataclass
class Target:
    """A checkpoint to evaluate, loaded and verified."""

    path: str
    label: str
    sha256: str
    spec: dict[str, Any]
    weights: dict[str, Any]
    evaluator: EvaluatorConfig


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
        evaluator=EvaluatorConfig(
            game=game,
            env_options=options,
            slots=cfg.slots,
            causes=cfg.causes,
            seed=cfg.seed,
            action_set=env_opts.get("action_set") or "full",
        ),
    )


# -- the output directory --------------------------------------------------------------------------
def identity(cfg: EvalConfig, targets: list[Target]) -> dict[str, Any]:
    return {
        "schema": 1,
        "checkpoints": [{"label": t.label, "sha256": t.sha256} for t in targets],
        "levels": cfg.levels,
        "start_level": cfg.start_level,
        "seed": cfg.seed,
        "causes": cfg.causes,
        "env_options": [t.evaluator.env_options for t in targets],
    }


def prepare_out(cfg: EvalConfig, targets: list[Target]) -> Path:
    out = Path(cfg.out)
    want = identity(cfg, targets)
    marker = out / "eval.json"
    if marker.is_file():
        have = load_json(marker)
        if have != want:
            raise LoupeError(
                f"{out} holds a different evaluation (see {marker}); choose another --out "
                "or repeat the same checkpoints and options to resume it"
            )
    elif out.exists() and any(out.iterdir()):
        raise LoupeError(f"{out} is not empty and holds no evaluation; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    save_json(marker, want)
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

    from loupe.distributed import check_cpus, init_ray

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
            except RayActorError:
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


def evaluate(cfg: EvalConfig, progress: bool = True) -> dict[str, Any]:
    from tqdm import tqdm

    targets = [load_target(p, cfg) for p in cfg.checkpoints]
    labels = [t.label for t in targets]
    if len(set(labels)) != len(labels):
        raise LoupeError("the same checkpoint is given twice")
    out = prepare_out(cfg, targets)
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
        stats = summarise(results.values())
        stats.update(
            path=target.path,
            sha256=target.sha256,
            records=str(records),
            seconds_this_run=elapsed,
            levels_this_run=len(todo),
            levels_per_s=len(todo) / elapsed if todo and elapsed > 0 else None,
        )
        summary["checkpoints"][target.label] = stats
    save_json(out / "results.json", summary)
    plot_causes(summary, out / "failure_causes.png")
    return summary


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


def format_table(summary: dict[str, Any]) -> str:
    labels = list(summary["checkpoints"])
    cats = [
        c
        for c in (*CATEGORIES, "failure")
        if any(c in summary["checkpoints"][l]["by_category"] for l in labels)
    ]
    width = max(12, *(len(l) for l in labels))
    lines = [f"{'% of levels':<{width}} " + " ".join(f"{c:>20}" for c in cats)]
    for label in labels:
        row = summary["checkpoints"][label]["by_category"]
        cells = []
        for c in cats:
            cell = row.get(c)
            cells.append(
                f"{cell['percent']:6.2f} [{cell['ci95'][0]:5.2f},{cell['ci95'][1]:5.2f}]"
                if cell
                else f"{'-':>20}"
            )
        lines.append(f"{label:<{width}} " + " ".join(f"{c:>20}" for c in cells))
    return "\n".join(lines)


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
            label=label,
        )
    ax.set_xticks(x, [c.replace("_", " ") for c in cats])
    ax.set_ylabel("% of levels (95% CI)")
    ax.set_title(f"failures by cause over {summary['config']['levels']} levels")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
