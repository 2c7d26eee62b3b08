"""Benchmarks behind `loupe bench`: each returns a JSON-ready dict; all figures from one run.

Throughput is measured after a warm-up, with the same thread settings the real job uses. Targets from
the design (SPEC 3) are recorded next to the measurement so a reader sees the gap at once.
"""

from __future__ import annotations

import dataclasses
import platform
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

BENCHMARKS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {}


def benchmark(name: str):
    def register(fn):
        BENCHMARKS[name] = fn
        return fn

    return register


def _timed(fn: Callable[[], Any], min_seconds: float, warmup: int = 1) -> tuple[float, int]:
    """Run ``fn`` repeatedly for at least ``min_seconds`` -> (seconds, calls)."""
    for _ in range(warmup):
        fn()
    calls, t0 = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds:
            return elapsed, calls


def env_sps(env_id: str, num_envs: int, seconds: float, **options) -> float:
    from actors import EnvConfig, make_vec_env

    env = make_vec_env(EnvConfig(env_id=env_id, num_envs=num_envs, seed=0, **options))
    rng = np.random.default_rng(0)
    env.reset()
    actions = rng.integers(0, env.n_actions, size=(64, num_envs))
    i = [0]

    def step():
        env.step(actions[i[0] % 64])
        i[0] += 1

    elapsed, calls = _timed(step, seconds, warmup=5)
    env.close()
    return calls * num_envs / elapsed


def inference_sps(policy_name: str, obs_shape, n_actions: int, batch: int, seconds: float) -> float:
    from attention import build_policy

    policy = build_policy(policy_name, obs_shape, n_actions).eval()
    obs = torch.randint(0, 255, (batch, *obs_shape), dtype=torch.uint8)

    def forward():
        with torch.no_grad():
            out = policy(obs)
            torch.multinomial(torch.softmax(out.logits, -1), 1)

    elapsed, calls = _timed(forward, seconds, warmup=2)
    return calls * batch / elapsed


def _train_config(env_id, policy, num_envs, num_steps, total, run_dir, actors=0, **env_options):
    from actors import EnvConfig
    from learner import PPOConfig
    from loupe.train import TrainConfig

    preset = "procgen" if env_id.startswith("procgen:") else "atari-nikulin"
    ppo = PPOConfig.preset(
        preset,
        num_envs=num_envs,
        num_steps=num_steps,
        num_minibatches=4,
        update_epochs=1,
        total_steps=total,
    )
    env = EnvConfig(env_id=env_id, num_envs=num_envs, seed=0, **env_options)
    return TrainConfig(
        env=env,
        ppo=ppo,
        run_dir=run_dir,
        policy=policy,
        preset=preset,
        actors=actors,
        announce=False,
        checkpoint_every=10_000,
        device="cpu",
    )


def train_sps(env_id: str, policy: str, num_envs: int, num_steps: int, updates: int, **opts):
    """End-to-end PPO steps/s in-process, with the sampling/update split."""
    from loupe.train import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        total = num_envs * num_steps * (updates + 1)
        cfg = _train_config(env_id, policy, num_envs, num_steps, total, tmp, **opts)
        trainer = Trainer(cfg, progress=False)
        trainer.sampler.start(trainer.weights(), 0)
        times = {"sample": 0.0, "update": 0.0}
        for u in range(updates + 1):  # first update is warm-up
            t0 = time.perf_counter()
            rollout, _ = trainer.sampler.collect()
            t1 = time.perf_counter()
            trainer.learner.update(rollout)
            trainer.sampler.publish(trainer.weights(), u + 1)
            t2 = time.perf_counter()
            if u:
                times["sample"] += t1 - t0
                times["update"] += t2 - t1
        trainer.sampler.close()
    steps = num_envs * num_steps * updates
    return {
        "steps_per_s": steps / (times["sample"] + times["update"]),
        "sampling_steps_per_s": steps / times["sample"],
        "update_steps_per_s": steps / times["update"],
    }


