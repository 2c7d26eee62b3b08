"""`loupe bench`: run the benchmarks and write one JSON file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks, JSON out")
    p.add_argument("--out", default="bench/results.json", help="JSON output file")
    p.add_argument("--only", action="append", default=[], help="run only this benchmark")
    p.add_argument("--seconds", type=float, default=3.0, help="seconds per throughput figure")
    p.add_argument("--updates", type=int, default=3, help="timed PPO updates per measurement")
    p.add_argument("--rounds", type=int, default=2, help="A/B alternation rounds")
    p.add_argument("--peer-python", default=".venv-peer/bin/python",
                   help="python of the cleanrl environment (peer benchmark)")  # fmt: skip
    p.add_argument("--peer-steps", type=int, default=32_768, help="steps per peer training run")
    p.add_argument("--peer-num-envs", type=int, default=64, help="envs of the peer runs")
    p.add_argument("--peer-num-steps", type=int, default=256, help="steps per env per batch")
    p.add_argument("--minibatch", type=int, default=2048, help="samples per update-lever step")
    p.add_argument("--steps", type=int, default=2, help="timed Adam steps per update lever")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from loupe.bench import BenchConfig, run_benchmarks
    from loupe.config import save_json

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
        )  # fmt: skip
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_json(out, results)
    print(json.dumps(results, indent=2, sort_keys=True))
    print(f"written to {out}")
    return 0
