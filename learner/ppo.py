"""The PPO loss (a pure function) and the learner that applies it to trajectory batches."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from torch import nn

from learner.config import PPOConfig
from learner.gae import compute_gae
from learner.rollout import Rollout


def ppo_loss(out, mb: dict[str, torch.Tensor], clip_coef: float, cfg: PPOConfig):
    """Clipped-surrogate PPO loss on one minibatch of B samples -> (loss, stats).

    ``out`` has ``logits`` (B, A), ``value`` (B,) and ``attention_entropy`` (B,) or None; ``mb`` has
    ``actions``, ``logprobs``, ``values``, ``advantages``, ``returns``, all (B,).
    """
    logp_all = torch.log_softmax(out.logits, dim=-1)  # (B, A)
    newlogp = logp_all.gather(1, mb["actions"][:, None]).squeeze(1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)  # (B,)
    logratio = newlogp - mb["logprobs"]
    ratio = logratio.exp()
    adv = mb["advantages"]
    if cfg.norm_adv:
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    pg_loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip_coef, 1 + clip_coef)).mean()
    value = out.value
    if cfg.clip_vloss:
        unclipped = (value - mb["returns"]) ** 2
        v_clipped = mb["values"] + (value - mb["values"]).clamp(-clip_coef, clip_coef)
        v_loss = 0.5 * torch.max(unclipped, (v_clipped - mb["returns"]) ** 2).mean()
    else:
        v_loss = 0.5 * ((value - mb["returns"]) ** 2).mean()
    loss = pg_loss - cfg.ent_coef * entropy.mean() + cfg.vf_coef * v_loss
    stats = {}
    if out.attention_entropy is not None:
        attn_entropy = out.attention_entropy.mean()
        if cfg.attn_coef > 0:
            loss = loss + cfg.attn_coef * attn_entropy
        stats["attn_entropy"] = attn_entropy.detach()
    with torch.no_grad():
        stats.update(
            policy_loss=pg_loss.detach(),
            value_loss=v_loss.detach(),
            entropy=entropy.mean(),
            approx_kl=((ratio - 1) - logratio).mean(),
            clipfrac=((ratio - 1).abs() > clip_coef).float().mean(),
        )
    return loss, stats


class RewardNormalizer:
    """Scales rewards by the running std of each env's discounted return (no mean shift)."""

    def __init__(self, num_envs: int, gamma: float, epsilon: float = 1e-8):
        self.gamma, self.epsilon = gamma, epsilon
        self.ret = np.zeros(num_envs, dtype=np.float64)
        self.mean, self.var, self.count = 0.0, 1.0, 1e-4

    def _update(self, x: np.ndarray) -> None:
        b_mean, b_var, b_count = float(x.mean()), float(x.var()), x.size
        delta, total = b_mean - self.mean, self.count + b_count
        m2 = self.var * self.count + b_var * b_count + delta**2 * self.count * b_count / total
        self.mean, self.var, self.count = self.mean + delta * b_count / total, m2 / total, total

    def __call__(self, rewards: np.ndarray, dones: np.ndarray) -> np.ndarray:
        """(T, N) rewards in time order -> scaled rewards; state carries over between calls."""
        out = np.empty_like(rewards, dtype=np.float32)
        for t in range(rewards.shape[0]):
            self.ret = self.ret * self.gamma + rewards[t]
            self._update(self.ret)
            out[t] = rewards[t] / np.sqrt(self.var + self.epsilon)
            self.ret[dones[t]] = 0.0
        return out

    def state(self) -> dict[str, Any]:
        return {"ret": self.ret.tolist(), "mean": self.mean, "var": self.var, "count": self.count}

    def load(self, state: dict[str, Any]) -> None:
        self.ret = np.asarray(state["ret"], dtype=np.float64)
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]


