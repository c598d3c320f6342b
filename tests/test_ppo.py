"""ppo.py: the math against hand computations and brute force, then the loop on tiny models."""
import copy
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import countdown
import model as M
import ppo
from plumbing import files, memory, ppo_config, ppo_run, runs
from conftest import ROOT, make_checkpoint, make_config
from plumbing.device import CPU_FALLBACK_MAX_PARAMS, param_count, refuse_cpu_fallback


# -----------------------------------------------------------------------------
# GAE, whitening, rewards


def _mask(lengths, R):
    return (torch.arange(R)[None, :] < torch.tensor(lengths)[:, None]).float()


def test_gae_equals_return_to_go_at_gamma_lambda_1():
    torch.manual_seed(0)
    R, lengths = 7, [3, 7, 1, 5]                         # row 1 is truncated (L = R)
    mask = _mask(lengths, R)
    rewards = torch.randn(4, R) * mask
    values = torch.randn(4, R) * 3                        # garbage after the EOS on purpose
    adv, ret = ppo.compute_gae(rewards, values, mask, gamma=1.0, lam=1.0)
    for i, L in enumerate(lengths):
        for t in range(R):
            if t < L:
                g = sum(rewards[i, k].item() for k in range(t, L))          # Monte-Carlo return-to-go
                assert ret[i, t].item() == pytest.approx(g, abs=1e-5)
                assert adv[i, t].item() == pytest.approx(g - values[i, t].item(), abs=1e-5)
            else:
                assert adv[i, t] == 0 and ret[i, t] == 0


def test_gae_lambda_below_one_by_hand():
    # one row: L = 2 of R = 4; the critic says 5 and 7 after the EOS, which must not leak in
    gamma, lam = 0.9, 0.8
    rewards = torch.tensor([[0.5, 1.0, 0.0, 0.0]])
    values = torch.tensor([[0.2, 0.4, 5.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    adv, ret = ppo.compute_gae(rewards, values, mask, gamma, lam)
    a1 = 1.0 + gamma * 0.0 - 0.4                         # the last token bootstraps from V = 0 (terminal)
    a0 = (0.5 + gamma * 0.4 - 0.2) + gamma * lam * a1
    assert adv[0].tolist() == pytest.approx([a0, a1, 0.0, 0.0], abs=1e-6)
    assert ret[0].tolist() == pytest.approx([a0 + 0.2, a1 + 0.4, 0.0, 0.0], abs=1e-6)
    # without zeroing, delta_1 would have used gamma * 5.0: a different (wrong) answer
    assert a1 != pytest.approx(1.0 + gamma * 5.0 - 0.4)


def test_masked_whiten_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, -50.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    mean = 2.5                                           # valid entries 1, 2, 3, 4
    var = ((1.5 ** 2) * 2 + (0.5 ** 2) * 2) / 3          # unbiased: divide by n - 1 = 3
    want = [[(v - mean) / math.sqrt(var + 1e-8) for v in (1.0, 2.0, 3.0)] + [0.0],
            [(4.0 - mean) / math.sqrt(var + 1e-8), 0.0, 0.0, 0.0]]
    assert ppo.masked_whiten(x, mask).tolist()[0] == pytest.approx(want[0], abs=1e-6)
    assert ppo.masked_whiten(x, mask).tolist()[1] == pytest.approx(want[1], abs=1e-6)
    with pytest.raises(ValueError):
        ppo.masked_whiten(x, torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0]]))


def test_reward_sits_on_last_valid_token_including_truncated_rows():
    R = 5
    mask = _mask([2, 5, 1], R)                           # row 1 truncated: no EOS in R tokens
    scores = torch.tensor([1.0, 0.1, 0.0])
    kl = torch.arange(15, dtype=torch.float32).view(3, 5) / 10
    r = ppo.token_level_rewards(scores, kl * mask, mask, kl_coef=0.5)
    want = -0.5 * kl * mask
    want[0, 1] += 1.0
    want[1, 4] += 0.1
    want[2, 0] += 0.0
    assert torch.allclose(r, want)
    r0 = ppo.token_level_rewards(scores, None, mask, kl_coef=0.5)
    assert r0.nonzero().tolist() == [[0, 1], [1, 4]] and r0[0, 1] == 1.0 and r0[1, 4] == pytest.approx(0.1)


def test_grpo_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5])
    a = ppo.grpo_advantages(r, group_size=4)
    std = math.sqrt((0.75 ** 2 + 3 * 0.25 ** 2) / 3)     # unbiased std of (1, 0, 0, 0)
    want = [0.75 / (std + 1e-6)] + [-0.25 / (std + 1e-6)] * 3 + [0.0] * 4
    assert a.tolist() == pytest.approx(want, abs=1e-5)
    with pytest.raises(ValueError):
        ppo.grpo_advantages(r, group_size=1)


# -----------------------------------------------------------------------------
# Losses and KL estimators


def test_policy_loss_by_hand():
    logp = torch.log(torch.tensor([[0.5, 0.9, 0.2]]))
    old = torch.log(torch.tensor([[0.5, 0.6, 0.4]]))     # ratios 1.0, 1.5, 0.5
    adv = torch.tensor([[2.0, 1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0]])
    loss, clipfrac, approx_kl = ppo.policy_loss(logp, old, adv, mask, clip_ratio=0.2)
    per_token = [max(-2.0 * 1.0, -2.0 * 1.0),            # inside the trust region
                 max(-1.0 * 1.5, -1.0 * 1.2),            # A > 0, ratio above 1 + eps: clipped to -1.2
                 max(1.0 * 0.5, 1.0 * 0.8)]              # A < 0, ratio below 1 - eps: clipped to 0.8
    assert loss.item() == pytest.approx(sum(per_token) / 3, abs=1e-6)
    assert clipfrac.item() == pytest.approx(2 / 3)
    assert approx_kl.item() == pytest.approx((old - logp).mean().item(), abs=1e-6)
    loss2, _, _ = ppo.policy_loss(logp, old, adv, mask, 0.2, normalizer=10.0)
    assert loss2.item() == pytest.approx(sum(per_token) / 10, abs=1e-6)


@pytest.mark.parametrize("adv,ratio,grad_sign", [
    (1.0, 1.5, 0),      # A > 0 and already far more likely: clipped, no gradient
    (1.0, 0.5, -1),     # A > 0, less likely: unclipped, the loss falls as logp rises
    (-1.0, 0.5, 0),     # A < 0 and already far less likely: clipped, no gradient
    (-1.0, 1.5, +1),    # A < 0, more likely: unclipped, the loss rises with logp (pushes it down)
    (1.0, 1.1, -1),     # inside the trust region: always a gradient
    (-1.0, 0.9, +1),
])
def test_policy_loss_gradient_outside_and_inside_trust_region(adv, ratio, grad_sign):
    old = torch.tensor([[math.log(0.4)]])
    logp = (old + math.log(ratio)).clone().requires_grad_(True)
    loss, _, _ = ppo.policy_loss(logp, old, torch.tensor([[adv]]), torch.ones(1, 1), clip_ratio=0.2)
    loss.backward()
    g = logp.grad.item()
    if grad_sign == 0:
        assert g == 0.0
    else:
        assert math.copysign(1, g) == grad_sign
        assert g == pytest.approx(-adv * ratio, rel=1e-5)      # d(-A rho)/d logp = -A rho


