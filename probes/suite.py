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


@dataclasses.dataclass
class ProbeConfig:
    """What one probe run computes, and how much of it."""

    #: analysis layer (None: the policy's default, e.g. 2b for the interpretable network)
    layer: str | None = None
    #: environments recorded in parallel
    num_envs: int = 8
    #: steps recorded per environment
    num_steps: int = 128
    #: observations attributed with integrated gradients (evenly spread over the recording)
    ig_samples: int = 64
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
        return actor.rollout(config.num_steps)
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
                       config=dataclasses.asdict(config))  # fmt: skip
        from probes.render import write_json

        write_json(partial / "summary.json", summary)
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return summary


def _remove_stale_partials(out: Path) -> None:
    """Delete unfinished work of probe processes that no longer run (killed mid-checkpoint)."""
    if not out.parent.is_dir():
        return
    for stale in out.parent.glob(f".{out.name}.partial-*"):
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
    from probes.render import obs_to_rgb, save_png

    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    rollout = record(policy, meta, config)
    timings["record_s"] = time.perf_counter() - t0
    frames = rollout.obs.reshape(-1, *rollout.obs.shape[2:])  # (T*N, C, H, W), time-major
    idx = np.linspace(0, len(frames) - 1, min(config.ig_samples, len(frames))).astype(int)
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
        "max_completeness_delta": float(ig.delta.abs().max()),
        "top10_attribution_share": top_share(value_attr),
        "episodes_recorded": len(rollout.episodes),
        "mean_return": float(np.mean([e.ret for e in rollout.episodes]))
        if rollout.episodes
        else None,
    }

    # attention
    if policy.has_attention:
        summary.update(_attention(policy, obs, out / "attention"))

    # NMF features of the value attributions (spatial layers only)
    if value_attr.dim() == 4:
        t0 = time.perf_counter()
        summary["nmf"] = _nmf(value_attr.numpy(), obs.numpy(), config, out)
        timings["nmf_s"] = time.perf_counter() - t0

    # GAE anomaly scan over the whole recording
    marks, _ = gae_scan(rollout.rewards, rollout.values, rollout.dones, rollout.last_value,
                        config.gamma, config.lam, config.bookmarks)  # fmt: skip
    summary["bookmarks"] = [dataclasses.asdict(m) for m in marks]
    summary["anomaly_count"] = len(marks)
    (out / "bookmarks").mkdir()
    for i, m in enumerate(marks[:4] + [m for m in marks if m.kind == "low"][:4]):
        save_png(out / "bookmarks" / f"{m.kind}-{i:02d}-env{m.env}-t{m.t}.png",
                 obs_to_rgb(rollout.obs[m.t, m.env]))  # fmt: skip

    t0 = time.perf_counter()
    summary["saliency"] = _saliency(policy, obs[: config.saliency_frames], config, out / "saliency")
    timings["saliency_s"] = time.perf_counter() - t0
    summary["timings"] = timings
    return summary


def _attention(policy, obs: torch.Tensor, out: Path) -> dict[str, Any]:
    from probes.attention_maps import attention_overlay, upsample_map
    from probes.render import obs_to_rgb, save_png

    with torch.no_grad():
        res = policy(obs)
    out.mkdir()
    h, w = policy.obs_shape[1:]
    maps = res.attention
    if res.attention_logits is not None and maps.shape[-1] * 12 == w:
        overlay = attention_overlay(maps)  # region maps: receptive-field overlay (METHODS A)
    else:
        overlay = upsample_map(maps.sum(1, keepdim=True), (h, w))
    for i in range(min(4, len(obs))):
        rgb = obs_to_rgb(obs[i].numpy())
        heat = np.stack([overlay[i], np.zeros_like(overlay[i]), 1 - overlay[i]], -1)
        save_png(out / f"overlay-{i:02d}.png", 0.5 * rgb + 0.5 * heat)
    return {
        "attention_entropy": float(res.attention_entropy.mean())
        if res.attention_entropy is not None
        else None,
        "attention_maps_shape": list(maps.shape[1:]),
    }


def _nmf(attr, obs, config: ProbeConfig, out: Path) -> dict[str, Any]:
    from probes.nmf import fit_attribution_nmf, write_feature_visualisations

    k = min(config.nmf_components, attr.shape[1])
    if not np.any(attr):
        return {"error": "value attributions are all zero"}
    nmf = fit_attribution_nmf(attr, n_components=k, seed=config.seed)
    write_feature_visualisations(out / "nmf", nmf, attr, obs,
                                 frames=list(range(min(4, len(obs)))))  # fmt: skip
    return {
        "components": k,
        "directions": nmf.directions.tolist(),
        "mean_abs_residual": float(np.abs(nmf.residual(attr)).mean()),
        "dir": "nmf",
    }


def _saliency(policy, obs: torch.Tensor, config: ProbeConfig, out: Path) -> dict[str, Any]:
    from probes.render import obs_to_rgb, save_png
    from probes.saliency import perturbation_saliency, smoothgrad

    out.mkdir()
    channels = 3 if policy.obs_shape[0] == 3 else 1  # RGB frame, or the newest of a stack
    target = "attention" if policy.spec["name"] == "region" else "value"
    sg = smoothgrad(policy, obs, target, n=config.smoothgrad_copies, seed=config.seed)
    sg = sg[:, -channels:].sum(1).numpy()  # newest frame
    pert = perturbation_saliency(policy, obs, "value", frame_channels=channels).numpy()
    for i in range(len(obs)):
        rgb = obs_to_rgb(obs[i].numpy())
        for name, m in (("smoothgrad", sg[i]), ("perturbation", pert[i])):
            m = m / m.max() if m.max() > 0 else m
            save_png(out / f"{name}-{i:02d}.png", 0.5 * rgb + 0.5 * np.stack([m, m, 0 * m], -1))
    return {"target": target, "frames": len(obs)}