@dataclasses.dataclass
class TrainState:
    """What a resumed run needs besides the weights: tensors plus JSON-ready metadata."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]


class PPOLearner:
    """Owns the optimiser; ``update(rollout)`` runs epochs x minibatches of PPO on one batch."""

    def __init__(self, policy: nn.Module, cfg: PPOConfig, device: str = "cpu"):
        self.cfg = cfg
        self.device = torch.device(device)
        self.policy = policy.to(self.device)
        self.optimizer = torch.optim.Adam(policy.parameters(), lr=cfg.lr, eps=cfg.adam_eps)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.normalizer = (
            RewardNormalizer(cfg.num_envs, cfg.gamma) if cfg.normalize_rewards else None
        )
        self.global_step = 0
        self.update_index = 0

    def _schedule(self) -> tuple[float, float]:
        frac = max(0.0, 1.0 - self.update_index / self.cfg.num_updates)
        lr = self.cfg.lr * frac if self.cfg.anneal_lr else self.cfg.lr
        clip = self.cfg.clip_coef * frac if self.cfg.anneal_clip else self.cfg.clip_coef
        return lr, max(clip, 1e-8)

    def update(self, rollout: Rollout) -> dict[str, float]:
        cfg = self.cfg
        rewards = rollout.rewards
        if self.normalizer is not None:
            rewards = self.normalizer(rewards, rollout.dones)
        adv, ret = compute_gae(
            rewards, rollout.values, rollout.dones, rollout.last_value, cfg.gamma, cfg.gae_lambda
        )
        batch = rollout.actions.size
        obs = torch.from_numpy(rollout.obs.reshape(batch, *rollout.obs.shape[2:]))
        flat = {
            "actions": torch.from_numpy(rollout.actions.reshape(batch)),
            "logprobs": torch.from_numpy(rollout.logprobs.reshape(batch)),
            "values": torch.from_numpy(rollout.values.reshape(batch)),
            "advantages": torch.from_numpy(adv.reshape(batch)),
            "returns": torch.from_numpy(ret.reshape(batch)),
        }
        lr, clip = self._schedule()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        mb_size = batch // cfg.num_minibatches
        sums: dict[str, float] = {}
        count = 0
        self.policy.train()
        for _ in range(cfg.update_epochs):
            order = torch.randperm(batch, generator=self.generator)
            for start in range(0, batch - mb_size + 1, mb_size):
                idx = order[start : start + mb_size]
                mb = {k: v[idx].to(self.device) for k, v in flat.items()}
                out = self.policy(obs[idx].to(self.device))
                loss, stats = ppo_loss(out, mb, clip, cfg)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                stats["grad_norm"] = grad_norm
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                count += 1
        self.global_step += batch
        self.update_index += 1
        result = {k: v / count for k, v in sums.items()}
        var_ret = float(np.var(ret))
        result["explained_variance"] = (
            float("nan") if var_ret == 0 else 1.0 - float(np.var(ret - rollout.values)) / var_ret
        )
        result["lr"], result["clip_coef"] = lr, clip
        return result

    # -- resuming ----------------------------------------------------------------------------------
    def state_dict(self) -> TrainState:
        """Optimiser moments, counters and every RNG, as tensors + JSON (safetensors-friendly)."""
        opt = self.optimizer.state_dict()
        tensors: dict[str, torch.Tensor] = {}
        scalars: dict[str, dict[str, Any]] = {}
        for idx, state in opt["state"].items():
            for key, value in state.items():
                if torch.is_tensor(value):
                    tensors[f"optim.{idx}.{key}"] = value.detach().cpu().contiguous()
                else:
                    scalars.setdefault(str(idx), {})[key] = value
        tensors["rng.generator"] = self.generator.get_state()
        tensors["rng.torch"] = torch.get_rng_state()
        np_state = np.random.get_state()
        tensors["rng.numpy_keys"] = torch.from_numpy(np_state[1].astype(np.int64))
        meta = {
            "global_step": self.global_step,
            "update_index": self.update_index,
            "param_groups": opt["param_groups"],
            "optim_scalars": scalars,
            "numpy_rng": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "normalizer": self.normalizer.state() if self.normalizer else None,
        }
        return TrainState(tensors, meta)

    def load_state_dict(self, state: TrainState) -> None:
        t, meta = state.tensors, state.meta
        opt_state: dict[int, dict[str, Any]] = {}
        for name, value in t.items():
            if name.startswith("optim."):
                _, idx, key = name.split(".", 2)
                opt_state.setdefault(int(idx), {})[key] = value
        for idx, scalars in meta["optim_scalars"].items():
            opt_state.setdefault(int(idx), {}).update(scalars)
        self.optimizer.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
        self.generator.set_state(t["rng.generator"])
        torch.set_rng_state(t["rng.torch"])
        kind, pos, has_gauss, cached = meta["numpy_rng"]
        keys = t["rng.numpy_keys"].numpy().astype(np.uint32)
        np.random.set_state((kind, keys, pos, has_gauss, cached))
        if self.normalizer is not None and meta.get("normalizer"):
            self.normalizer.load(meta["normalizer"])
        self.global_step = int(meta["global_step"])
        self.update_index = int(meta["update_index"])
