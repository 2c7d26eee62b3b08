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
@pytest.mark.slow  # both placements also train in test_placement; this checks the benchmark's sums
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


@pytest.mark.unit
def test_peer_benchmark_hands_cleanrl_an_absolute_python(tmp_path, monkeypatch):
    """cleanrl runs in a temporary directory: a relative --peer-python (the Makefile's
    .venv-peer/bin/python) must reach it as an absolute path, not resolved through its symlink."""
    import os

    import loupe.bench as bench

    (tmp_path / "venv/bin").mkdir(parents=True)
    (tmp_path / "venv/bin/python3").write_text("")
    (tmp_path / "venv/bin/python").symlink_to("python3")
    monkeypatch.chdir(tmp_path)
    seen = []
    monkeypatch.setattr(bench, "run_loupe_peer", lambda *a: {"steps_per_s": 2.0})

    def cleanrl(python, *args):
        seen.append(python)
        return {"steps_per_s": 1.0}

    monkeypatch.setattr(bench, "run_cleanrl", cleanrl)
    out = bench.bench_peer({"peer_python": "venv/bin/python", "peer_steps": 8, "rounds": 1,
                            "peer_num_envs": 2, "peer_num_steps": 4})  # fmt: skip
    assert seen == [os.path.join(str(tmp_path), "venv/bin/python")]
    assert out["ratio_loupe_over_cleanrl"] == 2.0


@pytest.mark.integration
def test_update_lever_worker_reports_rate_and_cpu_times():
    from loupe.bench import update_step_worker

    out = update_step_worker("impala", {"micro_batch": 32}, minibatch=64, steps=1)
    assert out["samples_per_s"] > 0 and out["user_s"] > 0 and out["system_s"] >= 0
    assert out["precision"] in ("fp32", "bf16")


@pytest.mark.integration
def test_interpretable_ab_worker_alternates_and_reports_cpu_per_sample_and_step():
    from loupe.bench import _medians, update_ab_worker

    names = ["fp32", "defaults (auto: bf16, fused l2 pool, channels_last)", "bf16, channels_last"]
    out = update_ab_worker("interpretable", minibatch=64, steps=1, rounds=2, threads=1,
                           inference_steps=1, only=names)  # fmt: skip
    assert out["threads"] == 1 and set(out["update"]) == set(names)  # in UPDATE_AB's order
    assert list(out["inference"]) == ["fp32", "bf16, channels_last"]
    for rec in out["update"].values():
        assert len(rec["cpu_ms_per_sample"]) == 2 and min(rec["cpu_ms_per_sample"]) > 0
        assert rec["warmup_wall_s"] > 0 and len(rec["load_average"]) == 2
    assert out["update"]["fp32"]["precision"] == "fp32"
    assert out["update"]["fp32"]["channels_last"] is False
    assert out["update"][names[1]]["channels_last"] is True  # the default on a CPU
    assert all(v > 0 for v in out["inference"]["bf16, channels_last"]["cpu_ms_per_step"])
    rows = _medians(out["update"], "fp32")
    assert rows["fp32"]["cpu_vs_first"] == 1.0
    assert rows[names[1]]["cpu_ms_per_sample"] == pytest.approx(
        sorted(out["update"][names[1]]["cpu_ms_per_sample"])[0] / 2
        + sorted(out["update"][names[1]]["cpu_ms_per_sample"])[1] / 2
    )


@pytest.mark.unit
def test_merge_replaces_only_the_sections_this_run_writes(tmp_path, monkeypatch, capsys):
    import json

    from loupe import bench
    from loupe.cli import main

    monkeypatch.setitem(bench.BENCHMARKS, "tiny", lambda opts: {"figure": 2.0})
    out = tmp_path / "peer.json"
    out.write_text(json.dumps({"peer": {"ratio": 0.5}, "tiny": {"figure": 1.0}}))
    assert main(["bench", "--only", "tiny", "--merge", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["peer"] == {"ratio": 0.5}
    assert data["tiny"]["figure"] == 2.0 and "machine" in data
    # without --merge the file holds this run alone
    assert main(["bench", "--only", "tiny", "--out", str(out)]) == 0
    assert "peer" not in json.loads(out.read_text())


@pytest.mark.unit
def test_merge_into_a_file_that_is_not_json_stops_before_running(tmp_path, monkeypatch, capsys):
    from loupe import bench
    from loupe.cli import main

    ran = []
    monkeypatch.setitem(bench.BENCHMARKS, "tiny", lambda opts: ran.append(1) or {"figure": 1.0})
    out = tmp_path / "peer.json"
    for text, want in (("{not json", "malformed JSON"), ("[1, 2]", "no JSON object")):
        out.write_text(text)
        capsys.readouterr()
        assert main(["bench", "--only", "tiny", "--merge", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("loupe: error:") and want in err[0]
        assert out.read_text() == text and not ran
    assert main(["bench", "--gpu", "--merge", "--out", str(out)]) == 2
    assert "--merge" in capsys.readouterr().err


@pytest.mark.integration
def test_env_memory_worker_samples_rss_along_the_steps():
    from loupe.bench import BENCHMARKS, ON_REQUEST, env_memory_worker

    out = env_memory_worker(steps=4000, num_envs=4, every=1000)
    steps = [p["steps"] for p in out["points"]]
    assert steps == [0, 1000, 2000, 3000, 4000]
    assert all(p["rss_mb"] > 50 for p in out["points"])
    assert out["points"][-1]["episodes"] >= 1  # random CoinRun play ends episodes within 1000 steps
    assert "env_memory" in ON_REQUEST and "env_memory" in BENCHMARKS
