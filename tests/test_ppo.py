"""The PPO loss against per-sample references, the learner's update, schedules, presets and the
reward normaliser. Tiny policies keep this fast; one test uses a real attention policy."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn

from learner import PPOConfig, PPOLearner, RewardNormalizer, Rollout, compute_gae, ppo_loss
from loupe.errors import LoupeError

OBS = (2, 5, 5)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny networks run fastest on one thread (and spin least on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclasses.dataclass
class Out:
    """Stands in for attention.PolicyOutput."""

    logits: torch.Tensor
    value: torch.Tensor
    attention: torch.Tensor | None = None
    attention_entropy: torch.Tensor | None = None


class TinyPolicy(nn.Module):
    """A policy of the loupe interface small enough for many updates in a test: uint8 obs scaled by
    1/255, optionally weighted by two softmax attention maps over the H x W positions, then a
    one-hidden-layer MLP with policy and value heads."""

    def __init__(self, obs_shape=OBS, n_actions=3, attention=False, hidden=16):
        super().__init__()
        c, h, w = obs_shape
        self.obs_shape, self.n_actions, self.has_attention = tuple(obs_shape), n_actions, attention
        self.attn = nn.Conv2d(c, 2, 1) if attention else None
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, hidden), nn.Tanh())
        self.pi = nn.Linear(hidden, n_actions)
        self.v = nn.Linear(hidden, 1)

    @property
    def spec(self):
        return {
            "name": "tiny",
            "options": {"attention": self.has_attention},
            "obs_shape": list(self.obs_shape),
            "n_actions": self.n_actions,
        }

    def forward(self, obs):
        x = obs.float() / 255.0 if obs.dtype == torch.uint8 else obs  # (N, C, H, W)
        attn = entropy = None
        if self.attn is not None:
            n, _, h, w = x.shape
            attn = torch.softmax(self.attn(x).flatten(2), -1).view(n, 2, h, w)  # (N, 2, H, W)
            p = attn + 1e-7
            entropy = -(p * p.log()).sum((2, 3)).sum(1)  # (N,)
            x = x * attn.sum(1, keepdim=True) * (h * w / 2)
        z = self.body(x)  # (N, hidden)
        return Out(self.pi(z), self.v(z).squeeze(-1), attn, entropy)


def build_tiny(name, obs_shape, n_actions, **options):
    """A build_policy of the registry's signature that knows only "tiny"."""
    if name != "tiny":
        raise LoupeError(f"unknown policy {name!r}; policies: tiny")
    return TinyPolicy(obs_shape, n_actions, **options)


def tiny_rollout(policy, T=8, N=4, seed=0, p_done=0.1):
    """A batch sampled from ``policy`` on random observations with random rewards."""
    rng = np.random.default_rng(seed)
    obs = rng.integers(0, 256, size=(T, N, *policy.obs_shape), dtype=np.uint8)
    with torch.no_grad():
        out = policy(torch.from_numpy(obs.reshape(T * N, *policy.obs_shape)))
        logp = torch.log_softmax(out.logits, -1)
    actions = torch.multinomial(logp.exp(), 1, generator=torch.Generator().manual_seed(seed))
    logprobs = logp.gather(1, actions).reshape(T, N)
    return Rollout(
        obs=obs,
        actions=actions.reshape(T, N).numpy().astype(np.int64),
        logprobs=logprobs.numpy().astype(np.float32),
        values=out.value.reshape(T, N).numpy().astype(np.float32),
        rewards=rng.normal(size=(T, N)).astype(np.float32),
        dones=rng.random((T, N)) < p_done,
        last_obs=obs[-1],
        last_value=rng.normal(size=N).astype(np.float32),
        level_seeds=np.full((T, N), -1, dtype=np.int64),
    )


def small_cfg(**over):
    base = dict(num_envs=4, num_steps=8, num_minibatches=2, update_epochs=2, total_steps=1000)
    return PPOConfig(**{**base, **over})


def flat_batch(rollout, cfg):
    """The whole rollout as one minibatch, GAE with the config's gamma and lambda."""
    adv, ret = compute_gae(rollout.rewards, rollout.values, rollout.dones, rollout.last_value,
                           cfg.gamma, cfg.gae_lambda)  # fmt: skip
    mb = {
        "actions": rollout.actions.reshape(-1),
        "logprobs": rollout.logprobs.reshape(-1),
        "values": rollout.values.reshape(-1),
        "advantages": adv.reshape(-1),
        "returns": ret.reshape(-1),
    }
    obs = torch.from_numpy(rollout.obs.reshape(-1, *rollout.obs.shape[2:]))
    return obs, {k: torch.from_numpy(v) for k, v in mb.items()}


