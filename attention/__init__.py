"""Policy networks: a registry of CNN and attention policies with named layers and attention maps.

policy = build_policy("region", obs_shape=(4, 84, 84), n_actions=4, attention="softmax")
out = policy(obs_uint8)          # PolicyOutput(logits, value, attention, ...)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from attention.base import Policy, PolicyOutput
from attention.nets import ImpalaCNN, InterpretableCNN, NatureCNN
from attention.region import RegionPolicy, attention_entropy
from attention.selfattn import SunPolicy
from loupe.errors import LoupeError

POLICIES: dict[str, Callable[..., Policy]] = {
    "nature": NatureCNN,
    "impala": ImpalaCNN,
    "interpretable": InterpretableCNN,
    "region": RegionPolicy,
    **{
        f"sun-{v}": functools.partial(SunPolicy, variant=v)
        for v in ("na", "swa", "cwra", "cwca", "cwrca")
    },
}


def list_policies() -> list[str]:
    return list(POLICIES)


def build_policy(name: str, obs_shape, n_actions: int, **options: Any) -> Policy:
    """Build a registered policy for observations of shape (C, H, W) and ``n_actions`` actions."""
    if name not in POLICIES:
        raise LoupeError(f"unknown policy {name!r}; choose one of: {', '.join(POLICIES)}")
    try:
        return POLICIES[name](tuple(obs_shape), int(n_actions), **options)
    except TypeError as exc:
        raise LoupeError(f"policy {name}: bad option ({exc})") from None


__all__ = [
    "POLICIES",
    "Policy",
    "PolicyOutput",
    "attention_entropy",
    "build_policy",
    "list_policies",
]
