"""procgen adapted to loupe's vector-env interface.

procgen speaks gym3: ``act(actions)`` then ``observe() -> (reward, obs, first)``, where ``first[i]``
after a step means env i's episode ended with that step and ``obs[i]`` is already the first frame
of the next level. ``get_info()`` gives per env ``prev_level_complete``, ``prev_level_seed`` and
``level_seed``. Outcome of an ended episode: "complete" when ``prev_level_complete == 1``,
"timeout" when it used the whole time limit of its level (read from the game's serialised state:
CoinRun 1000 steps, maze 500, bigfish 6000 ...), otherwise "failure".

With ``use_sequential_levels`` a completed level is followed by the next one in the same episode;
such episodes end in a failure or a timeout, and the time limit restarts with every level.
"""

from __future__ import annotations

import contextlib
import io
import struct
import sys
from typing import Any

import numpy as np

from actors.envs import EnvConfig, EpisodeRecord, VecEnv, unknown_game_message
from loupe.errors import LoupeError


def import_procgen():
    """The ``procgen`` module, imported without the deprecation notice of the old ``gym`` package.

    procgen imports ``gym`` (0.26), which prints a several-line notice to stderr on import; loupe
    uses only procgen's gym3 interface, so the notice is dropped. Anything else written to stderr
    during the import is passed on.
    """
    if "gym" not in sys.modules:
        captured = io.StringIO()
        # a missing gym is left for procgen's own import to report
        with contextlib.redirect_stderr(captured), contextlib.suppress(ImportError):
            import gym  # noqa: F401
        text = captured.getvalue()
        for notice in _gym_notices():
            text = text.replace(notice + "\n", "")
        if text:
            sys.stderr.write(text)
    import procgen

    return procgen


def unpin_library(env: Any) -> Any:
    """Let ``env``'s handle on the procgen library go when ``env`` goes -> ``env``.

    gym3 opens the library once per env through one cached cffi ``FFI``, which keeps every handle
    (and its function cache) in lists of its own for good: a process that makes an env per level,
    as the evaluator does, grows by ~10 kB per env forever. The first handle stays (the library is
    never unloaded and reloaded); later ones are dropped from the FFI's lists, so each lives as
    long as its env. A no-op on anything that is not a gym3 C env.
    """
    ffi, lib = getattr(env, "_ffi", None), getattr(env, "_c_lib", None)
    libraries, caches = getattr(ffi, "_libraries", None), getattr(ffi, "_function_caches", None)
    if lib is None or not isinstance(libraries, list) or not isinstance(caches, list):
        return env
    with ffi._lock:
        paired = len(libraries) == len(caches)
        for i in range(len(libraries) - 1, 0, -1):
            if libraries[i] is lib:
                del libraries[i]
                if paired:
                    del caches[i]
                break
    return env


def gym3_env(**kwargs: Any) -> Any:
    """``procgen.ProcgenGym3Env(**kwargs)`` whose library handle goes with it (``unpin_library``):
    every procgen env loupe makes comes from here."""
    return unpin_library(import_procgen().ProcgenGym3Env(**kwargs))


def _gym_notices() -> list[str]:
    try:
        from gym_notices.notices import notices
    except ImportError:
        return []
    return [n for n in notices.values() if n]


GAMES = (
    "bigfish", "bossfight", "caveflyer", "chaser", "climber", "coinrun", "dodgeball", "fruitbot",
    "heist", "jumper", "leaper", "maze", "miner", "ninja", "plunder", "starpilot",
)  # fmt: skip

#: distribution modes and the games that have them (procgen aborts the process on any other)
MODES: dict[str, frozenset[str] | None] = {
    "easy": None,  # every game
    "hard": None,
    "extreme": frozenset({"chaser", "dodgeball", "leaper", "starpilot"}),
    "memory": frozenset({"caveflyer", "dodgeball", "heist", "jumper", "maze", "miner"}),
    "exploration": frozenset(
        {"coinrun", "caveflyer", "leaper", "jumper", "maze", "heist", "climber", "ninja"}
    ),
}

