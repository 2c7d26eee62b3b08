"""`loupe study edits`: the seed article's edit experiment as one resumable job.

Stages, each skipped when its output is already complete (so a killed study resumes where it was):

1. ``probe/``: the probe suite on the checkpoint (CoinRun: NMF features labelled by the game state);
2. ``labels.json``: the feature with the largest share of its attribution on saws, and the one on
   left-moving enemies (with their shares, and whether that class is the feature's dominant label);
3. ``edits/<name>/``: the checkpoint with each feature's direction projected out of the next layer;
4. ``eval/models/``: original, saw-blind and enemy-left-blind on the same levels; ``eval/invisible-
   saw/`` and ``eval/invisible-enemy_left/``: the original with that group deadly but never drawn
   (the article's upper bound of blindness);
5. ``study.json``, ``table.md``, ``study.png``: failure % by cause with 95% intervals, each edit
   against the original per cause (Fisher's exact test), the blindness ratio (the edit's increase
   in failures of its group over the invisible control's increase) and the article's figures.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from loupe.config import load_json, save_json
from loupe.errors import LoupeError

#: causes reported in the study's table, in order
CAUSES = ("saw", "enemy_left", "enemy_right", "lava", "multiple")
#: the edits: name -> the object class whose feature is projected out
EDITS = {"saw-blind": "saw", "enemy_left-blind": "enemy_left"}
#: the invisible control must raise its group's failures at this significance for a blindness ratio
BLINDNESS_ALPHA = 0.05
#: the seed article's table (% of 10,000 levels failed by cause; "other" = lava + multiple)
ARTICLE = {
    "original": {"saw": 0.37, "enemy_left": 0.16, "enemy_right": 0.12, "other": 0.08},
    "saw-blind": {"saw": 12.76, "enemy_left": 0.16, "enemy_right": 0.08, "other": 0.05},
    "enemy_left-blind": {"saw": 0.36, "enemy_left": 4.69, "enemy_right": 0.97, "other": 0.07},
    "invisible-saw": {"saw": 32.20, "enemy_left": 0.05, "enemy_right": 0.05, "other": 0.05},
}


@dataclasses.dataclass
class StudyConfig:
    """One edit study; saved as ``<out>/config.json`` and compared on resume."""

    #: the CoinRun checkpoint to study
    checkpoint: str
    #: output directory
    out: str
    #: evaluation levels per model
    levels: int = 10_000
    #: first level seed of the evaluation (levels start_level .. start_level + levels - 1)
    start_level: int = 100_000
    #: environments x steps the probe records (its NMF is fitted on ``ig_samples`` frames;
    #: enemies are in few levels, so many environments)
    probe_envs: int = 64
    probe_steps: int = 64
    ig_samples: int = 256
    #: how those frames are chosen (probes.suite.ProbeConfig.frames): "hazards" makes sure of
    #: frames showing saws and enemies, "even" spreads them evenly (studies from before it was
    #: recorded)
    probe_frames: str = "hazards"
    #: NMF features
    nmf_components: int = 8
    #: Ray evaluators (0: in-process)
    workers: int = 2
    #: seed of probing and of the evaluation's action sampling
    seed: int = 0

    def __post_init__(self):
        for name in ("levels", "probe_envs", "probe_steps", "ig_samples", "nmf_components"):
            if getattr(self, name) <= 0:
                raise LoupeError(f"--{name.replace('_', '-')} must be positive")
        if self.start_level < 0 or self.workers < 0:
            raise LoupeError("--start-level and --workers must be >= 0")
        if self.probe_frames not in ("even", "hazards"):
            raise LoupeError("--probe-frames must be even or hazards")


class EditStudy:
    """The stages of one study; ``run()`` does whatever is not done yet."""

    def __init__(self, config: StudyConfig, progress: bool = True, log=print):
        self.config = config
        self.out = Path(config.out)
        self.progress = progress
        self.log = log
        self._shas: dict[str, str] = {}

    def sha256(self, checkpoint: str) -> str:
        """The weights' sha256 from a checkpoint's metadata, read once per path."""
        from learner.checkpoint import read_meta

        if checkpoint not in self._shas:
            self._shas[checkpoint] = read_meta(checkpoint)["sha256"]
        return self._shas[checkpoint]

    # -- the directory ---------------------------------------------------------------------------
    def prepare(self) -> dict[str, Any]:
        """Check the checkpoint, claim or reopen the directory -> the checkpoint's metadata."""
        from learner.checkpoint import read_meta

        meta = read_meta(self.config.checkpoint)
        self._shas[self.config.checkpoint] = meta["sha256"]
        if meta.get("env") != "procgen:coinrun":
            raise LoupeError(
                f"{self.config.checkpoint} was trained on {meta.get('env') or 'an unknown env'}; "
                "the edit study needs a CoinRun checkpoint"
            )
        want = {**_identity(self.config), "sha256": meta["sha256"]}
        marker = self.out / "config.json"
        if marker.is_file():
            # studies from before the frame choice was recorded spread their frames evenly
            have = {"probe_frames": "even", **load_json(marker)}
            if have != want:
                diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
                raise LoupeError(
                    f"{self.out} holds another study (differs in {', '.join(diff)}); choose "
                    "another --out or repeat that study's settings to resume it"
                )
        elif self.out.exists() and any(self.out.iterdir()):
            raise LoupeError(f"{self.out} is not empty and holds no study; choose another --out")
        self.out.mkdir(parents=True, exist_ok=True)
        save_json(marker, want)
        return meta

    # -- stages ----------------------------------------------------------------------------------
    def probe(self) -> dict[str, Any]:
        from probes.suite import ProbeConfig, run_suite

        summary_path = self.out / "probe" / "summary.json"
        if summary_path.is_file():
            self.log(f"[1/5] probe: done ({summary_path})")
            return load_json(summary_path)
        c = self.config
        self.log(
            f"[1/5] probe: {c.probe_envs} envs x {c.probe_steps} steps, IG of {self.frames()} "
            f"frames ({c.probe_frames}) + NMF + labels"
        )
        cfg = ProbeConfig(
            num_envs=c.probe_envs,
            num_steps=c.probe_steps,
            ig_samples=c.ig_samples,
            frames=c.probe_frames,
            nmf_components=c.nmf_components,
            seed=c.seed,
        )
        return run_suite(c.checkpoint, self.out / "probe", cfg)  # atomic: .partial, then rename

    def choose_features(self, summary: dict[str, Any]) -> dict[str, Any]:
        path = self.out / "labels.json"
        if path.is_file():
            self.log(f"[2/5] labels: done ({path})")
            return load_json(path)
        nmf = summary.get("nmf") or {}
        if "labels" not in nmf:
            raise LoupeError(
                f"the probe in {self.out / 'probe'} has no feature labels; it must come from a "
                "CoinRun checkpoint at a spatial layer"
            )
        chosen = {}
        for edit, cls in EDITS.items():
            best = max(nmf["labels"], key=lambda f: f["total"].get(cls, 0.0))
            chosen[edit] = {
                "class": cls,
                "feature": best["feature"],
                "share": best["total"][cls],
                "lift": (best.get("lift") or {}).get(cls),
                # the class's share of all positions of the probe's frames (0: never on screen)
                "area": (best.get("area") or {}).get(cls),
                "dominant": best["label"] == cls,
                "label": best["label"],
                "label_share": best["share"],
            }
        record = {"layer": summary["layer"], "labels": nmf["labels"], "edits": chosen}
        save_json(path, record)
        for edit, c in chosen.items():
            self.log(
                f"[2/5] labels: {edit}: feature {c['feature']} has {100 * c['share']:.1f}% of its "
                f"attribution on {c['class']}{_lift(c.get('lift'))} (its label: {c['label']} "
                f"{100 * c['label_share']:.1f}%){_absent(c, self.frames())}"
            )
        return record

    def frames(self) -> int:
        """How many frames the probe attributes (the frames its features are labelled on)."""
        c = self.config
        return min(c.ig_samples, c.probe_envs * c.probe_steps)

    def edit(self, labels: dict[str, Any], summary: dict[str, Any]) -> dict[str, str]:
        from learner.checkpoint import list_checkpoints
        from probes.editing import summary_direction, write_edited_checkpoint

        paths = {}
        for edit, chosen in labels["edits"].items():
            target = self.out / "edits" / edit
            done = list_checkpoints(target) if target.is_dir() else []
            if done:
                paths[edit] = str(done[-1])
                continue
            k = chosen["feature"]
            direction, _ = summary_direction(summary, f"nmf:{k}", labels["layer"])
            source = f"{chosen['class']} feature nmf:{k} (share {chosen['share']:.2f})"
            partial = target.with_name(target.name + ".partial")
            if partial.exists():
                import shutil

                shutil.rmtree(partial)
            path = write_edited_checkpoint(
                self.config.checkpoint, labels["layer"], direction, source, partial
            )
            partial.rename(target)
            paths[edit] = str(target / path.relative_to(partial))
        self.log(f"[3/5] edits: {', '.join(paths)} in {self.out / 'edits'}")
        return paths

    def evaluations(self, edits: dict[str, str]) -> dict[str, dict[str, Any]]:
        from loupe.distributed.evaluate import EvalConfig, evaluate

        c = self.config
        # two edits of the same feature are one model: evaluate each distinct checkpoint once
        models = list({self.sha256(p): p for p in [c.checkpoint, *edits.values()]}.values())
        runs = {
            "models": (models, []),
            "invisible-saw": ([c.checkpoint], ["saw"]),
            "invisible-enemy_left": ([c.checkpoint], ["enemy_left"]),
        }
        results = {}
        for name, (checkpoints, invisible) in runs.items():
            self.log(f"[4/5] evaluate {name}: {len(checkpoints)} model(s) x {c.levels} levels")
            cfg = EvalConfig(
                checkpoints=checkpoints,
                out=str(self.out / "eval" / name),
                levels=c.levels,
                start_level=c.start_level,
                workers=c.workers,
                seed=c.seed,
                invisible=invisible,
            )
            results[name] = evaluate(cfg, progress=self.progress)
        return results

    def report(
        self, labels: dict[str, Any], edits: dict[str, str], evals: dict[str, dict[str, Any]]
    ) -> dict[str, Any]:
        shas = {"original": self.sha256(self.config.checkpoint)}
        # in the order of EDITS (labels.json keeps its keys sorted)
        shas.update({name: self.sha256(edits[name]) for name in EDITS if name in edits})
        rows = _rows(evals, shas)
        by_feature = {f["feature"]: f for f in labels["labels"]}
        edits_chosen = {  # labels.json from before areas were recorded: read them off the labels
            edit: {"area": (by_feature[c["feature"]].get("area") or {}).get(c["class"]), **c}
            for edit, c in labels["edits"].items()
        }
        study = {
            "config": _identity(self.config),
            "layer": labels["layer"],
            "probe_frames": self.frames(),
            "edits": {name: edits_chosen[name] for name in EDITS if name in edits_chosen},
            "features": [_feature_row(f) for f in labels["labels"]],
            "rows": rows,
            "tests": {edit: _tests(rows["original"], rows[edit]) for edit in EDITS},
            "blindness": {edit: _blindness(rows, edit, cls) for edit, cls in EDITS.items()},
            "article": ARTICLE,
        }
        save_json(self.out / "study.json", study)
        (self.out / "table.md").write_text(format_study(study))
        plot_study(study, self.out / "study.png")
        self.log(f"[5/5] report: {self.out / 'table.md'}, {self.out / 'study.png'}")
        return study

    def run(self) -> dict[str, Any]:
        self.prepare()
        summary = self.probe()
        labels = self.choose_features(summary)
        edits = self.edit(labels, summary)
        evals = self.evaluations(edits)
        return self.report(labels, edits, evals)


