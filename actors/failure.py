"""Why did the CoinRun agent die? Classification by state replay with hazard ablation.

On a failed step, the state from before the step is loaded into a side environment with one hazard
group removed (all saws, the enemies moving left, the enemies moving right, or lava turned to space)
and the same action is replayed. The single group whose removal avoids the death is the cause; if
no single removal avoids it (or more than one does) the cause is ``"multiple"``. procgen restores
its RNGs with the state, so a replay of the unmodified state reproduces the step exactly.

Enemy groups (``enemy_group``): an enemy with ``vx > 0`` is in ``enemy_right``, every other enemy
in ``enemy_left``, so the two groups split all enemies. This is procgen's own split: every step
CoinRun mirrors an enemy's sprite to face right exactly when ``vx > 0`` (``games/coinrun.cpp``:
``ent->is_reflected = ent->vx > 0``), so an enemy standing still (``vx == 0`` or ``-0.0``) looks
like a left-moving one in every frame the agent sees. procgen multiplies an entity's ``vx`` by the
share of a step's sub-steps that were not blocked (a bounce off a blocking wall cell costs an enemy
a quarter of its speed: 0.15, 0.1125, 0.084 ... in real states); a step with every sub-step
blocked leaves ``vx == 0`` for good, since a bounce only negates it.

    classifier = FailureClassifier(FailureConfig(env_options={"distribution_mode": "hard"}))
    tracker = OutcomeTracker(env, classifier)      # env: procgen.ProcgenGym3Env("coinrun", ...)
    for _ in range(steps):
        _, obs, _ = env.observe()
        for outcome in tracker.step(policy(obs)):  # act + observe, one EpisodeOutcome per episode
            print(outcome.outcome, outcome.cause)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from actors.coinrun_state import ENEMY, LAVA, SAW, SPACE, CoinRunState, Entity
from loupe.errors import LoupeError

#: the causes ``FailureClassifier.classify`` returns
CAUSES = ("saw", "enemy_left", "enemy_right", "lava", "multiple")

#: procgen's action count; actions are procgen action indices (7 = RIGHT, 8 = RIGHT+UP ...)
N_PROCGEN_ACTIONS = 15


def _remove_saws(state: CoinRunState) -> int:
    return state.remove_entities(lambda e: e.type == SAW)


def enemy_group(enemy: Entity) -> str:
    """``"enemy_right"`` if the enemy moves right (``vx > 0``), else ``"enemy_left"``.

    A still enemy (``vx == 0``) is drawn exactly like a left-moving one (procgen mirrors the
    sprite only when ``vx > 0``), so it belongs to ``enemy_left``.
    """
    return "enemy_right" if enemy.vx > 0 else "enemy_left"


def _remove_left_enemies(state: CoinRunState) -> int:
    return state.remove_entities(lambda e: e.type == ENEMY and enemy_group(e) == "enemy_left")


def _remove_right_enemies(state: CoinRunState) -> int:
    return state.remove_entities(lambda e: e.type == ENEMY and enemy_group(e) == "enemy_right")


def _lava_to_space(state: CoinRunState) -> int:
    return state.set_grid_cells(LAVA, SPACE)


#: hazard group -> an edit that removes it from a state in place and returns how much it removed
HAZARD_GROUPS: dict[str, Callable[[CoinRunState], int]] = {
    "saw": _remove_saws,
    "enemy_left": _remove_left_enemies,
    "enemy_right": _remove_right_enemies,
    "lava": _lava_to_space,
}


@dataclasses.dataclass
class FailureConfig:
    """Options of the side environment that replays failed steps."""

    #: procgen options of the side env (distribution_mode, use_backgrounds, num_levels ...); a
    #: loaded state brings its own level, options and RNGs, so these only shape the env before
    #: the first load
    env_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: replay the unmodified step first and refuse a state/action pair that does not die
    verify: bool = True

    def __post_init__(self):
        if "env_name" in self.env_options or "num" in self.env_options:
            raise LoupeError("FailureConfig.env_options must not set env_name or num")


@dataclasses.dataclass
class StepResult:
    """What one replayed step did."""

    #: the episode ended with this step
    done: bool
    #: it ended by reaching the coin
    complete: bool
    #: it ended at the time limit
    timeout: bool

    @property
    def failed(self) -> bool:
        """The agent died: the episode ended without the coin and before the time limit."""
        return self.done and not self.complete and not self.timeout


@dataclasses.dataclass
class FailureAnalysis:
    """The verdict on one failed step."""

    #: one of CAUSES
    cause: str
    #: hazard groups whose removal alone avoided the death
    avoided_by: tuple[str, ...]
    #: hazard groups present in the state (the only ones replayed)
    present: tuple[str, ...]


class FailureClassifier:
    """Owns a one-env CoinRun side environment and classifies failed steps by replay."""

    def __init__(self, config: FailureConfig | None = None, **env_options: Any):
        """``FailureClassifier(cfg)`` or ``FailureClassifier(distribution_mode="hard", ...)``."""
        if config is None:
            config = FailureConfig(env_options=dict(env_options))
        elif env_options:
            raise LoupeError(
                "pass procgen options either in FailureConfig or as keywords, not both"
            )
        from actors.procgen_env import gym3_env

        self.config = config
        options = {"num_levels": 1, "start_level": 0, "num_threads": 0, **config.env_options}
        self.env = gym3_env(num=1, env_name="coinrun", **options)
        self.replays = 0

    def replay(self, state: bytes, action: int) -> StepResult:
        """Load ``state`` in the side env, take procgen ``action`` once -> what happened."""
        return self._replay(state, action, CoinRunState.parse(state))

    def _replay(self, state: bytes, action: int, parsed: CoinRunState) -> StepResult:
        if not 0 <= int(action) < N_PROCGEN_ACTIONS:
            raise LoupeError(f"action {action} is not a procgen action (0..14)")
        self.env.callmethod("set_state", [state])
        self.env.act(np.array([int(action)], dtype=np.int32))
        _, _, first = self.env.observe()
        info = self.env.get_info()[0]
        self.replays += 1
        return StepResult(
            done=bool(first[0]),
            complete=bool(info.get("prev_level_complete", 0)),
            timeout=parsed.cur_time + 1 >= parsed.timeout,
        )

    def analyse(self, pre_state: bytes, action: int) -> FailureAnalysis:
        """Classify the death caused by taking ``action`` in ``pre_state`` (state bytes)."""
        parsed = CoinRunState.parse(pre_state)
        if self.config.verify and not self._replay(pre_state, action, parsed).failed:
            raise LoupeError(
                "replaying the state with the action does not end in a failure; pass the state "
                "from just before the failed step and the procgen action taken there"
            )
        present, avoided = [], []
        for name, remove in HAZARD_GROUPS.items():
            edited = parsed.copy()
            if remove(edited) == 0:
                continue  # group absent: removing it cannot change the outcome
            present.append(name)
            if not self._replay(edited.to_bytes(), action, edited).failed:
                avoided.append(name)
        cause = avoided[0] if len(avoided) == 1 else "multiple"
        return FailureAnalysis(cause, tuple(avoided), tuple(present))

    def classify(self, pre_state: bytes, action: int) -> str:
        """The cause of the death: one of "saw", "enemy_left", "enemy_right", "lava", "multiple"."""
        return self.analyse(pre_state, action).cause

    def close(self) -> None:
        self.env = None


@dataclasses.dataclass
class EpisodeOutcome:
    """How one episode of a tracked env ended."""

    env_index: int
    #: "complete", "timeout" or "failure"
    outcome: str
    #: cause of a failure (one of CAUSES) when a classifier is set, else None
    cause: str | None
    #: sum of rewards
    ret: float
    #: steps in the episode
    length: int
    #: procgen level seed of the episode
    level_seed: int


class OutcomeTracker:
    """Steps a procgen CoinRun gym3 env and reports how each episode ends.

    With a classifier it keeps each env's state from before the latest step (one ~37 KB state per
    env, overwritten every step) and classifies failures from it. Episode lengths count from the
    tracker's first step, so create it on a fresh env; ``timeout`` is procgen's episode limit.
    """

    def __init__(self, env, classifier: FailureClassifier | None = None, timeout: int = 1000):
        self.env = env
        self.classifier = classifier
        self.timeout = timeout
        self.num = int(env.num)
        self.returns = np.zeros(self.num, dtype=np.float64)
        self.lengths = np.zeros(self.num, dtype=np.int64)
        self.pre_states: list[bytes] | None = None
        self._seeds = self._level_seeds()

    def _level_seeds(self) -> np.ndarray:
        return np.array([i.get("level_seed", -1) for i in self.env.get_info()], dtype=np.int64)

    def step(self, actions) -> list[EpisodeOutcome]:
        """``env.act(actions)`` and ``env.observe()`` -> outcomes of the episodes that ended."""
        actions = np.asarray(actions, dtype=np.int32).reshape(self.num)  # (N,) procgen actions
        if self.classifier is not None:
            self.pre_states = self.env.callmethod("get_state")
        self.env.act(actions)
        reward, _, first = self.env.observe()
        infos = self.env.get_info()
        self.returns += reward
        self.lengths += 1
        outcomes = [self._finish(int(i), infos[i], int(actions[i])) for i in np.flatnonzero(first)]
        self._seeds = np.array([i.get("level_seed", -1) for i in infos], dtype=np.int64)
        return outcomes

    def _timed_out(self, i: int) -> bool:
        if self.pre_states is None:
            return bool(self.lengths[i] >= self.timeout)
        state = CoinRunState.parse(self.pre_states[i])  # exact even if tracking began mid-episode
        return state.cur_time + 1 >= state.timeout

    def _finish(self, i: int, info: dict, action: int) -> EpisodeOutcome:
        cause = None
        if info.get("prev_level_complete", 0):
            outcome = "complete"
        elif self._timed_out(i):
            outcome = "timeout"
        else:
            outcome = "failure"
            if self.classifier is not None and self.pre_states is not None:
                cause = self.classifier.classify(self.pre_states[i], action)
        seed = int(info.get("prev_level_seed", self._seeds[i]))
        result = EpisodeOutcome(
            i, outcome, cause, float(self.returns[i]), int(self.lengths[i]), seed
        )
        self.returns[i] = 0.0
        self.lengths[i] = 0
        return result
