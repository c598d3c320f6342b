"""
ppo.py: the paper's reinforcement-learning stage, PPO with a critic on Countdown, on one GPU.

One step (paper_spec 2.2), with the paper's numbers:
  1. take 256 problems and sample 4 responses each from the policy (T = 1, top-p 1, <= 1024 tokens,
     stop at EOS), from the `base` prompt tokenized without BOS;
  2. score each response with countdown.score (0 / 0.1 / 1) and put the score on its last valid
     token (the EOS, or the last token of a truncated response);
  3. recompute log pi_old with the policy, log pi_ref with the frozen initial model and V with the
     critic (the initial checkpoint's transformer plus a fresh scalar head);
  4. token rewards r_t = score * 1[t = L-1] - beta * KL_t; GAE with gamma = lambda = 1; whiten;
  5. update the critic (clipped value loss), then the actor (clipped surrogate + entropy bonus),
     in mini-batches of 128 prompts, one epoch;
  6. every 10 steps: greedy validation on the test set, its completions to JSONL, a checkpoint.

Simplifications against the original (veRL on 4 GPUs with Ray, FSDP and vLLM), up front:
  - One process on one device, or N under torchrun with FSDP2 (README, "Several GPUs"): each rank
    rolls out its share of every mini-batch's prompts, and whitening, loss denominators and metrics
    are global, so the update does not depend on N.
    Rollouts use model.generate (a plain-PyTorch KV cache), not vLLM,
    so they are slower; the log-probs are recomputed afterwards anyway, as the original does.
  - No sequence packing and no balancing of micro-batches; each micro-batch is cut after its
    longest response, so padding costs little.
  - The problems come from countdown.make_splits(distribution="rl"), an approximation of the HF
    set Countdown-Tasks-3to4, which cannot be downloaded here; --train-data/--test-data take the
    real set (or any) as JSONL rows {"nums": [...], "target": int}.
Deliberate fixes, each one a flag away from the original (--fidelity turns all of them on):
  - D-P1: the original takes 8 critic optimizer steps (128 sequences) against 2 actor steps (512
    sequences) per iteration; here both use the same mini-batches (--critic-mini-batch).
  - D-P2: the original's loss is a mean over micro-batches of each micro-batch's token mean, so it
    changes with the micro-batch size and the GPU count; here it is the token mean over the
    mini-batch, whatever the micro-batch size (--loss-agg).
  - D-P3: the original's warmup-0 schedule gives lr = 0 for the whole first iteration while Adam's
    moments still move; here the first iteration learns (--lr-zero-first-step).
  - D-P6: the original also trains V on the post-EOS state toward 0; here the critic loss covers
    the response tokens only (--value-post-eos).
  - Values after the EOS are zeroed before GAE (the original does not; it makes no difference at
    gamma = lambda = 1, but lambda < 1 would bootstrap from a meaningless value otherwise).
  - Validation reports pure accuracy beside the mean score with its 0.1 format credit (D-R4).

Memory (a 3B model's PPO on one 80 GB GPU): docs/reference.md and plumbing/memory.py; --print-budget.
None of the CUDA paths has run on a GPU yet: bench/gpu_check.py is the one command that checks them.
Satori (satori.py) plugs into the training loop through one seam, an extension with a few hooks
(see _extension); plain PPO runs without it.

Reading order: the PPO math (KL penalty, token rewards, GAE, losses), log-probs, the critic, one
iteration's experience, rollout -> prepare_experience -> update_critic -> update_actor ->
ppo_iteration, the Countdown reward and validation, the training loop; below the marked plumbing
line: building the models, the Satori seam and main(). Every hyperparameter, its help text and the
paper's default is a field of PPOConfig in plumbing/ppo_config.py (`python ppo.py --help` lists
them); the run folder, resuming, the data and the checkpoints are in plumbing/ppo_run.py.
"""

from __future__ import annotations

import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import countdown
import model as M
from plumbing import dist, files, runs
from plumbing.device import Timer, attention_backends, param_count, peak_memory_gb, refuse_cpu_fallback
from plumbing.dist import Accum, all_rows, global_sum
from plumbing.memory import MasterAdamW, format_budget
from plumbing.ppo_config import PPOConfig, adam_settings, build_parser, memory_budget, resolve_config, resolve_memory
from plumbing.ppo_run import (TrainingStopped, batch_indices, check_response_cap, load_training_state, log_metrics,
                              rank_share, save_checkpoint, start_run, stop_on_sigint)


# -----------------------------------------------------------------------------
# The KL penalty, the token rewards, GAE, whitening, GRPO advantages


def kl_penalty(logp, ref_logp, kind: str = "k1"):
    """Per-token KL estimate between the sampling policy and the reference, on sampled tokens.

    k1 ("kl"):         log p - log q                     unbiased, high variance, can be negative (paper)
    k3 ("low_var_kl"): q/p - log(q/p) - 1 >= 0          unbiased, low variance; clamped to [-10, 10]
    abs:               |log p - log q|
    mse:               0.5 (log p - log q)^2
    """
    d = logp - ref_logp
    if kind in ("k1", "kl"):
        return d
    if kind == "abs":
        return d.abs()
    if kind == "mse":
        return 0.5 * d.square()
    if kind in ("k3", "low_var_kl"):
        return (torch.exp(-d) + d - 1).clamp(-10, 10)    # with x = log q - log p: e^x - x - 1
    raise ValueError(f"unknown KL estimator {kind!r}; use k1, k3 (low_var_kl), abs or mse")


def token_level_rewards(scores, kl, mask, kl_coef: float):
    """r_t = score * 1[t = L - 1] - kl_coef * KL_t * m_t, [N, R].

    L = valid response tokens (through the EOS, or all R when truncated), so the score sits on the
    EOS of a finished response and on the final token of a truncated one.
    """
    rewards = torch.zeros_like(mask, dtype=torch.float32) if kl is None else -kl_coef * kl * mask
    last = mask.sum(1).long() - 1                                     # [N]: L - 1
    if (last < 0).any():
        raise ValueError("every response needs at least one valid token")
    rewards[torch.arange(len(last), device=mask.device), last] += scores.to(rewards.dtype)
    return rewards


