"""PPO settings and the presets that reproduce the seed papers' settings by name.

cfg = PPOConfig.preset("atari-nikulin", attn_coef=0.001, total_steps=10_000_000)
cfg.batch_size, cfg.minibatch_size, cfg.num_updates   # derived in __post_init__
"""

from __future__ import annotations

import dataclasses
from typing import Any

from loupe.errors import LoupeError


@dataclasses.dataclass
class PPOConfig:
    """Clipped PPO with GAE. Derived sizes are filled in by ``__post_init__``."""

    #: Adam learning rate (the start value when annealed)
    lr: float = 2.5e-4
    #: anneal the learning rate linearly towards 0 over ``num_updates``
    anneal_lr: bool = True
    #: discount of the return
    gamma: float = 0.99
    #: GAE lambda
    gae_lambda: float = 0.95
    #: environments stepped together, over all actors
    num_envs: int = 8
    #: steps per environment per update
    num_steps: int = 128
    #: minibatches per epoch (the batch must split evenly)
    num_minibatches: int = 4
    #: passes over each batch
    update_epochs: int = 4
    #: surrogate (and value) clipping range (the start value when annealed)
    clip_coef: float = 0.2
    #: anneal the clipping range linearly towards 0 over ``num_updates``
    anneal_clip: bool = False
    #: clip the value loss around the behaviour values: 0.5 * max(unclipped, clipped) squared error
    clip_vloss: bool = True
    #: value loss coefficient
    vf_coef: float = 0.5
    #: entropy bonus coefficient
    ent_coef: float = 0.01
    #: attention entropy coefficient: loss += attn_coef * mean summed attention entropy (METHODS A)
    attn_coef: float = 0.0
    #: normalise advantages per minibatch (mean 0, std 1)
    norm_adv: bool = True
    #: global gradient-norm clipping
    max_grad_norm: float = 0.5
    #: Adam epsilon
    adam_eps: float = 1e-5
    #: divide rewards by a running std of each env's discounted return (procgen)
    normalize_rewards: bool = False
    #: discount of the return whose std scales the rewards; None uses ``gamma``
    reward_norm_gamma: float | None = None
    #: scaled rewards are clipped to [-reward_clip, reward_clip] (0: no clipping)
    reward_clip: float = 10.0
    #: environment steps in all (sets ``num_updates`` and so the annealing schedules)
    total_steps: int = 10_000_000
    #: the policy the clipped ratio is taken against. "behaviour": classic PPO, the policy that
    #: sampled the batch. "learner": decoupled PPO (Hilton et al. 2021): the learner's weights at
    #: the start of the update, with importance weights pi_learner / pi_behaviour on the surrogate,
    #: so a batch sampled with stale weights (policy lag >= 1) gets the full trust region. The two
    #: agree when the batch was sampled with the learner's own weights (lag 0). "auto": "learner"
    #: for a batch sampled by older weights than the learner's, else "behaviour".
    proximal: str = "auto"
    #: arithmetic of the update's forward and backward passes: "fp32", "bf16" (autocast to
    #: bfloat16; the loss, optimiser and master weights stay float32; refused on a CPU without
    #: AVX512-BF16/AMX), or "auto": bf16 where it was measured to pay (the IMPALA and the
    #: interpretable CNN on a CPU with native bf16: ``learner.ppo.BF16_PAYS``), else fp32
    precision: str = "auto"
    #: samples per forward/backward pass: each minibatch is processed in micro-batches of this
    #: size with gradients accumulated (advantages normalised over the whole minibatch), so the
    #: Adam step equals the unchunked one to float tolerance; 0 processes the minibatch at once
    #: (the default: with malloc_tuning, chunks of 256 or 512 cost more CPU per sample on a
    #: 2-core CPU for the IMPALA and the interpretable CNN, bench/profile.md)
    micro_batch: int = 0
    #: run the update's convolutions in channels-last memory format: True, False, or None
    #: ("auto"): on for the policies where it was measured to pay on a CPU
    #: (``learner.ppo.CHANNELS_LAST_PAYS``), else off
    channels_last: bool | None = None
    #: torch.compile the policy for the update: 5-14% less CPU per sample for the interpretable
    #: CNN (bf16, channels-last) after a compile of 35-80 s at each start (bench/profile.md); off
    #: by default (short runs and tests never earn the compile back)
    compile: bool = False
    #: gather each minibatch into buffers allocated once per batch (no per-minibatch allocation)
    reuse_buffers: bool = True
    #: at learner start, keep freed memory in the glibc heap (mallopt: no mmap for large blocks,
    #: no trimming) so big activations do not page-fault afresh every minibatch
    malloc_tuning: bool = True
    #: torch intra-op threads for the learner (0: leave torch's setting)
    num_threads: int = 0
    #: seed of the minibatch order (and, by the trainer, of torch and numpy)
    seed: int = 1
    # -- derived --------------------------------------------------------------------------------
    #: num_envs * num_steps
    batch_size: int = dataclasses.field(default=0, init=False)
    #: batch_size // num_minibatches
    minibatch_size: int = dataclasses.field(default=0, init=False)
    #: updates to reach total_steps (rounded up)
    num_updates: int = dataclasses.field(default=0, init=False)

    def __post_init__(self) -> None:
        self.check_ranges()
        self.batch_size = self.num_envs * self.num_steps
        if self.batch_size % self.num_minibatches:
            raise LoupeError(
                f"batch of {self.num_envs} envs x {self.num_steps} steps = {self.batch_size} does "
                f"not split into {self.num_minibatches} minibatches; change num_minibatches"
            )
        self.minibatch_size = self.batch_size // self.num_minibatches
        self.num_updates = max(1, -(-self.total_steps // self.batch_size))

    def check_ranges(self) -> None:
        """Refuse out-of-range settings in one line (also after a setting is changed in place)."""
        for name in ("num_envs", "num_steps", "num_minibatches", "update_epochs", "total_steps"):
            if getattr(self, name) <= 0:
                raise LoupeError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("lr", "clip_coef", "adam_eps"):
            if getattr(self, name) <= 0:
                raise LoupeError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("vf_coef", "ent_coef", "attn_coef", "max_grad_norm", "reward_clip"):
            if getattr(self, name) < 0:
                raise LoupeError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.gamma <= 1:
            raise LoupeError(f"gamma must be in (0, 1], got {self.gamma}")
        if self.proximal not in ("auto", "behaviour", "learner"):
            raise LoupeError(
                f"proximal must be 'auto', 'behaviour' or 'learner', got {self.proximal!r}"
            )
        if self.precision not in ("auto", "fp32", "bf16"):
            raise LoupeError(f"precision must be 'auto', 'fp32' or 'bf16', got {self.precision!r}")
        if self.channels_last not in (True, False, None):
            raise LoupeError(
                f"channels_last must be true, false or null (auto), got {self.channels_last!r}"
            )
        if self.micro_batch < 0 or self.num_threads < 0:
            raise LoupeError("micro_batch and num_threads must be >= 0 (0: off / torch default)")
        if not 0 <= self.gae_lambda <= 1:
            raise LoupeError(f"gae_lambda must be in [0, 1], got {self.gae_lambda}")
        if self.reward_norm_gamma is not None and not 0 < self.reward_norm_gamma <= 1:
            raise LoupeError(f"reward_norm_gamma must be in (0, 1], got {self.reward_norm_gamma}")

    @property
    def reward_gamma(self) -> float:
        """The discount the reward normaliser uses."""
        return self.gamma if self.reward_norm_gamma is None else self.reward_norm_gamma

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> PPOConfig:
        """The named preset with ``overrides`` applied; unknown names and settings are refused."""
        if name not in PRESETS:
            raise LoupeError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
        fields = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise LoupeError(
                f"unknown PPO setting(s) {', '.join(unknown)}; settings: {', '.join(sorted(fields))}"
            )
        return cls(**{**PRESETS[name], **overrides})


PRESETS: dict[str, dict[str, Any]] = {
    # openai/train-procgen: constant lr and clip range, clipped value loss; rewards scaled by the
    # std of a 0.99-discounted return and clipped at 10 (the reward normaliser's defaults there)
    "procgen": dict(
        lr=5e-4, anneal_lr=False, gamma=0.999, gae_lambda=0.95, num_envs=64, num_steps=256,
        num_minibatches=8, update_epochs=3, clip_coef=0.2, anneal_clip=False, clip_vloss=True,
        vf_coef=0.5, ent_coef=0.01, max_grad_norm=0.5, normalize_rewards=True,
        reward_norm_gamma=0.99, reward_clip=10.0, total_steps=25_000_000,
    ),
    # Nikulin et al. 2019 (region-sensitive attention on Atari), METHODS A
    "atari-nikulin": dict(
        lr=2.5e-4, anneal_lr=True, gamma=0.99, gae_lambda=0.95, num_envs=8, num_steps=128,
        num_minibatches=4, update_epochs=4, clip_coef=0.2, anneal_clip=False, clip_vloss=True,
        vf_coef=0.5, ent_coef=0.01, max_grad_norm=0.5, total_steps=10_000_000,
    ),
    # Sun et al. (self-attention modules), METHODS B: minibatch 256 of 16 x 128 -> 8 minibatches
    "atari-sun": dict(
        lr=2.5e-4, anneal_lr=True, gamma=0.99, gae_lambda=0.95, num_envs=16, num_steps=128,
        num_minibatches=8, update_epochs=3, clip_coef=0.1, anneal_clip=True, clip_vloss=False,
        vf_coef=1.0, ent_coef=0.01, max_grad_norm=0.5, total_steps=10_000_000,
    ),
}  # fmt: skip
