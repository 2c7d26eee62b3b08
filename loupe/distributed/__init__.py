"""Ray adapters: rollout actors made remote, weights through the object store, bounded policy lag.

Two inference placements:
- ``actor``: each RolloutActor runs the policy on its own CPU and returns whole trajectory batches.
- ``central``: actors only step environments (``EnvStepper``); the learner's process batches the
  observations of all actors through the policy on its device, SEED-RL style.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from loupe import interrupt
from loupe.errors import LoupeError

log = logging.getLogger("loupe.distributed")

# Ray starts a default cluster (machine address, dashboard) on the first API call made without
# ray.init; loupe starts Ray only through init_ray (read when ray is first imported)
os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")

#: restarts Ray grants a dead rollout actor before training gives up
ACTOR_MAX_RESTARTS = 3
#: how long a lost batch waits for its restarting actor
ACTOR_RESTART_WAIT_S = 120
#: rotation of the logs of a local Ray (each file at most 64 MB plus one old one), unless the
#: environment sets these already
RAY_LOG_ROTATION = {"RAY_ROTATION_MAX_BYTES": 64 << 20, "RAY_ROTATION_BACKUP_COUNT": 1}
#: task records a local Ray's GCS keeps for its state API (Ray's default, 100,000 of ~0.5-1 KB,
#: grows its memory for hours of actor calls before the bound holds), unless the environment
#: sets it already
RAY_TASK_EVENTS = {"RAY_task_events_max_num_task_in_gcs": 2000}

#: the session directory (logs, sockets) of the local Ray this process started; shutdown_ray
#: removes it, so runs restarted for days leave no trail of them in Ray's temp directory
_started_session: Path | None = None


def init_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Connect to ``address`` or start a local Ray; bounded, with a one-line error."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Ray's own logs (raylet, GCS, workers) in /tmp/ray grow all run long; Ray rotates each file
    # at 512 MB and keeps 5 old ones (3 GB per file) unless told otherwise
    for name, value in RAY_LOG_ROTATION.items():
        os.environ.setdefault(name, str(value))
    if not address:  # a cluster's GCS was started with its own settings
        for name, value in RAY_TASK_EVENTS.items():
            os.environ.setdefault(name, str(value))
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": True,
        "configure_logging": False,
    }
    if address:
        if address != "auto":
            check_reachable(address)
        kwargs["address"] = address
    else:
        # a new local Ray for this process only, on loopback ("local": never attach to a cluster
        # some other process left behind)
        kwargs["address"] = "local"
        kwargs["_node_ip_address"] = "127.0.0.1"
        # Ray's default for a new local cluster is token authentication; it says so at each start
        _quiet_logger("ray._private.authentication.authentication_token_setup", "is enabled for")
        if num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LoupeError(
            f"cannot reach Ray at {address!r} ({first}); start one with `ray start --head` "
            "or leave out --ray-address for a local Ray"
        ) from None
    if not address:
        global _started_session
        node = getattr(getattr(ray, "_private", None), "worker", None)
        node = getattr(node, "_global_node", None)
        try:
            _started_session = Path(node.get_session_dir_path()) if node is not None else None
        except (AttributeError, TypeError):  # a Ray without this private API: nothing removed
            _started_session = None
    interrupt.rearm()  # SIGTERM again takes loupe's path (checkpoint, cleanup), not Ray's abort


def shutdown_ray(keep_logs: bool = False) -> None:
    """Shut down the Ray this process started or joined; a local one leaves no session directory.

    ``keep_logs``: leave the local Ray's session directory (its logs) in place, as after a
    defect, when they may say what went wrong.
    """
    global _started_session
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    session, _started_session = _started_session, None
    if session is not None and not keep_logs:
        from loupe.supervise import remove_ray_sessions

        remove_ray_sessions(os.getpid(), session.parent)  # Ray names it after this process


def _quiet_logger(name: str, text: str) -> None:
    """Drop the records of logger ``name`` whose message contains ``text`` (a routine notice)."""
    logger = logging.getLogger(name)
    if not any(getattr(f, "loupe_text", None) == text for f in logger.filters):
        notice_filter = logging.Filter()
        notice_filter.filter = lambda record: text not in record.getMessage()  # type: ignore[method-assign]
        notice_filter.loupe_text = text  # type: ignore[attr-defined]
        logger.addFilter(notice_filter)


def check_reachable(address: str, timeout: float = 3.0) -> None:
    """Fail fast on an address nothing listens on (ray.init would retry for minutes)."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            return
    except ValueError:
        raise LoupeError(f"--ray-address {address!r} is not HOST:PORT") from None
    except OSError as exc:
        raise LoupeError(
            f"cannot reach Ray at {address} ({exc.strerror or exc}); start it with "
            "`ray start --head` or leave out --ray-address for a local Ray"
        ) from None