def compute_gae(rewards, values, mask, gamma: float = 1.0, lam: float = 1.0):
    """Generalized advantage estimates and returns, [N, R] each (zero after the response).

    Values at t >= L are zeroed first: the state after the EOS is terminal, so the last token
    bootstraps from 0 (what makes lambda < 1 right; at gamma = lambda = 1 it telescopes away).
    """
    values = values * mask
    rewards = rewards * mask
    N, R = rewards.shape
    adv = torch.zeros_like(rewards)
    last_gae = torch.zeros(N, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(R)):
        # delta_t = r_t + gamma V_{t+1} - V_t ;  A_t = delta_t + gamma lambda A_{t+1}   (V_R = A_R = 0)
        next_value = values[:, t + 1] if t + 1 < R else torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        adv[:, t] = last_gae
    # gamma = lambda = 1: A_t = sum_{k>=t} r_k - V_t and G_t = sum_{k>=t} r_k (Monte-Carlo return-to-go)
    returns = adv + values
    return adv * mask, returns * mask


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum()


def masked_var(x, mask, unbiased: bool = True):
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean).square(), mask)
    if unbiased:
        n = mask.sum()
        if n < 2:
            raise ValueError("masked_var needs at least two valid entries")
        var = var * n / (n - 1)                        # Bessel's correction
    return var


