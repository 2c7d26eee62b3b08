"""PPO learner: GAE, the clipped-surrogate loss with attention-entropy regularisation, presets,
checkpoints."""

from learner.config import PRESETS, PPOConfig
from learner.gae import compute_gae
from learner.ppo import PPOLearner, RewardNormalizer, TrainState, ppo_loss
from learner.rollout import Rollout

__all__ = [
    "PRESETS",
    "PPOConfig",
    "PPOLearner",
    "RewardNormalizer",
    "Rollout",
    "TrainState",
    "compute_gae",
    "ppo_loss",
]
