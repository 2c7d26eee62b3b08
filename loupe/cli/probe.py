"""`loupe probe` (one checkpoint, or follow a run) and `loupe edit`."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from loupe.cli.args import check_out, float_range, int_range, path_arg
from loupe.config import load_json
from loupe.errors import LoupeError


def register(sub) -> None:
    p = sub.add_parser("probe", help="interpretability probes for a checkpoint or a whole run")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=path_arg,
                     help="analyse this checkpoint once (needs --out); a run directory means its "
                     "newest checkpoint (this or --run is required)")  # fmt: skip
    src.add_argument(
        "--run",
        type=path_arg,
        help="follow this run's checkpoint stream (this or --checkpoint is required)",
    )
    p.add_argument("--out", type=path_arg, help="new output directory for --checkpoint (required)")
    p.add_argument("--layer", default=None, help="analysis layer (default: the policy's)")
    p.add_argument("--num-envs", type=int_range(1, 1024), default=8, help="environments recorded")
    p.add_argument("--num-steps", type=int_range(1, 100_000), default=128,
                   help="steps recorded per environment")  # fmt: skip
    p.add_argument("--ig-samples", type=int_range(1, 100_000), default=64,
                   help="observations attributed with integrated gradients")  # fmt: skip
    p.add_argument("--frames", choices=("even", "hazards"), default="even",
                   help="how the attributed observations are chosen: evenly spread over the "
                   "recording, or (CoinRun) up to 1/8 of them showing each hazard (saw, "
                   "enemy_left, enemy_right, lava) so that rare objects can be labelled "
                   "(default: even)")  # fmt: skip
    p.add_argument("--nmf-components", type=int_range(1, 1024), default=8,
                   help="NMF features of the attributions")  # fmt: skip
    p.add_argument("--smoothgrad-copies", type=int_range(1, 10_000), default=50,
                   help="noisy copies per SmoothGrad saliency map")  # fmt: skip
    p.add_argument("--redis", default=None, help="redis://... (default: the run's private server)")
    p.add_argument("--workers", type=int_range(1, 64), default=1, help="probe worker processes")
    p.add_argument("--group", default="probes", help="consumer group (probe suite name)")
    p.add_argument("--consumer", default=None,
                   help="this worker's consumer name (default: host and process id)")  # fmt: skip
    p.add_argument("--claim-idle-ms", type=int_range(0), default=60_000,
                   help="take over a checkpoint another worker has held this long without an "
                   "answer")  # fmt: skip
    p.add_argument("--exit-when-idle", type=float_range(0.0, 1e9), default=None,
                   help="stop after S idle seconds (default: follow the run until interrupted)")  # fmt: skip
    p.add_argument("--max-checkpoints", type=int_range(1), default=None,
                   help="stop after probing this many checkpoints (default: no limit)")  # fmt: skip
    p.add_argument("--keep-last", type=int_range(0, 1_000_000), default=10,
                   help="with --run: probe directories kept whole, the newest; older ones keep "
                   "summary.json only; 0 keeps all whole")  # fmt: skip
    p.add_argument("--keep-every", type=int_range(0, 1_000_000), default=10,
                   help="with --run: also keep whole those of every N-th checkpoint written; 0: "
                   "none")  # fmt: skip
    p.add_argument("--tb-images-every", type=int_range(0, 1_000_000), default=10,
                   help="with --run: overlays to TensorBoard for every N-th checkpoint written; "
                   "0: none")  # fmt: skip
    p.set_defaults(func=cmd_probe)

    e = sub.add_parser("edit", help="project a feature direction out of a layer's consumer")
    e.add_argument("--checkpoint", type=path_arg, required=True,
                   help="checkpoint to edit; a run directory means its newest checkpoint")  # fmt: skip
    e.add_argument("--layer", required=True, help="layer whose output direction is removed")
    e.add_argument("--direction", type=path_arg, required=True,
                   help="nmf:K or label:NAME (e.g. label:saw), both with --nmf, or a .npy file")  # fmt: skip
    e.add_argument("--nmf", type=path_arg, default=None,
                   help="a probe summary.json holding the NMF directions (required by nmf:K and label:NAME)")  # fmt: skip
    e.add_argument("--out", type=path_arg, required=True,
                   help="new directory for the edited checkpoint")  # fmt: skip
    e.set_defaults(func=cmd_edit)


def probe_config(args):
    from probes.suite import ProbeConfig

    return ProbeConfig(
        layer=args.layer,
        num_envs=args.num_envs,
        num_steps=args.num_steps,
        ig_samples=args.ig_samples,
        frames=args.frames,
        nmf_components=args.nmf_components,
        smoothgrad_copies=args.smoothgrad_copies,
    )


def cmd_probe(args: argparse.Namespace) -> int:
    if args.checkpoint is not None:
        if not args.out:
            raise LoupeError("--checkpoint needs --out DIR")
        from learner.checkpoint import find_checkpoint
        from probes.suite import run_suite

        check_out(args.out, "--out")
        args.checkpoint = find_checkpoint(args.checkpoint)
        summary = run_suite(args.checkpoint, args.out, probe_config(args))
        print(f"step {summary['step']}, layer {summary['layer']}:")
        for key in ("attention_entropy", "max_completeness_delta", "top10_attribution_share",
                    "anomaly_count", "mean_return"):  # fmt: skip
            if summary.get(key) is not None:
                print(f"  {key} = {summary[key]:.4g}")
        print(f"summary and images in {args.out}")
        return 0
    return follow_run(args)


def follow_run(args: argparse.Namespace) -> int:
    """Follow a run with one worker here, or start --workers worker processes; either way the
    run's Redis is started (or found) once, here, and stopped on the way out if it was started."""
    from loupe import interrupt
    from loupe.bus import CheckpointBus, connect
    from loupe.bus.probe_worker import PARENT_REDIS_ENV, connect_run
    from loupe.bus.redis_server import saved_url
    from loupe.rundir import RunDir

    run = RunDir(args.run)
    run.require_run()
    if args.workers <= 0:
        raise LoupeError("--workers must be positive")
    config = load_json(run.config_path)
    parent_url = os.environ.get(PARENT_REDIS_ENV)
    if parent_url:  # a worker process of `--workers M`: its parent owns the server
        interrupt.resume_hint = ""  # the parent says how to resume
        client, server, url = connect(parent_url), None, parent_url
    else:
        client, server = connect_run(run.path, args.redis)
        url = args.redis or (server.url if server else saved_url(run.redis))
    bus = CheckpointBus(client, config["run_id"])
    try:
        if args.workers > 1:
            return spawn_workers(args, bus, url)
        return probe_here(args, run, bus, config["run_id"], child=bool(parent_url))
    finally:
        client.close()
        if server is not None:
            server.stop()


