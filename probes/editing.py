"""Model editing: blind a network to one feature direction of a layer.

For a direction v over the C channels of layer L, P = I - v v^T / |v|^2. The layer that reads L
computes W a; the edited one computes (W P) a = W (P a), so it never sees the component of any
position's channel vector along v. Everything else in the network is unchanged.

    edited = edit_policy(policy, "2b", nmf.directions[3])
    path = write_edited_checkpoint("runs/r/checkpoints/ckpt-000000065536.json", "2b",
                                   direction, "nmf:2b/feature3", "runs/r-edit-saw")
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from loupe.errors import LoupeError

#: metadata keys an edited checkpoint does not take from its parent: recomputed by
#: save_checkpoint for the edited weights, or about the process that wrote the parent (the
#: learner's memory at that checkpoint); the parent's training state keys (state*) are dropped too
_RECOMPUTED = ("schema", "created", "policy", "weights", "size", "sha256", "index", "process")


def _direction(direction: Any) -> torch.Tensor:
    """A 1-D float64 tensor from a list, numpy array or tensor."""
    if isinstance(direction, torch.Tensor):
        direction = direction.detach().cpu().numpy()
    try:
        v = np.asarray(direction, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise LoupeError("the direction must be a list of numbers") from None
    return torch.from_numpy(v.copy())


def projector(direction: Any, channels: int) -> torch.Tensor:
    """P = I - v v^T / |v|^2 -> (C, C) float64; the direction must have ``channels`` entries."""
    v = _direction(direction)
    if v.numel() != channels:
        raise LoupeError(
            f"the direction has {v.numel()} entries but the layer has {channels} channels; "
            "use a direction of that layer"
        )
    norm2 = float(v @ v)
    if not np.isfinite(norm2) or norm2 == 0.0:
        raise LoupeError("the direction is zero (or not finite); there is nothing to project out")
    return torch.eye(channels, dtype=torch.float64) - torch.outer(v, v) / norm2


def project_weight(weight: torch.Tensor, p: torch.Tensor, in_dim: int = 1) -> torch.Tensor:
    """Apply P along the input-channel axis: W'[.., i, ..] = sum_j W[.., j, ..] P[j, i].

    ``weight`` is a conv kernel (out, C, kh, kw) or a linear weight (out, C); a linear weight
    (out, C h w) that reads a flattened (C, h, w) map is handled too (input index = c h w + pos).
    Returns a tensor of ``weight``'s shape and dtype.
    """
    c = p.shape[0]
    w = weight.detach().to(torch.float64)
    if w.shape[in_dim] != c:
        if w.dim() != 2 or in_dim != 1 or w.shape[1] % c:
            raise LoupeError(
                f"a weight of shape {tuple(w.shape)} has no input axis of {c} channels to edit"
            )
        w3 = w.reshape(w.shape[0], c, -1)  # (out, C, h w)
        return torch.einsum("ojs,ji->ois", w3, p).reshape(weight.shape).to(weight.dtype)
    moved = w.movedim(in_dim, -1)  # (..., C)
    return (moved @ p).movedim(-1, in_dim).to(weight.dtype)


def project_out(weight: torch.Tensor, direction: Any, in_dim: int = 1) -> torch.Tensor:
    """``weight`` with P = I - v v^T / |v|^2 applied along its input-channel axis ``in_dim``."""
    return project_weight(weight, projector(direction, int(weight.shape[in_dim])), in_dim)


def layer_channels(policy: nn.Module, layer: str) -> int:
    """The channel count of ``layer``'s activation (one zero observation through the network)."""
    param = next(policy.parameters())
    obs = torch.zeros(1, *policy.obs_shape, dtype=param.dtype, device=param.device)
    with torch.no_grad():
        return int(policy.forward_to(obs, layer).shape[1])


def edit_policy(policy: nn.Module, layer: str, direction: Any) -> nn.Module:
    """A copy of ``policy`` whose ``next_layer(layer)`` ignores ``direction``; ``policy`` is kept."""
    channels = layer_channels(policy, layer)
    p = projector(direction, channels)
    edited = copy.deepcopy(policy)
    consumer = edited.next_layer(layer)
    with torch.no_grad():
        consumer.weight.copy_(project_weight(consumer.weight, p))
    return edited


def edit_provenance(parent_sha256: str, layer: str, direction: Any, source: str) -> dict[str, Any]:
    """What an edited checkpoint records about its origin (stored under ``"edit"`` in its JSON)."""
    return {
        "parent_sha256": parent_sha256,
        "layer": layer,
        "direction": [float(x) for x in _direction(direction).tolist()],
        "direction_source": source,
    }


def write_edited_checkpoint(
    parent_json_path: str | Path, layer: str, direction: Any, source: str, out_path: str | Path
) -> Path:
    """Load a checkpoint, edit it and save it in the new run directory ``out_path``.

    The edited checkpoint keeps the parent's step, run id and environment, and records the edit
    (``edit_provenance``) plus the parent's step (and the parent's own edit, if any); it has no
    training state. Returns its JSON path.
    """
    from learner.checkpoint import load_checkpoint, save_checkpoint

    out = Path(out_path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LoupeError(f"{out} already exists and is not empty; choose a new output directory")
    policy, meta = load_checkpoint(parent_json_path)
    edited = edit_policy(policy, layer, direction)
    record = {k: v for k, v in meta.items() if k not in _RECOMPUTED and not k.startswith("state")}
    record["edit"] = {
        **edit_provenance(meta["sha256"], layer, direction, source),
        "parent_step": int(meta["step"]),
    }
    if "edit" in meta:  # an edit of an edit keeps the whole chain
        record["edit"]["parent_edit"] = meta["edit"]
    return save_checkpoint(out, edited, record, keep_last=0)


def summary_direction(summary: dict[str, Any], spec: str, layer: str) -> tuple[Any, str]:
    """The NMF direction a probe summary names -> (direction (C,), provenance source).

    ``spec`` is ``nmf:K`` (feature K) or ``label:NAME`` (the feature labelled NAME with the largest
    share, CoinRun probes only), e.g. ``label:saw`` -> source ``"label:saw = nmf:3 (share 0.71)"``.
    """
    nmf = summary.get("nmf") or {}
    directions = nmf.get("directions")
    if not directions:
        raise LoupeError("the probe summary holds no NMF directions; probe a spatial layer")
    if summary.get("layer") != layer:
        raise LoupeError(f"the NMF was fitted at layer {summary.get('layer')}, not {layer}")
    kind, _, value = spec.partition(":")
    if kind == "label":
        from probes.labels import FeatureLabel, find_label

        if "labels" not in nmf:
            raise LoupeError(
                "the probe summary has no feature labels (they need a CoinRun checkpoint); "
                "use nmf:K"
            )
        found = find_label([FeatureLabel(**f) for f in nmf["labels"]], value)
        k = found.feature
        source = f"{spec} = nmf:{k} (share {found.share:.2f})"
    elif kind == "nmf":
        try:
            k = int(value)
            if not 0 <= k < len(directions):
                raise ValueError
        except ValueError:
            raise LoupeError(f"{spec}: choose nmf:0 .. nmf:{len(directions) - 1}") from None
        source = spec
    else:
        raise LoupeError(f"{spec}: a direction is nmf:K, label:NAME or a .npy file")
    return np.asarray(directions[k], dtype=np.float32), source
