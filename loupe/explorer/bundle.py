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
"""

from __future__ import annotations

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
    #: (value, the action groups and the logit of the most frequent action)
    targets: tuple[str, ...] = ("auto",)
    #: Riemann steps of integrated gradients
    ig_steps: int = 10
    #: observations per integrated-gradients chunk (memory)
    chunk: int = 64
    #: radius (layer cells) of the exp(-d) smoothing disk
    smooth_radius: int = 7
    #: SmoothGrad copies per frame (0: plain gradient saliency only)
    smoothgrad_copies: int = 8
    #: compute the t-SNE embedding of the analysis layer's activations
    embedding: bool = True

    def __post_init__(self):
        for name in ("num_envs", "num_steps"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise LoupeError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if self.ig_steps <= 0 or self.chunk <= 0 or self.smooth_radius < 0:
            raise LoupeError("ig_steps and chunk must be positive and smooth_radius >= 0")


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
    Image.fromarray(image).save(path, format="PNG", optimize=False, compress_level=9)


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


def resolve_targets(specs, n_actions: int, groups: dict[str, list[int]], actions: np.ndarray):
    """Target names -> (names, IG target specs)."""
    names: list[str] = []
    for spec in specs:
        if spec == "auto":
            common = int(np.bincount(actions.ravel(), minlength=n_actions).argmax())
            names += ["value", *[f"group:{g}" for g in groups], f"logit:{common}"]
        else:
            names.append(spec)
    out_names, ig_specs = [], []
    for name in dict.fromkeys(names):
        if name == "value":
            ig_specs.append("value")
        elif name.startswith("logit:"):
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


# -- NMF with fixed directions ---------------------------------------------------------------------
def nmf_from_directions(directions):
    """The probe's AttributionNMF rebuilt from its saved directions (sklearn transform with the
    components fixed; the fit itself is not repeated)."""
    from sklearn.decomposition import NMF

    from probes.nmf import AttributionNMF, NMFConfig

    d = np.asarray(directions, dtype=np.float64)
    k, c = d.shape
    model = NMF(n_components=k, init="nndsvda", max_iter=1000, random_state=0)
    model.components_ = d
    model.n_components_ = k
    model._n_components = k
    model.n_features_in_ = c
    return AttributionNMF(model, NMFConfig(n_components=k))


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
) -> dict[str, Any]:
    """Trajectories of one probed checkpoint into ``out/data/<key>/...`` -> its meta record."""
    import torch

    from learner.checkpoint import load_checkpoint
    from probes.attribution import IntegratedGradients
    from probes.gae_scan import gae_scan
    from probes.suite import ProbeConfig, record

    timings: dict[str, float] = {}
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
    layer = summary["layer"]
    settings = probe_settings(summary)
    num_envs = config.num_envs or settings["num_envs"]
    num_steps = config.num_steps or settings["num_steps"]
    probe_cfg = ProbeConfig(num_envs=num_envs, num_steps=num_steps, seed=settings["seed"])
    progress(f"recording {num_envs} trajectories x {num_steps} frames")
    rollout = record(policy, meta, probe_cfg)
    timings["record_s"] = time.perf_counter() - t0
    t_len, n_env = rollout.actions.shape
    frames = rollout.obs  # (T, N, C, H, W)
    obs_hw = list(frames.shape[-2:])
    names = action_names(policy.n_actions, meta.get("env_options"))
    groups = action_groups(names)
    target_names, ig_specs = resolve_targets(
        config.targets, policy.n_actions, groups, rollout.actions
    )
    marks, advantages = gae_scan(rollout.rewards, rollout.values, rollout.dones,
                                 rollout.last_value, settings["gamma"], settings["lam"],
                                 settings["bookmarks"])  # fmt: skip

    # per-frame policy outputs, env-major (trajectory i = environment i)
    flat = torch.from_numpy(np.ascontiguousarray(frames.transpose(1, 0, 2, 3, 4))).reshape(
        n_env * t_len, *frames.shape[2:]
    )
    t0 = time.perf_counter()
    with torch.no_grad():
        outs = [policy(chunk) for chunk in flat.split(256)]
    probs = torch.cat([torch.softmax(o.logits, -1) for o in outs]).numpy()
    values = torch.cat([o.value for o in outs]).numpy()
    attention = None
    if policy.has_attention and outs[0].attention is not None:
        attention = torch.cat([o.attention for o in outs])
        entropy = (
            torch.cat([o.attention_entropy for o in outs]).numpy()
            if outs[0].attention_entropy is not None
            else None
        )

    # attribution at every frame, reduced at once to NMF entries (features + residual)
    nmf_info = summary.get("nmf") or {}
    directions = nmf_info.get("directions")
    ig = IntegratedGradients(policy, layer, n_steps=config.ig_steps)
    nmf = nmf_from_directions(directions) if directions else None
    entries: list[np.ndarray] = []  # per chunk: (K, n, E, h, w)
    acts: list[np.ndarray] = []
    progress(f"attributing {len(flat)} frames to {len(target_names)} targets at layer {layer}")
    for start in range(0, len(flat), config.chunk):
        res = ig.attribute(flat[start : start + config.chunk], ig_specs)
        attr = res.attributions.numpy()  # (K, n, C, h, w)
        acts.append(res.activation.numpy().reshape(attr.shape[1], -1).astype(np.float32))
        if attr.ndim != 5:
            continue
        if nmf is not None:
            per = [nmf_entries(nmf, a) for a in attr]
        else:
            per = [a.sum(1, keepdims=True) for a in attr]  # one entry: the channel sum
        entries.append(np.stack(per).astype(np.float32))
    timings["ig_nmf_s"] = time.perf_counter() - t0
    activations = np.concatenate(acts)

    t0 = time.perf_counter()
    base = out / "data" / key
    layer_hw = None
    attr_index: dict[str, Any] = {}
    if entries:
        ent = np.concatenate(entries, 1)  # (K, N*T, E, h, w)
        k_t, m, n_entries, h, w = ent.shape
        layer_hw = [h, w]
        from probes.render import smooth

        hues = np.array([e["colour"] for e in _copy_features(None, base, nmf_info)])  # (E, 3)
        for ti, target in enumerate(target_names):
            attr_index[target] = {}
            for sign, sname in ((1, "pos"), (-1, "neg")):
                part = np.maximum(sign * ent[ti].astype(np.float64), 0.0)  # (M, E, h, w)
                scale = float(np.median(part.reshape(m, -1).max(1)))
                scale = scale if scale > 0 else 1.0
                sm = smooth(part / scale, config.smooth_radius) if config.smooth_radius else part
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
    # saliency at observation resolution, per frame normalised to its max
    saliency_index: dict[str, Any] = {}
    sal = _saliency_maps(policy, flat, config)
    if attention is not None:
        sal["attention"] = _attention_maps(attention, tuple(obs_hw))
    for name, maps in sal.items():
        maps = _half(maps).reshape(n_env, t_len, -1, maps.shape[-1] // 2)
        for i in range(n_env):
            # half resolution and 32 grey levels: gradient maps are noise-like and compress badly
            sheet, cols = sprite(grey(maps[i]) // 8 * 8)
            save_png(base / f"traj-{i}-sal-{name}.png", sheet)
            saliency_index[name] = {"cols": cols, "tile": list(maps.shape[-2:])}
    # frames
    for i in range(n_env):
        f = frames[:, i]  # (T, C, H, W)
        rgb = f.transpose(0, 2, 3, 1) if f.shape[1] == 3 else np.repeat(f[:, -1, :, :, None], 3, 3)
        sheet, frame_cols = sprite(np.ascontiguousarray(rgb))
        save_png(base / f"traj-{i}-frames.png", sheet)
    timings["images_s"] = time.perf_counter() - t0

    # per-trajectory scalars
    probs = probs.reshape(n_env, t_len, -1)
    values = values.reshape(n_env, t_len)
    dominant = None
    if entries and directions:
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
        }
        if attention is not None and entropy is not None:
            traj["attention_entropy"] = entropy.reshape(n_env, t_len)[i].tolist()
        put(out, f"{key}/traj-{i}", traj)

    features = _copy_features(probe_dir, base, nmf_info)
    record_meta = {
        "key": key,
        "step": summary.get("step"),
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
        "saliency": saliency_index,
        "has_attention": attention is not None,
        "bookmarks": [dataclasses.asdict(b) for b in marks],
        "summary": summary,
        "recording": {"num_envs": num_envs, "num_steps": num_steps, "seed": settings["seed"]},
        "timings": timings,
    }
    if config.embedding:
        t0 = time.perf_counter()
        progress("embedding the frames with t-SNE")
        put(out, f"{key}/embedding", _embedding(activations, values, rollout.actions, dominant,
                                                n_env, t_len))  # fmt: skip
        timings["tsne_s"] = time.perf_counter() - t0
        record_meta["embedding"] = True
    put(out, f"{key}/meta", record_meta)
    return record_meta


def _attr_cols(n_entries: int, w: int) -> int:
    return n_entries * max(1, SPRITE_SIDE // (n_entries * w))


def _safe(target: str) -> str:
    return target.replace(":", "-")


def _saliency_maps(policy, flat, config: BundleConfig) -> dict[str, np.ndarray]:
    """Gradient saliency and SmoothGrad of the value for every frame -> {name: (M, H, W)}."""
    import torch

    from probes.saliency import NoiseConfig, gradient_saliency, noisy_gradients

    channels = 3 if policy.obs_shape[0] == 3 else 1
    grads, sgs = [], []
    for chunk in flat.split(128):
        grads.append(gradient_saliency(policy, chunk, "value")[:, -channels:].sum(1))
        if config.smoothgrad_copies > 0:
            cfg = NoiseConfig(n=config.smoothgrad_copies)
            g = noisy_gradients(policy, chunk, "value", cfg)  # (n, copies, C, H, W)
            sgs.append(g.mean(1)[:, -channels:].sum(1))
    out = {"gradient": torch.cat(grads).numpy()}
    if sgs:
        out["smoothgrad"] = torch.cat(sgs).numpy()
    for name, maps in out.items():
        # square root for a visible spread, each frame divided by its 99.5th percentile
        maps = np.sqrt(np.maximum(maps, 0))
        top = np.percentile(maps.reshape(len(maps), -1), 99.5, axis=1)[:, None, None]
        out[name] = np.divide(maps, top, out=np.zeros_like(maps), where=top > 0)
    return out


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


def _embedding(acts, values, actions, dominant, n_env: int, t_len: int) -> dict[str, Any]:
    """t-SNE of the analysis-layer activations (after PCA to at most 50 dimensions)."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = acts.astype(np.float64)
    m = len(x)
    if m < 5:
        return {"points": [], "error": "too few frames for an embedding"}
    dims = min(50, m - 1, x.shape[1])
    x = PCA(n_components=dims, random_state=0).fit_transform(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        xy = TSNE(n_components=2, perplexity=min(30.0, (m - 1) / 3.0), init="pca",
                  random_state=0).fit_transform(x)  # fmt: skip
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
                       progress: Progress = _quiet) -> dict[str, Any]:  # fmt: skip
    """One probed checkpoint -> a bundle with its trajectory pages and embedding."""
    config = config or BundleConfig()
    probe_dir, summary = load_summary(probe_dir)
    out = Path(out_dir)
    copy_static(out)
    t0 = time.perf_counter()
    meta = build_checkpoint_data(out, "c0", summary, probe_dir, config, progress)
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
            build_checkpoint_data(out, key, summary, d, config, progress)
            built[d.name] = key
        except LoupeError as exc:
            progress(f"no trajectory page for {d.name}: {exc}")
    data = run_data(run.path, built)
    put(out, "run", data)
    _write_manifest(out, {"kind": "run", "title": f"run {data.get('run_id') or run.path.name}",
                          "checkpoints": [{"key": k, "dir": d} for d, k in built.items()]})  # fmt: skip
    return data