# -- the loss ------------------------------------------------------------------------------------


def loss_reference(logits, value, attn_h, mb, clip, cfg):
    """Per-sample loops written from the PPO paper's definitions, in Python floats."""
    B = logits.shape[0]
    adv = [float(a) for a in mb["advantages"]]
    if cfg.norm_adv:
        mean = sum(adv) / B
        std = math.sqrt(sum((a - mean) ** 2 for a in adv) / (B - 1))  # unbiased, as torch.std
        adv = [(a - mean) / (std + 1e-8) for a in adv]
    pg = vl = ent = 0.0
    for i in range(B):
        z = [float(x) for x in logits[i]]
        top = max(z)
        norm = sum(math.exp(x - top) for x in z)
        p = [math.exp(x - top) / norm for x in z]
        behaviour = float(mb["logprobs"][i])
        prox = float(mb["prox_logprobs"][i]) if "prox_logprobs" in mb else behaviour
        ratio = math.exp(math.log(p[int(mb["actions"][i])]) - prox)
        weight = math.exp(prox - behaviour)  # decoupled PPO's pi_prox / pi_behaviour
        pg += weight * max(-adv[i] * ratio, -adv[i] * min(max(ratio, 1 - clip), 1 + clip))
        ent += -sum(q * math.log(q) for q in p)
        v, ret, old = float(value[i]), float(mb["returns"][i]), float(mb["values"][i])
        if cfg.clip_vloss:
            vc = old + min(max(v - old, -clip), clip)
            vl += 0.5 * max((v - ret) ** 2, (vc - ret) ** 2)
        else:
            vl += 0.5 * (v - ret) ** 2
    loss = pg / B - cfg.ent_coef * ent / B + cfg.vf_coef * vl / B
    if attn_h is not None and cfg.attn_coef > 0:
        loss += cfg.attn_coef * sum(float(h) for h in attn_h) / B
    return loss, pg / B, vl / B, ent / B


def random_minibatch(B=12, A=5, seed=0, attention=False):
    g = torch.Generator().manual_seed(seed)
    out = Out(
        logits=torch.randn(B, A, generator=g) * 2,
        value=torch.randn(B, generator=g),
        attention_entropy=torch.rand(B, generator=g) * 7 if attention else None,
    )
    actions = torch.randint(0, A, (B,), generator=g)
    logp = out.logits.log_softmax(-1).gather(1, actions[:, None])[:, 0]
    mb = {
        "actions": actions,
        "logprobs": logp + torch.randn(B, generator=g) * 0.2,  # behaviour: a nearby policy
        "values": torch.randn(B, generator=g),
        "advantages": torch.randn(B, generator=g) * 3 + 1,
        "returns": torch.randn(B, generator=g),
    }
    return out, mb


@pytest.mark.unit
@pytest.mark.parametrize("clip_vloss", [True, False])
@pytest.mark.parametrize("attn_coef", [0.0, 0.003])
@pytest.mark.parametrize("norm_adv", [True, False])
def test_ppo_loss_matches_per_sample_reference(clip_vloss, attn_coef, norm_adv):
    cfg = PPOConfig(clip_vloss=clip_vloss, attn_coef=attn_coef, norm_adv=norm_adv, vf_coef=0.7,
                    ent_coef=0.02)  # fmt: skip
    out, mb = random_minibatch(attention=attn_coef > 0)
    loss, stats = ppo_loss(out, mb, 0.15, cfg)
    ref, pg, vl, ent = loss_reference(out.logits, out.value, out.attention_entropy, mb, 0.15, cfg)
    assert float(loss) == pytest.approx(ref, abs=1e-5)
    assert float(stats["policy_loss"]) == pytest.approx(pg, abs=1e-5)
    assert float(stats["value_loss"]) == pytest.approx(vl, abs=1e-5)
    assert float(stats["entropy"]) == pytest.approx(ent, abs=1e-5)
    assert ("attn_entropy" in stats) == (attn_coef > 0)
    newlogp = out.logits.log_softmax(-1).gather(1, mb["actions"][:, None])[:, 0]
    outside = ((newlogp - mb["logprobs"]).exp() - 1).abs() > 0.15
    assert float(stats["clipfrac"]) == pytest.approx(float(outside.float().mean()))
    assert 0 < float(stats["clipfrac"]) < 1  # the random batch exercises both branches


