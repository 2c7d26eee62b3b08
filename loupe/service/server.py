"""The grpc.aio server of `loupe serve`: Inspect, Evaluations, Policy, health and reflection.

    server = LoupeServer(ServeConfig(runs=["runs/coinrun"], bind="127.0.0.1:50051"))
    await server.start(); ...; await server.stop()

Heavy work (loading checkpoints, IG, policy forward passes, evaluations) runs in thread pools or on
Ray; the event loop only moves messages. LoupeErrors become status codes: NotFound -> NOT_FOUND,
TooLarge -> RESOURCE_EXHAUSTED, Conflict -> ALREADY_EXISTS, Unavailable -> UNAVAILABLE, any other
-> INVALID_ARGUMENT; the message says what to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hmac
import inspect
import ipaddress
import json
import logging
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from loupe.errors import LoupeError
from loupe.service.batcher import Batcher
from loupe.service.catalog import Catalog, NotFound, open_run
from loupe.service.jobs import Conflict, EvalDefaults, EvaluationJobs
from loupe.service.proto.loupe.v1 import (
    evaluations_pb2,
    evaluations_pb2_grpc,
    inspect_pb2,
    inspect_pb2_grpc,
    policy_pb2,
    policy_pb2_grpc,
)
from loupe.service.tensors import from_tensor, to_tensor

log = logging.getLogger("loupe.service")

LOOPBACK_NAMES = ("localhost",)
SERVICES = ("loupe.v1.Inspect", "loupe.v1.Evaluations", "loupe.v1.Policy")
HEALTH_PREFIX = "/grpc.health.v1.Health/"
STREAM_ID = re.compile(r"\d+(-\d+)?")


class TooLarge(LoupeError):
    """A request over one of the server's limits."""


class Unavailable(LoupeError):
    """A backend (the run's Redis) that does not answer."""


