"""Learning test (make test-all): PPO must clearly beat a random policy within a fixed CPU budget.

Task: CoinRun, easy distribution, 200 training levels, Nature CNN, 32 envs x 128 steps, 160k steps
(about 5 minutes on 2 CPU cores), seed 1 for weights, sampling and levels. Margin: the mean return of the last 100 training episodes must
exceed a uniformly random policy's mean return on the same levels by at least 1.5 (of 10).
"""

from __future__ import annotations

import numpy as np
import pytest

from actors import EnvConfig, make_vec_env
from learner import PPOConfig
from loupe.rundir import RunDir
from loupe.train import TrainConfig, Trainer

MARGIN = 1.5


def random_policy_return(episodes: int = 300) -> float:
    env = make_vec_env(EnvConfig("procgen:coinrun", num_envs=32, seed=7, num_levels=200,
                                 distribution_mode="easy"))  # fmt: skip
    env.reset()
    rng = np.random.default_rng(0)
    returns: list[float] = []
    while len(returns) < episodes:
        _, _, _, eps = env.step(rng.integers(0, env.n_actions, env.num_envs))
        returns += [e.ret for e in eps]
    return float(np.mean(returns[:episodes]))


@pytest.mark.learning
def test_ppo_beats_random_on_coinrun(tmp_path):
    baseline = random_policy_return()
    ppo = PPOConfig.preset("procgen", num_envs=32, num_steps=128, num_minibatches=4,
                           update_epochs=3, total_steps=160_000, seed=1)  # fmt: skip
    env = EnvConfig("procgen:coinrun", num_envs=32, seed=1, num_levels=200,
                    distribution_mode="easy")  # fmt: skip
    cfg = TrainConfig(env=env, ppo=ppo, run_dir=str(tmp_path / "run"), policy="nature",
                      announce=False, checkpoint_every=10, device="cpu")  # fmt: skip
    trainer = Trainer(cfg, progress=False)
    RunDir(cfg.run_dir).create()
    stats = trainer.train()
    trained = stats["mean_return_100"]
    print(f"random {baseline:.2f}, trained {trained:.2f} after {trainer.learner.global_step} steps")
    assert trained >= baseline + MARGIN, (baseline, trained)
