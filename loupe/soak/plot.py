"""The soak's plot: every sampled series over time, the kills marked."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loupe.soak.procs import LOUPE_ROLES, RAY_ROLES

COLOURS = {
    "learner": "tab:blue", "supervisor": "tab:cyan", "rollout_actor": "tab:orange",
    "probe_worker": "tab:green", "redis": "tab:red", "raylet": "tab:purple", "gcs": "tab:brown",
    "ray_agent": "tab:pink", "ray_worker": "tab:gray", "other": "tab:olive",
}  # fmt: skip
KILL_COLOURS = {"rollout_actor": "tab:orange", "probe_worker": "tab:green", "redis": "tab:red",
                "learner": "tab:blue"}  # fmt: skip


def _per_process(samples, field: str) -> dict[str, tuple[str, list[float], list[float]]]:
    lines: dict[str, tuple[str, list[float], list[float]]] = {}
    for s in samples:
        for row in s["procs"]:
            if row.get(field) is None:
                continue
            _, ts, ys = lines.get(row["key"], (None, [], []))
            ts.append(s["t"] / 60)
            ys.append(row[field])
            lines[row["key"]] = (row["role"], ts, ys)  # a Ray worker becomes an actor: last role
    return lines


def _series(samples, *path: str) -> tuple[list[float], list[float]]:
    ts, ys = [], []
    for s in samples:
        value: Any = s
        for part in path:
            value = value.get(part) if isinstance(value, dict) else None
        if value is not None:
            ts.append(s["t"] / 60)
            ys.append(value)
    return ts, ys


def plot_soak(report: dict[str, Any], samples: Sequence[dict[str, Any]], path: str | Path) -> None:
    """RSS per process, descriptors, Redis and object-store memory, the run directory, and the
    step, against minutes of the soak; a vertical line at each kill."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 2, figsize=(14, 11), sharex=True)
    ax = axes.ravel()
    for i, (field, title, roles) in enumerate([
        ("rss_mb", "RSS of loupe's processes (MB)", LOUPE_ROLES),
        ("rss_mb", "RSS of Ray's processes (MB)", RAY_ROLES),
        ("fds", "open file descriptors", (*LOUPE_ROLES, *RAY_ROLES)),
    ]):  # fmt: skip
        labelled = set()
        for role, ts, ys in _per_process(samples, field).values():
            if role not in roles:
                continue
            label = None if role in labelled else role
            labelled.add(role)
            ax[i].plot(ts, ys, color=COLOURS.get(role, "black"), lw=1, label=label)
        if i == 0:  # the levels at one phase of each loop, which the slopes are judged on
            for key, marker, label in (
                ("probe_worker_level", "o", "probe_worker before each probe"),
                ("learner_level", "^", "learner at each checkpoint"),
            ):
                levels = (report.get("series") or {}).get(key) or []
                if levels:
                    ax[i].plot([p["t"] / 60 for p in levels], [p["rss_mb"] for p in levels],
                               marker, ms=2.5, color="black", label=label)  # fmt: skip
        ax[i].set_title(title)
        ax[i].legend(fontsize=7, loc="upper left")
    ts, ys = _series(samples, "redis", "used_memory_mb")
    ax[3].plot(ts, ys, color="tab:red", label="Redis used_memory")
    ts, ys = _series(samples, "object_store", "used_mb")
    ax[3].plot(ts, ys, color="tab:purple", label="Ray object store in use")
    ax[3].set_title("Redis and object-store memory (MB)")
    ax[3].legend(fontsize=7, loc="upper left")
    for sub, colour in (("total", "black"), ("checkpoints", "tab:blue"), ("probes", "tab:green"),
                        ("tb", "tab:orange"), ("redis", "tab:red")):  # fmt: skip
        ts, ys = _series(samples, "run_dir_mb", sub)
        ax[4].plot(ts, ys, color=colour, label=f"run/{sub}" if sub != "total" else "run dir")
    ts, ys = _series(samples, "ray_sessions_mb")
    ax[4].plot(ts, ys, color="tab:purple", ls="--", label="Ray session dirs (/tmp/ray)")
    ax[4].set_title("disk (MB)")
    ax[4].legend(fontsize=7, loc="upper left")
    ts, ys = _series(samples, "newest_step")
    ax[5].plot(ts, ys, color="tab:blue", label="newest checkpoint step")
    ax[5].set_title("training progress (environment steps)")
    twin = ax[5].twinx()
    for key, colour in (("announced", "tab:red"), ("results", "tab:green")):
        ts, ys = _series(samples, "redis", key)
        twin.plot(ts, ys, color=colour, lw=1, ls=":", label=f"{key} (stream entries)")
    twin.legend(fontsize=7, loc="lower right")
    ax[5].legend(fontsize=7, loc="upper left")
    for a in ax:
        for k in report.get("kills", []):
            a.axvline(k["t"] / 60, color=KILL_COLOURS.get(k["component"], "black"), ls="--",
                      lw=0.8)  # fmt: skip
        a.grid(alpha=0.3)
    for k in report.get("kills", []):
        back = "not back" if k["back_s"] is None else f"{k['back_s']:.0f} s"
        ax[0].annotate(f"kill {k['component']} ({back})", (k["t"] / 60, 1.0),
                       xycoords=("data", "axes fraction"), rotation=90, fontsize=7,
                       va="top", ha="right")  # fmt: skip
    for a in axes[-1]:
        a.set_xlabel("minutes")
    counts = report.get("counts", {})
    fig.suptitle(
        f"loupe soak: {report.get('duration_s', 0) / 60:.1f} min, checkpoints written/announced/"
        f"probed {counts.get('written')}/{counts.get('announced')}/{counts.get('probed')}, "
        f"{len(report.get('kills', []))} kills ({report.get('machine', {}).get('cpus', '?')} "
        "CPU cores)"
    )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
