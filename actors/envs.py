"""Vector environments for Atari (ale-py) and procgen, behind one small interface.

    env = make_vec_env(EnvConfig("procgen:coinrun", num_envs=8, seed=0, options={"num_levels": 200}))
    obs = env.reset()                                  # (N, C, H, W) uint8
    obs, reward, done, episodes = env.step(actions)    # actions (N,) int64; auto-reset inside step
    env.close()

``done[i]`` means env i's episode ended with this step; ``obs[i]`` is then already the first
observation of the next episode. ``episodes`` holds an ``EpisodeRecord`` per episode that ended.

An environment id names its family: ``ALE/<Game>-v5`` or ``procgen:<game>``.
``list_env_families()`` and ``list_games(family)`` say what exists. Each family lives in its own
module (``actors.atari``, ``actors.procgen_env``) that provides ``list_games()``,
``resolve_game(name, env_id)``, ``check_config(cfg)`` and the ``VecEnv`` class ``VEC_ENV``.
"""

from __future__ import annotations

import abc
import dataclasses
import difflib
import importlib
import time
from types import ModuleType
from typing import Any

import numpy as np

from loupe.errors import LoupeError

#: family name -> (id prefix, example id, module with the family's games and vector env)
FAMILIES: dict[str, tuple[str, str, str]] = {
    "ALE": ("ALE/", "ALE/Breakout-v5", "actors.atari"),
    "procgen": ("procgen:", "procgen:coinrun", "actors.procgen_env"),
}


def _family_module(family: str) -> ModuleType:
    return importlib.import_module(FAMILIES[family][2])


def _option(family: str, default: Any) -> Any:
    """A typed option field that only applies to ``family``'s environments."""
    return dataclasses.field(default=default, metadata={"family": family})


@dataclasses.dataclass(frozen=True)
class EpisodeRecord:
    """One finished episode of one environment."""

    #: which environment of the vector env (0 .. N-1)
    env_index: int
    #: raw (unclipped) score of the whole episode; Atari: the whole game, even with episodic life
    ret: float
    #: agent steps in the episode (Atari: the whole game)
    length: int
    #: procgen: "complete", "timeout" or "failure"; Atari: None
    outcome: str | None = None
    #: procgen: the seed of the level the episode ended on; Atari: None
    level_seed: int | None = None


