"""`loupe view`: build the explorer's static bundle and serve it on loopback, or export it."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from loupe.cli.args import SEED_MAX, int_range, path_arg
from loupe.errors import LoupeError


def register(sub) -> None:
    p = sub.add_parser("view", help="the trajectory explorer in the browser")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--probe", type=path_arg,
                     help="a `loupe probe --checkpoint ... --out DIR` directory (required: this or "
                     "--checkpoint, --run, --eval)")  # fmt: skip
    src.add_argument("--checkpoint", type=path_arg,
                     help="a checkpoint, probed first if needed (required: one source)")  # fmt: skip
    src.add_argument("--run", type=path_arg,
                     help="a run directory: probe scalars over training (required: one source)")  # fmt: skip
    src.add_argument("--eval", type=path_arg,
                     help="a `loupe evaluate --out DIR` directory (required: one source)")  # fmt: skip
    p.add_argument("--port", type=int_range(0, 65535), default=0,
                   help="port; 0 takes a free one (default: 0)")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default: 127.0.0.1)")
    p.add_argument("--token", default=None,
                   help="access token; required beyond loopback (default: none)")  # fmt: skip
    p.add_argument("--export", type=path_arg, default=None, metavar="OUT",
                   help="write the bundle to OUT and exit (default: serve it)")  # fmt: skip
    p.add_argument(
        "--num-envs",
        type=int_range(1, 4096),
        default=None,
        help="trajectories (default: the probe's)",
    )
    p.add_argument("--num-steps", type=int_range(1, 100_000), default=None,
                   help="frames per trajectory (default: the probe's)")  # fmt: skip
    p.add_argument("--target", action="append", default=None, metavar="T",
                   help="attribution target: value, logit:I, group:NAME, auto (repeatable; "
                   "default: auto, the value and the action groups)")  # fmt: skip
    p.add_argument("--ig-steps", type=int_range(1, 1024), default=8,
                   help="Riemann steps of integrated gradients (default: 8)")  # fmt: skip
    p.add_argument("--saliency", choices=["sample", "all", "none"], default="sample",
                   help="frames given gradient, SmoothGrad and perturbation saliency: sample (the "
                   "GAE bookmarks and every --saliency-every-th frame), all, none (default: "
                   "sample)")  # fmt: skip
    p.add_argument("--saliency-every", type=int_range(1, 100_000), default=16,
                   help="with --saliency sample: every this many frames (default: 16)")  # fmt: skip
    p.add_argument("--tsne-iterations", type=int_range(250, 100_000), default=500,
                   help="t-SNE iterations of the embedding (default: 500)")  # fmt: skip
    p.add_argument("--threads", type=int_range(0, 1024), default=1,
                   help="torch threads for attribution and saliency, 0: torch's own choice "
                   "(default: 1, the faster on two shared cores)")  # fmt: skip
    p.add_argument("--trajectories", choices=["latest", "all", "none"], default="latest",
                   help="--run: which probed checkpoints get trajectory pages (default: latest)")  # fmt: skip
    p.add_argument("--no-embedding", action="store_true",
                   help="skip the t-SNE embedding (default: build it)")  # fmt: skip
    p.add_argument("--replays", type=int_range(0, 10_000), default=None,
                   help="--eval: failed levels per cause and checkpoint replayed into trajectory "
                   "pages up front (default: 1 with --export; 0 when serving, where clicking a "
                   "failed level replays it)")  # fmt: skip
    p.add_argument("--replay", action="append", type=int_range(0, SEED_MAX), default=[],
                   metavar="LEVEL",
                   help="--eval: replay this failed level (of every checkpoint that failed it), "
                   "repeatable (default: none)")  # fmt: skip
    p.set_defaults(func=cmd_view)


def _config(args):
    from loupe.explorer.bundle import BundleConfig

    return BundleConfig(
        num_envs=args.num_envs,
        num_steps=args.num_steps,
        targets=tuple(args.target or ("auto",)),
        ig_steps=args.ig_steps,
        saliency=args.saliency,
        saliency_every=args.saliency_every,
        embedding=not args.no_embedding,
        tsne_iterations=args.tsne_iterations,
        torch_threads=args.threads,
    )


def _progress(text: str) -> None:
    print(f"loupe view: {text}", file=sys.stderr, flush=True)


def _check_export(path: str) -> Path:
    out = Path(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LoupeError(f"{out} already exists and is not empty; choose another --export OUT")
    return out


def _probe_checkpoint(args, work: Path) -> Path:
    """Run the probe suite on --checkpoint into ``work/probe`` (the explorer needs its NMF)."""
    from learner.checkpoint import resolve
    from loupe.cli.probe import probe_config
    from probes.suite import run_suite

    ckpt = Path(args.checkpoint)
    ns = argparse.Namespace(layer=None, num_envs=args.num_envs or 8, num_steps=args.num_steps or 128,
                            ig_samples=64, nmf_components=8, smoothgrad_copies=8)  # fmt: skip
    out = work / "probe"
    _progress(f"probing {resolve(ckpt)} first (record, integrated gradients, NMF, GAE scan)")
    t0 = time.perf_counter()
    run_suite(ckpt, out, probe_config(ns))
    _progress(f"probe done in {time.perf_counter() - t0:.0f} s")
    return out


def cmd_view(args: argparse.Namespace) -> int:
    from loupe.explorer import bundle
    from loupe.explorer.server import BundleServer, is_loopback

    if args.export is None and not is_loopback(args.host) and not args.token:
        raise LoupeError(
            f"--host {args.host} is reachable from other machines; give --token SECRET as well "
            "(or leave --host at 127.0.0.1)"
        )
    config = _config(args)
    if args.checkpoint:
        from learner.checkpoint import find_checkpoint

        # a run directory (agents/coinrun-interpretable) means its newest checkpoint
        args.checkpoint = str(find_checkpoint(args.checkpoint, say=_progress))
    if (args.replays is not None or args.replay) and not args.eval:
        raise LoupeError("--replays and --replay replay failed levels of an evaluation; use --eval")
    export = _check_export(args.export) if args.export else None
    work = Path(tempfile.mkdtemp(prefix="loupe-view-"))
    out = export or work / "bundle"
    refresh = None
    try:
        api = None
        if args.eval:
            refresh, api = _eval_bundle(args, out, config, live=export is None)
        elif args.run:
            built: dict[str, str] = {}
            bundle.build_run_bundle(args.run, out, config, _progress, args.trajectories, built)
            refresh = lambda: bundle.build_run_bundle(  # noqa: E731
                args.run, out, config, _progress, args.trajectories, built
            )
        else:
            if args.probe:
                probe_dir = Path(args.probe)
            else:
                probe_dir = bundle.existing_probe(Path(args.checkpoint))
                probe_dir = probe_dir or _probe_checkpoint(args, work)
            t0 = time.perf_counter()
            rebuild = f"loupe view --{'probe' if args.probe else 'checkpoint'} " + (
                args.probe or args.checkpoint
            )
            bundle.build_probe_bundle(probe_dir, out, config, _progress, rebuild)
            _progress(f"bundle built in {time.perf_counter() - t0:.1f} s")
        size = bundle.bundle_size(out) / 1e6
        if export is not None:
            print(f"explorer written to {export} ({size:.1f} MB); open {export / 'index.html'}")
            return 0
        server = BundleServer(out, args.host, args.port, args.token, api).start()
        print(f"loupe view: serving {size:.1f} MB at {server.url}  (Ctrl-C stops)", flush=True)
        stop = threading.Event()
        try:
            while not stop.wait(5.0):
                if refresh is not None:
                    try:
                        refresh()
                    except LoupeError as exc:
                        _progress(f"refresh failed: {exc}")
        except KeyboardInterrupt:
            pass
        finally:
            server.stop()
        print("loupe view: stopped", flush=True)
        return 0
    except BaseException:
        if (
            export is not None
            and export.exists()
            and not (export / "data" / "manifest.json").exists()
        ):
            shutil.rmtree(export, ignore_errors=True)  # a half-built export of ours
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _eval_bundle(args, out: Path, config, live: bool):
    """Build the evaluation page (with its up-front replays) -> (refresh, api): ``refresh``
    rebuilds it as the evaluation advances; ``api`` replays a failed level on request when
    serving."""
    from loupe.explorer import bundle

    lock = threading.Lock()
    built: dict[tuple[str, int], str | None] = {}
    per_cause = args.replays if args.replays is not None else (0 if live else 1)

    def build() -> None:
        with lock:
            bundle.build_eval_bundle(args.eval, out, config, per_cause, args.replay, built,
                                     _progress, live)  # fmt: skip

    build()
    if not live:
        return build, None

    def replay(query: dict[str, str]) -> tuple[int, dict]:
        label, level = query.get("label", ""), query.get("level", "")
        if not level.isdigit():
            raise LoupeError(f"level must be a level seed, got {level!r}")
        with lock:
            key = built.get((label, int(level)))
            if key is None:
                key = bundle.build_replay(out, Path(args.eval), label, int(level), config,
                                          _progress)["key"]  # fmt: skip
                built[label, int(level)] = key
                data = bundle.eval_data(Path(args.eval), built)
                data["replay_api"] = True
                bundle.put(out, "eval", data)
                bundle.write_eval_manifest(out, Path(args.eval), built, True)
        return 200, {"key": key}

    return build, {"/api/replay": replay}
