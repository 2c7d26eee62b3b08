"""`loupe evaluate`: procgen levels per checkpoint, failure causes, table and chart."""

from __future__ import annotations

import argparse

from loupe.cli.args import DISTRIBUTION_MODES, SEED_MAX, check_out, int_range, path_arg
from loupe.errors import LoupeError


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="N CoinRun levels per checkpoint, failure rates by cause")
    p.add_argument("--checkpoint", action="append", required=True, type=path_arg,
                   help="checkpoint, repeatable; a run directory means its newest checkpoint")  # fmt: skip
    p.add_argument("--levels", type=int_range(1, 10_000_000), default=10_000,
                   help="levels per checkpoint")  # fmt: skip
    p.add_argument("--start-level", type=int_range(0, SEED_MAX), default=0, help="first level seed")
    p.add_argument("--distribution-mode", choices=DISTRIBUTION_MODES, default=None,
                   help="procgen level distribution (default: as trained)")  # fmt: skip
    p.add_argument("--workers", type=int_range(0, 4096), default=2,
                   help="Ray evaluator actors (0: in-process)")  # fmt: skip
    p.add_argument("--slots", type=int_range(1, 4096), default=16,
                   help="levels played at once per evaluator")  # fmt: skip
    p.add_argument("--chunk", type=int_range(1, 1_000_000), default=32, help="levels per task")
    p.add_argument("--no-causes", action="store_true",
                   help="plain success rates, no failure causes (default: causes)")  # fmt: skip
    p.add_argument("--seed", type=int_range(0, SEED_MAX), default=0, help="action-sampling seed")
    p.add_argument("--invisible", action="append", default=[], metavar="GROUP",
                   choices=["saw", "enemy_left", "enemy_right"],
                   help="keep a hazard group deadly but never drawn: saw, enemy_left or "
                   "enemy_right, repeatable; the invisible-hazard control (default: none)")  # fmt: skip
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default: local Ray)")
    p.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="name the checkpoint PATH (one of the --checkpoint paths) NAME in the table, chart "
        "and results (repeatable; default: an edited checkpoint's edit, e.g. 'nmf:3 of 2b "
        "projected out of RUN step N', else 'RUN step N')",
    )
    p.add_argument("--out", type=path_arg, required=True,
                   help="output directory; the same command again resumes it")  # fmt: skip
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (default: a bar per checkpoint)")  # fmt: skip
    p.set_defaults(func=cmd_evaluate)


def parse_labels(values: list[str]) -> dict[str, str]:
    """``["NAME=PATH", ...]`` -> {PATH: NAME}."""
    labels: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise LoupeError(
                f"--label wants NAME=PATH, e.g. --label saw-blind=runs/edit/checkpoints/"
                f"ckpt-000002000000.json; got {value!r}"
            )
        if path in labels:
            raise LoupeError(f"--label names {path} twice ({labels[path]!r}, {name!r}); keep one")
        labels[path] = name.strip()
    return labels


def cmd_evaluate(args: argparse.Namespace) -> int:
    from learner.checkpoint import find_checkpoint
    from loupe.distributed.evaluate import EvalConfig, evaluate, format_table

    check_out(args.out, "--out")
    if args.start_level + args.levels - 1 > SEED_MAX:
        raise LoupeError(f"--start-level + --levels must stay below {SEED_MAX + 1} (level seeds)")
    cfg = EvalConfig(
        checkpoints=[str(find_checkpoint(c)) for c in args.checkpoint],
        out=args.out,
        levels=args.levels,
        start_level=args.start_level,
        distribution_mode=args.distribution_mode,
        workers=args.workers,
        slots=args.slots,
        chunk=args.chunk,
        causes=not args.no_causes,
        seed=args.seed,
        ray_address=args.ray_address,
        invisible=args.invisible,
        labels={
            str(find_checkpoint(path)): name for path, name in parse_labels(args.label).items()
        },
    )
    summary = evaluate(cfg, progress=not args.no_progress, echo=print)
    print(format_table(summary))
    print(f"results: {args.out}/results.json, chart: {args.out}/failure_causes.png")
    return 0