@benchmark("env")
def bench_env(opts: dict[str, Any]) -> dict[str, Any]:
    """Raw vector-env steps/s with random actions (no policy), CoinRun and Breakout."""
    s = opts["seconds"]
    return {
        "procgen:coinrun": {"num_envs": 16, "steps_per_s": env_sps("procgen:coinrun", 16, s)},
        "ALE/Breakout-v5": {"num_envs": 8, "steps_per_s": env_sps("ALE/Breakout-v5", 8, s)},
    }


@benchmark("train")
def bench_train(opts: dict[str, Any]) -> dict[str, Any]:
    """In-process PPO training steps/s next to raw env and inference-only rates, same run."""
    s, updates = opts["seconds"], opts["updates"]
    out = {}
    for env_id, policy, n, obs_shape, n_actions in (
        ("procgen:coinrun", "impala", 16, (3, 64, 64), 15),
        ("ALE/Breakout-v5", "nature", 8, (4, 84, 84), 4),
    ):
        raw = env_sps(env_id, n, s)
        infer = inference_sps(policy, obs_shape, n_actions, n, s)
        train = train_sps(env_id, policy, n, 64, updates)
        # the rate if env stepping, inference and the update ran back to back with no overhead
        serial_limit = 1.0 / (1.0 / raw + 1.0 / infer + 1.0 / train["update_steps_per_s"])
        out[env_id] = {
            "policy": policy,
            "num_envs": n,
            "env_steps_per_s": raw,
            "inference_steps_per_s": infer,
            **{f"train_{k}": v for k, v in train.items()},
            "serial_limit_steps_per_s": serial_limit,
            "train_vs_serial_limit": train["steps_per_s"] / serial_limit,
        }
    return out


def machine_info() -> dict[str, Any]:
    import os

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
    }


@dataclasses.dataclass
class BenchConfig:
    """Settings of one `loupe bench` run."""

    #: benchmark names to run (empty: all)
    only: tuple[str, ...] = ()
    #: seconds each throughput measurement runs for
    seconds: float = 3.0
    #: timed PPO updates per training measurement (after one warm-up update)
    updates: int = 3