def probe_here(args: argparse.Namespace, run, bus, run_id: str, child: bool) -> int:
    from loupe.bus.probe_worker import PARENT_PID_ENV, ProbeWorker, WorkerConfig

    worker_cfg = WorkerConfig(
        group=args.group,
        claim_idle_ms=args.claim_idle_ms,
        exit_when_idle=args.exit_when_idle,
        max_checkpoints=args.max_checkpoints,
        keep_last=args.keep_last,
        keep_every=args.keep_every,
        tb_images_every=args.tb_images_every,
    )
    if args.consumer:
        worker_cfg.consumer = args.consumer
    stop = None
    if child:  # stop with the parent, even when it was killed outright
        parent = int(os.environ.get(PARENT_PID_ENV) or os.getppid())
        stop = lambda: os.getppid() != parent  # noqa: E731
    worker = ProbeWorker(bus, run.path, worker_cfg, probe_config(args))
    handled = worker.run(
        on_idle=None if child else (lambda n: print(waiting_line(bus, run_id, args), flush=True)),
        stop=stop,
    )
    print(f"{worker_cfg.consumer}: probed {handled} checkpoint(s) of {run_id}", flush=True)
    return 0


def waiting_line(bus, run_id: str, args: argparse.Namespace) -> str:
    """What the workers do when they have handled every checkpoint announced so far."""
    announced = bus.client.xlen(bus.checkpoints_key)
    until = (
        f"stops after {args.exit_when_idle:g} s without one"
        if args.exit_when_idle is not None
        else "Ctrl-C to stop"
    )
    return f"waiting for checkpoints of {run_id} ({announced} announced so far); {until}"


def worker_argv(argv: list[str], consumer: str) -> list[str]:
    """The command line of one worker: --workers 1, its own --consumer, no --redis (the URL
    travels in the environment, not where `ps` shows it)."""
    out: list[str] = []
    skip = False
    for item in argv:
        if skip:
            skip = False
            continue
        name = item.split("=", 1)[0]
        if name in ("--workers", "--consumer", "--redis"):
            skip = "=" not in item
            continue
        out.append(item)
    return [*out, "--workers", "1", "--consumer", consumer]


def spawn_workers(args: argparse.Namespace, bus, url: str) -> int:
    """M worker processes in one consumer group, connected to ``url``; waits for all of them,
    saying when they have caught up with the stream. Interrupted: stops them, then returns."""
    import signal
    import time

    import redis

    from loupe.bus.probe_worker import PARENT_PID_ENV, PARENT_REDIS_ENV

    env = dict(os.environ, **{PARENT_REDIS_ENV: url, PARENT_PID_ENV: str(os.getpid())})
    argv = sys.argv[1:]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "loupe.cli", *worker_argv(argv, f"worker-{k}")], env=env
        )
        for k in range(args.workers)
    ]
    pids = ", ".join(str(p.pid) for p in procs)
    print(
        f"{args.workers} probe workers (pids {pids}) follow {bus.run_id}; each checkpoint is "
        "probed once",
        flush=True,
    )
    try:
        idle = False
        while any(p.poll() is None for p in procs):
            try:
                caught_up = bus.caught_up(args.group)
            except (redis.exceptions.RedisError, OSError):
                caught_up = False  # the workers report a lost server themselves
            if caught_up and not idle:
                print(waiting_line(bus, bus.run_id, args), flush=True)
            idle = caught_up
            time.sleep(1.0)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    return max(p.returncode for p in procs)


def cmd_edit(args: argparse.Namespace) -> int:
    import numpy as np

    from learner.checkpoint import find_checkpoint
    from probes.editing import summary_direction, write_edited_checkpoint

    check_out(args.out, "--out")
    args.checkpoint = find_checkpoint(args.checkpoint)
    spec = args.direction
    if spec.startswith(("nmf:", "label:")):
        if not args.nmf:
            raise LoupeError(f"--direction {spec} needs --nmf SUMMARY_JSON from `loupe probe`")
        summary = load_json(args.nmf)
        if not isinstance(summary, dict):
            raise LoupeError(f"--nmf {args.nmf} is not a probe summary.json (not a JSON object)")
        direction, spec = summary_direction(summary, spec, args.layer)
    else:
        try:
            direction = np.load(spec, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise LoupeError(f"cannot read direction {spec} ({exc})") from None
    path = write_edited_checkpoint(args.checkpoint, args.layer, direction, spec, args.out)
    print(f"edited checkpoint: {path}")
    return 0
