"""`loupe probe` (one checkpoint, or follow a run) and `loupe edit`."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from loupe.config import load_json
from loupe.errors import LoupeError


def register(sub) -> None:
    p = sub.add_parser("probe", help="interpretability probes for a checkpoint or a whole run")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="analyse this checkpoint once (needs --out)")
    src.add_argument("--run", help="follow this run's checkpoint stream")
    p.add_argument("--out", help="output directory for --checkpoint")
    p.add_argument("--layer", default=None, help="analysis layer (default: the policy's)")
    p.add_argument("--num-envs", type=int, default=8, help="environments recorded")
    p.add_argument("--num-steps", type=int, default=128, help="steps recorded per environment")
    p.add_argument("--ig-samples", type=int, default=64, help="observations attributed")
    p.add_argument("--nmf-components", type=int, default=8)
    p.add_argument("--smoothgrad-copies", type=int, default=50)
    p.add_argument("--redis", default=None, help="redis://... (default: the run's private server)")
    p.add_argument("--workers", type=int, default=1, help="probe worker processes")
    p.add_argument("--group", default="probes", help="consumer group (probe suite name)")
    p.add_argument("--consumer", default=None, help="this worker's consumer name")
    p.add_argument("--claim-idle-ms", type=int, default=60_000)
    p.add_argument("--exit-when-idle", type=float, default=None, help="stop after S idle seconds")
    p.add_argument("--max-checkpoints", type=int, default=None)
    p.set_defaults(func=cmd_probe)

    e = sub.add_parser("edit", help="project a feature direction out of a layer's consumer")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--layer", required=True)
    e.add_argument("--direction", required=True, help="nmf:K (with --nmf) or a .npy file")
    e.add_argument("--nmf", default=None, help="a probe summary.json holding the NMF directions")
    e.add_argument("--out", required=True, help="new directory for the edited checkpoint")
    e.set_defaults(func=cmd_edit)


def probe_config(args):
    from probes.suite import ProbeConfig

    return ProbeConfig(
        layer=args.layer,
        num_envs=args.num_envs,
        num_steps=args.num_steps,
        ig_samples=args.ig_samples,
        nmf_components=args.nmf_components,
        smoothgrad_copies=args.smoothgrad_copies,
    )


def cmd_probe(args: argparse.Namespace) -> int:
    if args.checkpoint:
        if not args.out:
            raise LoupeError("--checkpoint needs --out DIR")
        from probes.suite import run_suite

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

    from probes.editing import write_edited_checkpoint

    spec = args.direction
    if spec.startswith("nmf:"):
        if not args.nmf:
            raise LoupeError("--direction nmf:K needs --nmf SUMMARY_JSON from `loupe probe`")
        summary = load_json(args.nmf)
        directions = (summary.get("nmf") or {}).get("directions")
        if not directions:
            raise LoupeError(f"{args.nmf} holds no NMF directions")
        if summary.get("layer") != args.layer:
            raise LoupeError(
                f"{args.nmf} was fitted at layer {summary.get('layer')}, not {args.layer}"
            )
        try:
            k = int(spec.split(":", 1)[1])
            direction = np.asarray(directions[k])
        except (ValueError, IndexError):
            raise LoupeError(f"{spec}: choose nmf:0 .. nmf:{len(directions) - 1}") from None
    else:
        try:
            direction = np.load(spec, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise LoupeError(f"cannot read direction {spec} ({exc})") from None
    path = write_edited_checkpoint(args.checkpoint, args.layer, direction, spec, args.out)
    print(f"edited checkpoint: {path}")
    return 0