def _identity(config: StudyConfig) -> dict[str, Any]:
    ident = dataclasses.asdict(config)
    ident.pop("out")
    ident.pop("workers")  # parallelism does not change the results
    ident["checkpoint"] = str(Path(config.checkpoint).resolve())
    return ident


# -- statistics ------------------------------------------------------------------------------------
def _rows(evals: dict[str, dict[str, Any]], shas: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Condition name -> counts and % per cause (levels, complete, timeout, causes, other).

    ``shas``: model name (original and each edit) -> its checkpoint's sha256.
    """
    by_sha = {stats["sha256"]: stats for stats in evals["models"]["checkpoints"].values()}
    conditions = {name: by_sha[sha] for name, sha in shas.items()}
    for name in ("invisible-saw", "invisible-enemy_left"):
        (conditions[name],) = evals[name]["checkpoints"].values()
    from loupe.distributed.evaluate import wilson

    rows = {}
    for name, stats in conditions.items():
        n = stats["levels"]
        by = stats["by_category"]
        counts = {c: by.get(c, {}).get("count", 0) for c in ("complete", "timeout", *CAUSES)}
        counts["failure"] = by.get("failure", {}).get("count", 0)  # failures without a cause
        counts["other"] = counts["lava"] + counts["multiple"] + counts["failure"]
        rows[name] = {
            "levels": n,
            "counts": counts,
            "percent": {c: 100 * k / n for c, k in counts.items()},
            "ci95": {c: [100 * x for x in wilson(k, n)] for c, k in counts.items()},
        }
    return rows


def _tests(base: dict[str, Any], other: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Fisher's exact test of each cause's failure count, edit against original."""
    from scipy.stats import fisher_exact

    out = {}
    for cause in (*CAUSES[:3], "other", "complete"):
        a, n1 = base["counts"][cause], base["levels"]
        b, n2 = other["counts"][cause], other["levels"]
        _, p = fisher_exact([[a, n1 - a], [b, n2 - b]])
        out[cause] = {"difference_pct": 100 * (b / n2 - a / n1), "p": float(p)}
    return out


def _blindness(rows: dict[str, Any], edit: str, cls: str) -> dict[str, Any]:
    """(edit's increase in ``cls`` failures) / (the invisible control's increase).

    The ratio is only defined where hiding the group raised its failures beyond chance (Fisher's
    exact test, p < ``BLINDNESS_ALPHA``): an agent that ignores the group fails as often with it
    invisible, and a ratio of two noise-sized increases would mean nothing.
    """
    base = rows["original"]["percent"][cls]
    edit_up = rows[edit]["percent"][cls] - base
    control = rows[f"invisible-{cls}"]
    control_up = control["percent"][cls] - base
    p = _tests(rows["original"], control)[cls]["p"]
    ratio = edit_up / control_up if control_up > 0 and p < BLINDNESS_ALPHA else None
    return {
        "edit_increase_pct": edit_up,
        "invisible_increase_pct": control_up,
        "invisible_p": float(p),
        "ratio": ratio,
    }


# -- report ----------------------------------------------------------------------------------------
def format_study(study: dict[str, Any]) -> str:
    """The study's table as Markdown: % of levels failed by cause [95% CI], p vs original."""
    cols = ("saw", "enemy_left", "enemy_right", "other")
    lines = [
        "| model | levels | completed % | " + " | ".join(f"{c} %" for c in cols) + " |",
        "|---|---|---|" + "---|" * len(cols),
    ]
    for name, row in study["rows"].items():
        cells = []
        for c in ("complete", *cols):
            lo, hi = row["ci95"][c]
            cell = f"{row['percent'][c]:.2f} [{lo:.2f}, {hi:.2f}]"
            test = study["tests"].get(name, {}).get(c)
            if test is not None:
                cell += f" p={test['p']:.2g}"
            cells.append(cell)
        lines.append(f"| {name} | {row['levels']} | " + " | ".join(cells) + " |")
    lines.append("")
    for edit, chosen in study["edits"].items():
        b = study["blindness"][edit]
        ratio = (
            f"{b['ratio']:.2f}"
            if b["ratio"] is not None
            else "n/a (hiding the group did not raise its failures beyond chance, "
            f"p={b.get('invisible_p', 1.0):.2g}: the agent does not react to it)"
        )
        lines.append(
            f"- {edit}: feature nmf:{chosen['feature']} of layer {study['layer']} "
            f"({100 * chosen['share']:.1f}% of its attribution on {chosen['class']}; its dominant "
            f"class: {chosen['label']}); blindness ratio {ratio} "
            f"(+{b['edit_increase_pct']:.2f} points vs +{b['invisible_increase_pct']:.2f} "
            f"with the group invisible){_absent(chosen, study.get('probe_frames'))}"
        )
    if study.get("features"):
        classes = ("saw", "enemy_left", "enemy_right")
        lines += [
            "",
            f"Features of layer {study['layer']} (share of each feature's attribution; lift = share"
            " / the class's share of all positions):",
            "",
            "| feature | label | " + " | ".join(f"{c} share (lift)" for c in classes) + " |",
            "|---|---|" + "---|" * len(classes),
        ]
        for f in study["features"]:
            cells = [  # probes from before lifts were measured show the share alone
                f"{100 * f['shares'].get(c, 0.0):.1f}%"
                + (f" ({f['lift'][c]:.1f}x)" if c in f["lift"] else "")
                for c in classes
            ]
            lines.append(
                f"| nmf:{f['feature']} | {f['label']} {100 * f['share']:.1f}% | "
                + " | ".join(cells)
                + " |"
            )
    lines.append("")
    lines.append(
        "The article (10,000 levels each): "
        + "; ".join(
            f"{name} " + " / ".join(f"{v:.2f}" for v in row.values())
            for name, row in study["article"].items()
        )
        + " (% failed: saw / enemy_left / enemy_right / other)."
    )
    return "\n".join(lines) + "\n"


def plot_study(study: dict[str, Any], path: Path) -> None:
    """Grouped bars of failure % by cause (95% CI), this study beside the article's figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cols = ("saw", "enemy_left", "enemy_right", "other")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), dpi=120, sharey=False)
    x = np.arange(len(cols))
    names = list(study["rows"])
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        row = study["rows"][name]
        pct = np.array([row["percent"][c] for c in cols])
        lo = np.array([row["ci95"][c][0] for c in cols])
        hi = np.array([row["ci95"][c][1] for c in cols])
        axes[0].bar(x + (i - (len(names) - 1) / 2) * width, pct, width,
                    yerr=[pct - lo, hi - pct], capsize=2, label=name)  # fmt: skip
    levels = study["config"]["levels"]
    axes[0].set_title(f"loupe: {levels} levels per model (95% CI)")
    names = list(study["article"])
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        pct = [study["article"][name][c] for c in cols]
        axes[1].bar(x + (i - (len(names) - 1) / 2) * width, pct, width, label=name)
    axes[1].set_title("the article: 10,000 levels per model")
    for ax in axes:
        ax.set_xticks(x, cols)
        ax.set_ylabel("% of levels failed")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _feature_row(label: dict[str, Any]) -> dict[str, Any]:
    """One feature of the probe's labels, as the study reports it."""
    return {
        "feature": label["feature"],
        "label": label["label"],
        "share": label["share"],
        "shares": label["total"],
        "lift": label.get("lift") or {},
    }


def _lift(lift: float | None) -> str:
    """ ", 7.2x its area" for a chosen feature's lift on its class (nothing for older probes)."""
    return f", {lift:.1f}x its area" if lift else ""


def _absent(chosen: dict[str, Any], frames: int | None) -> str:
    """A warning where the chosen feature's class was never on screen in the probe's attributed
    frames: no feature can be found for it then, and the edit removes an arbitrary one."""
    if chosen.get("area") != 0:
        return ""
    return (
        f"; no {chosen['class']} was on screen in the probe's {frames or 'attributed'} frames, "
        "so no feature for it can be found (probe more: --probe-envs, --probe-steps, --ig-samples)"
    )
