"""Read, edit and rewrite the bytes of a procgen CoinRun ``get_state()``.

procgen serialises a game as little-endian int32 / float32 fields, strings as an int32 length
followed by the raw bytes, in this order (procgen ``src/game.cpp``, ``src/basic-abstract-game.cpp``,
``src/entity.cpp``, ``src/games/coinrun.cpp``, ``src/vecgame.cpp``):

1. the game section: serialisation version, game name, options, level-seed bounds, two RNG states
   (``is_seeded`` and the mt19937 state as text), the last step's reward and flags, timeout,
   level seeds, ``cur_time`` ...;
2. the BasicAbstractGame section: grid size, the entities (a count, then 124 bytes each:
   ``x, y, vx, vy, rx, ry`` as floats, then ``type`` ...), background and agent settings, another
   RNG state, the world geometry and the grid (``w, h``, a count and ``w * h`` cell values, cell
   ``(x, y)`` at index ``y * w + x`` so ``y = 0`` is the bottom row);
3. the CoinRun section (``last_agent_y``, wall theme, support flags, gravity, air control);
4. the end marker ``0xCAFECAFE``.

    state = CoinRunState.parse(env.callmethod("get_state")[0])
    state.agent.x += 2.0                           # entities are plain objects, edit in place
    state.remove_entities(lambda e: e.type == SAW)
    state.set_grid_cells((LAVA_MID, LAVA_TOP), SPACE)
    env.callmethod("set_state", [state.to_bytes()])

procgen aborts the whole process on a state it cannot read, so ``parse`` and ``to_bytes`` refuse
anything that does not have this exact layout.
"""

from __future__ import annotations

import copy
import dataclasses
import struct
from collections.abc import Callable, Iterable

import numpy as np

from loupe.errors import LoupeError

# entity types (procgen object-ids.h and games/coinrun.cpp)
PLAYER = 0
SAW = 2
ENEMY = 5
CRATE = 20
TRAIL = 59
ENTITY_TYPE_NAMES = {PLAYER: "player", SAW: "saw", ENEMY: "enemy", CRATE: "crate", TRAIL: "trail"}

# grid cell values
GOAL = 1
WALL_MID = 15
WALL_TOP = 16
LAVA_MID = 17
LAVA_TOP = 18
ENEMY_BARRIER = 19
SPACE = 100
LAVA = (LAVA_MID, LAVA_TOP)
WALLS = (WALL_MID, WALL_TOP)

#: procgen's serialisation version this reader knows
SERIALIZE_VERSION = 0
END_MARKER = 0xCAFECAFE
GAME_NAME = "coinrun"

Scalar = int | float | str

# A section is a sequence of (name, kind): "i" int32, "f" float32, "s" string (int32 length + bytes).
GAME_FIELDS: tuple[tuple[str, str], ...] = (
    ("version", "i"),
    ("game_name", "s"),
    ("paint_vel_info", "i"),
    ("use_generated_assets", "i"),
    ("use_monochrome_assets", "i"),
    ("restrict_themes", "i"),
    ("use_backgrounds", "i"),
    ("center_agent", "i"),
    ("debug_mode", "i"),
    ("distribution_mode", "i"),
    ("use_sequential_levels", "i"),
    ("use_easy_jump", "i"),
    ("plain_assets", "i"),
    ("physics_mode", "i"),
    ("grid_step", "i"),
    ("level_seed_low", "i"),
    ("level_seed_high", "i"),
    ("game_type", "i"),
    ("game_n", "i"),
    ("level_seed_rand_gen.is_seeded", "i"),
    ("level_seed_rand_gen.state", "s"),
    ("rand_gen.is_seeded", "i"),
    ("rand_gen.state", "s"),
    ("reward", "f"),
    ("done", "i"),
    ("level_complete", "i"),
    ("action", "i"),
    ("timeout", "i"),
    ("current_level_seed", "i"),
    ("prev_level_seed", "i"),
    ("episodes_remaining", "i"),
    ("episode_done", "i"),
    ("last_reward_timer", "i"),
    ("last_reward", "f"),
    ("default_action", "i"),
    ("fixed_asset_seed", "i"),
    ("cur_time", "i"),
    ("is_waiting_for_step", "i"),
)