def test_value_loss_clipping_by_hand():
    values = torch.tensor([[1.0, 0.2, 3.0]], requires_grad=True)
    old = torch.tensor([[0.0, 0.0, 0.0]])
    ret = torch.tensor([[2.0, 1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])               # the third position is not trained
    loss, clipfrac = ppo.value_loss(values, old, ret, mask, clip=0.5)
    # t0: unclipped (1-2)^2 = 1, clipped V = 0.5: (0.5-2)^2 = 2.25 -> max 2.25 (no gradient through V)
    # t1: V = 0.2 within the clip range: both 0.64
    want = 0.5 * (2.25 + 0.64) / 2
    assert loss.item() == pytest.approx(want, abs=1e-6)
    assert clipfrac.item() == pytest.approx(0.5)
    loss.backward()
    assert values.grad.tolist()[0] == pytest.approx([0.0, 0.5 * 2 * (0.2 - 1.0) / 2, 0.0], abs=1e-6)


def test_entropy_by_hand():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [math.log(3.0), 0.0, -1e4, -1e4]])
    p2 = [0.75, 0.25]
    want = [math.log(4), -sum(p * math.log(p) for p in p2)]
    assert ppo.entropy_from_logits(logits).tolist() == pytest.approx(want, abs=1e-6)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert ppo.entropy_bonus(torch.tensor([[1.0, 2.0, 50.0]]), mask).item() == pytest.approx(1.5)


def test_kl_estimators_by_hand():
    logp = torch.log(torch.tensor([0.5, 0.2]))
    ref = torch.log(torch.tensor([0.25, 0.4]))
    d = [math.log(0.5 / 0.25), math.log(0.2 / 0.4)]
    assert ppo.kl_penalty(logp, ref, "k1").tolist() == pytest.approx(d, abs=1e-6)
    assert ppo.kl_penalty(logp, ref, "kl").tolist() == pytest.approx(d, abs=1e-6)
    assert ppo.kl_penalty(logp, ref, "abs").tolist() == pytest.approx([abs(x) for x in d], abs=1e-6)
    assert ppo.kl_penalty(logp, ref, "mse").tolist() == pytest.approx([0.5 * x * x for x in d], abs=1e-6)
    k3 = [0.25 / 0.5 - math.log(0.25 / 0.5) - 1, 0.4 / 0.2 - math.log(0.4 / 0.2) - 1]   # q/p - log(q/p) - 1
    assert ppo.kl_penalty(logp, ref, "k3").tolist() == pytest.approx(k3, abs=1e-6)
    assert ppo.kl_penalty(logp, ref, "low_var_kl").tolist() == pytest.approx(k3, abs=1e-6)
    far = ppo.kl_penalty(torch.tensor([-30.0]), torch.tensor([0.0]), "k3")  # e^30 - 31: clamped
    assert far.item() == 10.0
    with pytest.raises(ValueError):
        ppo.kl_penalty(logp, ref, "k2")


# -----------------------------------------------------------------------------
# Chunked log-probs and the critic


def test_chunked_logprobs_and_entropy_equal_unchunked_with_gradients():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False)
    hidden = torch.randn(3, 5, 8, requires_grad=True)
    targets = torch.randint(0, 11, (3, 5))
    mask = _mask([5, 2, 4], 5)

    full = F.log_softmax(head(hidden) / 0.7, -1)                       # the [B, T, V] reference
    want_lp = full.gather(-1, targets[..., None])[..., 0] * mask
    want_h = -(full.exp() * full).sum(-1) * mask
    (want_lp.sum() + 0.3 * want_h.sum()).backward()
    want_grad = hidden.grad.clone()
    hidden.grad = None
    for chunk in (1, 3, 100):
        lp, h = ppo.token_logprobs(head, hidden, targets, mask, chunk=chunk, temperature=0.7, with_entropy=True)
        assert torch.allclose(lp, want_lp, atol=1e-6) and torch.allclose(h, want_h, atol=1e-5)
        (lp.sum() + 0.3 * h.sum()).backward()
        assert torch.allclose(hidden.grad, want_grad, atol=1e-6)
        hidden.grad = None
    lp_only = ppo.token_logprobs(head, hidden, targets, mask, chunk=2, temperature=0.7)
    assert torch.allclose(lp_only, want_lp, atol=1e-6)


def test_critic_head_init_and_values_masked():
    torch.manual_seed(0)
    backbone = M.Transformer(make_config(vocab_size=50, eos_token_id=0, tie_word_embeddings=False))
    critic = ppo.Critic(backbone, seed=3)
    assert critic.score.bias.item() == 0.0
    assert 0.01 < critic.score.weight.std().item() < 0.03
    assert backbone.lm_head is None                      # an untied LM head is dropped from the critic
    ids = torch.randint(1, 50, (2, 6))
    attn = torch.tensor([[0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])   # P = 3, row 0: left pad, L = 1
    v = ppo.response_values(critic, ids, attn, prompt_len=3, R=3)
    full = critic(ids[:, :5], attn[:, :5])
    assert torch.allclose(v[1], full[1, 2:5])
    assert torch.allclose(v[0, :2], full[0, 2:4])        # V_0 and V_L (the state after the EOS) are kept,
    assert v[0, 2] == 0                                  # states after that (padding) are masked: c_t = m_{t-1}


def test_critic_value_head_is_fp32_on_a_bf16_backbone():
    torch.manual_seed(0)
    backbone = M.Transformer(make_config(vocab_size=50, eos_token_id=0)).to(torch.bfloat16)
    critic = ppo.Critic(backbone, seed=3)
    assert critic.score.weight.dtype == torch.float32 and critic.score.bias.dtype == torch.float32
    with torch.no_grad():
        critic.score.bias.fill_(1.0)                     # values near 1, where bf16 steps are ~0.004-0.008
        ids = torch.randint(1, 50, (2, 5))
        h = backbone.hidden_states(ids).float()
        want = h @ critic.score.weight[0] + 1.0    # the head by hand, in fp32
        v = critic(ids)
    assert v.dtype == torch.float32
    torch.testing.assert_close(v, want, rtol=0, atol=1e-6)


def test_param_count_matches_the_model():
    for kw in [dict(), dict(tie_word_embeddings=False), dict(model_type="qwen2"),
               dict(attention_bias=True, tie_word_embeddings=False)]:
        cfg = make_config(**kw)
        model = M.Transformer(cfg)
        assert param_count(cfg) == sum(p.numel() for p in model.parameters())


# -----------------------------------------------------------------------------
# Optimizer: fp32 master weights


def test_master_weights_let_bf16_weights_learn_at_lr_1e6():
    torch.manual_seed(0)
    w0 = (torch.randn(64) * 0.02).to(torch.bfloat16)
    naive = torch.nn.Parameter(w0.clone())
    opt = torch.optim.AdamW([naive], lr=1e-6, weight_decay=0.0)
    ours = torch.nn.Parameter(w0.clone())
    master = ppo.MasterAdamW([ours], lr=1e-6, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, master_device="cpu")
    for _ in range(200):
        for p in (naive, ours):
            (p.float() * torch.ones(64)).sum().backward()   # gradient 1 everywhere: Adam steps ~ -lr
        opt.step()
        opt.zero_grad()
        master.step(1e-6, max_norm=1e9)
    assert torch.equal(naive.data, w0)                      # every update rounded away in bf16
    moved = master.master[0].data - w0.float()
    assert moved.mean().item() == pytest.approx(-200e-6, rel=0.05)   # the fp32 master moved 200 x 1e-6
    assert not torch.equal(ours.data, w0)                   # and the bf16 copy follows it


def test_master_adamw_sums_micro_batch_gradients_in_fp32():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.bfloat16))
    opt = ppo.MasterAdamW([p], lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, master_device="cpu")
    for g in ([1e-3, 1.0], [1.0, 1e-3]):     # two micro-batches; their bf16 sum would round 1 + 1e-3 to 1
        (p.float() * torch.tensor(g)).sum().backward()
        assert p.grad is None                # folded into the fp32 buffer as soon as it was ready
    assert opt._acc[0].dtype == torch.float32
    assert opt._acc[0].tolist() == pytest.approx([1.001, 1.001], abs=1e-6)


