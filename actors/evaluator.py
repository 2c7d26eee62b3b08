"""LevelEvaluator: plays given procgen level seeds with a policy, one episode per level.

Each slot holds a single-level environment (``num_levels=1, start_level=seed``), so every level seed
is played exactly once and results do not depend on how levels are spread over slots or workers:
actions are sampled with a generator seeded by (evaluation seed, level seed). Inference is batched
over the slots. A plain class; ``loupe.distributed.evaluate`` runs several of them as Ray actors.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

#: CoinRun's episode limit; an episode that reaches it without completing is a timeout
TIMEOUT_STEPS = 1000


@dataclasses.dataclass
class LevelResult:
    """Outcome of one level."""

    level: int
    #: "complete", "timeout" or "failure"
    outcome: str
    #: for failures with cause analysis: saw, enemy_left, enemy_right, lava, multiple
    cause: str | None
    ret: float
    length: int


@dataclasses.dataclass
class EvaluatorConfig:
    """How one evaluator plays its levels."""

    #: procgen game, e.g. "coinrun"
    game: str = "coinrun"
    #: procgen options other than the level (distribution_mode, use_backgrounds, ...)
    env_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: levels played at once (one single-level env each); inference is batched over them
    slots: int = 16
    #: classify what killed the agent on failures (CoinRun only)
    causes: bool = True
    #: base seed of the per-level action sampling
    seed: int = 0
    #: "sample" from the policy or take its "argmax"
    actions: str = "sample"
    #: torch threads inside the evaluator (0: torch default)
    torch_threads: int = 1
    #: the policy's action set: "full" (15 procgen actions) or "article" (9, mapped to procgen's)
    action_set: str = "full"
    #: hazard groups kept deadly but never drawn (``actors.invisible``: saw, enemy_left,
    #: enemy_right): the article's invisible-hazard control
    invisible: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        from loupe.errors import LoupeError

        if self.slots <= 0:
            raise LoupeError("evaluator slots must be positive")
        if self.action_set not in ("full", "article"):
            raise LoupeError(f"action_set must be 'full' or 'article', not {self.action_set!r}")
        if self.actions not in ("sample", "argmax"):
            raise LoupeError(f"actions must be 'sample' or 'argmax', not {self.actions!r}")
        if self.invisible:
            from actors.invisible import check_groups

            if self.game != "coinrun":
                raise LoupeError(f"invisible hazards exist in CoinRun only, not {self.game}")
            self.invisible = list(check_groups(self.invisible))
        if self.causes and self.game != "coinrun":
            raise LoupeError(
                f"failure causes are defined for CoinRun only, not {self.game}; "
                "pass --no-causes for plain success rates"
            )


class _Slot:
    def __init__(self, level: int, env, rng: np.random.Generator):
        self.level, self.env, self.rng = level, env, rng
        self.ret, self.length = 0.0, 0
        self.pre_state: bytes | None = None


class LevelEvaluator:
    """Plays level seeds with one policy and reports a LevelResult per level."""

    def __init__(
        self, policy_spec: dict[str, Any], weights: dict[str, Any], config: EvaluatorConfig
    ):
        from attention import build_policy

        self.config = config
        if config.torch_threads > 0:
            torch.set_num_threads(config.torch_threads)
        self.policy = build_policy(
            policy_spec["name"],
            tuple(policy_spec["obs_shape"]),
            int(policy_spec["n_actions"]),
            **policy_spec.get("options", {}),
        )
        self.policy.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()})
        self.policy.eval()
        from actors.procgen_env import ARTICLE_ACTIONS

        self.action_map = np.array(ARTICLE_ACTIONS) if config.action_set == "article" else None
        self.classifier = None
        if config.causes:
            from actors.failure import FailureClassifier

            self.classifier = FailureClassifier(**self._procgen_kwargs())
        self.steps = 0

    def _procgen_kwargs(self) -> dict[str, Any]:
        opts = dict(self.config.env_options)
        opts.setdefault("distribution_mode", "hard")
        return opts

    def _make_env(self, level: int):
        from actors.procgen_env import import_procgen

        ProcgenGym3Env = import_procgen().ProcgenGym3Env  # noqa: N806

        env = ProcgenGym3Env(
            num=1,
            env_name=self.config.game,
            num_levels=1,
            start_level=int(level),
            num_threads=0,
            **self._procgen_kwargs(),
        )
        if self.config.invisible:
            from actors.invisible import InvisibleHazards

            env = InvisibleHazards(env, self.config.invisible)
        return env

    def _open(self, level: int) -> _Slot:
        rng = np.random.default_rng([self.config.seed, int(level)])
        return _Slot(level, self._make_env(level), rng)

    @torch.no_grad()
    def _actions(self, slots: list[_Slot]) -> np.ndarray:
        obs = np.stack([s.env.observe()[1]["rgb"][0] for s in slots])  # (B, 64, 64, 3)
        obs = torch.from_numpy(obs).permute(0, 3, 1, 2).contiguous()  # (B, 3, 64, 64)
        probs = torch.softmax(self.policy(obs).logits.double(), dim=-1).numpy()
        if self.config.actions == "argmax":
            return probs.argmax(axis=1)
        u = np.array([s.rng.random() for s in slots])
        cdf = np.cumsum(probs, axis=1)
        return np.minimum((cdf < u[:, None]).sum(axis=1), probs.shape[1] - 1)

    def evaluate(
        self, levels: Iterable[int], on_result: Callable[[LevelResult], None] | None = None
    ) -> list[LevelResult]:
        """Play every level once -> results in completion order (``on_result`` sees each one)."""
        queue = list(levels)[::-1]
        slots: list[_Slot] = []
        results: list[LevelResult] = []
        while queue or slots:
            while queue and len(slots) < self.config.slots:
                slots.append(self._open(queue.pop()))
            actions = self._actions(slots)
            still: list[_Slot] = []
            for slot, action in zip(slots, actions):
                result = self._step(slot, int(action))
                if result is None:
                    still.append(slot)
                    continue
                results.append(result)
                if on_result is not None:
                    on_result(result)
            slots = still
        return results

    def _step(self, slot: _Slot, action: int) -> LevelResult | None:
        if self.action_map is not None:
            action = int(self.action_map[action])  # the policy's index -> procgen's action
        if self.classifier is not None:
            slot.pre_state = slot.env.callmethod("get_state")[0]
        slot.env.act(np.array([action]))
        reward, _, first = slot.env.observe()
        slot.ret += float(reward[0])
        slot.length += 1
        self.steps += 1
        if not first[0]:
            return None
        info = slot.env.get_info()[0]
        if info.get("prev_level_complete", 0) == 1:
            outcome, cause = "complete", None
        elif slot.length >= TIMEOUT_STEPS:
            outcome, cause = "timeout", None
        else:
            outcome = "failure"
            cause = None
            if self.classifier is not None and slot.pre_state is not None:
                cause = self.classifier.classify(slot.pre_state, action)
        return LevelResult(slot.level, outcome, cause, slot.ret, slot.length)


def sequential_levels_per_s(
    policy_spec: dict[str, Any], weights: dict[str, Any], config: EvaluatorConfig, levels: list[int]
) -> float:
    """The baseline: one environment, one level after another, one observation per forward pass."""
    single = dataclasses.replace(config, slots=1)
    evaluator = LevelEvaluator(policy_spec, weights, single)
    t0 = time.perf_counter()
    evaluator.evaluate(levels)
    return len(levels) / (time.perf_counter() - t0)
