"""`loupe bench`: run the benchmarks and write one JSON file."""

from __future__ import annotations

import argparse
import json

from loupe.cli.args import check_out, float_range, int_range, path_arg
from loupe.errors import LoupeError


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks, JSON out")
    p.add_argument("--out", type=path_arg, default=None,
                   help="JSON output file (default: bench/results.json, with --gpu bench/gpu.json)")  # fmt: skip
    p.add_argument("--only", action="append", default=[],
                   help="run only this benchmark, repeatable (default: all)")  # fmt: skip
    p.add_argument("--merge", action="store_true",
                   help="keep the sections of an existing --out file that this run does not "
                   "write, e.g. --only ig_captum --merge --out bench/peer.json (default: off)")  # fmt: skip
    p.add_argument("--seconds", type=float_range(0.0, 3600.0, lo_open=True), default=3.0,
                   help="seconds per throughput figure")  # fmt: skip
    p.add_argument("--updates", type=int_range(1, 10_000), default=3,
                   help="timed PPO updates per measurement")  # fmt: skip
    p.add_argument("--gpu", action="store_true",
                   help="the GPU benchmark: end to end with central inference for 1..N actors, "
                   "learner only (fp32/bf16, 1..#GPUs learners), IG, evaluation (default: off)")  # fmt: skip
    p.add_argument("--device", default="cuda",
                   help="with --gpu: the device, cpu only with --quick (default: cuda)")  # fmt: skip
    p.add_argument("--quick", action="store_true",
                   help="with --gpu: tiny sizes, a dry run (default: off)")  # fmt: skip
    p.add_argument("--budget-s", type=float_range(0.0, 86_400.0, lo_open=True), default=360.0,
                   help="with --gpu: seconds the benchmark may take; parts that do not fit are "
                   "skipped")  # fmt: skip
    p.add_argument("--rounds", type=int_range(1, 100), default=2,
                   help="A/B alternation rounds (default: 2)")  # fmt: skip
    p.add_argument("--peer-python", type=path_arg, default=".venv-peer/bin/python",
                   help="python of the cleanrl environment, peer benchmark (default: "
                   ".venv-peer/bin/python)")  # fmt: skip
    p.add_argument("--peer-steps", type=int_range(1, 10_000_000), default=32_768,
                   help="steps per peer training run (default: 32768)")  # fmt: skip
    p.add_argument("--peer-num-envs", type=int_range(1, 4096), default=64,
                   help="envs of the peer runs (default: 64)")  # fmt: skip
    p.add_argument("--peer-num-steps", type=int_range(1, 100_000), default=256,
                   help="steps per env per batch of the peer runs (default: 256)")  # fmt: skip
    p.add_argument("--minibatch", type=int_range(1, 1_000_000), default=2048,
                   help="samples per update-lever step (default: 2048)")  # fmt: skip
    p.add_argument("--steps", type=int_range(1, 10_000), default=2,
                   help="timed Adam steps per update lever (default: 2)")  # fmt: skip
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from loupe.bench import (
        BENCHMARKS,
        BenchConfig,
        GpuBenchConfig,
        run_benchmarks,
        run_gpu_benchmarks,
    )
    from loupe.config import save_json

    if args.gpu:
        if args.only:
            raise LoupeError("--only selects `loupe bench` figures; --gpu runs its own set")
        if args.merge:
            raise LoupeError("--merge keeps sections of `loupe bench` files; --gpu writes its own")
        if args.budget_s <= 0:
            raise LoupeError(f"--budget-s must be positive, got {args.budget_s}")
        out = check_out(args.out or "bench/gpu.json", "--out", kind="file")
        results = run_gpu_benchmarks(
            GpuBenchConfig(device=args.device, quick=args.quick, budget_s=args.budget_s)
        )
    else:
        out = check_out(args.out or "bench/results.json", "--out", kind="file")
        unknown = [n for n in args.only if n not in BENCHMARKS]
        if unknown:
            raise LoupeError(f"unknown benchmark(s) {unknown}; choose from {sorted(BENCHMARKS)}")
        kept = _kept_sections(out) if args.merge else {}
        results = run_benchmarks(
            BenchConfig(
                only=tuple(args.only),
                seconds=args.seconds,
                updates=args.updates,
                rounds=args.rounds,
                peer_python=args.peer_python,
                peer_steps=args.peer_steps,
                minibatch=args.minibatch,
                peer_num_envs=args.peer_num_envs,
                peer_num_steps=args.peer_num_steps,
                steps=args.steps,
            )
        )
    if args.merge:
        results = {**kept, **results}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_json(out, results)
    print(json.dumps(results, indent=2, sort_keys=True))
    print(f"written to {out}")
    return 0


def _kept_sections(out) -> dict:
    """The sections of an existing ``--out`` file for --merge (read before anything runs)."""
    from loupe.config import load_json

    if not out.exists():
        return {}
    data = load_json(out)
    if not isinstance(data, dict):
        raise LoupeError(f"--merge: {out} holds no JSON object; leave out --merge to replace it")
    return data
