"""A lost Redis never stops training, and every checkpoint is announced once Redis is back.

Real redis-server processes killed with SIGKILL, real CoinRun envs, real PPO updates.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from actors import EnvConfig
from learner import PPOConfig
from loupe.bus import CheckpointBus, connect
from loupe.bus.redis_server import RedisServer
from loupe.rundir import RunDir
from loupe.train import TrainConfig, Trainer

UPDATES = 6
BATCH = 2 * 16
ALL_STEPS = [BATCH * (u + 1) for u in range(UPDATES)]


def config(run_dir: Path, redis: str | None) -> TrainConfig:
    ppo = PPOConfig.preset("procgen", num_envs=2, num_steps=16, num_minibatches=2,
                           update_epochs=1, total_steps=BATCH * UPDATES)  # fmt: skip
    env = EnvConfig("procgen:coinrun", num_envs=2, seed=0, distribution_mode="easy")
    return TrainConfig(env=env, ppo=ppo, run_dir=str(run_dir), policy="nature", redis=redis,
                       checkpoint_every=1, keep_last=UPDATES, device="cpu")  # fmt: skip


def trainer_with_hook(cfg: TrainConfig, hook) -> Trainer:
    """A trainer that calls ``hook(update_number, trainer)`` before each PPO update."""
    trainer = Trainer(cfg, progress=False)
    RunDir(cfg.run_dir).create()
    original, count = trainer.learner.update, [0]

    def update(rollout):
        count[0] += 1
        hook(count[0], trainer)
        return original(rollout)

    trainer.learner.update = update
    return trainer


def announced_steps(url: str, run_id: str) -> list[int]:
    client = connect(url)
    try:
        return [a.step for _, a in CheckpointBus(client, run_id).announcements()]
    finally:
        client.close()


@pytest.mark.integration
def test_redis_killed_mid_run_gets_the_missed_announcements_when_back(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    try:
        cfg = config(tmp_path / "run", server.url)

        def outage(update, _):
            if update == 3:
                server.kill()  # checkpoints 3 and 4 are saved while Redis is away
            if update == 5:
                server.start()  # same port and password, AOF replayed

        trainer = trainer_with_hook(cfg, outage)
        trainer.train()
        assert trainer.learner.global_step == BATCH * UPDATES
        assert trainer.unannounced == []
        assert announced_steps(server.url, cfg.run_id) == ALL_STEPS  # each once, in order
    finally:
        server.stop()


@pytest.mark.integration
def test_private_redis_killed_mid_run_is_started_again(tmp_path):
    cfg = config(tmp_path / "run", None)
    trainer = trainer_with_hook(cfg, lambda u, t: t.redis_server.kill() if u == 3 else None)
    trainer.train()
    assert trainer._revived == 1 and trainer.unannounced == []
    with RedisServer(RunDir(cfg.run_dir).redis) as server:  # as `loupe probe --run` does
        assert announced_steps(server.url, cfg.run_id) == ALL_STEPS


@pytest.mark.integration
def test_redis_still_down_at_the_end_then_resume_announces(tmp_path, caplog):
    server = RedisServer(tmp_path / "redis").start()
    try:
        cfg = config(tmp_path / "run", server.url)
        trainer = trainer_with_hook(cfg, lambda u, _: server.kill() if u == 3 else None)
        with caplog.at_level(logging.WARNING, logger="loupe.train"):
            trainer.train()  # completes: the checkpoints are on disk
        assert trainer.learner.global_step == BATCH * UPDATES
        assert [int(p.stem.split("-")[1]) for p in trainer.unannounced] == ALL_STEPS[2:]
        last = caplog.records[-1].getMessage()
        assert "4 checkpoint(s) are saved" in last and f"--resume {cfg.run_dir}" in last
        server.start()
        assert announced_steps(server.url, cfg.run_id) == ALL_STEPS[:2]
        Trainer(cfg, resume=True, progress=False).train()  # nothing left to train; announces
        assert announced_steps(server.url, cfg.run_id) == ALL_STEPS
    finally:
        server.stop()


@pytest.mark.integration
def test_private_redis_is_back_within_one_update_however_often_it_dies(tmp_path):
    """Found by the soak: the private server came back only at the next checkpoint (probe
    workers following the run lost it until then), and after 3 deaths in a run never again."""
    cfg = config(tmp_path / "run", None)
    cfg.checkpoint_every = 2  # checkpoints after updates 2, 4 and 6
    alive_before: dict[int, bool] = {}

    def outage(update, trainer):
        alive_before[update] = trainer.redis_server.alive()
        if update in (1, 3, 4, 5):  # four deaths, two of them with no checkpoint in between
            trainer.redis_server.kill()

    trainer = trainer_with_hook(cfg, outage)
    trainer.train()
    assert alive_before == {u: True for u in range(1, UPDATES + 1)}  # back after every update
    assert trainer._revived == 4 and trainer.unannounced == []
    with RedisServer(RunDir(cfg.run_dir).redis) as server:
        assert announced_steps(server.url, cfg.run_id) == ALL_STEPS[1::2]  # each once
