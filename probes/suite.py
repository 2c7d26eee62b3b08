"""The probe suite: every analysis of one checkpoint, written as images plus ``summary.json``.

    summary = run_suite("runs/x/checkpoints/ckpt-000000065536.json", "runs/x/probes/step-65536")

Steps: record trajectories with the checkpoint's policy in its own environment; integrated gradients
at the analysis layer for the value and every logit (completeness delta, attribution sparsity);
attention entropy and overlays where the policy has attention; NMF features of the value
attributions; a GAE anomaly scan with bookmarks; gradient and perturbation saliency of a few frames.
The output directory appears only when complete: work happens in a sibling ``.partial`` directory
that is renamed at the end, so an interrupted probe never leaves a result that looks finished.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loupe.errors import LoupeError

#: the layer each policy is analysed at unless told otherwise
DEFAULT_LAYERS = {
    "nature": "c2", "impala": "s2", "interpretable": "2b", "region": "c3n", "sun-na": "c1",
    "sun-swa": "block", "sun-cwra": "block", "sun-cwca": "block", "sun-cwrca": "block",
}  # fmt: skip


#: ProbeConfig.frames: how the attributed frames are chosen
FRAME_CHOICES = ("even", "hazards")
#: the object classes "hazards" makes sure of, each in up to 1/HAZARD_QUOTA of the frames
HAZARDS = ("saw", "enemy_left", "enemy_right", "lava")
HAZARD_QUOTA = 8


@dataclasses.dataclass
class ProbeConfig:
    """What one probe run computes, and how much of it."""

    #: analysis layer (None: the policy's default, e.g. 2b for the interpretable network)
    layer: str | None = None
    #: environments recorded in parallel
    num_envs: int = 8
    #: steps recorded per environment
    num_steps: int = 128
    #: observations attributed with integrated gradients (chosen as ``frames`` says)
    ig_samples: int = 64
    #: how the attributed frames are chosen: "even" (evenly spread over the recording) or, for
    #: CoinRun, "hazards": up to 1/8 of them showing each hazard class (saw, enemy_left,
    #: enemy_right, lava; from the game state), so that rare objects are there to be labelled,
    #: the rest evenly spread
    frames: str = "even"
    #: Riemann steps of integrated gradients
    ig_steps: int = 10
    #: NMF features (capped at the layer's channel count)
    nmf_components: int = 8
    #: GAE scan bookmarks at each end
    bookmarks: int = 16
    #: GAE scan discount and lambda
    gamma: float = 0.999
    lam: float = 0.95
    #: frames given saliency maps
    saliency_frames: int = 2
    #: SmoothGrad copies
    smoothgrad_copies: int = 50
    #: seed of recording and sampling
    seed: int = 0

    def __post_init__(self):
        for name in ("num_envs", "num_steps", "ig_samples", "ig_steps", "nmf_components",
                     "bookmarks", "smoothgrad_copies"):  # fmt: skip
            if getattr(self, name) <= 0:
                raise LoupeError(f"probe setting {name} must be positive")
        if self.frames not in FRAME_CHOICES:
            raise LoupeError(
                f"probe frames must be one of {', '.join(FRAME_CHOICES)}, not {self.frames!r}"
            )


def env_config_for(meta: dict[str, Any], num_envs: int, seed: int):
    from actors import EnvConfig

    options = dict(meta.get("env_options") or {})
    options.pop("env_id", None)
    options.update(num_envs=num_envs, seed=seed)
    env_id = meta.get("env")
    if not env_id:
        raise LoupeError("the checkpoint does not say which environment it was trained on")
    return EnvConfig(env_id=env_id, **options)


def record(policy, meta: dict[str, Any], config: ProbeConfig):
    """Trajectories of ``policy`` in the checkpoint's environment -> learner.Rollout."""
    return record_with_states(policy, meta, config, ())[0]


def record_with_states(policy, meta: dict[str, Any], config: ProbeConfig, steps):
    """``record``, keeping the game states at ``steps`` -> (learner.Rollout, states): ``states[t]``
    holds one procgen state per env, matching ``rollout.obs[t]``."""
    from actors.rollout import RolloutActor, RolloutConfig

    spec = policy.spec
    actor = RolloutActor(
        RolloutConfig(
            env=env_config_for(meta, config.num_envs, config.seed),
            policy=spec["name"],
            policy_options=spec.get("options", {}),
            seed=config.seed,
        )
    )
    try:
        if tuple(actor.obs_shape) != tuple(policy.obs_shape):
            raise LoupeError(
                f"the checkpoint's policy takes {tuple(policy.obs_shape)} but its environment "
                f"gives {actor.obs_shape}"
            )
        actor.set_weights(0, {k: v.detach().cpu().numpy() for k, v in policy.state_dict().items()})
        rollout = actor.rollout(config.num_steps, steps)
        return rollout, actor.states
    finally:
        actor.close()


