"""GAE and the PPO loss against independent per-sample references; learner state; presets."""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch

from attention import build_policy
from learner import PPOConfig, PPOLearner, Rollout, compute_gae, ppo_loss
from loupe.errors import LoupeError


def gae_reference(rewards, values, dones, last_value, gamma, lam):
    """Per env, per episode segment: A_t = sum_k (gamma lam)^k delta_{t+k} within the segment."""
    T, N = rewards.shape
    adv = np.zeros((T, N))
    for n in range(N):
        for t in range(T):
            total, discount = 0.0, 1.0
            for u in range(t, T):
                next_v = last_value[n] if u == T - 1 else values[u + 1, n]
                if dones[u, n]:
                    next_v = 0.0
                delta = rewards[u, n] + gamma * next_v - values[u, n]
                total += discount * delta
                if dones[u, n]:
                    break
                discount *= gamma * lam
            adv[t, n] = total
    return adv, adv + values


@pytest.mark.unit
def test_gae_matches_reference_with_episode_ends():
    rng = np.random.default_rng(0)
    T, N = 17, 5
    rewards = rng.normal(size=(T, N)).astype(np.float32)
    values = rng.normal(size=(T, N)).astype(np.float32)
    dones = rng.random((T, N)) < 0.2
    last = rng.normal(size=N).astype(np.float32)
    adv, ret = compute_gae(rewards, values, dones, last, 0.99, 0.95)
    ref_adv, ref_ret = gae_reference(rewards, values, dones, last, 0.99, 0.95)
    np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, ref_ret, rtol=1e-5, atol=1e-5)


@pytest.mark.unit
def test_gae_closed_form_constant_reward():
    # r = 1, V = 0, no episode end, last value 0: A_t = sum_{k < T-t} (gamma lam)^k
    T, g, lam = 10, 0.9, 0.8
    adv, _ = compute_gae(np.ones((T, 1)), np.zeros((T, 1)), np.zeros((T, 1), bool), [0.0], g, lam)
    x = g * lam
    expected = [(1 - x ** (T - t)) / (1 - x) for t in range(T)]
    np.testing.assert_allclose(adv[:, 0], expected, rtol=1e-6)


def loss_reference(logits, value, attn_h, mb, clip, cfg):
    """Per-sample loops, written out from the PPO paper's definitions."""
    B = logits.shape[0]
    adv = mb["advantages"].double()
    if cfg.norm_adv:
        mean = adv.sum() / B
        std = math.sqrt(float(((adv - mean) ** 2).sum()) / (B - 1))
        adv = (adv - mean) / (std + 1e-8)
    pg = vl = ent = 0.0
    for i in range(B):
        p = torch.softmax(logits[i].double(), 0)
        logp = math.log(p[mb["actions"][i]])
        ratio = math.exp(logp - float(mb["logprobs"][i]))
        a = float(adv[i])
        pg += max(-a * ratio, -a * min(max(ratio, 1 - clip), 1 + clip))
        ent += -float((p * p.log()).sum())
        v, ret, old = float(value[i]), float(mb["returns"][i]), float(mb["values"][i])
        if cfg.clip_vloss:
            vc = old + min(max(v - old, -clip), clip)
            vl += 0.5 * max((v - ret) ** 2, (vc - ret) ** 2)
        else:
            vl += 0.5 * (v - ret) ** 2
    loss = pg / B - cfg.ent_coef * ent / B + cfg.vf_coef * vl / B
    if attn_h is not None:
        loss += cfg.attn_coef * float(attn_h.double().mean())
    return loss