def run_benchmarks(config: BenchConfig, echo: Callable[[str], None] = print) -> dict[str, Any]:
    from loupe.errors import LoupeError

    names = list(config.only) or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise LoupeError(f"unknown benchmark(s) {unknown}; choose from {sorted(BENCHMARKS)}")
    results: dict[str, Any] = {"machine": machine_info(), "config": dataclasses.asdict(config)}
    opts = dataclasses.asdict(config)
    for name in names:
        echo(f"bench {name} ...")
        t0 = time.perf_counter()
        results[name] = BENCHMARKS[name](opts)
        results[name]["bench_seconds"] = time.perf_counter() - t0
    results["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return results


@benchmark("pipeline")
def bench_pipeline(opts: dict[str, Any]) -> dict[str, Any]:
    """Ray rollout actors with 1 and 2 actors (and 1 with central inference) vs raw env and inference."""
    from loupe.distributed import CentralSampler, RaySampler, init_ray

    envs_per_actor, steps = 8, 64
    init_ray(None)
    out: dict[str, Any] = {
        "env": "procgen:coinrun",
        "policy": "impala",
        "envs_per_actor": envs_per_actor,
        "raw_env_steps_per_s": env_sps("procgen:coinrun", envs_per_actor, opts["seconds"]),
        "inference_steps_per_s": inference_sps(
            "impala", (3, 64, 64), 15, envs_per_actor, opts["seconds"]
        ),  # fmt: skip
    }
    # one actor steps env and policy in turn: its ceiling is the serial combination of the two
    out["single_actor_limit_steps_per_s"] = 1 / (
        1 / out["raw_env_steps_per_s"] + 1 / out["inference_steps_per_s"]
    )
    from attention import build_policy

    policy = build_policy("impala", (3, 64, 64), 15)
    weights = {k: v.numpy() for k, v in policy.state_dict().items()}

    def sampler_sps(actors: int, inference: str) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = dataclasses.replace(
                _train_config("procgen:coinrun", "impala", envs_per_actor * actors, steps,
                              10**9, tmp, actors=actors), inference=inference)  # fmt: skip
            sampler = (CentralSampler if inference == "central" else RaySampler)(cfg)
            if inference == "central":
                sampler.attach(policy.eval(), torch.device("cpu"))
            sampler.start(weights, 0)
            elapsed, batches = _timed(sampler.collect, opts["seconds"] * 2, warmup=1)
            sampler.close()
        return batches * steps * envs_per_actor * actors / elapsed

    for actors in (1, 2):
        sps = sampler_sps(actors, "actor")
        out[f"actors_{actors}_steps_per_s"] = sps
        out[f"actors_{actors}_vs_single_actor_limit"] = sps / out["single_actor_limit_steps_per_s"]
    # central inference: the actor only steps envs, this process runs the policy between steps
    sps = sampler_sps(1, "central")
    out["central_actors_1_steps_per_s"] = sps
    out["central_actors_1_vs_single_actor_limit"] = sps / out["single_actor_limit_steps_per_s"]
    return out


@benchmark("ig")
def bench_ig(opts: dict[str, Any]) -> dict[str, Any]:
    """Hidden-layer IG for value + every logit in one pass vs one Captum call per target."""
    from attention import build_policy
    from probes.attribution import benchmark_ig_vs_captum

    torch.manual_seed(0)
    out = {}
    for name, shape, layer in (("interpretable", (3, 64, 64), "2b"), ("impala", (3, 64, 64), "s2")):
        policy = build_policy(name, shape, 15)
        obs = torch.randint(0, 256, (16, *shape), dtype=torch.uint8)
        out[f"{name}/{layer}"] = benchmark_ig_vs_captum(policy, obs, layer, repeats=2)
    out["target"] = ">= 3x faster than 16 Captum calls, max abs diff <= 1e-5"
    return out


@benchmark("probe_latency")
def bench_probe_latency(opts: dict[str, Any]) -> dict[str, Any]:
    """Checkpoint announced on Redis -> a blocked probe worker has it verified and loaded."""
    import threading
    from pathlib import Path

    from attention import build_policy
    from learner.checkpoint import load_checkpoint, save_checkpoint
    from loupe.bus import CheckpointAnnouncement, CheckpointBus, connect
    from loupe.bus.redis_server import RedisServer
    from loupe.config import load_json

    latencies: list[float] = []
    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp) / "redis") as server:
        path = save_checkpoint(tmp, build_policy("impala", (3, 64, 64), 15), {"step": 1})
        meta = load_json(path)
        producer = CheckpointBus(connect(server.url), "bench")
        consumer = CheckpointBus(connect(server.url), "bench")
        consumer.ensure_group("probes", start="$")
        for _ in range(opts.get("latency_samples", 50)):
            got: list[float] = []

            def follow(got=got):
                while not got:
                    for d in consumer.follow("probes", "w", block_ms=2000):
                        load_checkpoint(d.announcement.uri)  # sha256 verified, weights loaded
                        got.append(time.time() - d.announcement.announced)
                        consumer.ack("probes", d.entry_id)

            thread = threading.Thread(target=follow)
            thread.start()
            time.sleep(0.01)
            producer.publish_checkpoint(CheckpointAnnouncement(
                run_id="bench", step=1, uri=str(path), sha256=meta["sha256"], policy="impala",
                env="procgen:coinrun", announced=time.time()))  # fmt: skip
            thread.join()
            latencies.append(got[0])
    arr = np.array(latencies) * 1000
    return {"samples": len(arr), "p50_ms": float(np.percentile(arr, 50)),
            "p99_ms": float(np.percentile(arr, 99)), "max_ms": float(arr.max()),
            "target": "p99 < 200 ms"}  # fmt: skip


