"""`loupe compare-placements`: does ``--inference central`` learn what ``--inference actor`` learns?

Both placements train the same task from the same seeds (same initial weights, same environment
seeds, same action-sampling seed); only where the policy runs while sampling differs, and with it
the policy lag (``actor`` pipelines the next batch while the learner updates: lag 1; ``central``
acts with the learner's own network: lag 0). Each run's final figure is the mean return of its last
100 training episodes. The summary gives both placements' means, the paired per-seed differences,
Welch's t-test and a 95% interval of the difference, and a plot of every learning curve.

Runs are written one by one under ``<out>/runs``; rerunning the same command skips finished runs,
so an interrupted comparison loses at most the run in progress.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from loupe.config import load_json, save_json, to_dict
from loupe.errors import LoupeError

log = logging.getLogger("loupe.placement")

PLACEMENTS = ("actor", "central")


@dataclasses.dataclass
class PlacementConfig:
    """One placement comparison: the task, the budget per run, and the seeds."""

    env_id: str = "procgen:coinrun"
    num_levels: int = 200
    distribution_mode: str = "easy"
    policy: str = "nature"
    #: environments in all, split over ``actors`` Ray rollout actors
    num_envs: int = 32
    num_steps: int = 128
    minibatches: int = 4
    epochs: int = 3
    #: environment steps per run
    total_steps: int = 160_000
    actors: int = 1
    #: policy lag of the ``actor`` placement (``central`` is always 0)
    actor_lag: int = 1
    #: PPO ratio anchor of every run: "auto", "behaviour" (classic) or "learner" (decoupled PPO)
    proximal: str = "auto"
    seeds: tuple[int, ...] = (1, 2, 3)
    placements: tuple[str, ...] = PLACEMENTS
    out: str = "bench/placement"

    def __post_init__(self):
        if not self.env_id.startswith("procgen:"):
            raise LoupeError(f"compare-placements trains procgen games; got {self.env_id!r}")
        unknown = [p for p in self.placements if p not in PLACEMENTS]
        if unknown:
            raise LoupeError(f"unknown placement(s) {unknown}; choose from {list(PLACEMENTS)}")
        if len(set(self.seeds)) != len(self.seeds) or not self.seeds:
            raise LoupeError("--seeds needs one or more distinct seeds")
        if self.total_steps < self.num_envs * self.num_steps:
            raise LoupeError(
                f"--total-steps {self.total_steps} is less than one batch "
                f"({self.num_envs} envs x {self.num_steps} steps)"
            )

    def train_config(self, placement: str, seed: int, run_dir: Path):
        from actors import EnvConfig
        from learner import PPOConfig
        from loupe.train import TrainConfig

        ppo = PPOConfig.preset(
            "procgen",
            num_envs=self.num_envs,
            num_steps=self.num_steps,
            num_minibatches=self.minibatches,
            update_epochs=self.epochs,
            total_steps=self.total_steps,
            seed=seed,
            proximal=self.proximal,
        )
        env = EnvConfig(
            self.env_id,
            num_envs=self.num_envs,
            seed=seed,
            num_levels=self.num_levels,
            distribution_mode=self.distribution_mode,
        )
        return TrainConfig(
            env=env,
            ppo=ppo,
            run_dir=str(run_dir),
            policy=self.policy,
            preset="procgen",
            checkpoint_every=10,
            device="cpu",
            actors=self.actors,
            inference=placement,
            max_policy_lag=self.actor_lag if placement == "actor" else 0,
            announce=False,
        )


def as_json(config) -> dict[str, Any]:
    """A config dataclass as it reads back from its JSON file (tuples become lists)."""
    return json.loads(json.dumps(to_dict(config)))


def run_one(cfg: PlacementConfig, placement: str, seed: int, progress: bool) -> dict[str, Any]:
    """Train one run (or read it back when it finished before) -> its result record."""
    from loupe.rundir import RunDir
    from loupe.train import Trainer

    runs = Path(cfg.out) / "runs"
    run_dir = runs / f"{placement}-seed{seed}"
    result_path = runs / f"{placement}-seed{seed}.json"
    train_cfg = cfg.train_config(placement, seed, run_dir)
    if result_path.exists():
        result = load_json(result_path)
        if result.get("config") == as_json(train_cfg):
            return result
        raise LoupeError(
            f"{result_path} was trained with other settings; use another --out or delete it"
        )
    if run_dir.exists():  # a run cut off mid-way: its curve is incomplete, train it again
        log.warning("%s was cut off; training it again from step 0", run_dir)
        shutil.rmtree(run_dir)
    RunDir(str(run_dir)).create()
    train_cfg.save(run_dir / "config.json")
    trainer = Trainer(train_cfg, progress=progress)
    t0 = time.perf_counter()
    last = trainer.train()
    wall = time.perf_counter() - t0
    history = trainer.history
    result = {
        "placement": placement,
        "seed": seed,
        # None when no episode ended within the budget (the summary then asks for more steps)
        "final_return": last.get("mean_return_100"),
        "steps": int(trainer.learner.global_step),
        "wall_s": wall,
        "steps_per_s": trainer.learner.global_step / wall,
        "max_policy_lag": max(h["policy_lag"] for h in history),
        "curve": [[h["step"], h.get("mean_return_100")] for h in history],
        "config": as_json(train_cfg),
    }
    save_json(result_path, result)
    return result


def welch(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Welch's t-test of mean(a) - mean(b) with its 95% interval (Welch-Satterthwaite dof)."""
    from scipy import stats

    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    diff = float(a.mean() - b.mean())
    se = math.sqrt(va + vb)
    if se == 0:
        return {"diff": diff, "t": math.nan, "dof": math.nan, "p": math.nan, "ci95": [diff, diff]}
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    t = diff / se
    half = float(stats.t.ppf(0.975, dof)) * se
    return {
        "diff": diff,
        "t": t,
        "dof": dof,
        "p": float(2 * stats.t.sf(abs(t), dof)),
        "ci95": [diff - half, diff + half],
    }


