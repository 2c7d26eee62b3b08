"""`loupe train --learners N`: N data-parallel PPO learners as Ray actors over torch.distributed.

Each ``LearnerRank`` is one process (a Ray actor: one GPU and NCCL each on a CUDA box, one CPU and
gloo on loopback otherwise) holding a ``learner.parallel.DataParallelPPOLearner``. The driver's
``DataParallelLearner`` has the interface of ``learner.PPOLearner`` that the Trainer uses: it puts
each rollout into Ray's object store once (on one node every learner reads its share from shared
memory), runs ``update`` on all ranks, and copies rank 0's weights into the driver's policy (which
the samplers publish and central inference acts with). Rank 0 owns the training state saved in
checkpoints; a resumed run loads it into every rank. A learner that dies stops the run with one
line naming it and the resume command (the others would wait in their all-reduce for ever).
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
from typing import Any

import numpy as np
import torch

from loupe.errors import LoupeError

log = logging.getLogger("loupe.distributed.learners")

#: how long a collective waits for a missing learner before failing (the driver notices a dead
#: learner at once; this bounds a hung one)
COLLECTIVE_TIMEOUT_S = 600


def loopback_interface() -> str | None:
    """Name of the loopback network interface ("lo" on Linux, "lo0" on macOS), if any."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return None
    for name in names:
        if name.startswith("lo"):
            return name
    return None


