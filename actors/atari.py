"""Atari through ale-py's C++ vector environment (``ale_py.vector_env.AtariVectorEnv``).

The C++ side does noop-reset, frame skip with max-pool, 84x84 grayscale, frame stacking, fire-reset
and sticky actions on its own threads, and auto-resets a finished game inside the same step
(``AutoresetMode.SAME_STEP``). This adapter adds what must stay outside C++:

- episodic life: ale-py's own ``episodic_life`` restarts the whole game at a life loss, so the
  game is played to its end here and a life loss only sets ``done`` (read from ``info["lives"]``);
- reward clipping, so that ``EpisodeRecord.ret`` can stay the raw game score;
- episode returns and lengths over whole games.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import numpy as np

from actors.envs import EnvConfig, EpisodeRecord, VecEnv, unknown_game_message
from loupe.errors import LoupeError

log = logging.getLogger(__name__)

#: ROMs without a single-player mode (ale-py registers no v5 env for them)
MULTIPLAYER_ONLY = frozenset({"combat", "joust", "maze_craze", "warlords"})
#: side of the square grayscale frames
FRAME_SIZE = 84


@functools.lru_cache(maxsize=1)
def _games() -> dict[str, str]:
    """Game name as in ``ALE/<name>-v5`` -> ale-py ROM id ('Breakout' -> 'breakout')."""
    from ale_py.registration import rom_id_to_name
    from ale_py.roms import get_all_rom_ids, get_rom_path

    return {
        rom_id_to_name(rom): rom
        for rom in get_all_rom_ids()
        if rom not in MULTIPLAYER_ONLY and get_rom_path(rom) is not None
    }


def list_games() -> list[str]:
    """Single-player ALE games, named as in ``ALE/<name>-v5``."""
    return sorted(_games())


def resolve_game(rest: str, env_id: str) -> str:
    """'Breakout-v5' -> 'breakout' (the ROM id); unknown games and versions are LoupeErrors."""
    name, sep, version = rest.rpartition("-v")
    if not sep or not name:
        raise LoupeError(f"ALE ids look like ALE/<Game>-v5 (e.g. ALE/Breakout-v5), not {env_id!r}")
    if version != "5":
        raise LoupeError(f"only v5 ALE ids are supported; use ALE/{name}-v5 instead of {env_id!r}")
    games = _games()
    if name in games:
        return games[name]
    from ale_py.registration import rom_id_to_name

    if name.lower() in {rom_id_to_name(r).lower() for r in MULTIPLAYER_ONLY}:
        raise LoupeError(f"{env_id} has no single-player mode in ale-py; choose another game")
    raise LoupeError(unknown_game_message("ALE", name, env_id, list_games()))


def check_config(cfg: EnvConfig) -> None:
    """Range checks of the ALE options."""
    if not 0.0 <= cfg.sticky_actions <= 1.0:
        raise LoupeError(f"sticky_actions must be in [0, 1], got {cfg.sticky_actions}")
    for name in ("frame_skip", "frame_stack", "max_episode_frames"):
        if getattr(cfg, name) <= 0:
            raise LoupeError(f"{name} must be positive, got {getattr(cfg, name)}")
    for name in ("noop_max", "ale_threads"):
        if getattr(cfg, name) < 0:
            raise LoupeError(f"{name} must be >= 0, got {getattr(cfg, name)}")


def usable_cores() -> int:
    """CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def thread_count(cfg: EnvConfig) -> int:
    """ale-py threads: ``ale_threads`` or one per usable core, never more than ``num_envs``."""
    cores = usable_cores()
    if cfg.ale_threads > cores:
        log.warning("ale_threads=%d exceeds the %d usable CPU cores", cfg.ale_threads, cores)
    return max(1, min(cfg.ale_threads or cores, cfg.num_envs))


class AtariVecEnv(VecEnv):
    """``num_envs`` ALE games; observations (N, frame_stack, 84, 84) uint8."""

    def __init__(self, config: EnvConfig):
        from ale_py.vector_env import AtariVectorEnv, AutoresetMode

        self.config = config
        self.num_envs = config.num_envs
        self.num_threads = thread_count(config)
        self._env = AtariVectorEnv(
            game=config.game,
            num_envs=config.num_envs,
            num_threads=self.num_threads,
            max_num_frames_per_episode=config.max_episode_frames,
            repeat_action_probability=config.sticky_actions,
            autoreset_mode=AutoresetMode.SAME_STEP,
            img_height=FRAME_SIZE,
            img_width=FRAME_SIZE,
            grayscale=True,
            stack_num=config.frame_stack,
            frameskip=config.frame_skip,
            maxpool=True,
            noop_max=config.noop_max,
            episodic_life=False,  # would restart the game at a life loss; handled here instead
            life_loss_info=False,
            reward_clipping=False,  # clipped here so that returns stay raw
            use_fire_reset=config.fire_reset,
        )
        self.obs_shape = (config.frame_stack, FRAME_SIZE, FRAME_SIZE)
        self.n_actions = int(self._env.single_action_space.n)  # type: ignore[attr-defined]
        self._returns = np.zeros(self.num_envs, dtype=np.float64)  # (N,) raw score of the game
        self._lengths = np.zeros(self.num_envs, dtype=np.int64)  # (N,) steps of the game
        self._lives = np.zeros(self.num_envs, dtype=np.int64)  # (N,) lives after the last step
        self._resets = 0

    def reset(self) -> np.ndarray:
        """New games in every env; the first reset seeds env i with ``seed + i``."""
        obs, info = self._env.reset(seed=self.config.seed if self._resets == 0 else None)
        self._resets += 1
        self._returns[:] = 0.0
        self._lengths[:] = 0
        self._lives[:] = info["lives"]
        return obs

    def step(self, actions: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[EpisodeRecord]]:
        if self._resets == 0:
            raise RuntimeError("call reset() before step()")
        a = self._check_actions(actions)
        obs, reward, terminated, truncated, info = self._env.step(a.astype(np.int64, copy=False))
        raw = np.asarray(reward, dtype=np.float64)  # (N,)
        self._returns += raw
        self._lengths += 1
        game_over = np.logical_or(terminated, truncated)  # (N,) obs[i] already starts a new game
        lives = np.asarray(info["lives"], dtype=np.int64)
        done = game_over
        if self.config.episodic_life:
            done = game_over | (lives < self._lives)  # a life loss without game over
        self._lives = lives
        episodes = self._finish_games(game_over)
        train_reward = np.sign(raw) if self.config.clip_rewards else raw
        return obs, train_reward.astype(np.float32), done, episodes

    def _finish_games(self, game_over: np.ndarray) -> list[EpisodeRecord]:
        episodes = []
        for i in np.flatnonzero(game_over):
            episodes.append(EpisodeRecord(int(i), float(self._returns[i]), int(self._lengths[i])))
            self._returns[i] = 0.0
            self._lengths[i] = 0
        return episodes

    def _backend_step(self, actions: np.ndarray) -> Any:
        return self._env.step(actions)

    def close(self) -> None:
        self._env.close()


VEC_ENV = AtariVecEnv
