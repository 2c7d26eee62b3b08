"""`loupe soak`: the billion-step readiness benchmark (a long run under chaos, measured)."""

from __future__ import annotations

import argparse

from loupe.cli.args import check_out, float_range, path_arg
from loupe.errors import LoupeError


def register(sub) -> None:
    p = sub.add_parser(
        "soak",
        help="benchmark: distributed CoinRun training, a probe worker and Redis under a chaos "
        "schedule, sampled; JSON and a plot out",
    )
    p.add_argument("--minutes", type=float_range(0.0, 10_080.0, lo_open=True), default=20.0,
                   help="length of the soak in minutes, without the drain at the end")  # fmt: skip
    p.add_argument("--out", type=path_arg, default="bench/soak.json", help="JSON report")
    p.add_argument("--plot", type=path_arg, default="bench/soak.png", help="PNG plot")
    p.add_argument("--sample-s", type=float_range(0.5, 600.0), default=5.0,
                   help="seconds between samples")  # fmt: skip
    p.add_argument("--kill-every", type=float_range(10.0, 86_400.0), default=None,
                   help="seconds between kills (default: the window after the warm-up split over "
                   "the four components, at most 180)")  # fmt: skip
    p.add_argument("--stall-s", type=float_range(10.0, 86_400.0), default=180.0,
                   help="seconds without progress that count as a stall")  # fmt: skip
    p.add_argument("--no-chaos", action="store_true",
                   help="kill nothing, only sample (default: the chaos schedule)")  # fmt: skip
    p.add_argument("--work-dir", type=path_arg, default=None,
                   help="new directory for the run and its logs, kept (default: a temporary one, "
                   "removed afterwards)")  # fmt: skip
    p.set_defaults(func=cmd_soak)


def cmd_soak(args: argparse.Namespace) -> int:
    from loupe.soak.harness import Soak, SoakConfig

    out = check_out(args.out, "--out", kind="file")
    plot = check_out(args.plot, "--plot", kind="file")
    if args.work_dir is not None:
        work = check_out(args.work_dir, "--work-dir")
        if work.is_dir() and any(work.iterdir()):
            raise LoupeError(f"--work-dir {work} is not empty; choose a new or empty directory")
    config = SoakConfig(
        minutes=args.minutes,
        sample_s=args.sample_s,
        kill_every_s=args.kill_every,
        stall_s=args.stall_s,
        chaos=not args.no_chaos,
        work_dir=args.work_dir,
    )
    config.schedule()  # a soak too short for its kills is refused before anything starts
    report = Soak(config, out=out, plot=plot).run()
    counts = report["counts"]
    kills = ", ".join(f"{k['component']} {_back(k['back_s'])}" for k in report["kills"])
    print(
        f"checkpoints written/announced/probed: {counts['written']}/{counts['announced']}/"
        f"{counts['probed']}; kills: {kills or 'none'}"
    )
    for line in report["violations"]:
        print(f"missed: {line}")
    print(f"report in {out}, plot in {plot}")
    return 0


def _back(seconds: float | None) -> str:
    return "not back" if seconds is None else f"back in {seconds:.0f} s"