@pytest.mark.unit
def test_decoupled_loss_matches_per_sample_reference_and_reduces_to_ppo():
    cfg = PPOConfig(proximal="learner")
    out, mb = random_minibatch()
    g = torch.Generator().manual_seed(1)
    mb["prox_logprobs"] = mb["logprobs"] + torch.randn(12, generator=g) * 0.3
    loss, stats = ppo_loss(out, mb, 0.15, cfg)
    ref, pg, _, _ = loss_reference(out.logits, out.value, None, mb, 0.15, cfg)
    assert float(loss) == pytest.approx(ref, abs=1e-5)
    assert float(stats["policy_loss"]) == pytest.approx(pg, abs=1e-5)
    classic, _ = ppo_loss(out, {k: v for k, v in mb.items() if k != "prox_logprobs"}, 0.15, cfg)
    assert abs(float(loss) - float(classic)) > 1e-3  # the anchor matters when the two differ
    same = dict(mb, prox_logprobs=mb["logprobs"].clone())  # proximal == behaviour: plain PPO
    assert float(ppo_loss(out, same, 0.15, cfg)[0]) == pytest.approx(float(classic), abs=1e-6)


@pytest.mark.unit
def test_attention_term_at_uniform_attention_is_coef_times_2_ln_49():
    # two uniform 7x7 maps: summed entropy 2 ln 49 per sample (METHODS A)
    out, mb = random_minibatch()
    out.attention_entropy = torch.full((12,), 2 * math.log(49))
    base, _ = ppo_loss(out, mb, 0.2, PPOConfig(attn_coef=0.0))
    with_term, stats = ppo_loss(out, mb, 0.2, PPOConfig(attn_coef=0.005))
    assert float(with_term - base) == pytest.approx(0.005 * 7.784, abs=1e-3)
    assert float(stats["attn_entropy"]) == pytest.approx(2 * math.log(49), abs=1e-5)


@pytest.mark.unit
def test_attention_coefficient_needs_an_attention_policy():
    out, mb = random_minibatch()
    with pytest.raises(LoupeError, match="attn_coef"):
        ppo_loss(out, mb, 0.2, PPOConfig(attn_coef=0.001))
    with pytest.raises(LoupeError, match="tiny has none"):
        PPOLearner(TinyPolicy(), small_cfg(attn_coef=0.001))


# -- the learner ---------------------------------------------------------------------------------


@pytest.mark.unit
def test_one_update_lowers_the_loss_on_its_batch():
    torch.manual_seed(0)
    policy = TinyPolicy()
    # a small lr keeps Adam's first steps (about lr per weight) where the loss is locally linear
    cfg = small_cfg(num_minibatches=1, update_epochs=4, lr=3e-4, norm_adv=False)
    rollout = tiny_rollout(policy)
    obs, mb = flat_batch(rollout, cfg)
    with torch.no_grad():
        before, s0 = ppo_loss(policy(obs), mb, cfg.clip_coef, cfg)
    learner = PPOLearner(policy, cfg)
    stats = learner.update(rollout)
    with torch.no_grad():
        after, s1 = ppo_loss(policy(obs), mb, cfg.clip_coef, cfg)
    assert float(after) < float(before) - 1e-4
    assert float(s1["policy_loss"]) < float(s0["policy_loss"])
    assert learner.global_step == 32 and learner.update_index == 1
    for key in ("policy_loss", "value_loss", "entropy", "approx_kl", "clipfrac",
                "explained_variance", "lr", "clip_coef", "grad_norm"):  # fmt: skip
        assert math.isfinite(stats[key]), key
    assert stats["approx_kl"] >= 0 and 0 <= stats["clipfrac"] <= 1
    assert "attn_entropy" not in stats


