"""`loupe bench --only service`: the figures of `loupe serve` on this machine.

- Attribute latency (p50/p99) for 8 CoinRun observations, value + every logit, IMPALA layer s3;
- Policy throughput of 64 concurrent clients (one observation per Act) against a batching server
  (max_batch 64, max_wait_ms 5) and an unbatched one (max_batch 1), alternated A/B/A/B;
- WatchCheckpoints latency: announcement on Redis -> the event in the client.

Server and clients share this process (the server on its own event loop thread), over real
loopback channels.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

RUN = "bench"


def _percentiles(values: list[float]) -> dict[str, float]:
    ms = np.asarray(values) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "samples": len(values)}  # fmt: skip


def _run_dir(root: Path) -> Path:
    import torch

    from attention import build_policy
    from learner.checkpoint import save_checkpoint

    run = root / RUN
    torch.manual_seed(0)
    save_checkpoint(
        run, build_policy("impala", (3, 64, 64), 15), {"step": 1, "env": "procgen:coinrun"}
    )
    (run / "config.json").write_text(
        json.dumps({"run_id": RUN, "env": {"env_id": "procgen:coinrun"}})
    )
    return run


def _policy_throughput(port: int, clients: int, seconds: float) -> dict[str, float]:
    import grpc

    from loupe.service.client import act_request, channel_options
    from loupe.service.proto.loupe.v1 import policy_pb2_grpc

    obs = np.random.default_rng(0).integers(0, 256, (1, 3, 64, 64), dtype=np.uint8)
    request = act_request(RUN, "latest", obs, greedy=True)

    async def one(stop_at: float) -> tuple[int, int]:
        done = errors = 0
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", options=channel_options(64)
        ) as ch:
            stub = policy_pb2_grpc.PolicyStub(ch)
            while time.perf_counter() < stop_at:
                try:
                    await stub.Act(request, timeout=60)
                    done += 1
                except grpc.RpcError:
                    errors += 1
        return done, errors

    async def main():
        await one(time.perf_counter() + 0.5)  # warm-up: checkpoint loaded, batcher started
        t0 = time.perf_counter()
        results = await asyncio.gather(*[one(t0 + seconds) for _ in range(clients)])
        return results, time.perf_counter() - t0

    results, elapsed = asyncio.run(main())
    done = sum(d for d, _ in results)
    return {"acts_per_s": done / elapsed, "errors": sum(e for _, e in results)}


def service_figures(opts: dict[str, Any]) -> dict[str, Any]:
    from loupe.bus import CheckpointAnnouncement, CheckpointBus, connect
    from loupe.bus.redis_server import RedisServer
    from loupe.service.client import Client
    from loupe.service.server import ServeConfig, ServerThread

    seconds = float(opts.get("seconds", 3.0))
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp) / RUN / "redis") as redis:
        run = _run_dir(Path(tmp))

        def config(name: str, max_batch: int) -> ServeConfig:
            return ServeConfig(runs=[str(run)], bind="127.0.0.1:0", state_dir=f"{tmp}/{name}",
                               max_batch=max_batch, max_wait_ms=5.0)  # fmt: skip

        batched, unbatched = ServerThread(config("a", 64)), ServerThread(config("b", 1))
        batched.start()
        unbatched.start()
        try:
            client = Client(f"127.0.0.1:{batched.port}")
            # Attribute latency
            obs = np.random.default_rng(1).integers(0, 256, (8, 3, 64, 64), dtype=np.uint8)
            client.attribute(RUN, "latest", obs, layer="s3")  # warm-up (loads the checkpoint)
            times = []
            for _ in range(int(opts.get("attribute_samples", 30))):
                t0 = time.perf_counter()
                client.attribute(RUN, "latest", obs, layer="s3")
                times.append(time.perf_counter() - t0)
            out["attribute"] = {**_percentiles(times), "observations": 8, "targets": 16,
                                "layer": "impala/s3", "n_steps": 10}  # fmt: skip
            # Policy throughput, A/B alternated
            rounds: dict[str, list[dict[str, float]]] = {"batched": [], "unbatched": []}
            for _ in range(2):
                rounds["batched"].append(_policy_throughput(batched.port, 64, seconds))
                rounds["unbatched"].append(_policy_throughput(unbatched.port, 64, seconds))
            policy: dict[str, Any] = {"clients": 64, "observations_per_act": 1}
            for name, rs in rounds.items():
                policy[f"{name}_acts_per_s"] = float(np.mean([r["acts_per_s"] for r in rs]))
                policy[f"{name}_rounds"] = [r["acts_per_s"] for r in rs]
                policy[f"{name}_errors"] = sum(r["errors"] for r in rs)
            policy["speedup"] = policy["batched_acts_per_s"] / policy["unbatched_acts_per_s"]
            (stats,) = batched.server.policy.batchers.values()
            sizes = stats.stats.sizes
            policy["batched_mean_batch"] = sum(k * v for k, v in sizes.items()) / sum(
                sizes.values()
            )
            out["policy"] = policy
            # WatchCheckpoints: announcement -> client
            bus = CheckpointBus(connect(redis.url), RUN)
            latencies: list[float] = []
            events = client.watch_checkpoints(RUN, after_id="$")
            got: list[float] = []
            reader = threading.Thread(
                target=lambda: [got.append(time.time() - e["announced"]) for e in events],
                daemon=True,
            )
            reader.start()
            time.sleep(0.5)
            for step in range(int(opts.get("latency_samples", 30))):
                bus.publish_checkpoint(CheckpointAnnouncement(
                    run_id=RUN, step=step, uri="bench", sha256=f"{step:064x}", policy="impala",
                    env="procgen:coinrun", announced=time.time()))  # fmt: skip
                deadline = time.monotonic() + 10
                while len(got) <= step and time.monotonic() < deadline:
                    time.sleep(0.001)
            latencies = list(got)
            out["watch_checkpoints"] = _percentiles(latencies)
            client.close()
            bus.client.close()
        finally:
            batched.stop()
            unbatched.stop()
    out["note"] = "server and clients in one process; other work on the machine disturbs figures"
    return out