#: BasicAbstractGame fields between the entities and the grid
WORLD_FIELDS: tuple[tuple[str, str], ...] = (
    ("use_procgen_background", "i"),
    ("background_index", "i"),
    ("bg_tile_ratio", "f"),
    ("bg_pct_x", "f"),
    ("char_dim", "f"),
    ("last_move_action", "i"),
    ("move_action", "i"),
    ("special_action", "i"),
    ("mixrate", "f"),
    ("maxspeed", "f"),
    ("max_jump", "f"),
    ("action_vx", "f"),
    ("action_vy", "f"),
    ("action_vrot", "f"),
    ("center_x", "f"),
    ("center_y", "f"),
    ("random_agent_start", "i"),
    ("has_useful_vel_info", "i"),
    ("step_rand_int", "i"),
    ("asset_rand_gen.is_seeded", "i"),
    ("asset_rand_gen.state", "s"),
    ("main_width", "i"),
    ("main_height", "i"),
    ("out_of_bounds_object", "i"),
    ("unit", "f"),
    ("view_dim", "f"),
    ("x_off", "f"),
    ("y_off", "f"),
    ("visibility", "f"),
    ("min_visibility", "f"),
)

COINRUN_FIELDS: tuple[tuple[str, str], ...] = (
    ("last_agent_y", "f"),
    ("wall_theme", "i"),
    ("has_support", "i"),
    ("facing_right", "i"),
    ("is_on_crate", "i"),
    ("gravity", "f"),
    ("air_control", "f"),
)

# Entity::serialize order; "f" float32, "i" int32
_ENTITY_LAYOUT: tuple[tuple[str, str], ...] = (
    ("x", "f"),
    ("y", "f"),
    ("vx", "f"),
    ("vy", "f"),
    ("rx", "f"),
    ("ry", "f"),
    ("type", "i"),
    ("image_type", "i"),
    ("image_theme", "i"),
    ("render_z", "i"),
    ("will_erase", "i"),
    ("collides_with_entities", "i"),
    ("collision_margin", "f"),
    ("rotation", "f"),
    ("vrot", "f"),
    ("is_reflected", "i"),
    ("fire_time", "i"),
    ("spawn_time", "i"),
    ("life_time", "i"),
    ("expire_time", "i"),
    ("use_abs_coords", "i"),
    ("friction", "f"),
    ("smart_step", "i"),
    ("avoids_collisions", "i"),
    ("auto_erase", "i"),
    ("alpha", "f"),
    ("health", "f"),
    ("theta", "f"),
    ("grow_rate", "f"),
    ("alpha_decay", "f"),
    ("climber_spawn_x", "f"),
)
_ENTITY_STRUCT = struct.Struct("<" + "".join(kind for _, kind in _ENTITY_LAYOUT))
#: bytes per serialised entity
ENTITY_SIZE = _ENTITY_STRUCT.size


@dataclasses.dataclass
class Entity:
    """One procgen entity, fields in serialisation order (positions in grid cells, y up)."""

    x: float
    y: float
    vx: float
    vy: float
    #: half width and half height
    rx: float
    ry: float
    #: PLAYER, SAW, ENEMY, CRATE, TRAIL ...
    type: int
    image_type: int
    image_theme: int
    render_z: int
    will_erase: int
    collides_with_entities: int
    collision_margin: float
    rotation: float
    vrot: float
    is_reflected: int
    fire_time: int
    spawn_time: int
    life_time: int
    expire_time: int
    use_abs_coords: int
    friction: float
    smart_step: int
    avoids_collisions: int
    auto_erase: int
    alpha: float
    health: float
    theta: float
    grow_rate: float
    alpha_decay: float
    climber_spawn_x: float

    @property
    def type_name(self) -> str:
        return ENTITY_TYPE_NAMES.get(self.type, f"type{self.type}")

    def pack(self) -> bytes:
        return _ENTITY_STRUCT.pack(*dataclasses.astuple(self))


assert tuple(f.name for f in dataclasses.fields(Entity)) == tuple(n for n, _ in _ENTITY_LAYOUT)


