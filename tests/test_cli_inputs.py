"""Every subcommand over a corpus of bad values: exit status 2, one `loupe: error:` line, no
traceback, nothing written. Runs `loupe.cli.main(argv)` in-process (fast), plus a few real
subprocesses; every number option of every subcommand is tried with out-of-range values."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loupe.cli import main, make_parser

PNG = bytes.fromhex("89504e470d0a1a0a0000000d49484452") + os.urandom(64)


def subparsers() -> dict[str, argparse.ArgumentParser]:
    from loupe.cli import _load_extra_commands

    _load_extra_commands()
    parser = make_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def options(parser: argparse.ArgumentParser):
    return [a for a in parser._actions if a.option_strings and a.dest != "help"]


def snapshot(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A run directory with two real (untrained) checkpoints, and files of the wrong kind."""
    from attention import build_policy
    from learner.checkpoint import save_checkpoint
    from loupe.cli import build_train_config, train_namespace

    root = tmp_path_factory.mktemp("inputs")
    run = root / "run"
    ns = train_namespace(env="procgen:coinrun", policy="nature", run_dir=str(run), total_steps=64)
    config = build_train_config(ns)
    (run / "checkpoints").mkdir(parents=True)
    config.save(run / "config.json")
    policy = build_policy("nature", (3, 64, 64), 15)
    for step in (32, 64):
        meta = {"step": step, "run_id": "run", "env": "procgen:coinrun", "env_options": {}}
        newest = save_checkpoint(run, policy, meta)
    truncated = root / "truncated" / "checkpoints"
    truncated.mkdir(parents=True)
    for p in (run / "checkpoints").glob("ckpt-000000000064*"):
        data = p.read_bytes()
        (truncated / p.name).write_bytes(
            data[: len(data) // 2] if "safetensors" in p.name else data
        )
    garbled = root / "garbled" / "checkpoints"
    garbled.mkdir(parents=True)
    (garbled / newest.name).write_bytes(newest.read_bytes())
    size = len(newest.with_suffix(".safetensors").read_bytes())
    (garbled / newest.with_suffix(".safetensors").name).write_bytes(os.urandom(size))
    (root / "picture.json").write_bytes(PNG)
    (root / "picture.npy").write_bytes(PNG)
    (root / "noise.safetensors").write_bytes(os.urandom(256))
    (root / "ckpt-000000000001.json").write_text("[1, 2, 3]\n")
    (root / "notes.txt").write_text("not a checkpoint\n")
    (root / "summary.json").write_text(
        json.dumps({"layer": "c3", "nmf": {"directions": [[1.0] * 64]}})
    )
    (root / "nodirs.json").write_text(json.dumps({"layer": "c3"}))
    (root / "otherlayer.json").write_text(
        json.dumps({"layer": "c2", "nmf": {"directions": [[1.0] * 64]}})
    )
    (root / "direction.npy").write_bytes(b"")
    import numpy as np

    np.save(root / "short.npy", np.ones(3))
    (root / "empty").mkdir()
    (root / "full").mkdir()
    (root / "full" / "x").write_text("x")
    return {
        "root": root,
        "run": run,
        "ckpt": newest,
        "truncated": truncated / newest.name,
        "garbled": garbled / newest.name,
    }


def bad_checkpoints(w) -> list[str]:
    r = w["root"]
    return [
        "",
        " ",
        str(r / "empty"),  # a directory without checkpoints
        str(r),  # a directory of other things
        str(r / "nope.json"),  # missing
        str(w["run"] / "checkpoints" / "ckpt-000000000099.json"),  # missing, others listed
        str(r / "picture.json"),  # a PNG named .json
        str(r / "noise.safetensors"),  # random bytes named .safetensors
        str(r / "ckpt-000000000001.json"),  # JSON, not an object
        str(r / "notes.txt"),  # a file of the wrong kind
        str(w["truncated"]),  # truncated weights
        str(w["garbled"]),  # weights replaced by random bytes of the right size
    ]


def bad_out_dirs(w) -> list[str]:
    r = w["root"]
    return ["", str(r / "notes.txt"), str(r / "notes.txt" / "below")]


def bad_runs(w) -> list[str]:
    r = w["root"]
    return ["", str(r / "missing-run"), str(r / "notes.txt"), str(r / "empty"), str(r / "full")]


def path_cases(w) -> list[tuple[list[str], str]]:
    """(argv, bad value) for every path option of every subcommand; the other options are valid."""
    r, ckpt, run = w["root"], str(w["ckpt"]), str(w["run"])
    fresh = str(r / "fresh-out")
    cases: list[tuple[list[str], str]] = []
    for v in bad_checkpoints(w):
        cases += [
            (["probe", "--checkpoint", v, "--out", fresh], v),
            (
                [
                    "edit",
                    "--checkpoint",
                    v,
                    "--layer",
                    "c3",
                    "--direction",
                    "nmf:0",
                    "--nmf",
                    str(r / "summary.json"),
                    "--out",
                    fresh,
                ],
                v,
            ),  # fmt: skip
            (["evaluate", "--checkpoint", v, "--levels", "2", "--workers", "0", "--out", fresh], v),
            (
                [
                    "evaluate",
                    "--checkpoint",
                    ckpt,
                    "--checkpoint",
                    v,
                    "--workers",
                    "0",
                    "--out",
                    fresh,
                ],
                v,
            ),  # fmt: skip
        ]
    for v in bad_out_dirs(w):
        cases += [
            (["probe", "--checkpoint", ckpt, "--out", v], v),
            (
                [
                    "edit",
                    "--checkpoint",
                    ckpt,
                    "--layer",
                    "c3",
                    "--direction",
                    "nmf:0",
                    "--nmf",
                    str(r / "summary.json"),
                    "--out",
                    v,
                ],
                v,
            ),  # fmt: skip
            (["evaluate", "--checkpoint", ckpt, "--workers", "0", "--out", v], v),
            (["compare-placements", "--out", v], v),
            (["demo", "--run-dir", v], v),
            (
                [
                    "train",
                    "--env",
                    "procgen:coinrun",
                    "--total-steps",
                    "64",
                    "--no-announce",
                    "--run-dir",
                    v,
                ],
                v,
            ),  # fmt: skip
        ]
    for v in ["", str(r / "notes.txt" / "x.json"), str(r / "empty")]:
        cases.append((["bench", "--out", v, "--only", "env_steps"], v))
    cases.append((["bench", "--only", "nosuchbench", "--out", str(r / "b.json")], "nosuchbench"))
    cases.append((["train", "--env", "procgen:coinrun", "--total-steps", "64", "--no-announce", "--run-dir",
                   str(r / "full")], str(r / "full")))  # fmt: skip
    cases.append((["train", "--env", "procgen:coinrun", "--total-steps", "64", "--no-announce", "--run-dir", run],
                  run))  # fmt: skip
    for v in bad_runs(w) + [str(w["truncated"].parent.parent)]:
        cases += [
            (["train", "--resume", v, "--no-progress"], v),
            (["probe", "--run", v, "--exit-when-idle", "0"], v),
        ]
    edit = ["edit", "--checkpoint", ckpt, "--layer", "c3", "--out", fresh]
    for v in ["", str(r / "missing.json"), str(r / "empty"), str(r / "picture.json"),
              str(r / "ckpt-000000000001.json"), str(r / "nodirs.json"),
              str(r / "otherlayer.json")]:  # fmt: skip
        cases.append((edit + ["--direction", "nmf:0", "--nmf", v], v))
    for v in ["", str(r / "missing.npy"), str(r / "empty"), str(r / "picture.npy"), "nmf:x",
              "nmf:1", "nmf:-1", str(r / "direction.npy"), str(r / "short.npy")]:  # fmt: skip
        cases.append((edit + ["--direction", v, "--nmf", str(r / "summary.json")], v))
    cases.append((["probe", "--checkpoint", ckpt, "--out", fresh, "--layer", "nosuchlayer"],
                  "nosuchlayer"))  # fmt: skip
    cases.append((["probe", "--checkpoint", ckpt], "--out"))
    # other values of the wrong kind
    train = ["train", "--env", "procgen:coinrun", "--total-steps", "64", "--no-progress",
             "--no-announce", "--run-dir", str(r / "new-run")]  # fmt: skip
    for flag, value in [("--device", "foo"), ("--device", ""), ("--env-option", "num_levels=abc"),
                        ("--env-option", "distribution_mode=weird"), ("--env-option", "novalue"),
                        ("--policy-option", "x=y"),
                        ("--inference", "gpu"), ("--precision", "fp8"), ("--preset", "mujoco"),
                        ("--policy", "resnet9000"), ("--env", "")]:  # fmt: skip
        cases.append((train + [flag, value], value or flag))
    cases.append((train + ["--actors", "1", "--ray-address", "nohost:port"], "nohost:port"))
    for flag, value in [("--policy", "nosuch"), ("--env", "ALE/Pong-v5"),
                        ("--distribution-mode", "weird"), ("--placements", "gpu")]:  # fmt: skip
        cases.append((["compare-placements", flag, value, "--out", fresh], value))
    cases.append((["evaluate", "--checkpoint", ckpt, "--distribution-mode", "weird", "--out", fresh],
                  "weird"))  # fmt: skip
    cases.append((["evaluate", "--checkpoint", ckpt, "--start-level", str(2**31 - 1), "--levels",
                   "2", "--out", fresh], "--start-level"))  # fmt: skip
    cases.append(
        (["probe", "--run", run, "--redis", "notaurl", "--exit-when-idle", "0"], "notaurl")
    )
    return cases


def number_values(action: argparse.Action) -> list[str]:
    """Values every number option must refuse: empty, not a number, below and above its range."""
    lo, hi = action.type.bounds
    values = ["", "abc"]
    if hi < float("inf"):
        values.append("1" + "0" * 30)  # huge
    if action.type.__name__ == "int":
        values += ["1.5", str(lo - 1)]
        if hi < 2**63 - 1:
            values.append(str(hi + 1))
    else:
        values += ["nan", "inf", "-inf"]
        if lo > -float("inf"):
            values.append(str(lo - 1))
    return values


def number_cases() -> list[tuple[str, str, str]]:
    cases = []
    for name, parser in subparsers().items():
        for action in options(parser):
            if getattr(action.type, "bounds", None) is not None:
                for value in number_values(action):
                    cases.append((name, action.option_strings[0], value))
    return cases


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> str:
    assert code == 2, f"exit status {code}; stderr: {err}"
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("loupe: error:")]
    assert len(lines) == 1, err
    assert any(n in lines[0] for n in needles), f"{lines[0]!r} names none of {needles}"
    return lines[0]


