"""`loupe compare-placements`: actor vs central inference, same seeds and budget, JSON + plot."""

from __future__ import annotations

import argparse
import json


def register(sub) -> None:
    p = sub.add_parser(
        "compare-placements",
        help="train with --inference actor and central on the same seeds; compare the results",
    )
    p.add_argument("--env", default="procgen:coinrun", help="procgen environment id")
    p.add_argument("--num-levels", type=int, default=200, help="training levels")
    p.add_argument("--distribution-mode", default="easy")
    p.add_argument("--policy", default="nature", help="policy name (see `loupe policies`)")
    p.add_argument("--num-envs", type=int, default=32, help="environments per run")
    p.add_argument("--num-steps", type=int, default=128, help="steps per env per update")
    p.add_argument("--total-steps", type=int, default=160_000, help="environment steps per run")
    p.add_argument("--actors", type=int, default=1, help="Ray rollout actors per run")
    p.add_argument("--actor-lag", type=int, default=1, help="policy lag of the actor placement")
    p.add_argument("--proximal", choices=["auto", "behaviour", "learner"], default="auto",
                   help="PPO ratio anchor of every run (learner: decoupled PPO; auto: learner "
                   "for stale batches)")  # fmt: skip
    p.add_argument("--placements", nargs="+", choices=["actor", "central"],
                   default=["actor", "central"], help="placements to train")  # fmt: skip
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--out", default="bench/placement", help="output directory (resumable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    from loupe.placement import PlacementConfig, compare_placements

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
