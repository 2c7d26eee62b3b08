"""`loupe bench`: run the benchmarks and write one JSON file."""

from __future__ import annotations

import argparse
import json

from loupe.cli.args import check_out, float_range, int_range, path_arg
from loupe.errors import LoupeError


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks, JSON out")
    p.add_argument("--out", type=path_arg, default="bench/results.json", help="JSON output file")
    p.add_argument("--only", action="append", default=[],
                   help="run only this benchmark, repeatable (default: all)")  # fmt: skip
    p.add_argument("--seconds", type=float_range(0.0, 3600.0, lo_open=True), default=3.0,
                   help="seconds per throughput figure")  # fmt: skip
    p.add_argument("--updates", type=int_range(1, 10_000), default=3,
                   help="timed PPO updates per measurement")  # fmt: skip
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from loupe.bench import BENCHMARKS, BenchConfig, run_benchmarks
    from loupe.config import save_json

    out = check_out(args.out, "--out", kind="file")
    unknown = [n for n in args.only if n not in BENCHMARKS]
    if unknown:
        raise LoupeError(f"unknown benchmark(s) {unknown}; choose from {sorted(BENCHMARKS)}")
    results = run_benchmarks(
        BenchConfig(only=tuple(args.only), seconds=args.seconds, updates=args.updates)
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    save_json(out, results)
    print(json.dumps(results, indent=2, sort_keys=True))
    print(f"written to {out}")
    return 0