@pytest.mark.unit
def test_decoupled_update_equals_ppo_at_lag_0_and_differs_on_a_stale_batch():
    def updated(proximal: str, rollout_from=None, version=0, done=0):
        torch.manual_seed(0)
        policy = TinyPolicy()
        rollout = tiny_rollout(rollout_from or policy)
        rollout.policy_version = version
        learner = PPOLearner(policy, small_cfg(proximal=proximal))
        learner.update_index = done  # updates the learner has made before this one
        stats = learner.update(rollout)
        return torch.cat([p.detach().flatten() for p in policy.parameters()]), stats

    classic, stats = updated("behaviour")
    assert stats["decoupled"] == 0.0
    decoupled, stats = updated("learner")
    torch.testing.assert_close(decoupled, classic, atol=1e-6, rtol=0)  # lag 0: the same update
    assert stats["behaviour_weight_max"] == pytest.approx(1.0, abs=1e-5)
    auto, stats = updated("auto", version=3, done=3)  # sampled by the learner's own weights
    assert stats["decoupled"] == 0.0
    assert torch.equal(auto, updated("behaviour", version=3, done=3)[0])
    torch.manual_seed(1)
    stale = TinyPolicy()  # sampled by other weights than the learner's: lag >= 1
    classic, _ = updated("behaviour", stale)
    decoupled, stats = updated("learner", stale)
    assert float((decoupled - classic).abs().max()) > 1e-4
    assert stats["behaviour_kl"] > 0 and stats["behaviour_weight_max"] > 1
    auto, stats = updated("auto", stale, version=2, done=3)  # one version behind: decoupled
    assert stats["decoupled"] == 1.0
    assert torch.equal(auto, updated("learner", stale, version=2, done=3)[0])


@pytest.mark.unit
def test_every_sample_is_used_once_per_epoch_with_its_own_targets():
    """Sample i's observation carries its id; the minibatches of an epoch must partition the batch
    and keep each observation with its action and advantage."""
    cfg = small_cfg(num_minibatches=4, update_epochs=3)
    policy = TinyPolicy()
    rollout = tiny_rollout(policy)
    T, N = rollout.actions.shape
    rollout.obs[:] = np.arange(T * N, dtype=np.uint8).reshape(T, N, 1, 1, 1)
    rollout.actions[:] = np.arange(T * N).reshape(T, N) % 3
    learner = PPOLearner(policy, cfg)
    seen: list[tuple[np.ndarray, np.ndarray]] = []
    step = learner._step

    def recording_step(obs, mb, clip):
        # copies: the minibatch tensors are buffers the learner refills for the next minibatch
        seen.append((obs[:, 0, 0, 0].numpy().astype(int), mb["actions"].numpy().copy()))
        return step(obs, mb, clip)

    learner._step = recording_step
    learner.update(rollout)
    assert len(seen) == cfg.update_epochs * cfg.num_minibatches
    for epoch in range(cfg.update_epochs):
        ids = np.concatenate([s[0] for s in seen[epoch * 4 : epoch * 4 + 4]])
        assert sorted(ids) == list(range(T * N))
        assert all(len(s[0]) == cfg.minibatch_size for s in seen)
    for ids, actions in seen:
        np.testing.assert_array_equal(actions, ids % 3)
    first_epoch = np.concatenate([s[0] for s in seen[:4]])
    assert not np.array_equal(first_epoch, np.arange(T * N))  # shuffled


@pytest.mark.unit
def test_a_rollout_of_the_wrong_size_is_refused():
    policy = TinyPolicy()
    learner = PPOLearner(policy, small_cfg())
    with pytest.raises(LoupeError, match=r"does not match the PPO config \(8, 4\)"):
        learner.update(tiny_rollout(policy, T=8, N=2))


@pytest.mark.unit
def test_ppo_learns_a_contextual_bandit():
    """Reward 1 for the action equal to the image's brightness bit, else 0: PPO must learn it."""
    torch.manual_seed(0)
    policy = TinyPolicy(obs_shape=(1, 4, 4), n_actions=2, hidden=8)
    cfg = small_cfg(num_envs=16, num_steps=4, num_minibatches=2, update_epochs=4, lr=3e-3,
                    anneal_lr=False, gamma=0.9, total_steps=10**6)  # fmt: skip
    learner = PPOLearner(policy, cfg)
    rng = np.random.default_rng(0)

    def frames(n):
        bright = rng.random(n) < 0.5
        obs = np.where(bright, 200, 30).astype(np.uint8)[:, None, None, None]
        return np.broadcast_to(obs, (n, 1, 4, 4)).copy(), bright.astype(np.int64)

    def correct_rate():
        obs, target = frames(256)
        with torch.no_grad():
            p = torch.softmax(policy(torch.from_numpy(obs)).logits, -1).numpy()
        return float(p[np.arange(256), target].mean())

    before = correct_rate()
    for _ in range(40):
        obs, target = frames(64)
        with torch.no_grad():
            out = policy(torch.from_numpy(obs))
            logp_all = torch.log_softmax(out.logits, -1)
        actions = torch.multinomial(logp_all.exp(), 1).squeeze(1).numpy()
        learner.update(
            Rollout(
                obs=obs.reshape(4, 16, 1, 4, 4),
                actions=actions.reshape(4, 16),
                logprobs=logp_all[np.arange(64), actions].numpy().reshape(4, 16),
                values=out.value.numpy().reshape(4, 16),
                rewards=(actions == target).astype(np.float32).reshape(4, 16),
                dones=np.ones((4, 16), bool),  # one-step episodes
                last_obs=obs[:16],
                last_value=np.zeros(16, np.float32),
                level_seeds=np.full((4, 16), -1),
            )
        )
    after = correct_rate()
    assert before < 0.6 and after > 0.9, (before, after)


