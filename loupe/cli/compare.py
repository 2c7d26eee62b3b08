"""`loupe compare-placements`: actor vs central inference, same seeds and budget, JSON + plot."""

from __future__ import annotations

import argparse
import json

from loupe.cli import MAX_ENVS, MAX_STEPS, MAX_WORKERS
from loupe.cli.args import DISTRIBUTION_MODES, SEED_MAX, check_out, int_range, path_arg
from loupe.errors import LoupeError


def register(sub) -> None:
    p = sub.add_parser(
        "compare-placements",
        help="train with --inference actor and central on the same seeds; compare the results",
    )
    p.add_argument("--env", default="procgen:coinrun", help="procgen environment id")
    p.add_argument("--num-levels", type=int_range(0, SEED_MAX), default=200,
                   help="training levels (0: unlimited)")  # fmt: skip
    p.add_argument("--distribution-mode", choices=DISTRIBUTION_MODES, default="easy",
                   help="procgen distribution mode")  # fmt: skip
    p.add_argument("--policy", default="nature", help="policy name (see `loupe policies`)")
    p.add_argument("--num-envs", type=int_range(1, MAX_ENVS), default=32,
                   help="environments per run")  # fmt: skip
    p.add_argument("--num-steps", type=int_range(1, MAX_STEPS), default=128,
                   help="steps per env per update")  # fmt: skip
    p.add_argument("--total-steps", type=int_range(1), default=160_000,
                   help="environment steps per run")  # fmt: skip
    p.add_argument("--actors", type=int_range(1, MAX_WORKERS), default=1,
                   help="Ray rollout actors per run")  # fmt: skip
    p.add_argument("--actor-lag", type=int_range(0, 1000), default=1,
                   help="policy lag of the actor placement")  # fmt: skip
    p.add_argument("--proximal", choices=["auto", "behaviour", "learner"], default="auto",
                   help="PPO ratio anchor of every run (learner: decoupled PPO; auto: learner "
                   "for stale batches)")  # fmt: skip
    p.add_argument("--placements", nargs="+", choices=["actor", "central"],
                   default=["actor", "central"], help="placements to train")  # fmt: skip
    p.add_argument("--seeds", type=int_range(0, SEED_MAX), nargs="+", default=[1, 2, 3],
                   help="training seeds, one run per placement and seed")  # fmt: skip
    p.add_argument("--out", type=path_arg, default="bench/placement",
                   help="output directory; the same command again resumes it")  # fmt: skip
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (default: a bar per run)")  # fmt: skip
    p.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    from attention import list_policies
    from loupe.placement import PlacementConfig, compare_placements

    check_out(args.out, "--out")
    if args.policy not in list_policies():
        raise LoupeError(
            f"unknown --policy {args.policy!r}; choose one of {', '.join(list_policies())}"
        )
    cfg = PlacementConfig(
        env_id=args.env,
        num_levels=args.num_levels,
        distribution_mode=args.distribution_mode,
        policy=args.policy,
        num_envs=args.num_envs,
        num_steps=args.num_steps,
        total_steps=args.total_steps,
        actors=args.actors,
        actor_lag=args.actor_lag,
        proximal=args.proximal,
        placements=tuple(args.placements),
        seeds=tuple(args.seeds),
        out=args.out,
    )
    summary = compare_placements(cfg, progress=not args.no_progress)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2))
    print(f"written to {cfg.out}/summary.json and {cfg.out}/curves.png")
    return 0