#: procgen's 15 button combos, by action index
COMBOS = (
    ("LEFT", "DOWN"), ("LEFT",), ("LEFT", "UP"), ("DOWN",), (), ("UP",), ("RIGHT", "DOWN"),
    ("RIGHT",), ("RIGHT", "UP"), ("D",), ("A",), ("W",), ("S",), ("Q",), ("E",),
)  # fmt: skip

#: the 9 CoinRun actions of Understanding RL Vision, [(), R, L, U, R+U, L+U, D, A, B], as procgen
#: action indices. A and B did nothing in that CoinRun; indices 9-14 (special actions) do nothing
#: in procgen's CoinRun, so A -> 10 (the "A" key) and B -> 11.
ARTICLE_ACTIONS = (4, 7, 1, 5, 8, 2, 3, 10, 11)
ARTICLE_COMBOS = ((), ("RIGHT",), ("LEFT",), ("UP",), ("RIGHT", "UP"), ("LEFT", "UP"), ("DOWN",),
                  ("A",), ("B",))  # fmt: skip

#: serialisation version of procgen states this module reads, and the end-of-state marker
STATE_VERSION = 0
STATE_END = 0xCAFECAFE
#: the fields at the start of every procgen game state (procgen src/game.cpp, Game::serialize):
#: "i" int32, "f" float32, "s" string (int32 length + bytes)
_HEADER = (
    ("version", "i"), ("game_name", "s"),
    *((name, "i") for name in (
        "paint_vel_info", "use_generated_assets", "use_monochrome_assets", "restrict_themes",
        "use_backgrounds", "center_agent", "debug_mode", "distribution_mode",
        "use_sequential_levels", "use_easy_jump", "plain_assets", "physics_mode", "grid_step",
        "level_seed_low", "level_seed_high", "game_type", "game_n")),
    ("level_rng_seeded", "i"), ("level_rng_state", "s"), ("rng_seeded", "i"), ("rng_state", "s"),
    ("reward", "f"), ("done", "i"), ("level_complete", "i"), ("action", "i"), ("timeout", "i"),
    ("current_level_seed", "i"), ("prev_level_seed", "i"), ("episodes_remaining", "i"),
    ("episode_done", "i"), ("last_reward_timer", "i"), ("last_reward", "f"),
    ("default_action", "i"), ("fixed_asset_seed", "i"), ("cur_time", "i"),
)  # fmt: skip


def list_games() -> list[str]:
    """The 16 procgen games."""
    return list(GAMES)


def resolve_game(name: str, env_id: str) -> str:
    if name in GAMES:
        return name
    raise LoupeError(unknown_game_message("procgen", name, env_id, list_games()))


def check_config(cfg: EnvConfig) -> None:
    """procgen option checks, including those procgen itself would answer by aborting."""
    mode = cfg.distribution_mode
    if mode not in MODES:
        raise LoupeError(f"unknown distribution_mode {mode!r}; use one of {', '.join(MODES)}")
    games = MODES[mode]
    if games is not None and cfg.game not in games:
        raise LoupeError(
            f"procgen:{cfg.game} has no {mode} mode; {mode} exists for {', '.join(sorted(games))}"
        )
    if mode == "exploration" and (cfg.num_levels or cfg.start_level):
        raise LoupeError("distribution_mode exploration fixes the level; leave num_levels and "
                         "start_level at 0")  # fmt: skip
    if cfg.num_levels < 0 or cfg.start_level < 0 or cfg.num_threads < 0:
        raise LoupeError("num_levels, start_level and num_threads must be >= 0")
    if cfg.start_level + cfg.num_levels >= 2**31:
        raise LoupeError("start_level + num_levels must stay below 2**31")
    if cfg.action_set not in ("full", "article"):
        raise LoupeError(f"action_set must be 'full' or 'article', not {cfg.action_set!r}")
    if cfg.action_set == "article" and cfg.game != "coinrun":
        raise LoupeError("action_set=article is defined for procgen:coinrun only; use 'full'")


