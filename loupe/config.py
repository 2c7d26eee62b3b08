"""JSON round-trip for the per-component config dataclasses."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from loupe.errors import LoupeError

T = TypeVar("T")


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a (possibly nested) config dataclass."""
    return dataclasses.asdict(cfg)


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build ``cls`` from ``data``; unknown keys and nested dataclasses are handled, errors are one line."""
    if not isinstance(data, dict):
        raise LoupeError(f"{where}: expected a JSON object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    derived = {f.name for f in dataclasses.fields(cls) if not f.init}
    data = {k: v for k, v in data.items() if k not in derived}  # recomputed by __post_init__
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise LoupeError(
            f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        hint = _strip_optional(hints.get(name))
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = from_dict(hint, value, f"{where}.{name}")
        elif hint is tuple or typing.get_origin(hint) is tuple:
            value = tuple(value) if value is not None else None
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise LoupeError(f"{where}: {exc}") from None


def _strip_optional(hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def save_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically: a temporary file in the same directory, then rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def load_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise LoupeError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise LoupeError(f"{path} is a directory, not a JSON file") from None
    except OSError as exc:
        raise LoupeError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise LoupeError(f"{path}: not a JSON file (binary content)") from None
    except json.JSONDecodeError as exc:
        raise LoupeError(f"{path}: malformed JSON ({exc.msg} at line {exc.lineno})") from None