@dataclasses.dataclass
class EnvConfig:
    """Which environment and how to build it.

    Family options can be given as typed fields (``EnvConfig(id, num_levels=200)``) or in the
    ``options`` dict (``EnvConfig(id, options={"num_levels": 200})``); both end up in the typed
    fields and ``options`` is emptied, so that the typed fields are the one record (and
    ``dataclasses.replace`` works); ``changed_options()`` lists what differs from the defaults.
    Options of the other family must keep their defaults. ``family`` and ``game`` are derived.
    """

    #: "ALE/<Game>-v5" (e.g. ALE/Breakout-v5) or "procgen:<game>" (e.g. procgen:coinrun)
    env_id: str = "procgen:coinrun"
    #: environments stepped together
    num_envs: int = 8
    #: base seed: ALE env i is seeded with seed + i; procgen draws its levels from it
    seed: int = 0
    #: family options by name, moved into the typed fields below (then empty); unknown names are
    #: an error, and so is a name also given as a typed field with another value
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    # -- ALE -----------------------------------------------------------------------------------
    #: probability of repeating the previous action (v5 default 0.25; the seed papers used 0)
    sticky_actions: float = _option("ALE", 0.25)
    #: a life loss ends the learning episode (done); EpisodeRecord still covers the whole game
    episodic_life: bool = _option("ALE", False)
    #: training reward is sign(reward); EpisodeRecord.ret stays the raw game score
    clip_rewards: bool = _option("ALE", True)
    #: at most this many random no-op frames after each game reset
    noop_max: int = _option("ALE", 30)
    #: emulator frames per agent step (the last two max-pooled)
    frame_skip: int = _option("ALE", 4)
    #: 84x84 grayscale frames stacked as channels
    frame_stack: int = _option("ALE", 4)
    #: press FIRE after a reset in games that need it to start
    fire_reset: bool = _option("ALE", True)
    #: emulator frames after which a game is cut off (truncated; v5 default 108000 = 30 min)
    max_episode_frames: int = _option("ALE", 108_000)
    #: C++ threads of ale-py's vector env (0: one per usable CPU core, never more than num_envs)
    ale_threads: int = _option("ALE", 0)
    # -- procgen -------------------------------------------------------------------------------
    #: number of distinct levels (0: unbounded)
    num_levels: int = _option("procgen", 0)
    #: the lowest level seed
    start_level: int = _option("procgen", 0)
    #: "easy", "hard", "extreme", "memory" or "exploration" (not every game has every mode)
    distribution_mode: str = _option("procgen", "hard")
    #: a completed level is followed by the next seed in the same episode (a failure ends it)
    use_sequential_levels: bool = _option("procgen", False)
    #: paint the agent's velocity onto the frame
    paint_vel_info: bool = _option("procgen", False)
    #: draw background images
    use_backgrounds: bool = _option("procgen", True)
    #: a single theme per asset kind
    restrict_themes: bool = _option("procgen", False)
    #: monochrome rectangles instead of textured assets
    use_monochrome_assets: bool = _option("procgen", False)
    #: the camera follows the agent
    center_agent: bool = _option("procgen", True)
    #: procgen worker threads (0: step in the caller's thread; keep 0 inside Ray actors)
    num_threads: int = _option("procgen", 0)
    #: "full" (the 15 procgen actions) or "article" (CoinRun's 9 actions of Understanding RL Vision)
    action_set: str = _option("procgen", "full")

    def __post_init__(self) -> None:
        self._check_basics()
        self.family, self.game = parse_env_id(self.env_id)
        self._apply_options()
        self._check_foreign_defaults()
        self._check_option_types()
        _family_module(self.family).check_config(self)
        self.options = {}

    def _check_basics(self) -> None:
        if not isinstance(self.env_id, str):
            raise LoupeError(
                f"env_id must be a string such as procgen:coinrun, not {self.env_id!r}"
            )
        for name in ("num_envs", "seed"):
            if not _is_int(getattr(self, name)):
                raise LoupeError(f"{name} must be an integer, got {getattr(self, name)!r}")
        if self.num_envs <= 0:
            raise LoupeError(f"num_envs must be positive, got {self.num_envs}")
        if not 0 <= self.seed < 2**31:
            raise LoupeError(f"seed must be in [0, 2**31), got {self.seed}")
        if not isinstance(self.options, dict):
            raise LoupeError(
                f"options must be a dict of option names to values, not {self.options!r}"
            )

    def _apply_options(self) -> None:
        """Move ``options`` into the typed fields; unknown names and conflicts are errors."""
        mine = {f.name: f for f in option_fields(self.family)}
        for name, value in self.options.items():
            if name not in mine:
                raise LoupeError(_unknown_option_message(name, self.family))
            current, default = getattr(self, name), mine[name].default
            if current != default and current != value:
                raise LoupeError(
                    f"option {name} given twice with different values ({current!r} and {value!r}); "
                    "give it once"
                )
            setattr(self, name, value)

    def _check_foreign_defaults(self) -> None:
        wrong = [
            f.name
            for f in dataclasses.fields(self)
            if f.metadata.get("family") not in (None, self.family)
            and getattr(self, f.name) != f.default
        ]
        if wrong:
            raise LoupeError(
                f"option(s) {', '.join(wrong)} do not apply to {self.family} environments "
                f"({self.env_id}); {self.family} options: {', '.join(option_names(self.family))}"
            )

    def _check_option_types(self) -> None:
        for f in option_fields(self.family):
            value = getattr(self, f.name)
            if not _same_kind(value, f.default):
                kind = _KIND_NAMES[type(f.default)]
                raise LoupeError(f"option {f.name} must be {kind}, got {value!r}")
            if isinstance(f.default, float):
                setattr(self, f.name, float(value))

    def changed_options(self) -> dict[str, Any]:
        """The family options that differ from their defaults, e.g. ``{"num_levels": 200}``."""
        return {
            f.name: getattr(self, f.name)
            for f in option_fields(self.family)
            if getattr(self, f.name) != f.default
        }

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the init fields (``family`` and ``game`` are derived), with the
        options of this config's own family only: the other family's are always at their defaults
        (``EnvConfig(**d)`` fills them in again, and a dict that lists them still loads)."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.init and f.metadata.get("family") in (None, self.family)
        } | {"options": dict(self.options)}


_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _same_kind(value: Any, default: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, (bool, np.bool_))
    if isinstance(default, int):
        return _is_int(value)
    if isinstance(default, float):
        return _is_int(value) or isinstance(value, (float, np.floating))
    return isinstance(value, type(default))


def option_fields(family: str) -> list[dataclasses.Field]:
    """The typed EnvConfig fields that apply to ``family``."""
    return [f for f in dataclasses.fields(EnvConfig) if f.metadata.get("family") == family]


def option_names(family: str) -> list[str]:
    """Names of the options of ``family`` (ALE or procgen)."""
    return [f.name for f in option_fields(family)]


