"""Training across two Ray nodes on this machine: `ray start --head` plus a second `ray start`,
both on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

RAY = str(Path(sys.executable).with_name("ray"))


def ray_cli(*args: str, env=None) -> None:
    proc = subprocess.run([RAY, *args], capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.integration
def test_training_across_two_nodes(tmp_path):
    import ray

    from actors import EnvConfig
    from learner import PPOConfig
    from loupe.redis_server import free_port
    from loupe.rundir import RunDir
    from loupe.train import TrainConfig, Trainer

    if ray.is_initialized():
        ray.shutdown()
    port = free_port()
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats"]
    ray_cli("start", "--head", f"--port={port}", "--include-dashboard=false", *common, env=env)
    try:
        ray_cli("start", f"--address=127.0.0.1:{port}", *common, env=env)
        address = f"127.0.0.1:{port}"
        ppo = PPOConfig.preset("procgen", num_envs=4, num_steps=16, num_minibatches=2,
                               update_epochs=1, total_steps=128)  # fmt: skip
        cfg = TrainConfig(env=EnvConfig("procgen:coinrun", num_envs=4, distribution_mode="easy"),
                          ppo=ppo, run_dir=str(tmp_path / "run"), policy="nature", actors=2,
                          ray_address=address, announce=False, device="cpu")  # fmt: skip
        trainer = Trainer(cfg, progress=False)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        from ray.util.state import list_actors

        placed = {a.node_id for a in list_actors(filters=[("class_name", "=", "RolloutActor")])
                  if a.state == "ALIVE"}  # fmt: skip
        assert len(placed) == 2  # one rollout actor on each node (1 CPU each)
        RunDir(cfg.run_dir).create()
        trainer.train()
        assert trainer.learner.global_step == 128
        metas = sorted((tmp_path / "run" / "checkpoints").glob("ckpt-*[0-9].json"))
        assert json.loads(metas[-1].read_text())["step"] == 128
    finally:
        ray.shutdown()
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120, env=env)