@benchmark("evaluate")
def bench_evaluate(opts: dict[str, Any]) -> dict[str, Any]:
    """Levels/s with 1 and 2 Ray evaluators vs a one-env sequential loop on the same levels."""
    from pathlib import Path

    from actors.evaluator import EvaluatorConfig, sequential_levels_per_s
    from attention import build_policy
    from learner.checkpoint import save_checkpoint
    from loupe.distributed.evaluate import EvalConfig, evaluate

    torch.manual_seed(0)
    policy = build_policy("impala", (3, 64, 64), 15)
    with torch.no_grad():
        policy.pi.bias[8] = 4.0  # right+jump: levels end within a few hundred steps
    levels = opts.get("eval_levels", 32)
    out: dict[str, Any] = {"levels": levels, "policy": "impala (biased to RIGHT+UP)"}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = save_checkpoint(Path(tmp) / "run", policy, {
            "step": 1, "env": "procgen:coinrun", "env_options": {"distribution_mode": "easy"}})  # fmt: skip
        weights = {k: v.numpy() for k, v in policy.state_dict().items()}
        ev = EvaluatorConfig(env_options={"distribution_mode": "easy"}, causes=True)
        out["sequential_levels_per_s"] = sequential_levels_per_s(
            policy.spec, weights, ev, list(range(levels))
        )
        for workers in (1, 2):
            summary = evaluate(EvalConfig(checkpoints=[str(ckpt)], out=f"{tmp}/ev{workers}",
                                          levels=levels, workers=workers), progress=False)  # fmt: skip
            (stats,) = summary["checkpoints"].values()
            out[f"workers_{workers}_levels_per_s"] = stats["levels_per_s"]
            out[f"workers_{workers}_vs_sequential"] = (
                stats["levels_per_s"] / out["sequential_levels_per_s"]
            )
    out["target"] = ">= 20x a one-env sequential loop (on 16 cores + GPU)"
    return out


@benchmark("explorer")
def bench_explorer(opts: dict[str, Any]) -> dict[str, Any]:
    """`loupe view` of one checkpoint: 8 trajectories x 256 frames, IG + NMF at the analysis layer
    (random-weights interpretable network on CoinRun): bundle build time and size, and the time
    from opening the page in Chromium to its first frame drawn, from the loopback server."""
    import os
    from pathlib import Path

    from attention import build_policy
    from learner.checkpoint import save_checkpoint
    from loupe.explorer.bundle import BundleConfig, build_probe_bundle, bundle_size
    from loupe.explorer.server import BundleServer
    from probes.suite import ProbeConfig, run_suite

    torch.manual_seed(0)
    out: dict[str, Any] = {
        "trajectories": 8,
        "frames": 256,
        "policy": "interpretable",
        "layer": "2b",
    }
    with tempfile.TemporaryDirectory(prefix="loupe-bench-view-") as tmp:
        policy = build_policy("interpretable", (3, 64, 64), 15)
        meta = {"step": 0, "run_id": "bench", "env": "procgen:coinrun",
                "env_options": {"distribution_mode": "easy"}}  # fmt: skip
        ckpt = save_checkpoint(tmp, policy, meta)
        t0, c0 = time.perf_counter(), time.process_time()
        run_suite(ckpt, Path(tmp) / "probe", ProbeConfig(num_envs=8, num_steps=256))
        out["probe_s"] = time.perf_counter() - t0
        out["probe_cpu_s"] = time.process_time() - c0
        t0, c0 = time.perf_counter(), time.process_time()
        built = build_probe_bundle(Path(tmp) / "probe", Path(tmp) / "view", BundleConfig())
        out["build_s"] = time.perf_counter() - t0
        # CPU seconds of this process (all its threads): a figure less disturbed by other work
        out["build_cpu_s"] = time.process_time() - c0
        out["build_timings"] = built["timings"]
        out["targets"] = built["targets"]
        out["size_mb"] = bundle_size(Path(tmp) / "view") / 1e6
        out["first_frame_s"] = _first_frame_s(Path(tmp) / "view", BundleServer)
    out["cpus"] = os.cpu_count()
    out["target"] = "build < 120 s on 2 cores, size < 30 MB, first frame < 1 s"
    return out


def _first_frame_s(view, server_cls) -> dict[str, float] | None:
    """Seconds from navigation to the first frame drawn (cold and warm), or None without chromium."""
    import os

    if not os.path.exists("/usr/bin/chromium"):
        return None
    from playwright.sync_api import sync_playwright

    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
    server = server_cls(view).start()
    times = {}
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=flags)
            for label in ("cold", "warm"):
                page = browser.new_page()
                t0 = time.perf_counter()
                page.goto(server.url)
                page.wait_for_selector("#app[data-ready='1']", timeout=60_000)
                times[label] = time.perf_counter() - t0
                page.close()
            browser.close()
    finally:
        server.stop()
    return times
