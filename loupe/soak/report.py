"""The soak's report: slopes, counts, step order, stalls, recoveries and the 1e9-step projection,
from the harness's samples (``build_report``); the series helpers are pure."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loupe.soak import (
    Item,
    Kill,
    account,
    after_warmup,
    grouped,
    level_steps,
    longest_gap,
    pooled_slope,
    resume_checks,
    split_at,
    step_order,
    theil_sen,
)
from loupe.soak.procs import LOUPE_ROLES, RAY_ROLES

if TYPE_CHECKING:
    from loupe.soak.harness import Soak

#: the targets of the soak (issue: billion-step readiness)
RSS_TARGET_MB_PER_10MIN = 1.0
RECOVERY_TARGET_S = 60.0
DISK_TARGET_GB = 50.0

NOTE = (
    "Throughput, stall lengths and recovery times depend on what else the machine ran: see "
    "machine (cores, load average at the end; the soak's own learner, 2 actors and probe "
    "worker keep a 2-core machine's load near 4). Slopes are least-squares fits after the "
    "warm-up with one intercept per process lifetime and per span between kills (a restarted "
    "process starts at its own level; one that lives through a kill may step once), in MB (or "
    "descriptors) per 10 minutes, with their standard errors; the level steps at the kills and "
    "the slope over whole lifetimes (steps included) are given beside them."
)


def process_points(
    samples: Sequence[dict[str, Any]], role: str, field: str
) -> list[tuple[str, float, float]]:
    """``(process key, t, value)`` of every process of ``role`` in the samples."""
    return [
        (row["key"], s["t"], float(row[field]))
        for s in samples
        for row in s["procs"]
        if row["role"] == role and row.get(field) is not None
    ]


def role_sums(
    samples: Sequence[dict[str, Any]], role: str, field: str
) -> list[tuple[float, float]]:
    """``(t, sum over the processes of role)`` per sample (the role's total at each time)."""
    out = []
    for s in samples:
        values = [
            row[field] for row in s["procs"] if row["role"] == role and row.get(field) is not None
        ]
        if values:
            out.append((s["t"], float(sum(values))))
    return out


#: after a kill, the points of the next this many seconds are left out of the slopes
KILL_SETTLE_S = 30.0
#: the window on each side of a kill whose means give the level step at it
STEP_WINDOW_S = 60.0


def slope_of(
    points: list[tuple[str, float, float]],
    warmup_s: float,
    segment_warmup_s: float,
    kills: Sequence[float] = (),
) -> dict[str, Any]:
    """The least-squares slope per 10 minutes of keyed points, one intercept per process
    lifetime (see ``loupe.soak.pooled_slope``), with beside it: the robust (Theil-Sen) slope,
    and with kills the least-squares slope with a new segment at every kill and the level step
    at each kill (a one-time step at a kill is not a trend; steps of one sign at every kill
    would be a leak per restart)."""
    kept = after_warmup(points, warmup_s, segment_warmup_s)
    lifetimes = grouped(kept)
    fit = pooled_slope(lifetimes).per_10_min()
    robust = theil_sen(lifetimes)
    fit["robust_slope_per_10min"] = None if robust is None else robust * 600
    if kills:
        between = pooled_slope(grouped(split_at(kept, kills, KILL_SETTLE_S))).per_10_min()
        fit["between_kills"] = {k: between[k] for k in ("slope_per_10min", "stderr_per_10min",
                                                        "segments")}  # fmt: skip
        fit["steps_at_kills"] = [
            None if v is None else round(v, 3)
            for v in level_steps(kept, kills, STEP_WINDOW_S, KILL_SETTLE_S)
        ]
    return fit


def keyed(samples: Sequence[dict[str, Any]], path: Sequence[str], key: Sequence[str] | None):
    """``(segment key, t, value)`` of a nested sample field, e.g. ``("redis", "used_memory_mb")``
    segmented by ``("redis", "process")`` (None: one segment)."""
    out = []
    for s in samples:
        value: Any = s
        for part in path:
            value = value.get(part) if isinstance(value, dict) else None
        if value is None:
            continue
        seg: Any = "all"
        if key is not None:
            seg = s
            for part in key:
                seg = seg.get(part) if isinstance(seg, dict) else None
        out.append((str(seg), s["t"], float(value)))
    return out


def slopes(
    samples, warmup_s: float, segment_warmup_s: float, kills: Sequence[float] = ()
) -> dict[str, Any]:
    """Every series' slope after the warm-up (``kills``: the kill times, see ``slope_of``)."""
    rss = {}
    private = {}
    fds = {}
    for role in (*LOUPE_ROLES, *RAY_ROLES):
        fit = slope_of(
            process_points(samples, role, "private_mb"), warmup_s, segment_warmup_s, kills
        )
        if fit["points"]:
            private[role] = fit
        fit = slope_of(process_points(samples, role, "rss_mb"), warmup_s, segment_warmup_s, kills)
        if fit["points"]:
            if role in LOUPE_ROLES and fit["slope_per_10min"] is not None:
                fit["target"] = RSS_TARGET_MB_PER_10MIN
                fit["ok"] = fit["slope_per_10min"] < RSS_TARGET_MB_PER_10MIN
            rss[role] = fit
        fit = slope_of(process_points(samples, role, "fds"), warmup_s, segment_warmup_s, kills)
        if fit["points"]:
            fds[role] = fit
    run_dir = {
        sub: slope_of(keyed(samples, ("run_dir_mb", sub), None), warmup_s, 0.0)
        for sub in ("total", "checkpoints", "probes", "tb", "redis")
    }
    return {
        "rss_mb_per_10min": rss,
        # RSS less its file-backed and shared pages (libraries, Ray's object store, frame
        # buffers): what only this process holds, where a leak of its own shows
        "private_mb_per_10min": private,
        "fds_per_10min": fds,
        "redis_used_memory_mb_per_10min": slope_of(
            keyed(samples, ("redis", "used_memory_mb"), ("redis", "process")), warmup_s, 0.0
        ),
        "object_store_mb_per_10min": slope_of(
            keyed(samples, ("object_store", "used_mb"), ("object_store", "session")),
            warmup_s,
            segment_warmup_s,
            kills,
        ),
        "run_dir_mb_per_10min": run_dir,
        "ray_session_dirs_mb_per_10min": slope_of(
            keyed(samples, ("ray_sessions_mb",), None), warmup_s, 0.0
        ),
    }


#: fewest probe results with the worker's memory for its slope to be judged on them
MIN_LEVEL_POINTS = 10


def probe_levels(
    results: Sequence[tuple[str, dict[str, str]]] | None, to_soak_t, field: str
) -> list[tuple[str, float, float]]:
    """``(worker pid, t, MB)`` of each probe result that carries the worker's memory before its
    probe (``field``: ``worker_rss_mb`` or ``worker_private_mb``); ``to_soak_t`` maps wall
    time to soak time."""
    out = []
    for entry_id, fields in results or []:
        decoded = {k: json.loads(v) for k, v in fields.items()}
        value, pid = decoded.get(field), decoded.get("worker_pid")
        if decoded.get("kind") == "probe" and value is not None and pid is not None:
            out.append((str(pid), to_soak_t(int(entry_id.split("-")[0]) / 1000), float(value)))
    return out


def checkpoint_levels(
    checkpoints: Sequence[dict[str, Any]], field: str
) -> list[tuple[str, float, float]]:
    """``(learner pid, t, MB)`` of each checkpoint whose metadata carries the learner's memory
    as it wrote it (``field``: ``rss_mb`` or ``private_mb``); t: when the soak first saw it."""
    out = []
    for c in checkpoints:
        proc = c.get("process") or {}
        value, pid = proc.get(field), proc.get("pid")
        if value is not None and pid is not None and c.get("seen") is not None:
            out.append((str(pid), float(c["seen"]), float(value)))
    return sorted(out, key=lambda p: p[1])


@dataclasses.dataclass(frozen=True)
class LevelSeries:
    """A role's memory read at one phase of its loop, which its RSS target is judged on."""

    #: key of the fits in report["slopes"] and of the points in report["series"]
    key: str
    series: str
    #: where in the loop it is read, and what one reading is per ("before each probe", "probes")
    when: str
    what: str
    how: str


LEVELS = {
    "probe_worker": LevelSeries(
        "probe_worker_level_mb_per_10min", "probe_worker_level", "before each probe", "probes",
        "the probe worker's RSS and private memory read just before each probe (the level it "
        "returns to between checkpoints), from its result entries; fitted like the sampled "
        "series, one intercept per worker process",
    ),
    "learner": LevelSeries(
        "learner_level_mb_per_10min", "learner_level", "at each checkpoint", "checkpoints",
        "the learner's RSS and private memory as it wrote each checkpoint (right after an "
        "update: one phase of its loop), from the checkpoints' metadata; fitted like the sampled "
        "series, one intercept per learner process",
    ),
}  # fmt: skip


def level_fits(
    points: dict[str, list[tuple[str, float, float]]],
    warmup_s: float,
    segment_warmup_s: float,
    kills: Sequence[float] = (),
    how: str = "",
) -> dict[str, Any]:
    """``{"rss": fit, "private": fit, "how": how}``: ``slope_of`` of each level series in
    ``points`` (``{"rss": [(pid, t, MB), ...], "private": [...]}``)."""
    out: dict[str, Any] = {
        name: slope_of(pts, warmup_s, segment_warmup_s, kills) for name, pts in points.items()
    }
    out["how"] = how
    return out


def judge_on_level(slope: dict[str, Any], role: str, levels: dict[str, Any]) -> None:
    """Judge ``role``'s RSS target on its level at one phase of its loop (``levels["rss"]``, see
    ``LEVELS``) where there are enough of them. The probe worker allocates and frees ~100 MB per
    probe, the learner a rollout and an update's worth per step: the 5-second samples land at
    random phases of that sawtooth, and a few low ones drag their fit by as much as the target."""
    fit = slope["rss_mb_per_10min"].get(role)
    level = levels.get("rss") or {}
    if fit is None or (level.get("points") or 0) < MIN_LEVEL_POINTS:
        return
    if level.get("slope_per_10min") is None:
        return
    fit["judged_on"] = f"level {LEVELS[role].when} ({LEVELS[role].key})"
    fit["ok"] = level["slope_per_10min"] < RSS_TARGET_MB_PER_10MIN


def last_values(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """RSS and descriptors of each role in the last sample, and the run directory's size."""
    if not samples:
        return {}
    last = samples[-1]
    roles: dict[str, dict[str, Any]] = {}
    for row in last["procs"]:
        r = roles.setdefault(row["role"], {"processes": 0, "rss_mb": 0.0, "fds": 0})
        r["processes"] += 1
        r["rss_mb"] += row["rss_mb"]
        r["fds"] += row["fds"] or 0
    peak = {}
    for s in samples:
        for row in s["procs"]:
            peak[row["role"]] = max(peak.get(row["role"], 0.0), row["rss_mb"])
    return {
        "t": last["t"],
        "roles": roles,
        "peak_process_rss_mb": peak,
        "run_dir_mb": last["run_dir_mb"],
        "redis": last.get("redis"),
        "object_store": last.get("object_store"),
        "ray_session_dirs_mb": last.get("ray_sessions_mb"),
    }


def stream_items(entries: Sequence[tuple[str, dict[str, str]]] | None, kind: str | None) -> list:
    """Announcements (``kind`` None) or results of ``kind`` -> (Item, decoded fields)."""
    out = []
    for _, fields in entries or []:
        if kind is None:
            out.append((Item(int(fields["step"]), fields["sha256"]), fields))
            continue
        decoded = {k: json.loads(v) for k, v in fields.items()}
        if decoded.get("kind") == kind:
            out.append((Item(int(decoded["step"]), decoded["sha256"]), decoded))
    return out


def counts(soak: Soak) -> dict[str, Any]:
    """Checkpoints written (seen on disk) / announced (stream) / probed (results stream)."""
    from loupe.soak.harness import written_items

    ann_entries, res_entries = soak.streams or ([], [])
    announced = stream_items(ann_entries, None)
    probed = stream_items(res_entries, "probe")
    errors = [fields for _, fields in stream_items(res_entries, "error")]
    report = account(written_items(soak), [a for a, _ in announced], [p for p, _ in probed])
    report["probe_errors"] = errors
    report["probe_outputs_missing"] = [
        f["out"] for _, f in probed if not (Path(f["out"]) / "summary.json").is_file()
    ]
    # the harness sees the run directory every 0.5 s; retention keeps the newest 5, so a gap
    # in the write-order index would be a checkpoint it missed
    report["streams_read"] = soak.streams is not None
    report["how_checked"] = (
        "written: every ckpt-*.json the harness saw in the run's checkpoints/ (scanned every "
        "0.5 s; the metadata's write-order index must run without gaps, see steps); announced: "
        "every entry of the stream loupe:<run>:checkpoints (XRANGE after the drain); probed: every "
        "kind=probe entry of loupe:<run>:results. Items are matched by the weights' sha256; a "
        "sha256 twice in one stage is a duplicate, one missing from the next stage is lost, and "
        "each probed checkpoint's summary.json must exist on disk."
    )
    delays = []
    seen = {c["sha256"]: c["seen"] for c in soak.checkpoints.values()}
    for item, fields in announced:
        if item.sha256 in seen and fields.get("announced"):
            delays.append(round(soak.from_wall(float(fields["announced"])) - seen[item.sha256], 2))
    report["announce_delay_s"] = {
        "max": max(delays, default=None),
        "note": "announcement time minus the time the harness first saw the checkpoint file "
        "(negative: announced before the 0.5 s scan saw it)",
    }
    latencies = [
        f.get("start_latency_s") for _, f in probed if f.get("start_latency_s") is not None
    ]
    report["probe_start_latency_s"] = {"max": max(latencies, default=None),
                                       "mean": sum(latencies) / len(latencies) if latencies else None}  # fmt: skip
    return report


def steps(soak: Soak) -> dict[str, Any]:
    """The step counter across restarts: checkpoint steps in write order, and every resume."""
    records = list(soak.checkpoints.values())
    order = step_order(records)
    resumes = resume_checks(soak.resumes, [(c["seen"], c["step"]) for c in records])
    order["resumes"] = resumes
    order["monotone"] = order["monotone"] and all(r["ok"] for r in resumes)
    order["checkpoints"] = [
        {"index": c["index"], "step": c["step"], "seen_t": c["seen"]}
        for c in sorted(records, key=lambda c: c["index"])
    ]
    return order


def stalls(soak: Soak) -> dict[str, Any]:
    """The longest time without a new checkpoint, and every stall the detectors reported."""
    end = soak.t_end if soak.t_end is not None else soak.now()
    seen = sorted(c["seen"] for c in soak.checkpoints.values())
    first = seen[0] if seen else end
    gap, a, b = longest_gap(seen, first, end)
    events = [
        {"name": s.name, "since": s.since, "detected": s.detected, "resumed": s.resumed,
         "length_s": s.length}
        for det in [*soak.stall.values(), *soak.cpu_stall.values()]
        for s in det.stalls
    ]  # fmt: skip
    return {
        "bound_s": soak.config.stall_s,
        "longest_without_checkpoint_s": gap,
        "longest_between_t": [a, b],
        "within_bound": gap <= soak.config.stall_s,
        "detected": events,
        "aborted": soak.aborted,
        "how": f"a stall is declared when the newest checkpoint step has not risen for "
        f"{soak.config.stall_s:g} s (learner), no probe result came for as long while "
        "announced checkpoints waited (probe worker), or a rollout actor used no CPU time for as "
        f"long; one lasting {soak.config.stall_abort_s:g} s ends the soak, reported",
    }


def entry_times(soak: Soak, entries: Sequence[tuple[str, Any]] | None) -> list[float]:
    """Soak times of stream entries (an entry id is ``<ms since the epoch>-<seq>``)."""
    return sorted(soak.from_wall(int(i.split("-")[0]) / 1000) for i, _ in entries or [])


def recoveries(soak: Soak) -> list[dict[str, Any]]:
    """Each kill: when, what, how long until the component was back, and until the next
    checkpoint, announcement and probe result."""
    out = []
    ann, res = soak.streams or ([], [])
    marks = {
        "next_checkpoint_s": sorted(c["seen"] for c in soak.checkpoints.values()),
        "next_announcement_s": entry_times(soak, ann),
        "next_probe_result_s": entry_times(soak, res),
    }
    for w in soak.kills:
        row = {"component": w.component, "t": round(w.t, 2), "pid": w.pid, **w.detail,
               "back_s": None if w.back_s is None else round(w.back_s, 2), "how": w.note,
               "ok": w.back_s is not None and w.back_s < soak.config.recovery_target_s}  # fmt: skip
        for name, times in marks.items():
            nxt = next((t for t in times if t > w.t), None)
            row[name] = None if nxt is None else round(nxt - w.t, 2)
        out.append(row)
    return out


def series(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The sampled series in compact form: per sample the time, each role's summed RSS and
    descriptors, Redis and object-store memory, the run directory and the newest step."""
    roles = sorted({row["role"] for s in samples for row in s["procs"]})
    out: dict[str, Any] = {"t": [s["t"] for s in samples], "rss_mb": {}, "private_mb": {},
                           "fds": {}}  # fmt: skip
    for role in roles:
        for field, key in (("rss_mb", "rss_mb"), ("private_mb", "private_mb"), ("fds", "fds")):
            out[key][role] = [
                round(sum(r[field] or 0 for r in s["procs"] if r["role"] == role), 1)
                for s in samples
            ]
    out["redis_used_memory_mb"] = [_round((s.get("redis") or {}).get("used_memory_mb"))
                                   for s in samples]  # fmt: skip
    out["object_store_mb"] = [_round((s.get("object_store") or {}).get("used_mb")) for s in samples]
    out["run_dir_mb"] = [_round(s["run_dir_mb"]["total"]) for s in samples]
    out["ray_session_dirs_mb"] = [_round(s.get("ray_sessions_mb")) for s in samples]
    out["newest_step"] = [s.get("newest_step") for s in samples]
    return out


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def tb_sizes(tb_dir: Path) -> dict[str, float]:
    """Bytes of the learner's TensorBoard events per point (per step it logged at), and of the
    probe workers' scalars per probed checkpoint and images per checkpoint with images."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    out = {"train_bytes": 0, "train_points": 0, "probe_scalar_bytes": 0, "probe_image_bytes": 0,
           "probe_scalar_steps": 0, "probe_image_steps": 0}  # fmt: skip
    for path in sorted(tb_dir.rglob("events.out.tfevents.*")):
        probe = path.parent != tb_dir
        steps: set[int] = set()
        image_steps: set[int] = set()
        for event in EventFileLoader(str(path)).Load():
            if not event.HasField("summary"):
                continue
            size = event.ByteSize() + 16  # the record's length, CRCs
            if not probe:
                out["train_bytes"] += size
                steps.add(event.step)
            elif any(v.HasField("image") or v.metadata.plugin_data.plugin_name == "images"
                     for v in event.summary.value):  # fmt: skip
                out["probe_image_bytes"] += size
                image_steps.add(event.step)
            else:
                out["probe_scalar_bytes"] += size
                steps.add(event.step)
        key = "probe_scalar_steps" if probe else "train_points"
        out[key] += len(steps)
        out["probe_image_steps"] += len(image_steps)
    return out


def measured_sizes(soak: Soak) -> dict[str, Any]:
    """Per-item sizes for ``loupe.retention.project``, from the soak's own files and Redis."""
    records = list(soak.checkpoints.values())
    n = max(len(records), 1)
    probes = soak.run_dir / "probes"
    full, pruned = [], []
    for d in sorted(probes.glob("step-*")) if probes.is_dir() else []:
        (pruned if (d / "pruned.json").is_file() else full).append(_dir_size(d))
    tb = tb_sizes(soak.run_dir / "tb") if (soak.run_dir / "tb").is_dir() else {}
    redis_sizes = soak.redis_sizes or {}
    summary = [len((d / "summary.json").read_bytes()) for d in probes.glob("step-*")
               if (d / "summary.json").is_file()] if probes.is_dir() else []  # fmt: skip
    sizes = {
        "checkpoint_weights": sum(c["size"] for c in records) / n,
        "checkpoint_state": sum(c["state_size"] for c in records) / n,
        "checkpoint_meta": sum(c["json_size"] for c in records) / n,
        "probe_full": sum(full) / max(len(full), 1),
        # a pruned directory keeps summary.json and a marker of about 60 bytes
        "probe_pruned": sum(pruned) / len(pruned) if pruned
        else (sum(summary) / max(len(summary), 1) + 60),
        "tb_train_per_point": tb.get("train_bytes", 0) / max(tb.get("train_points", 0), 1),
        "tb_probe_scalars": tb.get("probe_scalar_bytes", 0) / max(tb.get("probe_scalar_steps", 0), 1),
        "tb_probe_images": tb.get("probe_image_bytes", 0) / max(tb.get("probe_image_steps", 0), 1),
        "redis_checkpoint_entry": redis_sizes.get("checkpoint_entry", 0),
        "redis_result_entry": redis_sizes.get("result_entry", 0),
        "redis_done_mark": redis_sizes.get("done_mark", 0),
    }  # fmt: skip
    return {"sizes": {k: round(v, 1) for k, v in sizes.items()},
            "counts": {"checkpoints": len(records), "probe_dirs_full": len(full),
                       "probe_dirs_pruned": len(pruned), **tb}}  # fmt: skip


def default_policy_sizes(weights: float, state: float) -> dict[str, float]:
    """Checkpoint sizes of the default CoinRun policy (impala): its weights file is measured by
    writing one; its training state scaled by the state/weights ratio the soak measured (Adam
    keeps two moments per weight, so the ratio does not depend on the network)."""
    import tempfile

    from safetensors.torch import save_file

    from attention import build_policy

    policy = build_policy("impala", (3, 64, 64), 15)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "w.safetensors"
        save_file({k: v.contiguous() for k, v in policy.state_dict().items()}, str(path))
        impala = path.stat().st_size
    return {"checkpoint_weights": impala, "checkpoint_state": impala * state / max(weights, 1)}


def projection(soak: Soak, measured: dict[str, Any], slope: dict[str, Any]) -> dict[str, Any]:
    """Disk, Redis and memory at 1e9 steps with loupe's default retention: at the soak's own
    settings, and at the defaults of `loupe train --env procgen:coinrun` (impala, 64 envs x 256
    steps, a checkpoint every 10 updates)."""
    from learner import PPOConfig
    from loupe.retention import MeasuredSizes, Retention, project

    cfg = soak.config
    sizes = measured["sizes"]
    soak_sizes = MeasuredSizes(**{k: int(round(v)) for k, v in sizes.items()})
    default = PPOConfig.preset("procgen")
    impala = default_policy_sizes(sizes["checkpoint_weights"], sizes["checkpoint_state"])
    default_sizes = dataclasses.replace(soak_sizes, **{k: int(v) for k, v in impala.items()})
    out: dict[str, Any] = {"source": "loupe.retention.project", "retention": dataclasses.asdict(
        Retention())}  # fmt: skip
    for name, s, steps_per_update, every in (
        ("soak_settings", soak_sizes, cfg.actors * cfg.envs_per_actor * cfg.num_steps,
         cfg.checkpoint_every),
        ("defaults", default_sizes, default.num_envs * default.num_steps, 10),
    ):  # fmt: skip
        p = project(s, Retention(), steps_per_update, every, total_steps=10**9)
        out[name] = {"steps_per_update": steps_per_update, "checkpoint_every": every,
                     "sizes": dataclasses.asdict(s), **p,
                     "disk_gb": p["disk_bytes"] / 1e9,
                     "redis_memory_mb": p["redis_memory_bytes"] / (1 << 20)}  # fmt: skip
    out["disk_target_gb"] = DISK_TARGET_GB
    out["under_target"] = out["defaults"]["disk_gb"] < DISK_TARGET_GB
    # memory: each process's RSS slope carried over the time 1e9 steps take at the soak's rate
    rate = steps_per_s(soak)
    out["steps_per_s_measured"] = rate
    if rate:
        hours = 1e9 / rate / 3600
        out["hours_for_1e9_at_measured_rate"] = hours
        out["rss_growth_mb_at_1e9"] = {
            role: (fit["slope_per_10min"] or 0) * hours * 6
            for role, fit in slope["rss_mb_per_10min"].items()
            if role in LOUPE_ROLES and fit.get("slope_per_10min") is not None
        }
    return out


def steps_per_s(soak: Soak) -> float | None:
    """Training rate over the soak: newest step / time, from the first checkpoint to the last."""
    seen = sorted((c["seen"], c["step"]) for c in soak.checkpoints.values())
    if len(seen) < 2 or seen[-1][0] <= seen[0][0]:
        return None
    return (seen[-1][1] - seen[0][1]) / (seen[-1][0] - seen[0][0])


def violations(report: dict[str, Any]) -> list[str]:
    """Every target the soak missed, one line each."""
    out = []
    for role, fit in report["slopes"]["rss_mb_per_10min"].items():
        spec = LEVELS.get(role)
        level = (report["slopes"].get(spec.key) if spec else None) or {}
        if fit.get("ok") is False and fit.get("judged_on") and spec and level.get("rss"):
            rss, own = level["rss"], level.get("private") or {}
            out.append(
                f"RSS of {role} {spec.when} grows {rss['slope_per_10min']:.2f} MB per 10 "
                f"min (+- {rss['stderr_per_10min'] or 0:.2f}, {rss['points']} {spec.what}; private "
                f"memory {_fmt(own.get('slope_per_10min'))}; sampled every few seconds "
                f"{_fmt(fit['slope_per_10min'])}; target < {RSS_TARGET_MB_PER_10MIN:g})"
            )
        elif fit.get("ok") is False:
            robust = fit.get("robust_slope_per_10min")
            between = (fit.get("between_kills") or {}).get("slope_per_10min")
            own = (report["slopes"].get("private_mb_per_10min") or {}).get(role) or {}
            out.append(
                f"RSS of {role} grows {fit['slope_per_10min']:.2f} MB per 10 min (+- "
                f"{fit['stderr_per_10min'] or 0:.2f}; Theil-Sen {_fmt(robust)}, between kills "
                f"{_fmt(between)}, private memory {_fmt(own.get('slope_per_10min'))}; target < "
                f"{RSS_TARGET_MB_PER_10MIN:g})"
            )
    c = report["counts"]
    if not c["equal"]:
        out.append(f"checkpoints written/announced/probed = {c['written']}/{c['announced']}/"
                   f"{c['probed']} (lost or duplicated items)")  # fmt: skip
    if not report["steps"]["monotone"]:
        out.append("the step counter is not monotone across restarts")
    s = report["stalls"]
    if not s["within_bound"]:
        out.append(f"{s['longest_without_checkpoint_s']:.0f} s without a checkpoint "
                   f"(bound {s['bound_s']:g} s)")  # fmt: skip
    for k in report["kills"]:
        if not k["ok"]:
            back = "never" if k["back_s"] is None else f"after {k['back_s']:.1f} s"
            out.append(f"{k['component']} killed at {k['t']:.0f} s back {back} (target < "
                       f"{RECOVERY_TARGET_S:g} s)")  # fmt: skip
    if report["leftover_processes"]:
        out.append(f"{len(report['leftover_processes'])} process(es) still running after the "
                   "soak stopped everything")  # fmt: skip
    proj = report["projection_1e9_steps"]
    if proj.get("under_target") is False:
        out.append("projected disk for 1e9 steps over the target")
    return out


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def build_report(soak: Soak, kills: list[Kill], subreaper: bool) -> dict[str, Any]:
    """The whole report of a finished soak."""
    from loupe.bench import machine_info

    cfg = soak.config
    last = last_values(soak.samples)
    kill_times = [w.t for w in soak.kills]
    slope = slopes(soak.samples, cfg.warmup_s, cfg.segment_warmup_s, kill_times)
    results = (soak.streams or ([], []))[1]
    written = list(soak.checkpoints.values())
    level_points = {
        "probe_worker": {name: probe_levels(results, soak.from_wall, f"worker_{name}_mb")
                         for name in ("rss", "private")},
        "learner": {name: checkpoint_levels(written, f"{name}_mb") for name in ("rss", "private")},
    }  # fmt: skip
    for role, points in level_points.items():
        fits = level_fits(points, cfg.warmup_s, cfg.segment_warmup_s, kill_times, LEVELS[role].how)
        slope[LEVELS[role].key] = fits
        judge_on_level(slope, role, fits)
    sizes = measured_sizes(soak)
    report = {
        "note": NOTE,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_info() | {"load_average_at_end": list(_loadavg())},
        "config": dataclasses.asdict(cfg),
        "supervise": soak.supervise,
        "subreaper": subreaper,
        "duration_s": soak.t_end,
        "drain_s": None if soak.t_drained is None else soak.t_drained - (soak.t_end or 0),
        "samples": len(soak.samples),
        "slopes": slope,
        "last": last,
        "counts": counts(soak),
        "steps": steps(soak),
        "stalls": stalls(soak),
        "kills": recoveries(soak),
        "kills_planned": [dataclasses.asdict(k) for k in kills],
        "kills_not_done": [dataclasses.asdict(k) for k in soak.skipped],
        "restarts": {
            "probe_worker_starts": soak.probe_starts,
            "training_starts": soak.train_starts,
        },  # fmt: skip
        "sizes": sizes,
        "leftover_processes": soak.leftovers,
        "series": series(soak.samples),
        "events": soak.events,
    }
    for role, points in level_points.items():
        report["series"][LEVELS[role].series] = [
            {"pid": key, "t": round(t, 2), "rss_mb": rss} for key, t, rss in points["rss"]
        ]
    report["projection_1e9_steps"] = projection(soak, sizes, slope)
    report["steps_per_s"] = steps_per_s(soak)
    report["violations"] = violations(report)
    return report


def _loadavg() -> tuple[float, ...]:
    import os

    try:
        return os.getloadavg()
    except OSError:
        return ()