@pytest.mark.unit
@pytest.mark.parametrize("clip_vloss", [True, False])
@pytest.mark.parametrize("attn", [None, 0.003])
def test_ppo_loss_matches_per_sample_reference(clip_vloss, attn):
    torch.manual_seed(0)
    B, A = 12, 5
    cfg = PPOConfig(clip_vloss=clip_vloss, attn_coef=attn or 0.0, vf_coef=0.7, ent_coef=0.02)
    out = types.SimpleNamespace(
        logits=torch.randn(B, A),
        value=torch.randn(B),
        attention_entropy=torch.rand(B) * 7 if attn else None,
    )
    mb = {
        "actions": torch.randint(0, A, (B,)),
        "logprobs": torch.log(torch.rand(B) * 0.5 + 0.1),
        "values": torch.randn(B),
        "advantages": torch.randn(B),
        "returns": torch.randn(B),
    }
    loss, stats = ppo_loss(out, mb, 0.2, cfg)
    ref = loss_reference(out.logits, out.value, out.attention_entropy, mb, 0.2, cfg)
    assert abs(float(loss) - ref) < 1e-5
    assert ("attn_entropy" in stats) == (attn is not None)


def tiny_rollout(policy, T=8, N=4, seed=0):
    rng = np.random.default_rng(seed)
    obs = rng.integers(0, 256, size=(T, N, *policy.obs_shape), dtype=np.uint8)
    with torch.no_grad():
        out = policy(torch.from_numpy(obs.reshape(T * N, *policy.obs_shape)))
        logp = torch.log_softmax(out.logits, -1)
    actions = rng.integers(0, policy.n_actions, size=(T, N))
    logprobs = logp[torch.arange(T * N), torch.from_numpy(actions.reshape(-1))].reshape(T, N)
    return Rollout(
        obs=obs,
        actions=actions.astype(np.int64),
        logprobs=logprobs.numpy().astype(np.float32),
        values=out.value.reshape(T, N).numpy(),
        rewards=rng.normal(size=(T, N)).astype(np.float32),
        dones=rng.random((T, N)) < 0.1,
        last_obs=obs[-1],
        last_value=np.zeros(N, np.float32),
        level_seeds=np.full((T, N), -1),
    )


@pytest.mark.unit
def test_update_lowers_the_loss_on_its_batch():
    torch.manual_seed(0)
    policy = build_policy("sun-na", (4, 84, 84), 4)
    # Adam's first steps move every weight by ~lr whatever its gradient, so a small lr keeps the
    # update inside the region where the loss is locally linear
    cfg = PPOConfig(num_envs=4, num_steps=8, num_minibatches=1, update_epochs=4, lr=3e-5,
                    norm_adv=False, total_steps=10_000)  # fmt: skip
    rollout = tiny_rollout(policy)
    adv, ret = compute_gae(rollout.rewards, rollout.values, rollout.dones, rollout.last_value,
                           cfg.gamma, cfg.gae_lambda)  # fmt: skip
    mb = {
        "actions": torch.from_numpy(rollout.actions.reshape(-1)),
        "logprobs": torch.from_numpy(rollout.logprobs.reshape(-1)),
        "values": torch.from_numpy(rollout.values.reshape(-1)),
        "advantages": torch.from_numpy(adv.reshape(-1)),
        "returns": torch.from_numpy(ret.reshape(-1)),
    }
    obs = torch.from_numpy(rollout.obs.reshape(32, 4, 84, 84))
    with torch.no_grad():
        before, _ = ppo_loss(policy(obs), mb, cfg.clip_coef, cfg)
    learner = PPOLearner(policy, cfg)
    stats = learner.update(rollout)
    with torch.no_grad():
        after, _ = ppo_loss(policy(obs), mb, cfg.clip_coef, cfg)
    assert float(after) < float(before)
    assert learner.global_step == 32 and learner.update_index == 1
    assert stats["approx_kl"] >= 0 and 0 <= stats["clipfrac"] <= 1


@pytest.mark.unit
def test_attention_entropy_term_reduces_attention_entropy():
    torch.manual_seed(0)
    policy = build_policy("region", (4, 84, 84), 4)
    cfg = PPOConfig(num_envs=4, num_steps=8, num_minibatches=1, update_epochs=1, lr=1e-3,
                    ent_coef=0, vf_coef=0, attn_coef=1.0, total_steps=10_000)  # fmt: skip
    rollout = tiny_rollout(policy)
    rollout.rewards[:] = 0
    obs = torch.from_numpy(rollout.obs.reshape(32, 4, 84, 84))
    with torch.no_grad():
        h0 = policy(obs).attention_entropy.mean()
    learner = PPOLearner(policy, cfg)
    for _ in range(5):
        learner.update(rollout)
    with torch.no_grad():
        h1 = policy(obs).attention_entropy.mean()
    assert float(h1) < float(h0) - 1e-3