@pytest.mark.unit
def test_real_attention_policy_trains_its_attention_entropy_down():
    attention = pytest.importorskip("attention", reason="the attention package is not there yet")
    torch.manual_seed(0)
    policy = attention.build_policy("region", (4, 84, 84), 4)
    cfg = PPOConfig(num_envs=2, num_steps=4, num_minibatches=1, update_epochs=1, lr=1e-3,
                    ent_coef=0, vf_coef=0, attn_coef=1.0, total_steps=10_000)  # fmt: skip
    rollout = tiny_rollout(policy, T=4, N=2)
    rollout.rewards[:] = 0
    obs = torch.from_numpy(rollout.obs.reshape(8, 4, 84, 84))
    with torch.no_grad():
        h0 = float(policy(obs).attention_entropy.mean())
    learner = PPOLearner(policy, cfg)
    stats = [learner.update(rollout) for _ in range(3)]
    with torch.no_grad():
        h1 = float(policy(obs).attention_entropy.mean())
    assert stats[0]["attn_entropy"] == pytest.approx(h0, rel=1e-4)
    assert h1 < h0 - 1e-3


# -- schedules and presets -------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    "preset,lr_annealed,clip_annealed",
    [("atari-sun", True, True), ("atari-nikulin", True, False), ("procgen", False, False)],
)
def test_lr_and_clip_schedules(preset, lr_annealed, clip_annealed):
    cfg = PPOConfig.preset(preset, num_envs=2, num_steps=8, num_minibatches=2, total_steps=64)
    assert cfg.num_updates == 4
    learner = PPOLearner(TinyPolicy(), cfg)
    got = []
    for _ in range(cfg.num_updates):
        got.append(learner.schedule())
        learner.update_index += 1
    fracs = [1 - i / 4 for i in range(4)]
    lr0, clip0 = PPOConfig.preset(preset).lr, PPOConfig.preset(preset).clip_coef
    np.testing.assert_allclose(
        [g[0] for g in got], [lr0 * (f if lr_annealed else 1) for f in fracs]
    )
    np.testing.assert_allclose(
        [g[1] for g in got], [clip0 * (f if clip_annealed else 1) for f in fracs]
    )


@pytest.mark.unit
def test_update_applies_and_reports_the_schedule():
    policy = TinyPolicy()
    cfg = small_cfg(anneal_lr=True, anneal_clip=True, lr=1e-3, clip_coef=0.2, total_steps=64)
    learner = PPOLearner(policy, cfg)
    first = learner.update(tiny_rollout(policy, seed=0))
    second = learner.update(tiny_rollout(policy, seed=1))
    assert (first["lr"], first["clip_coef"]) == (1e-3, 0.2)
    assert second["lr"] == pytest.approx(5e-4) and second["clip_coef"] == pytest.approx(0.1)
    assert learner.optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)


@pytest.mark.unit
def test_presets_derived_sizes():
    p = PPOConfig.preset("procgen")
    assert (p.num_envs, p.num_steps, p.batch_size, p.minibatch_size) == (64, 256, 16384, 2048)
    assert (p.lr, p.gamma, p.gae_lambda, p.update_epochs) == (5e-4, 0.999, 0.95, 3)
    assert (p.clip_coef, p.ent_coef, p.vf_coef, p.max_grad_norm) == (0.2, 0.01, 0.5, 0.5)
    assert p.normalize_rewards and not p.anneal_lr and p.reward_gamma == 0.99
    n = PPOConfig.preset("atari-nikulin")
    assert (n.batch_size, n.minibatch_size, n.update_epochs, n.num_updates) == (1024, 256, 4, 9766)
    assert n.anneal_lr and not n.anneal_clip and n.clip_vloss and n.adam_eps == 1e-5
    s = PPOConfig.preset("atari-sun")
    assert (s.batch_size, s.minibatch_size, s.num_minibatches) == (2048, 256, 8)
    assert s.vf_coef == 1.0 and not s.clip_vloss and s.anneal_clip and s.clip_coef == 0.1
    o = PPOConfig.preset("atari-sun", num_envs=8, attn_coef=0.001)
    assert (o.batch_size, o.minibatch_size, o.attn_coef) == (1024, 128, 0.001)


