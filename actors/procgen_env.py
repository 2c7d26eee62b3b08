"""procgen adapted to loupe's vector-env interface (gym3 act/observe -> step with auto-reset)."""

from __future__ import annotations

import numpy as np

from actors.envs import ARTICLE_ACTIONS, PROCGEN_TIMEOUT, EnvConfig, EpisodeRecord


class ProcgenVecEnv:
    def __init__(self, config: EnvConfig):
        from procgen import ProcgenGym3Env

        self.config = config
        self.num_envs = config.num_envs
        self.env = ProcgenGym3Env(
            num=config.num_envs,
            env_name=config.game,
            num_levels=config.num_levels,
            start_level=config.start_level,
            distribution_mode=config.distribution_mode,
            use_sequential_levels=config.use_sequential_levels,
            paint_vel_info=config.paint_vel_info,
            use_backgrounds=config.use_backgrounds,
            restrict_themes=config.restrict_themes,
            use_monochrome_assets=config.use_monochrome_assets,
            center_agent=config.center_agent,
            num_threads=config.num_threads,
            rand_seed=config.seed,
        )
        self.action_map = np.array(
            ARTICLE_ACTIONS if config.action_set == "article" else range(15), dtype=np.int32
        )
        self.obs_shape = (3, 64, 64)
        self.n_actions = len(self.action_map)
        self._returns = np.zeros(self.num_envs, dtype=np.float64)
        self._lengths = np.zeros(self.num_envs, dtype=np.int64)
        self._info = self.env.get_info()

    def _frames(self) -> np.ndarray:
        _, obs, _ = self.env.observe()
        return np.ascontiguousarray(obs["rgb"].transpose(0, 3, 1, 2))  # (N, 3, 64, 64)

    def reset(self) -> np.ndarray:
        """The current frames; procgen environments start (and restart) themselves."""
        self._returns[:] = 0
        self._lengths[:] = 0
        return self._frames()

    def step(self, actions):
        actions = np.asarray(actions)
        if actions.shape != (self.num_envs,):
            raise ValueError(f"expected {self.num_envs} actions, got shape {actions.shape}")
        self.env.act(self.action_map[actions])
        reward, obs, first = self.env.observe()
        prev_info, self._info = self._info, self.env.get_info()
        reward = reward.astype(np.float32)
        self._returns += reward
        self._lengths += 1
        episodes = []
        for i in np.flatnonzero(first):
            info = self._info[i]
            if info.get("prev_level_complete", 0) == 1:
                outcome = "complete"
            elif self._lengths[i] >= PROCGEN_TIMEOUT:
                outcome = "timeout"
            else:
                outcome = "failure"
            seed = info.get("prev_level_seed", prev_info[i].get("level_seed"))
            episodes.append(
                EpisodeRecord(
                    int(i), float(self._returns[i]), int(self._lengths[i]), outcome, int(seed)
                )
            )
            self._returns[i] = 0
            self._lengths[i] = 0
        frames = np.ascontiguousarray(obs["rgb"].transpose(0, 3, 1, 2))
        return frames, reward, first.astype(bool), episodes

    def level_seeds(self) -> np.ndarray:
        """(N,) seed of the level each env is playing now."""
        return np.array([info.get("level_seed", -1) for info in self._info], dtype=np.int64)

    def get_state(self) -> list[bytes]:
        return self.env.callmethod("get_state")

    def set_state(self, states: list[bytes]) -> None:
        self.env.callmethod("set_state", states)
        self._info = self.env.get_info()

    def close(self) -> None:
        self.env = None
