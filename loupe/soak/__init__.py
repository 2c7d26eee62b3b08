"""`loupe soak`: a long distributed CoinRun training under chaos, measured (a benchmark, not a test).

This module holds the pure parts, each testable without a process: slope fits of sampled series,
the chaos schedule, stall detection over a progress series, the accounting of checkpoints written /
announced / probed, the step-counter check and the 1e9-step projection fallback. The process work
(starting the run, killing its components, sampling ``/proc``) lives in ``loupe.soak.harness``.

    fit = pooled_slope([(t1, y1), (t2, y2)])      # one slope, one intercept per process lifetime
    kills = chaos_schedule(1200, warmup_s=240, every_s=180, tail_s=240)
    report = account(written, announced, probed)  # lost / duplicated items, by sha256
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from loupe.errors import LoupeError

#: what the chaos schedule kills, in turn
COMPONENTS = ("rollout_actor", "probe_worker", "redis", "learner")
#: slope units: a per-second slope times this is "per 10 minutes"
PER_10_MIN = 600.0


# -- slopes ------------------------------------------------------------------------------------
@dataclasses.dataclass
class SlopeFit:
    """A least-squares slope shared by several segments (each with its own intercept)."""

    #: units of y per second (None: too few points to fit)
    slope: float | None
    #: standard error of the slope (None when it cannot be estimated)
    stderr: float | None
    #: points used, and the segments (process lifetimes) they came from
    points: int
    segments: int
    #: seconds covered by the points, summed over segments
    span_s: float

    def per_10_min(self) -> dict[str, Any]:
        """JSON-ready: slope and standard error in units per 10 minutes."""
        scale = PER_10_MIN
        return {
            "slope_per_10min": None if self.slope is None else self.slope * scale,
            "stderr_per_10min": None if self.stderr is None else self.stderr * scale,
            "points": self.points,
            "segments": self.segments,
            "span_s": self.span_s,
        }


def pooled_slope(segments: Iterable[tuple[Sequence[float], Sequence[float]]]) -> SlopeFit:
    """Least squares ``y = a_s + b t`` with one intercept ``a_s`` per segment and one slope ``b``.

    A segment is one process lifetime (a restarted process starts at another level), so a restart
    is not mistaken for growth. Segments with fewer than 2 points carry no slope information and are
    dropped. The standard error uses the residual variance with ``n - segments - 1`` degrees of
    freedom.
    """
    sxx = sxy = 0.0
    kept: list[tuple[list[float], list[float], float, float]] = []
    for ts, ys in segments:
        t = [float(v) for v in ts]
        y = [float(v) for v in ys]
        if len(t) != len(y):
            raise ValueError(f"segment has {len(t)} times but {len(y)} values")
        if len(t) < 2:
            continue
        tm, ym = sum(t) / len(t), sum(y) / len(y)
        sxx += sum((a - tm) ** 2 for a in t)
        sxy += sum((a - tm) * (b - ym) for a, b in zip(t, y))
        kept.append((t, y, tm, ym))
    n = sum(len(t) for t, *_ in kept)
    span = sum(max(t) - min(t) for t, *_ in kept)
    if not kept or sxx <= 0.0:
        return SlopeFit(None, None, n, len(kept), span)
    slope = sxy / sxx
    dof = n - len(kept) - 1
    stderr = None
    if dof > 0:
        rss = sum((b - ym - slope * (a - tm)) ** 2 for t, y, tm, ym in kept for a, b in zip(t, y))
        stderr = math.sqrt(rss / dof / sxx)
    return SlopeFit(slope, stderr, n, len(kept), span)


Point = tuple[str, float, float]


def after_warmup(
    points: Iterable[Point], warmup_until: float, segment_warmup_s: float
) -> list[Point]:
    """The ``(segment key, t, y)`` points at or after ``warmup_until`` (the soak's warm-up) that
    lie at least ``segment_warmup_s`` after their segment's first point (a restarted process
    warms up again)."""
    first: dict[str, float] = {}
    out = []
    for key, t, y in sorted(points, key=lambda p: p[1]):
        first.setdefault(key, t)
        if t >= warmup_until and t - first[key] >= segment_warmup_s:
            out.append((key, t, y))
    return out


def split_at(points: Iterable[Point], cuts: Sequence[float], settle_s: float) -> list[Point]:
    """A new segment after every cut (a kill): a process that lives through a kill may answer
    it with a one-time step (a module imported, a buffer grown), which is a level, not a trend.
    The points within ``settle_s`` after a cut are dropped."""
    cuts = sorted(cuts)
    out = []
    for key, t, y in points:
        epoch = bisect.bisect_right(cuts, t)
        if epoch and t - cuts[epoch - 1] < settle_s:
            continue
        out.append((f"{key}#{epoch}", t, y))
    return out


def grouped(points: Iterable[Point]) -> list[tuple[list[float], list[float]]]:
    """Points -> one (times, values) series per segment key, in time order."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    for key, t, y in sorted(points, key=lambda p: p[1]):
        ts, ys = series.setdefault(key, ([], []))
        ts.append(t)
        ys.append(y)
    return list(series.values())


