"""Training across two Ray nodes on this machine (ray.cluster_utils.Cluster, loopback only)."""

from __future__ import annotations

import json

import pytest


@pytest.mark.integration
def test_training_across_two_nodes(tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    from actors import EnvConfig
    from learner import PPOConfig
    from loupe.rundir import RunDir
    from loupe.train import TrainConfig, Trainer

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1,
                      "node_ip_address": "127.0.0.1"})  # fmt: skip
    cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    try:
        ray.init(address=cluster.address)
        cluster.wait_for_nodes()
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        ppo = PPOConfig.preset("procgen", num_envs=4, num_steps=16, num_minibatches=2,
                               update_epochs=1, total_steps=128)  # fmt: skip
        cfg = TrainConfig(env=EnvConfig("procgen:coinrun", num_envs=4, distribution_mode="easy"),
                          ppo=ppo, run_dir=str(tmp_path / "run"), policy="nature", actors=2,
                          ray_address=cluster.address, announce=False, device="cpu")  # fmt: skip
        trainer = Trainer(cfg, progress=False)
        nodes = {ray.get(a.spaces.remote()) and a._actor_id for a in trainer.sampler.actors}
        placed = {
            s["node_id"] for s in ray.util.state.list_actors(filters=[("state", "=", "ALIVE")])
            if s["class_name"] == "RolloutActor"
        }  # fmt: skip
        assert len(nodes) == 2 and len(placed) == 2  # one rollout actor on each node
        RunDir(cfg.run_dir).create()
        trainer.train()
        assert trainer.learner.global_step == 128
        metas = sorted((tmp_path / "run" / "checkpoints").glob("ckpt-*[0-9].json"))
        assert json.loads(metas[-1].read_text())["step"] == 128
    finally:
        ray.shutdown()
        cluster.shutdown()
