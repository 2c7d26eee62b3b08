"""Benchmarks behind `loupe bench`: each returns a JSON-ready dict; all figures from one run.

Throughput is measured after a warm-up, with the same thread settings the real job uses. Targets from
the design (SPEC 3) are recorded next to the measurement so a reader sees the gap at once.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

BENCHMARKS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {}
#: benchmarks run only when named with --only (they need something set up first)
ON_REQUEST: set[str] = set()


def benchmark(name: str, on_request: bool = False):
    def register(fn):
        BENCHMARKS[name] = fn
        if on_request:
            ON_REQUEST.add(name)
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


def _rss_mb() -> float:
    from loupe.heap import memory_mb

    measured = memory_mb()
    return float("nan") if measured is None else measured[0]


def env_memory_worker(steps: int, num_envs: int, every: int) -> dict[str, Any]:
    """A rollout actor's CoinRun envs stepped ``steps`` times (random actions, unlimited easy
    levels, the learner's malloc settings) -> RSS every ``every`` env steps."""
    from actors import EnvConfig, make_vec_env
    from learner import ppo

    ppo.tune_malloc()
    env = make_vec_env(EnvConfig("procgen:coinrun", num_envs=num_envs, seed=0,
                                 num_levels=0, distribution_mode="easy"))  # fmt: skip
    rng = np.random.default_rng(0)
    env.reset()
    done, episodes, points, started = 0, 0, [], time.perf_counter()
    points.append({"steps": 0, "episodes": 0, "rss_mb": round(_rss_mb(), 2)})
    while done < steps:
        episodes += len(env.step(rng.integers(0, env.n_actions, size=num_envs))[3])
        done += num_envs
        if done % every < num_envs or done >= steps:
            points.append({"steps": done, "episodes": episodes, "rss_mb": round(_rss_mb(), 2)})
    env.close()
    return {"points": points, "seconds": round(time.perf_counter() - started, 1)}


