"""Vector environments for Atari (ale-py) and procgen, behind one small interface.

    env = make_vec_env(EnvConfig(env_id="procgen:coinrun", num_envs=8, seed=0, num_levels=200))
    obs = env.reset()                                  # (N, C, H, W) uint8
    obs, reward, done, episodes = env.step(actions)    # auto-reset inside step

``done[i]`` means env i's episode ended with this step; ``obs[i]`` is then already the first frame of
the next episode. ``episodes`` lists an ``EpisodeRecord`` for each episode that ended.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np

from loupe.errors import LoupeError

PROCGEN_GAMES = (
    "bigfish", "bossfight", "caveflyer", "chaser", "climber", "coinrun", "dodgeball", "fruitbot",
    "heist", "jumper", "leaper", "maze", "miner", "ninja", "plunder", "starpilot",
)  # fmt: skip

#: procgen's episode time limit per game; an episode reaching it without completing is a timeout
PROCGEN_TIMEOUT = 1000

#: the article's 9 CoinRun actions [(), R, L, U, R+U, L+U, D, A, B] as procgen action indices
#: (procgen combos: 0 LEFT+DOWN, 1 LEFT, 2 LEFT+UP, 3 DOWN, 4 noop, 5 UP, 6 RIGHT+DOWN, 7 RIGHT,
#: 8 RIGHT+UP, 9 D, 10 A, 11 W, 12 S, 13 Q, 14 E)
ARTICLE_ACTIONS = (4, 7, 1, 5, 8, 2, 3, 10, 11)

FAMILIES = {
    "ALE": "Atari 2600 games through ale-py, e.g. ALE/Breakout-v5",
    "procgen": "procgen games, e.g. procgen:coinrun",
}


@dataclasses.dataclass
class EpisodeRecord:
    """One finished episode."""

    env_index: int
    #: raw game score of the whole episode (Atari: until game over, unclipped)
    ret: float
    length: int
    #: procgen: "complete", "timeout" or "failure"; Atari: None
    outcome: str | None = None
    #: procgen level seed of the episode; None for Atari
    level_seed: int | None = None


@dataclasses.dataclass
class EnvConfig:
    """Environment id and options; fields that do not apply to the env's family must stay default."""

    #: "ALE/<Game>-v5" or "procgen:<game>"
    env_id: str = "procgen:coinrun"
    #: environments stepped together
    num_envs: int = 8
    #: base seed (env i gets seed + i where the family allows)
    seed: int = 0
    # -- Atari ----------------------------------------------------------------------------------
    #: probability of repeating the previous action (v5 default 0.25; the seed papers used 0)
    sticky_actions: float = 0.25
    #: end the learning episode at a life loss (returns still count the whole game)
    episodic_life: bool = False
    #: clip training rewards to their sign (episode returns stay raw)
    clip_rewards: bool = True
    #: random no-ops at reset
    noop_max: int = 30
    #: frames per action (max-pooled over the last two)
    frame_skip: int = 4
    #: frames stacked as channels
    frame_stack: int = 4
    #: press FIRE after reset in games that need it
    fire_reset: bool = True
    #: C++ threads of ale-py's vector env (0: one per env, capped at 4)
    ale_threads: int = 0
    # -- procgen ---------------------------------------------------------------------------------
    #: number of distinct levels (0: unbounded)
    num_levels: int = 0
    #: first level seed
    start_level: int = 0
    #: "easy", "hard", "extreme", "memory" or "exploration"
    distribution_mode: str = "hard"
    use_sequential_levels: bool = False
    paint_vel_info: bool = False
    use_backgrounds: bool = True
    restrict_themes: bool = False
    use_monochrome_assets: bool = False
    center_agent: bool = True
    #: procgen worker threads (0: step in the caller's thread; required inside Ray actors)
    num_threads: int = 0
    #: "full" (15 procgen actions) or "article" (the 9 actions of Understanding RL Vision)
    action_set: str = "full"

    def __post_init__(self):
        self.family, self.game = parse_env_id(self.env_id)
        if self.num_envs <= 0:
            raise LoupeError(f"num_envs must be positive, got {self.num_envs}")
        if self.family == "procgen":
            if self.distribution_mode not in ("easy", "hard", "extreme", "memory", "exploration"):
                raise LoupeError(
                    f"unknown distribution_mode {self.distribution_mode!r}; "
                    "use easy, hard, extreme, memory or exploration"
                )
            if self.action_set not in ("full", "article"):
                raise LoupeError(f"action_set must be 'full' or 'article', not {self.action_set!r}")
            if self.action_set == "article" and self.game != "coinrun":
                raise LoupeError("action_set=article is defined for procgen:coinrun only")
            if self.num_levels < 0 or self.start_level < 0:
                raise LoupeError("num_levels and start_level must be >= 0")
        else:
            if not 0.0 <= self.sticky_actions <= 1.0:
                raise LoupeError(f"sticky_actions must be in [0, 1], got {self.sticky_actions}")
            if self.frame_skip <= 0 or self.frame_stack <= 0 or self.noop_max < 0:
                raise LoupeError("frame_skip and frame_stack must be positive, noop_max >= 0")
        self._check_family_fields()

    def _check_family_fields(self) -> None:
        atari = ("sticky_actions", "episodic_life", "clip_rewards", "noop_max", "frame_skip",
                 "frame_stack", "fire_reset", "ale_threads")  # fmt: skip
        procgen = ("num_levels", "start_level", "distribution_mode", "use_sequential_levels",
                   "paint_vel_info", "use_backgrounds", "restrict_themes", "use_monochrome_assets",
                   "center_agent", "num_threads", "action_set")  # fmt: skip
        foreign = atari if self.family == "procgen" else procgen
        fields = {f.name: f for f in dataclasses.fields(self)}
        wrong = [n for n in foreign if getattr(self, n) != fields[n].default]
        if wrong:
            raise LoupeError(
                f"option(s) {', '.join(wrong)} do not apply to {self.family} environments"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_env_id(env_id: str) -> tuple[str, str]:
    """'ALE/Breakout-v5' -> ('ALE', 'breakout'); 'procgen:coinrun' -> ('procgen', 'coinrun')."""
    m = re.fullmatch(r"ALE/([A-Za-z0-9]+)-v5", env_id or "")
    if m:
        game = _ale_rom_name(m.group(1))
        if game not in list_games("ALE"):
            raise LoupeError(
                f"unknown Atari game in {env_id!r}; `loupe envs` lists the {len(list_games('ALE'))} "
                "ALE games"
            )
        return "ALE", game
    if env_id and env_id.startswith("procgen:"):
        game = env_id.split(":", 1)[1]
        if game not in PROCGEN_GAMES:
            raise LoupeError(
                f"unknown procgen game {game!r}; choose one of: {', '.join(PROCGEN_GAMES)}"
            )
        return "procgen", game
    raise LoupeError(
        f"unknown environment id {env_id!r}; families: ALE/<Game>-v5 (e.g. ALE/Breakout-v5) and "
        "procgen:<game> (e.g. procgen:coinrun); `loupe envs` lists the games"
    )


def _ale_rom_name(camel: str) -> str:
    """'MontezumaRevenge' -> 'montezuma_revenge' (ale-py's ROM naming)."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", camel).lower()


def list_env_families() -> list[str]:
    return list(FAMILIES)


def list_games(family: str) -> list[str]:
    if family == "procgen":
        return list(PROCGEN_GAMES)
    if family == "ALE":
        import ale_py.roms

        return sorted(ale_py.roms.get_all_rom_ids())
    raise LoupeError(f"unknown environment family {family!r}; families: {', '.join(FAMILIES)}")


def make_vec_env(config: EnvConfig):
    """Build the vector env of ``config``'s family."""
    if config.family == "procgen":
        from actors.procgen_env import ProcgenVecEnv

        return ProcgenVecEnv(config)
    from actors.atari import AtariVecEnv

    return AtariVecEnv(config)


def random_steps_per_s(env, steps: int, seed: int = 0) -> float:
    """Raw env steps/s with uniformly random actions (for benchmarks)."""
    import time

    rng = np.random.default_rng(seed)
    actions = rng.integers(0, env.n_actions, size=(steps, env.num_envs))
    env.reset()
    t0 = time.perf_counter()
    for a in actions:
        env.step(a)
    return steps * env.num_envs / (time.perf_counter() - t0)
