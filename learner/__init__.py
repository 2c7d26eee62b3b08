"""PPO learner: GAE, the clipped-surrogate loss with attention-entropy regularisation, presets,
reward normalisation and checkpoints (``learner.checkpoint``)."""

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
    "ppo_loss",
]