@benchmark("env_memory", on_request=True)
def bench_env_memory(opts: dict[str, Any]) -> dict[str, Any]:
    """RSS of a rollout actor's 8 CoinRun envs over 2M env steps in a fresh process: the growth
    while new levels warm procgen's heap up, and where it stops (the soak's actors are killed
    before they get there)."""
    steps, every = 2_000_000, 50_000
    out = _in_subprocess("env_memory_worker", steps=steps, num_envs=8, every=every)
    points = out["points"]

    def growth(lo: int, hi: int) -> float:
        at = {p["steps"] - p["steps"] % every: p["rss_mb"] for p in points}
        return round(at[hi] - at[lo], 2)

    half = steps // 2
    return {
        **out,
        "num_envs": 8,
        "growth_mb": {
            "first_500k_steps": growth(0, 500_000),
            "500k_to_1m_steps": growth(500_000, half),
            "second_million_steps": growth(half, steps),
        },
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
    #: alternation rounds of the on/off lever and peer measurements
    rounds: int = 2
    #: python of the virtual environment with cleanrl (``make bench-peer`` builds .venv-peer)
    peer_python: str = ".venv-peer/bin/python"
    #: CoinRun steps of each loupe and cleanrl training run in the peer comparison
    peer_steps: int = 32_768
    #: envs x steps per env of the peer comparison's batches (train-procgen: 64 x 256)
    peer_num_envs: int = 64
    peer_num_steps: int = 256
    #: samples per minibatch and timed Adam steps of each update-lever measurement
    minibatch: int = 2048
    steps: int = 2
    #: observations per IG comparison against Captum
    ig_batches: tuple[int, ...] = (16, 64, 256)
    #: torch threads of the interpretable update/inference A/B runs, one run each (0: torch's)
    update_threads: tuple[int, ...] = (0, 1)
    #: sampler steps (64 envs each) per inference measurement of that run
    inference_steps: int = 16


def run_benchmarks(config: BenchConfig, echo: Callable[[str], None] = print) -> dict[str, Any]:
    from loupe.errors import LoupeError

    names = list(config.only) or [n for n in BENCHMARKS if n not in ON_REQUEST]
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


@benchmark("service")
def bench_service(opts: dict[str, Any]) -> dict[str, Any]:
    """`loupe serve`: Attribute p50/p99, Policy throughput (64 clients) batched vs unbatched,
    WatchCheckpoints announcement-to-client latency (see loupe/service/bench.py)."""
    from loupe.service.bench import service_figures

    return service_figures(opts)


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


@benchmark("rollout_transfer")
def bench_rollout_transfer(opts: dict[str, Any]) -> dict[str, Any]:
    """Rollout frames from 2 Ray actors to the learner: through the object store and joined with
    np.concatenate (off) vs written by the actors into a shared-memory buffer (on), alternated.

    Per batch: ``transfer_s`` (every batch ready -> joined rollout, on the learner's critical
    path), ``wait_s`` (the whole collect: sampling plus the actors' object-store writes) and the
    frame bytes copied on the way; then one PPO update (procgen preset) on a batch of that size
    for scale. Real CoinRun, IMPALA, 2 x 16 envs x 128 steps; per-byte costs are scaled to the
    train-procgen batch (64 envs x 256 steps) as well.
    """
    from attention import build_policy
    from learner import PPOLearner
    from loupe.distributed import RaySampler, init_ray

    actors, envs_per_actor, steps, batches = 2, 16, 128, 2
    init_ray(None)
    policy = build_policy("impala", (3, 64, 64), 15)
    weights = {k: v.numpy() for k, v in policy.state_dict().items()}
    runs: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    frame_bytes = steps * actors * envs_per_actor * 3 * 64 * 64
    last = None
    with tempfile.TemporaryDirectory() as tmp:
        cfg = _train_config("procgen:coinrun", "impala", actors * envs_per_actor, steps, 10**9,
                            tmp, actors=actors, distribution_mode="easy")  # fmt: skip
        for _ in range(opts["rounds"]):
            for mode in ("off", "on"):
                sampler = RaySampler(cfg, shared_obs=mode == "on")
                try:
                    sampler.start(weights, 0)
                    sampler.collect()  # warm-up (the first batch maps the buffers)
                    for _ in range(batches):
                        r0 = resource.getrusage(resource.RUSAGE_SELF)
                        last, stats = sampler.collect()
                        r1 = resource.getrusage(resource.RUSAGE_SELF)
                        runs[mode].append({
                            "transfer_s": stats["transfer_s"], "wait_s": stats["wait_s"],
                            "learner_cpu_s": r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime,
                            "shared_obs": stats["shared_obs"]})  # fmt: skip
                finally:
                    sampler.close()
        learner = PPOLearner(policy, dataclasses.replace(cfg.ppo, num_minibatches=8,
                                                         update_epochs=3))  # fmt: skip
        t0 = time.perf_counter()
        learner.update(last)
        update_s = time.perf_counter() - t0
    out: dict[str, Any] = {
        "actors": actors, "envs_per_actor": envs_per_actor, "steps": steps,
        "frame_mb_per_batch": frame_bytes / 2**20,
        "frame_bytes_copied_per_batch": {
            "off": 2 * frame_bytes,  # actor -> object store, then np.concatenate
            "on": 0,  # the actors' frames land in the learner's buffer (the env -> batch copy
            # that both make, as before, is not counted)
        },
        "ppo_update_s": update_s,
        "order": "off, on, off, on, ... (rounds alternations), each a fresh sampler",
    }  # fmt: skip
    for mode, rs in runs.items():
        out[mode] = {key: float(np.median([r[key] for r in rs]))
                     for key in ("transfer_s", "wait_s", "learner_cpu_s", "shared_obs")}  # fmt: skip
        out[mode]["runs"] = rs
    scale = (64 * 256) / (steps * actors * envs_per_actor)
    saved = out["off"]["transfer_s"] - out["on"]["transfer_s"]
    out["transfer_s_saved_per_batch"] = saved
    out["transfer_s_saved_share_of_update"] = saved / max(update_s, 1e-9)
    out["at_train_procgen_batch"] = {
        "frame_mb": 64 * 256 * 3 * 64 * 64 / 2**20,
        "transfer_s_off": out["off"]["transfer_s"] * scale,
        "transfer_s_on": out["on"]["transfer_s"] * scale,
        "ppo_update_s": update_s * scale,
    }
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


# -- `loupe bench --gpu` (make bench-gpu): one GPU box, bounded time --------------------------------
@dataclasses.dataclass
class GpuBenchConfig:
    """Settings of `loupe bench --gpu`: end to end with central inference, learner, IG, evaluation."""

    #: torch device the learner, central inference and IG run on ("cuda" unless a dry run)
    device: str = "cuda"
    #: tiny sizes (a dry run of every code path, e.g. on CPU); figures then mean nothing
    quick: bool = False
    #: seconds the whole benchmark may take; what does not fit is listed under "skipped"
    budget_s: float = 360.0
    #: most rollout actors in the end-to-end sweep (0: the CPUs less two)
    max_actors: int = 0


def _gpu_sizes(cfg: GpuBenchConfig) -> dict[str, Any]:
    """Workload of each part: the procgen preset's update on the GPU box, tiny ones when quick."""
    import os

    cpus = os.cpu_count() or 1
    max_actors = cfg.max_actors or max(1, cpus - 2)
    if cfg.quick:
        return dict(policy="nature", envs_per_actor=2, num_steps=8, minibatches=2, epochs=1,
                    actors=[1], updates=1, learner_envs=2, learner_steps=16, ig_batches=[2],
                    ig_policies=[("interpretable", "2b")], eval_levels=2, eval_workers=1)  # fmt: skip
    sweep = sorted({1, *[a for a in (2, 4, 8, 16, 32) if a < max_actors], max_actors})
    return dict(policy="impala", envs_per_actor=32, num_steps=64, minibatches=8, epochs=3,
                actors=sweep, updates=2, learner_envs=64, learner_steps=256,
                ig_batches=[16, 64, 256], ig_policies=[("interpretable", "2b"), ("impala", "s2")],
                eval_levels=256, eval_workers=max(1, min(cpus - 1, 15)))  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gpu_end_to_end(size: dict[str, Any], actors: int, device: str) -> dict[str, Any]:
    """CoinRun PPO steps/s with ``actors`` env-stepping actors and the policy on ``device``."""
    from loupe.train import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        n = size["envs_per_actor"] * actors
        cfg = _train_config("procgen:coinrun", size["policy"], n, size["num_steps"], 10**9, tmp,
                            actors=actors, distribution_mode="easy")  # fmt: skip
        ppo = dataclasses.replace(cfg.ppo, num_minibatches=size["minibatches"],
                                  update_epochs=size["epochs"])  # fmt: skip
        cfg = dataclasses.replace(cfg, ppo=ppo, inference="central", device=device)
        trainer = Trainer(cfg, progress=False)
        try:
            trainer.sampler.start(trainer.weights(), 0)
            sample = update = 0.0
            for u in range(size["updates"] + 1):  # the first is warm-up
                t0 = time.perf_counter()
                rollout, _ = trainer.sampler.collect()
                t1 = time.perf_counter()
                trainer.learner.update(rollout)
                trainer.sampler.publish(trainer.weights(), u + 1)
                _sync(trainer.device)
                t2 = time.perf_counter()
                if u:
                    sample, update = sample + t1 - t0, update + t2 - t1
        finally:
            trainer.sampler.close()
    steps = n * size["num_steps"] * size["updates"]
    return {"actors": actors, "num_envs": n, "steps_per_s": steps / (sample + update),
            "sampling_steps_per_s": steps / sample, "update_steps_per_s": steps / update}  # fmt: skip


def _synthetic_rollout(num_steps: int, num_envs: int, n_actions: int, seed: int = 0):
    """A procgen-shaped Rollout of random frames, actions and rewards (for learner-only figures)."""
    from learner.rollout import Rollout

    rng = np.random.default_rng(seed)
    t, n = num_steps, num_envs
    return Rollout(
        obs=rng.integers(0, 256, (t, n, 3, 64, 64), dtype=np.uint8),
        actions=rng.integers(0, n_actions, (t, n)).astype(np.int64),
        logprobs=np.full((t, n), -np.log(n_actions), np.float32),
        values=rng.normal(size=(t, n)).astype(np.float32),
        rewards=(rng.random((t, n)) < 0.05).astype(np.float32) * 10,
        dones=rng.random((t, n)) < 0.01,
        last_obs=rng.integers(0, 256, (n, 3, 64, 64), dtype=np.uint8),
        last_value=np.zeros(n, np.float32),
        level_seeds=np.full((t, n), -1, np.int64),
        policy_version=0,
        episodes=[],
    )


def gpu_learner(size: dict[str, Any], learners: int, precision: str, device: str) -> float:
    """PPO update steps/s alone (synthetic batch, the preset's epochs and minibatches)."""
    from attention import build_policy
    from learner import PPOConfig, PPOLearner

    n, t = size["learner_envs"], size["learner_steps"]
    ppo = PPOConfig.preset("procgen", num_envs=n, num_steps=t, num_minibatches=size["minibatches"],
                           update_epochs=size["epochs"], precision=precision)  # fmt: skip
    torch.manual_seed(0)
    policy = build_policy(size["policy"], (3, 64, 64), 15)
    if learners == 1:
        learner, close = PPOLearner(policy, ppo, device=device), None
    else:
        from loupe.distributed.learners import DataParallelLearner

        with tempfile.TemporaryDirectory() as tmp:
            cfg = dataclasses.replace(_train_config("procgen:coinrun", size["policy"], n, t, 10**9,
                                                    tmp), ppo=ppo, learners=learners)  # fmt: skip
            learner = DataParallelLearner(cfg, policy, torch.device(device))
        close = learner.close
    rollout = _synthetic_rollout(t, n, 15)
    try:
        learner.update(rollout)  # warm-up
        _sync(torch.device(device))
        t0 = time.perf_counter()
        for _ in range(size["updates"]):
            learner.update(rollout)
        _sync(torch.device(device))
        elapsed = time.perf_counter() - t0
    finally:
        if close:
            close()
    return n * t * size["updates"] / elapsed


def gpu_ig(policy_name: str, layer: str, batch: int, device: str, repeats: int = 3) -> dict:
    """Hidden-layer IG of value + every logit in one pass: observations/s (best of ``repeats``)."""
    from attention import build_policy
    from probes.attribution import IntegratedGradients

    torch.manual_seed(0)
    policy = build_policy(policy_name, (3, 64, 64), 15).to(device).eval()
    obs = torch.randint(0, 256, (batch, 3, 64, 64), dtype=torch.uint8, device=device)
    ig = IntegratedGradients(policy, layer)
    ig.attribute(obs[:1], "all")  # warm-up
    best = float("inf")
    for _ in range(repeats):
        _sync(torch.device(device))
        t0 = time.perf_counter()
        ig.attribute(obs, "all")
        _sync(torch.device(device))
        best = min(best, time.perf_counter() - t0)
    return {"batch": batch, "seconds": best, "obs_per_s": batch / best}


def gpu_evaluate(levels: int, workers: int) -> dict[str, Any]:
    """`loupe evaluate` levels/s on CoinRun (easy) with ``workers`` Ray evaluators, causes on."""
    from pathlib import Path

    from attention import build_policy
    from learner.checkpoint import save_checkpoint
    from loupe.distributed.evaluate import EvalConfig, evaluate

    torch.manual_seed(0)
    policy = build_policy("impala", (3, 64, 64), 15)
    with torch.no_grad():
        policy.pi.bias[8] = 4.0  # right+jump: levels end within a few hundred steps
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = save_checkpoint(Path(tmp) / "run", policy, {
            "step": 1, "env": "procgen:coinrun", "env_options": {"distribution_mode": "easy"}})  # fmt: skip
        summary = evaluate(EvalConfig(checkpoints=[str(ckpt)], out=f"{tmp}/eval", levels=levels,
                                      workers=workers), progress=False)  # fmt: skip
    (stats,) = summary["checkpoints"].values()
    return {"levels": levels, "workers": workers, "levels_per_s": stats["levels_per_s"]}


def run_gpu_benchmarks(cfg: GpuBenchConfig, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Every GPU figure in one run, within ``cfg.budget_s``; parts that would not fit are skipped."""
    from loupe.errors import LoupeError

    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LoupeError(
            "bench --gpu needs a CUDA device and torch sees none; run it on a GPU machine "
            "(a dry run of the code path here: loupe bench --gpu --device cpu --quick)"
        )
    if device.type != "cuda" and not cfg.quick:
        raise LoupeError("bench --gpu on a CPU is only a dry run: add --quick")
    size = _gpu_sizes(cfg)
    start = time.perf_counter()
    deadline = start + cfg.budget_s
    gpus = torch.cuda.device_count() if device.type == "cuda" else 1
    results: dict[str, Any] = {
        "machine": machine_info(),
        "config": dataclasses.asdict(cfg),
        "sizes": {k: v for k, v in size.items() if k != "ig_policies"},
        "skipped": [],
    }

    def fits(what: str, share: float) -> bool:
        """Whether ``what`` may start: it should leave ``share`` of the budget for later parts."""
        if time.perf_counter() + share * cfg.budget_s <= deadline:
            return True
        results["skipped"].append(what)
        echo(f"  skipped {what}: the time budget is spent")
        return False

    e2e: dict[str, Any] = {"policy": size["policy"], "inference": "central", "runs": [],
                           "target": ">= 100k CoinRun steps/s end to end (SPEC 3)"}  # fmt: skip
    results["end_to_end"] = e2e
    for actors in size["actors"]:
        if fits(f"end_to_end actors={actors}", 0.45):
            echo(f"bench gpu: end to end, central inference, {actors} actor(s) ...")
            e2e["runs"].append(gpu_end_to_end(size, actors, cfg.device))
    if e2e["runs"]:
        e2e["best_steps_per_s"] = max(r["steps_per_s"] for r in e2e["runs"])

    learner: dict[str, Any] = {"policy": size["policy"], "runs": [],
                               "batch": size["learner_envs"] * size["learner_steps"]}  # fmt: skip
    results["learner"] = learner
    for learners in range(1, gpus + 1):
        for precision in ("fp32", "bf16", "fp32", "bf16"):  # alternated: A B A B
            if fits(f"learner learners={learners} {precision}", 0.25):
                echo(f"bench gpu: learner only, {learners} learner(s), {precision} ...")
                sps = gpu_learner(size, learners, precision, cfg.device)
                learner["runs"].append({"learners": learners, "precision": precision,
                                        "steps_per_s": sps})  # fmt: skip
    for learners in range(1, gpus + 1):
        for precision in ("fp32", "bf16"):
            rates = [r["steps_per_s"] for r in learner["runs"]
                     if r["learners"] == learners and r["precision"] == precision]  # fmt: skip
            if rates:
                learner[f"learners_{learners}_{precision}_steps_per_s"] = float(np.mean(rates))

    ig: dict[str, Any] = {"targets": "value + every logit, one pass"}
    results["ig"] = ig
    for name, layer in size["ig_policies"]:
        for batch in size["ig_batches"]:
            if fits(f"ig {name}/{layer} B={batch}", 0.12):
                echo(f"bench gpu: IG {name}/{layer}, B={batch} ...")
                ig.setdefault(f"{name}/{layer}", {})[str(batch)] = gpu_ig(
                    name, layer, batch, cfg.device
                )

    if fits("evaluate", 0.0):
        echo(f"bench gpu: evaluation, {size['eval_workers']} worker(s) ...")
        results["evaluate"] = gpu_evaluate(size["eval_levels"], size["eval_workers"])
    results["bench_seconds"] = time.perf_counter() - start
    results["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return results


#: the update levers measured one at a time on top of the previous ones (each a PPOConfig change)
UPDATE_LEVERS: list[tuple[str, dict[str, Any]]] = [
    ("baseline", dict(precision="fp32", micro_batch=0, reuse_buffers=False, malloc_tuning=False)),
    ("+malloc_tuning", dict(precision="fp32", micro_batch=0, reuse_buffers=False)),
    ("+reuse_buffers", dict(precision="fp32", micro_batch=0)),
    ("+micro_batch_256", dict(precision="fp32", micro_batch=256)),
    ("+bf16", dict(micro_batch=256)),
    ("+channels_last", dict(micro_batch=256, channels_last=True)),
    ("+bf16, micro_batch_512", dict(micro_batch=512)),
]


def update_step_worker(
    policy: str, overrides: dict[str, Any], minibatch: int, steps: int
) -> dict[str, Any]:
    """Adam steps/s of PPOLearner on one synthetic CoinRun minibatch of ``minibatch`` samples
    (procgen preset, IMPALA CNN), with user/system CPU seconds of the timed steps. The ratio is
    taken against the behaviour policy (a stale synthetic batch would otherwise add a forward
    pass for the proximal log-probabilities to every step)."""
    from attention import build_policy
    from learner import PPOConfig, PPOLearner

    torch.manual_seed(0)
    t, n = minibatch // 64, 64
    cfg = PPOConfig.preset(
        "procgen",
        num_envs=n,
        num_steps=t,
        num_minibatches=1,
        update_epochs=1,
        **{"proximal": "behaviour", **overrides},
    )
    learner = PPOLearner(build_policy(policy, (3, 64, 64), 15), cfg)
    rollout = _synthetic_batch(t, n)
    learner.update(rollout)  # warm-up (and compile, if asked)
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(steps):
        learner.update(rollout)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "samples_per_s": steps * minibatch / wall,
        "wall_s": wall,
        "user_s": r1.ru_utime - r0.ru_utime,
        "system_s": r1.ru_stime - r0.ru_stime,
        "precision": learner.precision,
    }


def _in_subprocess(fn: str, **kwargs) -> dict[str, Any]:
    """``loupe.bench.<fn>(**kwargs)`` in a fresh interpreter (malloc settings are per process)."""
    code = (
        "import json, sys; import loupe.bench as b; "
        f"print(json.dumps(b.{fn}(**json.loads(sys.argv[1]))))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(kwargs)],
        capture_output=True, text=True, env=os.environ.copy(), check=False,
    )  # fmt: skip
    if proc.returncode:
        raise RuntimeError(f"benchmark worker failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@benchmark("update")
def bench_update(opts: dict[str, Any]) -> dict[str, Any]:
    """PPO update levers on and off (IMPALA, minibatch 2048 as in the procgen preset).

    Each lever is added to the previous ones; every configuration runs in its own process, and
    the list is run ``rounds`` times in alternation (A B C ... A B C ...) so load from other work
    on the machine spreads over all of them. Reported: the median samples/s over rounds.
    """
    minibatch, steps, rounds = opts["minibatch"], opts["steps"], opts["rounds"]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in UPDATE_LEVERS}
    for _ in range(rounds):
        for name, overrides in UPDATE_LEVERS:
            runs[name].append(_in_subprocess(
                "update_step_worker", policy="impala", overrides=overrides,
                minibatch=minibatch, steps=steps))  # fmt: skip
    out: dict[str, Any] = {"policy": "impala", "minibatch": minibatch, "steps": steps}
    base = float(np.median([r["samples_per_s"] for r in runs["baseline"]]))
    for name, _ in UPDATE_LEVERS:
        sps = float(np.median([r["samples_per_s"] for r in runs[name]]))
        out[name] = {
            "samples_per_s": sps,
            "vs_baseline": sps / base,
            "user_s_per_step": float(np.median([r["user_s"] for r in runs[name]])) / steps,
            "system_s_per_step": float(np.median([r["system_s"] for r in runs[name]])) / steps,
            "cpu_ms_per_sample": float(
                np.median(
                    [1000 * (r["user_s"] + r["system_s"]) / (steps * minibatch) for r in runs[name]]
                )
            ),  # fmt: skip
            "precision": runs[name][0]["precision"],
            "rounds": [r["samples_per_s"] for r in runs[name]],
        }
    return out


#: the interpretable CNN's update configurations, alternated A B C ... A B C ... in one process
#: (malloc tuning and reused buffers on in all). ``reference_l2_pool`` runs autograd's own chain
#: for ReLU + L2 pooling instead of ``attention.nets.relu_l2_pool`` (the same numbers).
UPDATE_AB: list[tuple[str, dict[str, Any]]] = [
    ("fp32", dict(precision="fp32", channels_last=False, reference_l2_pool=True)),
    ("fp32, fused l2 pool", dict(precision="fp32", channels_last=False)),
    ("fp32, fused l2 pool, channels_last", dict(precision="fp32", channels_last=True)),
    ("bf16", dict(precision="bf16", channels_last=False, reference_l2_pool=True)),
    ("bf16, fused l2 pool", dict(precision="bf16", channels_last=False)),
    ("bf16, channels_last", dict(precision="bf16", channels_last=True, reference_l2_pool=True)),
    ("defaults (auto: bf16, fused l2 pool, channels_last)", dict()),
    ("defaults, micro_batch 256", dict(micro_batch=256)),
    ("defaults, micro_batch 512", dict(micro_batch=512)),
    ("defaults, compile", dict(compile=True)),
]
#: sampler inference configurations (the policy on 64 envs' frames, as a rollout actor runs it)
INFERENCE_AB: list[tuple[str, dict[str, Any]]] = [
    ("fp32", dict(precision="fp32", channels_last=False)),
    ("fp32, channels_last", dict(precision="fp32", channels_last=True)),
    ("bf16", dict(precision="bf16", channels_last=False)),
    ("bf16, channels_last", dict(precision="bf16", channels_last=True)),
]


def _synthetic_batch(t: int, n: int):
    from learner import Rollout

    rng = np.random.default_rng(0)
    return Rollout(
        obs=rng.integers(0, 256, (t, n, 3, 64, 64), dtype=np.uint8),
        actions=rng.integers(0, 15, (t, n)),
        logprobs=np.full((t, n), -np.log(15), np.float32),
        values=rng.normal(size=(t, n)).astype(np.float32),
        rewards=rng.normal(size=(t, n)).astype(np.float32),
        dones=rng.random((t, n)) < 0.01,
        last_obs=np.zeros((n, 3, 64, 64), np.uint8),
        last_value=np.zeros(n, np.float32),
        level_seeds=np.full((t, n), -1),
    )


def _cpu_wall(fn: Callable[[], Any]) -> tuple[float, float]:
    """(process CPU seconds, wall seconds) of one call of ``fn``."""
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - c0, time.perf_counter() - t0


def update_ab_worker(
    policy: str,
    minibatch: int,
    steps: int,
    rounds: int,
    threads: int,
    inference_steps: int,
    only: list[str] | None = None,
) -> dict[str, Any]:
    """``UPDATE_AB`` and ``INFERENCE_AB`` alternated in this process -> CPU and wall seconds.

    Each update measurement is ``steps`` Adam steps on one synthetic CoinRun minibatch of
    ``minibatch`` samples (procgen preset, ratio against the behaviour policy: no extra forward
    pass), after one warm-up step that also holds any compile (its wall time includes the
    compile workers; its CPU time is this process's only). ``threads``: torch intra-op threads
    (0: torch's default). ``only``: the names of the configurations to run (default: all).
    """
    import torch.nn.functional as F

    import attention.nets as nets
    from attention import build_policy
    from learner import PPOConfig, PPOLearner
    from learner.ppo import resolve_precision

    if threads:
        torch.set_num_threads(threads)
    fused = nets.relu_l2_pool

    def reference(z: torch.Tensor) -> torch.Tensor:
        return nets.l2_pool(F.relu(z))

    t, n = max(1, minibatch // 64), 64
    rollout = _synthetic_batch(t, n)
    learners, l2 = {}, {}
    for name, overrides in UPDATE_AB:
        if only is not None and name not in only:
            continue
        over = dict(overrides)
        l2[name] = reference if over.pop("reference_l2_pool", False) else fused
        cfg = PPOConfig.preset("procgen", num_envs=n, num_steps=t, num_minibatches=1,
                               update_epochs=1, proximal="behaviour", **over)  # fmt: skip
        torch.manual_seed(0)
        learners[name] = PPOLearner(build_policy(policy, (3, 64, 64), 15), cfg)
    out: dict[str, Any] = {"threads": torch.get_num_threads(), "update": {}, "inference": {}}

    def run(name: str) -> None:
        nets.relu_l2_pool = l2[name]
        for _ in range(steps):
            learners[name].update(rollout)

    try:
        for name, learner in learners.items():
            nets.relu_l2_pool = l2[name]
            cpu, wall = _cpu_wall(functools.partial(learner.update, rollout))
            out["update"][name] = {
                "precision": learner.precision, "channels_last": learner.channels_last,
                "micro_batch": learner.cfg.micro_batch, "compile": learner.cfg.compile,
                "warmup_cpu_s": cpu, "warmup_wall_s": wall, "cpu_ms_per_sample": [],
                "wall_ms_per_sample": [], "load_average": [],
            }  # fmt: skip
        for _ in range(rounds):
            for name in learners:
                cpu, wall = _cpu_wall(functools.partial(run, name))
                rec = out["update"][name]
                rec["cpu_ms_per_sample"].append(1000 * cpu / (steps * t * n))
                rec["wall_ms_per_sample"].append(1000 * wall / (steps * t * n))
                rec["load_average"].append(os.getloadavg()[0])
    finally:
        nets.relu_l2_pool = fused
    learners.clear()  # free the update buffers before the inference runs
    from actors.rollout import sample_actions

    obs = _synthetic_batch(1, n).obs[0]  # (64, 3, 64, 64) uint8
    generator = torch.Generator().manual_seed(0)
    policies = {}
    for name, setting in INFERENCE_AB:
        if only is not None and name not in only:
            continue
        torch.manual_seed(0)
        net = build_policy(policy, (3, 64, 64), 15).eval()
        if setting["channels_last"]:
            net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        bf16 = resolve_precision(setting["precision"], torch.device("cpu"), policy) == "bf16"
        policies[name] = (net, bf16)
        out["inference"][name] = {"cpu_ms_per_step": [], "wall_ms_per_step": [], "load_average": []}

    def act(name: str) -> None:
        net, bf16 = policies[name]
        for _ in range(inference_steps):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                sample_actions(net, obs, generator)

    for name in policies:
        act(name)  # warm-up
    for _ in range(rounds):
        for name in policies:
            cpu, wall = _cpu_wall(functools.partial(act, name))
            rec = out["inference"][name]
            rec["cpu_ms_per_step"].append(1000 * cpu / inference_steps)
            rec["wall_ms_per_step"].append(1000 * wall / inference_steps)
            rec["load_average"].append(os.getloadavg()[0])
    return out


def _medians(records: dict[str, dict[str, Any]], base: str) -> dict[str, dict[str, Any]]:
    """Each list of per-round figures -> its median (the rounds kept as ``<key>_rounds``), and
    CPU per sample or step relative to the ``base`` record."""
    out: dict[str, dict[str, Any]] = {}
    for name, rec in records.items():
        row: dict[str, Any] = {}
        for key, value in rec.items():
            if isinstance(value, list):
                row[key] = float(np.median(value))
                row[f"{key}_rounds"] = value
            else:
                row[key] = value
        out[name] = row
    cpu_key = next(k for k in out[base] if k.startswith("cpu_ms_per") and "rounds" not in k)
    for row in out.values():
        row["cpu_vs_first"] = row[cpu_key] / out[base][cpu_key]
    return out


@benchmark("update_interpretable")
def bench_update_interpretable(opts: dict[str, Any]) -> dict[str, Any]:
    """The interpretable CNN's update (minibatch 2048 as in the procgen preset) and sampler
    inference (64 envs) with each lever on and off, alternated A B A B in one process.

    CPU seconds per sample (user + system of the whole process, all threads) are the figure to
    compare on a shared machine; with 2 threads they include time one thread spins waiting for
    the other when the machine is busy, so the run is repeated with 1 thread (the work alone).
    """
    out: dict[str, Any] = {"policy": "interpretable", "minibatch": opts["minibatch"],
                           "steps": opts["steps"], "rounds": opts["rounds"],
                           "inference_envs": 64, "inference_steps": opts["inference_steps"]}  # fmt: skip
    for threads in opts["update_threads"]:
        res = _in_subprocess(
            "update_ab_worker", policy="interpretable", minibatch=opts["minibatch"],
            steps=opts["steps"], rounds=opts["rounds"], threads=threads,
            inference_steps=opts["inference_steps"],
        )  # fmt: skip
        out[f"threads_{res['threads']}"] = {
            "update": _medians(res["update"], UPDATE_AB[0][0]),
            "inference": _medians(res["inference"], INFERENCE_AB[0][0]),
        }
    return out


#: the train-procgen settings both sides run with (cleanrl's ppo_procgen.py defaults, spelled out)
PEER_SETTINGS = dict(
    env="coinrun", num_envs=64, num_steps=256, num_minibatches=8, update_epochs=3, lr=5e-4,
    anneal_lr=False, gamma=0.999, gae_lambda=0.95, clip_coef=0.2, clip_vloss=True, ent_coef=0.01,
    vf_coef=0.5, max_grad_norm=0.5, norm_adv=True, network="IMPALA CNN 16,32,32 + fc 256",
    levels="num_levels=0, distribution_mode=easy", device="cpu",
)  # fmt: skip


def peer_loupe_worker(steps: int, run_dir: str, num_envs: int, num_steps: int) -> dict[str, Any]:
    """`loupe train` as a user runs it (same parser and config) -> steps/s of the training loop."""
    import argparse

    from loupe.cli import _train_parser, build_train_config
    from loupe.rundir import RunDir
    from loupe.train import Trainer

    parser = argparse.ArgumentParser(parents=[_train_parser()])
    args = parser.parse_args([
        "--env", "procgen:coinrun", "--policy", "impala", "--preset", "procgen",
        "--env-option", "num_levels=0", "--env-option", "distribution_mode=easy",
        "--device", "cpu", "--total-steps", str(steps), "--run-dir", run_dir, "--no-announce",
        "--no-progress", "--num-envs", str(num_envs), "--num-steps", str(num_steps),
    ])  # fmt: skip
    config = build_train_config(args)
    trainer = Trainer(config, progress=False)
    RunDir(config.run_dir).create()
    config.save(RunDir(config.run_dir).config_path)
    trainer.train()
    batch = config.ppo.batch_size
    loop_s = sum(batch / h["steps_per_s"] for h in trainer.history)
    return {
        "steps": trainer.learner.global_step,
        "loop_s": loop_s,
        "steps_per_s": trainer.learner.global_step / loop_s,
        "precision": trainer.learner.precision,
        "update_s": [h.get("update_s") for h in trainer.history],
    }


def _timed_child(cmd: list[str], cwd: str) -> tuple[subprocess.CompletedProcess, dict[str, float]]:
    r0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    usage = {"process_wall_s": wall, "process_user_s": r1.ru_utime - r0.ru_utime,
             "process_system_s": r1.ru_stime - r0.ru_stime}  # fmt: skip
    return proc, usage


def run_loupe_peer(steps: int, num_envs: int, num_steps: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        code = (
            "import json, sys; import loupe.bench as b; "
            "print(json.dumps(b.peer_loupe_worker(int(sys.argv[1]), sys.argv[2], "
            "int(sys.argv[3]), int(sys.argv[4]))))"
        )
        cmd = [sys.executable, "-c", code, str(steps), f"{tmp}/run", str(num_envs), str(num_steps)]
        proc, usage = _timed_child(cmd, tmp)
    if proc.returncode:
        raise RuntimeError(f"loupe train failed:\n{proc.stderr[-3000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), **usage}


def run_cleanrl(python: str, steps: int, num_envs: int, num_steps: int) -> dict[str, Any]:
    """cleanrl's ppo_procgen.py from the installed package; its SPS line (steps over the time
    since its training loop started) is the figure, start-up excluded as for loupe."""
    args = [
        python, "-m", "cleanrl.ppo_procgen", "--env-id", "coinrun", "--total-timesteps",
        str(steps), "--num-envs", str(num_envs), "--num-steps", str(num_steps), "--num-minibatches", "8",
        "--update-epochs", "3", "--learning-rate", "5e-4", "--anneal-lr", "False", "--gamma",
        "0.999", "--gae-lambda", "0.95", "--clip-coef", "0.2", "--clip-vloss", "True",
        "--ent-coef", "0.01", "--vf-coef", "0.5", "--max-grad-norm", "0.5", "--norm-adv", "True",
        "--cuda", "False", "--track", "False", "--capture-video", "False",
    ]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:  # its TensorBoard files land here
        proc, usage = _timed_child(args, tmp)
    if proc.returncode:
        raise RuntimeError(f"cleanrl ppo_procgen failed:\n{proc.stderr[-3000:]}")
    sps = [int(ln.split(":", 1)[1]) for ln in proc.stdout.splitlines() if ln.startswith("SPS:")]
    if not sps:
        raise RuntimeError(f"cleanrl printed no SPS line:\n{proc.stdout[-2000:]}")
    return {"steps": steps, "steps_per_s": float(sps[-1]), "sps_lines": sps, **usage}


@benchmark("peer", on_request=True)
def bench_peer(opts: dict[str, Any]) -> dict[str, Any]:
    """loupe vs cleanrl's ppo_procgen.py at identical settings, alternated A B A B in one run."""
    from pathlib import Path

    from loupe.errors import LoupeError

    # absolute: cleanrl runs in a temporary directory (a venv's python must not be resolved
    # through its symlink, or it loses the venv)
    python = os.path.abspath(opts["peer_python"])
    if not Path(python).exists():
        raise LoupeError(f"no cleanrl environment at {python}; run `make bench-peer` to build it")
    steps, rounds = opts["peer_steps"], opts["rounds"]
    shape = opts["peer_num_envs"], opts["peer_num_steps"]
    loupe_runs, cleanrl_runs = [], []
    for _ in range(rounds):
        loupe_runs.append(run_loupe_peer(steps, *shape))
        cleanrl_runs.append(run_cleanrl(python, steps, *shape))
    lo = float(np.median([r["steps_per_s"] for r in loupe_runs]))
    cl = float(np.median([r["steps_per_s"] for r in cleanrl_runs]))
    return {
        "settings": {**PEER_SETTINGS, "num_envs": shape[0], "num_steps": shape[1]},
        "steps_per_run": steps,
        "order": "loupe, cleanrl, loupe, cleanrl, ... (rounds alternations)",
        "startup": "excluded: each side's steps/s is steps over its training loop (loupe: the "
        "sum of its per-update sample+update times; cleanrl: its own SPS line, timed from the "
        "start of its loop); process wall/user/system times include start-up",
        "loupe": {"steps_per_s": lo, "runs": loupe_runs},
        "cleanrl": {"steps_per_s": cl, "runs": cleanrl_runs},
        "ratio_loupe_over_cleanrl": lo / cl,
        "target": "loupe >= 2x cleanrl",
    }


@benchmark("ig_captum", on_request=True)
def bench_ig_captum(opts: dict[str, Any]) -> dict[str, Any]:
    """IG for value + all 15 logits in one pass vs 16 Captum calls at each batch size."""
    from attention import build_policy
    from probes.attribution import benchmark_ig_vs_captum

    out: dict[str, Any] = {"n_steps": 10, "targets": 16, "rounds": opts["rounds"]}
    out["load_average_before"] = list(os.getloadavg())
    for name, layer in (("impala", "s2"), ("interpretable", "2b")):
        torch.manual_seed(0)
        policy = build_policy(name, (3, 64, 64), 15)
        for b in opts["ig_batches"]:
            obs = torch.randint(0, 256, (b, 3, 64, 64), dtype=torch.uint8)
            out[f"{name}/{layer}/B={b}"] = benchmark_ig_vs_captum(
                policy, obs, layer, repeats=opts["rounds"]
            )
    out["load_average_after"] = list(os.getloadavg())
    out["order"] = "per batch size: loupe, Captum, loupe, Captum, ... (rounds alternations)"
    out["note"] = (
        "best of the rounds; wall seconds are disturbed by other work on a shared machine (see "
        "the load averages), cpu_s (user + system of this process) less so"
    )
    out["agreement"] = (
        "the Riemann points are Captum's bit for bit (probes.attribution.riemann_alphas) and the "
        "forward is Captum's: at a max-pool near-tie one ulp in alpha * a decides where a step's "
        "gradient goes (impala s2 at B=256 once differed by 0.048 that way)"
    )
    out["target"] = ">= 1.5x of 16 Captum calls at every B, max abs diff <= 1e-5"
    return out


def _top_ops(prof, n: int = 8) -> list[dict[str, Any]]:
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [{"op": e.key, "self_cpu_ms": e.self_cpu_time_total / 1000,
             "share": e.self_cpu_time_total / total, "calls": e.count} for e in events[:n]]  # fmt: skip


def profile_worker(part: str, overrides: dict[str, Any], size: int) -> dict[str, Any]:
    """torch.profiler over one update / sampler batch / IG call -> the top ops by self CPU time,
    with wall, user and system seconds of the profiled call."""
    from torch.profiler import ProfilerActivity, profile

    if part == "update":
        from attention import build_policy
        from learner import PPOConfig, PPOLearner

        t, n = size // 64, 64
        cfg = PPOConfig.preset("procgen", num_envs=n, num_steps=t, num_minibatches=1,
                               update_epochs=1, **overrides)  # fmt: skip
        learner = PPOLearner(build_policy("impala", (3, 64, 64), 15), cfg)
        rng = np.random.default_rng(0)
        obs = torch.from_numpy(rng.integers(0, 256, (size, 3, 64, 64), dtype=np.uint8))
        flat = {"actions": torch.from_numpy(rng.integers(0, 15, size)),
                "logprobs": torch.full((size,), -float(np.log(15))),
                "values": torch.randn(size), "advantages": torch.randn(size),
                "returns": torch.randn(size)}  # fmt: skip
        idx = torch.randperm(size)

        def call():
            learner._step(*learner._gather(obs, flat, idx), 0.2)
    elif part == "sampler":
        with tempfile.TemporaryDirectory() as tmp:
            from loupe.train import Trainer

            cfg = _train_config("procgen:coinrun", "impala", 64, size, 10**9, tmp)
            trainer = Trainer(cfg, progress=False)
            trainer.sampler.start(trainer.weights(), 0)
            call = trainer.sampler.collect
    elif part == "ig":
        from attention import build_policy
        from probes.attribution import IntegratedGradients

        policy = build_policy("impala", (3, 64, 64), 15)
        ig = IntegratedGradients(policy, "s2")
        obs = torch.randint(0, 256, (size, 3, 64, 64), dtype=torch.uint8)

        def call():
            ig.attribute(obs)
    else:
        raise ValueError(part)
    call()  # warm-up
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return {"part": part, "size": size, "overrides": overrides, "wall_s": wall,
            "user_s": r1.ru_utime - r0.ru_utime, "system_s": r1.ru_stime - r0.ru_stime,
            "top_ops": _top_ops(prof)}  # fmt: skip


@benchmark("profile", on_request=True)
def bench_profile(opts: dict[str, Any]) -> dict[str, Any]:
    """torch.profiler summaries of the update (before/after the levers), sampler and IG."""
    before = dict(precision="fp32", micro_batch=0, reuse_buffers=False, malloc_tuning=False)
    runs = [("update/before", "update", before, opts["minibatch"]),
            ("update/after", "update", {}, opts["minibatch"]),
            ("sampler (64 envs x 16 steps)", "sampler", {}, 16),
            ("ig impala/s2 B=16, 16 targets", "ig", {}, 16)]  # fmt: skip
    return {name: _in_subprocess("profile_worker", part=part, overrides=o, size=size)
            for name, part, o, size in runs}  # fmt: skip


@benchmark("explorer")
def bench_explorer(opts: dict[str, Any]) -> dict[str, Any]:
    """`loupe view` of one checkpoint: 8 trajectories x 256 frames, IG + NMF at the analysis layer
    (random-weights interpretable network on CoinRun): bundle build time and size with the default
    settings (one torch thread), then with torch's own thread count, and the time from opening the
    page in Chromium to its first frame drawn, from the loopback server."""
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
        "load_avg_start": list(os.getloadavg()),
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
        out["torch_threads"] = {"default build": BundleConfig().torch_threads,
                                "torch's own choice": torch.get_num_threads()}  # fmt: skip
        out["targets"] = built["targets"]
        out["saliency"] = {k: v.get("where", "every frame") for k, v in built["saliency"].items()}
        out["on_request"] = ("loupe view --target logit:I (other targets), --saliency all (saliency "
                             "at every frame), --saliency-every N, --ig-steps N, "
                             "--tsne-iterations N")  # fmt: skip
        out["size_mb"] = bundle_size(Path(tmp) / "view") / 1e6
        out["first_frame_s"] = _first_frame_s(Path(tmp) / "view", BundleServer)
        t0, c0 = time.perf_counter(), time.process_time()
        other = build_probe_bundle(Path(tmp) / "probe", Path(tmp) / "view1",
                                   BundleConfig(torch_threads=0))  # fmt: skip
        out["build_torch_threads_s"] = time.perf_counter() - t0
        out["build_torch_threads_cpu_s"] = time.process_time() - c0
        out["build_torch_threads_timings"] = other["timings"]
        out["ig_steps_check"] = _ig_steps_check(BundleConfig().ig_steps)
    out["load_avg_end"] = list(os.getloadavg())
    out["cpus"] = os.cpu_count()
    out["target"] = "build < 120 s on 2 cores, size < 30 MB, first frame < 1 s"
    return out


def _ig_steps_check(steps: int) -> dict[str, Any] | None:
    """The bundle's IG steps against 64 steps on 64 frames of the shipped agent (value and the
    action groups): median relative L2 error and mean cosine of the attributions, per target."""
    from pathlib import Path

    from learner.checkpoint import find_checkpoint, load_checkpoint
    from probes.attribution import IntegratedGradients
    from probes.suite import ProbeConfig, record

    agent = Path(__file__).resolve().parents[1] / "agents" / "coinrun-interpretable"
    if not agent.is_dir():
        return None
    policy, meta = load_checkpoint(find_checkpoint(str(agent), say=None))
    policy.eval()
    obs = torch.from_numpy(record(policy, meta, ProbeConfig(num_envs=2, num_steps=32)).obs)
    obs = obs.reshape(-1, *obs.shape[2:])
    targets = ["value", ("left", [0, 1, 2]), ("right", [6, 7, 8]), ("up", [2, 5, 8]),
               ("down", [0, 3, 6])]  # fmt: skip
    ref = IntegratedGradients(policy, "2b", n_steps=64).attribute(obs, targets)
    got = IntegratedGradients(policy, "2b", n_steps=steps).attribute(obs, targets)
    a, b = got.attributions.flatten(2), ref.attributions.flatten(2)
    err = ((a - b).norm(dim=-1) / b.norm(dim=-1).clamp(min=1e-12)).median(1).values
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1).mean(1)
    return {"steps": steps, "reference_steps": 64, "frames": len(obs), "targets": ref.targets,
            "median_rel_error": [round(float(v), 4) for v in err],
            "mean_cosine": [round(float(v), 5) for v in cos]}  # fmt: skip


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