#: the figures compared, per run
METRICS = {
    "final_return": "mean return of the last 100 training episodes at the end of the run",
    "late_return": "mean of that figure over the updates of the last quarter of the run",
}


def late_return(curve: list) -> float:
    """Mean of the curve's mean_return_100 over the updates in the last quarter of the steps."""
    points = [(step, v) for step, v in curve if v is not None]
    end = points[-1][0]
    return float(np.mean([v for step, v in points if step >= 0.75 * end]))


def compare(a: np.ndarray, c: np.ndarray, seeds: tuple[int, ...]) -> dict[str, Any]:
    """actor - central: Welch's test, the paired per-seed differences and their t-test."""
    from scipy import stats

    test = welch(a, c)
    paired = a - c
    test["paired_diffs"] = {str(s): float(d) for s, d in zip(seeds, paired)}
    test["paired_p"] = float(stats.ttest_rel(a, c).pvalue) if paired.std() > 0 else math.nan
    test["seed_sd"] = max(float(a.std(ddof=1)), float(c.std(ddof=1)))
    # within noise: the 95% interval of the difference holds 0
    test["within_noise"] = bool(test["ci95"][0] <= 0 <= test["ci95"][1])
    return test


def summarise(results: list[dict[str, Any]], cfg: PlacementConfig) -> dict[str, Any]:
    """Per-placement statistics of each metric, and actor - central for each (Welch, paired)."""
    unfinished = [f"{r['placement']}-seed{r['seed']}" for r in results if r["final_return"] is None]
    if unfinished:
        raise LoupeError(
            f"no episode ended in {', '.join(unfinished)}; raise --total-steps so that every run "
            "finishes episodes"
        )
    by = {p: {r["seed"]: r for r in results if r["placement"] == p} for p in cfg.placements}
    values = {
        p: {
            "final_return": np.array([runs[s]["final_return"] for s in cfg.seeds]),
            "late_return": np.array([late_return(runs[s]["curve"]) for s in cfg.seeds]),
        }
        for p, runs in by.items()
    }
    summary: dict[str, Any] = {"config": to_dict(cfg), "metrics": METRICS, "placements": {}}
    for p, runs in by.items():
        entry: dict[str, Any] = {}
        for metric, v in values[p].items():
            entry[metric] = {
                "per_seed": {str(s): float(x) for s, x in zip(cfg.seeds, v)},
                "mean": float(v.mean()),
                "sd": float(v.std(ddof=1)) if len(v) > 1 else math.nan,
            }
        entry["steps_per_s"] = float(np.mean([runs[s]["steps_per_s"] for s in cfg.seeds]))
        entry["max_policy_lag"] = max(runs[s]["max_policy_lag"] for s in cfg.seeds)
        summary["placements"][p] = entry
    if set(PLACEMENTS) <= set(by) and len(cfg.seeds) > 1:
        summary["actor_minus_central"] = {
            metric: compare(values["actor"][metric], values["central"][metric], cfg.seeds)
            for metric in METRICS
        }
    return summary


def plot(results: list[dict[str, Any]], cfg: PlacementConfig, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"actor": "tab:blue", "central": "tab:orange"}
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in results:
        curve = np.array([(s, np.nan if v is None else v) for s, v in r["curve"]], dtype=float)
        label = f"{r['placement']} (seed {r['seed']})"
        ax.plot(curve[:, 0], curve[:, 1], color=colours[r["placement"]], alpha=0.8, lw=1.2,
                ls=["-", "--", ":", "-."][cfg.seeds.index(r["seed"]) % 4], label=label)  # fmt: skip
    ax.set_xlabel("environment steps")
    ax.set_ylabel("mean return, last 100 episodes")
    ax.set_title(f"{cfg.env_id} ({cfg.num_levels} levels, {cfg.distribution_mode}), {cfg.policy}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare_placements(
    cfg: PlacementConfig, echo: Callable[[str], None] = print, progress: bool = True
) -> dict[str, Any]:
    """Train every (seed, placement) run that is not done yet, then summarise and plot."""
    out = Path(cfg.out)
    settings = as_json(cfg)
    if (out / "config.json").exists():  # more seeds may join a comparison; other settings may not
        before = load_json(out / "config.json")
        defaults = as_json(PlacementConfig())  # for settings added since
        changed = sorted(
            k
            for k in settings
            if k not in ("seeds", "out") and before.get(k, defaults[k]) != settings[k]
        )
        if changed:
            raise LoupeError(
                f"{out} holds a comparison with other settings ({', '.join(changed)}); "
                "use another --out"
            )
    out.mkdir(parents=True, exist_ok=True)
    save_json(out / "config.json", settings)
    results = []
    total = len(cfg.seeds) * len(cfg.placements)
    for seed in cfg.seeds:
        for placement in cfg.placements:
            echo(f"[{len(results) + 1}/{total}] {placement} inference, seed {seed}")
            r = run_one(cfg, placement, seed, progress)
            ret = "no episode ended" if r["final_return"] is None else f"{r['final_return']:.2f}"
            echo(f"    final mean return {ret}, {r['steps_per_s']:.0f} steps/s")
            results.append(r)
    summary = summarise(results, cfg)
    save_json(out / "summary.json", summary)
    plot(results, cfg, out / "curves.png")
    return summary
