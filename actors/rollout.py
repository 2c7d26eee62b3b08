"""RolloutActor: steps a vector environment with the newest policy weights it has been given.

A plain class: the wiring runs it in-process (single machine) or wraps it with ``ray.remote``.

    actor = RolloutActor(RolloutConfig(env=EnvConfig(...), policy="impala"))
    actor.set_weights(version=1, weights=policy.state_dict())
    batch = actor.rollout(num_steps=256)   # -> learner.rollout.Rollout, uint8 observations
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from actors import EnvConfig


@dataclasses.dataclass
class RolloutConfig:
    """What one rollout actor runs."""

    env: EnvConfig
    #: policy registry name (attention.build_policy)
    policy: str = "impala"
    #: keyword options for the policy constructor
    policy_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: seed of the action-sampling generator (the env seed lives in ``env``)
    seed: int = 0
    #: torch intra-op threads for CPU inference inside this actor (0 keeps torch's default)
    torch_threads: int = 0
    #: run the policy's convolutions in channels-last memory format (the same outputs to float
    #: tolerance; less CPU for the networks in ``learner.ppo.CHANNELS_LAST_PAYS``)
    channels_last: bool = False
    #: keep freed memory in the glibc heap (``learner.ppo.tune_malloc``): the frames' float
    #: copies and activations are then not page-faulted afresh at every step
    malloc_tuning: bool = False


@torch.no_grad()
def sample_actions(policy, obs: np.ndarray, generator: torch.Generator, device=None):
    """Sample from the policy for (N, C, H, W) uint8 frames -> (actions, log-probs, values) as numpy."""
    out = policy(torch.from_numpy(obs).to(device) if device is not None else torch.from_numpy(obs))
    logp_all = torch.log_softmax(out.logits.float(), dim=-1).cpu()  # (N, A)
    actions = torch.multinomial(logp_all.exp(), 1, generator=generator).squeeze(1)
    logp = logp_all.gather(1, actions[:, None]).squeeze(1)
    return actions.numpy(), logp.numpy(), out.value.float().cpu().numpy()


@torch.no_grad()
def policy_values(policy, obs: np.ndarray, device=None) -> np.ndarray:
    """V(obs) for (N, C, H, W) uint8 frames, as numpy; draws nothing from any generator."""
    x = torch.from_numpy(obs)
    return policy(x.to(device) if device is not None else x).value.float().cpu().numpy()


class RolloutActor:
    """Owns a vector env and a CPU copy of the policy; produces fixed-length trajectory batches."""

    def __init__(self, config: RolloutConfig):
        from actors import make_vec_env
        from attention import build_policy

        self.config = config
        if config.malloc_tuning:
            from learner import ppo

            ppo.tune_malloc()
        if config.torch_threads > 0:
            torch.set_num_threads(config.torch_threads)
        self.env = make_vec_env(config.env)
        self.policy = build_policy(
            config.policy, self.env.obs_shape, self.env.n_actions, **config.policy_options
        )
        self.policy.eval()
        if config.channels_last:
            self.policy.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.version = -1
        self.generator = torch.Generator().manual_seed(config.seed)
        self.obs = self.env.reset()  # (N, C, H, W) uint8
        self.steps_done = 0
        self.env_seconds = 0.0
        self.inference_seconds = 0.0
        #: shared-memory observation buffers mapped so far, by file path
        self._shared_maps: dict[str, np.ndarray] = {}

    @property
    def obs_shape(self) -> tuple[int, ...]:
        return tuple(self.env.obs_shape)

    @property
    def n_actions(self) -> int:
        return int(self.env.n_actions)

    def spaces(self) -> tuple[tuple[int, ...], int]:
        """(observation shape, number of actions), for callers that hold only a remote handle."""
        return self.obs_shape, self.n_actions

    def set_weights(self, version: int, weights: dict[str, Any]) -> None:
        """Load weights (tensors or numpy arrays) tagged with a version number."""
        if version == self.version:
            return
        state = {k: torch.from_numpy(np.array(v)) for k, v in weights.items()}
        self.policy.load_state_dict(state)
        self.version = int(version)

    def act(self, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sample actions for a batch of observations -> (actions, log-probs, values)."""
        return sample_actions(self.policy, obs, self.generator)

    def value(self, obs: np.ndarray) -> np.ndarray:
        return policy_values(self.policy, obs)

    def rollout(
        self, num_steps: int, record_states: Iterable[int] = (), on_step=None, obs_out=None
    ):
        """Step every env ``num_steps`` times -> a ``Rollout`` with (T, N) arrays.

        ``record_states``: steps t at which the games' states (procgen ``get_state``, one bytes
        object per env, matching ``obs[t]``) are kept in ``self.states[t]``. ``on_step(n)``, if
        given, is called after each step with the n environment steps it took (progress bars).
        ``obs_out``: a (T, N, C, H, W) uint8 array the frames are written into (and that the
        rollout's ``obs`` is); None allocates one.
        """
        from learner.rollout import RolloutBuilder

        if self.version < 0:
            raise RuntimeError("set_weights must be called before rollout")
        n = self.env.num_envs
        batch = RolloutBuilder(num_steps, n, self.obs_shape, obs=obs_out)
        level_seeds = getattr(self.env, "level_seeds", None)
        keep = set(record_states)
        #: step -> the games' states before that step (only the steps asked for)
        self.states: dict[int, list[bytes]] = {}
        for t in range(num_steps):
            if t in keep:
                self.states[t] = self.env.get_state()
            t0 = time.perf_counter()
            batch.observe(t, self.obs, level_seeds() if level_seeds is not None else None)
            actions, logp, values = self.act(self.obs)
            t1 = time.perf_counter()
            self.obs, reward, done, finished = self.env.step(actions)
            self.env_seconds += time.perf_counter() - t1
            self.inference_seconds += t1 - t0
            batch.record(t, actions, logp, values, reward, done, finished)
            if on_step is not None:
                on_step(n)
        t0 = time.perf_counter()
        last_value = self.value(self.obs)
        self.inference_seconds += time.perf_counter() - t0
        self.steps_done += num_steps * n
        return batch.build(self.obs, last_value, self.version)

    def rollout_shared(self, num_steps: int, path: str, shape: tuple[int, ...], offset: int):
        """``rollout`` with the frames written into envs [offset, offset + N) of the (T, N_all,
        C, H, W) uint8 buffer in the shared-memory file ``path`` (a ``SharedObs`` of the learner
        on this machine) -> the Rollout with ``obs`` None: the learner reads them in place.

        Where ``path`` is not on this machine (another node, or already unlinked after every
        actor mapped it), the plain rollout with its own ``obs`` is returned instead.
        """
        view = self._shared_view(path, tuple(shape))
        if view is None:
            return self.rollout(num_steps)
        out = view[:, offset : offset + self.env.num_envs]
        return dataclasses.replace(self.rollout(num_steps, obs_out=out), obs=None)

    def _shared_view(self, path: str, shape: tuple[int, ...]) -> np.ndarray | None:
        if path not in self._shared_maps:
            from learner.rollout import map_shared

            try:
                self._shared_maps[path] = map_shared(path, shape)
            except FileNotFoundError:
                return None
        return self._shared_maps[path]

    def timings(self) -> dict[str, float]:
        return {
            "steps": float(self.steps_done),
            "env_seconds": self.env_seconds,
            "inference_seconds": self.inference_seconds,
        }

    def close(self) -> None:
        self.env.close()


class EnvStepper:
    """A vector env without a policy, for central inference: the caller sends actions, gets frames."""

    def __init__(self, env_config: EnvConfig):
        from actors import make_vec_env

        self.env = make_vec_env(env_config)
        self.obs = self.env.reset()
        self.steps_done = 0

    def spaces(self) -> tuple[tuple[int, ...], int]:
        return tuple(self.env.obs_shape), int(self.env.n_actions)

    def current(self) -> tuple[np.ndarray, np.ndarray]:
        """(observations (N,C,H,W) uint8, level seeds (N,) int64; -1 where not known)."""
        return self.obs, self._level_seeds()

    def step(self, actions: np.ndarray):
        """-> (next obs, reward, done, finished episodes, level seeds of the next obs)."""
        self.obs, reward, done, episodes = self.env.step(np.asarray(actions))
        self.steps_done += len(actions)
        return self.obs, reward, done, episodes, self._level_seeds()

    def _level_seeds(self) -> np.ndarray:
        fn = getattr(self.env, "level_seeds", None)
        return fn() if fn is not None else np.full(self.env.num_envs, -1, dtype=np.int64)

    def close(self) -> None:
        self.env.close()
