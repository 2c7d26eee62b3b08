"""Run-directory layout. One run per directory; a directory never silently takes a second run.

<run_dir>/config.json        the TrainConfig of the run (JSON, saved before the first step)
<run_dir>/checkpoints/       ckpt-<step>.safetensors + .json (+ .state.safetensors)
<run_dir>/tb/                TensorBoard event files (training and probe scalars)
<run_dir>/redis/             the embedded Redis server's AOF and password file
<run_dir>/probes/            probe artifacts per checkpoint
<run_dir>/eval/              evaluation results
"""

from __future__ import annotations

import re
from pathlib import Path

from loupe.errors import LoupeError

CONFIG_NAME = "config.json"
#: a checkpoint's metadata file; group 1 is its step
CHECKPOINT_JSON = re.compile(r"ckpt-(\d{12})\.json$")


def checkpoint_names(run_dir: str | Path) -> list[str]:
    """Names of a run's checkpoint JSON files, oldest first ([] without a checkpoints folder).

    Plain file names, without torch: for the processes that watch a run (the supervisor, the
    soak harness) and must stay small.
    """
    try:
        names = list((Path(run_dir) / "checkpoints").iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(p.name for p in names if CHECKPOINT_JSON.search(p.name))


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_NAME

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def tb(self) -> Path:
        return self.path / "tb"

    @property
    def redis(self) -> Path:
        return self.path / "redis"

    @property
    def probes(self) -> Path:
        return self.path / "probes"

    @property
    def run_id(self) -> str:
        return run_id_for(self.path)

    def holds_run(self) -> bool:
        return self.config_path.is_file()

    def check_new(self) -> None:
        """Refuse a directory that already holds a run or other files."""
        if self.holds_run():
            raise LoupeError(
                f"{self.path} already holds a run; pass --resume to continue it or choose a new --run-dir"
            )
        if self.path.exists() and not self.path.is_dir():
            raise LoupeError(f"{self.path} exists and is not a directory; choose another --run-dir")
        if self.path.is_dir() and any(self.path.iterdir()):
            raise LoupeError(
                f"{self.path} is not empty and holds no loupe run; choose an empty or new --run-dir"
            )

    def create(self) -> None:
        """Make a fresh run directory (after ``check_new``)."""
        self.check_new()
        for sub in (self.path, self.checkpoints, self.tb):
            sub.mkdir(parents=True, exist_ok=True)

    def require_run(self) -> None:
        if not self.holds_run():
            raise LoupeError(f"{self.path} holds no loupe run (no {CONFIG_NAME}); check the path")


def run_id_for(path: str | Path) -> str:
    """A Redis-key-safe run id from the directory name."""
    name = Path(path).resolve().name or "run"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)