def eval_data(eval_dir: Path) -> dict[str, Any]:
    """The evaluation page's data, also for an evaluation still being written."""
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
    rows = []
    for ck in ident.get("checkpoints", []):
        label = ck["label"]
        recs = read_records(eval_dir / f"{label}.jsonl")
        row: dict[str, Any] = {"label": label, "sha256": ck.get("sha256"), "done": len(recs),
                               "levels": ident.get("levels")}  # fmt: skip
        if recs:
            row.update(summarise(recs.values()))
            row["levels"] = ident.get("levels")
            row["done"] = len(recs)
            failed: dict[str, list[int]] = {}
            for r in sorted(recs.values(), key=lambda r: r.level):
                if r.outcome != "complete":
                    cat = r.cause if r.outcome == "failure" and r.cause else r.outcome
                    failed.setdefault(cat, []).append(r.level)
            row["failed_levels"] = failed
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


def build_eval_bundle(eval_dir, out_dir) -> dict[str, Any]:
    out = Path(out_dir)
    data = eval_data(Path(eval_dir))
    copy_static(out)
    put(out, "eval", data)
    _write_manifest(out, {"kind": "eval", "title": f"evaluation {Path(eval_dir).name}",
                          "checkpoints": []})  # fmt: skip
    return data


def bundle_size(out_dir) -> int:
    return sum(p.stat().st_size for p in Path(out_dir).rglob("*") if p.is_file())