def check_cpus(needed: float) -> None:
    import ray

    available = ray.cluster_resources().get("CPU", 0.0)
    if needed > available:
        raise LoupeError(
            f"{needed:g} CPUs needed for the rollout actors but the Ray cluster has {available:g}; "
            "use fewer --actors or add nodes"
        )


def concat_rollouts(parts: list, envs_per_part: list[int], obs: np.ndarray | None = None):
    """Join per-actor rollouts along the env axis; episode env indices are offset to global ones.

    ``obs``: the (T, N, C, H, W) shared buffer the actors wrote their frames into (parts with
    ``obs`` None); frames a part brought itself are copied into it. None: parts are concatenated.
    """
    from learner.rollout import Rollout

    if len(parts) == 1 and obs is None:
        return parts[0]
    offsets = np.cumsum([0, *envs_per_part[:-1]])
    if obs is not None:
        for part, off, n in zip(parts, offsets, envs_per_part):
            if part.obs is not None:
                obs[:, off : off + n] = part.obs
    else:
        obs = np.concatenate([p.obs for p in parts], axis=1)
    episodes = []
    for part, off in zip(parts, offsets):
        for ep in part.episodes:
            episodes.append(dataclasses.replace(ep, env_index=int(ep.env_index + off)))
    return Rollout(
        obs=obs,
        actions=np.concatenate([p.actions for p in parts], axis=1),
        logprobs=np.concatenate([p.logprobs for p in parts], axis=1),
        values=np.concatenate([p.values for p in parts], axis=1),
        rewards=np.concatenate([p.rewards for p in parts], axis=1),
        dones=np.concatenate([p.dones for p in parts], axis=1),
        last_obs=np.concatenate([p.last_obs for p in parts], axis=0),
        last_value=np.concatenate([p.last_value for p in parts], axis=0),
        level_seeds=np.concatenate([p.level_seeds for p in parts], axis=1),
        policy_version=min(p.policy_version for p in parts),
        episodes=episodes,
    )


def actor_env_config(env, index: int, envs_per_actor: int):
    """The env config of actor ``index``: its share of the envs and its own seed."""
    return dataclasses.replace(env, num_envs=envs_per_actor, seed=env.seed + 1000 * index)


def forget_frames(exc: BaseException) -> None:
    """Drop the traceback of a Ray error caught from ``ray.get``: Ray keeps the error of a
    failed ref and raises that same object at every get, so its traceback holds the catching
    frames (and the ref, and whatever batch they hold) in a cycle through Ray that gc cannot
    see: without this, every actor death would keep one batch for good."""
    exc.__traceback__ = None


def not_back(what: str) -> LoupeError:
    """The error for a Ray actor that did not restart within ACTOR_RESTART_WAIT_S."""
    return LoupeError(
        f"{what} did not come back within {ACTOR_RESTART_WAIT_S} s; the last checkpoint is "
        "kept: `loupe train --resume` continues"
    )


class _ActorPool:
    """Ray actors of one sampler; ``close`` ends them for good (no restart)."""

    actors: list

    def close(self) -> None:
        import ray

        # after ray.shutdown the actors are gone already, and ray.kill would start a new Ray
        if ray.is_initialized():
            for actor in self.actors:
                ray.kill(actor, no_restart=True)
        self.actors = []