def test_master_adamw_runs_fused_adamw_and_equals_torchs_on_the_same_gradients():
    """The offloaded optimizer is torch's fused AdamW on fp32 masters: bit-equal to torch.optim.AdamW
    (fused) given the same clipped fp32 gradients, and within rounding of the per-tensor loop."""
    torch.manual_seed(0)
    shapes = [(64, 32), (32,), (7, 5, 3)]
    params = [torch.nn.Parameter((torch.randn(s) * 0.02).to(torch.bfloat16)) for s in shapes]
    kw = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    ours = ppo.MasterAdamW(params, master_device="cpu", **kw)
    assert ours.opt.defaults["fused"]
    fused = [torch.nn.Parameter(p.detach().float()) for p in params]
    loop = [torch.nn.Parameter(p.detach().float()) for p in params]
    ref_fused, ref_loop = torch.optim.AdamW(fused, fused=True, **kw), torch.optim.AdamW(loop, foreach=False, **kw)
    for step in range(4):
        grads = [torch.randn(s) * (step + 1) for s in shapes]
        for p, g in zip(params, grads):
            (p.float() * g).sum().backward()        # the bf16 .grad is folded into the fp32 accumulator
        for refs, opt in ((fused, ref_fused), (loop, ref_loop)):
            for r, acc in zip(refs, ours._acc):
                r.grad = acc.clone()
            torch.nn.utils.clip_grad_norm_(refs, 1.0)
            opt.step()
        ours.step(kw["lr"], 1.0)
        for m, f, lp in zip(ours.master, fused, loop):
            assert torch.equal(m.detach(), f.detach())
            torch.testing.assert_close(m.detach(), lp.detach(), rtol=0, atol=1e-6)


def test_master_adamw_skips_non_finite_gradients():
    p = torch.nn.Parameter(torch.ones(3))
    opt = ppo.MasterAdamW([p], lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, master_device="cpu")
    (p * torch.tensor([1.0, float("nan"), 1.0])).sum().backward()
    norm, ok = opt.step(0.1, max_norm=1.0)
    assert not ok and not math.isfinite(norm) and torch.equal(p.data, torch.ones(3))
    assert ppo._consecutive_bad([False, False], 1) == 3 and ppo._consecutive_bad([False, True], 2) == 0


def test_master_adamw_waits_for_gpu_to_host_gradient_copies_before_reading_them(monkeypatch):
    """A test double for the CUDA path: gradients that claim to live on a GPU record their copy, and
    torch.cuda.synchronize records the wait. The clip (which reads the gradients) and Adam's step
    must come after the wait, or the CPU reads buffers a non_blocking copy has not filled yet."""
    events = []

    class GpuGrad:                              # stands in for an fp32 CUDA accumulator
        is_cuda = True

        def __init__(self, value):
            self.value = value

        def to(self, device, non_blocking=False):
            events.append(("copy", non_blocking))
            return self.value.to(device)

    p = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    opt = ppo.MasterAdamW([p], lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, master_device="cpu")
    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: events.append("sync"))
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: events.append("clip") or clip(*a, **k))
    adam_step = opt.opt.step
    monkeypatch.setattr(opt.opt, "step", lambda *a, **k: events.append("step") or adam_step(*a, **k))
    opt._acc = [GpuGrad(torch.tensor([1.0, 2.0, 3.0]))]
    norm, ok = opt.step(0.1, max_norm=10.0)
    assert ok and norm == pytest.approx(math.sqrt(14.0))
    assert events == [("copy", True), "sync", "clip", "step"]


def test_devices_compare_by_type_and_resolved_index():
    assert memory.same_device("cuda", "cuda:0") and memory.same_device(torch.device("cpu"), "cpu:0")
    assert not memory.same_device("cuda:0", "cuda:1") and not memory.same_device("cpu", "cuda:0")
    # fp32 parameters on the optimizer's own device need no master copy, however the device is spelled
    p = torch.nn.Parameter(torch.ones(2))
    opt = ppo.MasterAdamW([p], lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, master_device="cpu:0")
    assert not opt.mixed and opt.master[0] is p


# -----------------------------------------------------------------------------
# The loop on tiny models


def _toy_models(cfg, seed=0, vocab=16):
    torch.manual_seed(seed)
    mc = make_config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1, eos_token_id=0)
    policy = M.Transformer(mc).eval()
    adam = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, master_device="cpu")
    critic = ppo.Critic(copy.deepcopy(policy), seed=seed).eval() if cfg.adv == "gae" else None
    ref = copy.deepcopy(policy).requires_grad_(False)
    return ppo.Models(policy, critic, ref, ppo.MasterAdamW(policy.parameters(), lr=cfg.actor_lr, **adam),
                      ppo.MasterAdamW(critic.parameters(), lr=cfg.critic_lr, **adam) if critic else None,
                      torch.device("cpu"))


def _toy_cfg(**kw):
    base = dict(device="cpu", dtype="float32", batch_prompts=16, samples=4, mini_batch_prompts=8,
                max_response=2, micro_batch=32, actor_lr=1e-2, critic_lr=1e-2, progress=False)
    base.update(kw)
    return ppo.resolve_config(ppo.PPOConfig(**base))


