"""`loupe bench`: the JSON it writes holds every figure, finite and positive, from real envs and Ray."""

from __future__ import annotations

import math

import pytest

from loupe.bench import BenchConfig, run_benchmarks
from loupe.errors import LoupeError


@pytest.mark.unit
def test_unknown_benchmark_is_refused():
    with pytest.raises(LoupeError, match="unknown benchmark"):
        run_benchmarks(BenchConfig(only=("nope",)), echo=lambda _: None)


@pytest.mark.integration
def test_pipeline_benchmark_reports_both_placements():
    import ray

    try:
        out = run_benchmarks(BenchConfig(only=("pipeline",), seconds=0.3), echo=lambda _: None)
    finally:
        ray.shutdown()
    res = out["pipeline"]
    for key in ("raw_env_steps_per_s", "inference_steps_per_s", "single_actor_limit_steps_per_s",
                "actors_1_steps_per_s", "actors_2_steps_per_s", "central_actors_1_steps_per_s"):  # fmt: skip
        assert math.isfinite(res[key]) and res[key] > 0, key
    # the limit is the serial combination of env and inference: below either rate alone
    assert res["single_actor_limit_steps_per_s"] < min(
        res["raw_env_steps_per_s"], res["inference_steps_per_s"]
    )
    assert res["actors_1_vs_single_actor_limit"] == pytest.approx(
        res["actors_1_steps_per_s"] / res["single_actor_limit_steps_per_s"]
    )


@pytest.mark.unit
def test_on_request_benchmarks_are_not_in_the_default_run():
    from loupe.bench import BENCHMARKS, ON_REQUEST

    assert {"peer", "ig_captum", "profile"} <= ON_REQUEST <= set(BENCHMARKS)
    assert "update" in BENCHMARKS and "update" not in ON_REQUEST


@pytest.mark.unit
def test_peer_benchmark_without_its_environment_says_how_to_build_it(tmp_path):
    with pytest.raises(LoupeError, match="make bench-peer"):
        run_benchmarks(
            BenchConfig(only=("peer",), peer_python=str(tmp_path / "none/bin/python")),
            echo=lambda _: None,
        )


@pytest.mark.integration
def test_update_lever_worker_reports_rate_and_cpu_times():
    from loupe.bench import update_step_worker

    out = update_step_worker("impala", {"micro_batch": 32}, minibatch=64, steps=1)
    assert out["samples_per_s"] > 0 and out["user_s"] > 0 and out["system_s"] >= 0
    assert out["precision"] in ("fp32", "bf16")