@pytest.mark.unit
def test_bad_settings_are_refused_in_one_line():
    cases = [
        (lambda: PPOConfig.preset("mujoco"), "presets: procgen, atari-nikulin, atari-sun"),
        (lambda: PPOConfig.preset("procgen", lr_decay=1), "unknown PPO setting"),
        (lambda: PPOConfig(num_envs=3, num_steps=5, num_minibatches=4), "minibatches"),
        (lambda: PPOConfig(total_steps=0), "total_steps must be positive"),
        (lambda: PPOConfig(num_steps=-1), "num_steps must be positive"),
        (lambda: PPOConfig(gamma=1.5), "gamma"),
        (lambda: PPOConfig(ent_coef=-0.1), "ent_coef"),
        (lambda: PPOConfig(proximal="old"), "proximal must be 'auto', 'behaviour' or 'learner'"),
    ]
    for make, message in cases:
        with pytest.raises(LoupeError, match=message) as err:
            make()
        assert "\n" not in str(err.value)


# -- reward normalisation --------------------------------------------------------------------------


def normalizer_reference(chunks, gamma, clip, eps=1e-8):
    """Returns per env, restarted after an episode end; the variance of all returns so far pooled
    with a pseudo-sample of weight 1e-4, mean 0, variance 1, in closed form."""
    c = 1e-4
    seen: list[float] = []
    out = []
    ret = None
    for rewards, dones in chunks:
        scaled = np.zeros(rewards.shape)
        ret = np.zeros(rewards.shape[1]) if ret is None else ret
        for t in range(rewards.shape[0]):
            for n in range(rewards.shape[1]):
                ret[n] = ret[n] * gamma + rewards[t, n]
            seen.extend(ret.tolist())
            x = np.array(seen)
            mean = x.sum() / (len(x) + c)
            var = (c * 1.0 + (x**2).sum()) / (len(x) + c) - mean**2
            for n in range(rewards.shape[1]):
                scaled[t, n] = min(max(rewards[t, n] / math.sqrt(var + eps), -clip), clip)
                if dones[t, n]:
                    ret[n] = 0.0
        out.append(scaled)
    return out


@pytest.mark.unit
def test_reward_normalizer_matches_the_closed_form_and_resumes():
    rng = np.random.default_rng(0)
    chunks = [(rng.normal(size=(6, 3)) * 5, rng.random((6, 3)) < 0.3) for _ in range(3)]
    ref = normalizer_reference(chunks, 0.99, 2.0)
    norm = RewardNormalizer(3, 0.99, clip=2.0)
    first = norm(*chunks[0])
    np.testing.assert_allclose(first, ref[0], rtol=1e-5)
    assert first.max() == 2.0 and first.min() == -2.0  # both clip bounds are reached
    resumed = RewardNormalizer(3, 0.99, clip=2.0)
    resumed.load(norm.state())
    np.testing.assert_allclose(resumed(*chunks[1]), ref[1], rtol=1e-5)
    np.testing.assert_allclose(norm(*chunks[1]), ref[1], rtol=1e-5)
    np.testing.assert_allclose(norm(*chunks[2]), ref[2], rtol=1e-5)
    with pytest.raises(LoupeError, match="tracks 3 envs"):
        RewardNormalizer(4, 0.99).load(norm.state())


@pytest.mark.unit
def test_learner_normalises_rewards_with_the_reward_discount():
    """With normalisation on, the learner's returns are GAE over the normaliser's scaled rewards."""
    policy = TinyPolicy()
    cfg = small_cfg(normalize_rewards=True, reward_norm_gamma=0.9, gamma=0.999)
    learner = PPOLearner(policy, cfg)
    rollout = tiny_rollout(policy)
    rollout.rewards *= 30
    scaled = RewardNormalizer(4, 0.9)(rollout.rewards, rollout.dones)
    _, flat = learner._flatten(rollout)
    _, ret = compute_gae(scaled, rollout.values, rollout.dones, rollout.last_value, 0.999, 0.95)
    np.testing.assert_allclose(flat["returns"].numpy(), ret.reshape(-1), rtol=1e-6)
    assert learner.normalizer.gamma == 0.9 and learner.normalizer.count > 32
