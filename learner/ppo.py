"""The PPO loss (a pure function) and the learner that applies it to trajectory batches.

learner = PPOLearner(policy, PPOConfig.preset("atari-nikulin"), device="cuda")
stats = learner.update(rollout)          # one batch: epochs x minibatches of Adam steps
state = learner.state_dict()             # optimiser, counters, RNGs, reward normaliser
learner.load_state_dict(state)           # the next update is then identical
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import functools
import sys
import warnings
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from learner.config import PPOConfig
from learner.gae import compute_gae
from learner.reward_norm import RewardNormalizer
from learner.rollout import Rollout
from loupe.errors import LoupeError


class LossInput(Protocol):
    """What ``ppo_loss`` reads from a policy's output (``attention.PolicyOutput`` fits)."""

    logits: torch.Tensor  # (B, A)
    value: torch.Tensor  # (B,)
    attention_entropy: torch.Tensor | None  # (B,) or None


def ppo_loss(
    out: LossInput,
    mb: dict[str, torch.Tensor],
    clip_coef: float,
    cfg: PPOConfig,
    adv_moments: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped-surrogate PPO loss on one minibatch of B samples -> (loss, detached stats).

    ``mb`` holds ``actions``, ``logprobs`` (behaviour), ``values`` (behaviour), ``advantages`` and
    ``returns``, all (B,), and for decoupled PPO ``prox_logprobs`` (the learner's, before the
    update). loss = policy_loss - ent_coef * entropy + vf_coef * value_loss
    (+ attn_coef * mean attention entropy when attn_coef > 0). ``adv_moments`` (mean, std) of the
    whole minibatch replace those of ``mb["advantages"]`` in the advantage normalisation (data-
    parallel learners each hold a share of the minibatch).
    """
    logp_all = torch.log_softmax(out.logits, dim=-1)  # (B, A)
    newlogp = logp_all.gather(1, mb["actions"][:, None]).squeeze(1)  # (B,)
    entropy = -(logp_all.exp() * logp_all).sum(-1)  # (B,)
    # decoupled PPO: the ratio is against the proximal policy; pi_prox / pi_behaviour weights it
    anchor = mb.get("prox_logprobs", mb["logprobs"])
    logratio = newlogp - anchor  # (B,)
    ratio = logratio.exp()
    adv = mb["advantages"]
    if cfg.norm_adv:
        mean, std = (adv.mean(), adv.std()) if adv_moments is None else adv_moments
        adv = (adv - mean) / (std + 1e-8)
    clipped_ratio = ratio.clamp(1 - clip_coef, 1 + clip_coef)
    surrogate = torch.max(-adv * ratio, -adv * clipped_ratio)  # (B,)
    if "prox_logprobs" in mb:
        surrogate = (mb["prox_logprobs"] - mb["logprobs"]).exp() * surrogate
    pg_loss = surrogate.mean()
    v_loss = value_loss(out.value, mb, clip_coef if cfg.clip_vloss else None)
    loss = pg_loss - cfg.ent_coef * entropy.mean() + cfg.vf_coef * v_loss
    stats: dict[str, torch.Tensor] = {}
    if cfg.attn_coef > 0 and out.attention_entropy is None:
        raise LoupeError("attn_coef > 0 needs a policy with attention; set attn_coef to 0")
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
            approx_kl=((ratio - 1) - logratio).mean(),  # the low-variance k3 estimator
            clipfrac=((ratio - 1).abs() > clip_coef).float().mean(),
        )
    return loss, stats


def value_loss(
    value: torch.Tensor, mb: dict[str, torch.Tensor], clip: float | None
) -> torch.Tensor:
    """0.5 * mean squared error; with ``clip``, the max of the unclipped and clipped errors."""
    unclipped = (value - mb["returns"]) ** 2  # (B,)
    if clip is None:
        return 0.5 * unclipped.mean()
    v_clipped = mb["values"] + (value - mb["values"]).clamp(-clip, clip)
    return 0.5 * torch.max(unclipped, (v_clipped - mb["returns"]) ** 2).mean()


def explained_variance(pred: np.ndarray, target: np.ndarray) -> float:
    """1 - Var(target - pred) / Var(target); NaN where the target is constant."""
    var = float(np.var(target))
    return float("nan") if var == 0 else 1.0 - float(np.var(target - pred)) / var


def _float_output(out: Any) -> Any:
    """``out`` with logits, value and attention entropy in float32 (the loss is float32)."""
    fields = ("logits", "value", "attention_entropy")
    changes = {
        f: getattr(out, f).float()
        for f in fields
        if getattr(out, f, None) is not None and getattr(out, f).dtype != torch.float32
    }
    return dataclasses.replace(out, **changes) if changes else out


#: policies whose update was measured faster under bf16 autocast on a CPU with native bf16
#: (bench/profile.md, 2-core AVX512-BF16 CPU, minibatch 2048: IMPALA ~2x; the interpretable CNN
#: 6.2 -> 3.1 CPU ms per sample with 1 thread, 6.8 -> 3.4 with 2; `loupe bench --only
#: update_interpretable`)
BF16_PAYS = frozenset({"impala", "interpretable"})
#: policies whose update was measured faster in channels-last memory format on a CPU (same
#: benchmark: the interpretable CNN in bf16 3.1 -> 2.1 CPU ms per sample with 1 thread, 3.4 ->
#: 2.5 with 2; its 64-env inference 72 -> 46 CPU ms per step in bf16, 95 -> 87 in fp32)
CHANNELS_LAST_PAYS = frozenset({"interpretable"})


@functools.cache
def cpu_bf16_feature() -> str | None:
    """The CPU feature that makes bf16 matrix maths native ("amx_bf16", "avx512_bf16"), or None."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = next(
        (ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []
    )
    return next((f for f in ("amx_bf16", "avx512_bf16") if f in flags), None)


def resolve_precision(precision: str, device: torch.device, policy_name: str) -> str:
    """ "auto"/"fp32"/"bf16" -> the precision the update runs in, or a LoupeError for a bf16
    request on a CPU without native bf16."""
    if device.type != "cpu":
        return "fp32" if precision == "auto" else precision
    native = cpu_bf16_feature() is not None
    if precision == "bf16" and not native:
        raise LoupeError(
            "precision bf16 needs a CPU with AVX512-BF16 or AMX, and this one has neither "
            "(see the flags in /proc/cpuinfo); use --precision fp32"
        )
    if precision == "auto":
        return "bf16" if native and policy_name in BF16_PAYS else "fp32"
    return precision


def resolve_channels_last(
    channels_last: bool | None, device: torch.device, policy_name: str
) -> bool:
    """True/False/None ("auto") -> whether the update runs in channels-last memory format."""
    if channels_last is None:
        return device.type == "cpu" and policy_name in CHANNELS_LAST_PAYS
    return bool(channels_last)


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


@functools.cache
def tune_malloc() -> bool:
    """Keep freed memory in the glibc heap: no mmap for large blocks, no trimming -> applied?

    Large activations are otherwise mmap'ed and unmapped every minibatch, and each fresh page
    faults (the system time of an update). Once per process; a no-op off glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


@dataclasses.dataclass
class TrainState:
    """What a resumed run needs besides the weights: tensors plus JSON-ready metadata."""

    #: optimiser moments and RNG states
    tensors: dict[str, torch.Tensor]
    #: counters, optimiser hyper-parameters, numpy RNG position, reward normaliser
    meta: dict[str, Any]


class PPOLearner:
    """Owns the optimiser; ``update(rollout)`` runs epochs x minibatches of PPO on one batch."""

    def __init__(
        self,
        policy: nn.Module,
        cfg: PPOConfig,
        device: str | torch.device = "cpu",
        shards: int = 1,
    ):
        if cfg.attn_coef > 0 and not getattr(policy, "has_attention", False):
            name = getattr(policy, "spec", {}).get("name", type(policy).__name__)
            raise LoupeError(
                f"attn_coef={cfg.attn_coef} needs a policy with attention, and {name} has none; "
                "set attn_coef to 0 or choose an attention policy"
            )
        if shards < 1 or cfg.batch_size % (shards * cfg.num_minibatches):
            raise LoupeError(
                f"batch of {cfg.batch_size} does not split into {cfg.num_minibatches} minibatches "
                f"of {shards} equal shares each; change --learners or --minibatches"
            )
        self.cfg = cfg
        #: each minibatch takes an equal share from each of ``shards`` contiguous parts of the
        #: batch, in one order for all parts: the minibatches N data-parallel learners see together
        self.shards = shards
        self.device = torch.device(device)
        name = getattr(policy, "spec", {}).get("name", type(policy).__name__)
        #: the precision the update runs in ("fp32" or "bf16"), ``cfg.precision`` resolved
        self.precision = resolve_precision(cfg.precision, self.device, name)
        if cfg.malloc_tuning and self.device.type == "cpu":
            tune_malloc()
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.policy = policy.to(self.device)
        #: whether the update runs in channels-last memory format, ``cfg.channels_last`` resolved
        self.channels_last = resolve_channels_last(cfg.channels_last, self.device, name)
        if self.channels_last:
            self.policy.to(memory_format=torch.channels_last)
        #: what the update calls: the policy, or its torch.compile'd wrapper
        self.forward = torch.compile(self.policy) if cfg.compile else self.policy
        self._buffers: dict[str, torch.Tensor] = {}
        # the loss of one micro-batch: advantages arrive normalised over the whole minibatch
        self._chunk_cfg = dataclasses.replace(cfg, norm_adv=False)
        self.optimizer = torch.optim.Adam(policy.parameters(), lr=cfg.lr, eps=cfg.adam_eps)
        self.generator = torch.Generator().manual_seed(cfg.seed)  # minibatch order only
        self.normalizer = (
            RewardNormalizer(cfg.num_envs, cfg.reward_gamma, cfg.reward_clip)
            if cfg.normalize_rewards
            else None
        )
        #: environment steps trained on so far
        self.global_step = 0
        #: updates done so far (drives the annealing schedules)
        self.update_index = 0

    def schedule(self) -> tuple[float, float]:
        """(lr, clip_coef) for the next update: linear annealing by update index."""
        frac = max(0.0, 1.0 - self.update_index / self.cfg.num_updates)
        lr = self.cfg.lr * frac if self.cfg.anneal_lr else self.cfg.lr
        clip = self.cfg.clip_coef * frac if self.cfg.anneal_clip else self.cfg.clip_coef
        return lr, max(clip, 1e-8)

    def update(self, rollout: Rollout) -> dict[str, float]:
        """One PPO update on ``rollout`` -> mean stats over its minibatches, plus lr, clip_coef,
        explained_variance."""
        self._check(rollout)
        obs, flat = self._flatten(rollout)
        lr, clip = self.schedule()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # the learner has made update_index updates; a batch of an older version is stale
        stale = rollout.policy_version < self.update_index
        decoupled = self.cfg.proximal == "learner" or (self.cfg.proximal == "auto" and stale)
        if decoupled:
            flat["prox_logprobs"] = self._logprobs(obs, flat["actions"])
        result = self._epochs(obs, flat, clip)
        if "prox_logprobs" in flat:
            log_w = flat["prox_logprobs"] - flat["logprobs"]  # log pi_prox / pi_behaviour
            result["behaviour_weight_max"] = float(log_w.exp().max())
            result["behaviour_kl"] = float(((log_w.exp() - 1) - log_w).mean())  # k3 estimator
        self.global_step += rollout.actions.size
        self.update_index += 1
        result["explained_variance"] = explained_variance(
            flat["values"].cpu().numpy(), flat["returns"].cpu().numpy()
        )
        result["lr"], result["clip_coef"] = lr, clip
        result["decoupled"] = float(decoupled)
        return result

    def _check(self, rollout: Rollout) -> None:
        cfg = self.cfg
        if rollout.actions.shape != (cfg.num_steps, cfg.num_envs):
            raise LoupeError(
                f"rollout of {rollout.actions.shape} (steps, envs) does not match the PPO config "
                f"({cfg.num_steps}, {cfg.num_envs}); sample num_steps from num_envs envs"
            )

    def _flatten(self, rollout: Rollout) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """GAE on the (T, N) arrays, then (B = T*N) tensors on the learner's device."""
        flat = self._targets(rollout)
        b = rollout.actions.size
        with warnings.catch_warnings():
            # rollouts from Ray are read-only views of the object store; the batch is only read
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            obs = torch.from_numpy(rollout.obs.reshape(b, *rollout.obs.shape[2:])).to(self.device)
        return obs, flat  # (B, C, H, W), {key: (B,)}

    def _targets(self, rollout: Rollout) -> dict[str, torch.Tensor]:
        """Actions, behaviour log-probs and values, GAE advantages and returns: (B,) each."""
        cfg = self.cfg
        rewards = rollout.rewards
        if self.normalizer is not None:
            rewards = self.normalizer(rewards, rollout.dones)
        adv, ret = compute_gae(
            rewards, rollout.values, rollout.dones, rollout.last_value, cfg.gamma, cfg.gae_lambda
        )
        b = rollout.actions.size
        arrays = {
            "actions": rollout.actions.astype(np.int64),
            "logprobs": rollout.logprobs.astype(np.float32),
            "values": rollout.values.astype(np.float32),
            "advantages": adv,
            "returns": ret,
        }
        return {k: torch.from_numpy(v.reshape(b)).to(self.device) for k, v in arrays.items()}

    @torch.no_grad()
    def _logprobs(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """(B,) log-probabilities of ``actions`` under the current weights, in minibatches."""
        self.policy.train()  # the mode the epochs run in
        out = []
        for start in range(0, obs.shape[0], self.cfg.minibatch_size):
            with self._autocast():
                x = self._input(obs[start : start + self.cfg.minibatch_size])
                logits = self.forward(x).logits.float()
            logp = torch.log_softmax(logits, dim=-1)
            out.append(logp.gather(1, actions[start : start + len(logp), None]).squeeze(1))
        return torch.cat(out)

    def _autocast(self) -> torch.autocast:
        """bfloat16 autocast on the learner's device when ``precision`` is "bf16", else a no-op."""
        return torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"
        )

    def _input(self, obs: torch.Tensor) -> torch.Tensor:
        """Observations in the memory format the update runs in."""
        if self.channels_last and obs.dim() == 4:
            return obs.contiguous(memory_format=torch.channels_last)
        return obs

    def _epochs(
        self, obs: torch.Tensor, flat: dict[str, torch.Tensor], clip: float
    ) -> dict[str, float]:
        cfg = self.cfg
        batch = obs.shape[0]
        sums: dict[str, torch.Tensor] = {}
        count = 0
        self.policy.train()
        for _ in range(cfg.update_epochs):
            for idx in self._minibatch_order(batch).to(self.device):  # (b,) per minibatch
                mb_obs, mb = self._gather(obs, flat, idx)
                stats = self._step(mb_obs, mb, clip)
                for k, v in stats.items():
                    sums[k] = sums[k] + v if k in sums else v
                count += 1
        return {k: float(v) / count for k, v in self._reduce_stats(sums).items()}

    def _minibatch_order(self, batch: int) -> torch.Tensor:
        """(num_minibatches, batch // num_minibatches) sample indices of one epoch.

        One permutation of ``batch // shards`` is drawn; minibatch j takes its j-th slice in every
        shard (shard s holds samples s*batch/shards ...). With one shard: a plain permutation.
        """
        per_shard = batch // self.shards
        perm = torch.randperm(per_shard, generator=self.generator)  # (batch / shards,)
        blocks = perm.view(self.cfg.num_minibatches, 1, -1)  # (M, 1, m)
        offsets = torch.arange(self.shards).view(1, -1, 1) * per_shard  # (1, shards, 1)
        return (blocks + offsets).reshape(self.cfg.num_minibatches, -1)

    # -- data-parallel hooks: one learner needs none (see learner.parallel) --------------------
    def _advantage_moments(self, adv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(mean, std) of the whole minibatch's advantages; None: those of ``adv`` itself."""
        return None

    def _reduce_gradients(self) -> None:
        """Make every parameter's gradient that of the whole minibatch (one learner: it is)."""

    def _reduce_stats(self, sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-minibatch stat sums of this learner -> those of the whole batch (one learner: same)."""
        return sums

    def _gather(
        self, obs: torch.Tensor, flat: dict[str, torch.Tensor], idx: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The minibatch ``idx``: with ``reuse_buffers``, index_select into buffers kept between
        minibatches (reallocated only when a shape or dtype changes)."""
        if not self.cfg.reuse_buffers:
            return obs[idx], {k: v[idx] for k, v in flat.items()}
        out = {}
        for key, src in (("obs", obs), *flat.items()):
            shape = (len(idx), *src.shape[1:])
            buf = self._buffers.get(key)
            if buf is None or buf.shape != shape or buf.dtype != src.dtype:
                buf = self._buffers[key] = torch.empty(shape, dtype=src.dtype, device=src.device)
            out[key] = torch.index_select(src, 0, idx, out=buf)
        return out.pop("obs"), out

    def _step(
        self, obs: torch.Tensor, mb: dict[str, torch.Tensor], clip: float
    ) -> dict[str, torch.Tensor]:
        """One Adam step on one minibatch -> its detached stats.

        The minibatch goes through forward/backward in micro-batches of ``cfg.micro_batch``; each
        micro-batch's mean loss is weighted by its share of the minibatch, so the accumulated
        gradient and the stats equal those of one pass over the whole minibatch. Advantages are
        normalised with the whole minibatch's moments (all learners' shares, when data-parallel).
        """
        b = obs.shape[0]
        chunk = self.cfg.micro_batch or b
        if self.cfg.norm_adv:
            adv = mb["advantages"]
            moments = self._advantage_moments(adv)
            mean, std = (adv.mean(), adv.std()) if moments is None else moments
            mb = {**mb, "advantages": (adv - mean) / (std + 1e-8)}
        self.optimizer.zero_grad(set_to_none=True)
        stats: dict[str, torch.Tensor] = {}
        for start in range(0, b, chunk):
            part = slice(start, min(start + chunk, b))
            weight = (part.stop - part.start) / b
            with self._autocast():
                out = self.forward(self._input(obs[part]))
            loss, part_stats = ppo_loss(
                _float_output(out), {k: v[part] for k, v in mb.items()}, clip, self._chunk_cfg
            )
            (loss * weight if weight != 1 else loss).backward()
            for k, v in part_stats.items():
                stats[k] = stats[k] + v * weight if k in stats else v * weight
        self._reduce_gradients()
        stats["grad_norm"] = nn.utils.clip_grad_norm_(
            self.policy.parameters(), self.cfg.max_grad_norm
        ).detach()
        self.optimizer.step()
        return stats

    # -- resuming ----------------------------------------------------------------------------------
    def state_dict(self) -> TrainState:
        """Optimiser moments, counters and every RNG, as tensors + JSON (safetensors-friendly)."""
        opt = self.optimizer.state_dict()
        tensors: dict[str, torch.Tensor] = {}
        scalars: dict[str, dict[str, Any]] = {}
        for idx, state in opt["state"].items():
            for key, value in state.items():
                if torch.is_tensor(value):
                    # a copy: on CPU, .cpu() would alias the live moments the next step changes
                    tensors[f"optim.{idx}.{key}"] = value.detach().to("cpu", copy=True).contiguous()
                else:
                    scalars.setdefault(str(idx), {})[key] = value
        tensors["rng.generator"] = self.generator.get_state()
        tensors["rng.torch"] = torch.get_rng_state()
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        tensors["rng.numpy_keys"] = torch.from_numpy(np.asarray(keys).astype(np.int64))
        meta = {
            "global_step": self.global_step,
            "update_index": self.update_index,
            "param_groups": opt["param_groups"],
            "optim_scalars": scalars,
            "numpy_rng": [kind, int(pos), int(has_gauss), float(cached)],
            "normalizer": self.normalizer.state() if self.normalizer else None,
        }
        return TrainState(tensors, meta)

    def load_state_dict(self, state: TrainState) -> None:
        """Restore what ``state_dict`` captured; the next update is then bit-identical."""
        t, meta = state.tensors, state.meta
        opt_state: dict[int, dict[str, Any]] = {}
        for name, value in t.items():
            if name.startswith("optim."):
                _, idx, key = name.split(".", 2)
                opt_state.setdefault(int(idx), {})[key] = value
        for idx, scalars in meta["optim_scalars"].items():
            opt_state.setdefault(int(idx), {}).update(scalars)
        try:
            self.optimizer.load_state_dict(
                {"state": opt_state, "param_groups": meta["param_groups"]}
            )
        except ValueError as exc:
            raise LoupeError(f"saved optimiser state does not fit this policy ({exc})") from None
        self.generator.set_state(t["rng.generator"])
        torch.set_rng_state(t["rng.torch"])
        if "rng.cuda" in t and self.device.type == "cuda":
            torch.cuda.set_rng_state(t["rng.cuda"], self.device)
        kind, pos, has_gauss, cached = meta["numpy_rng"]
        keys = t["rng.numpy_keys"].numpy().astype(np.uint32)
        np.random.set_state((kind, keys, pos, has_gauss, cached))
        if self.normalizer is not None and meta.get("normalizer"):
            self.normalizer.load(meta["normalizer"])
        self.global_step = int(meta["global_step"])
        self.update_index = int(meta["update_index"])