@pytest.mark.unit
def test_every_number_option_is_range_checked():
    """No option takes a bare int or float: each one is a bounded type the corpus below covers."""
    for name, parser in subparsers().items():
        for action in options(parser):
            flag = f"loupe {name} {action.option_strings[0]}"
            assert action.type not in (int, float), flag
            if getattr(action.type, "bounds", None) is not None:
                assert action.type.bounds[1] < float("inf"), f"{flag} has no upper bound"


@pytest.mark.unit
@pytest.mark.parametrize("command, flag, value", number_cases())
def test_bad_numbers_give_one_line(command, flag, value, capsys, tmp_path):
    code, _, err = run_main([command, flag, value], capsys)
    line = assert_one_line_error(code, err, flag)
    assert "--help" in line


@pytest.mark.integration
def test_bad_paths_give_one_line(world, capsys):
    before = snapshot(world["root"])
    failures = []
    for argv, value in path_cases(world):
        code, _, err = run_main(argv, capsys)
        try:
            needles = [value.strip() or "empty", Path(value).name.split(".")[0] or "empty"]
            needles += [part for part in value.split("=") if part]  # K=V options
            needles += [a.lstrip("-") for a in argv if a.startswith("--")]
            assert_one_line_error(code, err, *needles)
        except AssertionError as exc:
            failures.append(f"loupe {' '.join(argv)}: {exc}")
    assert not failures, "\n".join(failures)
    assert snapshot(world["root"]) == before, "a refused command wrote or changed files"
    assert not (world["root"] / "fresh-out").exists()