def read_state_header(state: bytes | bytearray) -> dict[str, Any]:
    """The leading game fields of a procgen ``get_state()`` (version, name, timeout, cur_time...)."""
    out: dict[str, Any] = {}
    pos = 0
    try:
        for name, kind in _HEADER:
            if kind == "s":
                (n,) = struct.unpack_from("<i", state, pos)
                if n < 0 or pos + 4 + n > len(state):
                    raise struct.error("string runs past the end")
                out[name] = bytes(state[pos + 4 : pos + 4 + n]).decode("latin-1")
                pos += 4 + n
            else:
                (out[name],) = struct.unpack_from("<" + kind, state, pos)
                pos += 4
    except struct.error:
        raise LoupeError(
            f"not a procgen state: truncated after {pos} of {len(state)} bytes"
        ) from None
    return out


def _check_state(state: Any, game: str) -> dict[str, Any]:
    if not isinstance(state, (bytes, bytearray)) or len(state) < 8:
        raise LoupeError("a procgen state is the bytes returned by get_state()")
    (end,) = struct.unpack_from("<I", state, len(state) - 4)
    if end != STATE_END:
        raise LoupeError("not a complete procgen state: the end marker is missing (truncated?)")
    head = read_state_header(state)
    if head["version"] != STATE_VERSION:
        raise LoupeError(f"procgen state version {head['version']}, expected {STATE_VERSION}")
    if head["game_name"] != game:
        raise LoupeError(f"a {head['game_name']} state cannot be loaded into procgen:{game}")
    return head


