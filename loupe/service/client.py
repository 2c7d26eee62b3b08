"""A small client for `loupe serve` that hides the stubs and speaks numpy.

    from loupe.service.client import Client
    with Client("127.0.0.1:50051", token_file="~/.loupe-token") as c:
        c.runs()                                        # [{"run_id": ..., "checkpoints": 3, ...}]
        res = c.attribute("coinrun", "latest", obs, layer="2b", targets=["value"])
        res["attributions"].shape                       # (K, N, *layer_shape) float32
        c.act("coinrun", "latest", obs)["actions"]      # (N,) int64
        for event in c.watch_checkpoints("coinrun"):    # backlog, then live
            ...
        ev = c.submit_evaluation([("coinrun", "latest")], levels=100)
        for status in c.watch_evaluation(ev["request_id"]): ...

Errors come back as ``grpc.RpcError`` with the server's status code and message.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from loupe.service.proto.loupe.v1 import (
    evaluations_pb2,
    evaluations_pb2_grpc,
    inspect_pb2,
    inspect_pb2_grpc,
    policy_pb2,
    policy_pb2_grpc,
    tensor_pb2,
)
from loupe.service.tensors import from_tensor, to_tensor

STATE_NAMES = {v: k.lower() for k, v in evaluations_pb2.Evaluation.State.items()}


def channel_options(max_message_mb: int) -> list[tuple[str, int]]:
    n = max_message_mb * 1024 * 1024
    return [("grpc.max_receive_message_length", n), ("grpc.max_send_message_length", n)]


def ref(run: str, checkpoint: str = "latest") -> tensor_pb2.CheckpointRef:
    return tensor_pb2.CheckpointRef(run=run, checkpoint=str(checkpoint))


class Client:
    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        token: str | None = None,
        token_file: str | None = None,
        tls_ca: str | None = None,
        max_message_mb: int = 64,
        timeout: float | None = 60.0,
        wait_for_ready: bool = False,
    ):
        if token is None and token_file is not None:
            token = Path(token_file).expanduser().read_text().strip()
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        options = channel_options(max_message_mb)
        if tls_ca is not None:
            creds = grpc.ssl_channel_credentials(Path(tls_ca).read_bytes())
            self.channel = grpc.secure_channel(target, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.timeout = timeout
        self.wait_for_ready = wait_for_ready
        self.inspect = inspect_pb2_grpc.InspectStub(self.channel)
        self.evaluations = evaluations_pb2_grpc.EvaluationsStub(self.channel)
        self.policy = policy_pb2_grpc.PolicyStub(self.channel)

    def _kw(self, timeout: float | None = None, stream: bool = False) -> dict[str, Any]:
        return {
            "metadata": self.metadata,
            "timeout": None if stream and timeout is None else (timeout or self.timeout),
            "wait_for_ready": self.wait_for_ready,
        }

    # -- health ------------------------------------------------------------------------------
    def health(self, service: str = "", timeout: float = 5.0) -> str:
        """ "SERVING", "NOT_SERVING", ... of ``service`` ("" the whole server)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self.channel)
        reply = stub.Check(
            health_pb2.HealthCheckRequest(service=service),
            timeout=timeout,
            wait_for_ready=self.wait_for_ready,
        )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    # -- Inspect -----------------------------------------------------------------------------
    def runs(self) -> list[dict[str, Any]]:
        reply = self.inspect.ListRuns(inspect_pb2.ListRunsRequest(), **self._kw())
        return [_fields(r) for r in reply.runs]

    def checkpoints(self, run: str) -> list[dict[str, Any]]:
        reply = self.inspect.ListCheckpoints(
            inspect_pb2.ListCheckpointsRequest(run=run), **self._kw()
        )
        return [_fields(c) for c in reply.checkpoints]

    def watch_checkpoints(
        self, run: str, after_id: str = "0", timeout: float | None = None
    ) -> Iterator[dict[str, Any]]:
        """Announcements after ``after_id`` ("0": all still in the stream; "$": new ones only),
        then live ones; close the iterator (or break out of the loop) to stop."""
        call = self.inspect.WatchCheckpoints(
            inspect_pb2.WatchCheckpointsRequest(run=run, after_id=after_id),
            **self._kw(timeout, stream=True),
        )
        try:
            for event in call:
                out = _fields(event)
                out["extras"] = json.loads(out.pop("extras_json") or "{}")
                yield out
        finally:
            call.cancel()

    def probe_summary(self, run: str, checkpoint: str = "latest") -> dict[str, Any]:
        reply = self.inspect.GetProbeSummary(
            inspect_pb2.GetProbeSummaryRequest(checkpoint=ref(run, checkpoint)), **self._kw()
        )
        return {
            "step": reply.step,
            "sha256": reply.sha256,
            "summary": json.loads(reply.summary_json),
        }

    def attribute(
        self,
        run: str,
        checkpoint: str,
        observations: np.ndarray,
        layer: str = "",
        targets: Iterable[str] = (),
        n_steps: int = 10,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """IG of ``targets`` ("value", "logit:I", "group:NAME=I,J") -> targets, attributions
        (K, N, *layer_shape), delta (K, N)."""
        reply = self.inspect.Attribute(
            inspect_pb2.AttributeRequest(
                checkpoint=ref(run, checkpoint),
                layer=layer,
                observations=to_tensor(observations),
                targets=list(targets),
                n_steps=n_steps,
            ),
            **self._kw(timeout),
        )
        return {
            "targets": list(reply.targets),
            "layer": reply.layer,
            "attributions": from_tensor(reply.attributions),
            "delta": from_tensor(reply.delta),
        }

    # -- Policy ------------------------------------------------------------------------------
    def act(
        self,
        run: str,
        checkpoint: str,
        observations: np.ndarray,
        greedy: bool = False,
        seed: int = 0,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """-> actions (N,), logits (N, A), values (N,), batch_size."""
        reply = self.policy.Act(
            act_request(run, checkpoint, observations, greedy, seed), **self._kw(timeout)
        )
        return act_reply(reply)

    def act_stream(
        self,
        run: str,
        checkpoint: str,
        observations: Iterable[np.ndarray],
        greedy: bool = False,
        seed: int = 0,
    ) -> Iterator[dict[str, Any]]:
        """One reply per observation batch, in order, over one bidirectional stream."""
        requests = (
            act_request(run, checkpoint, obs, greedy, seed + i, sequence=i)
            for i, obs in enumerate(observations)
        )
        for reply in self.policy.ActStream(requests, **self._kw(stream=True)):
            yield act_reply(reply)

    # -- Evaluations -----------------------------------------------------------------------------
    def submit_evaluation(
        self,
        checkpoints: Iterable[tuple[str, str]],
        levels: int,
        start_level: int = 0,
        causes: bool = True,
        seed: int = 0,
        distribution_mode: str = "",
        request_id: str | None = None,
    ) -> dict[str, Any]:
        """Submit (idempotent on ``request_id``, a new UUID when not given) -> the evaluation."""
        reply = self.evaluations.Submit(
            evaluations_pb2.SubmitEvaluationRequest(
                request_id=request_id or uuid.uuid4().hex,
                checkpoints=[ref(r, c) for r, c in checkpoints],
                levels=levels,
                start_level=start_level,
                no_causes=not causes,
                seed=seed,
                distribution_mode=distribution_mode,
            ),
            **self._kw(),
        )
        return evaluation(reply)

    def get_evaluation(self, request_id: str) -> dict[str, Any]:
        return evaluation(
            self.evaluations.Get(evaluations_pb2.EvaluationRef(request_id=request_id), **self._kw())
        )

    def watch_evaluation(self, request_id: str, timeout: float | None = None) -> Iterator[dict]:
        call = self.evaluations.Watch(
            evaluations_pb2.EvaluationRef(request_id=request_id), **self._kw(timeout, stream=True)
        )
        try:
            for reply in call:
                yield evaluation(reply)
        finally:
            call.cancel()

    def cancel_evaluation(self, request_id: str) -> dict[str, Any]:
        return evaluation(
            self.evaluations.Cancel(
                evaluations_pb2.EvaluationRef(request_id=request_id), **self._kw()
            )
        )

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def act_request(run, checkpoint, observations, greedy=False, seed=0, sequence=0):
    return policy_pb2.ActRequest(
        checkpoint=ref(run, checkpoint),
        observations=to_tensor(observations),
        greedy=greedy,
        seed=seed,
        sequence=sequence,
    )


def act_reply(reply) -> dict[str, Any]:
    return {
        "actions": from_tensor(reply.actions),
        "logits": from_tensor(reply.logits),
        "values": from_tensor(reply.values),
        "sequence": reply.sequence,
        "batch_size": reply.batch_size,
    }


def evaluation(reply) -> dict[str, Any]:
    return {
        "request_id": reply.request_id,
        "state": STATE_NAMES[reply.state],
        "levels_total": reply.levels_total,
        "levels_done": reply.levels_done,
        "checkpoints": {
            c.label: {"levels_done": c.levels_done, "counts": dict(c.counts)}
            for c in reply.checkpoints
        },
        "results": json.loads(reply.results_json) if reply.results_json else None,
        "error": reply.error,
        "out_dir": reply.out_dir,
    }


def _fields(message) -> dict[str, Any]:
    return {f.name: getattr(message, f.name) for f in message.DESCRIPTOR.fields}
