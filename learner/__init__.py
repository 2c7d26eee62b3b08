"""PPO learner: GAE, the clipped-surrogate loss with attention-entropy regularisation, presets,
reward normalisation and checkpoints (``learner.checkpoint``)."""

from learner.checkpoint import (
    find_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_meta,
)
from learner.config import PRESETS, PPOConfig
from learner.gae import compute_gae
from learner.ppo import PPOLearner, TrainState, explained_variance, ppo_loss
from learner.reward_norm import RewardNormalizer
from learner.rollout import Rollout

__all__ = [
    "PRESETS",
    "PPOConfig",
    "PPOLearner",
    "RewardNormalizer",
    "Rollout",
    "TrainState",
    "compute_gae",
    "explained_variance",
    "find_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "ppo_loss",
    "read_meta",
]
