"""`loupe bench`: run the benchmarks and write one JSON file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks, JSON out")
    p.add_argument("--out", default=None,
                   help="JSON output file (default bench/results.json, with --gpu bench/gpu.json)")  # fmt: skip
    p.add_argument("--only", action="append", default=[], help="run only this benchmark")
    p.add_argument("--seconds", type=float, default=3.0, help="seconds per throughput figure")
    p.add_argument("--updates", type=int, default=3, help="timed PPO updates per measurement")
    p.add_argument("--gpu", action="store_true",
                   help="the GPU benchmark: end to end with central inference for 1..N actors, "
                   "learner only (fp32/bf16, 1..#GPUs learners), IG, evaluation")  # fmt: skip
    p.add_argument(
        "--device", default="cuda", help="with --gpu: the device (cpu only with --quick)"
    )
    p.add_argument("--quick", action="store_true", help="with --gpu: tiny sizes, a dry run")
    p.add_argument("--budget-s", type=float, default=360.0,
                   help="with --gpu: seconds the benchmark may take; parts that do not fit are skipped")  # fmt: skip
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from loupe.bench import BenchConfig, GpuBenchConfig, run_benchmarks, run_gpu_benchmarks
    from loupe.config import save_json
    from loupe.errors import LoupeError

    if args.gpu:
        if args.only:
            raise LoupeError("--only selects `loupe bench` figures; --gpu runs its own set")
        if args.budget_s <= 0:
            raise LoupeError(f"--budget-s must be positive, got {args.budget_s}")
        results = run_gpu_benchmarks(
            GpuBenchConfig(device=args.device, quick=args.quick, budget_s=args.budget_s)
        )
    else:
        results = run_benchmarks(
            BenchConfig(only=tuple(args.only), seconds=args.seconds, updates=args.updates)
        )
    out = Path(args.out or ("bench/gpu.json" if args.gpu else "bench/results.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    save_json(out, results)
    print(json.dumps(results, indent=2, sort_keys=True))
    print(f"written to {out}")
    return 0
