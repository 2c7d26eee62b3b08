"""`loupe study edits`: probe -> label -> edit -> evaluate -> the article's edit table."""

from __future__ import annotations

import argparse

from loupe.cli.args import SEED_MAX, int_range, path_arg
from loupe.errors import LoupeError

#: the shipped CoinRun agent's training settings, used by ``--train``
TRAIN_SETTINGS = {
    "env": "procgen:coinrun",
    "policy": "interpretable",
    "preset": "procgen",
    "env_option": ["num_levels=0", "distribution_mode=easy"],
    # bf16 where the CPU has it (the shipped agent's), fp32 elsewhere, instead of refusing to run
    "precision": "auto",
    "checkpoint_every": 4,
}


def register(sub) -> None:
    p = sub.add_parser("study", help="end-to-end experiments (edits: the article's edit table)")
    studies = p.add_subparsers(dest="study", required=True, metavar="STUDY")
    e = studies.add_parser(
        "edits",
        help="probe, label features by game state, blind the saw and left-enemy features, "
        "evaluate against invisible-hazard controls",
    )
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=path_arg, help="a CoinRun checkpoint (.json) to study")
    src.add_argument("--train", action="store_true",
                     help="train the shipped agent's settings in OUT/train first (resumes)")  # fmt: skip
    e.add_argument("--total-steps", type=int_range(1), default=25_000_000,
                   help="with --train: environment steps (default: 25000000)")  # fmt: skip
    e.add_argument("--out", type=path_arg, required=True, help="study directory (resumable)")
    e.add_argument(
        "--levels",
        type=int_range(1, 10_000_000),
        default=10_000,
        help="levels per model (default: 10000)",
    )
    e.add_argument("--start-level", type=int_range(0, SEED_MAX), default=100_000,
                   help="first level seed of the evaluation (default: 100000)")  # fmt: skip
    e.add_argument(
        "--workers", type=int_range(0, 4096), default=2, help="Ray evaluators (default: 2)"
    )
    e.add_argument("--probe-envs", type=int_range(1, 4096), default=64,
                   help="probe environments: each plays levels of its own, and enemies are in "
                   "few levels (default: 64)")  # fmt: skip
    e.add_argument("--probe-steps", type=int_range(1, 100_000), default=64,
                   help="probe steps per env (default: 64)")  # fmt: skip
    e.add_argument("--ig-samples", type=int_range(1, 1_000_000), default=256,
                   help="frames attributed for the NMF and the labels (default: 256)")  # fmt: skip
    e.add_argument("--probe-frames", choices=("even", "hazards"), default="hazards",
                   help="how those frames are chosen: up to 1/8 of them showing each hazard "
                   "(saw, enemy_left, enemy_right, lava), the rest evenly spread, or all evenly "
                   "spread (default: hazards)")  # fmt: skip
    e.add_argument(
        "--nmf-components", type=int_range(1, 1024), default=8, help="NMF features (default: 8)"
    )
    e.add_argument(
        "--seed",
        type=int_range(0, SEED_MAX),
        default=0,
        help="probe and evaluation seed (default: 0)",
    )
    e.add_argument("--no-progress", action="store_true", help="no progress bars (default: bars)")
    e.set_defaults(func=cmd_study_edits)


def _train(args: argparse.Namespace) -> str:
    from pathlib import Path

    from learner.checkpoint import latest_checkpoint
    from loupe.cli import build_train_config, train_namespace
    from loupe.rundir import RunDir
    from loupe.train import TrainConfig, Trainer

    run_dir = Path(args.out) / "train"
    if (run_dir / "config.json").is_file():
        config = TrainConfig.load(run_dir / "config.json")
        config.run_dir = str(run_dir)
        config.ppo.total_steps = args.total_steps
        trainer = Trainer(config, resume=True, progress=not args.no_progress)
        print(f"[0/5] train: resuming {run_dir} at step {trainer.learner.global_step}")
    else:
        ns = train_namespace(**TRAIN_SETTINGS, total_steps=args.total_steps, run_dir=str(run_dir))
        config = build_train_config(ns)
        run = RunDir(config.run_dir)
        run.check_new()
        trainer = Trainer(config, progress=not args.no_progress)
        run.create()
        config.save(run.config_path)
        print(f"[0/5] train: {config.policy} on CoinRun, {args.total_steps} steps -> {run_dir}")
    if trainer.learner.global_step < config.ppo.total_steps:
        trainer.train()
    path = latest_checkpoint(run_dir)
    if path is None:
        raise LoupeError(f"{run_dir} has no checkpoint; rerun to continue training")
    return str(path)


def cmd_study_edits(args: argparse.Namespace) -> int:
    from learner.checkpoint import find_checkpoint
    from loupe.study import EditStudy, StudyConfig

    checkpoint = _train(args) if args.train else str(find_checkpoint(args.checkpoint))
    config = StudyConfig(
        checkpoint=checkpoint,
        out=args.out,
        levels=args.levels,
        start_level=args.start_level,
        probe_envs=args.probe_envs,
        probe_steps=args.probe_steps,
        ig_samples=args.ig_samples,
        probe_frames=args.probe_frames,
        nmf_components=args.nmf_components,
        workers=args.workers,
        seed=args.seed,
    )
    from loupe.study import format_study

    study = EditStudy(config, progress=not args.no_progress).run()
    print(format_study(study))
    return 0