def theil_sen(segments: Iterable[tuple[Sequence[float], Sequence[float]]]) -> float | None:
    """The median of the slopes between every two points of one segment, over all segments (a
    robust slope: a one-time step or a sawtooth of allocations and releases barely moves it,
    a steady leak does). None without a pair of points at different times."""
    slopes: list[float] = []
    for ts, ys in segments:
        pts = list(zip(ts, ys))
        for i, (t1, y1) in enumerate(pts):
            slopes.extend((y2 - y1) / (t2 - t1) for t2, y2 in pts[i + 1 :] if t2 != t1)
    if not slopes:
        return None
    slopes.sort()
    mid = len(slopes) // 2
    return slopes[mid] if len(slopes) % 2 else (slopes[mid - 1] + slopes[mid]) / 2


def segments_after(
    points: Iterable[Point], warmup_until: float, segment_warmup_s: float
) -> list[tuple[list[float], list[float]]]:
    """Per-segment series without their warm-ups (see ``after_warmup``)."""
    return grouped(after_warmup(points, warmup_until, segment_warmup_s))


def level_steps(
    points: Iterable[Point], cuts: Sequence[float], window_s: float, settle_s: float
) -> list[float | None]:
    """For each cut: the mean over segments alive on both sides of (mean of the values within
    ``window_s`` after ``cut + settle_s``) - (mean within ``window_s`` before the cut); None
    where no segment spans the cut. A leak per restart shows as steps of one sign."""
    by_key: dict[str, list[tuple[float, float]]] = {}
    for key, t, y in points:
        by_key.setdefault(key, []).append((t, y))
    out: list[float | None] = []
    for c in cuts:
        steps = []
        for values in by_key.values():
            before = [y for t, y in values if c - window_s <= t < c]
            after = [y for t, y in values if c + settle_s < t <= c + settle_s + window_s]
            if before and after:
                steps.append(sum(after) / len(after) - sum(before) / len(before))
        out.append(sum(steps) / len(steps) if steps else None)
    return out


# -- the chaos schedule ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Kill:
    """One planned kill: ``component`` at ``t`` seconds after the soak started."""

    t: float
    component: str


def chaos_schedule(
    duration_s: float,
    warmup_s: float,
    every_s: float,
    tail_s: float,
    components: Sequence[str] = COMPONENTS,
) -> list[Kill]:
    """Kills from ``warmup_s`` on, one every ``every_s``, the components in turn, none later than
    ``duration_s - tail_s`` (the last kill's recovery is measured before the soak ends).

    Raises LoupeError when the window cannot hold one kill of every component.
    """
    if every_s <= 0 or warmup_s < 0 or tail_s < 0:
        raise LoupeError("the chaos schedule needs every_s > 0, warmup_s >= 0 and tail_s >= 0")
    if not components:
        raise LoupeError("the chaos schedule needs at least one component")
    last = duration_s - tail_s
    kills: list[Kill] = []
    k = 0
    while warmup_s + k * every_s <= last + 1e-9:
        kills.append(Kill(warmup_s + k * every_s, components[k % len(components)]))
        k += 1
    if len(kills) < len(components):
        need = warmup_s + (len(components) - 1) * every_s + tail_s
        raise LoupeError(
            f"a {duration_s / 60:g}-minute soak holds {len(kills)} of the {len(components)} kills "
            f"(warm-up {warmup_s:g} s, one every {every_s:g} s, {tail_s:g} s after the last); "
            f"it needs {math.ceil(need / 60)} minutes or a shorter --kill-every"
        )
    return kills


# -- stalls --------------------------------------------------------------------------------------
@dataclasses.dataclass
class Stall:
    """A span without progress longer than the detector's bound."""

    #: what stalled (e.g. "learner: checkpoints", "rollout_actor 1234: cpu")
    name: str
    #: when the last progress before it was seen, and when the stall was declared
    since: float
    detected: float
    #: when progress resumed (None: still stalled when the soak ended)
    resumed: float | None = None

    @property
    def length(self) -> float:
        """Seconds without progress (up to the detection time while unresolved)."""
        return (self.resumed if self.resumed is not None else self.detected) - self.since