@dataclasses.dataclass
class ServeConfig:
    """One `loupe serve` process."""

    #: run directories to follow
    runs: list[str] = dataclasses.field(default_factory=list)
    #: HOST:PORT to listen on (port 0: a free one); beyond loopback needs TLS and a token
    bind: str = "127.0.0.1:50051"
    #: file holding the token clients send as ``authorization: Bearer <token>`` (None: no token,
    #: loopback only)
    token_file: str | None = None
    #: PEM certificate chain and private key for TLS
    tls_cert: str | None = None
    tls_key: str | None = None
    #: redis:// URL for every run (None: each run's own configured or private server)
    redis: str | None = None
    #: where evaluations are kept (None: <first run>/serve)
    state_dir: str | None = None
    #: largest message either way, in MiB (the gRPC default is 4)
    max_message_mb: int = 64
    #: Policy: most observations in one forward pass, and in one request
    max_batch: int = 64
    #: Policy: longest wait for a batch to fill after its first request, in ms
    max_wait_ms: float = 5.0
    #: Attribute: most observations per request
    max_attribute_obs: int = 256
    #: Attribute: most Riemann steps per request
    max_ig_steps: int = 256
    #: threads for IG and policy forward passes
    compute_threads: int = 2
    #: checkpoints kept loaded
    max_policies: int = 4
    #: torch device for Attribute and Policy
    device: str = "cpu"
    #: evaluations: Ray evaluators, slots, chunk, Ray address
    eval_workers: int = 1
    eval_slots: int = 16
    eval_chunk: int = 16
    ray_address: str | None = None
    #: seconds between Redis health checks
    health_interval_s: float = 1.0
    #: seconds an in-flight call may take to finish on shutdown
    grace_s: float = 2.0

    def __post_init__(self) -> None:
        self.host, self.port = parse_bind(self.bind)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise LoupeError("pass both --tls-cert and --tls-key, or neither")
        if not is_loopback(self.host) and not (self.tls_cert and self.token_file):
            raise LoupeError(
                f"refusing to serve on {self.bind} without TLS and a token; pass --tls-cert, "
                "--tls-key and --token-file, or bind 127.0.0.1"
            )
        for name in ("max_message_mb", "max_batch", "max_attribute_obs", "compute_threads"):
            if getattr(self, name) < 1:
                raise LoupeError(f"{name.replace('_', '-')} must be positive")
        if self.max_wait_ms < 0:
            raise LoupeError("--max-wait-ms must be >= 0")
        if self.state_dir is None:
            if not self.runs:
                raise LoupeError(
                    "pass --state-dir (where evaluations are kept) or at least one --run"
                )
            self.state_dir = str(Path(self.runs[0]) / "serve")

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * 1024 * 1024

    def token(self) -> str | None:
        if self.token_file is None:
            return None
        try:
            token = Path(self.token_file).read_text().strip()
        except OSError as exc:
            raise LoupeError(
                f"cannot read --token-file {self.token_file} ({exc.strerror})"
            ) from None
        if len(token) < 16:
            raise LoupeError(
                f"the token in {self.token_file} is {len(token)} characters; use at least 16 "
                "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
        return token


def parse_bind(bind: str) -> tuple[str, int]:
    host, sep, port = bind.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise LoupeError(f"--bind {bind!r} is not HOST:PORT (e.g. 127.0.0.1:50051)")
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- errors -> status codes ----------------------------------------------------------------------
def status_of(exc: LoupeError) -> grpc.StatusCode:
    for cls, code in (
        (NotFound, grpc.StatusCode.NOT_FOUND),
        (TooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (Conflict, grpc.StatusCode.ALREADY_EXISTS),
        (Unavailable, grpc.StatusCode.UNAVAILABLE),
    ):
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INVALID_ARGUMENT


def rpc(method):
    """Turn LoupeErrors of a servicer method (coroutine or async generator) into status codes."""
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self, request, context):
            try:
                async for item in method(self, request, context):
                    yield item
            except LoupeError as exc:
                await context.abort(status_of(exc), str(exc))

        return stream

    @functools.wraps(method)
    async def unary(self, request, context):
        try:
            return await method(self, request, context)
        except LoupeError as exc:
            await context.abort(status_of(exc), str(exc))

    return unary


# -- the token -------------------------------------------------------------------------------------
class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Every method but health needs ``authorization: Bearer <token>`` (constant-time compare)."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(HEALTH_PREFIX):
            return handler
        got = ""
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                got = value if isinstance(value, str) else value.decode("latin-1")
        if hmac.compare_digest(got.encode("utf-8", "replace"), self._expected):
            return handler
        why = "wrong token" if got else "no token"
        return _denied(handler, f"{why}: send the server's token as 'authorization: Bearer TOKEN'")


def _denied(handler, message: str):
    async def abort(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def abort_stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover (makes this an async generator)

    kinds = {
        (False, False): (grpc.unary_unary_rpc_method_handler, abort),
        (False, True): (grpc.unary_stream_rpc_method_handler, abort_stream),
        (True, False): (grpc.stream_unary_rpc_method_handler, abort),
        (True, True): (grpc.stream_stream_rpc_method_handler, abort_stream),
    }
    make, behaviour = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(
        behaviour,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


# -- shared helpers -----------------------------------------------------------------------------------
class Backend:
    """What the servicers share: the catalog, the thread pools, limits."""

    def __init__(self, config: ServeConfig, catalog: Catalog):
        self.config = config
        self.catalog = catalog
        self.io = ThreadPoolExecutor(4, thread_name_prefix="loupe-io")
        self.compute = ThreadPoolExecutor(
            config.compute_threads, thread_name_prefix="loupe-compute"
        )
        self.redis_ok: dict[str, bool] = {}

    async def blocking(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.io, fn, *args)

    async def computing(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.compute, fn, *args)

    async def policy(self, ref) -> tuple[Any, dict[str, Any]]:
        run, name = ref_of(ref)
        return await self.blocking(self.catalog.policy, run, name)

    def observations(self, policy, tensor, limit: int, what: str) -> np.ndarray:
        """The uploaded observations, checked against the policy and ``limit``."""
        obs = from_tensor(tensor, "observations")
        want = tuple(policy.obs_shape)
        if obs.ndim != 4 or tuple(obs.shape[1:]) != want:
            raise LoupeError(
                f"observations must be (N, {', '.join(map(str, want))}) for this policy, got "
                f"{list(obs.shape)}"
            )
        if obs.dtype != np.uint8 and obs.dtype.kind != "f":
            raise LoupeError(f"observations must be uint8 or float, got {obs.dtype.name}")
        if obs.shape[0] == 0:
            raise LoupeError("observations hold no observation (N = 0)")
        if obs.shape[0] > limit:
            raise TooLarge(
                f"{obs.shape[0]} observations is over this server's {what} limit of {limit}; "
                "split the request"
            )
        return obs

    def close(self) -> None:
        self.io.shutdown(wait=False, cancel_futures=True)
        self.compute.shutdown(wait=False, cancel_futures=True)


def ref_of(ref) -> tuple[str, str]:
    if not ref.run:
        raise LoupeError("checkpoint.run is empty; name a run from ListRuns")
    return ref.run, ref.checkpoint or "latest"


def redis_client(url: str | None, run_id: str):
    import redis.asyncio

    if not url:
        raise Unavailable(f"run {run_id} has no known Redis; start the server with --redis URL")
    return redis.asyncio.Redis.from_url(
        url, decode_responses=True, socket_connect_timeout=2.0, socket_timeout=5.0
    )


async def first_of(coro, event: asyncio.Event):
    """``coro``'s result, or None as soon as ``event`` is set (``coro`` is then cancelled)."""
    task = asyncio.ensure_future(coro)
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return task.result() if not task.cancelled() else None


# -- Inspect -------------------------------------------------------------------------------------------
def parse_targets(specs) -> Any:
    """Request target strings -> probes.attribution target specs."""
    out: list[Any] = []
    for spec in specs:
        if spec == "all":
            return "all"
        if spec.startswith("group:"):
            label, sep, actions = spec[6:].partition("=")
            if not sep or not label:
                raise LoupeError(f"target {spec!r}: a group is 'group:NAME=I,J,...'")
            out.append((label, [a.strip() for a in actions.split(",") if a.strip()]))
        else:
            out.append(spec)
    return out or "all"


def attribute(policy, obs: np.ndarray, layer: str, targets, n_steps: int):
    """IG of probes.attribution, as `loupe probe` runs it -> (names, attr (K,N,...), delta (K,N))."""
    import torch

    from probes.attribution import IntegratedGradients

    ig = IntegratedGradients(policy, layer, n_steps=n_steps)
    res = ig.attribute(torch.from_numpy(obs), targets=targets)
    return (
        res.targets,
        res.attributions.float().cpu().numpy(),
        res.delta.float().cpu().numpy(),
    )


class InspectService(inspect_pb2_grpc.InspectServicer):
    def __init__(self, backend: Backend):
        self.b = backend
        #: WatchCheckpoints loops now reading Redis
        self.active_watches = 0

    @rpc
    async def ListRuns(self, request, context):
        def gather():
            out = []
            for run in self.b.catalog.runs.values():
                n = len(self.b.catalog.checkpoints(run.run_id))
                out.append(
                    inspect_pb2.Run(
                        run_id=run.run_id,
                        path=str(run.path),
                        env=run.env,
                        policy=run.policy,
                        checkpoints=n,
                        redis_reachable=self.b.redis_ok.get(run.run_id, False),
                    )
                )
            return out

        return inspect_pb2.ListRunsReply(runs=await self.b.blocking(gather))

    @rpc
    async def ListCheckpoints(self, request, context):
        metas = await self.b.blocking(self.b.catalog.checkpoints, request.run)
        return inspect_pb2.ListCheckpointsReply(
            checkpoints=[
                inspect_pb2.Checkpoint(
                    name=m["name"],
                    step=int(m["step"]),
                    sha256=m["sha256"],
                    created=str(m.get("created", "")),
                    policy=str(m["policy"].get("name", "")),
                    env=str(m.get("env", "")),
                )
                for m in metas
            ]
        )

    @rpc
    async def WatchCheckpoints(self, request, context):
        import redis

        from loupe.bus import CheckpointAnnouncement

        run = self.b.catalog.run(request.run)
        after = request.after_id or "0"
        if after != "$" and not STREAM_ID.fullmatch(after):
            raise LoupeError(
                f"after_id {after!r} is not a stream id (like 1700000000000-0), '0' or '$'"
            )
        client = redis_client(run.redis_url, run.run_id)
        key = f"loupe:{run.run_id}:checkpoints"
        gone = asyncio.Event()  # the client cancelled or the deadline passed
        context.add_done_callback(lambda _: gone.set())
        self.active_watches += 1
        try:
            if after == "$":
                last = await client.xrevrange(key, count=1)
                after = last[0][0] if last else "0"
            while not gone.is_set():
                reply = await first_of(client.xread({key: after}, count=100, block=1000), gone)
                if gone.is_set():
                    return
                for _, entries in reply or ():
                    for entry_id, fields in entries:
                        after = entry_id
                        try:
                            ann = CheckpointAnnouncement.from_fields(fields)
                        except ValueError:
                            continue  # an entry no reader understands (see loupe:R:rejected)
                        yield inspect_pb2.CheckpointEvent(
                            entry_id=entry_id,
                            step=ann.step,
                            uri=ann.uri,
                            sha256=ann.sha256,
                            policy=ann.policy,
                            env=ann.env,
                            announced=ann.announced,
                            extras_json=json.dumps(ann.extras),
                        )
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
            raise Unavailable(
                f"the Redis of run {run.run_id} does not answer; retry with after_id set to the "
                "last entry_id you received once it is back"
            ) from None
        finally:
            self.active_watches -= 1
            await client.aclose()

    @rpc
    async def GetProbeSummary(self, request, context):
        run, name = ref_of(request.checkpoint)
        found = await self.b.blocking(self.b.catalog.probe_summary, run, name)
        return inspect_pb2.ProbeSummary(
            step=found["step"], sha256=found["sha256"], summary_json=json.dumps(found["summary"])
        )

    @rpc
    async def Attribute(self, request, context):
        cfg = self.b.config
        policy, _ = await self.b.policy(request.checkpoint)
        obs = self.b.observations(policy, request.observations, cfg.max_attribute_obs, "Attribute")
        n_steps = request.n_steps or 10
        if not 1 <= n_steps <= cfg.max_ig_steps:
            raise TooLarge(f"n_steps must be 1..{cfg.max_ig_steps}, got {n_steps}")
        layer = request.layer or policy.layer_names[-1]
        targets = parse_targets(list(request.targets))
        names, attr, delta = await self.b.computing(attribute, policy, obs, layer, targets, n_steps)
        return inspect_pb2.AttributeReply(
            targets=names, attributions=to_tensor(attr), delta=to_tensor(delta), layer=layer
        )


# -- Policy -----------------------------------------------------------------------------------------
def forward(policy, batch: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """One forward pass over the concatenated observations -> per request (logits, values)."""
    import torch

    parts = [
        torch.from_numpy(o).to(torch.float32) / 255.0
        if o.dtype == np.uint8
        else torch.from_numpy(o).to(torch.float32)
        for o in batch
    ]  # each (n_i, C, H, W), as Policy.prepare makes them
    with torch.no_grad():
        out = policy(torch.cat(parts))
    logits = out.logits.float().cpu().numpy()  # (sum n_i, A)
    values = out.value.float().cpu().numpy()  # (sum n_i,)
    result, start = [], 0
    for o in batch:
        stop = start + len(o)
        result.append((logits[start:stop], values[start:stop]))
        start = stop
    return result


def choose(logits: np.ndarray, greedy: bool, seed: int) -> np.ndarray:
    """Actions from logits (N, A): argmax, or a sample (Gumbel-max with numpy default_rng(seed))."""
    if greedy:
        return logits.argmax(1).astype(np.int64)
    gumbel = np.random.default_rng(seed).gumbel(size=logits.shape)
    return (logits.astype(np.float64) + gumbel).argmax(1).astype(np.int64)


class PolicyService(policy_pb2_grpc.PolicyServicer):
    def __init__(self, backend: Backend):
        self.b = backend
        self.batchers: dict[str, Batcher] = {}

    def batcher(self, policy, meta) -> Batcher:
        key = meta["sha256"]
        if key not in self.batchers:
            cfg = self.b.config
            self.batchers[key] = Batcher(
                functools.partial(forward, policy), cfg.max_batch, cfg.max_wait_ms, self.b.compute
            )
        return self.batchers[key]

    async def act(self, request) -> policy_pb2.ActReply:
        policy, meta = await self.b.policy(request.checkpoint)
        obs = self.b.observations(policy, request.observations, self.b.config.max_batch, "Act")
        (logits, values), rows = await self.batcher(policy, meta).submit(obs, len(obs))
        return policy_pb2.ActReply(
            actions=to_tensor(choose(logits, request.greedy, request.seed)),
            logits=to_tensor(logits),
            values=to_tensor(values),
            sequence=request.sequence,
            batch_size=rows,
        )

    @rpc
    async def Act(self, request, context):
        return await self.act(request)

    @rpc
    async def ActStream(self, request_iterator, context):
        async for request in request_iterator:
            yield await self.act(request)

    async def close(self) -> None:
        for b in self.batchers.values():
            await b.close()


# -- Evaluations -------------------------------------------------------------------------------------
STATES = {
    "queued": evaluations_pb2.Evaluation.QUEUED,
    "running": evaluations_pb2.Evaluation.RUNNING,
    "succeeded": evaluations_pb2.Evaluation.SUCCEEDED,
    "failed": evaluations_pb2.Evaluation.FAILED,
    "cancelled": evaluations_pb2.Evaluation.CANCELLED,
}


def evaluation_message(snap: dict[str, Any]) -> evaluations_pb2.Evaluation:
    msg = evaluations_pb2.Evaluation(
        request_id=snap["request_id"],
        state=STATES[snap["state"]],
        levels_total=snap["levels_total"],
        levels_done=snap["levels_done"],
        error=snap["error"],
        out_dir=snap["out_dir"],
        results_json=json.dumps(snap["results"]) if snap["results"] else "",
    )
    for label, prog in snap["checkpoints"].items():
        msg.checkpoints.add(label=label, levels_done=prog["levels_done"], counts=prog["counts"])
    return msg


class EvaluationsService(evaluations_pb2_grpc.EvaluationsServicer):
    def __init__(self, backend: Backend, jobs: EvaluationJobs):
        self.b = backend
        self.jobs = jobs

    @rpc
    async def Submit(self, request, context):
        refs = [ref_of(r) for r in request.checkpoints]
        snap = await self.b.blocking(
            functools.partial(
                self.jobs.submit,
                request.request_id,
                refs,
                levels=request.levels,
                start_level=request.start_level,
                causes=not request.no_causes,
                seed=request.seed,
                distribution_mode=request.distribution_mode or None,
            )
        )
        return evaluation_message(snap)

    @rpc
    async def Get(self, request, context):
        return evaluation_message(self.jobs.get(request.request_id).snapshot())

    @rpc
    async def Watch(self, request, context):
        job = self.jobs.get(request.request_id)
        gone = asyncio.Event()
        context.add_done_callback(lambda _: gone.set())
        seen = None
        while not gone.is_set():
            snap = job.snapshot()
            if snap["version"] != seen:
                seen = snap["version"]
                yield evaluation_message(snap)
                if snap["state"] in ("succeeded", "failed", "cancelled"):
                    return
            await first_of(asyncio.sleep(0.1), gone)

    @rpc
    async def Cancel(self, request, context):
        job = await self.b.blocking(self.jobs.cancel, request.request_id)
        return evaluation_message(job.snapshot())


# -- the server ----------------------------------------------------------------------------------------
class LoupeServer:
    """The services on one port; ``start`` and ``stop`` run inside an asyncio loop."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.token = config.token()
        runs = [open_run(r, config.redis) for r in config.runs]
        self.catalog = Catalog(runs, config.max_policies, config.device)
        self.backend = Backend(config, self.catalog)
        self.jobs = EvaluationJobs(
            self.catalog,
            config.state_dir,
            EvalDefaults(
                workers=config.eval_workers,
                slots=config.eval_slots,
                chunk=config.eval_chunk,
                ray_address=config.ray_address,
            ),
        )
        self.inspect = InspectService(self.backend)
        self.policy = PolicyService(self.backend)
        self.evaluations = EvaluationsService(self.backend, self.jobs)
        self.server: grpc.aio.Server | None = None
        self.port: int | None = None
        self._health_task: asyncio.Task | None = None

    async def start(self) -> int:
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
        from grpc_reflection.v1alpha import reflection

        cfg = self.config
        options = [
            ("grpc.max_receive_message_length", cfg.max_message_bytes),
            ("grpc.max_send_message_length", cfg.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        interceptors = [TokenInterceptor(self.token)] if self.token else []
        server = grpc.aio.server(interceptors=interceptors, options=options)
        inspect_pb2_grpc.add_InspectServicer_to_server(self.inspect, server)
        policy_pb2_grpc.add_PolicyServicer_to_server(self.policy, server)
        evaluations_pb2_grpc.add_EvaluationsServicer_to_server(self.evaluations, server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = (
            *SERVICES,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        )
        reflection.enable_server_reflection(names, server)
        address = f"[{cfg.host}]:{cfg.port}" if ":" in cfg.host else f"{cfg.host}:{cfg.port}"
        try:
            if cfg.tls_cert:
                creds = grpc.ssl_server_credentials(
                    [(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())]
                )
                self.port = server.add_secure_port(address, creds)
            else:
                self.port = server.add_insecure_port(address)
        except (RuntimeError, OSError) as exc:
            raise LoupeError(
                f"cannot listen on {cfg.bind} ({exc}); choose another --bind"
            ) from None
        self.server = server
        await self._check_health()
        await server.start()
        self._health_task = asyncio.get_running_loop().create_task(self._health_loop())
        return self.port

    async def _check_health(self) -> None:
        from grpc_health.v1 import health_pb2

        ok = True
        for run in self.catalog.runs.values():
            reachable = False
            if run.redis_url:
                client = redis_client(run.redis_url, run.run_id)
                try:
                    reachable = bool(await asyncio.wait_for(client.ping(), 2.0))
                except Exception:  # any failure to answer is "unreachable"
                    reachable = False
                finally:
                    await client.aclose()
            self.backend.redis_ok[run.run_id] = reachable
            ok = ok and reachable
        serving = health_pb2.HealthCheckResponse.SERVING
        status = serving if ok else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set("", status)
        await self.health.set("loupe.v1.Inspect", status)
        await self.health.set("loupe.v1.Evaluations", serving)
        await self.health.set("loupe.v1.Policy", serving)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_interval_s)
            try:
                await self._check_health()
            except Exception:  # never let the monitor die
                log.exception("health check failed")

    async def wait(self) -> None:
        await self.server.wait_for_termination()

    async def stop(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
        if self.server is not None:
            await self.health.enter_graceful_shutdown()
            await self.server.stop(self.config.grace_s)
        await self.policy.close()
        await asyncio.get_running_loop().run_in_executor(None, self.jobs.close)
        self.backend.close()


async def _drain(timeout: float = 5.0) -> None:
    """Cancel what is left on the loop (calls cut off by the shutdown) and let it finish."""
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=timeout)


class ServerThread:
    """A LoupeServer on its own event loop in a background thread (tests, benchmarks, notebooks)."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="loupe-serve", daemon=True
        )
        self.server: LoupeServer | None = None

    def call(self, coro, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> ServerThread:
        self.thread.start()

        async def make():
            self.server = LoupeServer(self.config)
            await self.server.start()

        try:
            self.call(make())
        except BaseException:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            raise
        return self

    @property
    def port(self) -> int:
        return self.server.port

    def stop(self) -> None:
        if self.server is not None:
            self.call(self.server.stop())
        self.call(_drain())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
