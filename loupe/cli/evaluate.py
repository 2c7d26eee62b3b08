"""`loupe evaluate`: procgen levels per checkpoint, failure causes, table and chart."""

from __future__ import annotations

import argparse

from loupe.errors import LoupeError


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="N CoinRun levels per checkpoint, failure rates by cause")
    p.add_argument("--checkpoint", action="append", required=True, help="checkpoint (repeatable)")
    p.add_argument("--levels", type=int, default=10_000, help="levels per checkpoint")
    p.add_argument("--start-level", type=int, default=0, help="first level seed")
    p.add_argument("--distribution-mode", default=None, help="easy or hard (default: as trained)")
    p.add_argument("--workers", type=int, default=2, help="Ray evaluator actors (0: in-process)")
    p.add_argument("--slots", type=int, default=16, help="levels played at once per evaluator")
    p.add_argument("--chunk", type=int, default=32, help="levels per task")
    p.add_argument("--no-causes", action="store_true", help="plain success rates, no causes")
    p.add_argument("--seed", type=int, default=0, help="action-sampling seed")
    p.add_argument("--invisible", action="append", default=[], metavar="GROUP",
                   help="keep a hazard group deadly but never drawn: saw, enemy_left or "
                   "enemy_right (repeatable; the invisible-hazard control)")  # fmt: skip
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default: local)")
    p.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="name the checkpoint PATH (one of the --checkpoint paths) NAME in the table, chart "
        "and results (repeatable; default: an edited checkpoint's edit, e.g. 'nmf:3 of 2b "
        "projected out of RUN step N', else 'RUN step N')",
    )
    p.add_argument("--out", required=True, help="output directory (resumable)")
    p.add_argument("--no-progress", action="store_true")
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
    from loupe.distributed.evaluate import EvalConfig, evaluate, format_table

    cfg = EvalConfig(
        checkpoints=args.checkpoint,
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
        labels=parse_labels(args.label),
    )
    summary = evaluate(cfg, progress=not args.no_progress, echo=print)
    print(format_table(summary))
    print(f"results: {args.out}/results.json, chart: {args.out}/failure_causes.png")
    return 0