class StallDetector:
    """Declares a stall when a progress value has not increased for more than ``bound_s``.

    det = StallDetector("learner: checkpoints", bound_s=180)
    event = det.update(t, newest_step)      # a Stall once, when the bound is crossed
    """

    def __init__(self, name: str, bound_s: float):
        if bound_s <= 0:
            raise LoupeError(f"stall bound must be positive, got {bound_s}")
        self.name = name
        self.bound_s = bound_s
        self.best: float | None = None
        self.since: float | None = None
        self.open: Stall | None = None
        self.stalls: list[Stall] = []

    def update(self, t: float, value: float | None) -> Stall | None:
        """Feed one observation; returns a new Stall when the bound is first crossed."""
        if self.since is None:
            self.since = t
        if value is not None and (self.best is None or value > self.best):
            self.best = value
            self.since = t
            if self.open is not None:
                self.open.resumed = t
                self.open = None
            return None
        if self.open is None and t - self.since > self.bound_s:
            self.open = Stall(self.name, self.since, t)
            self.stalls.append(self.open)
            return self.open
        return None

    def reset(self, t: float) -> None:
        """Progress is expected to restart from ``t`` (e.g. a component was restarted)."""
        self.since = t
        if self.open is not None:
            self.open.resumed = t
            self.open = None


def longest_gap(times: Iterable[float], start: float, end: float) -> tuple[float, float, float]:
    """The longest span between consecutive events in ``[start, end]`` (the ends count as
    events) -> (seconds, from, to)."""
    marks = [start, *sorted(t for t in times if start <= t <= end), end]
    best = (0.0, start, start)
    for a, b in zip(marks, marks[1:]):
        if b - a > best[0]:
            best = (b - a, a, b)
    return best


# -- accounting ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Item:
    """One checkpoint as a record of some stage knows it."""

    step: int
    sha256: str


def account(
    written: Sequence[Item], announced: Sequence[Item], probed: Sequence[Item]
) -> dict[str, Any]:
    """Compare the three stages by sha256 (each checkpoint's weights hash; a step rewritten after a
    crash is a different checkpoint with another hash).

    Lost: written but not announced, or announced but not probed. Duplicated: a hash that appears
    more than once in one stage (a checkpoint announced twice, a result recorded twice). Unknown:
    announced or probed but never seen written. ``equal`` holds when none of these occur.
    """
    stages = {"written": written, "announced": announced, "probed": probed}
    counts = {name: Counter(i.sha256 for i in items) for name, items in stages.items()}
    steps = {i.sha256: i.step for items in stages.values() for i in items}

    def listed(hashes) -> list[dict[str, Any]]:
        return [{"step": steps[h], "sha256": h} for h in sorted(hashes, key=lambda h: steps[h])]

    w, a, p = (set(counts[n]) for n in stages)
    report: dict[str, Any] = {name: len(items) for name, items in stages.items()}
    report |= {
        "lost_announcements": listed(w - a),
        "lost_probe_results": listed(a - p),
        "unknown": listed((a | p) - w),
        "duplicated": {
            name: [
                {"step": steps[h], "sha256": h, "times": c}
                for h, c in sorted(counts[name].items(), key=lambda kv: steps[kv[0]])
                if c > 1
            ]
            for name in stages
        },
    }
    report["equal"] = (
        len(w) == len(a) == len(p) == len(written) == len(announced) == len(probed)
        and not report["lost_announcements"]
        and not report["lost_probe_results"]
        and not report["unknown"]
    )
    return report


def step_order(checkpoints: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Checkpoint records (``index``, ``step``) in write order: steps must rise strictly with the
    index, and the indices must run without gaps (a gap is a checkpoint the soak never saw)."""
    ordered = sorted(checkpoints, key=lambda c: int(c["index"]))
    violations = [
        {"index": int(b["index"]), "step": int(b["step"]), "previous_step": int(a["step"])}
        for a, b in zip(ordered, ordered[1:])
        if int(b["step"]) <= int(a["step"])
    ]
    indices = [int(c["index"]) for c in ordered]
    missing = sorted(set(range(indices[0], indices[-1] + 1)) - set(indices)) if indices else []
    repeated = sorted(i for i, c in Counter(indices).items() if c > 1)
    return {
        "monotone": not violations and not repeated,
        "violations": violations,
        "missing_indices": missing,
        "repeated_indices": repeated,
        "first_step": int(ordered[0]["step"]) if ordered else None,
        "last_step": int(ordered[-1]["step"]) if ordered else None,
    }


def resume_checks(
    resumes: Sequence[tuple[float, int]], checkpoints: Sequence[tuple[float, int]]
) -> list[dict[str, Any]]:
    """Each restart ``(t, resumed step)`` against the newest checkpoint step written before ``t``:
    a resume from an older checkpoint than the newest would repeat steps, one from a newer is
    impossible."""
    out = []
    for t, step in resumes:
        before = [s for ct, s in checkpoints if ct <= t]
        newest = max(before) if before else 0
        out.append({"t": t, "resumed_step": step, "newest_checkpoint_step": newest,
                    "ok": step == newest})  # fmt: skip
    return out


# -- projection (fallback) -----------------------------------------------------------------------
def project_linear(value_now: float, slope_per_s: float | None, seconds: float) -> float | None:
    """``value_now + slope * seconds`` (None without a slope); a falling series projects flat."""
    if slope_per_s is None:
        return None
    return value_now + max(slope_per_s, 0.0) * seconds
