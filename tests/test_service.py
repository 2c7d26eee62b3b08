"""`loupe serve` against a real server on a loopback port: real channels, Redis, Ray and policies."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis
import torch
from google.protobuf import message_factory

from attention import build_policy
from learner.checkpoint import save_checkpoint
from loupe.bus import CheckpointAnnouncement, CheckpointBus, connect
from loupe.bus.redis_server import RedisServer, free_port
from loupe.distributed.evaluate import EvalConfig, evaluate, read_records
from loupe.service.client import Client, act_request, channel_options
from loupe.service.proto.loupe.v1 import (
    evaluations_pb2,
    inspect_pb2,
    policy_pb2,
    policy_pb2_grpc,
)
from loupe.service.server import ServeConfig, ServerThread
from loupe.service.tensors import to_tensor

pytestmark = pytest.mark.integration

RUN = "svc-run"
TOKEN = "t0ken-for-the-tests-" + "x" * 16
MAX_WAIT_MS = 30.0


def tiny_run(root: Path) -> Path:
    """A run directory with two checkpoints of an untrained IMPALA policy pushed towards RIGHT+UP
    (levels end quickly), and a config.json."""
    run = root / RUN
    for step, bias in ((1, 4.0), (2, 2.0)):
        torch.manual_seed(step)
        policy = build_policy("impala", (3, 64, 64), 15)
        with torch.no_grad():
            policy.pi.bias[8] = bias
        meta = {
            "step": step,
            "env": "procgen:coinrun",
            "env_options": {"distribution_mode": "easy"},
        }
        save_checkpoint(run, policy, meta)
    config = {"run_id": RUN, "env": {"env_id": "procgen:coinrun"}, "policy": "impala"}
    (run / "config.json").write_text(json.dumps(config))
    return run


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    run = tiny_run(root)
    token = root / "token"
    token.write_text(TOKEN + "\n")
    redis_server = RedisServer(run / "redis").start()
    config = ServeConfig(
        runs=[str(run)],
        bind=f"127.0.0.1:{free_port()}",
        token_file=str(token),
        state_dir=str(root / "state"),
        max_batch=16,
        max_wait_ms=MAX_WAIT_MS,
        max_attribute_obs=8,
        eval_workers=1,
        eval_slots=4,
        eval_chunk=4,
        health_interval_s=0.2,
    )
    server = ServerThread(config).start()
    box = {"server": server, "config": config, "run": run, "redis": redis_server, "root": root}
    yield box
    box["server"].stop()
    redis_server.stop()


@pytest.fixture()
def client(world):
    c = Client(f"127.0.0.1:{world['config'].port}", token=TOKEN, timeout=120)
    yield c
    c.close()


def obs_batch(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, 64, 64), dtype=np.uint8)


def local_policy(world, name="ckpt-000000000001"):
    from learner.checkpoint import load_checkpoint

    policy, _ = load_checkpoint(world["run"] / "checkpoints" / f"{name}.json")
    return policy.eval()


def code_and_message(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code(), info.value.details()


# -- the token ---------------------------------------------------------------------------------
def _methods():
    from grpc_reflection.v1alpha import reflection_pb2

    files = (inspect_pb2, evaluations_pb2, policy_pb2, reflection_pb2)
    for module in files:
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                yield service.full_name, method


@pytest.mark.parametrize("token", [None, "wrong-" + "y" * 20])
def test_every_method_without_the_token_is_unauthenticated(world, token):
    channel = grpc.insecure_channel(f"127.0.0.1:{world['config'].port}")
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    seen = []
    for service, method in _methods():
        request_cls = message_factory.GetMessageClass(method.input_type)
        path = f"/{service}/{method.name}"
        kind = (method.client_streaming, method.server_streaming)
        make = {
            (False, False): channel.unary_unary,
            (False, True): channel.unary_stream,
            (True, False): channel.stream_unary,
            (True, True): channel.stream_stream,
        }[kind]
        call = make(path, request_serializer=request_cls.SerializeToString)
        request = iter([request_cls()]) if method.client_streaming else request_cls()
        with pytest.raises(grpc.RpcError) as info:
            reply = call(request, metadata=metadata, timeout=10)
            if method.server_streaming:
                list(reply)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, path
        assert "authorization: Bearer" in info.value.details()
        seen.append(path)
    assert len(seen) == 12  # Inspect 5, Evaluations 4, Policy 2, reflection 1
    # health is open
    assert Client(f"127.0.0.1:{world['config'].port}").health() == "SERVING"
    channel.close()


def test_reflection_lists_the_services(client):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (reply,) = list(stub.ServerReflectionInfo(iter([request]), metadata=client.metadata))
    names = {s.name for s in reply.list_services_response.service}
    assert {"loupe.v1.Inspect", "loupe.v1.Evaluations", "loupe.v1.Policy"} <= names
    assert "grpc.health.v1.Health" in names


# -- Inspect ---------------------------------------------------------------------------------------
def test_runs_and_checkpoints(client):
    (run,) = client.runs()
    assert run["run_id"] == RUN and run["checkpoints"] == 2 and run["redis_reachable"]
    names = [c["name"] for c in client.checkpoints(RUN)]
    assert names == ["ckpt-000000000001", "ckpt-000000000002"]


def test_attribute_equals_probes_in_process(world, client):
    from probes.attribution import IntegratedGradients

    obs = obs_batch(3)
    targets = ["value", "logit:8", "group:right=5,8"]
    got = client.attribute(RUN, "1", obs, layer="s3", targets=targets, n_steps=6)
    want = IntegratedGradients(local_policy(world), "s3", n_steps=6).attribute(
        torch.from_numpy(obs), targets=["value", "logit:8", ("right", [5, 8])]
    )
    assert got["targets"] == want.targets == ["value", "logit:8", "group:right"]
    assert got["attributions"].dtype == np.float32
    assert got["attributions"].shape == tuple(want.attributions.shape) == (3, 3, 32, 8, 8)
    np.testing.assert_array_equal(got["attributions"], want.attributions.numpy())
    np.testing.assert_array_equal(got["delta"], want.delta.numpy())


def test_act_equals_the_policy_in_process(world, client):
    obs = obs_batch(5, seed=1)
    got = client.act(RUN, "ckpt-000000000001", obs, greedy=True)
    with torch.no_grad():
        out = local_policy(world)(torch.from_numpy(obs))
    np.testing.assert_allclose(got["logits"], out.logits.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["values"], out.value.numpy(), rtol=1e-5, atol=1e-6)
    assert got["actions"].dtype == np.int64
    assert np.array_equal(got["actions"], got["logits"].argmax(1))
    sampled = [client.act(RUN, "1", obs, seed=3)["actions"] for _ in range(2)]
    assert np.array_equal(*sampled)  # the same seed samples the same actions


def test_act_stream_replies_in_order(client):
    batches = [obs_batch(1 + i % 3, seed=i) for i in range(6)]
    replies = list(client.act_stream(RUN, "latest", batches, greedy=True))
    assert [r["sequence"] for r in replies] == list(range(6))
    assert [len(r["actions"]) for r in replies] == [len(b) for b in batches]


def _announce(bus: CheckpointBus, step: int) -> str:
    return bus.publish_checkpoint(
        CheckpointAnnouncement(
            run_id=RUN,
            step=step,
            uri=f"/runs/{RUN}/checkpoints/ckpt-{step:012d}.json",
            sha256=f"{step:064x}",
            policy="impala",
            env="procgen:coinrun",
        )
    )


def _next_events(iterator, n: int) -> list[dict]:
    return [next(iterator) for _ in range(n)]


def test_watch_replays_goes_live_and_resumes_without_loss_or_duplicates(world, client):
    bus = CheckpointBus(connect(world["redis"].url), RUN)
    ids = [_announce(bus, step) for step in (10, 11, 12)]
    watch = client.watch_checkpoints(RUN, after_id="0")
    backlog = _next_events(watch, 3)
    assert [e["entry_id"] for e in backlog] == ids and [e["step"] for e in backlog] == [10, 11, 12]
    ids += [_announce(bus, 13), _announce(bus, 14)]  # while the stream is open
    live = _next_events(watch, 2)
    assert [e["step"] for e in live] == [13, 14]
    watch.close()
    # the client goes away after step 13; two more are announced meanwhile
    ids += [_announce(bus, 15), _announce(bus, 16)]
    resumed = client.watch_checkpoints(RUN, after_id=live[0]["entry_id"])
    again = _next_events(resumed, 3)
    assert [e["step"] for e in again] == [14, 15, 16]
    ids.append(_announce(bus, 17))
    assert next(resumed)["entry_id"] == ids[-1]
    resumed.close()
    # "$": only what is announced once the server has started reading
    _wait_for_watches(world, 0)
    only_new = client.watch_checkpoints(RUN, after_id="$")
    box = {}
    reader = threading.Thread(target=lambda: box.update(event=next(only_new)))
    reader.start()
    _wait_for_watches(world, 1)
    ids.append(_announce(bus, 18))
    reader.join(30)
    assert box["event"]["step"] == 18
    only_new.close()
    bus.client.close()


def _wait_for_watches(world, n: int) -> None:
    """Until exactly ``n`` WatchCheckpoints loops run and block in XREAD."""
    deadline = time.monotonic() + 20
    while (
        world["server"].server.inspect.active_watches != n
        or _blocked_xreads(world["redis"].url) != n
    ):
        assert time.monotonic() < deadline, (
            f"never {n} watch loops blocked in Redis: "
            f"{world['server'].server.inspect.active_watches}, {_blocked_xreads(world['redis'].url)}"
        )
        time.sleep(0.05)


def _blocked_xreads(url: str) -> int:
    r = redis.Redis.from_url(url, decode_responses=True)
    try:
        return sum(1 for c in r.client_list() if c["cmd"] == "xread" and "b" in c["flags"])
    finally:
        r.close()


def test_client_cancel_stops_the_redis_loop(world):
    c = Client(f"127.0.0.1:{world['config'].port}", token=TOKEN)
    call = c.inspect.WatchCheckpoints(
        inspect_pb2.WatchCheckpointsRequest(run=RUN, after_id="$"), metadata=c.metadata
    )
    _wait_for_watches(world, 1)
    call.cancel()
    _wait_for_watches(world, 0)  # the Redis loop stops with the client's cancel
    assert call.code() == grpc.StatusCode.CANCELLED
    c.close()


def test_probe_summary(world, client):
    from learner.checkpoint import read_meta
    from loupe.bus.probe_worker import ProbeWorker, WorkerConfig

    code, message = code_and_message(lambda: client.probe_summary(RUN, "2"))
    assert code == grpc.StatusCode.NOT_FOUND and "loupe probe --run" in message
    meta = read_meta(world["run"] / "checkpoints" / "ckpt-000000000002.json")
    out = ProbeWorker(None, world["run"], WorkerConfig()).out_dir(2, meta["sha256"])
    out.mkdir(parents=True)
    (out / "summary.json").write_text(json.dumps({"step": 2, "max_completeness_delta": 0.01}))
    found = client.probe_summary(RUN, "2")
    assert found["step"] == 2 and found["summary"]["max_completeness_delta"] == 0.01


# -- bad input --------------------------------------------------------------------------------------
def test_bad_input_gets_the_right_code_and_the_server_goes_on(client):
    obs = obs_batch(2)
    bad_bytes = to_tensor(obs)
    bad_bytes.shape[:] = [2, 3, 64, 65]
    wrong_shape = obs_batch(2)[:, :, :32]
    cases = {
        "unknown run": (lambda: client.act("nope", "latest", obs), "NOT_FOUND", "ListRuns"),
        "unknown checkpoint": (
            lambda: client.attribute(RUN, "99", obs),
            "NOT_FOUND",
            "ListCheckpoints",
        ),
        "bad checkpoint name": (
            lambda: client.act(RUN, "../x", obs),
            "INVALID_ARGUMENT",
            "a step or 'latest'",
        ),
        "bytes disagree": (
            lambda: client.policy.Act(
                policy_pb2.ActRequest(
                    checkpoint=act_request(RUN, "1", obs).checkpoint, observations=bad_bytes
                ),
                metadata=client.metadata,
            ),
            "INVALID_ARGUMENT",
            "little-endian bytes",
        ),
        "wrong shape": (lambda: client.act(RUN, "1", wrong_shape), "INVALID_ARGUMENT", "(N, 3"),
        "batch over the limit": (
            lambda: client.act(RUN, "1", obs_batch(17)),
            "RESOURCE_EXHAUSTED",
            "split the request",
        ),
        "attribute over the limit": (
            lambda: client.attribute(RUN, "1", obs_batch(9)),
            "RESOURCE_EXHAUSTED",
            "limit of 8",
        ),
        "unknown target": (
            lambda: client.attribute(RUN, "1", obs, targets=["entropy"]),
            "INVALID_ARGUMENT",
            "use 'value', 'logit:I'",
        ),
        "unknown layer": (
            lambda: client.attribute(RUN, "1", obs, layer="9z"),
            "INVALID_ARGUMENT",
            "valid layers",
        ),
        "malformed request id": (
            lambda: client.submit_evaluation([(RUN, "1")], levels=4, request_id="a b/c"),
            "INVALID_ARGUMENT",
            "A-Z a-z 0-9",
        ),
        "unknown evaluation": (
            lambda: client.get_evaluation("never-submitted"),
            "NOT_FOUND",
            "Submit it first",
        ),
        "bad stream id": (
            lambda: next(client.watch_checkpoints(RUN, after_id="yesterday")),
            "INVALID_ARGUMENT",
            "stream id",
        ),
    }
    for name, (call, code, hint) in cases.items():
        got, message = code_and_message(call)
        assert got.name == code, f"{name}: {got.name} {message}"
        assert hint in message, f"{name}: {message}"
        print(f"{name}: {got.name}: {message}")
    assert client.act(RUN, "1", obs)["actions"].shape == (2,)  # still serving


def test_short_deadline_is_deadline_exceeded_and_the_server_goes_on(client):
    code, _ = code_and_message(
        lambda: client.attribute(RUN, "1", obs_batch(8), n_steps=256, timeout=0.005)
    )
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert client.health() == "SERVING"
    assert len(client.checkpoints(RUN)) == 2


# -- Policy under load ------------------------------------------------------------------------------
def test_64_concurrent_clients_without_errors_and_batches_over_one(world):
    port = world["config"].port
    batcher_stats = []

    async def one_client(i: int) -> int:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", options=channel_options(64)
        ) as channel:
            stub = policy_pb2_grpc.PolicyStub(channel)
            for k in range(4):
                request = act_request(RUN, "1", obs_batch(1, seed=i), greedy=True, sequence=k)
                reply = await stub.Act(
                    request, metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=120
                )
                assert reply.sequence == k
        return 4

    async def main():
        results = await asyncio.gather(*[one_client(i) for i in range(64)], return_exceptions=True)
        return results

    before = dict(_batcher(world).stats.sizes) if _batcher(world) else {}
    results = asyncio.run(main())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    assert sum(results) == 256
    stats = _batcher(world).stats
    batcher_stats.append(stats)
    new = {size: n - before.get(size, 0) for size, n in stats.sizes.items()}
    assert sum(size * n for size, n in new.items()) == 256
    assert max(size for size, n in new.items() if n) > 1


def _batcher(world):
    from learner.checkpoint import read_meta

    sha = read_meta(world["run"] / "checkpoints" / "ckpt-000000000001.json")["sha256"]
    return world["server"].server.policy.batchers.get(sha)


def test_a_lone_request_is_flushed_at_max_wait(world, client):
    client.act(RUN, "1", obs_batch(1))  # the batcher exists and the checkpoint is loaded
    stats = _batcher(world).stats
    timed_out = stats.timed_out
    reply = client.act(RUN, "1", obs_batch(2))
    assert reply["batch_size"] == 2
    assert stats.timed_out == timed_out + 1
    assert stats.last_wait_s >= MAX_WAIT_MS / 1000


# -- health ------------------------------------------------------------------------------------------
def test_health_is_not_serving_while_redis_is_down(world, client):
    def wait_for(status: str) -> None:
        deadline = time.monotonic() + 20
        while client.health() != status:
            assert time.monotonic() < deadline, f"health never became {status}"
            time.sleep(0.1)

    world["redis"].stop()
    try:
        wait_for("NOT_SERVING")
        assert client.health("loupe.v1.Inspect") == "NOT_SERVING"
        assert client.health("loupe.v1.Policy") == "SERVING"
        code, message = code_and_message(lambda: next(client.watch_checkpoints(RUN)))
        assert code == grpc.StatusCode.UNAVAILABLE and "after_id" in message
    finally:
        world["redis"].start()
    wait_for("SERVING")


# -- Evaluations ---------------------------------------------------------------------------------------
def per_level(path: Path) -> dict[int, tuple]:
    return {k: (r.outcome, r.cause, r.ret, r.length) for k, r in read_records(path).items()}


def wait_for_levels(client, request_id: str, n: int) -> None:
    deadline = time.monotonic() + 300
    while True:
        status = client.get_evaluation(request_id)
        if status["levels_done"] >= n:
            return
        assert status["state"] in ("queued", "running"), status["error"]
        assert time.monotonic() < deadline, f"{request_id}: {n} levels not done in 300 s"
        time.sleep(0.2)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_cancel_stops_the_ray_work(world, client):
    client.submit_evaluation([(RUN, "2")], levels=2000, request_id="ev-cancel")
    wait_for_levels(client, "ev-cancel", 4)
    job = world["server"].server.jobs.jobs["ev-cancel"]
    procs = [job.pid, *descendants(job.pid)]  # loupe evaluate, its Ray and the evaluator
    assert len(procs) >= 3
    cancelled = client.cancel_evaluation("ev-cancel")
    assert cancelled["state"] in ("running", "cancelled")
    final = list(client.watch_evaluation("ev-cancel", timeout=120))[-1]
    assert final["state"] == "cancelled"
    records = next(Path(final["out_dir"]).glob("*.jsonl"))
    levels = len(read_records(records))
    assert 4 <= levels < 2000
    deadline = time.monotonic() + 60
    while any(alive(p) for p in procs):
        assert time.monotonic() < deadline, "Ray processes of the evaluation outlived Cancel"
        time.sleep(0.2)
    assert len(read_records(records)) == levels  # nothing more is written


def restart_server(world) -> None:
    world["server"].stop()
    world["server"] = ServerThread(world["config"]).start()


#: levels of the evaluation stopped by a server restart (4 per chunk: a few chunks are left)
RESTART_LEVELS = 12


def test_restarted_server_is_reached_with_wait_for_ready_and_resumes(world, tmp_path):
    """One evaluation on Ray (``loupe evaluate`` run by the server) proves, in order:

    - a running evaluation stops with the server and stays resumable: after the restart, reached
      by a client with wait_for_ready, it is failed with how to resume;
    - resubmitted, it runs on Ray like `loupe evaluate`: the watch goes queued -> running ->
      succeeded with levels done never falling, only the missing levels are played, the counts
      agree with the results, and every level's record equals an uninterrupted in-process
      `loupe evaluate` of the same levels;
    - the same id and request is the same evaluation (its results); another request is refused;
    - an evaluation finished before a restart is still known, with its results.
    """
    # the reference: the same levels in this process, played while the server's Ray runs
    ckpt = world["run"] / "checkpoints" / "ckpt-000000000001.json"
    ref = tmp_path / "ref"
    config = EvalConfig(checkpoints=[str(ckpt)], out=str(ref), levels=RESTART_LEVELS,
                        start_level=3, workers=0, slots=4, chunk=4)  # fmt: skip
    pool = ThreadPoolExecutor(1)
    reference = pool.submit(evaluate, config, progress=False)
    port = world["config"].port
    c = Client(f"127.0.0.1:{port}", token=TOKEN, timeout=60, wait_for_ready=True)
    request = dict(levels=RESTART_LEVELS, start_level=3, request_id="ev-1")
    submitted = c.submit_evaluation([(RUN, "1")], **request)
    assert submitted["state"] == "queued" and submitted["levels_total"] == RESTART_LEVELS
    wait_for_levels(c, "ev-1", 4)
    world["server"].stop()  # the evaluation stops with the server, resumable
    out = world["root"] / "state" / "evaluations" / "ev-1" / "out"
    done_before = len(read_records(next(out.glob("*.jsonl"))))
    assert done_before < RESTART_LEVELS

    def restart():
        time.sleep(1.0)
        world["server"] = ServerThread(world["config"]).start()

    thread = threading.Thread(target=restart)
    thread.start()
    status = c.get_evaluation("ev-1")  # waits for the new server
    thread.join()
    assert status["state"] == "failed" and "submit the same request id" in status["error"]
    assert c.submit_evaluation([(RUN, "1")], **request)["state"] in ("queued", "running")
    states = []
    for status in c.watch_evaluation("ev-1", timeout=300):
        states.append((status["state"], status["levels_done"]))
    final = status
    assert final["state"] == "succeeded", final["error"]
    names = [s for s, _ in states]
    assert names[-1] == "succeeded" and "running" in names
    assert names.index("running") < names.index("succeeded")
    done = [n for s, n in states if s == "running"]
    assert done == sorted(done) and done[0] >= done_before
    (label,) = final["checkpoints"]
    assert final["checkpoints"][label]["levels_done"] == RESTART_LEVELS
    counts = final["checkpoints"][label]["counts"]
    by_category = final["results"]["checkpoints"][label]["by_category"]
    assert counts == {k: v["count"] for k, v in by_category.items() if v["count"]}
    (stats,) = final["results"]["checkpoints"].values()
    assert stats["levels"] == RESTART_LEVELS
    assert stats["levels_this_run"] == RESTART_LEVELS - done_before
    # the same records as `loupe evaluate`, in-process and uninterrupted
    reference.result(timeout=600)
    out = Path(final["out_dir"])
    assert per_level(out / f"{label}.jsonl") == per_level(ref / f"{label}.jsonl")
    assert sorted(per_level(out / f"{label}.jsonl")) == list(range(3, 3 + RESTART_LEVELS))
    # idempotent: the same id and request is the same evaluation; another request is refused
    again = c.submit_evaluation([(RUN, "1")], **request)
    assert again["state"] == "succeeded" and again["results"] == final["results"]
    code, message = code_and_message(
        lambda: c.submit_evaluation([(RUN, "1")], levels=9, request_id="ev-1")
    )
    assert code == grpc.StatusCode.ALREADY_EXISTS and "choose a new id" in message
    # an evaluation finished before a restart is still known
    restart_server(world)
    known = c.get_evaluation("ev-1")
    assert known["state"] == "succeeded" and known["results"] == final["results"]
    c.close()
    pool.shutdown()


# -- the command -----------------------------------------------------------------------------------
def test_loupe_serve_command(world, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    # the refused command runs meanwhile (two commands, each its own process)
    refused = subprocess.Popen(
        [sys.executable, "-m", "loupe.cli", "serve", "--run", str(world["run"]),
         "--bind", "0.0.0.0:0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "loupe.cli", "serve", "--run", str(world["run"]),
         "--bind", "127.0.0.1:0", "--state-dir", str(tmp_path / "state")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert line.startswith("loupe serve: listening on 127.0.0.1:"), proc.stderr.read()
        port = int(line.split("127.0.0.1:")[1].split()[0])
        with Client(f"127.0.0.1:{port}", timeout=30) as c:
            assert c.health() == "SERVING"
            assert [r["run_id"] for r in c.runs()] == [RUN]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        _, refused_err = refused.communicate(timeout=60)
    assert refused.returncode == 2
    assert refused_err.strip().splitlines() == [
        "loupe: error: refusing to serve on 0.0.0.0:0 without TLS and a token; pass --tls-cert, "
        "--tls-key and --token-file, or bind 127.0.0.1"
    ]


def _self_signed(directory: Path) -> tuple[Path, Path]:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "loupe-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_tls_with_a_token(world, tmp_path):
    cert, key = _self_signed(tmp_path)
    token = tmp_path / "token"
    token.write_text(TOKEN)
    config = ServeConfig(
        runs=[str(world["run"])],
        bind=f"127.0.0.1:{free_port()}",
        token_file=str(token),
        tls_cert=str(cert),
        tls_key=str(key),
        state_dir=str(tmp_path / "state"),
    )
    with ServerThread(config) as server:
        target = f"127.0.0.1:{server.port}"
        with Client(target, token=TOKEN, tls_ca=str(cert), timeout=30) as c:
            assert [r["run_id"] for r in c.runs()] == [RUN]
            assert c.act(RUN, "1", obs_batch(1))["actions"].shape == (1,)
        with Client(target, tls_ca=str(cert), timeout=30) as c:
            code, _ = code_and_message(c.runs)
            assert code == grpc.StatusCode.UNAUTHENTICATED
        with Client(target, token=TOKEN, timeout=5) as plain:  # no TLS: refused
            code, _ = code_and_message(plain.runs)
            assert code == grpc.StatusCode.UNAVAILABLE
