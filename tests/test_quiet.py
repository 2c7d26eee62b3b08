"""A user sees only loupe's own lines: no gym notice, no Ray notices or core_worker lines, no
warnings, no pip warnings in set-up."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOISE = ("gym", "Gym", "core_worker", "Token authentication", "Warning", "WARNING", "Traceback")


def loupe(*args: str, timeout: float = 400, **extra_env: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"} | extra_env
    return subprocess.run(
        [sys.executable, "-m", "loupe.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def assert_quiet(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr
    noise = [line for line in proc.stderr.splitlines() if any(n in line for n in NOISE)]
    assert not noise, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr


@pytest.mark.integration
@pytest.mark.parametrize("command", ["policies", "envs"])
def test_listing_commands_print_nothing_on_stderr(command):
    proc = loupe(command)
    assert_quiet(proc)
    assert proc.stdout.strip()


@pytest.mark.integration
def test_train_with_a_ray_actor_and_evaluate_on_ray_are_quiet_and_leave_no_ray_session(tmp_path):
    """Each command's local Ray also takes its session directory (logs, sockets) with it: a run
    restarted for days left one behind per start."""
    run = tmp_path / "run"
    # a short path of its own: Ray's socket paths must fit in 107 bytes
    ray_tmp = Path(tempfile.mkdtemp(prefix="lr", dir="/tmp"))
    try:
        proc = loupe(
            "train", "--env", "procgen:coinrun", "--policy", "nature", "--num-envs", "2",
            "--num-steps", "16", "--minibatches", "2", "--epochs", "1", "--total-steps", "32",
            "--actors", "1", "--no-progress", "--no-announce", "--run-dir", str(run),
            RAY_TMPDIR=str(ray_tmp),
        )  # fmt: skip
        assert_quiet(proc)
        assert (ray_tmp / "ray").is_dir()  # the run's Ray lived here
        assert not list((ray_tmp / "ray").glob("session_*")), list((ray_tmp / "ray").iterdir())
        proc = loupe(
            "evaluate", "--checkpoint", str(run), "--levels", "1", "--workers", "1", "--slots",
            "1", "--chunk", "1", "--no-progress", "--out", str(tmp_path / "eval"),
            RAY_TMPDIR=str(ray_tmp),
        )  # fmt: skip
        assert_quiet(proc)
        assert "taking its newest checkpoint" in proc.stdout and "complete" in proc.stdout
        assert not list((ray_tmp / "ray").glob("session_*")), list((ray_tmp / "ray").iterdir())
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.unit
def test_procgen_import_drops_only_the_gym_notice(capsys):
    code = (
        "import sys; from actors.procgen_env import import_procgen; import_procgen(); "
        "print('after', file=sys.stderr)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "after\n"


def pip_install_command() -> list[str]:
    text = (ROOT / "Makefile").read_text()
    line = re.search(r"^PIP_ARGS := (.+)$", text, re.M).group(1)
    return [sys.executable, *line.split()]


@pytest.mark.unit
def test_setup_installs_only_through_the_quiet_pip_command():
    text = (ROOT / "Makefile").read_text()
    installs = [line for line in text.splitlines() if "pip install" in line]
    assert installs == [next(l for l in installs if l.startswith("PIP_ARGS :="))]
    assert "--quiet --quiet" in installs[0]
    setup = text.split("$(STAMP): pyproject.toml", 1)[1].split("\n\n", 1)[0]
    assert setup.count("$(PIP_INSTALL)") == 3


@pytest.mark.integration
def test_quiet_pip_shows_errors_but_not_index_warnings(tmp_path):
    pip = pip_install_command()
    proc = subprocess.run(
        [*pip, "--dry-run", "--no-deps", "--ignore-installed", "gym3"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "WARNING" not in proc.stderr + proc.stdout
    proc = subprocess.run(
        [*pip, "--dry-run", "--no-deps", str(tmp_path / "no-such-project")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode != 0 and "ERROR" in proc.stderr
