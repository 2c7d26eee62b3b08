"""The `loupe` command end to end: tiny real training runs and every bad input the user can give."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TINY = [
    "--env", "procgen:coinrun", "--policy", "nature", "--num-envs", "2", "--num-steps", "16",
    "--minibatches", "2", "--epochs", "1", "--checkpoint-every", "1", "--no-progress",
    "--no-announce",
]  # fmt: skip


def loupe(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, "-m", "loupe.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.startswith("loupe: error:")]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def snapshot(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def steps_of(run: Path) -> list[int]:
    return sorted(
        json.loads(p.read_text())["step"] for p in (run / "checkpoints").glob("ckpt-*[0-9].json")
    )


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "tiny"
    proc = loupe("train", *TINY, "--total-steps", "64", "--run-dir", str(run))
    assert proc.returncode == 0, proc.stderr
    return run


@pytest.mark.integration
def test_train_writes_config_checkpoints_and_tensorboard(trained_run: Path):
    config = json.loads((trained_run / "config.json").read_text())
    assert config["env"]["env_id"] == "procgen:coinrun"
    assert config["policy"] == "nature" and config["ppo"]["total_steps"] == 64
    metas = sorted((trained_run / "checkpoints").glob("ckpt-*[0-9].json"))
    assert metas, "no checkpoint written"
    last = json.loads(metas[-1].read_text())
    assert last["step"] == 64 and len(last["sha256"]) == 64
    assert list((trained_run / "tb").glob("events.out.tfevents.*"))


@pytest.mark.integration
def test_run_dir_holding_a_run_is_refused_and_untouched(trained_run: Path):
    before = snapshot(trained_run)
    proc = loupe("train", *TINY, "--total-steps", "32", "--run-dir", str(trained_run))
    assert_one_line_error(proc, "already holds a run", "--resume")
    assert snapshot(trained_run) == before


@pytest.mark.integration
@pytest.mark.parametrize(
    "args, needles",
    [
        (["--env", "procgen:nosuchgame"], ["nosuchgame"]),
        (["--env", "Atari/Breakout"], ["Atari/Breakout"]),
        (["--policy", "resnet9000"], ["resnet9000", "impala"]),
        (["--total-steps", "0"], ["--total-steps"]),
        (["--num-envs", "-1"], ["--num-envs"]),
        (["--preset", "mujoco"], ["mujoco", "procgen"]),
        (["--env-option", "num_levelz=3"], ["num_levelz"]),
    ],
)
def test_bad_train_input_gives_one_line(tmp_path: Path, args, needles):
    base = {"--env": "procgen:coinrun", "--policy": "nature", "--total-steps": "32"}
    flags = dict(base)
    extra = []
    it = iter(args)
    for flag in it:
        if flag in base:
            flags[flag] = next(it)
        else:
            extra += [flag, next(it)]
    argv = [x for kv in flags.items() for x in kv] + extra
    run = tmp_path / "run"
    proc = loupe("train", *argv, "--run-dir", str(run), "--no-progress", "--no-announce")
    assert_one_line_error(proc, *needles)
    assert not run.exists(), "a refused run must leave nothing behind"


@pytest.mark.integration
def test_resume_can_change_the_update_speed_settings_and_records_them(
    trained_run: Path, tmp_path: Path, capsys
):
    """--precision, --channels-last and --compile on --resume replace the run's settings (said
    in one line each, kept in config.json for later resumes); every other setting stays. Each
    resume continues the step counter of the checkpoint it starts from (64, then 96)."""
    import shutil

    run = tmp_path / "faster"
    shutil.copytree(trained_run, run)
    before = json.loads((run / "config.json").read_text())
    proc = loupe("train", "--resume", str(run), "--total-steps", "96", "--precision", "fp32",
                 "--channels-last", "on", "--compile", "off", "--lr", "0.1", "--no-progress")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "resumed with precision fp32 (was auto)" in proc.stdout
    assert "resumed with channels_last on (was auto)" in proc.stdout
    assert "compile" not in proc.stdout  # already off: nothing changes, nothing said
    after = json.loads((run / "config.json").read_text())
    assert after["ppo"]["precision"] == "fp32" and after["ppo"]["channels_last"] is True
    # the rest as saved, --total-steps included (it applies to this resume only, as before);
    # --lr is no speed setting: a resumed run keeps its own
    changed = {"precision", "channels_last"}
    assert {k: v for k, v in after["ppo"].items() if k not in changed} == {
        k: v for k, v in before["ppo"].items() if k not in changed
    }
    assert {k: v for k, v in after.items() if k != "ppo"} == {
        k: v for k, v in before.items() if k != "ppo"
    }
    assert steps_of(run)[-1] == 96 and 64 in steps_of(run)
    # a plain resume (the CLI's entry point in this process): the recorded settings hold
    from loupe.cli import main

    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--total-steps", "128", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "done at step 128" in out and "resumed with" not in out
    assert steps_of(run)[-1] == 128 and 96 in steps_of(run)
    assert json.loads((run / "config.json").read_text()) == after


@pytest.mark.integration
def test_resume_with_bf16_on_a_cpu_without_it_is_one_line_and_changes_nothing(
    trained_run: Path, tmp_path: Path, monkeypatch, capsys
):
    import shutil

    import learner.ppo as ppo_mod
    from loupe.cli import main

    run = tmp_path / "nobf16"
    shutil.copytree(trained_run, run)
    before = snapshot(run)
    monkeypatch.setattr(ppo_mod, "cpu_bf16_feature", lambda: None)
    rc = main(["train", "--resume", str(run), "--total-steps", "96", "--precision", "bf16",
               "--no-progress"])  # fmt: skip
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("loupe")]
    assert rc == 2
    assert err == [
        "loupe: error: precision bf16 needs a CPU with AVX512-BF16 or AMX, and this one has "
        "neither (see the flags in /proc/cpuinfo); use --precision fp32"
    ]
    assert snapshot(run) == before


@pytest.mark.integration
def test_resume_from_truncated_checkpoint_is_refused(trained_run: Path, tmp_path: Path, capsys):
    import shutil

    from loupe.cli import main

    run = tmp_path / "broken"
    shutil.copytree(trained_run, run)
    weights = sorted((run / "checkpoints").glob("ckpt-*[0-9].safetensors"))[-1]
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    before = snapshot(run)
    argv = ["train", "--resume", str(run), "--total-steps", "96", "--no-progress"]
    status = main(argv)  # the CLI's entry point in this process
    out, err = capsys.readouterr()
    assert_one_line_error(subprocess.CompletedProcess(argv, status, out, err), weights.name)
    assert snapshot(run) == before


@pytest.mark.integration
def test_resume_of_a_directory_without_a_run(tmp_path: Path):
    proc = loupe("train", "--resume", str(tmp_path / "nothing"), "--no-progress")
    assert_one_line_error(proc, "holds no loupe run")


@pytest.mark.unit
def test_parse_options_types_and_errors():
    from loupe.cli import parse_options
    from loupe.errors import LoupeError

    assert parse_options(["a=1", "b=0.5", "c=true", "d=easy", "e-f=none"], "--x") == {
        "a": 1,
        "b": 0.5,
        "c": True,
        "d": "easy",
        "e_f": None,
    }
    with pytest.raises(LoupeError, match="KEY=VALUE"):
        parse_options(["novalue"], "--x")