def masked_whiten(x, mask, eps: float = 1e-8):
    """(x - mean) / sqrt(var + eps) over the valid entries (unbiased variance); zero elsewhere."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def grpo_advantages(seq_rewards, group_size: int, eps: float = 1e-6):
    """(r - mean_group) / (std_group + eps) per sequence, [N]; rows i*n .. i*n+n-1 are one prompt's.

    std is the unbiased one (as torch.std and veRL's GRPO); a group of equal rewards gets 0.
    """
    if group_size < 2:
        raise ValueError("GRPO needs at least 2 samples per prompt (--samples)")
    g = seq_rewards.view(-1, group_size)
    return ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + eps)).view(-1)


# -----------------------------------------------------------------------------
# Losses. Each takes a `normalizer`: the loss is sum(mask * per-token loss) / normalizer, so the
# caller decides the aggregation (token mean over the mini-batch, or the original's per
# micro-batch means) and micro-batches can be summed by gradient accumulation.


def policy_loss(logp, old_logp, advantages, mask, clip_ratio: float = 0.2, normalizer=None):
    """Clipped surrogate: max(-A rho, -A clip(rho, 1-eps, 1+eps)), rho = pi / pi_old.

    Returns (loss, clip fraction, approx KL(old || new) = mean(old_logp - logp)).
    """
    normalizer = mask.sum() if normalizer is None else normalizer
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_ratio, 1 + clip_ratio)
    loss = (torch.maximum(unclipped, clipped) * mask).sum() / normalizer
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = masked_mean(old_logp - logp, mask)
    return loss, clipfrac.detach(), approx_kl.detach()


def value_loss(values, old_values, returns, mask, clip: float = 0.5, normalizer=None):
    """0.5 * max((V - G)^2, (V_clip - G)^2), V_clip = V_old + clip(V - V_old, -c, c); (loss, clip fraction)."""
    normalizer = mask.sum() if normalizer is None else normalizer
    v_clipped = old_values + (values - old_values).clamp(-clip, clip)
    l_unclipped = (values - returns).square()
    l_clipped = (v_clipped - returns).square()
    loss = 0.5 * (torch.maximum(l_unclipped, l_clipped) * mask).sum() / normalizer
    clipfrac = masked_mean((l_clipped > l_unclipped).float(), mask)
    return loss, clipfrac.detach()


def entropy_bonus(entropy, mask, normalizer=None):
    """sum(mask * H) / normalizer: the term the actor loss subtracts, times entropy_coef."""
    normalizer = mask.sum() if normalizer is None else normalizer
    return (entropy * mask).sum() / normalizer


def explained_variance(values, returns, mask):
    """1 - Var(G - V) / Var(G) over valid tokens: 1 = perfect critic, 0 = no better than a constant."""
    var_g = masked_var(returns, mask)
    return float(1 - masked_var(returns - values, mask) / var_g) if var_g > 0 else float("nan")


# -----------------------------------------------------------------------------
# Log-probabilities and entropy of the response tokens, in chunks
#
# The LM head of a 150k-token vocabulary turns a [B, T, D] bf16 tensor into [B, T, V] logits; in
# fp32 for 1,024 x 1,280 tokens that is 797 GB. We gather only the valid response tokens, push them
# through the head `chunk` tokens at a time, and (when gradients are on) checkpoint each chunk so
# backward recomputes its logits instead of keeping them.


def entropy_from_logits(logits):
    """H = -sum_v p_v log p_v = logsumexp(z) - sum_v p_v z_v, over the last dim, in fp32."""
    z = logits.float()
    return torch.logsumexp(z, dim=-1) - (F.softmax(z, dim=-1) * z).sum(-1)


def _chunk_logprobs(lm_head, hidden, targets, temperature: float, with_entropy: bool):
    z = lm_head(hidden).float() / temperature                              # [c, V] fp32, one chunk only
    logp = z.gather(-1, targets[:, None])[:, 0] - torch.logsumexp(z, -1)   # [c]
    return (logp, entropy_from_logits(z)) if with_entropy else logp


def token_logprobs(lm_head, hidden, targets, mask, *, chunk: int = 1024, temperature: float = 1.0,
                   with_entropy: bool = False):
    """log pi(target_t | state_t) (and the entropy at t) for every masked position; 0 elsewhere.

    hidden [B, T, D] are the states *before* each target, targets [B, T], mask [B, T].
    Returns logp [B, T] fp32 (and entropy [B, T] fp32 when with_entropy).
    """
    sel = mask.bool()
    h, y = hidden[sel], targets[sel]                      # [N, D], [N]: valid tokens only
    fn = partial(_chunk_logprobs, lm_head, temperature=temperature, with_entropy=with_entropy)
    remat = torch.is_grad_enabled() and h.requires_grad
    outs = []
    for i in range(0, h.shape[0], chunk):
        args = (h[i:i + chunk], y[i:i + chunk])
        outs.append(checkpoint(fn, *args, use_reentrant=False) if remat else fn(*args))
    zeros = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device)

    def scatter(parts):
        flat = torch.cat(parts) if parts else zeros[sel]
        return zeros.masked_scatter(sel, flat)
    if not with_entropy:
        return scatter(outs)
    return scatter([o[0] for o in outs]), scatter([o[1] for o in outs])


def response_logprobs(policy, input_ids, attention_mask, response_mask, prompt_len: int, *,
                      chunk: int = 1024, temperature: float = 1.0, with_entropy: bool = False):
    """Log-probs [B, R] (and entropies) of the response tokens of prompt (P) + response (R) rows.

    The token at absolute position P + t is predicted by the hidden state at P - 1 + t.
    """
    R = response_mask.shape[1]
    h = policy.hidden_states(input_ids[:, :prompt_len + R - 1], attention_mask[:, :prompt_len + R - 1])
    h = h[:, prompt_len - 1:]                                # [B, R, D]
    targets = input_ids[:, prompt_len:prompt_len + R]        # [B, R]
    return token_logprobs(policy.logits, h, targets, response_mask, chunk=chunk, temperature=temperature,
                          with_entropy=with_entropy)


# -----------------------------------------------------------------------------


class Critic(nn.Module):
    """V(prefix) = w . h_last + b on the backbone's final hidden states (HF token-classification head)."""

    def __init__(self, backbone: M.Transformer, seed: int = 0):
        super().__init__()
        self.backbone = backbone
        w = backbone.embed_tokens.weight
        # fp32 whatever the backbone's dtype: a bf16 head would quantize values near 1 to steps of ~0.004
        self.score = nn.Linear(backbone.config.hidden_size, 1, device=w.device, dtype=torch.float32)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():   # as HF initializes a new head: N(0, 0.02) weights, zero bias
            self.score.weight.copy_(torch.randn(self.score.weight.shape, generator=g) * 0.02)
            self.score.bias.zero_()
        if not backbone.config.tie_word_embeddings:
            backbone.lm_head = None   # an untied LM head is dead weight in a critic (V x D parameters)

    def forward(self, input_ids, attention_mask=None):
        """Values [B, T] in fp32, one per position (the value of the prefix ending there)."""
        return self.score(self.backbone.hidden_states(input_ids, attention_mask).float())[..., 0]


def response_values(critic, input_ids, attention_mask, prompt_len: int, R: int):
    """V_t for the states prompt + y_<t, t = 0..R-1: positions P-1+t, masked by attention (c_t)."""
    v = critic(input_ids[:, :prompt_len + R - 1], attention_mask[:, :prompt_len + R - 1])[:, prompt_len - 1:]
    return v * attention_mask[:, prompt_len - 1:prompt_len + R - 1]        # [B, R]; c_0 = 1, c_t = m_{t-1}


# -----------------------------------------------------------------------------
# Experience: one iteration's rollouts as tensors


@dataclass
class Experience:
    input_ids: torch.Tensor          # [N, P + R] prompt (left-padded) + response (right-padded)
    attention_mask: torch.Tensor     # [N, P + R] 1 = real token
    response_mask: torch.Tensor      # [N, R] fp32, m_t = 1[t < L]
    prompt_len: int                  # P
    scores: torch.Tensor             # [N] outcome score of each response
    rollout_logp: torch.Tensor       # [N, R] log-probs the sampler reported
    ended: torch.Tensor              # [N] bool: the response ends with an EOS (else truncated)
    old_logp: Optional[torch.Tensor] = None
    ref_logp: Optional[torch.Tensor] = None
    kl: Optional[torch.Tensor] = None
    values: Optional[torch.Tensor] = None       # [N, R] old values, masked by c_t
    rewards: Optional[torch.Tensor] = None
    advantages: Optional[torch.Tensor] = None   # whitened (GAE) or group-normalized (GRPO)
    returns: Optional[torch.Tensor] = None
    raw_advantages: Optional[torch.Tensor] = None


def make_experience(prompts, gen: M.Generation, n_samples: int, scores, pad_id: int, eos_ids) -> Experience:
    """Tensors for len(prompts) x n_samples rollouts; row i * n + j is sample j of prompt i."""
    device = gen.tokens.device
    N, R = gen.tokens.shape
    if N != len(prompts) * n_samples:
        raise ValueError(f"{N} generated rows for {len(prompts)} prompts x {n_samples} samples")
    P = max(len(p) for p in prompts)
    prompt_ids = torch.full((N, P), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros(N, P, dtype=torch.long)
    for i, p in enumerate(prompts):
        rows = slice(i * n_samples, (i + 1) * n_samples)
        prompt_ids[rows, P - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        prompt_mask[rows, P - len(p):] = 1
    lengths = gen.lengths.to(device)
    response_mask = (torch.arange(R, device=device)[None, :] < lengths[:, None])
    last_tok = gen.tokens.gather(1, (lengths - 1).clamp(min=0)[:, None])[:, 0]
    ended = torch.isin(last_tok, torch.as_tensor(eos_ids, device=device).view(-1))
    return Experience(
        input_ids=torch.cat([prompt_ids.to(device), gen.tokens], 1),
        attention_mask=torch.cat([prompt_mask.to(device), response_mask.long()], 1),
        response_mask=response_mask.float(), prompt_len=P,
        scores=torch.as_tensor(scores, dtype=torch.float32, device=device),
        rollout_logp=gen.logprobs.float() * response_mask, ended=ended)


def _micro(exp: Experience, rows, extra: int = 1):
    """Rows of exp cut after their longest response (+extra positions for V_L); (ids, attn, R')."""
    L = int(exp.response_mask[rows].sum(1).max())
    R = min(L + extra, exp.response_mask.shape[1])
    P = exp.prompt_len
    return exp.input_ids[rows, :P + R], exp.attention_mask[rows, :P + R], R


def _pad_to(x, R):
    return F.pad(x, (0, R - x.shape[1]))


def _row_batches(start: int, stop: int, size: int):
    return [torch.arange(i, min(i + size, stop)) for i in range(start, stop, size)]


# -----------------------------------------------------------------------------
# Models and the pieces of one iteration


@dataclass
class Models:
    policy: M.Transformer
    critic: Optional[Critic]
    ref: Optional[M.Transformer]
    actor_opt: MasterAdamW
    critic_opt: Optional[MasterAdamW]
    device: torch.device
    ref_offload: bool = False
    sampler: Optional[M.Transformer] = None   # under torchrun: an unsharded copy of the policy that generates


def sampling_policy(models: Models) -> M.Transformer:
    """The model that generates: the policy itself, or under torchrun its unsharded copy refreshed
    from the shards (FSDP would make every decode step a collective, so all ranks would have to
    decode in lockstep; the copy lets each rank generate its own prompts at its own pace)."""
    return models.policy if models.sampler is None else dist.gather_full(models.policy, into=models.sampler)


def rollout(policy, prompts, cfg: PPOConfig, *, eos_id, pad_id: int, generator, temperature=None,
            n_samples=None, batch_prompts=None) -> M.Generation:
    """Sample n responses per prompt, `batch_prompts` prompts per generate call (bounds the KV cache)."""
    n = cfg.samples if n_samples is None else n_samples
    T = cfg.temperature if temperature is None else temperature
    size = batch_prompts or len(prompts)
    parts = []
    for i in range(0, len(prompts), size):
        chunk = prompts[i:i + size]
        # the compiled step has graphs per row count: a short last call (e.g. validation's 1,024 rows
        # as 680 + 344) would compile the whole model again per length bucket; pad it with copies of
        # its last prompt to the full size and drop their rows (at T > 0 the draws then differ from an
        # unpadded call's, as they do for any other batch size)
        extra = size - len(chunk) if cfg.compile_rollout else 0
        g = M.generate(policy, chunk + [chunk[-1]] * extra, max_new_tokens=cfg.max_response, n_samples=n,
                       temperature=T, top_p=cfg.top_p, eos_id=eos_id, pad_id=pad_id, generator=generator,
                       compile=cfg.compile_rollout)
        keep = len(chunk) * n
        parts.append(M.Generation(g.tokens[:keep], g.logprobs[:keep], g.lengths[:keep]) if extra else g)
    if policy.embed_tokens.weight.is_cuda:
        # the eager path's KV caches are garbage now; hand their memory back before training. The
        # compiled path keeps its one cache for the next rollout (a new one would re-record the CUDA
        # graph); memory_budget counts it in every phase then.
        torch.cuda.empty_cache()
    R = max(g.tokens.shape[1] for g in parts)
    return M.Generation(torch.cat([F.pad(g.tokens, (0, R - g.tokens.shape[1]), value=pad_id) for g in parts]),
                        torch.cat([_pad_to(g.logprobs, R) for g in parts]),
                        torch.cat([g.lengths for g in parts]))


@torch.no_grad()
def prepare_experience(exp: Experience, models: Models, cfg: PPOConfig):
    """Old log-probs, reference log-probs, values, KL, token rewards, advantages and returns."""
    N, R = exp.response_mask.shape
    P = exp.prompt_len
    mask = exp.response_mask

    def per_batch(fn, extra=0):
        outs = []
        for rows in _row_batches(0, N, cfg.infer_batch):
            ids, attn, Rm = _micro(exp, rows, extra)
            outs.append(_pad_to(fn(ids, attn, exp.response_mask[rows, :Rm], Rm), R))
        return torch.cat(outs)

    def logprobs_of(net):
        net.eval()
        return per_batch(lambda ids, attn, m, Rm: response_logprobs(net, ids, attn, m, P, chunk=cfg.logprob_chunk,
                                                                   temperature=cfg.temperature))
    exp.old_logp = logprobs_of(models.policy)
    if models.ref is not None:
        if models.ref_offload:
            models.ref.to(models.device)
        exp.ref_logp = logprobs_of(models.ref)
        if models.ref_offload:
            models.ref.to("cpu")
        exp.kl = kl_penalty(exp.old_logp, exp.ref_logp, cfg.kl_estimator) * mask
    exp.rewards = token_level_rewards(exp.scores, exp.kl, mask, cfg.kl_coef)
    if cfg.adv == "gae":
        models.critic.eval()
        exp.values = per_batch(lambda ids, attn, m, Rm: response_values(models.critic, ids, attn, P, Rm), extra=1)
        exp.raw_advantages, exp.returns = compute_gae(exp.rewards, exp.values, mask, cfg.gamma, cfg.lam)
        if dist.distributed():   # whiten over the global batch, as one process would; keep this rank's rows
            whitened = masked_whiten(dist.all_gather_rows(exp.raw_advantages), dist.all_gather_rows(mask))
            exp.advantages = whitened[dist.rank() * N:(dist.rank() + 1) * N, :R]   # every rank holds N rows
        else:
            exp.advantages = masked_whiten(exp.raw_advantages, mask)
    else:
        exp.raw_advantages = grpo_advantages(exp.rewards.sum(1), cfg.samples)[:, None] * mask
        exp.advantages = exp.raw_advantages
    return exp


def _normalizer(cfg, mb_tokens, micro_tokens, n_micro):
    # token-mean: every token of the mini-batch weighs the same, whatever the micro-batching.
    # micro-token-mean (the original, D-P2): each micro-batch's token mean, averaged over micro-batches.
    # Under torchrun mb_tokens counts every rank's share and n_micro every rank's micro-batches, and
    # the ranks' gradients are summed: the same update as one process (token-mean), or the original's
    # mean over all GPUs' micro-batches (micro-token-mean).
    return mb_tokens if cfg.loss_agg == "token-mean" else micro_tokens * n_micro


def _update(net, opt: MasterAdamW, exp: Experience, cfg: PPOConfig, lr: float, *, tokens, mini: int, micro: int,
            micro_loss: Callable, names: tuple) -> dict:
    """The loop both updates share: mini-batches of `mini` rows (this rank's share under torchrun), each
    split into micro-batches of `micro` rows whose gradients accumulate, one optimizer step per
    mini-batch. A non-finite loss or gradient skips that step (its outcome is False).

    micro_loss(rows, normalizer) -> (loss, [(statistic, value, weight)]), normalizer(micro-batch token
    count) its loss denominator (_normalizer; `tokens` is the mask that counts). names = (the loss
    statistic, the gradient-norm statistic, the outcomes key).
    """
    N = exp.response_mask.shape[0]
    stats, outcomes = Accum(), []
    net.train()
    for _ in range(cfg.ppo_epochs):
        for start in range(0, N, mini):
            stop = min(start + mini, N)
            micros = _row_batches(start, stop, micro)
            mb_tokens = global_sum(tokens[start:stop].sum())
            opt.zero_grad()
            finite, mb_loss = True, 0.0
            for rows in micros:
                normalizer = partial(_normalizer, cfg, mb_tokens, n_micro=len(micros) * dist.world_size())
                loss, logged = micro_loss(rows, normalizer)
                if not torch.isfinite(loss):
                    finite = False
                    if not dist.distributed():
                        break
                loss.backward()   # under FSDP every rank runs every backward (collectives); a NaN skips the step
                mb_loss += loss.item()
                for key, value, weight in logged:
                    stats.add(key, value, weight)
            finite = dist.all_true(finite)
            norm, ok = opt.step(lr, cfg.grad_clip) if finite else (float("nan"), False)
            if not ok:
                opt.zero_grad()
            else:
                stats.add(names[0], dist.all_sum(mb_loss)[0], replicated=True)
                stats.add(names[1], norm, replicated=True)
            outcomes.append(ok)
    net.eval()
    out = stats.means()
    out[names[2]] = outcomes
    return out


def update_critic(critic: Critic, opt: MasterAdamW, exp: Experience, cfg: PPOConfig, lr: float):
    """Clipped value regression toward the returns, in mini-batches of critic_mini_batch sequences."""
    N, R = exp.response_mask.shape
    P = exp.prompt_len
    # which states V is trained on: t < L (ours), or t <= L with the post-EOS state toward 0 (original)
    vmask = exp.attention_mask[:, P - 1:P - 1 + R].float() if cfg.value_post_eos else exp.response_mask

    def micro_loss(rows, normalizer):
        ids, attn, Rm = _micro(exp, rows, extra=1)
        vm = vmask[rows, :Rm]
        v = response_values(critic, ids, attn, P, Rm)
        loss, clipfrac = value_loss(v, exp.values[rows, :Rm], exp.returns[rows, :Rm], vm, cfg.value_clip,
                                    normalizer=normalizer(vm.sum()))
        return loss, [("vf_clipfrac", clipfrac, vm.sum())]
    return _update(critic, opt, exp, cfg, lr, tokens=vmask, mini=cfg.critic_mini_batch // dist.world_size(),
                   micro=cfg.critic_micro_batch, micro_loss=micro_loss,
                   names=("value_loss", "critic_grad_norm", "critic_outcomes"))


def update_actor(policy: M.Transformer, opt: MasterAdamW, exp: Experience, cfg: PPOConfig, lr: float):
    """Clipped surrogate with an entropy bonus, in mini-batches of mini_batch_prompts x samples sequences."""
    P = exp.prompt_len

    def micro_loss(rows, normalizer):
        ids, attn, Rm = _micro(exp, rows, extra=0)
        m = exp.response_mask[rows, :Rm]
        logp, ent = response_logprobs(policy, ids, attn, m, P, chunk=cfg.logprob_chunk,
                                      temperature=cfg.temperature, with_entropy=True)
        norm_ = normalizer(m.sum())
        pg, clipfrac, ppo_kl = policy_loss(logp, exp.old_logp[rows, :Rm], exp.advantages[rows, :Rm], m,
                                           cfg.clip_ratio, normalizer=norm_)
        ent_term = entropy_bonus(ent, m, normalizer=norm_)
        w = m.sum()
        return pg - cfg.entropy_coef * ent_term, [
            ("pg_clipfrac", clipfrac, w), ("ppo_kl", ppo_kl, w), ("entropy", masked_mean(ent.detach(), m), w),
            ("pg_loss", pg.item() * norm_ / w, w)]   # pg_loss reported as a token mean
    return _update(policy, opt, exp, cfg, lr, tokens=exp.response_mask,
                   mini=cfg.mini_batch_prompts * cfg.samples // dist.world_size(),   # under torchrun: this rank's share
                   micro=cfg.micro_batch, micro_loss=micro_loss,
                   names=("actor_loss", "actor_grad_norm", "actor_outcomes"))


def _step_generator(seed: int, step: int, device) -> torch.Generator:
    # one generator per iteration, derived from (seed, step): a resumed run samples what a straight one would.
    # Under torchrun each rank draws its own stream (rank 0's is the single-process one); the samples then
    # depend on the world size, since model.generate draws every row of a batch from one generator.
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + step + dist.rank() * 999_999_937) % 2**63)


def _consecutive_bad(outcomes, count: int) -> int:
    for ok in outcomes:
        count = 0 if ok else count + 1
    return count


def ppo_iteration(models: Models, prompts, reward_fn: Callable, cfg: PPOConfig, step: int, *, eos_id, pad_id: int):
    """One PPO iteration on these prompts: rollout, reward, advantages, critic update, actor update.

    reward_fn(responses: list of token-id lists, row order) -> (scores, dict of extra metrics).
    Returns (metrics, experience, (actor outcomes, critic outcomes)).
    """
    timer = Timer(models.device)
    gen = rollout(sampling_policy(models), prompts, cfg, eos_id=eos_id, pad_id=pad_id,
                  generator=_step_generator(cfg.seed, step, models.device), batch_prompts=cfg.rollout_batch)
    t_rollout = timer.lap()
    responses = [row[:n].tolist() for row, n in zip(gen.tokens.cpu(), gen.lengths.tolist())]
    scores, extra = reward_fn(responses)
    t_reward = timer.lap()
    exp = make_experience(prompts, gen, cfg.samples, scores, pad_id, eos_id)
    del gen
    prepare_experience(exp, models, cfg)
    t_prepare = timer.lap()
    # D-P3: the original's constant schedule with 0 warmup steps gives lr 0 for the whole first iteration
    scale = 0.0 if (cfg.lr_zero_first_step and step == 1) else 1.0
    critic_stats = {}
    if models.critic is not None:
        critic_stats = update_critic(models.critic, models.critic_opt, exp, cfg, cfg.critic_lr * scale)
    t_critic = timer.lap()
    actor_stats = update_actor(models.policy, models.actor_opt, exp, cfg, cfg.actor_lr * scale)
    t_actor = timer.lap()

    local_exp = exp   # what ppo_iteration returns: this rank's rows
    if dist.distributed():   # metrics over the global batch: every rank's rows (and means of equal shares)
        exp = all_rows(exp, ("scores", "ended", "response_mask", "rollout_logp", "old_logp", "ref_logp", "kl",
                             "values", "rewards", "advantages", "returns", "raw_advantages"))
        extra = dict(zip(extra, (v / dist.world_size() for v in dist.all_sum(*extra.values()))))
    m = exp.response_mask
    lengths = m.sum(1)
    metrics = dict(
        reward_mean=exp.scores.mean().item(), **extra,
        response_length=lengths.mean().item(), response_length_max=lengths.max().item(),
        truncated_frac=1 - exp.ended.float().mean().item(),
        kl=masked_mean(exp.kl, m).item() if exp.kl is not None else None,
        logp_mismatch=masked_mean((exp.old_logp - exp.rollout_logp).abs(), m).item(),
        sequence_reward_mean=exp.rewards.sum(1).mean().item(),
        advantage_raw_mean=masked_mean(exp.raw_advantages, m).item(),
        actor_lr=cfg.actor_lr * scale, critic_lr=cfg.critic_lr * scale if models.critic is not None else None,
        time_rollout=t_rollout, time_reward=t_reward, time_prepare=t_prepare, time_critic=t_critic,
        time_actor=t_actor, tokens_per_s=lengths.sum().item() / max(t_rollout, 1e-9))
    if exp.values is not None:
        metrics.update(value_mean=masked_mean(exp.values, m).item(), return_mean=masked_mean(exp.returns, m).item(),
                       explained_var=explained_variance(exp.values, exp.returns, m))
    outcomes = (actor_stats.pop("actor_outcomes"), critic_stats.pop("critic_outcomes", []))
    metrics.update(actor_stats)
    metrics.update(critic_stats)
    metrics["skipped_updates"] = sum(not ok for ok in outcomes[0] + outcomes[1])
    return metrics, local_exp, outcomes


# -----------------------------------------------------------------------------
# Countdown: prompts, the reward, validation


def encode_prompts(tokenizer: M.Tokenizer, problems, cfg: PPOConfig):
    """The paper's prompt for each problem, tokenized without BOS (as the original)."""
    out = []
    for p in problems:
        ids = tokenizer.encode(countdown.make_prompt(p["nums"], p["target"], cfg.template))
        if len(ids) > cfg.max_prompt:
            raise ValueError(f"the prompt for {p['nums']} -> {p['target']} has {len(ids)} tokens, more than "
                             f"--max-prompt {cfg.max_prompt}; raise --max-prompt")
        out.append(ids)
    return out


def response_text(tokenizer: M.Tokenizer, ids) -> str:
    """The generated text after the prompt, the EOS and other special tokens stripped."""
    ids = list(ids)
    if ids and ids[-1] == tokenizer.eos_id:
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=True)


