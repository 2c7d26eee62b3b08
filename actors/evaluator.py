"""LevelEvaluator: plays given procgen level seeds with a policy, one episode per level.

Each slot holds a single-level environment (``num_levels=1, start_level=seed``), so every level seed
is played exactly once and results do not depend on how levels are spread over slots or workers:
actions are sampled with a generator seeded by (evaluation seed, level seed). Inference is batched
over the slots. A plain class; ``loupe.distributed.evaluate`` runs several of them as Ray actors.

Levels that do not end complete keep their action sequence (``LevelResult.actions``, the policy's
action indices as base64 bytes), and ``replay_level`` plays it again from the level seed alone:
a procgen level with ``num_levels=1`` is a function of its seed and the actions taken (the game's
random generator is seeded with the level seed at every reset), so the replay ends the same way.
"""

from __future__ import annotations

import base64
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
    #: the policy's actions, base64 of one byte each, for levels that did not end complete (and
    #: for every level with record_actions "all"); None when not recorded
    actions: str | None = None


def encode_actions(actions) -> str:
    """Action indices (each 0..255) -> base64 text of one byte per action."""
    a = np.asarray(actions, dtype=np.int64)
    if a.size and (a.min() < 0 or a.max() > 255):
        raise ValueError("actions must be in 0..255 to be recorded as bytes")
    return base64.b64encode(a.astype(np.uint8).tobytes()).decode("ascii")


def decode_actions(text: str) -> np.ndarray:
    """``encode_actions`` text -> (T,) int64 action indices."""
    from loupe.errors import LoupeError

    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise LoupeError("a level's recorded actions are not base64 text") from None
    return np.frombuffer(raw, dtype=np.uint8).astype(np.int64)


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
    #: keep the action sequence of "failed" levels (failure or timeout), "all" levels or "none"
    record_actions: str = "failed"

    def __post_init__(self):
        from loupe.errors import LoupeError

        if self.slots <= 0:
            raise LoupeError("evaluator slots must be positive")
        if self.action_set not in ("full", "article"):
            raise LoupeError(f"action_set must be 'full' or 'article', not {self.action_set!r}")
        if self.actions not in ("sample", "argmax"):
            raise LoupeError(f"actions must be 'sample' or 'argmax', not {self.actions!r}")
        if self.record_actions not in ("failed", "all", "none"):
            raise LoupeError(
                f"record_actions must be 'failed', 'all' or 'none', not {self.record_actions!r}"
            )
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
    def __init__(self, level: int, env, rng: np.random.Generator | None):
        self.level, self.env, self.rng = level, env, rng
        self.ret, self.length = 0.0, 0
        self.pre_state: bytes | None = None
        self.actions: list[int] = []


def procgen_kwargs(config: EvaluatorConfig) -> dict[str, Any]:
    """The procgen options an evaluator plays with (distribution_mode hard unless given)."""
    opts = dict(config.env_options)
    opts.setdefault("distribution_mode", "hard")
    return opts


def make_level_env(config: EvaluatorConfig, level: int):
    """A procgen env of one level: ``num_levels=1, start_level=level`` and the config's options."""
    from actors.procgen_env import gym3_env

    env = gym3_env(
        num=1,
        env_name=config.game,
        num_levels=1,
        start_level=int(level),
        num_threads=0,
        **procgen_kwargs(config),
    )
    if config.invisible:
        from actors.invisible import InvisibleHazards

        env = InvisibleHazards(env, config.invisible)
    return env


def observe_frame(env) -> np.ndarray:
    """The env's current observation -> (3, 64, 64) uint8."""
    return np.ascontiguousarray(env.observe()[1]["rgb"][0].transpose(2, 0, 1))


def step_slot(slot: _Slot, action: int, config: EvaluatorConfig, action_map, classifier):
    """One step of a slot with the policy's ``action`` -> None, or the LevelResult when the
    episode ended with it."""
    slot.actions.append(int(action))
    if action_map is not None:
        action = int(action_map[action])  # the policy's index -> procgen's action
    if classifier is not None:
        slot.pre_state = slot.env.callmethod("get_state")[0]
    slot.env.act(np.array([action]))
    reward, _, first = slot.env.observe()
    slot.ret += float(reward[0])
    slot.length += 1
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
        if classifier is not None and slot.pre_state is not None:
            cause = classifier.classify(slot.pre_state, action)
    keep = config.record_actions == "all" or (
        config.record_actions == "failed" and outcome != "complete"
    )
    return LevelResult(slot.level, outcome, cause, slot.ret, slot.length,
                       encode_actions(slot.actions) if keep else None)  # fmt: skip


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
        return procgen_kwargs(self.config)

    def _open(self, level: int) -> _Slot:
        rng = np.random.default_rng([self.config.seed, int(level)])
        return _Slot(level, make_level_env(self.config, level), rng)

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
        self.steps += 1
        return step_slot(slot, action, self.config, self.action_map, self.classifier)


@dataclasses.dataclass
class Replay:
    """A level played again from its seed and recorded actions."""

    #: how the replay ended (outcome, cause, return, length); outcome None: the actions ran out
    #: before the episode ended
    result: LevelResult
    #: (T, 3, 64, 64) uint8: obs[t] is the frame action t was taken on
    obs: np.ndarray
    #: (T,) float32 reward of each step
    rewards: np.ndarray
    #: (T,) int64 the policy's actions that were played
    actions: np.ndarray


def replay_level(config: EvaluatorConfig, level: int, actions) -> Replay:
    """Play ``level`` again with recorded ``actions`` (the policy's indices, or ``encode_actions``
    text) under ``config`` (the evaluation's options, action set, invisible hazards, causes)."""
    from actors.procgen_env import ARTICLE_ACTIONS

    if isinstance(actions, str):
        actions = decode_actions(actions)
    actions = np.asarray(actions, dtype=np.int64)
    action_map = np.array(ARTICLE_ACTIONS) if config.action_set == "article" else None
    classifier = None
    if config.causes:
        from actors.failure import FailureClassifier

        classifier = FailureClassifier(**procgen_kwargs(config))
    slot = _Slot(level, make_level_env(config, level), None)
    frames, rewards = [], []
    result = None
    try:
        for action in actions:
            frames.append(observe_frame(slot.env))
            before = slot.ret
            result = step_slot(slot, int(action), config, action_map, classifier)
            rewards.append(slot.ret - before)
            if result is not None:
                break
    finally:
        close = getattr(slot.env, "close", None)
        if close is not None:
            close()
    if result is None:
        result = LevelResult(level, None, None, slot.ret, slot.length)  # type: ignore[arg-type]
    result.actions = encode_actions(slot.actions)
    return Replay(result, np.stack(frames) if frames else np.zeros((0, 3, 64, 64), np.uint8),
                  np.array(rewards, np.float32), np.array(slot.actions, np.int64))  # fmt: skip


def sequential_levels_per_s(
    policy_spec: dict[str, Any], weights: dict[str, Any], config: EvaluatorConfig, levels: list[int]
) -> float:
    """The baseline: one environment, one level after another, one observation per forward pass."""
    single = dataclasses.replace(config, slots=1)
    evaluator = LevelEvaluator(policy_spec, weights, single)
    t0 = time.perf_counter()
    evaluator.evaluate(levels)
    return len(levels) / (time.perf_counter() - t0)
