"""What a run keeps, so that disk and Redis stay bounded for a billion steps and more.

Every kind of output has a stated bound (``README.md``, "Long runs"; ``docs/outputs.md``):

- checkpoints (``TrainConfig.keep_last`` / ``keep_every``, ``learner/checkpoint.py``): the newest
  ``keep_last`` with weights and training state, plus the weights of every ``keep_every``-th one;
- probe artefacts (``WorkerConfig.keep_last`` / ``keep_every``, :func:`prune_probe_dirs`): the
  newest ``keep_last`` probed checkpoints and every ``keep_every``-th one (by checkpoint write
  order) keep all their files; older ones keep ``summary.json`` only (the run page and the probe
  scalars over training need nothing else);
- TensorBoard: the learner writes at most ``TrainConfig.tb_max_points`` points per tag (episodes
  are averaged per point), probe workers the overlays of every ``tb_images_every``-th checkpoint;
- Redis (``loupe.bus``): each stream about ``maxlen`` entries, ``2 * maxlen`` done marks per suite,
  no consumer that is gone; the append-only file is rewritten when it doubles (at least 16 MB).

:func:`project` turns measured per-item sizes into disk and Redis use at any number of steps.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from loupe.errors import LoupeError

#: the marker of a probe directory whose artefacts were removed (only summary.json is left)
PRUNED_NAME = "pruned.json"
#: what a pruned probe directory keeps
KEPT_NAMES = ("summary.json", PRUNED_NAME)


# -- probe artefacts ----------------------------------------------------------------------------
def is_pruned(probe_dir: str | Path) -> bool:
    """True for a probe directory that keeps its summary.json only."""
    return (Path(probe_dir) / PRUNED_NAME).is_file()


def kept_in_full(index: int, keep_every: int) -> bool:
    """True for the checkpoint of write order ``index`` whose artefacts are kept for good."""
    return bool(keep_every) and index % keep_every == 0


def prune_probe_dirs(
    probes_dir: str | Path,
    keep_last: int,
    keep_every: int,
    seen: dict[str, tuple[int, Any]] | None = None,
) -> list[Path]:
    """Reduce old probe directories to their summary.json -> the directories pruned now.

    The ``keep_last`` newest finished directories (by step) keep everything, and so does every
    one whose checkpoint's write order (``index`` in summary.json; the position among the
    directories when it has none) is a multiple of ``keep_every`` (0: none of the older ones).
    ``keep_last=0`` keeps everything. The marker ``pruned.json`` is written before any file is
    removed, so a reader never takes a half-pruned directory for a whole one. Safe to run from
    several workers at once.

    ``seen`` (a dict the caller keeps between calls) remembers each finished directory's step
    and index, so a long-lived worker reads each summary.json once instead of all of them at
    every checkpoint.
    """
    if keep_last < 0 or keep_every < 0:
        raise LoupeError("probe keep_last and keep_every must be >= 0")
    root = Path(probes_dir)
    if keep_last == 0 or not root.is_dir():
        return []
    found: list[tuple[int, str, Path, Any]] = []
    names: set[str] = set()
    for d in root.glob("step-*"):
        names.add(d.name)
        if seen is not None and d.name in seen:
            step, index = seen[d.name]
        else:
            try:
                summary = json.loads((d / "summary.json").read_text())
            except (OSError, json.JSONDecodeError):
                continue  # unfinished or not a probe directory: not ours to touch
            if not isinstance(summary, dict):
                continue
            step, index = int(summary.get("step") or 0), summary.get("index")
            if seen is not None:
                seen[d.name] = (step, index)
        found.append((step, d.name, d, index))
    if seen is not None:
        for name in [n for n in seen if n not in names]:
            del seen[name]
    found.sort(key=lambda item: item[:2])
    pruned = []
    for position, (_, _, d, index) in enumerate(found[:-keep_last] if keep_last else []):
        index = position if not isinstance(index, int) or isinstance(index, bool) else index
        if kept_in_full(index, keep_every) or is_pruned(d):
            continue
        _prune(d)
        pruned.append(d)
    return pruned


def _prune(d: Path) -> None:
    removed = sum(
        p.stat().st_size for p in d.rglob("*") if p.is_file() and p.name not in KEPT_NAMES
    )
    marker = d / PRUNED_NAME
    tmp = d / f".{PRUNED_NAME}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"pruned": time.time(), "bytes_removed": removed}) + "\n")
    tmp.replace(marker)
    for p in d.iterdir():
        if p.name in KEPT_NAMES:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


# -- projection ---------------------------------------------------------------------------------
@dataclasses.dataclass
class MeasuredSizes:
    """Bytes per item, measured on a run (``du`` of files; Redis ``MEMORY USAGE`` per entry)."""

    #: a checkpoint's weights (``ckpt-*.safetensors``)
    checkpoint_weights: int
    #: its training state (``ckpt-*.state.safetensors``)
    checkpoint_state: int
    #: its metadata (``ckpt-*.json``)
    checkpoint_meta: int
    #: one probe directory with all its artefacts
    probe_full: int
    #: what a pruned probe directory keeps (``summary.json`` and ``pruned.json``)
    probe_pruned: int
    #: TensorBoard bytes the learner writes per point (all its tags of one logged update)
    tb_train_per_point: int
    #: TensorBoard bytes of one probed checkpoint's scalars
    tb_probe_scalars: int
    #: TensorBoard bytes of one probed checkpoint's overlay images
    tb_probe_images: int
    #: Redis memory of one entry of the checkpoints stream
    redis_checkpoint_entry: int
    #: Redis memory of one entry of the results stream
    redis_result_entry: int
    #: Redis memory of one done mark (key, value and its place in the order list)
    redis_done_mark: int


@dataclasses.dataclass
class Retention:
    """The retention settings a projection assumes; the defaults are loupe's."""

    #: checkpoints: TrainConfig.keep_last and keep_every
    checkpoint_keep_last: int = 5
    checkpoint_keep_every: int = 0
    #: probe artefacts kept in full: WorkerConfig.keep_last and keep_every
    probe_keep_last: int = 10
    probe_keep_every: int = 10
    #: TensorBoard: TrainConfig.tb_max_points and WorkerConfig.tb_images_every
    tb_max_points: int = 100_000
    tb_images_every: int = 10
    #: Redis: the bus's stream maxlen (done marks: twice that per suite)
    stream_maxlen: int = 10_000
    #: the append-only file is rewritten once it has doubled and is at least this big
    aof_rewrite_min_bytes: int = 16 << 20

    @classmethod
    def of(cls, train=None, worker=None, maxlen: int | None = None) -> Retention:
        """The settings of a TrainConfig and a WorkerConfig (either may be None: defaults)."""
        values = {}
        if train is not None:
            values.update(checkpoint_keep_last=train.keep_last,
                          checkpoint_keep_every=train.keep_every,
                          tb_max_points=train.tb_max_points)  # fmt: skip
        if worker is not None:
            values.update(probe_keep_last=worker.keep_last, probe_keep_every=worker.keep_every,
                          tb_images_every=worker.tb_images_every)  # fmt: skip
        if maxlen is not None:
            values["stream_maxlen"] = maxlen
        return cls(**values)


