"""Draws shipped-training.png, the shipped CoinRun agent's training curve, from its TensorBoard events.

    .venv/bin/python docs/images/shipped_training.py [TB_DIR] [OUT_PNG]

A CoinRun episode returns 10 when the level is completed and 0 otherwise, so the share of
episodes completed is ``episode/return / 10``. Events that log ``episode/count`` (one point per
update: the mean over that update's episodes) weigh each point by its count; older events hold one
point per episode. Points are pooled in bins of 65,536 steps, each with its Wilson 95% interval.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
BIN = 65_536
TARGET = 90.0


def episodes(tb: Path) -> tuple[dict[int, list[float]], int]:
    """-> (bin start step -> [completed episodes, episodes], the newest step logged)."""
    newest = 0
    bins: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for path in sorted(tb.glob("events.out.tfevents.*")):
        events = EventAccumulator(str(path), size_guidance={"scalars": 0}).Reload()
        tags = events.Tags()["scalars"]
        if "episode/return" not in tags:
            continue
        counts = {}
        if "episode/count" in tags:
            counts = {s.step: s.value for s in events.Scalars("episode/count")}
        for s in events.Scalars("episode/return"):
            n = counts.get(s.step, 1.0) if counts else 1.0
            b = bins[s.step // BIN * BIN]
            b[0] += n * s.value / 10.0
            b[1] += n
            newest = max(newest, s.step)
    return dict(bins), newest


def wilson(k: float, n: float, z: float = 1.96) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def main(tb: Path, out: Path) -> None:
    bins, newest = episodes(tb)
    if not bins:
        raise SystemExit(f"no episode/return events under {tb}")
    starts = sorted(bins)
    x = np.array([(s + BIN / 2) / 1e6 for s in starts])
    share = np.array([100 * bins[s][0] / bins[s][1] for s in starts])
    lo, hi = np.array([[100 * v for v in wilson(*bins[s])] for s in starts]).T
    fig, ax = plt.subplots(figsize=(9.6, 4.8), dpi=100)
    ax.fill_between(x, lo, hi, alpha=0.25, color="C0", label="95% interval (Wilson)")
    ax.plot(x, share, color="C0", label="levels completed, training episodes")
    ax.axhline(TARGET, color="C3", ls="--", lw=1.2, label="target on unseen levels: 90%")
    ax.set_ylim(0, 100)
    ax.set_xlabel("environment steps (millions)")
    ax.set_ylabel("% of episodes completed")
    ax.set_title(f"shipped CoinRun agent (interpretable policy, 2-core CPU), to step {newest:,}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    fig.tight_layout()
    fig.savefig(out)
    print(
        f"{out}: {len(starts)} bins of {BIN:,} steps, {sum(b[1] for b in bins.values()):,.0f} episodes"
    )


if __name__ == "__main__":
    args = sys.argv[1:]
    main(Path(args[0]) if args else ROOT / "agents" / "coinrun-interpretable" / "tb",
         Path(args[1]) if len(args) > 1 else ROOT / "docs" / "images" / "shipped-training.png")  # fmt: skip