@pytest.mark.unit
def test_lr_and_clip_annealing():
    cfg = PPOConfig.preset("atari-sun", num_envs=2, num_steps=8, num_minibatches=2,
                           total_steps=64)  # fmt: skip
    learner = PPOLearner(build_policy("sun-na", (4, 84, 84), 4), cfg)
    lrs, clips = [], []
    for _ in range(cfg.num_updates):
        lr, clip = learner._schedule()
        lrs.append(lr)
        clips.append(clip)
        learner.update_index += 1
    np.testing.assert_allclose(lrs, [2.5e-4 * (1 - i / 4) for i in range(4)])
    np.testing.assert_allclose(clips, [0.1 * (1 - i / 4) for i in range(4)])


@pytest.mark.unit
def test_presets_and_bad_values():
    p = PPOConfig.preset("procgen")
    assert (p.num_envs, p.num_steps, p.batch_size, p.minibatch_size) == (64, 256, 16384, 2048)
    assert p.gamma == 0.999 and p.lr == 5e-4 and p.normalize_rewards
    n = PPOConfig.preset("atari-nikulin")
    assert (n.batch_size, n.minibatch_size, n.update_epochs) == (1024, 256, 4)
    s = PPOConfig.preset("atari-sun")
    assert s.minibatch_size == 256 and s.vf_coef == 1.0 and not s.clip_vloss and s.anneal_clip
    with pytest.raises(LoupeError, match="procgen"):
        PPOConfig.preset("mujoco")
    with pytest.raises(LoupeError, match="minibatches"):
        PPOConfig(num_envs=3, num_steps=5, num_minibatches=4)
    with pytest.raises(LoupeError, match="total_steps"):
        PPOConfig(total_steps=0)


@pytest.mark.unit
def test_ppo_learns_a_contextual_bandit():
    """Reward 1 for action (image brightness > 0.5), else 0: the policy must learn the rule."""
    torch.manual_seed(0)
    policy = build_policy("sun-na", (4, 84, 84), 2)
    cfg = PPOConfig(num_envs=16, num_steps=4, num_minibatches=2, update_epochs=4, lr=1e-4,
                    anneal_lr=False, ent_coef=0.01, gamma=0.9, total_steps=10**6)  # fmt: skip
    learner = PPOLearner(policy, cfg)
    rng = np.random.default_rng(0)

    def frames(n):
        bright = rng.random(n) < 0.5
        obs = np.where(bright[:, None, None, None], 200, 30).astype(np.uint8)
        return np.broadcast_to(obs, (n, 4, 84, 84)).copy(), bright.astype(np.int64)

    def correct_rate():
        obs, target = frames(256)
        with torch.no_grad():
            p = torch.softmax(policy(torch.from_numpy(obs)).logits, -1).numpy()
        return float(p[np.arange(256), target].mean())

    before = correct_rate()
    for _ in range(80):
        obs, target = frames(64)
        with torch.no_grad():
            out = policy(torch.from_numpy(obs))
            logp_all = torch.log_softmax(out.logits, -1)
        actions = torch.multinomial(logp_all.exp(), 1).squeeze(1).numpy()
        rollout = Rollout(
            obs=obs.reshape(4, 16, 4, 84, 84),
            actions=actions.reshape(4, 16),
            logprobs=logp_all[np.arange(64), actions].numpy().reshape(4, 16),
            values=out.value.numpy().reshape(4, 16),
            rewards=(actions == target).astype(np.float32).reshape(4, 16),
            dones=np.ones((4, 16), bool),  # one-step episodes
            last_obs=obs[:16],
            last_value=np.zeros(16, np.float32),
            level_seeds=np.full((4, 16), -1),
        )
        learner.update(rollout)
    after = correct_rate()
    assert before < 0.6 and after > 0.75, (before, after)