@pytest.mark.integration
def test_run_directory_means_its_newest_checkpoint(world, capsys):
    from learner.checkpoint import find_checkpoint

    said = []
    for given in (world["run"], world["run"] / "checkpoints"):
        assert find_checkpoint(str(given), say=said.append) == world["ckpt"]
    assert len(said) == 2 and all(world["ckpt"].name in s for s in said)
    assert (
        find_checkpoint(str(world["ckpt"].with_suffix(".safetensors")), say=None) == world["ckpt"]
    )
    code, _, err = run_main(["probe", "--checkpoint", str(world["run"] / "checkpoints" /
                                                        "ckpt-000000000099.json"),
                             "--out", str(world["root"] / "x")], capsys)  # fmt: skip
    line = assert_one_line_error(code, err, "no such checkpoint")
    assert "newest first: ckpt-000000000064.json, ckpt-000000000032.json" in line


@pytest.mark.unit
def test_unexpected_exception_is_one_line_and_exit_1(capsys, monkeypatch):
    import loupe.cli as cli

    def boom(args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(cli, "cmd_policies", boom)
    code, _, err = run_main(["policies"], capsys)
    assert code == 1 and "Traceback" not in err
    assert err.strip().count("\n") == 0, err
    assert err.startswith("loupe: internal error: ZeroDivisionError: division by zero at ")
    assert "loupe -v" in err
    code, _, err = run_main(["-v", "policies"], capsys)
    assert code == 1 and "Traceback" in err and "loupe: internal error:" in err


@pytest.mark.unit
def test_argparse_errors_are_one_line(capsys):
    for argv in (["nosuchcommand"], ["train", "--nosuchflag"], ["probe"], [],
                 ["evaluate", "--out", "x"], ["train", "--inference", "gpu"]):  # fmt: skip
        code, out, err = run_main(argv, capsys)
        assert code == 2 and "Traceback" not in err
        assert err.count("\n") == 1 and err.startswith("loupe: error: "), err
        assert "--help" in err


def loupe_subprocess(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "loupe.cli", *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.integration
def test_real_processes_give_one_line(world):
    r = world["root"]
    for argv, needle in [
        (["probe", "--checkpoint", "", "--out", str(r / "p")], "empty"),
        (["probe", "--checkpoint", str(r / "empty"), "--out", str(r / "p")], "no checkpoints"),
        (["evaluate", "--checkpoint", str(r), "--out", str(r / "e")], "no checkpoints"),
        (
            [
                "edit",
                "--checkpoint",
                str(r / "picture.json"),
                "--layer",
                "c3",
                "--direction",
                "nmf:0",
                "--out",
                str(r / "e"),
            ],
            "not valid JSON",
        ),  # fmt: skip
        (
            ["train", "--env", "procgen:coinrun", "--total-steps", "-5", "--run-dir", str(r / "t")],
            "--total-steps",
        ),  # fmt: skip
    ]:
        proc = loupe_subprocess(*argv)
        assert_one_line_error(proc.returncode, proc.stderr, needle)


def rendered_help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    formatter = parser._get_formatter()
    return formatter._expand_help(action) if action.help else ""


@pytest.mark.unit
def test_every_option_has_help_with_its_default():
    missing = []
    for name, parser in subparsers().items():
        for action in options(parser):
            text = rendered_help(parser, action)
            flag = f"loupe {name} {action.option_strings[0]}"
            if not text.strip():
                missing.append(f"{flag}: no help")
            elif "default" not in text and "required" not in text and not action.required:
                missing.append(f"{flag}: help does not say its default: {text!r}")
            elif (
                action.default is not None
                and action.default is not False
                and not isinstance(action.default, list)
                and str(action.default) not in text
            ):
                missing.append(f"{flag}: help does not show the default {action.default!r}")
    assert not missing, "\n".join(missing)


@pytest.mark.unit
def test_help_of_every_subcommand_exits_0(capsys):
    for name in subparsers():
        code, out, err = run_main([name, "--help"], capsys)
        assert code == 0 and err == "" and "usage: loupe" in out, name
    code, out, _ = run_main(["evaluate", "--help"], capsys)
    assert "levels per checkpoint (default: 10000)" in " ".join(out.split())
