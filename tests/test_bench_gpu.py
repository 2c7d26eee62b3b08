"""`loupe bench --gpu` (make bench-gpu): refuses a machine without CUDA in one line, and its whole
code path runs as a CPU dry run (--device cpu --quick) that writes every figure."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from loupe.bench import GpuBenchConfig, run_gpu_benchmarks
from loupe.errors import LoupeError

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


def positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


@pytest.mark.unit
@no_cuda
def test_without_cuda_the_gpu_benchmark_is_refused():
    with pytest.raises(LoupeError, match="needs a CUDA device"):
        run_gpu_benchmarks(GpuBenchConfig(), echo=lambda _: None)
    with pytest.raises(LoupeError, match="add --quick"):
        run_gpu_benchmarks(GpuBenchConfig(device="cpu"), echo=lambda _: None)


@pytest.mark.unit
def test_parts_that_do_not_fit_the_budget_are_skipped_and_listed():
    out = run_gpu_benchmarks(
        GpuBenchConfig(device="cpu", quick=True, budget_s=1e-9), echo=lambda _: None
    )
    assert out["end_to_end"]["runs"] == [] and out["learner"]["runs"] == []
    assert "evaluate" not in out
    assert out["skipped"] == [
        "end_to_end actors=1",
        *[f"learner learners=1 {p}" for p in ("fp32", "bf16", "fp32", "bf16")],
        "ig interpretable/2b B=2",
        "evaluate",
    ]


@pytest.mark.integration
@no_cuda
def test_make_bench_gpu_without_cuda_says_so_in_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "-m", "loupe.cli", "bench", "--gpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert lines == [lines[-1]] and lines[0].startswith("loupe: error: bench --gpu needs a CUDA")
    assert not out.exists()


@pytest.mark.integration
@pytest.mark.slow  # its parts have their own tests; the whole goes to make test-all
def test_cpu_dry_run_writes_every_figure(tmp_path):
    """The tiny dry run goes through every part (Ray actors with central inference, the learner in
    fp32 and bf16, IG, Ray evaluators) and the JSON holds each figure, finite and positive."""
    out = tmp_path / "gpu.json"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "loupe.cli", "bench", "--gpu", "--device", "cpu",
                           "--quick", "--out", str(out)], capture_output=True, text=True,
                          timeout=600, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["skipped"] == []
    assert set(res) >= {"machine", "config", "sizes", "end_to_end", "learner", "ig", "evaluate",
                        "bench_seconds", "created"}  # fmt: skip
    (run,) = res["end_to_end"]["runs"]
    assert run["actors"] == 1 and run["num_envs"] == 2
    for key in ("steps_per_s", "sampling_steps_per_s", "update_steps_per_s"):
        assert positive(run[key]), key
    # end to end is sampling and updating one after the other: slower than either alone
    assert run["steps_per_s"] < min(run["sampling_steps_per_s"], run["update_steps_per_s"])
    assert res["end_to_end"]["best_steps_per_s"] == run["steps_per_s"]
    runs = res["learner"]["runs"]
    assert [(r["learners"], r["precision"]) for r in runs] == [
        (1, "fp32"), (1, "bf16"), (1, "fp32"), (1, "bf16")]  # fmt: skip
    assert all(positive(r["steps_per_s"]) for r in runs)
    for p in ("fp32", "bf16"):
        mean = sum(r["steps_per_s"] for r in runs if r["precision"] == p) / 2
        assert res["learner"][f"learners_1_{p}_steps_per_s"] == pytest.approx(mean)
    ig = res["ig"]["interpretable/2b"]["2"]
    assert ig["batch"] == 2 and positive(ig["obs_per_s"])
    assert ig["obs_per_s"] == pytest.approx(2 / ig["seconds"])
    assert res["evaluate"]["levels"] == 2 and positive(res["evaluate"]["levels_per_s"])
    assert res["config"]["quick"] is True and res["config"]["device"] == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_quick_gpu_run_on_cuda(tmp_path):
    out = run_gpu_benchmarks(GpuBenchConfig(device="cuda", quick=True), echo=lambda _: None)
    assert out["skipped"] == [] and positive(out["end_to_end"]["best_steps_per_s"])
    assert out["machine"]["cuda"]