class RaySampler(_ActorPool):
    """Rollout actors on Ray with ``actor`` inference; keeps them at most ``max_policy_lag`` behind.

    With ``shared_obs`` (and /dev/shm here), actors on this machine write their frames straight
    into a shared-memory buffer (``learner.rollout.SharedObs``) that the learner reads in place;
    only the small per-step arrays travel through Ray's object store. Actors on other nodes
    send their frames as before, and they are copied into the buffer.
    """

    def __init__(self, config, shared_obs: bool = True):
        import ray

        from actors.rollout import RolloutActor, RolloutConfig
        from loupe.train import actor_channels_last

        if config.inference == "central":
            raise LoupeError("use CentralSampler for --inference central")
        init_ray(config.ray_address)
        check_cpus(config.actors)
        self.config = config
        self.num_steps = config.ppo.num_steps
        self.lag = config.max_policy_lag
        self.envs = [config.envs_per_actor] * config.actors
        remote_cls = ray.remote(num_cpus=1, max_restarts=ACTOR_MAX_RESTARTS, max_task_retries=0)(
            RolloutActor
        )
        self.actors = [
            remote_cls.remote(
                RolloutConfig(
                    env=actor_env_config(config.env, i, config.envs_per_actor),
                    policy=config.policy,
                    policy_options=config.policy_options,
                    seed=config.ppo.seed + 1000 * i,
                    torch_threads=1,
                    channels_last=actor_channels_last(config),
                    malloc_tuning=config.ppo.malloc_tuning,
                )
            )
            for i in range(config.actors)
        ]
        self.obs_shape, self.n_actions = ray.get(self.actors[0].spaces.remote())
        self.weights_ref = None
        self.version = -1
        self.pending: list | None = None
        self.actor_failures = 0
        from learner.rollout import SharedObs

        self.shared = None
        if shared_obs and SharedObs.available():
            self.shared = SharedObs((self.num_steps, sum(self.envs), *self.obs_shape))
        self.offsets = [int(o) for o in np.cumsum([0, *self.envs[:-1]])]
        #: shared buffer of the batch being sampled (None: the object store)
        self.pending_buffer: int | None = None

    def start(self, weights: dict[str, np.ndarray], version: int) -> None:
        self.publish(weights, version)
        if self.pending is None:
            self._launch()

    def publish(self, weights: dict[str, np.ndarray], version: int) -> None:
        import ray

        self.weights_ref = ray.put(weights)  # one copy per version in the object store
        self.version = version
        if self.lag == 0 and self.pending is None and version > 0:
            self._launch()

    def _launch(self) -> None:
        self.pending_buffer = self.shared.acquire() if self.shared is not None else None
        self.pending = [self._launch_one(i) for i in range(len(self.actors))]

    def _launch_one(self, i: int):
        actor = self.actors[i]
        actor.set_weights.remote(self.version, self.weights_ref)
        b = self.pending_buffer
        if b is None:
            return actor.rollout.remote(self.num_steps)
        shared = self.shared
        return actor.rollout_shared.remote(
            self.num_steps, shared.paths[b], shared.shape, self.offsets[i]
        )

    def collect(self):
        import ray

        assert self.pending is not None
        t0 = time.perf_counter()
        ray.wait(self.pending, num_returns=len(self.pending), fetch_local=False)
        t1 = time.perf_counter()
        parts = []
        for i, ref in enumerate(self.pending):
            parts.append(self._get_batch(i, ref))
        b, self.pending, self.pending_buffer = self.pending_buffer, None, None
        obs = self.shared.arrays[b] if b is not None else None
        rollout = concat_rollouts(parts, self.envs, obs=obs)
        if b is not None:
            self.shared.release(b)  # the rollout holds it now
        copied = sum(p.obs is not None for p in parts)
        t2 = time.perf_counter()
        del parts, obs
        if self.lag >= 1:
            self._launch()  # overlap: the next batch samples while the learner updates
        return rollout, {
            "wait_s": time.perf_counter() - t0,
            # from every batch ready to the joined rollout: the transfer on the learner's side
            "transfer_s": t2 - t1,
            "shared_obs": float(b is not None),
            # actors whose frames came through the object store (another node, or no buffer)
            "obs_copied_actors": float(copied),
            "actor_failures": float(self.actor_failures),
        }

    def close(self) -> None:
        super().close()
        if self.shared is not None:
            self.shared.close()

    def _get_batch(self, i: int, ref):
        """The batch of actor ``i``; a lost batch is sampled again once Ray has restarted the actor."""
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError

        deaths = 0
        deadline = time.monotonic() + ACTOR_RESTART_WAIT_S
        while True:
            try:
                return ray.get(ref)
            except ActorUnavailableError as exc:
                forget_frames(exc)  # or collect's batch, a whole shared buffer, stays held
                # restarting (its constructor builds the envs again): wait, bounded, and resubmit
                if time.monotonic() > deadline:
                    raise not_back(f"rollout actor {i}") from None
                time.sleep(0.5)
            except RayActorError as exc:
                forget_frames(exc)
                deaths += 1
                if deaths > ACTOR_MAX_RESTARTS:
                    raise LoupeError(
                        f"rollout actor {i} died {deaths} times; the last checkpoint is kept: "
                        "check the actor logs, then `loupe train --resume`"
                    ) from None
                log.warning("rollout actor %d lost its batch (%s); sampling it again",
                            i, type(exc).__name__)  # fmt: skip
            self.actor_failures += 1
            ref = self._launch_one(i)


