"""Policy networks: a registry of CNN and attention policies with named layers and attention maps.

policy = build_policy("region", obs_shape=(4, 84, 84), n_actions=4, attention="softmax")
out = policy(obs_uint8)            # PolicyOutput(logits, value, attention, ...)
a = policy.forward_to(obs, "c3n")  # a layer's activation; policy.forward_from("c3n", a) the rest
"""

from __future__ import annotations

from attention.base import Policy, PolicyOutput
from attention.region import attention_entropy
from attention.registry import POLICIES, build_policy, list_policies, policy_options

__all__ = [
    "POLICIES",
    "Policy",
    "PolicyOutput",
    "attention_entropy",
    "build_policy",
    "list_policies",
    "policy_options",
]
