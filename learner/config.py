"""PPO settings and the presets that reproduce the seed papers' settings by name."""

from __future__ import annotations

import dataclasses
from typing import Any

from loupe.errors import LoupeError


@dataclasses.dataclass
class PPOConfig:
    """Clipped PPO with GAE. Derived sizes are filled in by ``__post_init__``."""

    #: Adam learning rate
    lr: float = 2.5e-4
    #: anneal the learning rate linearly to 0 over the run
    anneal_lr: bool = True
    #: discount
    gamma: float = 0.99
    #: GAE lambda
    gae_lambda: float = 0.95
    #: environments stepped together (over all actors)
    num_envs: int = 8
    #: steps per environment per update
    num_steps: int = 128
    #: minibatches per epoch
    num_minibatches: int = 4
    #: passes over each batch
    update_epochs: int = 4
    #: surrogate clipping range
    clip_coef: float = 0.2
    #: anneal the clipping range linearly to 0 over the run
    anneal_clip: bool = False
    #: clip the value loss around the behaviour values
    clip_vloss: bool = True
    #: value loss coefficient
    vf_coef: float = 0.5
    #: entropy bonus coefficient
    ent_coef: float = 0.01
    #: attention entropy coefficient: loss += attn_coef * mean summed attention entropy
    attn_coef: float = 0.0
    #: normalise advantages per minibatch
    norm_adv: bool = True
    #: global gradient-norm clipping
    max_grad_norm: float = 0.5
    #: Adam epsilon
    adam_eps: float = 1e-5
    #: scale rewards by a running std of the discounted return (procgen)
    normalize_rewards: bool = False
    #: environment steps in all
    total_steps: int = 10_000_000
    #: seed of torch, numpy and the minibatch order
    seed: int = 1
    # -- derived --------------------------------------------------------------------------------
    batch_size: int = dataclasses.field(default=0, init=False)
    minibatch_size: int = dataclasses.field(default=0, init=False)
    num_updates: int = dataclasses.field(default=0, init=False)

    def __post_init__(self):
        for name in ("num_envs", "num_steps", "num_minibatches", "update_epochs", "total_steps"):
            if getattr(self, name) <= 0:
                raise LoupeError(f"{name} must be positive, got {getattr(self, name)}")
        if self.lr <= 0 or self.clip_coef <= 0 or self.adam_eps <= 0:
            raise LoupeError("lr, clip_coef and adam_eps must be positive")
        if not (0 < self.gamma <= 1 and 0 <= self.gae_lambda <= 1):
            raise LoupeError("gamma must be in (0, 1] and gae_lambda in [0, 1]")
        if min(self.vf_coef, self.ent_coef, self.attn_coef, self.max_grad_norm) < 0:
            raise LoupeError("vf_coef, ent_coef, attn_coef and max_grad_norm must be >= 0")
        self.batch_size = self.num_envs * self.num_steps
        if self.batch_size % self.num_minibatches:
            raise LoupeError(
                f"batch of {self.num_envs} envs x {self.num_steps} steps = {self.batch_size} does "
                f"not split into {self.num_minibatches} minibatches"
            )
        self.minibatch_size = self.batch_size // self.num_minibatches
        self.num_updates = max(1, -(-self.total_steps // self.batch_size))

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> PPOConfig:
        if name not in PRESETS:
            raise LoupeError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
        fields = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise LoupeError(f"unknown PPO setting(s) {', '.join(unknown)}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS: dict[str, dict[str, Any]] = {
    # openai/train-procgen: IMPALA CNN, 64 envs x 256 steps, 8 minibatches, 3 epochs
    "procgen": dict(
        lr=5e-4, anneal_lr=False, gamma=0.999, gae_lambda=0.95, num_envs=64, num_steps=256,
        num_minibatches=8, update_epochs=3, clip_coef=0.2, anneal_clip=False, clip_vloss=True,
        vf_coef=0.5, ent_coef=0.01, max_grad_norm=0.5, normalize_rewards=True,
        total_steps=25_000_000,
    ),
    # Nikulin et al. 2019 (region-sensitive attention on Atari)
    "atari-nikulin": dict(
        lr=2.5e-4, anneal_lr=True, gamma=0.99, gae_lambda=0.95, num_envs=8, num_steps=128,
        num_minibatches=4, update_epochs=4, clip_coef=0.2, anneal_clip=False, clip_vloss=True,
        vf_coef=0.5, ent_coef=0.01, max_grad_norm=0.5, total_steps=10_000_000,
    ),
    # Sun et al. (self-attention modules): minibatch 256 of 16 x 128 -> 8 minibatches
    "atari-sun": dict(
        lr=2.5e-4, anneal_lr=True, gamma=0.99, gae_lambda=0.95, num_envs=16, num_steps=128,
        num_minibatches=8, update_epochs=3, clip_coef=0.1, anneal_clip=True, clip_vloss=False,
        vf_coef=1.0, ent_coef=0.01, max_grad_norm=0.5, total_steps=10_000_000,
    ),
}  # fmt: skip