class CentralSampler(_ActorPool):
    """Actors step environments; this process runs the policy on all their frames in one batch.

    The behaviour policy is the learner's own network, so the policy lag is always 0.
    """

    def __init__(self, config):
        import ray

        from actors.rollout import EnvStepper

        init_ray(config.ray_address)
        check_cpus(config.actors)
        self.config = config
        self.num_steps = config.ppo.num_steps
        self.envs = [config.envs_per_actor] * config.actors
        remote_cls = ray.remote(num_cpus=1, max_restarts=ACTOR_MAX_RESTARTS, max_task_retries=0)(
            EnvStepper
        )
        self.actors = [
            remote_cls.remote(actor_env_config(config.env, i, config.envs_per_actor))
            for i in range(config.actors)
        ]
        self.actor_failures = 0
        self.obs_shape, self.n_actions = ray.get(self.actors[0].spaces.remote())
        self.policy = None
        self.device = None
        self.version = 0
        self.current = None

    def attach(self, policy, device) -> None:
        """Use ``policy`` (on ``device``) for acting; called once the learner has built it."""
        import torch

        self.policy, self.device = policy, device
        self.generator = torch.Generator(device="cpu").manual_seed(self.config.ppo.seed)

    def start(self, weights, version: int) -> None:
        import ray

        self.version = version
        parts = ray.get([a.current.remote() for a in self.actors])
        self.current = (
            np.concatenate([p[0] for p in parts]),
            np.concatenate([p[1] for p in parts]),
        )

    def publish(self, weights, version: int) -> None:
        self.version = version

    def _act(self, obs: np.ndarray):
        from actors.rollout import sample_actions

        return sample_actions(self.policy, obs, self.generator, self.device)

    def collect(self):
        from actors.rollout import policy_values
        from learner.rollout import RolloutBuilder

        if self.policy is None:
            raise RuntimeError("CentralSampler.attach must be called before collect")
        batch = RolloutBuilder(self.num_steps, sum(self.envs), self.obs_shape)
        bounds = np.cumsum([0, *self.envs])
        infer_s = wait_s = 0.0
        obs, seeds = self.current
        was_training = self.policy.training
        self.policy.eval()
        for t in range(self.num_steps):
            t0 = time.perf_counter()
            batch.observe(t, obs, seeds)
            actions, logp, values = self._act(obs)
            t1 = time.perf_counter()
            refs = [
                a.step.remote(actions[bounds[i] : bounds[i + 1]]) for i, a in enumerate(self.actors)
            ]
            parts = [self._get_step(i, ref) for i, ref in enumerate(refs)]
            t2 = time.perf_counter()
            infer_s += t1 - t0
            wait_s += t2 - t1
            episodes = [
                dataclasses.replace(ep, env_index=int(ep.env_index + bounds[i]))
                for i, p in enumerate(parts)
                for ep in p[3]
            ]
            rewards = np.concatenate([p[1] for p in parts])
            dones = np.concatenate([p[2] for p in parts])
            batch.record(t, actions, logp, values, rewards, dones, episodes)
            obs = np.concatenate([p[0] for p in parts])
            seeds = np.concatenate([p[4] for p in parts])
        self.current = (obs, seeds)
        # no draw: the sampling stream stays the one a rollout actor with this seed would have
        last_value = policy_values(self.policy, obs, self.device)
        self.policy.train(was_training)
        rollout = batch.build(obs, last_value, self.version)
        return rollout, {
            "inference_s": infer_s,
            "wait_s": wait_s,
            "actor_failures": float(self.actor_failures),
        }

    def _get_step(self, i: int, ref):
        """One env step of stepper ``i``. If the stepper died, Ray restarts it (fresh episodes):
        its envs' episodes are cut at this step (done, reward 0) and the rollout goes on."""
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError

        try:
            return ray.get(ref)
        except (ActorUnavailableError, RayActorError) as exc:
            forget_frames(exc)  # or the batch being built stays held
            self.actor_failures += 1
            if self.actor_failures > ACTOR_MAX_RESTARTS * len(self.actors):
                raise LoupeError(
                    f"env stepper {i} keeps dying ({self.actor_failures} losses); the last "
                    "checkpoint is kept: check the actor logs, then `loupe train --resume`"
                ) from None
            log.warning("env stepper %d lost (%s); its episodes are cut and restarted",
                        i, type(exc).__name__)  # fmt: skip
        deadline = time.monotonic() + ACTOR_RESTART_WAIT_S
        while True:
            try:
                obs, seeds = ray.get(self.actors[i].current.remote())
                break
            except (ActorUnavailableError, RayActorError) as exc:
                forget_frames(exc)
                if time.monotonic() > deadline:
                    raise not_back(f"env stepper {i}") from None
                time.sleep(0.5)
        n = len(obs)
        return obs, np.zeros(n, np.float32), np.ones(n, bool), [], seeds
