"""Atari through ale-py's C++ vector environment, with the standard preprocessing done in C++."""

from __future__ import annotations

import numpy as np

from actors.envs import EnvConfig, EpisodeRecord


class AtariVecEnv:
    def __init__(self, config: EnvConfig):
        from ale_py.vector_env import AtariVectorEnv, AutoresetMode

        self.config = config
        self.num_envs = config.num_envs
        threads = config.ale_threads or min(config.num_envs, 4)
        self.env = AtariVectorEnv(
            game=config.game,
            num_envs=config.num_envs,
            num_threads=threads,
            repeat_action_probability=config.sticky_actions,
            noop_max=config.noop_max,
            frameskip=config.frame_skip,
            maxpool=True,
            stack_num=config.frame_stack,
            img_height=84,
            img_width=84,
            grayscale=True,
            # life_loss_info: terminated at a life loss without resetting the game (the usual
            # episodic-life semantics); ale-py's own episodic_life restarts the game instead
            episodic_life=False,
            life_loss_info=config.episodic_life,
            reward_clipping=False,  # clipped here, so that episode returns stay raw
            use_fire_reset=config.fire_reset,
            autoreset_mode=AutoresetMode.SAME_STEP,
        )
        self.obs_shape = (config.frame_stack, 84, 84)
        self.n_actions = int(self.env.single_action_space.n)
        self._returns = np.zeros(self.num_envs, dtype=np.float64)
        self._lengths = np.zeros(self.num_envs, dtype=np.int64)
        self._frame_numbers = np.zeros(self.num_envs, dtype=np.int64)
        self._seeded = False

    def reset(self) -> np.ndarray:
        seed = None if self._seeded else self.config.seed
        self._seeded = True
        obs, info = self.env.reset(seed=seed)
        self._returns[:] = 0
        self._lengths[:] = 0
        self._frame_numbers = np.asarray(info["episode_frame_number"], dtype=np.int64).copy()
        return obs

    def step(self, actions):
        obs, reward, terminated, truncated, info = self.env.step(np.asarray(actions))
        raw = np.asarray(reward, dtype=np.float64)
        self._returns += raw
        self._lengths += 1
        done = np.logical_or(terminated, truncated)
        frames = np.asarray(info["episode_frame_number"], dtype=np.int64)
        # a real reset (game over or time limit) restarts the frame counter; a life loss does not
        game_over = done & (frames < self._frame_numbers) if self.config.episodic_life else done
        self._frame_numbers = frames.copy()
        episodes = []
        for i in np.flatnonzero(game_over):
            episodes.append(EpisodeRecord(int(i), float(self._returns[i]), int(self._lengths[i])))
            self._returns[i] = 0
            self._lengths[i] = 0
        train_reward = np.sign(raw) if self.config.clip_rewards else raw
        return obs, train_reward.astype(np.float32), done, episodes

    def close(self) -> None:
        self.env.close()
