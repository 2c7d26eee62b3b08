"""Checkpoints: safetensors weights + JSON metadata (sha256), optional training state. Never pickled.

    checkpoints/ckpt-000000065536.safetensors     policy weights
    checkpoints/ckpt-000000065536.state.safetensors  optimiser, RNG, counters (for --resume)
    checkpoints/ckpt-000000065536.json            metadata, written last: its presence marks a
                                                  complete checkpoint
Files are written to a temporary name and renamed, so a crash never leaves a half file under a real
name.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from learner.ppo import TrainState
from loupe.errors import LoupeError
from loupe.rundir import CHECKPOINT_JSON as _NAME

SCHEMA = 1


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _atomic_save(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    tmp.replace(path)
    _fsync_dir(path.parent)


def _atomic_json(data: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (where the platform allows opening a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def checkpoint_dir(run_dir: str | Path) -> Path:
    """Where a run keeps its checkpoints."""
    return Path(run_dir) / "checkpoints"


def save_checkpoint(
    run_dir: str | Path,
    policy: Any,
    meta: dict[str, Any],
    train_state: TrainState | None = None,
    keep_last: int = 5,
    keep_every: int = 0,
) -> Path:
    """Write the checkpoint of ``meta['step']`` -> the path of its JSON file.

    ``meta`` must hold ``step``; everything else in it (run_id, env, env_options, ...) is stored as
    given. ``policy`` needs ``state_dict()`` and ``spec``. Retention afterwards keeps the newest
    ``keep_last`` checkpoints plus every ``keep_every``-th one ever written (by write order, the
    first is number 0); ``keep_last=0`` keeps everything. Only the newest ``keep_last`` keep their
    training state (``--resume`` starts from the newest): an older one kept by ``keep_every`` keeps
    its weights and metadata, so the directory holds at most ``keep_last`` checkpoints of
    weights + state plus one weights file per ``keep_every`` written.
    """
    if "step" not in meta:
        raise ValueError("checkpoint meta needs a 'step'")
    if keep_last < 0 or keep_every < 0:
        raise LoupeError("keep_last and keep_every must be >= 0")
    directory = checkpoint_dir(run_dir)
    directory.mkdir(parents=True, exist_ok=True)
    step = int(meta["step"])
    stem = directory / f"ckpt-{step:012d}"
    json_path = stem.with_suffix(".json")
    weights = stem.with_suffix(".safetensors")
    _atomic_save(dict(policy.state_dict()), weights)
    record = {
        **meta,
        "schema": SCHEMA,
        "step": step,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "policy": policy.spec,
        "weights": weights.name,
        "size": weights.stat().st_size,
        "sha256": sha256_file(weights),
        "index": _next_index(run_dir, json_path),
    }
    if train_state is not None:
        state_path = stem.with_suffix(".state.safetensors")
        _atomic_save(train_state.tensors, state_path, {"loupe": json.dumps(train_state.meta)})
        record.update(
            state=state_path.name,
            state_size=state_path.stat().st_size,
            state_sha256=sha256_file(state_path),
        )
    _atomic_json(record, json_path)  # last: its presence marks a complete checkpoint
    _apply_retention(run_dir, keep_last, keep_every)
    return json_path


def _next_index(run_dir: str | Path, json_path: Path) -> int:
    """Write-order number of a new checkpoint (a rewrite of the same step keeps its number)."""
    if json_path.exists():
        return int(_read_json(json_path).get("index", 0))
    previous = list_checkpoints(run_dir)
    return int(_read_json(previous[-1]).get("index", 0)) + 1 if previous else 0


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint JSON files of a run, oldest first."""
    directory = checkpoint_dir(run_dir)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _NAME.search(p.name))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """JSON file of the newest (highest-step) checkpoint of a run, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _apply_retention(run_dir: str | Path, keep_last: int, keep_every: int) -> None:
    found = list_checkpoints(run_dir)
    if keep_last <= 0 or len(found) <= keep_last:
        return
    for path in found[:-keep_last]:
        try:
            record = _read_json(path)
            index = int(record.get("index", 0))
        except (LoupeError, TypeError, ValueError):
            continue  # an unreadable checkpoint is left for a person to look at
        if keep_every and index % keep_every == 0:
            _drop_train_state(path, record)
            continue
        for suffix in (".safetensors", ".state.safetensors"):
            path.with_suffix(suffix).unlink(missing_ok=True)
        path.unlink()


def _drop_train_state(json_path: Path, record: dict[str, Any]) -> None:
    """An old checkpoint kept for the record keeps its weights; its training state goes (the
    metadata first, so that it never names a file that is gone)."""
    if "state" not in record:
        return
    state = json_path.with_suffix(".state.safetensors")
    for key in ("state", "state_size", "state_sha256"):
        record.pop(key, None)
    _atomic_json(record, json_path)
    state.unlink(missing_ok=True)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise LoupeError(f"{path}: no such checkpoint") from None
    except IsADirectoryError:
        raise LoupeError(f"{path} is a directory, not checkpoint metadata") from None
    except OSError as exc:
        raise LoupeError(
            f"{path}: cannot read checkpoint metadata ({exc.strerror or exc})"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LoupeError(f"{path}: checkpoint metadata is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise LoupeError(f"{path}: checkpoint metadata is not a JSON object")
    return data


def resolve(path: str | Path) -> Path:
    """A checkpoint given as .json, .safetensors or .state.safetensors -> its JSON path."""
    path = Path(path)
    name = path.name
    for suffix in (".state.safetensors", ".safetensors"):
        if name.endswith(suffix):
            return path.with_name(name[: -len(suffix)] + ".json")
    return path


def read_meta(path: str | Path) -> dict[str, Any]:
    """Checkpoint metadata, schema-checked (the weights are not read)."""
    json_path = resolve(path)
    meta = _read_json(json_path)
    if meta.get("schema") != SCHEMA:
        raise LoupeError(
            f"{json_path}: unknown checkpoint schema {meta.get('schema')!r} (this loupe reads "
            f"schema {SCHEMA}); upgrade loupe or re-export the checkpoint"
        )
    for key in ("step", "policy", "weights", "sha256", "size"):
        if key not in meta:
            raise LoupeError(f"{json_path}: checkpoint metadata lacks {key!r}")
    if not isinstance(meta["policy"], dict) or "name" not in meta["policy"]:
        raise LoupeError(f"{json_path}: checkpoint metadata has no policy name")
    for key in ("weights", "state"):
        name = meta.get(key)
        if name is not None and (not isinstance(name, str) or Path(name).name != name or not name):
            raise LoupeError(f"{json_path}: {key} must name a file next to the metadata")
    return meta


def verify_file(path: Path, size: int | None, sha256: str) -> None:
    """Refuse a missing file, a size other than ``size`` or a sha256 other than ``sha256``."""
    if not path.is_file():
        raise LoupeError(f"{path}: missing checkpoint file; the checkpoint is incomplete")
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        raise LoupeError(
            f"{path}: truncated or altered checkpoint ({actual_size} bytes, expected {size}); "
            "use an earlier checkpoint"
        )
    if sha256_file(path) != sha256:
        raise LoupeError(
            f"{path}: sha256 does not match the checkpoint metadata; the file is corrupt or was "
            "replaced, use an earlier checkpoint"
        )


def load_checkpoint(
    path: str | Path, build_policy: Callable[..., Any] | None = None, device: str = "cpu"
) -> tuple[Any, dict[str, Any]]:
    """A checkpoint (its .json or .safetensors) -> (policy, meta), size and sha256 verified first.

    The policy is rebuilt with ``build_policy(name, obs_shape, n_actions, **options)`` from the
    spec in the metadata (default: ``attention.build_policy``).
    """
    if build_policy is None:
        from attention import build_policy as default_build

        build_policy = default_build
    json_path = resolve(path)
    meta = read_meta(json_path)
    weights = json_path.with_name(meta["weights"])
    verify_file(weights, meta["size"], meta["sha256"])
    spec = meta["policy"]
    try:
        policy = build_policy(
            spec["name"],
            tuple(spec["obs_shape"]),
            int(spec["n_actions"]),
            **spec.get("options", {}),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise LoupeError(f"{json_path}: malformed policy spec ({exc})") from None
    try:
        state = load_file(str(weights), device=device)
    except SafetensorError as exc:
        raise LoupeError(f"{weights}: not a readable safetensors file ({exc})") from None
    missing, unexpected = _mismatch(policy, state)
    if missing or unexpected:
        raise LoupeError(
            f"{weights}: weights do not fit policy {spec['name']} (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]})"
        )
    try:
        policy.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1].strip()
        raise LoupeError(f"{weights}: weights do not fit policy {spec['name']} ({first})") from None
    return policy.to(device), meta


def _mismatch(policy: Any, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    expected = set(policy.state_dict())
    return sorted(expected - set(state)), sorted(set(state) - expected)


def load_train_state(path: str | Path) -> TrainState:
    """The optimiser/RNG/counter state saved next to a checkpoint, verified."""
    json_path = resolve(path)
    meta = read_meta(json_path)
    if "state" not in meta:
        raise LoupeError(f"{json_path}: this checkpoint has no training state; it cannot resume")
    state_path = json_path.with_name(meta["state"])
    verify_file(state_path, meta.get("state_size"), meta["state_sha256"])
    try:
        with safe_open(str(state_path), framework="pt") as f:
            info = json.loads(f.metadata()["loupe"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, KeyError, json.JSONDecodeError) as exc:
        raise LoupeError(f"{state_path}: unreadable training state ({exc})") from None
    return TrainState(tensors, info)


def find_checkpoint(
    text: str | Path | None, flag: str = "--checkpoint", say: Callable[[str], Any] | None = print
) -> Path:
    """What a user named as a checkpoint -> the JSON path of a complete checkpoint.

    Accepted: a checkpoint's ``.json``, ``.safetensors`` or ``.state.safetensors``; a run directory
    or its ``checkpoints/`` directory, meaning its newest checkpoint (``say`` is told which one was
    taken). Anything else is a one-line ``LoupeError`` naming ``flag``; a missing checkpoint lists
    the newest few that exist next to it. The metadata is read and schema-checked; the weights are
    verified when they are loaded (``load_checkpoint``).
    """
    if text is None or not str(text).strip():
        raise LoupeError(
            f"{flag} is empty; give a checkpoint (checkpoints/ckpt-<step>.json) or a run directory "
            "for its newest checkpoint"
        )
    path = Path(text)
    if path.is_dir():
        run = (
            path.parent
            if path.name == "checkpoints" and not checkpoint_dir(path).is_dir()
            else path
        )
        newest = latest_checkpoint(run)
        if newest is None:
            raise LoupeError(
                f"{flag} {path} is a directory with no checkpoints (no "
                f"{checkpoint_dir(run)}/ckpt-<step>.json); give a checkpoint file or a run directory"
            )
        read_meta(newest)
        if say is not None:
            say(f"{flag} {path}: taking its newest checkpoint, {newest}")
        return newest
    name = path.name
    if not (name.endswith(".json") or name.endswith(".safetensors")):
        raise LoupeError(
            f"{flag} {path} is not a checkpoint; give a ckpt-<step>.json (or .safetensors) file or "
            "a run directory"
        )
    json_path = resolve(path)
    if not json_path.exists():
        raise LoupeError(f"{flag} {path}: no such checkpoint; {_nearby(json_path)}")
    if not json_path.is_file():
        raise LoupeError(f"{flag} {json_path} is not a file; give a checkpoint's .json file")
    read_meta(json_path)
    return json_path


def _nearby(missing: Path, show: int = 3) -> str:
    """'checkpoints in DIR: newest, ... (N in all)' for the run a missing checkpoint points into."""
    parent = missing.parent
    run = parent.parent if parent.name == "checkpoints" else parent
    found = list_checkpoints(run)
    if not found and parent.is_dir():
        found = sorted(p for p in parent.iterdir() if _NAME.search(p.name))
    if not found:
        where = run if run.is_dir() else parent
        return f"{where} holds no checkpoints" if where.is_dir() else f"{where} does not exist"
    newest = [p.name for p in found[::-1][:show]]
    more = f" ({len(found)} in all)" if len(found) > show else ""
    return f"checkpoints in {found[0].parent}, newest first: {', '.join(newest)}{more}"
