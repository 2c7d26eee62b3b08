"""Documentation that can be checked: the README's Python example runs, docs/outputs.md names every
field loupe writes, the public API has docstrings, and results print as summaries."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = (ROOT / "docs" / "outputs.md").read_text()


def tiny_run(root: Path) -> Path:
    """A run directory with one real (untrained) CoinRun checkpoint of the nature network."""
    from attention import build_policy
    from learner.checkpoint import save_checkpoint

    run = root / "run"
    policy = build_policy("nature", (3, 64, 64), 15)
    meta = {"step": 32, "run_id": "run", "env": "procgen:coinrun", "env_options": {}}
    save_checkpoint(run, policy, meta)
    return run


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("### From Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.integration
def test_readme_python_example_runs(tmp_path):
    run = tiny_run(tmp_path)
    code = readme_example()
    assert '"runs/coinrun"' in code
    code = code.replace('"runs/coinrun"', repr(str(run)))
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert "taking its newest checkpoint" in lines[0] and "ckpt-000000000032.json" in lines[0]
    assert lines[1].startswith("Attribution(layer='c2', 8 observation(s) x 2 target(s)")
    assert "[value, logit:2]" in lines[1] and "tensor(" not in proc.stdout
    assert lines[2].startswith("torch.Size([8, 64, 6, 6]) ")
    assert float(lines[2].rsplit(" ", 1)[1]) < 1e-2  # completeness holds at 10 steps


@pytest.mark.unit
def test_attribution_prints_a_summary_not_tensors():
    import torch

    from attention import build_policy
    from probes import IntegratedGradients

    torch.manual_seed(0)
    policy = build_policy("nature", (3, 64, 64), 15).eval()
    obs = torch.randint(0, 255, (3, 3, 64, 64), dtype=torch.uint8)
    res = IntegratedGradients(policy, "c3", n_steps=4).attribute(obs, "all")
    text = repr(res)
    assert "tensor(" not in text and len(text) < 300
    assert text.startswith("Attribution(layer='c3', 3 observation(s) x 16 target(s)")
    assert "value, logit:0, logit:1, logit:2, logit:3, ... (11 more)" in text
    assert "layer shape (64, 4, 4)" in text
    delta = res.delta.abs().max().item()
    assert f"max |completeness delta| {delta:.3g}" in text
    summary = res.summary()
    assert summary["targets"][0] == "value" and len(summary["targets"]) == 16
    assert summary["observations"] == 3 and summary["layer_shape"] == [64, 4, 4]
    assert summary["max_abs_delta"] == pytest.approx(delta)
    assert str(res) == text
    assert "completeness delta| n/a" in repr(
        IntegratedGradients(policy, "input").attribute(obs, "value")
    )


def public_api():
    for package in ("probes", "learner", "actors", "attention"):
        module = importlib.import_module(package)
        names = getattr(module, "__all__", None) or [n for n in vars(module) if n[0] != "_"]
        for name in names:
            obj = getattr(module, name)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                yield f"{package}.{name}", obj


@pytest.mark.unit
def test_public_api_has_docstrings():
    missing = []
    for name, obj in public_api():
        if not (inspect.getdoc(obj) or "").strip() or (
            dataclasses.is_dataclass(obj) and obj.__doc__.startswith(obj.__name__ + "(")
        ):
            missing.append(name)
        if inspect.isclass(obj):
            for attr, value in vars(obj).items():
                if attr.startswith("_"):
                    continue
                fn = (
                    value.fget if isinstance(value, property) else getattr(value, "__func__", value)
                )
                if inspect.isfunction(fn) and not (fn.__doc__ or "").strip():
                    missing.append(f"{name}.{attr}")
    assert not missing, f"no docstring: {', '.join(missing)}"
    import learner

    assert learner.load_checkpoint is importlib.import_module("learner.checkpoint").load_checkpoint


@pytest.mark.unit
def test_outputs_doc_names_every_config_field():
    from actors import EnvConfig
    from learner import PPOConfig
    from loupe.supervise import SuperviseConfig
    from loupe.train import TrainConfig

    for cls in (TrainConfig, EnvConfig, PPOConfig, SuperviseConfig):
        missing = [f.name for f in dataclasses.fields(cls) if f"`{f.name}`" not in OUTPUTS]
        assert not missing, f"docs/outputs.md lacks {cls.__name__} fields {missing}"


@pytest.mark.unit
def test_outputs_doc_names_every_checkpoint_and_record_field(tmp_path):
    import json

    from actors.evaluator import LevelResult

    run = tiny_run(tmp_path)
    meta = json.loads(next((run / "checkpoints").glob("ckpt-*.json")).read_text())
    missing = [k for k in meta if f"`{k}`" not in OUTPUTS]
    assert not missing, f"docs/outputs.md lacks checkpoint metadata fields {missing}"
    missing = [f.name for f in dataclasses.fields(LevelResult) if f"`{f.name}`" not in OUTPUTS]
    assert not missing, f"docs/outputs.md lacks evaluation record fields {missing}"
    for name in ("config.json", "summary.json", "eval.json", "results.json", ".jsonl", "tb/",
                 "redis/", ".state.safetensors", "failure_causes.png"):  # fmt: skip
        assert name in OUTPUTS, name
