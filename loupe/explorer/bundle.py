"""Builds the explorer's static bundle: HTML, JS, CSS, data scripts with JSON twins, PNG sprites.

    build_probe_bundle("runs/x/probes/step-...", "view/")     # one probed checkpoint
    build_run_bundle("runs/x", "view/")                       # a run's probes over training
    build_eval_bundle("eval-out/", "view/")                   # a `loupe evaluate` directory

Every data file ``data/<key>.js`` calls ``LOUPE.put(key, data)`` so that the page works from
``file://`` (where ``fetch`` of local files is refused); ``data/<key>.json`` holds the same data for
other tools. Per-frame data the probe suite does not keep (frames, values, advantages, policies,
attribution at every frame) is recomputed here from the checkpoint by recording its trajectories
again with the probe's settings (the recording is seeded, so the probe's bookmarks are found again).

Attribution overlays follow METHODS D: value (or logit, or action group) IG at the analysis layer,
the probe's NMF directions, the residual as its own entry, each entry's positive and negative part
divided by the median over frames of each frame's max and smoothed at layer resolution with the
exp(-d) disk. Entries are shipped as 8-bit grey tiles in one sprite per (trajectory, target, sign);
the browser tints and adds them, so hovering a legend entry needs no extra image.

What a default build holds and what it leaves for the asking (the page says both): attribution to
the value and the action groups at every frame (other targets: ``--target logit:I``); gradient
and SmoothGrad saliency at the GAE bookmarks and every 16th frame, perturbation saliency at the
bookmarks (``--saliency all``: every frame); attention maps at every frame. Failed levels of an evaluation are replayed
from their level seed and recorded actions (``build_replay``) into trajectory pages of their own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from loupe.errors import LoupeError

STATIC = Path(__file__).parent / "static"
#: the largest side of a sprite sheet
SPRITE_SIDE = 4096


@dataclasses.dataclass
class BundleConfig:
    """What a trajectory bundle holds, and how much of it."""

    #: trajectories (environments recorded); None: the probe's own setting
    num_envs: int | None = None
    #: frames per trajectory; None: the probe's own setting
    num_steps: int | None = None
    #: attribution targets: "value", "logit:I", "group:NAME" (left, right, up, down), or "auto"
    #: (value and the action groups)
    targets: tuple[str, ...] = ("auto",)
    #: Riemann steps of integrated gradients (8: within 3% of 64 steps on the shipped agent's
    #: frames, bench/explorer.json ig_steps_check)
    ig_steps: int = 8
    #: observations per integrated-gradients call (each call holds ig_steps x chunk activations)
    chunk: int = 64
    #: radius (layer cells) of the exp(-d) smoothing disk
    smooth_radius: int = 7
    #: frames given saliency maps (gradient, SmoothGrad, perturbation): "sample" (the GAE bookmarks
    #: and every saliency_every-th frame), "all" or "none"; attention maps cover every frame
    saliency: str = "sample"
    #: with saliency "sample": every this many frames
    saliency_every: int = 16
    #: SmoothGrad copies per frame (0: no SmoothGrad)
    smoothgrad_copies: int = 8
    #: grid stride (pixels) of perturbation saliency (0: no perturbation saliency)
    perturbation_stride: int = 8
    #: compute the t-SNE embedding of the analysis layer's activations
    embedding: bool = True
    #: t-SNE iterations (the first 250 with early exaggeration)
    tsne_iterations: int = 500
    #: torch intra-op threads for attribution and saliency (0: torch's own choice). One: on two
    #: shared cores a second thread mostly waits (bench/explorer.json: twice the CPU seconds and
    #: twice the wall time); the recording (one small batch per step) and the t-SNE use one too
    torch_threads: int = 1

    def __post_init__(self):
        for name in ("num_envs", "num_steps"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise LoupeError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if self.ig_steps <= 0 or self.chunk <= 0 or self.smooth_radius < 0:
            raise LoupeError("ig_steps and chunk must be positive and smooth_radius >= 0")
        if self.saliency not in ("sample", "all", "none"):
            raise LoupeError(f"--saliency must be sample, all or none, not {self.saliency!r}")
        if self.saliency_every <= 0:
            raise LoupeError(f"--saliency-every must be positive, got {self.saliency_every}")
        if self.smoothgrad_copies < 0 or self.perturbation_stride < 0:
            raise LoupeError("smoothgrad_copies and perturbation_stride must be >= 0")
        if self.torch_threads < 0:
            raise LoupeError(f"--threads must be >= 0, got {self.torch_threads}")
        if self.tsne_iterations < 250:
            raise LoupeError(f"--tsne-iterations must be >= 250, got {self.tsne_iterations}")


Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


# -- writing -----------------------------------------------------------------------------------------
def _round(data: Any, digits: int = 6) -> Any:
    """Floats to ``digits`` significant figures (smaller JSON); NaN and inf become None."""
    if isinstance(data, float):
        if not math.isfinite(data):
            return None
        return float(f"{data:.{digits}g}")
    if isinstance(data, dict):
        return {k: _round(v, digits) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_round(v, digits) for v in data]
    if isinstance(data, np.generic):
        return _round(data.item(), digits)
    return data


def put(out: Path, key: str, data: Any) -> None:
    """``data/<key>.js`` (``LOUPE.put(key, data)``) and its twin ``data/<key>.json``."""
    text = json.dumps(_round(data), separators=(",", ":"), sort_keys=True)
    path = out / "data" / key
    path.parent.mkdir(parents=True, exist_ok=True)
    for suffix, body in (
        (".json", text + "\n"),
        (".js", f"LOUPE.put({json.dumps(key)},{text});\n"),
    ):
        tmp = path.with_name(path.name + suffix + ".tmp")
        tmp.write_text(body)
        tmp.replace(path.with_name(path.name + suffix))


def copy_static(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for item in STATIC.iterdir():
        if item.is_file():
            shutil.copyfile(item, out / item.name)


def sprite(tiles: np.ndarray, cols: int | None = None) -> tuple[np.ndarray, int]:
    """(M, h, w[, 3]) uint8 tiles -> (sheet, columns); tile i sits at (i % cols, i // cols)."""
    m, h, w = tiles.shape[:3]
    if cols is None:
        cols = max(1, min(m, SPRITE_SIDE // w))
    rows = max(1, math.ceil(m / cols))
    if rows * h > SPRITE_SIDE:
        raise LoupeError(f"{m} tiles of {h}x{w} do not fit one {SPRITE_SIDE}px sprite sheet")
    sheet = np.zeros((rows * h, cols * w, *tiles.shape[3:]), dtype=np.uint8)
    for i in range(m):
        r, c = divmod(i, cols)
        sheet[r * h : (r + 1) * h, c * w : (c + 1) * w] = tiles[i]
    return sheet, cols


def save_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    # level 6: 1% larger than level 9 on the sprites and several times faster to write
    Image.fromarray(image).save(path, format="PNG", optimize=False, compress_level=6)


def grey(x: np.ndarray) -> np.ndarray:
    """Floats in [0, 1] -> uint8."""
    return np.round(np.clip(np.nan_to_num(x), 0.0, 1.0) * 255.0).astype(np.uint8)


# -- targets and actions ---------------------------------------------------------------------------
def action_names(n_actions: int, env_options: dict[str, Any] | None) -> list[str]:
    from actors.procgen_env import ARTICLE_COMBOS, COMBOS

    combos = None
    if n_actions == len(COMBOS):
        combos = COMBOS
    elif n_actions == len(ARTICLE_COMBOS):
        combos = ARTICLE_COMBOS
    if combos is None:
        return [str(i) for i in range(n_actions)]
    return ["+".join(c) or "NOOP" for c in combos]


def action_groups(names: list[str]) -> dict[str, list[int]]:
    """Direction groups (left, right, up, down) of procgen button combos."""
    groups: dict[str, list[int]] = {}
    for key in ("LEFT", "RIGHT", "UP", "DOWN"):
        members = [i for i, n in enumerate(names) if key in n.split("+")]
        if members:
            groups[key.lower()] = members
    return groups


def resolve_targets(specs, n_actions: int, groups: dict[str, list[int]], actions=None):
    """Target names -> (names, IG target specs); "auto" is the value and the action groups."""
    names: list[str] = []
    for spec in specs:
        if spec == "auto":
            names += ["value", *[f"group:{g}" for g in groups]]
        else:
            names.append(spec)
    out_names, ig_specs = [], []
    for name in dict.fromkeys(names):
        if name == "value":
            ig_specs.append("value")
        elif name.startswith("logit:"):
            index = name.split(":", 1)[1]
            if not index.isdigit() or int(index) >= n_actions:
                raise LoupeError(
                    f"target {name!r}: the policy has logits 0..{n_actions - 1}; use logit:I"
                )
            ig_specs.append(name)
        elif name.startswith("group:"):
            label = name.split(":", 1)[1]
            if label not in groups:
                raise LoupeError(
                    f"unknown action group {label!r}; groups: {', '.join(groups) or 'none'}"
                )
            ig_specs.append((label, groups[label]))
        else:
            raise LoupeError(f"unknown target {name!r}; use value, logit:I or group:NAME")
        out_names.append(name)
    return out_names, ig_specs


# -- NMF entries ----------------------------------------------------------------------------------
def nmf_entries(nmf, attr) -> np.ndarray:
    """Probe NMF features and residual of (N, C, h, w) attributions -> (N, K + 1, h, w): the
    features ``nmf.transform`` and, last, ``nmf.residual`` (METHODS D), with the unscaled
    coefficients t0 solved once for both."""
    a = np.asarray(attr, dtype=np.float64)
    d = nmf.directions
    t0 = nmf.transform_unscaled(a)  # (N, K, h, w)
    approx = nmf.inverse(np.maximum(t0, 0.0)) - nmf.inverse(np.maximum(-t0, 0.0))
    residual = (a - approx).sum(1, keepdims=True)
    return np.concatenate([t0 * d.sum(-1)[None, :, None, None], residual], 1)


# -- one checkpoint --------------------------------------------------------------------------------
def probe_settings(summary: dict[str, Any]) -> dict[str, Any]:
    """The recording settings of a probe summary (defaults of ProbeConfig where not saved)."""
    from probes.suite import ProbeConfig

    saved = summary.get("config") or {}
    base = dataclasses.asdict(ProbeConfig())
    base.update({k: v for k, v in saved.items() if k in base})
    return base


def load_summary(probe_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    from loupe.config import load_json

    d = Path(probe_dir)
    if not d.is_dir():
        raise LoupeError(f"{d} is not a directory; give a `loupe probe` output directory")
    path = d / "summary.json"
    if not path.is_file():
        raise LoupeError(
            f"{d} holds no summary.json (an unfinished or foreign directory); run "
            "`loupe probe --checkpoint CKPT --out DIR` or view the checkpoint with --checkpoint"
        )
    return d, load_json(path)


def build_checkpoint_data(
    out: Path,
    key: str,
    summary: dict[str, Any],
    probe_dir: Path | None,
    config: BundleConfig,
    progress: Progress = _quiet,
    rebuild: str | None = None,
) -> dict[str, Any]:
    """Trajectories of one probed checkpoint into ``out/data/<key>/...`` -> its meta record.

    The trajectories are recorded again with the probe's settings (seeded: the probe's bookmarks
    come back); ``rebuild`` is the command line that builds this bundle, shown on the page next to
    what was left out by default."""
    from learner.checkpoint import load_checkpoint
    from probes.suite import ProbeConfig, record

    t0 = time.perf_counter()
    ckpt = summary.get("checkpoint")
    if not ckpt or not Path(ckpt).exists():
        raise LoupeError(
            f"the probe summary's checkpoint {ckpt!r} is not there; the explorer needs it to "
            "replay the trajectories"
        )
    policy, meta = load_checkpoint(ckpt)
    if summary.get("sha256") and meta["sha256"] != summary["sha256"]:
        raise LoupeError(f"{ckpt} is not the checkpoint that was probed (sha256 differs)")
    policy.eval()
    settings = probe_settings(summary)
    num_envs = config.num_envs or settings["num_envs"]
    num_steps = config.num_steps or settings["num_steps"]
    probe_cfg = ProbeConfig(num_envs=num_envs, num_steps=num_steps, seed=settings["seed"])
    progress(f"recording {num_envs} trajectories x {num_steps} frames")
    with torch_threads(1):  # one small batch per step: one thread is faster (bench/explorer.json)
        rollout = record(policy, meta, probe_cfg)
    record_s = time.perf_counter() - t0
    extra = {
        "summary": summary,
        "recording": {"num_envs": num_envs, "num_steps": num_steps, "seed": settings["seed"]},
    }
    with torch_threads(config.torch_threads):
        built = build_trajectories(out, key, policy, meta, ckpt, rollout, summary["layer"],
                                   summary.get("nmf") or {}, probe_dir, config, settings,
                                   progress, rebuild=rebuild, extra=extra)  # fmt: skip
    built["timings"]["record_s"] = record_s
    put(out, f"{key}/meta", built)
    return built


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to ``n`` inside the block (0: unchanged), restored after it."""
    import torch

    if n <= 0:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


#: saliency kinds of a bundle, and where "sample" puts them
SALIENCY_KINDS = ("gradient", "smoothgrad", "perturbation")


def saliency_kinds(config: BundleConfig) -> list[str]:
    kinds = ["gradient"]
    kinds += ["smoothgrad"] if config.smoothgrad_copies > 0 else []
    kinds += ["perturbation"] if config.perturbation_stride > 0 else []
    return [] if config.saliency == "none" else kinds


def saliency_frames(config: BundleConfig, t_len: int, marks, env: int, kind: str) -> list[int]:
    """The frames of trajectory ``env`` given ``kind`` saliency maps: all of them, none, or
    (``sample``) the GAE bookmarks of that trajectory and, except for perturbation saliency (one
    forward pass per grid point: the costliest), every ``saliency_every``-th frame."""
    if config.saliency == "none":
        return []
    if config.saliency == "all":
        return list(range(t_len))
    chosen = set() if kind == "perturbation" else set(range(0, t_len, config.saliency_every))
    chosen.update(b.t for b in marks if b.env == env and 0 <= b.t < t_len)
    return sorted(chosen)


def _where(config: BundleConfig, kind: str, count: int, total: int) -> str:
    if config.saliency == "all":
        return f"at every frame ({count})"
    at = "the GAE bookmarks"
    if kind != "perturbation":
        at += f" and every {config.saliency_every}th frame"
    return f"at {at} ({count} of {total} frames)"


def build_trajectories(
    out: Path,
    key: str,
    policy,
    meta: dict[str, Any],
    ckpt: str,
    rollout,
    layer: str,
    nmf_info: dict[str, Any],
    probe_dir: Path | None,
    config: BundleConfig,
    settings: dict[str, Any],
    progress: Progress = _quiet,
    rebuild: str | None = None,
    extra: dict[str, Any] | None = None,
    values_recorded: bool = True,
) -> dict[str, Any]:
    """Recorded trajectories (a learner.Rollout, trajectory i = environment i) -> the data files of
    ``out/data/<key>/`` and their meta record (returned, not written).

    ``settings``: the GAE scan's ``gamma``, ``lam`` and ``bookmarks``. ``nmf_info``: a probe
    summary's ``nmf`` entry (its directions; without them NMF features are fitted on these
    trajectories' value attributions). ``values_recorded``: rollout.values holds V(obs) from the
    recording; else the values are computed here.
    """
    import torch

    from probes.attribution import IntegratedGradients
    from probes.gae_scan import gae_scan
    from probes.nmf import AttributionNMF

    timings: dict[str, float] = {}
    t_len, n_env = rollout.actions.shape
    frames = rollout.obs  # (T, N, C, H, W)
    obs_hw = list(frames.shape[-2:])
    names = action_names(policy.n_actions, meta.get("env_options"))
    groups = action_groups(names)
    target_names, ig_specs = resolve_targets(
        config.targets, policy.n_actions, groups, rollout.actions
    )
    # trajectory-major frames: trajectory i's frame t is flat[i * T + t]
    flat = torch.from_numpy(np.ascontiguousarray(frames.transpose(1, 0, 2, 3, 4))).reshape(
        n_env * t_len, *frames.shape[2:]
    )

    # attribution at every frame, reduced at once to NMF entries (features + residual); the
    # policy's outputs come from the layer's activation (the rest of the network after it)
    t0 = time.perf_counter()
    directions = nmf_info.get("directions")
    nmf = AttributionNMF.from_directions(directions) if directions else None
    ig = IntegratedGradients(policy, layer, n_steps=config.ig_steps)
    attrs: list[np.ndarray] = []  # per chunk (K, n, C, h, w), kept only while NMF is to be fitted
    entries: list[np.ndarray] = []  # per chunk: (K, n, E, h, w)
    acts: list[np.ndarray] = []
    heads: list[tuple[torch.Tensor, torch.Tensor]] = []
    full_forward = policy.has_attention or layer not in policy.layer_names
    progress(f"attributing {len(flat)} frames to {len(target_names)} targets at layer {layer}")
    for start in range(0, len(flat), config.chunk):
        res = ig.attribute(flat[start : start + config.chunk], ig_specs)
        if not full_forward:
            with torch.no_grad():
                heads.append(policy.forward_from(layer, res.activation))
        attr = res.attributions.numpy()  # (K, n, C, h, w)
        acts.append(res.activation.numpy().reshape(attr.shape[1], -1).astype(np.float32))
        if attr.ndim != 5:
            continue
        if nmf is None and directions is None:
            attrs.append(attr.astype(np.float32))
        elif nmf is not None:
            entries.append(np.stack([nmf_entries(nmf, a) for a in attr]).astype(np.float32))
        else:
            entries.append(attr.sum(2, keepdims=True).astype(np.float32))
    if attrs:  # no directions given: NMF of these trajectories' value attributions
        nmf_info, nmf = _fit_nmf(np.concatenate(attrs, 1), target_names, settings)
        if nmf is None:
            entries = [a.sum(2, keepdims=True) for a in attrs]
        else:
            entries = [np.stack([nmf_entries(nmf, x) for x in a]).astype(np.float32) for a in attrs]
        del attrs
        directions = nmf_info.get("directions")
    attention = entropy = None
    if full_forward:
        with torch.no_grad():
            outs = [policy(chunk) for chunk in flat.split(256)]
        logits = torch.cat([o.logits for o in outs])
        values = torch.cat([o.value for o in outs]).numpy()
        if policy.has_attention and outs[0].attention is not None:
            attention = torch.cat([o.attention for o in outs])
            if outs[0].attention_entropy is not None:
                entropy = torch.cat([o.attention_entropy for o in outs]).numpy()
        del outs
    else:
        logits = torch.cat([h[0] for h in heads])
        values = torch.cat([h[1] for h in heads]).numpy()
    probs = torch.softmax(logits, -1).numpy()
    timings["ig_nmf_s"] = time.perf_counter() - t0
    activations = np.concatenate(acts)
    values = values.reshape(n_env, t_len)
    scan_values = rollout.values if values_recorded else values.T.astype(np.float32)
    marks, advantages = gae_scan(rollout.rewards, scan_values, rollout.dones,
                                 rollout.last_value, settings["gamma"], settings["lam"],
                                 settings["bookmarks"])  # fmt: skip

    t0 = time.perf_counter()
    base = out / "data" / key
    layer_hw = None
    attr_index: dict[str, Any] = {}
    ent = None
    if entries:
        ent = np.concatenate(entries, 1)  # (K, N*T, E, h, w)
        del entries
        _, m, n_entries, h, w = ent.shape
        layer_hw = [h, w]
        hues = np.array([e["colour"] for e in _copy_features(None, base, nmf_info)], np.float32)
        smoother = smooth_matrix(h, w, config.smooth_radius) if config.smooth_radius else None
        for ti, target in enumerate(target_names):
            attr_index[target] = {}
            for sign, sname in ((1, "pos"), (-1, "neg")):
                part = np.maximum(sign * ent[ti], 0.0)  # (M, E, h, w)
                scale = float(np.median(part.reshape(m, -1).max(1)))
                scale = scale if scale > 0 else 1.0
                sm = part.reshape(m * n_entries, h * w) / np.float32(scale)
                if smoother is not None:
                    sm = sm @ smoother  # the exp(-d) disk, zero padding (smoother is symmetric)
                sm = sm.reshape(m, n_entries, h, w)
                # METHODS D: colour = sum_e v_e hue_e, opacity = min(1, |rgb|); the browser adds
                # the tinted tiles, so each position is scaled by 1 / max(1, |rgb|) here
                rgb = np.einsum("mehw,ec->mchw", sm, hues)
                sm = sm / np.maximum(1.0, np.linalg.norm(rgb, axis=1))[:, None]
                # 64 grey levels: a quarter of the PNG bytes saved, invisible once tinted
                q = (grey(sm) // 4 * 4).reshape(n_env, t_len, n_entries, h, w)
                attr_index[target][sname] = {"scale": scale}
                for i in range(n_env):
                    sheet, cols = sprite(q[i].reshape(-1, h, w), _attr_cols(n_entries, w))
                    save_png(base / f"traj-{i}-attr-{_safe(target)}-{sname}.png", sheet)
                    attr_index[target]["cols"] = cols
    timings["overlays_s"] = time.perf_counter() - t0

    # saliency at observation resolution, per frame normalised to its max, at the chosen frames
    t0 = time.perf_counter()
    saliency_index: dict[str, Any] = {}
    sal_frames: dict[str, list[list[int]]] = {}
    for kind in saliency_kinds(config):
        sal_frames[kind] = [saliency_frames(config, t_len, marks, i, kind) for i in range(n_env)]
        picked = [i * t_len + t for i in range(n_env) for t in sal_frames[kind][i]]
        if not picked:
            continue
        progress(f"{kind} saliency of {len(picked)} frames")
        maps = _half(_saliency_maps(policy, flat[picked], kind, config))
        offset = 0
        for i in range(n_env):
            part = maps[offset : offset + len(sal_frames[kind][i])]
            offset += len(part)
            if not len(part):
                part = np.zeros((1, *maps.shape[1:]), maps.dtype)
            # half resolution and 32 grey levels: gradient maps are noise-like and compress badly
            sheet, cols = sprite(grey(part) // 8 * 8)
            save_png(base / f"traj-{i}-sal-{kind}.png", sheet)
        saliency_index[kind] = {"cols": cols, "tile": list(maps.shape[-2:]), "sampled": True,
                                "frames": len(picked),
                                "where": _where(config, kind, len(picked), n_env * t_len)}  # fmt: skip
    if attention is not None:  # from the forward pass: every frame
        maps = _half(_attention_maps(attention, tuple(obs_hw))).reshape(n_env, t_len, -1,
                                                                        obs_hw[1] // 2)  # fmt: skip
        for i in range(n_env):
            sheet, cols = sprite(grey(maps[i]) // 8 * 8)
            save_png(base / f"traj-{i}-sal-attention.png", sheet)
        saliency_index["attention"] = {"cols": cols, "tile": list(maps.shape[-2:]),
                                       "sampled": False}  # fmt: skip
    timings["saliency_s"] = time.perf_counter() - t0
    # frames
    t0 = time.perf_counter()
    for i in range(n_env):
        f = frames[:, i]  # (T, C, H, W)
        rgb = f.transpose(0, 2, 3, 1) if f.shape[1] == 3 else np.repeat(f[:, -1, :, :, None], 3, 3)
        sheet, frame_cols = sprite(np.ascontiguousarray(rgb))
        save_png(base / f"traj-{i}-frames.png", sheet)
    timings["frames_s"] = time.perf_counter() - t0

    # per-trajectory scalars
    probs = probs.reshape(n_env, t_len, -1)
    dominant = None
    if ent is not None and directions:
        value_ti = target_names.index("value") if "value" in target_names else 0
        feats = np.maximum(ent[value_ti][:, :-1], 0).sum((2, 3))  # (M, F)
        dominant = feats.argmax(1).reshape(n_env, t_len)
    for i in range(n_env):
        acts_i = rollout.actions[:, i]
        traj = {
            "index": i,
            "frames": t_len,
            "frame_cols": frame_cols,
            "action": acts_i.tolist(),
            "probs": np.round(probs[i], 4).tolist(),
            "chosen_prob": probs[i][np.arange(t_len), acts_i].tolist(),
            "value": values[i].tolist(),
            "advantage": advantages[:, i].tolist(),
            "reward": rollout.rewards[:, i].tolist(),
            "done": rollout.dones[:, i].astype(int).tolist(),
            "level_seed": rollout.level_seeds[:, i].tolist(),
            "saliency_frames": {kind: f[i] for kind, f in sal_frames.items()},
        }
        if entropy is not None:
            traj["attention_entropy"] = entropy.reshape(n_env, t_len)[i].tolist()
        put(out, f"{key}/traj-{i}", traj)

    features = _copy_features(probe_dir, base, nmf_info)
    common = int(np.bincount(rollout.actions.ravel(), minlength=policy.n_actions).argmax())
    record_meta = {
        "key": key,
        "step": meta.get("step"),
        "checkpoint": ckpt,
        "sha256": meta["sha256"],
        "policy": policy.spec.get("name"),
        "env": meta.get("env"),
        "layer": layer,
        "layer_hw": layer_hw,
        "obs_hw": obs_hw,
        "trajectories": n_env,
        "frames": t_len,
        "actions": names,
        "action_groups": groups,
        "targets": target_names,
        "attribution": attr_index,
        "entries": features,
        "nmf_source": "trajectories" if nmf_info.get("fitted_on") else "probe",
        "saliency": saliency_index,
        "saliency_sample": {
            "mode": config.saliency,
            "every": config.saliency_every,
            "smoothgrad_copies": config.smoothgrad_copies,
            "perturbation_stride": config.perturbation_stride,
        },
        "on_request": {
            "rebuild": rebuild,
            "targets": ["value", *[f"group:{g}" for g in groups], "logit:I"],
            "common_logit": f"logit:{common}",
            "ig_steps": config.ig_steps,
        },
        "has_attention": attention is not None,
        "bookmarks": [dataclasses.asdict(b) for b in marks],
        **(extra or {}),
        "timings": timings,
    }
    if config.embedding:
        t0 = time.perf_counter()
        progress("embedding the frames with t-SNE")
        put(out, f"{key}/embedding", _embedding(activations, values, rollout.actions, dominant,
                                                n_env, t_len, config.tsne_iterations))  # fmt: skip
        timings["tsne_s"] = time.perf_counter() - t0
        record_meta["embedding"] = True
    return record_meta


def _fit_nmf(attr: np.ndarray, target_names: list[str], settings: dict[str, Any]):
    """NMF of the value attributions (K, M, C, h, w) of these trajectories -> (an nmf entry like a
    probe summary's, the fitted AttributionNMF or None)."""
    from probes.nmf import fit_attribution_nmf

    value = attr[target_names.index("value") if "value" in target_names else 0]
    k = min(int(settings.get("nmf_components") or 8), value.shape[1])
    if not np.any(value) or len(value) < 2:
        return {"error": "value attributions are all zero"}, None
    nmf = fit_attribution_nmf(value.astype(np.float64), n_components=k,
                              seed=int(settings.get("seed") or 0))  # fmt: skip
    return {
        "components": k,
        "directions": nmf.directions.tolist(),
        "fitted_on": "trajectories",
    }, nmf


def smooth_matrix(h: int, w: int, radius: int) -> np.ndarray:
    """The (h*w, h*w) float32 matrix of ``probes.render.smooth`` (the exp(-d) disk, zero
    padding) on one (h, w) plane: ``smooth(x) == x.reshape(-1, h*w) @ smooth_matrix(...)``. One
    matrix product smooths every plane at once, where a 2-D convolution of many small planes is
    slow on a CPU."""
    from probes.render import disk_kernel

    kernel = disk_kernel(radius)
    ys, xs = np.divmod(np.arange(h * w), w)
    dy = ys[:, None] - ys[None, :]
    dx = xs[:, None] - xs[None, :]
    inside = (np.abs(dy) <= radius) & (np.abs(dx) <= radius)
    values = kernel[np.clip(dy + radius, 0, 2 * radius), np.clip(dx + radius, 0, 2 * radius)]
    return np.where(inside, values, 0.0).astype(np.float32)


def _attr_cols(n_entries: int, w: int) -> int:
    return n_entries * max(1, SPRITE_SIDE // (n_entries * w))


def _safe(target: str) -> str:
    return target.replace(":", "-")


def _saliency_maps(policy, obs, kind: str, config: BundleConfig) -> np.ndarray:
    """``kind`` saliency of the value (gradient, SmoothGrad or perturbation) for (M, C, H, W)
    frames -> (M, H, W), each frame divided by its 99.5th percentile after a square root."""
    import torch

    from probes.saliency import (
        NoiseConfig,
        gradient_saliency,
        noisy_gradients,
        perturbation_saliency,
    )

    channels = 3 if policy.obs_shape[0] == 3 else 1
    parts = []
    for chunk in obs.split(128):
        if kind == "gradient":
            parts.append(gradient_saliency(policy, chunk, "value")[:, -channels:].sum(1))
        elif kind == "smoothgrad":
            cfg = NoiseConfig(n=config.smoothgrad_copies)
            g = noisy_gradients(policy, chunk, "value", cfg)  # (n, copies, C, H, W)
            parts.append(g.mean(1)[:, -channels:].sum(1))
        else:
            parts.append(perturbation_saliency(policy, chunk, "value",
                                               stride=config.perturbation_stride))  # fmt: skip
    # square root for a visible spread, each frame divided by its 99.5th percentile
    maps = np.sqrt(np.maximum(torch.cat(parts).numpy(), 0))
    top = np.percentile(maps.reshape(len(maps), -1), 99.5, axis=1)[:, None, None]
    return np.divide(maps, top, out=np.zeros_like(maps), where=top > 0)


def _half(maps: np.ndarray) -> np.ndarray:
    """(M, H, W) -> (M, H // 2, W // 2), the mean of each 2 x 2 block."""
    m, h, w = maps.shape
    maps = maps[:, : h // 2 * 2, : w // 2 * 2]
    return maps.reshape(m, h // 2, 2, w // 2, 2).mean((2, 4))


def _attention_maps(attention, obs_hw) -> np.ndarray:
    from probes.attention_maps import attention_overlay, upsample_map

    if attention.shape[-1] == 7 and obs_hw[0] == 84:
        return attention_overlay(attention)
    return upsample_map(attention.sum(1, keepdim=True), obs_hw)


def _copy_features(probe_dir: Path | None, base: Path, nmf_info: dict[str, Any]) -> list[dict]:
    """Legend entries: NMF features (hue 360 k / K, dataset-example images) and the residual."""
    from probes.render import feature_hues

    directions = nmf_info.get("directions")
    if not directions:
        return [{"name": "attribution", "colour": [1.0, 1.0, 1.0]}]
    k = len(directions)
    hues = feature_hues(k)
    entries = []
    for i in range(k):
        entry = {"name": f"feature {i}", "colour": hues[i].tolist()}
        for kind in ("examples", "spatial"):
            src = (
                probe_dir / nmf_info.get("dir", "nmf") / f"feature{i}-{kind}.png"
                if probe_dir
                else None
            )
            if src is not None and src.is_file():
                (base / "features").mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, base / "features" / src.name)
                entry[kind] = f"features/{src.name}"
        entries.append(entry)
    entries.append({"name": "residual", "colour": [0.75, 0.75, 0.75], "residual": True})
    return entries


def _embedding(acts, values, actions, dominant, n_env: int, t_len: int,
               iterations: int = 500) -> dict[str, Any]:  # fmt: skip
    """t-SNE of the analysis-layer activations (after PCA to at most 50 dimensions)."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    x = np.asarray(acts, dtype=np.float32)
    m = len(x)
    if m < 5:
        return {"points": [], "error": "too few frames for an embedding"}
    dims = min(50, m - 1, x.shape[1])
    # one thread: sklearn's Barnes-Hut t-SNE spends most of its CPU time waiting on its threads
    # otherwise (2048 points: several times slower with two on two busy cores, bench/explorer.json)
    with threadpool_limits(1), warnings.catch_warnings():
        x = PCA(n_components=dims, random_state=0).fit_transform(x)
        warnings.simplefilter("ignore")
        xy = TSNE(n_components=2, perplexity=min(30.0, (m - 1) / 3.0), init="pca",
                  max_iter=iterations, random_state=0).fit_transform(x)  # fmt: skip
    lo, hi = xy.min(0), xy.max(0)
    xy = (xy - lo) / np.where(hi > lo, hi - lo, 1.0)
    acts_em = actions.T.reshape(-1)  # env-major like the activations
    points = []
    for j in range(m):
        i, t = divmod(j, t_len)
        points.append([round(float(xy[j, 0]), 4), round(float(xy[j, 1]), 4), i, t,
                       float(values[i, t]), int(acts_em[j]),
                       int(dominant[i, t]) if dominant is not None else -1])  # fmt: skip
    return {"columns": ["x", "y", "traj", "frame", "value", "action", "feature"], "points": points}


def _write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    manifest = {"schema": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                **manifest}  # fmt: skip
    put(out, "manifest", manifest)


# -- entry points ------------------------------------------------------------------------------------
def build_probe_bundle(probe_dir, out_dir, config: BundleConfig | None = None,
                       progress: Progress = _quiet, rebuild: str | None = None) -> dict[str, Any]:  # fmt: skip
    """One probed checkpoint -> a bundle with its trajectory pages and embedding. ``rebuild``:
    the command that builds it, shown on the page with the options that add what is left out."""
    config = config or BundleConfig()
    probe_dir, summary = load_summary(probe_dir)
    out = Path(out_dir)
    copy_static(out)
    t0 = time.perf_counter()
    rebuild = f"loupe view --probe {probe_dir}" if rebuild is None else rebuild
    meta = build_checkpoint_data(out, "c0", summary, probe_dir, config, progress, rebuild)
    _write_manifest(out, {"kind": "checkpoint", "title": _title(meta), "checkpoints": [
        _ckpt_entry(meta)], "build_s": time.perf_counter() - t0})  # fmt: skip
    return meta


def _title(meta: dict[str, Any]) -> str:
    return f"{meta.get('policy')} on {meta.get('env')}, step {meta.get('step')}"


def _ckpt_entry(meta: dict[str, Any]) -> dict[str, Any]:
    return {"key": meta["key"], "step": meta.get("step"), "sha256": meta.get("sha256")}


RUN_SCALARS = ("attention_entropy", "top10_attribution_share", "anomaly_count", "mean_return",
               "max_completeness_delta")  # fmt: skip


def run_probe_dirs(run_dir: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Finished probe outputs of a run, by step."""
    from loupe.config import load_json

    found = []
    for d in sorted((run_dir / "probes").glob("step-*")):
        if d.is_dir() and (d / "summary.json").is_file():
            try:
                found.append((d, load_json(d / "summary.json")))
            except LoupeError:
                continue  # being written or broken: skip until the next refresh
    found.sort(key=lambda item: item[1].get("step") or 0)
    return found


def run_data(run_dir: Path, built: dict[str, str]) -> dict[str, Any]:
    """The run page's data: probe scalars per checkpoint and which trajectory pages exist."""
    from loupe.config import load_json

    config_path = run_dir / "config.json"
    run_cfg = load_json(config_path) if config_path.is_file() else {}
    points = []
    for d, s in run_probe_dirs(run_dir):
        row = {"step": s.get("step"), "dir": d.name, "sha256": s.get("sha256"),
               "key": built.get(d.name)}  # fmt: skip
        for name in RUN_SCALARS:
            row[name] = s.get(name)
        points.append(row)
    n_ckpt = len(list((run_dir / "checkpoints").glob("ckpt-*[0-9].json")))
    return {
        "run": str(run_dir),
        "run_id": run_cfg.get("run_id"),
        "env": (run_cfg.get("env") or {}).get("env_id"),
        "policy": run_cfg.get("policy"),
        "checkpoints": n_ckpt,
        "scalars": list(RUN_SCALARS),
        "points": points,
        "updated": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def build_run_bundle(run_dir, out_dir, config: BundleConfig | None = None,
                     progress: Progress = _quiet, trajectories: str = "latest",
                     built: dict[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
    """A run's probes -> run page (+ trajectory pages: "latest", "all" or "none" checkpoints)."""
    from loupe.rundir import RunDir

    config = config or BundleConfig()
    run = RunDir(run_dir)
    run.require_run()
    out = Path(out_dir)
    copy_static(out)
    built = {} if built is None else built
    from loupe.retention import is_pruned

    dirs = run_probe_dirs(run.path)
    whole = [(d, s) for d, s in dirs if not is_pruned(d)]  # pruned ones: scalars only
    todo = {"all": whole, "latest": whole[-1:], "none": []}[trajectories]
    for d, summary in todo:
        if d.name in built:
            continue
        key = f"s{summary.get('step', 0)}"
        progress(f"checkpoint at step {summary.get('step')}")
        try:
            build_checkpoint_data(out, key, summary, d, config, progress,
                                  f"loupe view --run {run.path}")  # fmt: skip
            built[d.name] = key
        except LoupeError as exc:
            progress(f"no trajectory page for {d.name}: {exc}")
    data = run_data(run.path, built)
    put(out, "run", data)
    _write_manifest(out, {"kind": "run", "title": f"run {data.get('run_id') or run.path.name}",
                          "checkpoints": [{"key": k, "dir": d} for d, k in built.items()]})  # fmt: skip
    return data


def eval_data(
    eval_dir: Path, replays: dict[tuple[str, int], str | None] | None = None
) -> dict[str, Any]:
    """The evaluation page's data, also for an evaluation still being written. ``replays``:
    (checkpoint label, level) -> the key of its replayed trajectory page (None: it failed)."""
    from loupe.config import load_json
    from loupe.distributed.evaluate import read_records, summarise

    marker = eval_dir / "eval.json"
    if not marker.is_file():
        raise LoupeError(
            f"{eval_dir} holds no eval.json; give a `loupe evaluate --out DIR` directory"
        )
    ident = load_json(marker)
    results = eval_dir / "results.json"
    final = load_json(results) if results.is_file() else None
    replays = replays or {}
    rows = []
    for ck in ident.get("checkpoints", []):
        label = ck["label"]
        recs = read_records(eval_dir / f"{label}.jsonl")
        row: dict[str, Any] = {"label": label, "sha256": ck.get("sha256"), "done": len(recs),
                               "levels": ident.get("levels"),
                               "name": (ident.get("labels") or {}).get(label)}  # fmt: skip
        if recs:
            row.update(summarise(recs.values()))
            row["levels"] = ident.get("levels")
            row["done"] = len(recs)
            failed: dict[str, list[int]] = {}
            without = 0
            for r in sorted(recs.values(), key=lambda r: r.level):
                if r.outcome != "complete":
                    cat = r.cause if r.outcome == "failure" and r.cause else r.outcome
                    failed.setdefault(cat, []).append(r.level)
                    without += not r.actions
            row["failed_levels"] = failed
            #: failed levels whose actions were not recorded (they cannot be replayed)
            row["without_actions"] = without
            row["replays"] = {str(level): key for (lab, level), key in replays.items()
                              if lab == label and key}  # fmt: skip
        rows.append(row)
    return {
        "dir": str(eval_dir),
        "levels": ident.get("levels"),
        "start_level": ident.get("start_level"),
        "complete": final is not None
        and all(r["done"] >= (ident.get("levels") or 0) for r in rows),
        "checkpoints": rows,
        "updated": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def replay_key(label: str, level: int) -> str:
    return f"r-{label}-{int(level)}"


def replay_target(eval_dir: Path, label: str):
    """The evaluated checkpoint ``label`` as ``loupe evaluate`` played it -> its
    distributed.evaluate.Target (policy spec and weights, EvaluatorConfig with the recorded
    options); LoupeError when the checkpoint is gone or changed."""
    from loupe.config import load_json
    from loupe.distributed.evaluate import EvalConfig, load_target

    ident = load_json(eval_dir / "eval.json")
    entries = ident.get("checkpoints", [])
    index = next((i for i, c in enumerate(entries) if c["label"] == label), None)
    if index is None:
        raise LoupeError(f"{eval_dir} evaluated no checkpoint {label!r}")
    entry = entries[index]
    path = entry.get("path")
    if not path and (eval_dir / "results.json").is_file():
        path = (load_json(eval_dir / "results.json").get("checkpoints", {}).get(label) or {}).get(
            "path"
        )
    if not path:
        raise LoupeError(
            f"{eval_dir}/eval.json does not say where checkpoint {label} is (an evaluation from "
            "before loupe recorded it); evaluate again into a new --out to replay its levels"
        )
    if not Path(path).exists():
        raise LoupeError(f"checkpoint {path} of {label} is not there any more; it is needed to "
                         "replay its levels")  # fmt: skip
    cfg = EvalConfig(checkpoints=[path], out=str(eval_dir), workers=0,
                     causes=bool(ident.get("causes", True)), seed=int(ident.get("seed", 0)),
                     invisible=list(ident.get("invisible", [])))  # fmt: skip
    target = load_target(path, cfg)
    if entry.get("sha256") and target.sha256 != entry["sha256"]:
        raise LoupeError(
            f"{path} is not the checkpoint {label} that was evaluated (sha256 differs)"
        )
    options = ident.get("env_options") or []
    if index < len(options) and options[index] is not None:
        target.evaluator.env_options = dict(options[index])
    return target


def build_replay(out: Path, eval_dir: Path, label: str, level: int,
                 config: BundleConfig | None = None, progress: Progress = _quiet) -> dict[str, Any]:  # fmt: skip
    """Replay failed ``level`` of checkpoint ``label`` from its level seed and recorded actions,
    check it ends as recorded, and attribute it -> the meta record of its trajectory page (key
    ``replay_key(label, level)``). NMF directions come from a probe of the checkpoint in its run
    (``RUN/probes/step-...``) when there is one, else they are fitted on the episode."""
    import torch

    from actors.evaluator import replay_level
    from learner.checkpoint import load_checkpoint
    from learner.rollout import Rollout
    from loupe.config import load_json
    from loupe.distributed.evaluate import category, read_records
    from probes.suite import DEFAULT_LAYERS

    eval_dir, out = Path(eval_dir), Path(out)
    config = dataclasses.replace(config or BundleConfig(), embedding=False, num_envs=None,
                                 num_steps=None)  # fmt: skip
    rec = read_records(eval_dir / f"{label}.jsonl").get(int(level))
    if rec is None:
        raise LoupeError(f"level {level} of {label} has no result in {eval_dir} (yet)")
    if rec.outcome == "complete":
        raise LoupeError(f"level {level} of {label} was completed; failed levels are replayed")
    if not rec.actions:
        raise LoupeError(
            f"level {level} of {label} was evaluated without recording its actions (an "
            "evaluation from before loupe recorded them); evaluate again into a new --out"
        )
    target = replay_target(eval_dir, label)
    progress(f"replaying level {level} of {label} ({rec.length} recorded actions)")
    t0 = time.perf_counter()
    rp = replay_level(target.evaluator, int(level), rec.actions)
    replay_s = time.perf_counter() - t0
    policy, meta = load_checkpoint(target.path)
    policy.eval()
    ident = load_json(eval_dir / "eval.json")
    got = rp.result

    def outcome(r) -> dict[str, Any]:
        cat = category(r) if r.outcome else "unfinished"
        return {"outcome": r.outcome, "cause": r.cause, "category": cat, "length": r.length,
                "ret": r.ret}  # fmt: skip

    info = {
        "label": label,
        "name": (ident.get("labels") or {}).get(label) or label,
        "level": int(level),
        "eval_dir": str(eval_dir),
        "options": target.evaluator.env_options,
        "action_set": target.evaluator.action_set,
        "invisible": target.evaluator.invisible,
        "recorded": outcome(rec),
        "replayed": outcome(got),
        "match": (got.outcome, got.cause, got.length) == (rec.outcome, rec.cause, rec.length)
        and abs(got.ret - rec.ret) < 1e-6,
    }
    t_len = len(rp.actions)
    if t_len == 0:
        raise LoupeError(f"level {level} of {label} has an empty action record")
    dones = np.zeros((t_len, 1), bool)
    dones[-1, 0] = got.outcome is not None
    rollout = Rollout(obs=rp.obs[:, None], actions=rp.actions[:, None],
                      logprobs=np.zeros((t_len, 1), np.float32),
                      values=np.zeros((t_len, 1), np.float32), rewards=rp.rewards[:, None],
                      dones=dones, last_obs=rp.obs[-1:], last_value=np.zeros(1, np.float32),
                      level_seeds=np.full((t_len, 1), int(level), np.int64))  # fmt: skip
    if got.outcome is None:  # the actions ran out first: bootstrap from the last frame's value
        with torch.no_grad():
            rollout.last_value = policy(torch.from_numpy(rp.obs[-1:])).value.numpy()
    probe_dir = existing_probe(Path(target.path))
    summary = load_json(probe_dir / "summary.json") if probe_dir else {}
    layer = (
        summary.get("layer") or DEFAULT_LAYERS.get(policy.spec["name"]) or policy.layer_names[-1]
    )
    settings = probe_settings(summary)
    key = replay_key(label, level)
    with torch_threads(config.torch_threads):
        built = build_trajectories(out, key, policy, meta, target.path, rollout, layer,
                                   summary.get("nmf") or {}, probe_dir, config, settings,
                                   progress, rebuild=f"loupe view --eval {eval_dir} --replay {level}",
                                   extra={"replay": info,
                                          "probe": str(probe_dir) if probe_dir else None},
                                   values_recorded=False)  # fmt: skip
    built["timings"]["replay_s"] = replay_s
    put(out, f"{key}/meta", built)
    return built


def existing_probe(ckpt: Path) -> Path | None:
    """A finished probe of this checkpoint in its run (``<run>/probes/step-...``), if any."""
    from learner.checkpoint import read_meta, resolve

    try:
        path = resolve(Path(ckpt))
        meta = read_meta(path)
    except LoupeError:
        return None
    run = path.resolve().parent.parent
    d = run / "probes" / f"step-{meta['step']:012d}-{str(meta.get('sha256', ''))[:8]}"
    from loupe.retention import is_pruned

    # a pruned one keeps its summary only (loupe.retention): probed again, not shown half
    return d if (d / "summary.json").is_file() and not is_pruned(d) else None


def replay_choices(data: dict[str, Any], per_cause: int, levels=()) -> list[tuple[str, int]]:
    """(label, level) pairs to replay: the first ``per_cause`` failed levels of every cause and
    checkpoint, and every level of ``levels`` that a checkpoint failed."""
    chosen: list[tuple[str, int]] = []
    wanted = {int(v) for v in levels}
    for row in data["checkpoints"]:
        for failed in (row.get("failed_levels") or {}).values():
            chosen += [(row["label"], lv) for lv in failed[:per_cause]]
            chosen += [(row["label"], lv) for lv in failed if lv in wanted]
    return list(dict.fromkeys(chosen))


def build_eval_bundle(eval_dir, out_dir, config: BundleConfig | None = None, replays: int = 0,
                      levels=(), built: dict[tuple[str, int], str | None] | None = None,
                      progress: Progress = _quiet, live: bool = False) -> dict[str, Any]:  # fmt: skip
    """A `loupe evaluate` directory -> the evaluation page, with replayed trajectory pages of the
    first ``replays`` failed levels per cause and checkpoint and of ``levels``. ``built`` keeps
    the replays made so far ((label, level) -> key, None where the replay was refused) across
    refreshes; ``live``: the serving process replays other levels on request (``api/replay``)."""
    eval_dir, out = Path(eval_dir), Path(out_dir)
    built = {} if built is None else built
    data = eval_data(eval_dir)
    copy_static(out)
    chosen = replay_choices(data, replays, levels)
    for level in sorted({int(v) for v in levels} - {lv for _, lv in chosen}):
        if (None, level) not in built:
            progress(f"level {level}: no checkpoint of this evaluation failed it (yet); nothing "
                     "to replay")  # fmt: skip
            built[None, level] = None  # said once
    for label, level in chosen:
        if (label, level) in built:
            continue
        try:
            built[label, level] = build_replay(out, eval_dir, label, level, config, progress)["key"]
        except LoupeError as exc:
            progress(f"no replay of level {level} of {label}: {exc}")
            built[label, level] = None
    data = eval_data(eval_dir, built)
    data["replay_api"] = live
    put(out, "eval", data)
    write_eval_manifest(out, eval_dir, built, live)
    return data


def write_eval_manifest(out: Path, eval_dir: Path, built, live: bool) -> None:
    entries = [{"key": key, "label": label, "level": level, "kind": "replay", "embedding": False}
               for (label, level), key in sorted(built.items(), key=str) if key]  # fmt: skip
    _write_manifest(out, {"kind": "eval", "title": f"evaluation {Path(eval_dir).name}",
                          "checkpoints": entries, "replay_api": live})  # fmt: skip


def bundle_size(out_dir) -> int:
    return sum(p.stat().st_size for p in Path(out_dir).rglob("*") if p.is_file())