def _toy_run(cfg, models, steps, seed=0, metrics_out=None):
    """Prompt token p in 1..4; reward 1 iff the first response token is p + 8 (chance: 1/16)."""
    rng = random.Random(seed)
    rewards = []
    for step in range(1, steps + 1):
        ps = [rng.randint(1, 4) for _ in range(cfg.batch_prompts)]

        def reward_fn(responses):
            return [1.0 if r[0] == ps[i // cfg.samples] + 8 else 0.0 for i, r in enumerate(responses)], {}
        metrics, _, _ = ppo.ppo_iteration(models, [[p] for p in ps], reward_fn, cfg, step, eos_id=0, pad_id=0)
        rewards.append(metrics["reward_mean"])
        if metrics_out is not None:
            metrics_out.append(metrics)
    return rewards


def test_toy_task_ppo_mean_reward_rises_from_near_0_to_near_1():
    cfg = _toy_cfg(actor_lr=5e-3, critic_lr=1e-2)
    metrics = []
    rewards = _toy_run(cfg, _toy_models(cfg), steps=40, metrics_out=metrics)
    assert sum(rewards[:2]) / 2 < 0.2
    assert sum(rewards[-5:]) / 5 > 0.9, rewards
    # the critic is the baseline: it learned the return (~ the reward now), and the advantages
    # A = G - V are centred by it. Without the baseline (A = G) their mean would be ~ the reward, 0.9+.
    last = metrics[-5:]
    assert sum(m["value_mean"] for m in last) / 5 > 0.8
    assert abs(sum(m["advantage_raw_mean"] for m in last) / 5) < 0.2


def _recorded_actor_gradient(models):
    grads = []

    def record(lr, max_norm):   # the accumulated gradient of a mini-batch, instead of a step
        grads.append(torch.cat([p.grad.flatten() for p in models.actor_opt.params]))
        models.actor_opt.zero_grad()
        return 0.0, True
    models.actor_opt.step = record
    return grads


@pytest.mark.parametrize("log_ratio,advantage,clipped", [(math.log(2.0), 1.0, True), (-math.log(2.0), -1.0, True),
                                                         (math.log(2.0), -1.0, False), (0.0, 1.0, False)])
def test_clip_stops_the_actor_gradient_outside_the_trust_region(log_ratio, advantage, clipped):
    """Through update_actor: every token pushed beyond 1 +- eps in the direction its advantage favours
    gives exactly no gradient; one the clip does not bind gives one."""
    cfg = _toy_cfg(batch_prompts=4, mini_batch_prompts=4, entropy_coef=0.0, kl_coef=0.0, max_response=3)
    models = _toy_models(cfg)
    prompts = [[1], [2], [3], [4]]
    gen = M.generate(models.policy, prompts, max_new_tokens=3, n_samples=4, eos_id=0, pad_id=0, seed=0)
    exp = ppo.make_experience(prompts, gen, 4, [0.0] * 16, pad_id=0, eos_ids=0)
    ppo.prepare_experience(exp, models, cfg)
    exp.old_logp = exp.old_logp - log_ratio              # pi / pi_old = e^log_ratio on every token
    exp.advantages = torch.full_like(exp.advantages, advantage) * exp.response_mask
    grads = _recorded_actor_gradient(models)
    ppo.update_actor(models.policy, models.actor_opt, exp, cfg, lr=1e-2)
    assert len(grads) == 1
    if clipped:
        assert grads[0].abs().max() == 0
    else:
        assert grads[0].abs().max() > 1e-4


def _first_token_kl(policy, ref):
    """Exact KL(pi || ref) of the first response token, averaged over the 4 prompts."""
    with torch.no_grad():
        x = torch.tensor([[1], [2], [3], [4]])
        lp, lq = F.log_softmax(policy(x)[:, -1], -1), F.log_softmax(ref(x)[:, -1], -1)
        return (lp.exp() * (lp - lq)).sum(-1).mean().item()


def test_kl_penalty_pulls_the_policy_back_to_the_reference():
    """No task reward, a strong penalty and a policy that starts far from the reference: PPO must
    shrink the exact KL. (With the penalty's sign flipped it grows about fourfold instead.)"""
    cfg = _toy_cfg(kl_coef=0.5, actor_lr=5e-3, batch_prompts=8, mini_batch_prompts=8)
    models = _toy_models(cfg)
    with torch.no_grad():
        models.policy.lm_head.weight.mul_(4.0)           # sharper than the reference (tied: embeddings too)
    start = _first_token_kl(models.policy, models.ref)
    for step in range(1, 13):
        metrics, _, _ = ppo.ppo_iteration(models, [[1 + i % 4] for i in range(8)], lambda r: ([0.0] * len(r), {}),
                                          cfg, step, eos_id=0, pad_id=0)
        assert metrics["kl"] is not None
    end = _first_token_kl(models.policy, models.ref)
    assert start > 0.1 and end < 0.25 * start, (start, end)


def test_toy_task_grpo_learns_without_a_critic():
    cfg = _toy_cfg(adv="grpo", samples=8, batch_prompts=8, mini_batch_prompts=4, actor_lr=1e-2)
    models = _toy_models(cfg)
    assert models.critic is None
    rewards = _toy_run(cfg, models, steps=40)
    assert sum(rewards[:2]) / 2 < 0.2
    assert sum(rewards[-5:]) / 5 > 0.75, rewards


def test_token_mean_is_independent_of_micro_batch_but_original_aggregation_is_not():
    def actor_gradient(**kw):
        cfg = _toy_cfg(batch_prompts=4, mini_batch_prompts=4, max_response=4, kl_coef=0.0, **kw)
        models = _toy_models(cfg, seed=1, vocab=8)
        grads = _recorded_actor_gradient(models)
        _toy_run(cfg, models, steps=1, seed=1)
        return grads[0]
    a, b = actor_gradient(micro_batch=16), actor_gradient(micro_batch=3)
    assert a.abs().max() > 1e-3 and torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    c = actor_gradient(micro_batch=16, loss_agg="micro-token-mean")
    d = actor_gradient(micro_batch=3, loss_agg="micro-token-mean")
    assert torch.allclose(a, c, rtol=1e-4, atol=1e-7)   # one micro-batch: both aggregations agree
    assert not torch.allclose(c, d, rtol=1e-2)          # unequal micro-batches: the original's depends on them


def _spy(monkeypatch, name):
    """Record the arguments of every call of ppo.<name> (value_loss, policy_loss), then call it."""
    calls, fn = [], getattr(ppo, name)

    def spy(*a, **k):
        calls.append((a, k))
        return fn(*a, **k)
    monkeypatch.setattr(ppo, name, spy)
    return calls


def test_fidelity_runs_the_originals_update(monkeypatch):
    """--fidelity: 4x more critic steps (mini-batches of mini-batch-prompts sequences), micro-batches
    of 4 (actor) and 1 (critic) with per-micro-batch means, lr 0 at the first iteration, and V
    trained on the post-EOS state; the default keeps the critic's steps at the actor's."""
    def one_iteration(**kw):
        cfg = _toy_cfg(batch_prompts=8, mini_batch_prompts=4, micro_batch=0, max_response=3, **kw)
        models = _toy_models(cfg)
        vl, pl = _spy(monkeypatch, "value_loss"), _spy(monkeypatch, "policy_loss")
        metrics, exp, (actor_ok, critic_ok) = ppo.ppo_iteration(
            models, [[1 + i % 4] for i in range(8)], lambda r: ([1.0] * len(r), {}), cfg, 1, eos_id=0, pad_id=0)
        monkeypatch.undo()
        return cfg, metrics, len(actor_ok), len(critic_ok), vl, pl
    cfg, metrics, n_actor, n_critic, vl, pl = one_iteration()
    assert (n_actor, n_critic) == (2, 2) and metrics["actor_lr"] == cfg.actor_lr
    assert {a[0].shape[0] for a, _ in pl} == {4} and {a[0].shape[0] for a, _ in vl} == {4}   # micro-batch 4
    cfg, metrics, n_actor, n_critic, vl, pl = one_iteration(fidelity=True)
    assert (cfg.loss_agg, cfg.lr_zero_first_step, cfg.value_post_eos) == ("micro-token-mean", True, True)
    assert (n_actor, n_critic) == (2, 8) and metrics["actor_lr"] == 0 and metrics["critic_lr"] == 0
    assert {a[0].shape[0] for a, _ in pl} == {4} and {a[0].shape[0] for a, _ in vl} == {1}
    # micro-token-mean: each micro-batch's loss is divided by (its own tokens x micro-batches)
    for a, k in pl:
        assert float(k["normalizer"]) == pytest.approx(float(a[3].sum()) * 4)


def test_lr_zero_first_step_freezes_the_weights_but_moves_adams_moments():
    def weights(models):
        return [p.detach().clone() for p in list(models.policy.parameters()) + list(models.critic.parameters())]
    for flag in (False, True):
        cfg = _toy_cfg(batch_prompts=4, mini_batch_prompts=4, lr_zero_first_step=flag)
        models = _toy_models(cfg)
        w0 = weights(models)
        _toy_run(cfg, models, steps=1)
        w1 = weights(models)
        unchanged = all(torch.equal(a, b) for a, b in zip(w0, w1))
        assert unchanged == flag
        moments = [s["exp_avg"] for s in models.actor_opt.opt.state.values()]
        assert moments and all(m.abs().max() > 0 for m in moments)        # Adam saw the gradients either way
    _toy_run(cfg, models, steps=2)                                          # steps 1, 2: step 2 learns
    assert not all(torch.equal(a, b) for a, b in zip(w1, weights(models)))


def test_value_post_eos_trains_v_on_the_state_after_the_eos_toward_0(monkeypatch):
    prompts = [[1], [2]]
    # row 0 ends with its EOS (token 0) after 2 tokens; row 1 is truncated at R = 3
    gen = M.Generation(torch.tensor([[5, 0, 0], [6, 7, 8]]), torch.full((2, 3), -1.0), torch.tensor([2, 3]))
    for flag in (False, True):
        cfg = _toy_cfg(batch_prompts=2, samples=1, mini_batch_prompts=2, max_response=3, value_post_eos=flag)
        models = _toy_models(cfg)
        exp = ppo.make_experience(prompts, gen, 1, [1.0, 0.0], pad_id=0, eos_ids=0)
        ppo.prepare_experience(exp, models, cfg)
        calls = _spy(monkeypatch, "value_loss")
        ppo.update_critic(models.critic, models.critic_opt, exp, cfg, lr=1e-2)
        monkeypatch.undo()
        values, old, returns, vmask = calls[0][0][:4]
        assert vmask[1].tolist() == [1, 1, 1]                        # a truncated row has no post-EOS state
        assert vmask[0].tolist() == ([1, 1, 1] if flag else [1, 1, 0])
        assert returns[0, 2] == 0                                    # the post-EOS state's target: 0


def test_reference_is_brought_to_the_device_only_while_it_is_used():
    cfg = _toy_cfg(batch_prompts=4, mini_batch_prompts=4, kl_coef=0.1)
    models = _toy_models(cfg)
    models.ref_offload = True
    events = []
    to = models.ref.to
    models.ref.to = lambda *a, **k: events.append(("to", str(torch.device(*a)))) or to(*a, **k)
    models.ref.embed_tokens.register_forward_pre_hook(lambda m, i: events.append("forward"))
    gen = M.generate(models.policy, [[1], [2], [3], [4]], max_new_tokens=2, n_samples=4, eos_id=0, pad_id=0, seed=0)
    exp = ppo.make_experience([[1], [2], [3], [4]], gen, 4, [0.0] * 16, pad_id=0, eos_ids=0)
    ppo.prepare_experience(exp, models, cfg)
    moves = [i for i, e in enumerate(events) if e != "forward"]
    assert len(events) > 2 and moves == [0, len(events) - 1]             # on before its forwards, off after
    assert events[0] == ("to", str(models.device)) and events[-1] == ("to", "cpu")
    models.ref_offload, events[:] = False, []
    ppo.prepare_experience(exp, models, cfg)
    assert "forward" in events and ("to", "cpu") not in events


def test_non_finite_loss_skips_the_update_and_is_reported():
    cfg = _toy_cfg(batch_prompts=4, mini_batch_prompts=4)
    models = _toy_models(cfg)
    gen = M.generate(models.policy, [[1], [2], [3], [4]], max_new_tokens=2, n_samples=4, eos_id=0, pad_id=0, seed=0)
    exp = ppo.make_experience([[1], [2], [3], [4]], gen, 4, [1.0] * 16, pad_id=0, eos_ids=0)
    ppo.prepare_experience(exp, models, cfg)
    exp.advantages[0, 0] = float("nan")
    before = [p.detach().clone() for p in models.policy.parameters()]
    stats = ppo.update_actor(models.policy, models.actor_opt, exp, cfg, lr=1e-2)
    assert stats["actor_outcomes"] == [False]
    assert all(torch.equal(a, b) for a, b in zip(before, models.policy.parameters()))


def test_entropy_bonus_raises_entropy():
    cfg = _toy_cfg(batch_prompts=4, mini_batch_prompts=4, entropy_coef=1.0, kl_coef=0.0)
    models = _toy_models(cfg)
    gen = M.generate(models.policy, [[1], [2], [3], [4]], max_new_tokens=2, n_samples=4, eos_id=0, pad_id=0, seed=0)
    exp = ppo.make_experience([[1], [2], [3], [4]], gen, 4, [0.0] * 16, pad_id=0, eos_ids=0)
    ppo.prepare_experience(exp, models, cfg)
    exp.advantages.zero_()                   # no policy-gradient signal: only the bonus acts
    entropies = [ppo.update_actor(models.policy, models.actor_opt, exp, cfg, lr=1e-2)["entropy"] for _ in range(3)]
    assert entropies[2] > entropies[0]


def _unpadded_logprobs(model, prompt, response):
    """log pi(y_t | prompt, y_<t) from one forward over the unpadded sequence: the independent reference."""
    with torch.no_grad():
        logits = model(torch.tensor([list(prompt) + list(response)]))[0, len(prompt) - 1:-1]
    return F.log_softmax(logits.float(), -1).gather(-1, torch.tensor(response)[:, None])[:, 0]


def test_old_logprobs_recomputed_at_step_0_equal_the_rollout(tmp_path):
    model, tok = M.load(make_checkpoint(tmp_path / "ck"), dtype="float32")
    ref, _ = M.load(make_checkpoint(tmp_path / "ref", seed=1), dtype="float32")   # another model: KL != 0
    cfg = ppo.resolve_config(ppo.PPOConfig(device="cpu", max_response=12, infer_batch=3, kl_coef=0.001))
    critic = ppo.Critic(copy.deepcopy(model))
    models = ppo.Models(model, critic, ref, None, None, torch.device("cpu"))
    prompts = [tok.encode("Using the numbers"), tok.encode("A conversation between User and Assistant."),
               tok.encode("17 - 8 = 9")]                                       # different lengths: left padding
    gen = M.generate(model, prompts, max_new_tokens=12, n_samples=2, eos_id=tok.eos_id, pad_id=tok.pad_id, seed=0)
    exp = ppo.make_experience(prompts, gen, 2, [0.0] * 6, tok.pad_id, tok.eos_id)
    ppo.prepare_experience(exp, models, cfg)
    m = exp.response_mask
    assert m.sum() > 6
    assert torch.allclose(exp.old_logp, exp.rollout_logp, atol=1e-4)
    assert ((exp.old_logp - exp.rollout_logp).abs() * m).max() < 1e-4
    # the reference's log-probs and the k1 KL, each row against one unpadded forward of each model
    for r in range(6):
        L = int(m[r].sum())
        resp = exp.input_ids[r, exp.prompt_len:exp.prompt_len + L].tolist()
        want_ref = _unpadded_logprobs(ref, prompts[r // 2], resp)
        want_kl = _unpadded_logprobs(model, prompts[r // 2], resp) - want_ref
        assert torch.allclose(exp.ref_logp[r, :L], want_ref, atol=1e-4)
        assert torch.allclose(exp.kl[r, :L], want_kl, atol=1e-4) and (exp.kl[r, L:] == 0).all()
    assert (exp.kl.abs() * m).max() > 0.05                                   # two different models


def test_compiled_validation_calls_have_the_rollouts_row_count(tmp_path, monkeypatch):
    """--compile-rollout compiles per row count: validation (1 sample per problem) must call generate
    with the rollout's rows (batch x samples) every time, the last call padded; eager keeps its sizes."""
    model, tok = M.load(make_checkpoint(tmp_path / "ck"), dtype="float32")
    calls, generate = [], M.generate

    def spy(net, prompts, **k):
        calls.append((len(prompts) * k["n_samples"], k["compile"]))
        return generate(net, prompts, **dict(k, compile=False))     # eager tokens: the rows are what is tested
    monkeypatch.setattr(M, "generate", spy)
    problems = [{"nums": [i % 9 + 1, 3, 4], "target": 12 + i} for i in range(11)]
    mc = model.config
    for compile_ in (True, False):
        cfg = ppo.resolve_memory(ppo.resolve_config(ppo.PPOConfig(device="cpu", batch_prompts=2, samples=2,
                                                                  mini_batch_prompts=2, max_response=3, max_prompt=1024,
                                                                  compile_rollout=compile_)), mc)
        calls.clear()
        prompts = ppo.encode_prompts(tok, problems[:2], cfg)
        ppo.rollout(model, prompts, cfg, eos_id=tok.eos_id, pad_id=tok.pad_id, generator=None)
        got = ppo.validate(model, tok, problems, cfg, 0, tmp_path)
        rows = files.read_jsonl(tmp_path / "completions" / "step_0.jsonl")
        assert len(rows) == 11 and [r["target"] for r in rows] == [p["target"] for p in problems]
        assert got["val_response_length"] == sum(r["length"] for r in rows) / 11
        if compile_:
            assert calls == [(4, True)] * 4                      # rollout 2 x 2; validation 11 = 4 + 4 + 3 (+1 copy)
        else:
            assert calls == [(4, False), (11, False)]
    # on a GPU the automatic sizes: rollout calls of equal size, validation at the rollout's rows
    cfg3b = {"model_type": "qwen2", "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
             "num_attention_heads": 16, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True}
    for gb in (80, 40, 24):
        c = ppo.resolve_memory(ppo.resolve_config(ppo.PPOConfig(device="cuda", print_budget=True, gpu_memory_gb=gb)),
                               M.ModelConfig.from_hf(cfg3b))
        assert c.batch_prompts % c.rollout_batch == 0 and c.val_batch == c.rollout_batch * c.samples, (gb, c)


def test_validation_is_greedy_by_default_and_seeded_when_sampled(tmp_path):
    model, tok = M.load(make_checkpoint(tmp_path / "ck"), dtype="float32")
    problems = [{"nums": [3, 17, 8], "target": 12}, {"nums": [25, 30, 3, 4], "target": 32},
                {"nums": [1, 2, 3], "target": 6}, {"nums": [9, 4, 7], "target": 20}]

    def completions(step, **kw):
        cfg = ppo.resolve_config(ppo.PPOConfig(device="cpu", max_response=16, max_prompt=1024, seed=5, **kw))
        ppo.validate(model, tok, problems, cfg, step, tmp_path)
        return [r["completion"] for r in files.read_jsonl(tmp_path / "completions" / f"step_{step}.jsonl")]

    prompts = [tok.encode(countdown.make_prompt(p["nums"], p["target"])) for p in problems]
    greedy = M.generate(model, prompts, max_new_tokens=16, temperature=0.0, eos_id=tok.eos_id, pad_id=tok.pad_id)
    expect = [ppo.response_text(tok, t[:n].tolist()) for t, n in zip(greedy.tokens, greedy.lengths.tolist())]
    assert completions(0) == expect                                   # default: greedy, like veRL's validation
    sampled = completions(1, val_temperature=1.0)
    assert sampled == completions(1, val_temperature=1.0)             # seeded: the same step samples the same
    assert sampled != expect                                          # a random model's samples are not its argmax
    assert completions(2, val_temperature=1.0) != sampled             # each step draws its own samples


# -----------------------------------------------------------------------------
# The training entry point: resume, run folder, CLI


def _run_cfg(model, out, steps, **kw):
    base = dict(model=str(model), out=str(out), device="cpu", batch_prompts=2, samples=2, mini_batch_prompts=1,
                micro_batch=2, max_response=5, max_prompt=1024, steps=steps, val_every=2, n_val=2, n_train=8,
                n_test=3, save_every=2, progress=False, actor_lr=1e-3, critic_lr=1e-3, seed=3)
    base.update(kw)
    return ppo.PPOConfig(**base)


def _weights(run, step):
    model, _ = M.load(run / "checkpoints" / f"step_{step}" / "policy")
    state = torch.load(run / "checkpoints" / f"step_{step}" / "state.pt", weights_only=True)
    return model.state_dict(), state


def test_resume_gives_the_weights_of_a_straight_run(tmp_path):
    ck = make_checkpoint(tmp_path / "ck")
    straight, split = tmp_path / "straight", tmp_path / "split"
    ppo.train(_run_cfg(ck, straight, steps=4))
    ppo.train(_run_cfg(ck, split, steps=2))
    assert (split / "checkpoints" / "step_2" / "state.pt").is_file()
    ppo.train(_run_cfg(ck, split, steps=4))                       # a rerun with more steps resumes at 2
    (w1, s1), (w2, s2) = _weights(straight, 4), _weights(split, 4)
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    assert all(torch.equal(s1["critic"][k], s2["critic"][k]) for k in s1["critic"])
    assert not torch.equal(w1["embed_tokens.weight"], M.load(ck)[0].state_dict()["embed_tokens.weight"])
    rows1 = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    rows2 = [json.loads(x) for x in (split / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows2] == [0, 1, 2, 3, 4]
    assert all(set(r) == set(ppo_run.METRIC_KEYS) for r in rows1 + rows2)
    for a, b in zip(rows1, rows2):
        assert a["reward_mean"] == b["reward_mean"] and a["kl"] == b["kl"] and a["value_loss"] == b["value_loss"]
    assert not (straight / "checkpoints" / "step_2" / "state.pt").exists()   # --state-checkpoints last
    assert (straight / "checkpoints" / "step_2" / "policy" / "config.json").is_file()
    comp = [json.loads(x) for x in (straight / "completions" / "step_4.jsonl").read_text().splitlines()]
    assert len(comp) == 2 and {"step", "nums", "target", "prompt", "completion", "score"} <= set(comp[0])


def test_resume_frees_the_loaded_training_state(tmp_path, monkeypatch):
    """The state.pt dict (a second copy of the master weights and critic: ~29 GiB for 3B) must be gone
    by the time training continues; Adam's moments, adopted by the optimizer, are the exception."""
    import gc
    import weakref
    ck = make_checkpoint(tmp_path / "ck")
    out = tmp_path / "run"
    kw = dict(val_every=0, dtype="bfloat16")               # bf16 weights: fp32 master copies in state.pt
    ppo.train(_run_cfg(ck, out, steps=2, **kw))
    refs, alive_at_step = [], []
    load = torch.load

    def spy_load(*a, **k):
        state = load(*a, **k)
        refs.extend(weakref.ref(t) for t in state["actor_opt"]["master"] + list(state["critic"].values()))
        return state
    iteration = ppo.ppo_iteration

    def spy_iteration(*a, **k):
        gc.collect()
        alive_at_step.append(sum(r() is not None for r in refs))
        return iteration(*a, **k)
    monkeypatch.setattr(torch, "load", spy_load)
    monkeypatch.setattr(ppo, "ppo_iteration", spy_iteration)
    ppo.train(_run_cfg(ck, out, steps=3, **kw))
    assert len(refs) > 10 and alive_at_step == [0]


# 40 MiB: room for a policy folder and one state (disk_preflight's floor), not for a second state and its margin
@pytest.mark.parametrize("free_gb,old_state_during_save", [(1e6, True), (40 / 1024, False)])
def test_state_checkpoint_needs_room_for_one_state_only_when_the_disk_is_short(tmp_path, monkeypatch, free_gb,
                                                                                old_state_during_save):
    ck = make_checkpoint(tmp_path / "ck")
    out = tmp_path / "run"
    ppo.train(_run_cfg(ck, out, steps=2, val_every=0))
    old = out / "checkpoints" / "step_2" / "state.pt"
    seen, save = [], torch.save

    def spy_save(obj, path, *a, **k):
        seen.append(old.is_file())
        return save(obj, path, *a, **k)
    disk = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: disk._replace(free=int(free_gb * 2**30)))
    monkeypatch.setattr(torch, "save", spy_save)
    ppo.train(_run_cfg(ck, out, steps=4, val_every=0))
    # plenty of room: the previous state survives until the new one is in place (crash-safe);
    # no room for two: it is deleted before the new one is written
    assert seen == [old_state_during_save] and not old.exists()
    assert (out / "checkpoints" / "step_4" / "state.pt").is_file()


def test_disk_preflight_fits_a_64_gib_disk_by_default_and_refuses_with_numbers(tmp_path, monkeypatch, capsys):
    """The paper's 3B run (250 steps, a save every 10): ~5.8 GiB per policy folder, ~75 GiB per state."""
    mc = M.ModelConfig.from_hf(QWEN_3B)
    free = {"gib": 50.0}                                        # a 64 GiB disk holding the OS, torch and the model
    disk = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: disk._replace(free=int(free["gib"] * 2**30)))

    def plan(**kw):
        cfg = ppo.resolve_config(ppo.PPOConfig(device="cuda", print_budget=True, gpu_memory_gb=80, **kw))
        return ppo_config.disk_preflight(ppo.resolve_memory(cfg, mc), mc, tmp_path / "run")
    c = plan()                                                  # the defaults fit: 4 policy folders, no state
    assert c.state_checkpoints == "none" and c.keep_policies == 3
    assert "--state-dir" in capsys.readouterr().err
    with pytest.raises(ValueError) as e:
        plan(state_checkpoints="last")
    msg = str(e.value)
    for what in ("4 policy folders of 5.84 GiB (23.35 GiB)", "1 training state(s) of 75.", "50.00 GiB free",
                 "--keep-policies", "--state-checkpoints none", "final", "--state-dir"):
        assert what in msg, what
    with pytest.raises(ValueError, match="25 saves keep up to 25 policy folders"):
        plan(keep_policies=0)                                   # every folder: 145 GiB
    free["gib"] = 200.0
    assert plan().state_checkpoints == "last"                   # room: resumable by default
    assert plan(state_checkpoints="all", keep_policies=0, steps=20).state_checkpoints == "all"   # 2 x (5.8 + 75)


def test_keep_policies_and_state_dir(tmp_path):
    ck = make_checkpoint(tmp_path / "ck")
    out, states = tmp_path / "run", tmp_path / "states"
    kw = dict(val_every=0, save_every=1, keep_policies=2, state_dir=str(states), state_checkpoints="last")
    ppo.train(_run_cfg(ck, out, steps=3, **kw))
    assert sorted(runs.step_dirs(out)) == [2, 3]
    assert [p.name for p in states.iterdir()] == ["run-step_3.pt"]
    assert (out / "checkpoints" / "step_3" / "state.pt").resolve() == (states / "run-step_3.pt").resolve()
    ppo.train(_run_cfg(ck, out, steps=4, **kw))                 # resumes through the link
    assert sorted(runs.step_dirs(out)) == [3, 4] and [p.name for p in states.iterdir()] == ["run-step_4.pt"]
    assert len(files.read_jsonl(out / "metrics.jsonl")) == 4


def test_bfloat16_run_keeps_fp32_master_weights(tmp_path):
    ck = make_checkpoint(tmp_path / "ck")
    out = tmp_path / "bf16"
    ppo.train(_run_cfg(ck, out, steps=1, val_every=0, dtype="bfloat16", actor_lr=1e-6))
    policy, state = _weights(out, 1)
    init = M.load(ck)[0].state_dict()
    assert policy["embed_tokens.weight"].dtype == torch.bfloat16
    master = dict(zip([n for n, _ in M.load(ck)[0].named_parameters()], state["actor_opt"]["master"]))
    assert master["embed_tokens.weight"].dtype == torch.float32
    start = init["embed_tokens.weight"].to(torch.bfloat16).float()    # the bf16 weights training began from
    moved = (master["embed_tokens.weight"] - start).abs()
    assert 0 < moved.max() < 1e-5                     # the fp32 copy moved by ~lr per Adam step (2 steps)


def test_run_folder_refuses_other_settings_and_cli_errors(tmp_path, capsys):
    ck = make_checkpoint(tmp_path / "ck")
    out = tmp_path / "run"
    ppo.train(_run_cfg(ck, out, steps=1, val_every=0))
    with pytest.raises(ValueError, match="different settings"):
        ppo.train(_run_cfg(ck, out, steps=2, val_every=0, actor_lr=5e-3))
    assert ppo.main(["--model", str(ck), "--out", str(tmp_path / "r2"), "--device", "cpu", "--batch-prompts", "3",
                     "--mini-batch-prompts", "2"]) == 2
    assert "multiple of" in capsys.readouterr().err
    assert ppo.main(["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "r3")]) == 2
    assert ppo.main(["--model", str(ck), "--out", str(tmp_path / "r4"), "--resume", "--device", "cpu"]) == 2
    assert "no run to resume" in capsys.readouterr().err


def test_second_process_on_a_run_folder_is_refused_and_the_first_finishes(tmp_path):
    """Two real ppo.py processes on one --out: the second exits 2 with one line naming the folder and
    the first's pid, before touching anything; the first completes every step."""
    ck = make_checkpoint(tmp_path / "ck")
    out = tmp_path / "run"
    argv = [sys.executable, str(ROOT / "ppo.py"), "--model", str(ck), "--out", str(out), "--device", "cpu",
            "--batch-prompts", "2", "--samples", "2", "--mini-batch-prompts", "1", "--micro-batch", "2",
            "--max-response", "5", "--max-prompt", "1024", "--steps", "3", "--val-every", "2", "--n-val", "2",
            "--n-train", "8", "--n-test", "3", "--save-every", "2", "--no-progress", "--actor-lr", "1e-3",
            "--critic-lr", "1e-3", "--seed", "3", "--threads", "1"]
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not ((out / ".lock").is_file() and (out / ".lock").read_text() == f"{first.pid}\n"):
        assert first.poll() is None and time.time() < deadline, (tmp_path / "first.log").read_text()
        time.sleep(0.05)
    os.kill(first.pid, signal.SIGSTOP)  # frozen while it holds the folder, so the second surely meets it
    try:
        before = sorted(p.name for p in out.rglob("*"))
        second = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert sorted(p.name for p in out.rglob("*")) == before
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()
    assert second.returncode == 2 and second.stdout == ""
    assert second.stderr.splitlines()[-1] == (
        f"error: {out} is in use by another process (pid {first.pid}): one live process owns a ppo.py run folder. "
        "Wait for it to finish or stop it, or choose another --out")
    assert "Traceback" not in second.stderr
    rows = files.read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert (out / "checkpoints" / "step_3" / "state.pt").is_file()


def test_counts_and_rates_out_of_range_are_refused_naming_the_flag():
    # the boundary itself is allowed: 1 for counts of work, 0 for sizes and rates where 0 means "none"
    cfg = ppo.resolve_config(ppo.PPOConfig(device="cpu", steps=1, n_val=0, kl_coef=0.0))
    assert (cfg.steps, cfg.n_val, cfg.kl_coef) == (1, 0, 0.0)
    for field, value, message in (("steps", 0, "--steps must be >= 1, got 0"),
                                  ("micro_batch", -2, "--micro-batch must be >= 1, got -2"),
                                  ("n_val", -1, "--n-val must be >= 0, got -1"),
                                  ("kl_coef", -0.5, "--kl-coef must be >= 0, got -0.5")):
        with pytest.raises(ValueError, match=message):
            ppo.resolve_config(ppo.PPOConfig(device="cpu", **{field: value}))


def test_top_p_below_one_is_refused_in_ppo(tmp_path, capsys):
    # nucleus sampling would make the stored log-probs those of the untruncated policy: a biased ratio
    with pytest.raises(ValueError, match="--top-p 1"):
        ppo.resolve_config(ppo.PPOConfig(device="cpu", top_p=0.9))
    assert ppo.resolve_config(ppo.PPOConfig(device="cpu", top_p=1.0)).top_p == 1.0
    assert ppo.main(["--model", "x", "--out", str(tmp_path / "r"), "--device", "cpu", "--top-p", "0.95"]) == 2
    assert "nucleus sampling" in capsys.readouterr().err


QWEN_3B = {"model_type": "qwen2", "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
           "num_attention_heads": 16, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True}


def test_host_budget_counts_the_pinned_masters_and_gradient_copies():
    """3B on one 80 GB GPU with the optimizer on the CPU: masters (pinned), Adam's moments, the pinned
    gradient copies of the larger model and the offloaded reference; pinned blocks at their exact size."""
    mc = M.ModelConfig.from_hf(QWEN_3B)
    c = ppo.resolve_memory(ppo.resolve_config(ppo.PPOConfig(device="cuda", print_budget=True, gpu_memory_gb=80)), mc)
    b = ppo.memory_budget(c, mc)
    n = b["params_policy"] + b["params_critic"]
    assert c.optim_device == "cpu" and b["pinned"] == 4 * n + 4 * b["params_critic"]   # the critic: + its head
    assert b["host"] == 2 * b["params_policy"] + 12 * n + 4 * b["params_critic"]   # ref, masters, m, v, grads
    assert 86 * 2**30 < b["host"] < 87 * 2**30 and b["device_peak"] < 0.85 * 80 * 2**30
    text = ppo.format_budget(b, c)
    assert "of which pinned (page-locked)                       34.49 GiB" in text and "memory-mapped" in text
    assert memory.exact_pinning()   # this torch takes the allocator setting (where it cannot, masters stay unpinned)


def test_device_auto_refuses_the_cpu_for_a_model_above_1b(tmp_path, capsys, monkeypatch):
    """No usable GPU (a driver older than the wheel's CUDA needs): --device auto must not quietly train
    a 3B model on the CPU; a 135M one may (the tiny study does)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "config.json").write_text(json.dumps(QWEN_3B))
    assert ppo.main(["--model", str(tmp_path / "config.json"), "--out", str(tmp_path / "r"), "--device", "auto"]) == 2
    err = capsys.readouterr().err
    for what in ("3.09B-parameter", "driver >= 580", "https://download.pytorch.org/whl/cu126", "--device cpu"):
        assert what in err, what
    assert not (tmp_path / "r").exists()                 # refused before the run folder was made
    refuse_cpu_fallback(CPU_FALLBACK_MAX_PARAMS)     # up to ~1B parameters the CPU is allowed
    with pytest.raises(ValueError, match="--device cpu"):
        refuse_cpu_fallback(CPU_FALLBACK_MAX_PARAMS + 1)


def test_resume_loads_the_training_state_memory_mapped(tmp_path, monkeypatch):
    ck = make_checkpoint(tmp_path / "ck")
    out = tmp_path / "run"
    ppo.train(_run_cfg(ck, out, steps=1, val_every=0, dtype="bfloat16"))
    kwargs, load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: kwargs.append(k) or load(*a, **k))
    ppo.train(_run_cfg(ck, out, steps=2, val_every=0, dtype="bfloat16"))
    assert [k.get("mmap") for k in kwargs] == [True]


def test_print_budget_for_a_3b_config(tmp_path, capsys):
    cfg = {"model_type": "qwen2", "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
           "num_attention_heads": 16, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert ppo.main(["--print-budget", "--model", str(tmp_path / "config.json"), "--device", "cuda",
                     "--gpu-memory-gb", "80"]) == 0
    out = capsys.readouterr().out
    assert "3.09B-parameter policy" in out and "optimizer on cpu" in out
    b = ppo.memory_budget(ppo.resolve_config(ppo.PPOConfig(device="cuda", print_budget=True, optim_device="cpu",
                                                           rollout_batch=64)), M.ModelConfig.from_hf(cfg))
    items = {name: n for name, n, _ in b["items"]}
    assert items["policy weights"] == 2 * b["params_policy"]
    assert items["rollout KV cache (256 rows x 1280 tokens)"] == 256 * 1280 * 36 * 2 * 2 * 128 * 2
    # the compiled rollout keeps its one KV cache between rollouts: it is counted in the update too
    kept = ppo.memory_budget(ppo.resolve_config(ppo.PPOConfig(device="cuda", print_budget=True, optim_device="cpu",
                                                              rollout_batch=64, compile_rollout=True)),
                             M.ModelConfig.from_hf(cfg))
    cache = items["rollout KV cache (256 rows x 1280 tokens)"]
    noise = 256 * 151936 * 4                            # the compiled sampler's pre-drawn noise, fp32
    assert kept["phases"]["update"] == b["phases"]["update"] + cache + noise
    assert kept["phases"]["rollout"] == b["phases"]["rollout"] + noise


def test_response_cap_is_checked_against_the_traces_p99(tmp_path, tiny_tokenizer, capsys):
    """--cap-traces: the p99 of the completions' token lengths (+ EOS), counted by hand, is the floor."""
    tok = tiny_tokenizer
    texts = [" 12 + 5 = 17." * k for k in range(1, 101)]   # 100 completions of growing length
    rows = [{"query": "q", "completion": t} for t in texts]
    files.write_jsonl(tmp_path / "a.jsonl", rows)
    files.write_jsonl(tmp_path / "b.jsonl", rows[:10])
    lengths = sorted(len(tok.encode(t)) + 1 for t in texts)
    p99 = lengths[98]  # the 99th of 100 values
    assert ppo.check_response_cap(tok, [tmp_path / "a.jsonl"], p99) == {tmp_path / "a.jsonl": p99}
    with pytest.raises(ValueError, match=rf"--max-response {p99 - 1} .*a.jsonl {p99} tokens.*>= {p99}"):
        ppo.check_response_cap(tok, [tmp_path / "b.jsonl", tmp_path / "a.jsonl"], p99 - 1)
    # through the CLI: PPO refuses before it trains
    ck = make_checkpoint(tmp_path / "ck")
    assert ppo.main(["--model", str(ck), "--out", str(tmp_path / "run"), "--device", "cpu", "--batch-prompts", "2",
                     "--samples", "2", "--mini-batch-prompts", "1", "--max-response", "8", "--steps", "1",
                     "--n-train", "4", "--n-test", "2", "--no-progress", "--max-prompt", "1024",
                     "--cap-traces", str(tmp_path / "a.jsonl")]) == 2
    assert "would cut the priming traces" in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
