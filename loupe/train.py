"""`loupe train`: wiring of rollout actors, the PPO learner, checkpoints, TensorBoard and the bus.

The algorithms live in ``actors/``, ``attention/`` and ``learner/``; this module only connects them.
Sampling runs either in-process (``actors=0``) or in Ray actors (``loupe.distributed``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import torch

from actors import EnvConfig
from learner import PPOConfig
from loupe.config import from_dict, load_json, save_json, to_dict
from loupe.errors import LoupeError
from loupe.heap import memory_mb
from loupe.rundir import RunDir, run_id_for

log = logging.getLogger("loupe.train")

#: per-update figures kept in ``Trainer.history`` (everything else goes to TensorBoard only)
HISTORY_KEYS = ("mean_return_100", "policy_lag", "steps_per_s", "sample_s", "update_s")
#: updates kept in ``Trainer.history``: the newest ones, so a billion-step run's memory stays flat
HISTORY_LEN = 20_000
#: restarts of the run's private redis-server in a row without an announcement getting through
REVIVE_IN_A_ROW = 3


@dataclasses.dataclass
class TrainConfig:
    """Everything one training run needs; saved as ``<run_dir>/config.json``."""

    #: environments (env id, options); ``env.num_envs`` is the total over all actors
    env: EnvConfig
    #: PPO hyper-parameters (see learner.PPOConfig); ``ppo.num_envs`` equals ``env.num_envs``
    ppo: PPOConfig
    #: run directory (checkpoints, TensorBoard, config)
    run_dir: str
    #: policy registry name
    policy: str = "impala"
    #: policy constructor options
    policy_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: preset the PPO settings came from, for the record
    preset: str | None = None
    #: write a checkpoint every this many updates (and always at the end)
    checkpoint_every: int = 10
    #: checkpoints kept: the last ``keep_last`` plus every ``keep_every``-th (0: none extra); only
    #: the last ``keep_last`` keep their training state (0: keep every checkpoint)
    keep_last: int = 5
    keep_every: int = 0
    #: TensorBoard points per tag over the run at most: scalars are written every
    #: ceil(updates / tb_max_points) updates, episodes averaged over them (0: every update)
    tb_max_points: int = 100_000
    #: "auto" (cuda if available), "cpu" or "cuda"
    device: str = "auto"
    #: number of Ray rollout actors; 0 samples in-process
    actors: int = 0
    #: where the policy runs while sampling: "actor" (CPU, in each rollout actor) or "central"
    inference: str = "actor"
    #: maximum versions between behaviour and learner weights (0: synchronous)
    max_policy_lag: int = 1
    #: data-parallel learner processes (Ray actors over torch.distributed: NCCL, one GPU each, on
    #: CUDA; gloo, one CPU each, otherwise); each trains on an equal share of every minibatch
    learners: int = 1
    #: Ray address ("auto" or host:port); None starts a local Ray
    ray_address: str | None = None
    #: Redis URL for checkpoint announcements; None starts a private server in the run dir
    redis: str | None = None
    #: announce checkpoints on the Redis bus
    announce: bool = True
    #: run id (derived from the run directory name when empty)
    run_id: str = ""

    def __post_init__(self):
        if not self.run_id:
            self.run_id = run_id_for(self.run_dir)
        if self.env.num_envs != self.ppo.num_envs:
            raise LoupeError(
                f"env.num_envs={self.env.num_envs} differs from ppo.num_envs={self.ppo.num_envs}"
            )
        if self.checkpoint_every <= 0:
            raise LoupeError("--checkpoint-every must be a positive number of updates")
        if self.keep_last < 0 or self.keep_every < 0 or self.tb_max_points < 0:
            raise LoupeError("keep_last, keep_every and tb_max_points must be >= 0")
        if self.actors < 0:
            raise LoupeError("--actors must be >= 0 (0 samples in-process)")
        if self.actors and self.env.num_envs % self.actors:
            raise LoupeError(
                f"{self.env.num_envs} envs cannot be split evenly over {self.actors} actors"
            )
        if self.inference not in ("actor", "central"):
            raise LoupeError(f"--inference must be 'actor' or 'central', not {self.inference!r}")
        if self.max_policy_lag < 0:
            raise LoupeError("--max-policy-lag must be >= 0")
        if self.learners != 1:
            from learner.parallel import check_split

            check_split(self.ppo, self.learners)

    @property
    def envs_per_actor(self) -> int:
        return self.env.num_envs // max(self.actors, 1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; ``env`` holds the options of its own family only (``EnvConfig.to_dict``)."""
        return to_dict(self) | {"env": self.env.to_dict()}

    def save(self, path: Path) -> None:
        save_json(path, self.to_dict())

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        return from_dict(cls, load_json(path), where=str(path))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LoupeError("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
    return torch.device(name)


class Trainer:
    """One PPO run: sampler -> learner -> checkpoints/TensorBoard/bus, resumable."""

    def __init__(self, config: TrainConfig, resume: bool = False, progress: bool = True):
        from attention import build_policy
        from learner import PPOLearner

        self.config = config
        self.run = RunDir(config.run_dir)
        self.progress = progress
        self.device = resolve_device(config.device)
        if config.learners > 1:
            from loupe.distributed.learners import check_learners

            check_learners(config.learners, self.device, config.actors)  # before anything starts
        np.random.seed(config.ppo.seed)
        self.sampler = make_sampler(config)
        # seeded here: the initial weights must not depend on what building the sampler drew
        torch.manual_seed(config.ppo.seed)
        self.policy = build_policy(
            config.policy, self.sampler.obs_shape, self.sampler.n_actions, **config.policy_options
        )
        if config.learners > 1:
            from loupe.distributed.learners import DataParallelLearner

            try:
                self.learner = DataParallelLearner(config, self.policy, self.device)
            except BaseException:
                self.sampler.close()
                raise
        else:
            self.learner = PPOLearner(self.policy, config.ppo, device=str(self.device))
        if hasattr(self.sampler, "attach"):  # central inference acts with the learner's network
            self.sampler.attach(self.policy, self.device)
        self.version = 0
        self.returns: deque[float] = deque(maxlen=100)
        #: one small record per update of this process: step, mean_return_100, policy_lag, steps/s
        self.history: deque[dict[str, float]] = deque(maxlen=HISTORY_LEN)
        self.bus = None
        self.redis_server = None
        #: checkpoints saved but not yet announced (Redis was unreachable), oldest first
        self.unannounced: list[Path] = []
        #: times the run's private redis-server was started again; in a row without an
        #: announcement getting through in between (bounded: a server that dies at once)
        self._revived = 0
        self._revived_in_a_row = 0
        if resume:
            self._restore()

    # -- checkpoints -------------------------------------------------------------------------
    def _restore(self) -> None:
        from learner.checkpoint import latest_checkpoint, load_checkpoint, load_train_state

        path = latest_checkpoint(self.run.path)
        if path is None:
            log.warning("no checkpoint in %s yet; starting from step 0", self.run.checkpoints)
            return
        policy, meta = load_checkpoint(path)
        self.policy.load_state_dict(policy.state_dict())
        self.learner.load_state_dict(load_train_state(path))
        self.version = int(meta.get("version", 0))
        log.info("resumed from %s at step %d", path, self.learner.global_step)

    def checkpoint(self) -> Path:
        from learner.checkpoint import save_checkpoint

        meta = {
            "step": self.learner.global_step,
            "run_id": self.config.run_id,
            "version": self.version,
            "env": self.config.env.env_id,
            "env_options": self.config.env.to_dict(),
            "preset": self.config.preset,
        }
        memory = memory_mb()
        if memory is not None:
            # the learner's level at one phase of its loop (right after an update): the soak
            # fits its memory trend on these instead of on samples at random phases
            meta["process"] = {
                "pid": os.getpid(),
                "rss_mb": round(memory[0], 2),
                "private_mb": round(memory[1], 2),
            }
        path = save_checkpoint(
            self.run.path,
            self.policy,
            meta,
            train_state=self.learner.state_dict(),
            keep_last=self.config.keep_last,
            keep_every=self.config.keep_every,
        )
        if self.bus is not None:
            self._announce(path)
        return path

    def _announce(self, path: Path) -> None:
        """Announce ``path`` (and any checkpoint an earlier outage left unannounced), oldest first.

        A lost Redis never stops training: the checkpoint is on disk already, the announcement
        waits for the next checkpoint (the run's private server is started again over its
        append-only file at once), and `loupe train --resume` announces what is still missing.
        """
        self.unannounced.append(path)
        self._flush_announcements()

    def _flush_announcements(self) -> None:
        import redis

        while self.unannounced:
            try:
                self._publish(self.unannounced[0])
            except (redis.exceptions.RedisError, OSError) as exc:
                if self._revive_private_server():
                    continue
                log.warning(
                    "Redis unreachable (%s): %d checkpoint(s) saved but not announced yet; "
                    "retrying at the next checkpoint",
                    type(exc).__name__,
                    len(self.unannounced),
                )
                return
            self.unannounced.pop(0)
            self._revived_in_a_row = 0

    def _revive_private_server(self) -> bool:
        """Start the run's own redis-server again if it died; True when it is back."""
        server = self.redis_server
        if server is None or server.alive() or self._revived_in_a_row >= REVIVE_IN_A_ROW:
            return False
        self._revived += 1
        self._revived_in_a_row += 1
        try:
            server.restart()  # same port and password; the AOF replays every announcement
        except LoupeError as exc:
            log.warning("the run's redis-server died and did not start again: %s", exc)
            return False
        log.warning("the run's redis-server died; started it again over its append-only file")
        return True

    def _watch_bus(self) -> None:
        """After every update: a dead private redis-server is started again at once (not only at
        the next checkpoint), so that probe workers following the run have it back within one
        update; announcements an outage held back go out then."""
        if self._revive_private_server():  # False at once while the server is alive
            self._flush_announcements()

    def _publish(self, path: Path) -> None:
        from loupe.bus import CheckpointAnnouncement

        meta = load_json(path.with_suffix(".json"))
        self.bus.publish_checkpoint(
            CheckpointAnnouncement(
                run_id=self.config.run_id,
                step=int(meta["step"]),
                uri=str(path.with_suffix(".json").resolve()),
                sha256=meta["sha256"],
                policy=self.config.policy,
                env=self.config.env.env_id,
            )
        )

    def _announce_missing(self) -> None:
        """Announce checkpoints newer than the newest announcement in the stream."""
        from learner.checkpoint import list_checkpoints

        announced = [a.step for _, a in self.bus.announcements()]
        newest = max(announced, default=-1)
        missing = [p for p in list_checkpoints(self.run.path) if int(load_json(p)["step"]) > newest]
        if missing:
            log.info("announcing %d checkpoint(s) saved while Redis was away", len(missing))
            self.unannounced.extend(missing)
            self._flush_announcements()

    # -- the bus -------------------------------------------------------------------------------
    def open_bus(self) -> None:
        """Connect to --redis, or start the run's private server, so checkpoints are announced."""
        from loupe.bus import CheckpointBus, connect
        from loupe.bus.redis_server import RedisServer

        if not self.config.announce or self.bus is not None:
            return
        url = self.config.redis
        if url is None:
            self.redis_server = RedisServer(self.run.redis).start()
            url = self.redis_server.url
            log.info(
                "private redis-server on %s:%d", self.redis_server.host, self.redis_server.port
            )
        self.bus = CheckpointBus(connect(url), self.config.run_id)
        self._announce_missing()  # none on a new run; after an outage, what --resume finds

    def close_bus(self) -> None:
        if self.bus is not None:
            self.bus.client.close()
            self.bus = None
        if self.redis_server is not None:
            self.redis_server.stop()
            self.redis_server = None

    # -- main loop ---------------------------------------------------------------------------
    @property
    def batch_steps(self) -> int:
        """Environment steps of one update: all envs x steps per env."""
        return self.config.ppo.num_envs * self.config.ppo.num_steps

    def planned_steps(self) -> int:
        """The step training ends at: whole updates, so ``total_steps`` rounded up to a batch."""
        return planned_end(self.learner.global_step, self.config.ppo.total_steps, self.batch_steps)

    def rounding_note(self) -> str | None:
        """One line when ``total_steps`` is not a whole number of updates, else None."""
        ppo = self.config.ppo
        return rounding_note(self.learner.global_step, ppo.total_steps, ppo.num_envs, ppo.num_steps)

    def weights(self) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().numpy() for k, v in self.policy.state_dict().items()}

    def train(self) -> dict[str, float]:
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        from loupe import interrupt
        from loupe.retention import tb_interval

        cfg = self.config
        total = cfg.ppo.total_steps
        #: updates per TensorBoard point, and the episodes finished since the last point
        tb_every = tb_interval(-(-total // self.batch_steps), cfg.tb_max_points)
        episodes: list[tuple[float, int]] = []
        end = max(self.planned_steps(), self.learner.global_step)
        self.open_bus()
        writer = SummaryWriter(str(self.run.tb))
        bar = tqdm(
            total=end,
            initial=self.learner.global_step,
            unit="step",
            unit_scale=True,
            disable=not self.progress,
            dynamic_ncols=True,
        )
        counted = 0  # steps of the current batch the bar has shown already

        def tick(n: int) -> None:
            nonlocal counted
            counted += n
            bar.update(n)

        if hasattr(self.sampler, "on_step"):  # in-process sampling: the bar counts every step
            self.sampler.on_step = tick
        last: dict[str, float] = {}
        updates_since_ckpt = 0
        #: True while an update is half applied (a checkpoint then would mix two states)
        torn = False
        self.sampler.start(self.weights(), self.version)
        try:
            while self.learner.global_step < total:
                t0 = time.perf_counter()
                counted = 0
                rollout, sample_stats = self.sampler.collect()
                t1 = time.perf_counter()
                # a signal during the update is raised when it is complete, so that the
                # checkpoint written on the way out holds whole updates only
                with interrupt.deferred():
                    torn = True
                    stats = self.learner.update(rollout)
                    self.version += 1
                    updates_since_ckpt += 1
                    torn = False
                    self.sampler.publish(self.weights(), self.version)
                t2 = time.perf_counter()
                self._watch_bus()
                for ep in rollout.episodes:
                    self.returns.append(float(ep.ret))
                    episodes.append((float(ep.ret), int(ep.length)))
                batch = rollout.actions.size
                stats.update(sample_stats)
                stats["policy_lag"] = float(self.version - 1 - rollout.policy_version)
                stats["steps_per_s"] = batch / max(t2 - t0, 1e-9)
                stats["sample_s"] = t1 - t0
                stats["update_s"] = t2 - t1
                if self.returns:
                    stats["mean_return_100"] = float(np.mean(self.returns))
                if self.version % tb_every == 0 or self.learner.global_step >= total:
                    step = self.learner.global_step
                    for tag, value in episode_scalars(episodes).items():
                        writer.add_scalar(tag, value, step)
                    episodes.clear()
                    for key, value in stats.items():
                        writer.add_scalar(f"train/{key}", value, step)
                bar.update(max(batch - counted, 0))
                ret = stats.get("mean_return_100")
                bar.set_postfix_str(
                    ("no episode finished yet" if ret is None else f"ret={ret:.2f}")
                    + f", sps={stats['steps_per_s']:.0f}",
                    refresh=False,
                )
                last = stats
                self.history.append(
                    {"step": float(self.learner.global_step)}
                    | {k: stats[k] for k in HISTORY_KEYS if k in stats}
                )
                if updates_since_ckpt >= cfg.checkpoint_every:
                    with interrupt.deferred():
                        path = self.checkpoint()
                        updates_since_ckpt = 0
                    bar.write(f"checkpoint {path}")
        except KeyboardInterrupt:
            step = self.learner.global_step
            if torn:  # only with a second signal, or without loupe's signal handlers
                bar.write("interrupted inside an update: no checkpoint of it; the newest is kept")
            elif updates_since_ckpt:
                bar.write(f"interrupted: writing a checkpoint at step {step} before exit")
            else:
                bar.write(f"interrupted: nothing to checkpoint since step {step}")
            raise
        finally:
            # a dead data-parallel learner took its optimiser state along: keep the last checkpoint
            if updates_since_ckpt and not torn and not getattr(self.learner, "broken", None):
                with interrupt.deferred():
                    path = self.checkpoint()
                bar.write(f"checkpoint {path}")
            bar.close()
            writer.close()
            self.sampler.close()
            if hasattr(self.learner, "close"):
                self.learner.close()
            if self.unannounced:
                log.warning(
                    "%d checkpoint(s) are saved in %s but not announced (Redis unreachable); once "
                    "Redis is back, `loupe train --resume %s` announces them",
                    len(self.unannounced),
                    self.run.checkpoints,
                    self.run.path,
                )
            self.close_bus()
        return last


def episode_scalars(episodes: list[tuple[float, int]]) -> dict[str, float]:
    """One TensorBoard point for the ``(return, length)`` of the episodes finished since the last
    one: their mean return and length and their count ({} when none finished)."""
    if not episodes:
        return {}
    rets, lengths = zip(*episodes, strict=True)
    return {
        "episode/return": float(np.mean(rets)),
        "episode/length": float(np.mean(lengths)),
        "episode/count": float(len(episodes)),
    }


def planned_end(done: int, total: int, batch: int) -> int:
    """The step a run at step ``done`` ends at when it trains whole updates of ``batch`` steps
    until it has reached ``total``."""
    return done + -(-max(total - done, 0) // batch) * batch


def rounding_note(done: int, total: int, num_envs: int, num_steps: int) -> str | None:
    """``--total-steps 8192 is rounded up to 16384 = 1 update of 64 envs x 256 steps``, or None
    when ``total`` is reached exactly."""
    end = planned_end(done, total, num_envs * num_steps)
    if end in (total, done):
        return None
    updates = (end - done) // (num_envs * num_steps)
    return (
        f"--total-steps {total} is rounded up to {end} = {updates} update"
        f"{'s' if updates != 1 else ''} of {num_envs} envs x {num_steps} steps"
        + (f" from step {done}" if done else "")
    )


class InProcessSampler:
    """Samples with a RolloutActor in this process (one machine, no Ray)."""

    def __init__(self, config: TrainConfig):
        from actors.rollout import RolloutActor, RolloutConfig

        self.num_steps = config.ppo.num_steps
        #: called with the number of environment steps after each step of a rollout
        self.on_step = None
        self.actor = RolloutActor(
            RolloutConfig(
                env=config.env,
                policy=config.policy,
                policy_options=config.policy_options,
                seed=config.ppo.seed,
                channels_last=actor_channels_last(config),
            )
        )
        self.obs_shape = self.actor.obs_shape
        self.n_actions = self.actor.n_actions

    def start(self, weights, version: int) -> None:
        self.actor.set_weights(version, weights)

    def collect(self):
        before = self.actor.timings()
        rollout = self.actor.rollout(self.num_steps, on_step=self.on_step)
        after = self.actor.timings()
        return rollout, {
            "env_s": after["env_seconds"] - before["env_seconds"],
            "inference_s": after["inference_seconds"] - before["inference_seconds"],
        }

    def publish(self, weights, version: int) -> None:
        self.actor.set_weights(version, weights)

    def close(self) -> None:
        self.actor.close()


def actor_channels_last(config: TrainConfig) -> bool:
    """Whether rollout actors (always on the CPU) run the policy in channels-last memory format:
    the update's ``ppo.channels_last`` resolved for a CPU."""
    from learner.ppo import resolve_channels_last

    return resolve_channels_last(config.ppo.channels_last, torch.device("cpu"), config.policy)


def make_sampler(config: TrainConfig):
    if config.actors == 0:
        if config.inference != "actor":
            raise LoupeError("--inference central needs Ray actors (--actors N)")
        return InProcessSampler(config)
    from loupe.distributed import CentralSampler, RaySampler

    return CentralSampler(config) if config.inference == "central" else RaySampler(config)