def _judge(text, p, cfg):
    """(score, correct, format ok) of one response; format ok = an <answer> the reward could read.
    The score is the paper's (correct / format / 0) or, with --rule-reward satori, 0 right, -1 wrong."""
    s = countdown.score(text, p["nums"], p["target"], cfg.format_score, cfg.correct_score, cfg.lenient)
    has_answer = countdown.score(text, p["nums"], p["target"], 1.0, 1.0, cfg.lenient) > 0
    correct = countdown.is_correct(text, p["nums"], p["target"], cfg.lenient)
    if cfg.rule_reward == "satori":
        s = 0.0 if correct else -1.0
    return s, correct, has_answer


def countdown_reward(tokenizer: M.Tokenizer, problems, cfg: PPOConfig, extension=None) -> Callable:
    """reward_fn for ppo_iteration: rows i*samples .. i*samples+samples-1 answer problems[i]. An
    extension (Satori) may add bonuses to the scores and measure its own rows apart (its reward hook)."""

    def reward_fn(responses):
        texts = [response_text(tokenizer, ids) for ids in responses]
        judged = [_judge(t, problems[i // cfg.samples], cfg) for i, t in enumerate(texts)]
        scores, extra, own = [s for s, _, _ in judged], {}, judged
        if extension is not None:   # own: the judgments of the batch's own prompts (not Satori's restarts)
            scores, own = extension.reward(responses, texts, judged, scores, extra)
        extra.update(accuracy=sum(j[1] for j in own) / max(len(own), 1),
                     format_rate=sum(j[2] for j in own) / max(len(own), 1))
        return scores, extra
    return reward_fn


def validate(policy, tokenizer: M.Tokenizer, problems, cfg: PPOConfig, step: int, run: Optional[Path]) -> dict:
    """Decode the test problems (greedy, or one sample each at --val-temperature); pure accuracy and
    mean score (with its format credit) separately (D-R4). Writes completions/step_<N>.jsonl for
    behavior classification. Under torchrun each rank decodes every W-th problem and rank 0 writes all."""
    everything, problems = problems, problems[dist.rank()::dist.world_size()]
    prompts = encode_prompts(tokenizer, problems, cfg)
    device = policy.embed_tokens.weight.device
    # a stream of its own per step, apart from the rollouts', so validating never shifts training samples
    generator = _step_generator(cfg.seed + 1, step, device) if cfg.val_temperature > 0 else None
    gen = rollout(policy, prompts, cfg, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, generator=generator,
                  temperature=cfg.val_temperature, n_samples=1, batch_prompts=cfg.val_batch or len(prompts))
    rows, ended = [], []
    for p, toks, n in zip(problems, gen.tokens.cpu(), gen.lengths.tolist()):
        ids = toks[:n].tolist()
        text = response_text(tokenizer, ids)
        s, correct, has_answer = _judge(text, p, cfg)
        ended.append(bool(ids) and ids[-1] == tokenizer.eos_id)
        rows.append({"step": step, "nums": p["nums"], "target": p["target"],
                     "prompt": countdown.make_prompt(p["nums"], p["target"], cfg.template), "completion": text,
                     "score": s, "correct": correct, "format_ok": has_answer, "length": n})
    if dist.distributed():   # back in the problems' order: rank r decoded problems r, r + W, r + 2W, ...
        parts = dist.all_gather_objects(list(zip(rows, ended)))
        rows, ended = map(list, zip(*(part[i] for i in range(len(everything)) for part in parts if i < len(part))))
    if run is not None and dist.is_main():
        files.write_jsonl(run / "completions" / f"step_{step}.jsonl", rows)
    n = len(rows)
    return {"val_accuracy": sum(r["correct"] for r in rows) / n, "val_score": sum(r["score"] for r in rows) / n,
            "val_format_rate": sum(r["format_ok"] for r in rows) / n,
            "val_response_length": sum(r["length"] for r in rows) / n, "val_truncated_frac": 1 - sum(ended) / n}


# -----------------------------------------------------------------------------
# Training


def train(cfg: PPOConfig) -> dict:
    """Run (or resume) PPO as configured; returns the last metrics line."""
    auto = cfg.device == "auto"
    cfg = resolve_config(cfg)
    if auto and cfg.device == "cpu":   # no usable GPU: fine for a small model, a silent trap for a 3B one
        refuse_cpu_fallback(param_count(M.checkpoint_config(cfg.model)))
    dist.init_distributed(cfg.device, cfg.dist_timeout)   # nothing without torchrun
    with files.lock_dir(cfg.out, "ppo.py run folder") if dist.is_main() else nullcontext():  # one writer per --out
        # checks, memory plan, disk preflight, config.json (or the resume), the problems (plumbing/ppo_run.py)
        return _train_loop(*start_run(cfg, M.checkpoint_config, countdown.make_splits))


def _train_loop(cfg: PPOConfig, run: Path, ckpt, train_set, test_set, init_path) -> dict:
    val_set = test_set[:cfg.n_val] if cfg.n_val else test_set

    models, tokenizer = build_models(cfg, ckpt / "policy" if ckpt else init_path, init_path)
    extension = _extension(cfg, models, tokenizer, init_path, run)   # Satori's hooks, or None
    if cfg.cap_traces:
        check_response_cap(tokenizer, cfg.cap_traces.split(","), cfg.max_response)
    counters = {"actor_bad": 0, "critic_bad": 0, "elapsed_s": 0.0}
    start = 0
    if ckpt is not None:
        start, saved_counters = load_training_state(ckpt, models, extension)
        counters.update(saved_counters)

    log = partial(log_metrics, run)   # one metrics.jsonl line per step, always the same keys
    row = {}
    t_run = time.perf_counter() - counters["elapsed_s"]
    with stop_on_sigint() as stop:   # a first Ctrl-C sets stop["requested"]: finish the step, checkpoint, stop
        if start == 0 and cfg.val_before_train and cfg.val_every:
            t = time.perf_counter()
            row = log({"step": 0, **validate(sampling_policy(models), tokenizer, val_set, cfg, 0, run),
                       "time_val": time.perf_counter() - t, "elapsed_s": time.perf_counter() - t_run})
            if dist.is_main():
                print(f"step 0: val accuracy {row['val_accuracy']:.3f}, val score {row['val_score']:.3f}",
                      file=sys.stderr)
        from tqdm import tqdm
        bar = tqdm(range(start + 1, cfg.steps + 1), initial=start, total=cfg.steps, desc="ppo",
                   disable=not (cfg.progress and dist.is_main()), file=sys.stderr, dynamic_ncols=True)
        for step in bar:
            t_step = time.perf_counter()
            if models.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            problems = [train_set[i] for i in batch_indices(len(train_set), cfg.batch_prompts, step, cfg.seed)]
            problems = rank_share(problems, cfg.mini_batch_prompts)   # all of them in one process
            prompts = encode_prompts(tokenizer, problems, cfg)
            if extension is not None:   # Satori: the batch's last prompts may restart from past trajectories
                problems, prompts = extension.batch(problems, prompts, step)
            reward_fn = countdown_reward(tokenizer, problems, cfg, extension)
            metrics, _, (actor_ok, critic_ok) = ppo_iteration(models, prompts, reward_fn, cfg, step,
                                                              eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
            if extension is not None:   # Satori: learn from this batch's outcomes
                metrics.update(extension.after_step(step))
            counters["actor_bad"] = _consecutive_bad(actor_ok, counters["actor_bad"])
            counters["critic_bad"] = _consecutive_bad(critic_ok, counters["critic_bad"])
            if metrics["skipped_updates"] and dist.is_main():
                print(f"step {step}: skipped {metrics['skipped_updates']} update(s) with a non-finite loss or gradient",
                      file=sys.stderr)
            metrics["time_step"] = time.perf_counter() - t_step
            if cfg.val_every and (step % cfg.val_every == 0 or step == cfg.steps):
                t = time.perf_counter()
                metrics.update(validate(sampling_policy(models), tokenizer, val_set, cfg, step, run))
                metrics["time_val"] = time.perf_counter() - t
            metrics["peak_mem_gb"] = peak_memory_gb(models.device)
            counters["elapsed_s"] = time.perf_counter() - t_run
            row = log({"step": step, **metrics, "elapsed_s": counters["elapsed_s"]})
            bar.set_postfix(reward=f"{row['reward_mean']:.3f}", acc=f"{row['accuracy']:.3f}",
                            **({"val": f"{row['val_accuracy']:.3f}"} if row["val_accuracy"] is not None else {}))
            worst = max(counters["actor_bad"], counters["critic_bad"])
            if dist.distributed():   # a Ctrl-C that reached some ranks only stops them all after this step
                stop["requested"] = not dist.all_true(not stop["requested"])
            if step % cfg.save_every == 0 or step == cfg.steps or stop["requested"] or worst >= cfg.max_bad_updates:
                save_checkpoint(run, step, models, tokenizer, cfg, counters, extension,
                                last_save=step == cfg.steps or stop["requested"] or worst >= cfg.max_bad_updates,
                                save=M.save)
            if worst >= cfg.max_bad_updates:
                raise TrainingStopped(
                    f"stopped at step {step}: {worst} optimizer updates in a row had a non-finite loss or gradient "
                    f"(--max-bad-updates {cfg.max_bad_updates}); see {run / 'metrics.jsonl'}. Lower the learning "
                    "rates, check the data, or resume from an earlier checkpoint with another --out")
            if stop["requested"]:
                if dist.is_main():
                    print(f"stopped after step {step}; checkpoint saved. Rerun the same command to continue.",
                          file=sys.stderr)
                break
        bar.close()
    return row


# ----- plumbing below: building the models, the Satori seam, main(); the rest is in plumbing/ppo_*.py -----


def build_models(cfg: PPOConfig, policy_path, init_path) -> tuple:
    """(Models, tokenizer): policy from policy_path, critic backbone and reference from init_path.

    Under torchrun the three models are sharded with FSDP2 (model.shard). The single-process memory
    plan maps onto it: the trained models' fp32 shards are MasterAdamW's master weights (so it runs
    as plain AdamW on the shards, on the GPU: each holds 1/N of the Adam state), the all-gathered
    copies compute in --dtype, and the reference, 1/N of its size per GPU, stays on the GPU
    (--ref-offload does not apply).
    """
    device = dist.init_distributed(cfg.device, cfg.dist_timeout)   # cuda:LOCAL_RANK under torchrun
    attention_backends(device)
    sharded = dist.distributed()
    policy, tokenizer = M.load(policy_path, device=device, dtype="float32" if sharded else cfg.dtype)
    policy.gradient_checkpointing = cfg.grad_checkpointing
    ref = None
    if cfg.kl_coef > 0:
        ref_device = "cpu" if (cfg.device == "cuda" and cfg.ref_offload and not sharded) else device
        ref, _ = M.load(init_path, device=ref_device, dtype=cfg.dtype)
        ref.requires_grad_(False)
    adam = adam_settings(cfg, device)
    critic = critic_opt = None
    shard = partial(dist.shard, compute_dtype=cfg.dtype)
    if cfg.adv == "gae":
        backbone, _ = M.load(init_path, device=device, dtype="float32" if sharded else cfg.dtype)
        backbone.gradient_checkpointing = cfg.grad_checkpointing
        critic = Critic(backbone, seed=cfg.seed).eval()
        if sharded:
            shard(critic)
        critic_opt = MasterAdamW(critic.parameters(), lr=cfg.critic_lr, **adam)
    sampler = None
    if sharded:
        shard(policy, forward_methods=("hidden_states", "logits"))
        sampler = dist.gather_full(policy, device=device, dtype=cfg.dtype)
        if ref is not None:
            dist.shard(ref, forward_methods=("hidden_states", "logits"))
    actor_opt = MasterAdamW(policy.parameters(), lr=cfg.actor_lr, **adam)
    models = Models(policy, critic, ref, actor_opt, critic_opt, device,
                    ref_offload=cfg.device == "cuda" and cfg.ref_offload and not sharded, sampler=sampler)
    return models, tokenizer


def _extension(cfg: PPOConfig, models: Models, tokenizer, init_path, run: Path):
    """The seam where Satori (satori.py) joins the training loop: None for plain PPO, else an object with
      batch(problems, prompts, step) -> (problems, prompts)   before the rollout: may swap in restart prompts
      reward(responses, texts, judged, scores, extra) -> (scores, own judgments)   inside the reward
      after_step(step) -> dict of metrics                       after the PPO update: learn from the outcomes
      state_dict() / load_state_dict(state)                      its keys in state.pt
    It is imported only when one of its flags is on."""
    if not (cfg.rae or cfg.preference_bonus or cfg.save_correct):
        return None
    import satori
    return satori.Satori(cfg, tokenizer, run).start(models, init_path, adam_settings(cfg, models.device))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cfg = PPOConfig(**vars(args))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    def run():
        if cfg.print_budget:   # the memory plan for these settings, nothing trained
            c = resolve_config(cfg)
            mc = M.checkpoint_config(c.model)
            c = resolve_memory(c, mc)
            print(format_budget(memory_budget(c, mc), c))
            return
        row = train(cfg)
        if row.get("val_accuracy") is not None and dist.is_main():   # under torchrun only rank 0 reports
            print(f"done: step {row['step']}, val accuracy {row['val_accuracy']:.3f}")
    return runs.run_training(run, cfg.out, user_errors=(NotImplementedError,), stopped=(TrainingStopped,),
                             interrupted="aborted; rerun the same command to resume from the newest checkpoint in "
                                         f"{cfg.out}/checkpoints")


if __name__ == "__main__":
    dist.exit_process(main())