def _unknown_option_message(name: str, family: str) -> str:
    for other in FAMILIES:
        if other != family and name in option_names(other):
            return f"option {name} applies to {other} environments only, not {family}"
    close = difflib.get_close_matches(name, option_names(family), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return (
        f"unknown {family} option {name!r}{hint}; valid options: {', '.join(option_names(family))}"
    )


# -- ids, families and games ---------------------------------------------------------------------
def list_env_families() -> list[str]:
    """The environment families: ``["ALE", "procgen"]``."""
    return list(FAMILIES)


def list_games(family: str) -> list[str]:
    """Game names of ``family``, as they appear in ids: ``ALE/<name>-v5``, ``procgen:<name>``."""
    if family not in FAMILIES:
        raise LoupeError(
            f"unknown environment family {family!r}; families: {', '.join(FAMILIES)} "
            "(list_env_families())"
        )
    return list(_family_module(family).list_games())


def parse_env_id(env_id: str) -> tuple[str, str]:
    """-> (family, backend game name): 'ALE/Breakout-v5' -> ('ALE', 'breakout')."""
    for family, (prefix, _, _) in FAMILIES.items():
        if env_id.startswith(prefix):
            return family, _family_module(family).resolve_game(env_id[len(prefix) :], env_id)
    examples = ", ".join(f"{fam}: {ex}" for fam, (_, ex, _) in FAMILIES.items())
    raise LoupeError(
        f"unknown environment id {env_id!r}; families are {examples}; "
        "list_env_families() and list_games(family) (or `loupe envs`) list the games"
    )


def unknown_game_message(family: str, game: str, env_id: str, games: list[str]) -> str:
    """One line for a game ``family`` does not have, with the closest names."""
    lowered = {g.lower(): g for g in games}
    close = difflib.get_close_matches(game.lower(), list(lowered), n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(lowered[c] for c in close)}?)" if close else ""
    return (
        f"unknown {family} game {game!r} in {env_id!r}{hint}; list_games({family!r}) "
        f"(or `loupe envs`) lists the {len(games)} games"
    )


# -- vector envs ---------------------------------------------------------------------------------
class VecEnv(abc.ABC):
    """N environments stepped together; auto-reset happens inside ``step``.

        obs = env.reset()                                # (N, C, H, W) uint8
        obs, reward, done, episodes = env.step(actions)  # (N,) int64 actions in [0, n_actions)

    ``reward`` is (N,) float32 (the training reward), ``done`` (N,) bool, ``episodes`` a list of
    ``EpisodeRecord``. Observations may be strided views; copy them if you need contiguous memory.
    """

    #: (C, H, W) of one observation
    obs_shape: tuple[int, int, int]
    #: size of the discrete action space
    n_actions: int
    #: environments stepped together
    num_envs: int

    @abc.abstractmethod
    def reset(self) -> np.ndarray:
        """Start new episodes in every env -> observations (N, C, H, W) uint8."""

    @abc.abstractmethod
    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
        """-> (obs (N,C,H,W) uint8, reward (N,) f32, done (N,) bool, list[EpisodeRecord])."""

    @abc.abstractmethod
    def close(self) -> None:
        """Free the environments."""

    @abc.abstractmethod
    def _backend_step(self, actions: np.ndarray) -> Any:
        """One step of the underlying library without this adapter (for benchmarks)."""

    def level_seeds(self) -> np.ndarray:
        """(N,) int64 seed of the level each env is playing now; -1 where there are no levels."""
        return np.full(self.num_envs, -1, dtype=np.int64)

    def _check_actions(self, actions: Any) -> np.ndarray:
        a = np.asarray(actions)
        if a.shape != (self.num_envs,) or not np.issubdtype(a.dtype, np.integer):
            raise ValueError(
                f"expected ({self.num_envs},) integer actions, got {a.dtype} {a.shape}"
            )
        if a.size and (a.min() < 0 or a.max() >= self.n_actions):
            raise ValueError(f"actions must be in [0, {self.n_actions}), got {a}")
        return a

    def __enter__(self) -> VecEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_vec_env(config: EnvConfig) -> VecEnv:
    """Build the vector env of ``config``'s family."""
    return _family_module(config.family).VEC_ENV(config)


def measure_env_sps(
    config: EnvConfig, steps: int, *, backend: bool = False, warmup: int = 10, seed: int = 0
) -> float:
    """Environment steps per second (``steps * num_envs / seconds``) with random actions.

    ``backend=True`` times the underlying library's own step (ale-py's ``AtariVectorEnv.step``,
    procgen's ``act`` + ``observe``) instead of ``VecEnv.step``, to measure the adapter's cost.
    """
    if steps <= 0 or warmup < 0:
        raise LoupeError(f"steps must be positive and warmup >= 0, got {steps} and {warmup}")
    env = make_vec_env(config)
    try:
        rng = np.random.default_rng(seed)
        actions = rng.integers(0, env.n_actions, size=(warmup + steps, env.num_envs))
        env.reset()
        step = env._backend_step if backend else env.step
        for a in actions[:warmup]:
            step(a)
        t0 = time.perf_counter()
        for a in actions[warmup:]:
            step(a)
        elapsed = time.perf_counter() - t0
    finally:
        env.close()
    return steps * env.num_envs / elapsed
