"""`loupe serve`: the gRPC service (Inspect, Evaluations, Policy, health, reflection)."""

from __future__ import annotations

import argparse

from loupe.cli.args import device_arg, float_range, int_range, path_arg


def register(sub) -> None:
    p = sub.add_parser("serve", help="gRPC service: inspect runs, attribute, evaluate, act")
    p.add_argument("--run", action="append", default=[], type=path_arg,
                   help="run directory to serve, repeatable (default: none)")  # fmt: skip
    p.add_argument(
        "--bind",
        default="127.0.0.1:50051",
        help="HOST:PORT to listen on (default: 127.0.0.1:50051)",
    )
    p.add_argument("--token-file", type=path_arg, default=None,
                   help="file with the token clients must send (default: none, loopback only)")  # fmt: skip
    p.add_argument("--tls-cert", type=path_arg, default=None,
                   help="PEM certificate chain, with --tls-key (default: plaintext)")  # fmt: skip
    p.add_argument("--tls-key", type=path_arg, default=None,
                   help="PEM private key, with --tls-cert (default: plaintext)")  # fmt: skip
    p.add_argument(
        "--redis", default=None, help="redis:// URL for every run (default: each run's own server)"
    )
    p.add_argument("--state-dir", type=path_arg, default=None,
                   help="evaluations are kept here (default: FIRST_RUN/serve)")  # fmt: skip
    p.add_argument("--max-message-mb", type=int_range(1, 2047), default=64,
                   help="largest message either way, MiB (default: 64)")  # fmt: skip
    p.add_argument("--max-batch", type=int_range(1, 65_536), default=64,
                   help="Policy: observations per batched forward pass (default: 64)")  # fmt: skip
    p.add_argument("--max-wait-ms", type=float_range(0.0, 60_000.0), default=5.0,
                   help="Policy: longest wait for a batch to fill, ms (default: 5.0)")  # fmt: skip
    p.add_argument("--eval-workers", type=int_range(0, 4096), default=1,
                   help="Ray evaluators per evaluation (default: 1)")  # fmt: skip
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default: local)")
    p.add_argument("--device", type=device_arg, default="cpu",
                   help="torch device for Attribute and Policy (default: cpu)")  # fmt: skip
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from loupe.service.server import LoupeServer, ServeConfig

    config = ServeConfig(
        runs=args.run,
        bind=args.bind,
        token_file=args.token_file,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        redis=args.redis,
        state_dir=args.state_dir,
        max_message_mb=args.max_message_mb,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        eval_workers=args.eval_workers,
        ray_address=args.ray_address,
        device=args.device,
    )

    async def serve() -> None:
        server = LoupeServer(config)
        port = await server.start()
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        auth = "token required" if server.token else "no token (loopback only)"
        tls = "TLS" if config.tls_cert else "plaintext"
        print(
            f"loupe serve: listening on {config.host}:{port} ({tls}, {auth}); runs: "
            f"{', '.join(server.catalog.runs) or 'none'}",
            flush=True,
        )
        await stop.wait()
        await server.stop()

    asyncio.run(serve())
    return 0