def top_share(attr: torch.Tensor, top: int = 10) -> float:
    """Mean over observations of the share of |attribution| in the top ``top`` position-channel
    pairs: 1 means all attribution sits on a few units, small values mean it is spread out."""
    flat = attr.abs().flatten(1)  # (N, C*H*W)
    total = flat.sum(1).clamp(min=1e-12)
    return float((flat.topk(min(top, flat.shape[1]), dim=1).values.sum(1) / total).mean())


def run_suite(checkpoint: str | Path, out_dir: str | Path, config: ProbeConfig | None = None,
              policy=None, meta: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """Analyse one checkpoint into ``out_dir`` -> the summary (also written as summary.json)."""
    from learner.checkpoint import load_checkpoint

    config = config or ProbeConfig()
    out = Path(out_dir)
    if out.exists():
        raise LoupeError(f"{out} already exists; remove it or choose another --out")
    if policy is None or meta is None:
        policy, meta = load_checkpoint(checkpoint)  # verifies size and sha256
    policy.eval()
    if config.frames == "hazards" and meta.get("env") != "procgen:coinrun":
        raise LoupeError(
            "frames 'hazards' are chosen from CoinRun's game state, and this checkpoint was "
            f"trained on {meta.get('env') or 'an unknown env'}; use frames 'even'"
        )
    layer = config.layer or DEFAULT_LAYERS.get(policy.spec["name"], policy.layer_names[0])
    if layer not in policy.layer_names:
        raise LoupeError(
            f"{policy.spec['name']} has no layer {layer!r}; valid layers: "
            f"{', '.join(policy.layer_names)}"
        )
    _remove_stale_partials(out)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    partial.mkdir(parents=True)
    try:
        summary = _analyse(policy, meta, layer, config, partial)
        summary.update(checkpoint=str(checkpoint), sha256=meta["sha256"], step=meta["step"],
                       index=meta.get("index"), config=dataclasses.asdict(config))  # fmt: skip
        from probes.render import write_json

        write_json(partial / "summary.json", summary)
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return summary


def _remove_stale_partials(out: Path) -> None:
    """Delete unfinished work of probe processes that no longer run (killed mid-checkpoint).

    The directory is listed and matched by prefix: a glob pattern holding the step would add
    one compiled pattern per checkpoint to pathlib's and re's caches in a long-lived worker.
    """
    if not out.parent.is_dir():
        return
    prefix = f".{out.name}.partial-"
    for stale in [p for p in out.parent.iterdir() if p.name.startswith(prefix)]:
        try:
            pid = int(stale.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
            if pid != os.getpid():
                continue  # another live process is working on it
        except (ValueError, ProcessLookupError):
            pass
        except PermissionError:
            continue
        shutil.rmtree(stale, ignore_errors=True)


def _analyse(policy, meta, layer: str, config: ProbeConfig, out: Path) -> dict[str, Any]:
    from probes.attribution import IntegratedGradients
    from probes.gae_scan import gae_scan
    from probes.render import obs_to_rgb, overview_figure, save_figure

    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    n_frames = config.num_steps * config.num_envs
    idx = np.linspace(0, n_frames - 1, min(config.ig_samples, n_frames)).astype(int)
    coinrun = meta.get("env") == "procgen:coinrun"
    hazards = config.frames == "hazards"
    # CoinRun: keep the game states of the attributed frames (with "hazards": of every frame,
    # to choose them), to label features by object
    if hazards:
        steps = list(range(config.num_steps))
    else:
        steps = sorted({int(i) // config.num_envs for i in idx}) if coinrun else []
    rollout, states_at = record_with_states(policy, meta, config, steps)
    timings["record_s"] = time.perf_counter() - t0
    selection = None
    if hazards:
        t0 = time.perf_counter()
        idx, selection = _hazard_frames(states_at, config)
        timings["frames_s"] = time.perf_counter() - t0
    frames = rollout.obs.reshape(-1, *rollout.obs.shape[2:])  # (T*N, C, H, W), time-major
    obs = torch.from_numpy(frames[idx])

    t0 = time.perf_counter()
    ig = IntegratedGradients(policy, layer, n_steps=config.ig_steps).attribute(obs, "all")
    value_attr = ig["value"]
    timings["ig_s"] = time.perf_counter() - t0
    summary: dict[str, Any] = {
        "policy": policy.spec,
        "env": meta.get("env"),
        "layer": layer,
        "layer_shape": list(ig.activation.shape[1:]),
        "ig_targets": ig.targets,
        "ig_observations": len(idx),
        "frames": selection or {"selection": "even"},
        "max_completeness_delta": float(ig.delta.abs().max()),
        "top10_attribution_share": top_share(value_attr),
        "episodes_recorded": len(rollout.episodes),
        "mean_return": float(np.mean([e.ret for e in rollout.episodes]))
        if rollout.episodes
        else None,
    }

    # what the overview figure shows, filled in by the steps below
    views: dict[str, Any] = {"frame": obs_to_rgb(obs[0].numpy())}
    render_s = 0.0

    # attention
    if policy.has_attention:
        t0 = time.perf_counter()
        summary.update(_attention(policy, obs, out / "attention", views))
        render_s += time.perf_counter() - t0

    # NMF features of the value attributions (spatial layers only)
    if value_attr.dim() == 4:
        t0 = time.perf_counter()
        summary["nmf"], nmf, features = _nmf(value_attr.numpy(), obs.numpy(), config, out, views)
        timings["nmf_s"] = time.perf_counter() - t0
        if coinrun and nmf is not None:
            t0 = time.perf_counter()
            n = config.num_envs
            states = [states_at[int(i) // n][int(i) % n] for i in idx]
            labels = _labels(nmf, features, ig.activation.numpy(), states)
            summary["nmf"].update(labels)
            timings["labels_s"] = time.perf_counter() - t0

    # GAE anomaly scan over the whole recording
    marks, _ = gae_scan(rollout.rewards, rollout.values, rollout.dones, rollout.last_value,
                        config.gamma, config.lam, config.bookmarks)  # fmt: skip
    summary["bookmarks"] = [dataclasses.asdict(m) for m in marks]
    summary["anomaly_count"] = len(marks)
    t0 = time.perf_counter()
    views.update(_bookmark_figures(marks, rollout, meta, out / "bookmarks"))
    render_s += time.perf_counter() - t0

    t0 = time.perf_counter()
    summary["saliency"] = _saliency(policy, obs[: config.saliency_frames], config, out / "saliency",
                                    views)  # fmt: skip
    timings["saliency_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    views["title"] = (
        f"{policy.spec['name']} on {meta.get('env')}, checkpoint step {meta.get('step')}, "
        f"analysis layer {layer}"
        + ("" if summary["mean_return"] is None else f", mean return {summary['mean_return']:.2f}")
    )
    fig = overview_figure(views)
    save_figure(out / "overview.png", fig)
    summary["overview_panels"] = [ax.get_title() for ax in fig.axes if ax.get_title()]
    timings["overview_s"] = time.perf_counter() - t0
    timings["render_s"] = render_s + timings["overview_s"]
    summary["overview"] = "overview.png"
    summary["timings"] = timings
    return summary


def action_name(meta: dict[str, Any], n_actions: int, action: int) -> str:
    """A readable name of ``action`` in the checkpoint's environment: procgen's button combo
    (e.g. "RIGHT+UP", "none"), otherwise the action index."""
    if str(meta.get("env", "")).startswith("procgen:"):
        from actors.procgen_env import ARTICLE_COMBOS, COMBOS

        combos = {len(COMBOS): COMBOS, len(ARTICLE_COMBOS): ARTICLE_COMBOS}.get(n_actions)
        if combos is not None and 0 <= action < len(combos):
            return "+".join(combos[action]) or "none"
    return str(action)


def _bookmark_figures(marks, rollout, meta, out: Path) -> dict[str, Any]:
    """Annotated PNGs of the first 4 high and 4 low bookmarks -> the overview's bookmark views."""
    from probes.render import image_figure, obs_to_rgb, save_figure

    out.mkdir()
    n_actions = int(meta.get("policy", {}).get("n_actions", 0) or 0)
    chosen = [m for m in marks if m.kind == "high"][:4] + [m for m in marks if m.kind == "low"][:4]
    shown = []
    for i, m in enumerate(chosen):
        action = action_name(meta, n_actions, int(rollout.actions[m.t, m.env]))
        frame = obs_to_rgb(rollout.obs[m.t, m.env])
        step = meta.get("step")
        title = f"{m.kind}-advantage bookmark\ncheckpoint step {step}, env {m.env}, t {m.t}"
        caption = (f"advantage {m.advantage:+.3f}, value {m.value:.3f}\n"
                   f"reward {m.reward:g}, action {action}")  # fmt: skip
        save_figure(out / f"{m.kind}-{i:02d}-env{m.env}-t{m.t}.png",
                    image_figure(frame, title, caption))  # fmt: skip
        label = f"env {m.env}, t {m.t}: A {m.advantage:+.3f}, V {m.value:.3f}\naction {action}"
        shown.append((frame, label, m.kind))
    order = [b for b in shown if b[2] == "high"][:2] + [b for b in shown if b[2] == "low"][:2]
    first = [m for m in chosen if m.kind == "high"][:2] + [m for m in chosen if m.kind == "low"][:2]
    return {
        "bookmarks": order,
        "values": rollout.values,
        "dones": rollout.dones,
        "marks": [(m.env, m.t, m.value, m.kind) for m in marks],
        "curve_envs": [m.env for m in first],
    }


def _attention(policy, obs: torch.Tensor, out: Path, views: dict[str, Any]) -> dict[str, Any]:
    from probes.attention_maps import attention_overlay, upsample_map
    from probes.render import heatmap_figure, obs_to_rgb, save_figure

    with torch.no_grad():
        res = policy(obs)
    out.mkdir()
    h, w = policy.obs_shape[1:]
    maps = res.attention
    if res.attention_logits is not None and maps.shape[-1] * 12 == w:
        overlay = attention_overlay(maps)  # region maps: receptive-field overlay (METHODS A)
        how = "receptive fields of the summed maps"
    else:
        overlay = upsample_map(maps.sum(1, keepdim=True), (h, w))
        how = "summed maps, bilinear"
    entropy = res.attention_entropy
    # the entropy of uniform attention: region maps (M maps over h w positions); Sun et al.'s rows
    # attend over the H rows (swa, cwra), columns over the W columns (cwca), cwrca averages both
    mh, mw = maps.shape[-2:]
    uniform = {"region": maps.shape[1] * np.log(mh * mw), "sun-swa": np.log(mh),
               "sun-cwra": np.log(mh), "sun-cwca": np.log(mw),
               "sun-cwrca": (np.log(mh) + np.log(mw)) / 2}.get(policy.spec["name"])  # fmt: skip
    for i in range(min(4, len(obs))):
        rgb = obs_to_rgb(obs[i].numpy())
        title = f"attention, frame {i}" + (
            "" if entropy is None else f": entropy {float(entropy[i]):.2f} nats"
        )
        fig = heatmap_figure(
            rgb, overlay[i], title, f"attention ({how}), normalised", vmin=0, vmax=1
        )
        save_figure(out / f"overlay-{i:02d}.png", fig)
    views["attention"] = {
        "heat": overlay[0],
        "entropy": None if entropy is None else float(entropy[0]),
        "max_entropy": None if uniform is None else float(uniform),
    }
    return {
        "attention_entropy": float(res.attention_entropy.mean())
        if res.attention_entropy is not None
        else None,
        "attention_maps_shape": list(maps.shape[1:]),
    }


def _nmf(attr, obs, config: ProbeConfig, out: Path, views: dict[str, Any]):
    """NMF features of the value attributions -> (summary entry, the fitted NMF, its (N, K, h, w)
    feature maps), or (an error entry, None, None)."""
    from probes.nmf import (
        FeatureVisConfig,
        fit_attribution_nmf,
        overlay_colours,
        part_scale,
        write_feature_visualisations,
    )
    from probes.render import feature_hues

    k = min(config.nmf_components, attr.shape[1])
    if not np.any(attr):
        return {"error": "value attributions are all zero"}, None, None
    nmf = fit_attribution_nmf(attr, n_components=k, seed=config.seed)
    features = nmf.transform(attr)  # (N, K, h, w), once: an iterative solve
    vis = FeatureVisConfig()
    write_feature_visualisations(out / "nmf", nmf, attr, obs, frames=list(range(min(4, len(obs)))),
                                 config=vis, features=features)  # fmt: skip
    views["nmf"] = {"hues": feature_hues(k)}
    for sign, name in ((1, "positive"), (-1, "negative")):
        scale = part_scale(features, sign)  # the divisor of the overlay PNGs
        colour, alpha, _ = overlay_colours(features[:1], tuple(obs.shape[-2:]), sign,
                                           vis.smooth_radius, scale=scale)  # fmt: skip
        views["nmf"][name] = (colour[0], alpha[0])
    return (
        {
            "components": k,
            "directions": nmf.directions.tolist(),
            "mean_abs_residual": float(np.abs(nmf.residual(attr)).mean()),
            "dir": "nmf",
        },
        nmf,
        features,
    )


def _hazard_frames(states_at: dict[int, list[bytes]], config: ProbeConfig):
    """The attributed frames for ProbeConfig.frames "hazards" -> (time-major frame indices, what
    the choice found: frames of the recording and of the choice showing each hazard)."""
    from actors.coinrun_masks import CLASS_INDEX, class_masks
    from actors.coinrun_state import CoinRunState
    from probes.labels import choose_frames

    cols = [CLASS_INDEX[c] for c in HAZARDS]
    presence = np.array([class_masks(CoinRunState.parse(s))[cols].any(axis=(1, 2))
                         for t in range(config.num_steps) for s in states_at[t]])  # fmt: skip
    idx = choose_frames(presence, config.ig_samples, config.ig_samples // HAZARD_QUOTA)
    return idx, {
        "selection": "hazards",
        "recorded": len(presence),
        "recorded_showing": dict(zip(HAZARDS, presence.sum(0).tolist())),
        "attributed_showing": dict(zip(HAZARDS, presence[idx].sum(0).tolist())),
    }


def _labels(nmf, features, activation, states: list[bytes]) -> dict[str, Any]:
    """Label each NMF feature (signed (N, K, h, w) maps) by the CoinRun objects its attribution
    falls on (probes.labels)."""
    from actors.coinrun_masks import CLASSES, class_masks, pool_masks
    from actors.coinrun_state import CoinRunState
    from probes.labels import label_features

    masks = np.stack([class_masks(CoinRunState.parse(s)) for s in states])  # (N, C, 64, 64)
    masks = pool_masks(masks, features.shape[2:])  # (N, C, h, w)
    directions = nmf.directions / np.linalg.norm(nmf.directions, axis=1, keepdims=True)
    act = np.einsum("nchw,kc->nkhw", np.maximum(activation, 0), directions)  # (N, K, h, w)
    labels = label_features(features, masks, CLASSES, activation=np.maximum(act, 0))
    return {"classes": list(CLASSES), "labels": [f.to_dict() for f in labels]}


def _saliency(policy, obs: torch.Tensor, config: ProbeConfig, out: Path,
              views: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    from probes.render import heatmap_figure, obs_to_rgb, robust_max, save_figure
    from probes.saliency import perturbation_saliency, smoothgrad

    out.mkdir()
    channels = 3 if policy.obs_shape[0] == 3 else 1  # RGB frame, or the newest of a stack
    target = "attention" if policy.spec["name"] == "region" else "value"
    sg = smoothgrad(policy, obs, target, n=config.smoothgrad_copies, seed=config.seed)
    sg = sg[:, -channels:].sum(1).numpy()  # newest frame
    pert = perturbation_saliency(policy, obs, "value", frame_channels=channels).numpy()
    labels = {"smoothgrad": f"SmoothGrad of the {target}", "perturbation": "0.5 (V(I) - V(I'))^2"}
    for i in range(len(obs)):
        rgb = obs_to_rgb(obs[i].numpy())
        for name, m in (("smoothgrad", sg[i]), ("perturbation", pert[i])):
            title = (
                f"{name} saliency of the {'value' if name == 'perturbation' else target}, frame {i}"
            )
            save_figure(out / f"{name}-{i:02d}.png",
                        heatmap_figure(rgb, m, title, labels[name], cmap="viridis", vmin=0.0,
                                       vmax=robust_max(m)))  # fmt: skip
    if len(obs):
        views["saliency"] = {"heat": pert[0], "label": labels["perturbation"]}
    return {"target": target, "frames": len(obs)}