class TorchCollective:
    """``learner.parallel.Collective`` over the default torch.distributed process group."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return tensor


class LearnerRank:
    """One learner process; the driver makes it a Ray actor (``ray.remote``)."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        port: int,
        backend: str,
        policy: str,
        obs_shape: tuple[int, ...],
        n_actions: int,
        policy_options: dict[str, Any],
        ppo: Any,
        threads: int = 1,
    ):
        import torch.distributed as dist

        from attention import build_policy
        from learner.parallel import DataParallelPPOLearner

        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(port)
        lo = loopback_interface()
        if backend == "gloo" and lo:
            os.environ.setdefault("GLOO_SOCKET_IFNAME", lo)  # gloo binds to loopback only
        torch.set_num_threads(threads)
        device = "cuda" if backend == "nccl" else "cpu"  # Ray gives each rank its own GPU
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
        )
        torch.manual_seed(ppo.seed)
        self.policy = build_policy(policy, tuple(obs_shape), n_actions, **policy_options)
        self.learner = DataParallelPPOLearner(self.policy, ppo, TorchCollective(), device)
        self.rank = rank

    def pid(self) -> int:
        return os.getpid()

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        state = {k: torch.from_numpy(np.array(v)) for k, v in weights.items()}
        self.policy.load_state_dict(state)

    def weights(self) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().numpy() for k, v in self.policy.state_dict().items()}

    def update(self, rollout) -> tuple[dict[str, float], dict[str, int], dict | None]:
        """One PPO update on this rank's share -> (stats, counters, weights from rank 0 only)."""
        stats = self.learner.update(rollout)
        counters = {"global_step": self.learner.global_step,
                    "update_index": self.learner.update_index}  # fmt: skip
        return stats, counters, self.weights() if self.rank == 0 else None

    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        state = self.learner.state_dict()
        return {k: v.numpy() for k, v in state.tensors.items()}, state.meta

    def load_state_dict(self, tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        from learner.ppo import TrainState

        t = {k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}
        self.learner.load_state_dict(TrainState(t, meta))

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def check_learners(learners: int, device: torch.device, actors: int = 0) -> None:
    """Refuse more learners than GPUs (CUDA) or CPUs (CPU), counting rollout actors' CPUs too."""
    if learners < 1:
        raise LoupeError(f"--learners must be at least 1, got {learners}")
    if device.type == "cuda":
        gpus = torch.cuda.device_count()
        if learners > gpus:
            raise LoupeError(
                f"--learners {learners} needs {learners} GPUs (one per NCCL learner) but torch "
                f"sees {gpus}; use --learners {gpus} or fewer"
            )
    cpus = available_cpus()
    if learners + actors > cpus:
        if actors:
            raise LoupeError(
                f"{learners} learners and {actors} rollout actors need {learners + actors} CPUs "
                f"(one each) but this machine has {cpus}; use fewer --learners or --actors"
            )
        raise LoupeError(
            f"{learners} learners need {learners} CPUs (one each) but this machine has {cpus}; "
            f"use --learners {cpus} or fewer"
        )


class DataParallelLearner:
    """Driver side of N learners, with PPOLearner's interface (update, state_dict, counters)."""

    def __init__(self, config, policy: torch.nn.Module, device: torch.device):
        import ray

        from learner.parallel import check_split
        from loupe.bus.redis_server import free_port
        from loupe.distributed import init_ray

        n = config.learners
        check_split(config.ppo, n)
        check_learners(n, device, config.actors)
        init_ray(config.ray_address)
        self.cfg = config.ppo
        self.run_dir = config.run_dir
        self.device = device
        self.policy = policy.to(device)
        self.global_step = 0
        self.update_index = 0
        #: the driver's policy holds weights the ranks have not got yet
        self._dirty = True
        self.broken: str | None = None
        backend = "nccl" if device.type == "cuda" else "gloo"
        port = free_port()
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # on this node: the ranks meet on its loopback, and its CPUs and GPUs were counted
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        remote = ray.remote(
            num_cpus=1,
            num_gpus=1 if backend == "nccl" else 0,
            max_restarts=0,
            max_task_retries=0,
            scheduling_strategy=here,
        )(LearnerRank)
        spec = policy.spec
        self.ranks = [
            remote.remote(
                r,
                n,
                port,
                backend,
                spec["name"],
                tuple(spec["obs_shape"]),
                int(spec["n_actions"]),
                spec.get("options", {}),
                config.ppo,
            )  # fmt: skip
            for r in range(n)
        ]
        try:
            self.pids = self._gather([a.pid.remote() for a in self.ranks], "at start-up")
        except LoupeError:
            self.close()
            raise
        log.info(
            "%d data-parallel learners (%s): pids %s", n, backend, ", ".join(map(str, self.pids))
        )

    # -- the PPOLearner interface ---------------------------------------------------------------
    def update(self, rollout) -> dict[str, float]:
        import ray

        self._check_usable()
        if self._dirty:
            weights = ray.put(
                {k: v.detach().cpu().numpy() for k, v in self.policy.state_dict().items()}
            )
            self._gather(
                [a.set_weights.remote(weights) for a in self.ranks], "while loading weights"
            )
            self._dirty = False
        ref = ray.put(rollout)
        results = self._gather(
            [a.update.remote(ref) for a in self.ranks], f"in update {self.update_index + 1}"
        )
        stats, counters, weights = results[0]
        with torch.no_grad():
            for name, value in self.policy.state_dict().items():
                value.copy_(torch.from_numpy(np.array(weights[name])))
        self.global_step = counters["global_step"]
        self.update_index = counters["update_index"]
        return stats

    def state_dict(self):
        """Rank 0's optimiser, generator, counters and reward normaliser; this process's RNGs."""
        from learner.ppo import TrainState

        self._check_usable()
        tensors, meta = self._gather([self.ranks[0].state_dict.remote()], "while saving its state")[
            0
        ]
        state = TrainState({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}, meta)
        state.tensors["rng.torch"] = torch.get_rng_state()
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state.tensors["rng.numpy_keys"] = torch.from_numpy(np.asarray(keys).astype(np.int64))
        state.meta["numpy_rng"] = [kind, int(pos), int(has_gauss), float(cached)]
        return state

    def load_state_dict(self, state) -> None:
        """Every rank loads ``state``; this process takes its RNGs and counters."""
        self._check_usable()
        tensors = {k: v.numpy() for k, v in state.tensors.items()}
        self._gather([a.load_state_dict.remote(tensors, state.meta) for a in self.ranks],
                     "while loading the saved state")  # fmt: skip
        torch.set_rng_state(state.tensors["rng.torch"])
        kind, pos, has_gauss, cached = state.meta["numpy_rng"]
        keys = state.tensors["rng.numpy_keys"].numpy().astype(np.uint32)
        np.random.set_state((kind, keys, pos, has_gauss, cached))
        self.global_step = int(state.meta["global_step"])
        self.update_index = int(state.meta["update_index"])
        self._dirty = True  # the driver's policy was loaded from the same checkpoint

    def rank_weights(self, rank: int) -> dict[str, np.ndarray]:
        return self._gather([self.ranks[rank].weights.remote()], "while reading its weights")[0]

    def close(self) -> None:
        import ray

        if ray.is_initialized():  # after ray.shutdown the actors are gone already
            for actor in getattr(self, "ranks", []):
                ray.kill(actor, no_restart=True)
        self.ranks = []

    # -- failures ---------------------------------------------------------------------------------
    def _check_usable(self) -> None:
        if self.broken:
            raise LoupeError(self.broken)

    def _gather(self, refs: list, what: str) -> list:
        """Results of one call on every rank; a dead rank stops everything at once."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        results: list[Any] = [None] * len(refs)
        pending = {ref: i for i, ref in enumerate(refs)}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                i = pending.pop(ref)
                try:
                    results[i] = ray.get(ref)
                except RayTaskError as exc:
                    self.close()
                    if isinstance(exc.cause, LoupeError):
                        self.broken = str(exc.cause)
                    else:
                        first = str(exc.cause).strip().splitlines()
                        self.broken = (
                            f"learner {i} failed {what} "
                            f"({type(exc.cause).__name__}: {first[0] if first else ''}); "
                            f"{self._resume_hint()}"
                        )
                    raise LoupeError(self.broken) from None
                except RayActorError:
                    self.close()
                    pid = self.pids[i] if hasattr(self, "pids") else "?"
                    self.broken = (
                        f"learner {i} (pid {pid}) died {what}; the run stops: {self._resume_hint()}"
                    )
                    raise LoupeError(self.broken) from None
        return results

    def _resume_hint(self) -> str:
        return f"the last checkpoint is kept, continue with `loupe train --resume {self.run_dir}`"
