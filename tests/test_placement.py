"""`loupe compare-placements`: statistics against scipy, config checks, and a tiny real comparison."""

from __future__ import annotations

import json

import numpy as np
import pytest

from loupe.errors import LoupeError
from loupe.placement import PlacementConfig, compare_placements, summarise, welch


@pytest.mark.unit
def test_welch_matches_scipy():
    from scipy import stats

    rng = np.random.default_rng(0)
    a, b = rng.normal(5, 1, 5), rng.normal(6, 2, 4)
    ours = welch(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert ours["t"] == pytest.approx(ref.statistic, rel=1e-10)
    assert ours["p"] == pytest.approx(ref.pvalue, rel=1e-8)
    ci = ref.confidence_interval(0.95)
    assert ours["ci95"] == pytest.approx([ci.low, ci.high], rel=1e-8)


@pytest.mark.unit
def test_summary_pairs_runs_by_seed_and_flags_a_real_difference():
    cfg = PlacementConfig(seeds=(1, 2, 3), out="unused")
    same = [{"placement": p, "seed": s, "final_return": 5.0 + 0.5 * s + (0.1 if p == "actor" else 0),
             "steps_per_s": 1.0, "max_policy_lag": 1.0 if p == "actor" else 0.0}
            for p in ("actor", "central") for s in (1, 2, 3)]  # fmt: skip
    out = summarise(same, cfg)["actor_minus_central"]
    assert out["paired_diffs"] == pytest.approx({"1": 0.1, "2": 0.1, "3": 0.1})
    assert out["within_noise"]  # 0.1 against a seed spread of 0.5
    apart = [dict(r, final_return=r["final_return"] + (4.0 if r["placement"] == "actor" else 0))
             for r in same]  # fmt: skip
    out = summarise(apart, cfg)["actor_minus_central"]
    assert out["diff"] == pytest.approx(4.1)
    assert not out["within_noise"] and out["p"] < 0.01


@pytest.mark.unit
def test_runs_without_a_finished_episode_ask_for_more_steps():
    cfg = PlacementConfig(seeds=(1, 2), out="unused")
    runs = [{"placement": p, "seed": s, "final_return": None if (p, s) == ("central", 2) else 3.0,
             "steps_per_s": 1.0, "max_policy_lag": 0.0}
            for p in ("actor", "central") for s in (1, 2)]  # fmt: skip
    with pytest.raises(LoupeError, match="no episode ended in central-seed2; raise --total-steps"):
        summarise(runs, cfg)


@pytest.mark.unit
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"placements": ("actor", "gpu")}, "unknown placement"),
        ({"seeds": (1, 1)}, "distinct seeds"),
        ({"seeds": ()}, "distinct seeds"),
        ({"total_steps": 100}, "less than one batch"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(LoupeError, match=message):
        PlacementConfig(**kwargs)


@pytest.mark.integration
def test_tiny_comparison_trains_both_placements_and_resumes(tmp_path):
    import ray

    from loupe.distributed import init_ray

    init_ray(None, num_cpus=2)
    try:
        # BigFish: random play ends episodes within the tiny budget (CoinRun's rarely do)
        cfg = PlacementConfig(env_id="procgen:bigfish", num_envs=4, num_steps=32, minibatches=2, epochs=1, total_steps=512,
                              seeds=(1, 2), out=str(tmp_path / "cmp"))  # fmt: skip
        summary = compare_placements(cfg, echo=lambda _: None, progress=False)
        runs = tmp_path / "cmp" / "runs"
        results = {p.name: json.loads(p.read_text()) for p in runs.glob("*.json")}
        assert sorted(results) == [
            f"{p}-seed{s}.json" for p in ("actor", "central") for s in (1, 2)
        ]
        assert all(r["steps"] == 512 and len(r["curve"]) == 4 for r in results.values())
        assert summary["placements"]["actor"]["max_policy_lag"] == 1.0
        assert summary["placements"]["central"]["max_policy_lag"] == 0.0
        assert (tmp_path / "cmp" / "curves.png").stat().st_size > 5_000
        assert set(summary["actor_minus_central"]) >= {"diff", "p", "ci95", "paired_diffs"}
        # a second call trains nothing: every run is read back from its result file
        stamps = {p: p.stat().st_mtime_ns for p in runs.glob("*.json")}
        again = compare_placements(cfg, echo=lambda _: None, progress=False)
        assert {p: p.stat().st_mtime_ns for p in runs.glob("*.json")} == stamps
        assert again["placements"] == summary["placements"]
        # the same out dir with other settings is refused instead of mixing two comparisons
        other = PlacementConfig(env_id="procgen:bigfish", num_envs=4, num_steps=32, minibatches=2, epochs=2, total_steps=512,
                                seeds=(1, 2), out=str(tmp_path / "cmp"))  # fmt: skip
        saved = (tmp_path / "cmp" / "config.json").read_text()
        with pytest.raises(LoupeError, match=r"other settings \(epochs\)"):
            compare_placements(other, echo=lambda _: None, progress=False)
        assert (tmp_path / "cmp" / "config.json").read_text() == saved
    finally:
        ray.shutdown()