class _Reader:
    """Sequential little-endian reader that records where each named field starts."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0
        self.offsets: dict[str, int] = {}

    def _need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > len(self.data):
            raise LoupeError(
                f"CoinRun state is truncated or corrupt at byte {self.pos} ({what}); "
                "pass the bytes of a procgen coinrun get_state() unchanged"
            )

    def int32(self, name: str) -> int:
        self._need(4, name)
        self.offsets[name] = self.pos
        (value,) = struct.unpack_from("<i", self.data, self.pos)
        self.pos += 4
        return value

    def float32(self, name: str) -> float:
        self._need(4, name)
        self.offsets[name] = self.pos
        (value,) = struct.unpack_from("<f", self.data, self.pos)
        self.pos += 4
        return value

    def string(self, name: str) -> str:
        self.offsets[name] = self.pos
        size = self.int32(name + ".size")
        self._need(size, name)
        text = self.data[self.pos : self.pos + size].decode("latin-1")
        self.pos += size
        return text

    def section(self, fields: tuple[tuple[str, str], ...]) -> dict[str, Scalar]:
        read = {"i": self.int32, "f": self.float32, "s": self.string}
        return {name: read[kind](name) for name, kind in fields}


def _pack_section(fields: tuple[tuple[str, str], ...], values: dict[str, Scalar]) -> bytes:
    parts = []
    for name, kind in fields:
        value = values[name]
        if kind == "s":
            raw = str(value).encode("latin-1")
            parts.append(struct.pack("<i", len(raw)) + raw)
        else:
            parts.append(struct.pack("<" + kind, value))
    return b"".join(parts)


@dataclasses.dataclass
class CoinRunState:
    """A parsed CoinRun state; edit the fields, then ``to_bytes()`` for ``set_state``."""

    #: game section fields by name (options, RNG states as text, cur_time, timeout, seeds ...)
    game: dict[str, Scalar]
    #: BasicAbstractGame ``grid_size`` (written before the entities)
    grid_size: int
    #: all entities in procgen's order; the first PLAYER is the agent
    entities: list[Entity]
    #: BasicAbstractGame fields between the entities and the grid (physics, view, asset RNG ...)
    world: dict[str, Scalar]
    #: (h, w) int32 cell values, row 0 = the bottom row (y = 0)
    grid: np.ndarray
    #: CoinRun section fields by name
    coinrun: dict[str, Scalar]
    #: byte offset of each named field in the parsed bytes (``entities``: the entity count,
    #: ``entity[i]``: entity i, ``grid``: grid width, ``grid.values``: first cell, ``end``: the
    #: end marker); they describe the bytes that were parsed, not later edits
    offsets: dict[str, int] = dataclasses.field(default_factory=dict)

    # -- reading --------------------------------------------------------------------------------

    @classmethod
    def parse(cls, data: bytes) -> CoinRunState:
        """Parse the bytes of one CoinRun ``get_state()``; the bytes must end at the end marker."""
        r = _Reader(bytes(data))
        game = r.section(GAME_FIELDS[:2])
        if game["version"] != SERIALIZE_VERSION or game["game_name"] != GAME_NAME:
            raise LoupeError(
                f"not a CoinRun state (version {game['version']}, game {game['game_name']!r:.40}); "
                "pass a state from a procgen coinrun environment"
            )
        game.update(r.section(GAME_FIELDS[2:]))
        grid_size = r.int32("grid_size")
        entities = cls._read_entities(r)
        world = r.section(WORLD_FIELDS)
        grid = cls._read_grid(r)
        coinrun = r.section(COINRUN_FIELDS)
        marker = r.int32("end") & 0xFFFFFFFF
        if marker != END_MARKER or r.pos != len(r.data):
            raise LoupeError(
                f"CoinRun state has no end marker where expected (byte {r.offsets['end']} of "
                f"{len(r.data)}); pass the bytes of a procgen coinrun get_state() unchanged"
            )
        state = cls(game, grid_size, entities, world, grid, coinrun, r.offsets)
        state.agent  # noqa: B018  (refuses a state without a player)
        return state

    @staticmethod
    def _read_entities(r: _Reader) -> list[Entity]:
        count = r.int32("entities")
        r._need(count * ENTITY_SIZE, "entities")
        entities = []
        for i in range(count):
            r.offsets[f"entity[{i}]"] = r.pos
            entities.append(Entity(*_ENTITY_STRUCT.unpack_from(r.data, r.pos)))
            r.pos += ENTITY_SIZE
        return entities

    @staticmethod
    def _read_grid(r: _Reader) -> np.ndarray:
        w, h = r.int32("grid"), r.int32("grid.h")
        count = r.int32("grid.count")
        if w <= 0 or h <= 0 or count != w * h:
            raise LoupeError(
                f"CoinRun state has a {w}x{h} grid with {count} cells; the state is corrupt"
            )
        r._need(4 * count, "grid values")
        r.offsets["grid.values"] = r.pos
        values = np.frombuffer(r.data, dtype="<i4", count=count, offset=r.pos)
        r.pos += 4 * count
        return values.reshape(h, w).astype(np.int32)  # (h, w), row 0 = bottom

    # -- writing --------------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """Serialise exactly as procgen does; ``parse(b).to_bytes() == b`` for any state b."""
        self.agent  # noqa: B018  (procgen aborts on a state without a player)
        h, w = self.grid.shape
        grid = np.ascontiguousarray(self.grid, dtype="<i4")
        return b"".join(
            (
                _pack_section(GAME_FIELDS, self.game),
                struct.pack("<ii", self.grid_size, len(self.entities)),
                b"".join(e.pack() for e in self.entities),
                _pack_section(WORLD_FIELDS, self.world),
                struct.pack("<iii", w, h, w * h),
                grid.tobytes(),
                _pack_section(COINRUN_FIELDS, self.coinrun),
                struct.pack("<I", END_MARKER),
            )
        )

    def copy(self) -> CoinRunState:
        """An independent copy (entities and grid included) to edit."""
        return copy.deepcopy(self)

    # -- views ----------------------------------------------------------------------------------

    @property
    def agent(self) -> Entity:
        """The player entity (edit it in place to move the agent)."""
        for e in self.entities:
            if e.type == PLAYER:
                return e
        raise LoupeError("CoinRun state has no player entity; procgen cannot load it")

    @property
    def cur_time(self) -> int:
        """Steps taken in the current episode."""
        return int(self.game["cur_time"])

    @property
    def timeout(self) -> int:
        """The episode step limit."""
        return int(self.game["timeout"])

    @property
    def level_seed(self) -> int:
        return int(self.game["current_level_seed"])

    @property
    def width(self) -> int:
        return int(self.grid.shape[1])

    @property
    def height(self) -> int:
        return int(self.grid.shape[0])

    def cell(self, x: float, y: float) -> int:
        """The grid value at world position (x, y) (WALL_MID outside the grid, as procgen does)."""
        i, j = int(np.floor(x)), int(np.floor(y))
        if not (0 <= i < self.width and 0 <= j < self.height):
            return WALL_MID
        return int(self.grid[j, i])

    def entities_of(self, entity_type: int) -> list[Entity]:
        return [e for e in self.entities if e.type == entity_type]

    # -- editing --------------------------------------------------------------------------------

    def remove_entities(self, predicate: Callable[[Entity], bool]) -> int:
        """Drop every entity for which ``predicate`` is true -> how many were dropped.

        The agent cannot be removed (procgen needs a player).
        """
        keep = [e for e in self.entities if not predicate(e)]
        if not any(e.type == PLAYER for e in keep):
            raise LoupeError("remove_entities would remove the player; exclude type PLAYER")
        removed = len(self.entities) - len(keep)
        self.entities = keep
        return removed

    def set_grid_cells(self, old_values: int | Iterable[int], new_value: int) -> int:
        """Set every cell holding one of ``old_values`` to ``new_value`` -> cells changed."""
        olds = [old_values] if isinstance(old_values, int) else list(old_values)
        mask = np.isin(self.grid, olds) & (self.grid != new_value)
        self.grid[mask] = new_value
        return int(mask.sum())