def tb_interval(num_updates: int, max_points: int) -> int:
    """Updates per TensorBoard point, so that ``num_updates`` make at most ``max_points`` points
    per tag (0: no limit, a point per update)."""
    if max_points <= 0:
        return 1
    return max(1, -(-num_updates // max_points))


def _kept(written: int, keep_last: int, keep_every: int) -> tuple[int, int]:
    """(newest kept, older kept by keep_every) of ``written`` items numbered 0, 1, ..."""
    if keep_last == 0:
        return written, 0
    newest = min(keep_last, written)
    older = written - newest
    return newest, (-(-older // keep_every) if keep_every else 0)


def project(
    sizes: MeasuredSizes,
    retention: Retention,
    steps_per_update: int,
    checkpoint_every: int,
    total_steps: int = 10**9,
    probed_fraction: float = 1.0,
) -> dict[str, float]:
    """Disk and Redis use of a run at ``total_steps`` -> bytes per kind and in all.

    ``steps_per_update`` is num_envs x num_steps, ``checkpoint_every`` updates per checkpoint;
    ``probed_fraction`` of the checkpoints are probed (1: a worker follows the whole run).
    Checkpoints are numbered by write order as retention numbers them. Returns ``updates``,
    ``checkpoints`` and ``probed`` (counts), the bytes ``checkpoints_bytes``, ``probes_bytes``,
    ``tb_train_bytes``, ``tb_probe_bytes``, ``redis_aof_bytes`` (the upper bound the rewrite
    keeps) and ``disk_bytes`` (their sum), and ``redis_memory_bytes``. Disk bounds by kind:

    - checkpoints: ``min(K, c) * (weights + state + meta) + ceil((c - K) / N) * (weights + meta)``
      for ``c`` checkpoints, keep_last ``K``, keep_every ``N`` (``K = 0``: all ``c`` in full);
    - probe directories: the same counts of full directories, the rest pruned;
    - TensorBoard: ``min(updates, tb_max_points)`` train points (whole updates per point), every
      probed checkpoint's scalars, the images of ``ceil(probed / tb_images_every)``;
    - Redis memory: ``min(c, maxlen)`` checkpoint entries, ``min(p, maxlen)`` results,
      ``min(p, 2 * maxlen)`` done marks; the AOF at most ``max(min_size, 2 * memory)``.
    """
    if steps_per_update <= 0 or checkpoint_every <= 0 or total_steps < 0:
        raise LoupeError("steps_per_update and checkpoint_every must be positive, steps >= 0")
    if not 0.0 <= probed_fraction <= 1.0:
        raise LoupeError(f"probed_fraction must be in [0, 1], got {probed_fraction}")
    r, s = retention, sizes
    updates = -(-total_steps // steps_per_update)
    checkpoints = -(-updates // checkpoint_every)
    probed = math.ceil(checkpoints * probed_fraction)
    newest, older = _kept(checkpoints, r.checkpoint_keep_last, r.checkpoint_keep_every)
    ckpt_bytes = newest * (
        s.checkpoint_weights + s.checkpoint_state + s.checkpoint_meta
    ) + older * (s.checkpoint_weights + s.checkpoint_meta)
    newest, older = _kept(probed, r.probe_keep_last, r.probe_keep_every)
    full = newest + older
    probe_bytes = full * s.probe_full + (probed - full) * s.probe_pruned
    tb_train = -(-updates // tb_interval(updates, r.tb_max_points)) * s.tb_train_per_point
    images = -(-probed // r.tb_images_every) if r.tb_images_every else 0
    tb_probe = probed * s.tb_probe_scalars + images * s.tb_probe_images
    memory = (
        min(checkpoints, r.stream_maxlen) * s.redis_checkpoint_entry
        + min(probed, r.stream_maxlen) * s.redis_result_entry
        + min(probed, 2 * r.stream_maxlen) * s.redis_done_mark
    )
    aof = max(r.aof_rewrite_min_bytes, 2 * memory)
    disk = ckpt_bytes + probe_bytes + tb_train + tb_probe + aof
    return {
        "total_steps": total_steps,
        "updates": updates,
        "checkpoints": checkpoints,
        "probed": probed,
        "checkpoints_bytes": ckpt_bytes,
        "probes_bytes": probe_bytes,
        "tb_train_bytes": tb_train,
        "tb_probe_bytes": tb_probe,
        "redis_aof_bytes": aof,
        "disk_bytes": disk,
        "redis_memory_bytes": memory,
    }
