"""Invisible hazards: CoinRun with a hazard group still deadly but not drawn.

The seed article's upper bound of blindness ("invisible buzzsaws"): the agent cannot see the saws at
all, yet touching one still ends the episode. procgen draws an entity with opacity ``alpha``, and
collisions ignore it, so setting ``alpha = 0`` hides an entity and nothing else. Enemies leave a
half-transparent trail every step; the trails of hidden enemies are hidden too. A frame with a group
hidden equals the frame with that group removed (a test checks it pixel for pixel).

    env = InvisibleHazards(procgen.ProcgenGym3Env(num=8, env_name="coinrun"), ["saw"])
    env.act(actions); reward, obs, first = env.observe()     # saws never appear in obs

Lava is part of the grid, which has no opacity: it cannot be hidden this way.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from actors.coinrun_masks import entity_class
from actors.coinrun_state import ENEMY, SAW, TRAIL, CoinRunState
from loupe.errors import LoupeError

#: the hazard groups that can be made invisible
INVISIBLE_GROUPS = ("saw", "enemy_left", "enemy_right")


def check_groups(groups: Iterable[str]) -> tuple[str, ...]:
    """The groups as a tuple; LoupeError naming the valid ones for anything else."""
    groups = tuple(groups)
    unknown = [g for g in groups if g not in INVISIBLE_GROUPS]
    if unknown:
        raise LoupeError(
            f"cannot make {', '.join(map(repr, unknown))} invisible; choose from "
            f"{', '.join(INVISIBLE_GROUPS)} (lava is part of the grid and cannot be hidden)"
        )
    return groups


def hide_hazards(state: CoinRunState, groups: Sequence[str]) -> int:
    """Set ``alpha = 0`` on every entity of ``groups`` (and hidden enemies' trails) -> how many."""
    groups = check_groups(groups)
    hidden = 0
    for e in state.entities:
        if e.type not in (SAW, ENEMY, TRAIL) or e.alpha == 0:
            continue
        if entity_class(e, state) in groups:
            e.alpha = 0.0
            hidden += 1
    return hidden


class InvisibleHazards:
    """A gym3 CoinRun env whose observations never show ``groups``; everything else passes through.

    After each ``act`` the games' states are read, the groups hidden and the states written back;
    procgen then draws the observation again (``set_state`` re-renders, keeping reward, ``first``
    and info). Costs one ``get_state``/``set_state`` per step.
    """

    def __init__(self, env: Any, groups: Sequence[str]):
        self.env = env
        self.groups = check_groups(groups)
        self._hide()

    def _hide(self) -> None:
        if not self.groups:
            return
        states = self.env.callmethod("get_state")
        patched = []
        for raw in states:
            state = CoinRunState.parse(raw)
            patched.append(state.to_bytes() if hide_hazards(state, self.groups) else raw)
        self.env.callmethod("set_state", patched)

    def act(self, actions: Any) -> None:
        self.env.act(actions)
        self._hide()

    def __getattr__(self, name: str) -> Any:  # observe, get_info, callmethod ... pass through
        return getattr(self.env, name)
