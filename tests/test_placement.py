"""`loupe compare-placements`: statistics against scipy and config checks (the tiny real
comparison runs on the local Ray of test_distributed.py)."""

from __future__ import annotations

import numpy as np
import pytest

from loupe.errors import LoupeError
from loupe.placement import PlacementConfig, late_return, summarise, welch


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


def record(placement: str, seed: int, final: float, late: float) -> dict:
    """A run record whose curve ends at ``final`` and averages ``late`` over its last quarter."""
    curve = [[1000.0 * u, 0.0] for u in range(1, 6)] + [[7000.0, 2 * late - final], [8000.0, final]]
    return {"placement": placement, "seed": seed, "final_return": final, "curve": curve,
            "steps_per_s": 1.0, "max_policy_lag": 1.0 if placement == "actor" else 0.0}  # fmt: skip


@pytest.mark.unit
def test_late_return_averages_the_last_quarter_of_the_curve():
    curve = [[1000.0, None], [2000.0, 1.0], [3000.0, 2.0], [4000.0, 4.0]]
    assert late_return(curve) == pytest.approx(3.0)  # steps >= 0.75 * 4000: (2 + 4) / 2
    curve = [[s * 1000.0, float(s)] for s in range(1, 9)]
    assert late_return(curve) == pytest.approx(np.mean([6, 7, 8]))
    assert late_return(record("actor", 1, 6.0, 5.0)["curve"]) == pytest.approx(5.0)


@pytest.mark.unit
def test_summary_pairs_runs_by_seed_and_flags_a_real_difference():
    cfg = PlacementConfig(seeds=(1, 2, 3), out="unused")
    same = [record(p, s, 5.0 + 0.5 * s + (0.1 if p == "actor" else 0), 4.0 + 0.3 * s)
            for p in ("actor", "central") for s in (1, 2, 3)]  # fmt: skip
    out = summarise(same, cfg)["actor_minus_central"]
    assert out["final_return"]["paired_diffs"] == pytest.approx({"1": 0.1, "2": 0.1, "3": 0.1})
    assert out["final_return"]["within_noise"]  # 0.1 against a seed spread of 0.5
    assert out["late_return"]["diff"] == pytest.approx(0.0, abs=1e-12)
    # actor worse late in training on every seed, by far more than the seed spread
    apart = [record(r["placement"], r["seed"], r["final_return"],
                    late_return(r["curve"]) - (1.0 if r["placement"] == "actor" else 0))
             for r in same]  # fmt: skip
    out = summarise(apart, cfg)["actor_minus_central"]
    assert out["late_return"]["diff"] == pytest.approx(-1.0)
    assert not out["late_return"]["within_noise"] and out["late_return"]["p"] < 0.05
    assert out["final_return"]["within_noise"]


@pytest.mark.unit
def test_runs_without_a_finished_episode_ask_for_more_steps():
    cfg = PlacementConfig(seeds=(1, 2), out="unused")
    runs = [record(p, s, 3.0, 3.0) for p in ("actor", "central") for s in (1, 2)]
    runs[3]["final_return"] = None  # central, seed 2
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


# the tiny real comparison is in test_distributed.py, on that module's local Ray