class ProcgenVecEnv(VecEnv):
    """``num_envs`` procgen games; observations (N, 3, 64, 64) uint8."""

    def __init__(self, config: EnvConfig):
        self.config = config
        self.num_envs = config.num_envs
        self.obs_shape = (3, 64, 64)
        full = config.action_set == "full"
        self.action_map = np.array(range(len(COMBOS)) if full else ARTICLE_ACTIONS, np.int32)
        self.combos = COMBOS if full else ARTICLE_COMBOS
        self.n_actions = len(self.action_map)
        self._env = self._make()
        n = self.num_envs
        self._returns = np.zeros(n, dtype=np.float64)  # (N,) reward of the running episode
        self._lengths = np.zeros(n, dtype=np.int64)  # (N,) steps of the running episode
        self._level_steps = np.zeros(n, dtype=np.int64)  # (N,) steps on the current level
        self._timeouts = np.zeros(n, dtype=np.int64)  # (N,) time limit of the current level
        self._seeds = np.full(n, -1, dtype=np.int64)  # (N,) current level seeds
        self._read_states(range(n), self._env.get_state())
        self._update_seeds(self._env.get_info())
        self._stepped = False  # stepped since the last reset (or since construction)
        self._started = False  # reset() has been called

    def _make(self) -> Any:
        cfg = self.config
        levels = {}
        if cfg.distribution_mode != "exploration":  # exploration mode fixes its own level
            levels = {"num_levels": cfg.num_levels, "start_level": cfg.start_level}
        return gym3_env(
            num=cfg.num_envs,
            env_name=cfg.game,
            distribution_mode=cfg.distribution_mode,
            use_sequential_levels=cfg.use_sequential_levels,
            paint_vel_info=cfg.paint_vel_info,
            use_backgrounds=cfg.use_backgrounds,
            restrict_themes=cfg.restrict_themes,
            use_monochrome_assets=cfg.use_monochrome_assets,
            center_agent=cfg.center_agent,
            num_threads=cfg.num_threads,
            rand_seed=cfg.seed,
            **levels,
        )

    @staticmethod
    def _frames(obs: dict[str, np.ndarray]) -> np.ndarray:
        return obs["rgb"].transpose(0, 3, 1, 2)  # (N, 64, 64, 3) -> (N, 3, 64, 64) view

    def reset(self) -> np.ndarray:
        """New levels everywhere; the first call keeps the levels the envs were created with."""
        if self._stepped:
            # procgen's forced restart: action -1 ends every episode and draws new levels
            self._env.act(np.full(self.num_envs, -1, dtype=np.int32))
        _, obs, _ = self._env.observe()
        self._returns[:] = 0.0
        self._lengths[:] = 0
        self._level_steps[:] = 0
        self._update_seeds(self._env.get_info())
        self._stepped, self._started = False, True
        return self._frames(obs)

    def step(self, actions: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[EpisodeRecord]]:
        if not self._started:
            raise RuntimeError("call reset() before step()")
        a = self._check_actions(actions)
        self._env.act(self.action_map[a])
        reward, obs, first = self._env.observe()  # (N,) f32, {"rgb": (N,64,64,3)}, (N,) bool
        self._stepped = True
        self._returns += reward
        self._lengths += 1
        self._level_steps += 1
        episodes: list[EpisodeRecord] = []
        # level seeds only change at a first, or at a completed level with sequential levels
        if first.any() or self.config.use_sequential_levels:
            episodes = self._level_changes(first, self._env.get_info())
        return (
            self._frames(obs),
            reward.astype(np.float32, copy=False),
            first.astype(bool),
            episodes,
        )

    def _level_changes(self, first: np.ndarray, infos: list[dict]) -> list[EpisodeRecord]:
        episodes = []
        for i, info in enumerate(infos):
            if first[i]:
                episodes.append(self._record(i, info))
                self._returns[i] = 0.0
                self._lengths[i] = 0
                self._level_steps[i] = 0
            elif info["prev_level_complete"]:  # sequential levels: the episode goes on
                self._level_steps[i] = 0
        self._update_seeds(infos)
        return episodes

    def _record(self, i: int, info: dict) -> EpisodeRecord:
        if info["prev_level_complete"] == 1:
            outcome = "complete"
        elif self._level_steps[i] >= self._timeouts[i]:
            outcome = "timeout"
        else:
            outcome = "failure"
        ret, length = float(self._returns[i]), int(self._lengths[i])
        return EpisodeRecord(i, ret, length, outcome, int(info["prev_level_seed"]))

    def _update_seeds(self, infos: list[dict]) -> None:
        self._seeds[:] = [info["level_seed"] for info in infos]

    def _read_states(self, indices: Any, states: list[bytes]) -> None:
        for i, state in zip(indices, states):
            head = _check_state(state, self.config.game)
            self._timeouts[i] = head["timeout"]
            self._level_steps[i] = head["cur_time"]

    def level_seeds(self) -> np.ndarray:
        """(N,) int64 seed of the level each env is playing now."""
        return self._seeds.copy()

    def get_state(self) -> list[bytes]:
        """One serialised game state per env (procgen's ``get_state``)."""
        return list(self._env.get_state())

    def set_state(self, states: list[bytes]) -> np.ndarray:
        """Load one state per env -> the observations (N, 3, 64, 64) of the loaded states.

        The states are checked (game, version, end marker) before procgen sees them, since procgen
        aborts the process on a state it cannot read. Episode lengths and the time limit continue
        from each state's step counter; episode returns count from here on.
        """
        if len(states) != self.num_envs:
            raise LoupeError(f"set_state needs {self.num_envs} states, got {len(states)}")
        heads = [_check_state(s, self.config.game) for s in states]
        self._env.set_state([bytes(s) for s in states])
        for i, head in enumerate(heads):
            self._timeouts[i] = head["timeout"]
            self._level_steps[i] = self._lengths[i] = head["cur_time"]
            self._returns[i] = 0.0
        self._update_seeds(self._env.get_info())
        self._started = True
        return self._frames(self._env.observe()[1])

    def _backend_step(self, actions: np.ndarray) -> Any:
        self._env.act(actions.astype(np.int32))
        return self._env.observe()

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None


VEC_ENV = ProcgenVecEnv
