"""The policy registry: names -> network classes and their option dataclasses.

policy = build_policy("region", obs_shape=(4, 84, 84), n_actions=4, attention="softmax")
same = build_policy(policy.spec["name"], policy.spec["obs_shape"], policy.spec["n_actions"],
                    **policy.spec["options"])
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

from attention.base import Policy, check_n_actions, check_obs_shape
from attention.nets import (
    ImpalaCNN,
    ImpalaConfig,
    InterpretableCNN,
    InterpretableConfig,
    NatureCNN,
    NatureConfig,
)
from attention.region import RegionConfig, RegionPolicy
from attention.selfattn import CwrcaConfig, SunConfig, SunPolicy
from loupe.errors import LoupeError


@dataclasses.dataclass(frozen=True)
class PolicyEntry:
    """One registered network."""

    #: builds the network from (obs_shape, n_actions, config)
    factory: Callable[..., Policy]
    #: the dataclass holding its options (the keyword options of ``build_policy``)
    config_cls: type
    #: one line for listings
    summary: str


POLICIES: dict[str, PolicyEntry] = {
    "nature": PolicyEntry(NatureCNN, NatureConfig, "Nature-DQN CNN, fc 512"),
    "impala": PolicyEntry(ImpalaCNN, ImpalaConfig, "IMPALA CNN (16, 32, 32), fc 256"),
    "interpretable": PolicyEntry(
        InterpretableCNN, InterpretableConfig, "Hilton et al. CNN with L2 pooling; layer 2b"
    ),
    "region": PolicyEntry(
        RegionPolicy, RegionConfig, "Nature trunk with two region-sensitive attention maps"
    ),
    "sun-na": PolicyEntry(
        functools.partial(SunPolicy, variant="na"), SunConfig, "Sun et al. trunk, no attention"
    ),
    "sun-swa": PolicyEntry(
        functools.partial(SunPolicy, variant="swa"), SunConfig, "Sun et al. row self-attention"
    ),
    "sun-cwra": PolicyEntry(
        functools.partial(SunPolicy, variant="cwra"),
        SunConfig,
        "Sun et al. channel-wise row (vertical) attention",
    ),
    "sun-cwca": PolicyEntry(
        functools.partial(SunPolicy, variant="cwca"),
        SunConfig,
        "Sun et al. channel-wise column (horizontal) attention",
    ),
    "sun-cwrca": PolicyEntry(
        functools.partial(SunPolicy, variant="cwrca"),
        CwrcaConfig,
        "Sun et al. row + column attention",
    ),
}


def list_policies() -> list[str]:
    """Registered policy names, in registry order."""
    return list(POLICIES)


def policy_options(name: str) -> list[str]:
    """The keyword options ``build_policy`` accepts for policy ``name``."""
    return [f.name for f in dataclasses.fields(_entry(name).config_cls)]


def build_policy(name: str, obs_shape: Sequence[int], n_actions: int, **options: Any) -> Policy:
    """Build policy ``name`` for observations of shape (C, H, W) and ``n_actions`` actions.

    ``options`` are the fields of the policy's config dataclass (``policy_options(name)``).
    LoupeError for an unknown name or option, a bad value, or an observation shape the network
    cannot take.
    """
    entry = _entry(name)
    shape = check_obs_shape(name, obs_shape)
    n = check_n_actions(name, n_actions)
    valid = policy_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        takes = f"valid options: {', '.join(valid)}" if valid else "it takes no options"
        raise LoupeError(f"policy {name}: unknown option(s) {', '.join(unknown)}; {takes}")
    config = entry.config_cls(**options)  # __post_init__ checks and normalises the values
    return entry.factory(shape, n, config)


def _entry(name: str) -> PolicyEntry:
    if name not in POLICIES:
        raise LoupeError(f"unknown policy {name!r}; choose one of: {', '.join(POLICIES)}")
    return POLICIES[name]
