"""
bench/gpu_check.py: ONE command, the first thing to run on a GPU machine; it checks and measures the
one-GPU path with random weights in real configs (no download), using only torch and transformers.

    python bench/gpu_check.py                                   # on a CUDA machine: <= 8 minutes (--budget-s 480)
    python bench/gpu_check.py --device cpu --tiny --budget-s 30 # the same code on CPU with tiny configs

Sections, in order of value; a section whose estimated time no longer fits --budget-s is marked skipped,
and the markdown table (--out) is rewritten after every row, so a killed run still leaves its results.
One summary line ends the run; exit 1 if a correctness check or the preflight failed (a missed speed
goal is reported, not fatal). Expected wall time on an H100/H200: about 11 minutes for every section,
so the default --budget-s 480 leaves the optional compiled decode out. Per section (estimates: this
script has not run on a GPU yet):
  preflight (~2 s)        torch / CUDA / cuDNN / driver versions, GPU name and memory, host RAM and free
                          disk against the 3B PPO run's budgets, gcc and Python.h for Triton. A failed
                          preflight (no CUDA device) says why and stops.
  correctness (~120 s)    0.5B config: bf16 vs fp32 logits (relative L2 < 5e-2); a rollout's log-probs vs
                          ppo.py's recomputation (fp32, 1e-3); the CPU-offloaded MasterAdamW vs torch's
                          fused AdamW (equal); compiled vs eager T = 1 tokens with rows ending at different
                          steps; one PPO iteration's losses finite and equal with the optimizer on the GPU
                          and offloaded to the CPU.
  attention (~5 s)        the SDPA backend each call type gets (decode, causal prefill, masked prefill /
                          training) with model.attention_backends' choice (flash / efficient, no cuDNN).
  canary (~40 s)          eager decode, 3B config bf16, batch 512, 64 steps (growing key length): ms/step.
  ppo (~120 s)            one ppo_iteration of the 3B config scaled down to 64 prompts x 4 x 256 tokens,
                          memory plan of an 80 GB card: seconds per phase, peak GPU and host memory
                          against the printed budget; and the paper-batch 3B plan (goal: within 80 GB).
  decode (~90 s)          batch 256 x (256 prompt + 256 new), T = 1: ours (eager) vs transformers' generate.
  sft (~40 s)             one Llama-3.2-3B step at micro-batch 4 x 2,048: tokens/s, peak GPU memory.
  compiled (~240 s)       optional, last: torch.compile'd decode at batch 1 (greedy, 256 + 256; achieved
                          bandwidth, goal >= 60% of peak; compiled vs eager tokens) and batch 256 (goal
                          >= 2x transformers).
Random weights never emit an EOS, so every response runs to its length limit: the worst case.
"""

import argparse
import copy
import gc
import math
import os
import random
import resource
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import model as M  # noqa: E402
from plumbing import fast_decode  # noqa: E402
from plumbing.device import attention_backends, no_cuda_help, nvidia_driver  # noqa: E402
import ppo  # noqa: E402
import sft  # noqa: E402
from bench_generate import QWEN25_3B, build_models, bytes_per_decode_step, peak_bandwidth_gbps  # noqa: E402
from bench_sft import LLAMA_3_2_3B  # noqa: E402

QWEN25_05B = dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                  num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                  max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
TINY = dict(model_type="qwen2", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True)
TINY_LLAMA = dict(TINY, model_type="llama", tie_word_embeddings=False)

# tolerances, stated once (the docstring and the table repeat them)
TOL_BF16_REL = 5e-2        # ||logits_bf16 - logits_fp32|| / ||logits_fp32||
TOL_LOGP_FP32 = 1e-3       # max |rollout log-prob - recomputed| in fp32
TOL_LOGP_BF16 = 5e-2       # mean |rollout log-prob - recomputed| in bf16 (ppo.py's logp_mismatch)
TIE_GAP_BF16 = 0.1         # a compiled/eager greedy split is a near-tie if eager's top-2 logits differ less


class Report:
    """The table: rows (section, check, measured, goal, status), printed as they come and the file
    rewritten (temp + rename) after every row, so a run killed at any point leaves what it measured."""

    def __init__(self, out: Path, header: str):
        self.out, self.failed, self.status = out, False, []
        self.lines = [header, "", "| section | check | measured | goal / tolerance | status |", "|---|---|---|---|---|"]
        print("\n".join(self.lines), flush=True)
        self.write()

    def add(self, section, check, measured, goal="", status="info"):
        self.failed |= status == "FAIL"
        self.status.append(status)
        line = f"| {section} | {check} | {measured} | {goal} | {status} |"
        self.lines.append(line)
        print(line, flush=True)
        self.write()

    def write(self, extra=()):
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(f".{self.out.name}.tmp-{os.getpid()}")
        tmp.write_text("\n".join(self.lines + list(extra)) + "\n", encoding="utf-8")
        os.replace(tmp, self.out)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device):
    _sync(device)
    t = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t, out


def _free(device):
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _gib(n) -> str:
    return f"{n / 2**30:.1f} GiB"


def _host_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # KiB on Linux


def _rss(field: str) -> int:
    """VmRSS (now) or VmHWM (peak since the last _reset_host_peak) of this process, in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def _reset_host_peak():
    with open("/proc/self/clear_refs", "w") as f:   # VmHWM back to the current RSS
        f.write("5")


def random_model(cfg: dict, device, dtype, seed: int = 0) -> M.Transformer:
    torch.manual_seed(seed)
    with torch.device(device):
        model = M.Transformer(M.ModelConfig(**cfg))
    return model.to(dtype).eval()


def _prompts(n, vocab, lo, hi, seed):
    rng = random.Random(seed)
    return [[rng.randrange(1, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


# -----------------------------------------------------------------------------
# correctness


def check_bf16_logits(rep, cfg, device):
    fp32 = random_model(cfg, device, torch.float32)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    T = 256 if cfg is not TINY else 32
    x = torch.randint(1, cfg["vocab_size"], (4, T), generator=g).to(device)
    mask = torch.ones_like(x)
    mask[1, :T // 4] = 0                          # left padding: the masked attention path too
    with torch.no_grad():
        a = fp32(x, attention_mask=mask).float()[mask.bool()]
        b = bf16(x, attention_mask=mask).float()[mask.bool()]
    rel = float((a - b).norm() / a.norm())
    dlogp = float((a.log_softmax(-1) - b.log_softmax(-1)).abs().max())
    rep.add("correctness", "bf16 vs fp32 logits (relative L2)", f"{rel:.2e} (max abs log-prob diff {dlogp:.3f})",
            f"< {TOL_BF16_REL:g}", "ok" if rel < TOL_BF16_REL else "FAIL")
    return fp32


def check_rollout_logprobs(rep, policy, device, tiny):
    cfg = ppo.resolve_config(ppo.PPOConfig(device=torch.device(device).type, dtype="float32", adv="grpo", kl_coef=0.0,
                                           samples=2, batch_prompts=8, mini_batch_prompts=8, max_response=64,
                                           infer_batch=8, progress=False))
    prompts = _prompts(8, policy.config.vocab_size, 8, 48, seed=1)
    gen = M.generate(policy, prompts, max_new_tokens=cfg.max_response, n_samples=2, temperature=1.0, eos_id=-1,
                     pad_id=0, seed=0)
    exp = ppo.make_experience(prompts, gen, 2, [0.0] * 16, pad_id=0, eos_ids=-1)
    models = ppo.Models(policy, None, None, None, None, torch.device(device))
    ppo.prepare_experience(exp, models, cfg)
    err = float(((exp.old_logp - exp.rollout_logp).abs() * exp.response_mask).max())
    rep.add("correctness", "rollout log-probs vs recomputed (fp32, max abs)", f"{err:.2e}", f"< {TOL_LOGP_FP32:g}",
            "ok" if err < TOL_LOGP_FP32 else "FAIL")


def check_compiled_sampling(rep, policy, device):
    """Compiled vs eager at T = 1 (fp32) with rows ending at different steps: the sampler inside the
    compiled step (its noise drawn from the same generator) and the compaction of finished rows at
    the done check (16 rows -> 8 after step 16). Two graphs of one length bucket."""
    prompts = _prompts(8, policy.config.vocab_size, 8, 48, seed=2)
    kw = dict(max_new_tokens=48, n_samples=2, temperature=1.0, pad_id=0, seed=0)
    free = M.generate(policy, prompts, eos_id=-1, **kw)
    # row r's EOS is the token it draws at step r (rows 0-7) or 32 + r (rows 8-15)
    eos = sorted({int(free.tokens[r, r if r < 8 else 32 + r]) for r in range(16)})
    eager = M.generate(policy, prompts, eos_id=eos, **kw)
    rows = []
    inner = fast_decode._compiled_step()
    fast_decode._compiled_decode_step = lambda *a: rows.append(a[2].shape[0]) or inner(*a)
    try:
        comp = M.generate(policy, prompts, eos_id=eos, compile=True, **kw)
    finally:
        fast_decode._compiled_decode_step = inner
        fast_decode.release_static_cache()
    T = min(comp.tokens.shape[1], eager.tokens.shape[1])
    same = int(((comp.tokens[:, :T] == eager.tokens[:, :T]).all(-1) & (comp.lengths == eager.lengths)).sum())
    dlogp = float((comp.logprobs[:, :T] - eager.logprobs[:, :T]).abs().max())
    status = "ok" if same == 16 else "near-tie?" if same == 15 else "FAIL"
    rep.add("correctness", f"compiled vs eager sampled tokens (T = 1, fp32; rows end at steps "
            f"{int(eager.lengths.min())}-{int(eager.lengths.max())}; step rows {max(rows)} -> {min(rows)})",
            f"{same}/16 rows equal, max abs log-prob diff {dlogp:.1e}",
            "all equal (one split: a near-tie of two draws, rounding)", status)


def check_offloaded_adam(rep, device, tiny):
    """bf16 parameters on the device, fp32 master weights and Adam on the CPU (ppo.py's 3B plan),
    against torch's AdamW on CPU fp32 copies given the same gradients through blocking copies."""
    torch.manual_seed(0)
    n = 4096 if tiny else 1 << 24
    params = [torch.nn.Parameter((torch.randn(n, device=device) * 0.02).to(torch.bfloat16)) for _ in range(4)]
    ref = [torch.nn.Parameter(p.detach().float().cpu()) for p in params]
    kw = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    ours = ppo.MasterAdamW(params, master_device="cpu", **kw)
    theirs = torch.optim.AdamW(ref, fused=True, **kw)   # MasterAdamW runs torch's fused AdamW
    worst = 0.0
    for step in range(3):
        ours.zero_grad()
        theirs.zero_grad()
        x = torch.randn(8, n, device=device)
        loss = sum(((x @ (p.float() * (i + 1))).sin().sum()) for i, p in enumerate(params))   # GPU work queued
        loss.backward()
        grads = [a.clone() for a in ours._acc]                    # fp32 accumulators, still on the device
        for r, g in zip(ref, grads):
            r.grad = g.cpu()                                      # blocking copies: the reference
        torch.nn.utils.clip_grad_norm_(ref, 1.0)
        theirs.step()
        ours.step(kw["lr"], 1.0)
        worst = max(worst, max(float((m.detach() - r.detach()).abs().max()) for m, r in zip(ours.master, ref)))
    rep.add("correctness", "CPU-offloaded MasterAdamW vs torch AdamW (max abs, 3 steps)", f"{worst:.1e}", "0",
            "ok" if worst == 0 else "FAIL")


# -----------------------------------------------------------------------------
# decode speed


def _first_split(model, prompt, a, b):
    """Where greedy rows a and b first differ, and eager's top-2 logit gap there (None if equal)."""
    for t, (x, y) in enumerate(zip(a, b)):
        if x != y:
            with torch.no_grad():
                logits = model(torch.tensor([list(prompt) + list(a[:t])], device=model.embed_tokens.weight.device))
            top = logits[0, -1].float().topk(2).values
            return t, float(top[0] - top[1])
    return None


def decode_case(rep, hf, ours, device, batch, plen, new, temperature, eager, tiny, compiled=True, section="decode"):
    vocab = ours.config.vocab_size
    ids = torch.randint(1, vocab, (batch, plen), generator=torch.Generator().manual_seed(batch)).to(device)
    prompts = ids.tolist()
    short = 16
    sample = dict(temperature=temperature, pad_id=0)

    def ours_run(compile, n, eos):
        return M.generate(ours, prompts, max_new_tokens=n, eos_id=eos, seed=0, compile=compile, **sample).tokens

    def hf_run(n):
        kw = dict(do_sample=temperature > 0, max_new_tokens=n, min_new_tokens=n)
        if temperature > 0:
            kw.update(temperature=temperature, top_k=0, top_p=1.0)
        with torch.no_grad():
            return hf.generate(ids, attention_mask=torch.ones_like(ids), **kw)[:, plen:]

    impls = {}
    if hf is not None:
        impls["transformers"] = (lambda: hf_run(short), lambda: hf_run(new))
    if eager:
        impls["ours eager"] = (lambda: ours_run(False, short, -1), lambda: ours_run(False, new, -1))
    if compiled:
        impls["ours compiled"] = (lambda: ours_run(True, short, -1), lambda: ours_run(True, new, -1))
        # one full-length run compiles (and records the CUDA graph of) every length bucket it crosses
        t_compile, _ = _timed(impls["ours compiled"][1], device)
        rep.add(section, f"compile + warm-up, batch {batch}", f"{t_compile:.1f} s")
    rates, outs = {}, {}
    for name, (f_short, f_full) in impls.items():
        f_short()                                                 # warm-up of every implementation
        t_short, _ = _timed(f_short, device)
        t_full, outs[name] = _timed(f_full, device)
        step_s = max(t_full - t_short, 1e-9) / (new - short)
        rates[name] = step_s
    label = f"batch {batch} x ({plen} prompt + {new} new), {'greedy' if temperature == 0 else f'T = {temperature:g}'}"
    base = rates.get("transformers")
    for name, step_s in rates.items():
        vs = f", {base / step_s:.2f}x transformers" if base and name != "transformers" else ""
        goal, status = "", "info"
        if name == "ours compiled" and batch > 1 and base:
            goal, status = ">= 2x transformers", ("ok" if base / step_s >= 2 else "miss")
        rep.add(section, f"{name}: {label}", f"{batch / step_s:,.0f} tok/s{vs}", goal, status)
    # achieved bandwidth: weights + the filled part of the KV cache, read once per step (mean fill)
    best = "ours compiled" if compiled else "ours eager"
    step_s = rates[best]
    gbps = bytes_per_decode_step(ours, batch, plen + new // 2) / step_s / 1e9
    if torch.device(device).type == "cuda":
        peak, source = peak_bandwidth_gbps()
        share = gbps / peak if peak else None
        goal = ">= 60% of peak" if batch == 1 and compiled else ""
        status = ("ok" if share >= 0.6 else "miss") if (share is not None and goal) else "info"
        rep.add(section, f"{best}, batch {batch}: achieved bandwidth",
                f"{gbps:,.0f} GB/s = {share:.0%} of {peak:,.0f} GB/s ({source})" if share else f"{gbps:,.0f} GB/s",
                goal, status)
    else:
        rep.add(section, f"{best}, batch {batch}: achieved bandwidth", f"{gbps:.2f} GB/s (CPU: no peak)")
    if temperature == 0 and eager and compiled:   # compiled vs eager greedy tokens
        a, b = outs["ours eager"].tolist(), outs["ours compiled"].tolist()
        equal, ties, bad = 0, [], []
        for p, x, y in zip(prompts, a, b):
            split = _first_split(ours, p, x, y)
            if split is None:
                equal += 1
            elif split[1] < TIE_GAP_BF16:
                ties.append(split)
            else:
                bad.append(split)
        detail = f"{equal}/{len(a)} rows equal over {new} tokens"
        if ties or bad:
            detail += "; splits (step, top-2 gap): " + ", ".join(f"({t}, {g:.3f})" for t, g in ties + bad)
        what = "compiled vs eager greedy tokens" + ("" if tiny else " (bf16)")
        rep.add("correctness", what, detail, f"equal, or split at a top-2 gap < {TIE_GAP_BF16}",
                "FAIL" if bad else "ok")


# -----------------------------------------------------------------------------
# one PPO iteration, one SFT step


def _ppo_setup(mcfg, device, dtype, cfg, seed=0):
    """Random policy, critic and reference as ppo.build_models arranges them (reference offloaded on CUDA)."""
    dev = torch.device(device)
    policy = random_model(mcfg, device, dtype, seed)
    policy.gradient_checkpointing = cfg.grad_checkpointing
    critic = ppo.Critic(copy.deepcopy(policy)).eval()
    ref = copy.deepcopy(policy).requires_grad_(False)
    if cfg.ref_offload and dev.type == "cuda":
        ref = ref.to("cpu")
    optim = "cpu" if cfg.optim_device == "cpu" else dev
    adam = dict(betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
                master_device=optim)
    return ppo.Models(policy, critic, ref, ppo.MasterAdamW(policy.parameters(), lr=cfg.actor_lr, **adam),
                      ppo.MasterAdamW(critic.parameters(), lr=cfg.critic_lr, **adam), dev,
                      ref_offload=cfg.ref_offload and dev.type == "cuda")


def _reward(seed=0):
    rng = random.Random(seed)
    return lambda responses: ([float(rng.random() < 0.3) for _ in responses], {})


def check_ppo_paths(rep, device, tiny):
    """One PPO iteration (one mini-batch: every loss is computed before any update) with the optimizer
    on the device and offloaded to the CPU: losses finite and equal."""
    mcfg = TINY if tiny else QWEN25_05B
    dt = "bfloat16" if torch.device(device).type == "cuda" else "float32"
    out = {}
    for where in ("device", "cpu"):
        cfg = ppo.resolve_config(ppo.PPOConfig(device=torch.device(device).type, dtype=dt, optim_device=where,
                                               samples=2, batch_prompts=8, mini_batch_prompts=8, max_prompt=64,
                                               max_response=16 if tiny else 64, progress=False))
        cfg = ppo.resolve_memory(cfg, M.ModelConfig(**mcfg))
        models = _ppo_setup(mcfg, device, M.parse_dtype(dt), cfg)
        prompts = _prompts(8, mcfg["vocab_size"], 8, 48, seed=3)
        m, _, _ = ppo.ppo_iteration(models, prompts, _reward(), cfg, 1, eos_id=-1, pad_id=0)
        out[where] = (m["actor_loss"], m["value_loss"])
        del models
        _free(device)
    (a1, c1), (a2, c2) = out["device"], out["cpu"]
    finite = all(math.isfinite(x) for x in (a1, c1, a2, c2))
    diff = max(abs(a1 - a2), abs(c1 - c2))
    rep.add("correctness", f"PPO iteration losses, optimizer on {device} vs offloaded to CPU ({dt})",
            f"actor {a1:.6g} / {a2:.6g}, critic {c1:.6g} / {c2:.6g}", "finite and equal (<= 1e-6)",
            "ok" if finite and diff <= 1e-6 * max(1.0, abs(a1), abs(c1)) else "FAIL")


def attention_report(rep, device, tiny):
    """The backend SDPA picks for each of model.py's call types (torch._fused_sdp_choice), in the dtype
    and at the shapes of the 3B config, after model.attention_backends."""
    from torch.nn.attention import SDPBackend
    enabled = attention_backends(device)
    cuda = torch.device(device).type == "cuda"
    rep.add("attention", "CUDA backends enabled (model.attention_backends)", ", ".join(enabled) if cuda else
            "n/a on CPU", "flash, efficient (math as fallback), no cudnn", ("ok" if "cudnn" not in enabled else "FAIL")
            if cuda else "info")
    c = TINY if tiny else QWEN25_3B
    H, KV = c["num_attention_heads"], c["num_key_value_heads"]
    hd = c["hidden_size"] // H
    dt = torch.bfloat16 if cuda else torch.float32
    B, P, S = (4, 32, 48) if tiny else (256, 256, 1000)
    r = lambda *shape: torch.randn(*shape, device=device, dtype=dt)   # noqa: E731
    mask = torch.ones(B, 1, 1, S, dtype=torch.bool, device=device)
    pmask = torch.ones(B, 1, P, P, dtype=torch.bool, device=device).tril()
    cases = [("decode step (T = 1, grouped heads folded, mask)", (r(B, KV, H // KV, hd), r(B, KV, S, hd),
                                                                 r(B, KV, S, hd), mask, 0.0, False), {}),
             ("prefill / training, causal, no mask (enable_gqa)", (r(B, H, P, hd), r(B, KV, P, hd), r(B, KV, P, hd),
                                                                   None, 0.0, True), {"enable_gqa": KV < H}),
             ("prefill / log-probs with padding mask (k/v repeated)", (r(B, H, P, hd), r(B, H, P, hd), r(B, H, P, hd),
                                                                       pmask, 0.0, False), {})]
    for name, args, kw in cases:
        try:
            got = SDPBackend(torch._fused_sdp_choice(*args, **kw)).name
        except Exception as e:   # a private API: report, do not fail the run
            got = f"unknown ({type(e).__name__})"
        bad = cuda and got in ("CUDNN_ATTENTION", "MATH")
        rep.add("attention", name, f"{got} ({str(dt).split('.')[-1]}, B {B})", "FLASH or EFFICIENT on CUDA",
                ("miss" if bad else "ok") if cuda else "info")
    del cases
    _free(device)


def decode_canary(rep, device, dtype, tiny):
    """Eager decode at batch 512, 64 steps with a growing key length: ms per step (prefill subtracted)."""
    mcfg = TINY if tiny else QWEN25_3B
    model = random_model(mcfg, device, dtype)
    batch, plen, steps = (16, 16, 16) if tiny else (512, 256, 64)
    prompts = _prompts(batch, mcfg["vocab_size"], plen, plen, seed=4)
    run = lambda n: M.generate(model, prompts, max_new_tokens=n, temperature=1.0, eos_id=-1, pad_id=0, seed=0)  # noqa
    run(2)                                                          # warm-up
    t1, _ = _timed(lambda: run(1), device)
    tn, _ = _timed(lambda: run(steps), device)
    ms = 1000 * max(tn - t1, 1e-9) / (steps - 1)
    rep.add("canary", f"eager decode, batch {batch}, {plen} prompt + {steps} steps (T = 1)",
            f"{ms:.1f} ms/step, {batch / ms * 1000:,.0f} tok/s (prefill {t1:.2f} s)")
    del model
    _free(device)


def ppo_scaled(rep, device, dtype, tiny):
    """One ppo_iteration of the 3B config scaled down (64 prompts x 4 samples x 256 new tokens), with the
    memory plan ppo.py picks for an 80 GB card: seconds per phase, and peak GPU and host memory against
    the budget printed for these settings. Then the paper-batch 3B plan's figures (computed)."""
    mcfg = TINY if tiny else QWEN25_3B
    dev = torch.device(device)
    dt = "bfloat16" if dtype == torch.bfloat16 else "float32"
    cfg = ppo.resolve_config(ppo.PPOConfig(device=dev.type, dtype=dt, gpu_memory_gb=80, progress=False,
                                           batch_prompts=8 if tiny else 64, mini_batch_prompts=4 if tiny else 32,
                                           max_prompt=256, max_response=16 if tiny else 256))
    mc = M.ModelConfig(**mcfg)
    cfg = ppo.resolve_memory(cfg, mc)
    budget = ppo.memory_budget(cfg, mc)
    _free(device)
    gc.collect()
    host0 = _rss("VmRSS")
    _reset_host_peak()
    models = _ppo_setup(mcfg, device, dtype, cfg)
    lo, hi = (8, 16) if tiny else (192, 256)
    prompts = _prompts(cfg.batch_prompts, mc.vocab_size, lo, hi, 2)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    metrics, _, _ = ppo.ppo_iteration(models, prompts, _reward(), cfg, 1, eos_id=-1, pad_id=0)
    total = time.perf_counter() - t
    where = (f"{cfg.batch_prompts} x {cfg.samples} x {cfg.max_response} new tokens; optimizer on {cfg.optim_device}, "
             f"rollout {cfg.rollout_batch} prompts/call")
    rep.add("ppo", f"one iteration ({where})", f"{total:.1f} s")
    for k in ("rollout", "reward", "prepare", "critic", "actor"):
        rep.add("ppo", f"  phase {k}", f"{metrics['time_' + k]:.1f} s ({100 * metrics['time_' + k] / total:.0f}%)")
    rep.add("ppo", "  rollout tokens/s", f"{metrics['tokens_per_s']:,.0f}")
    finite = all(math.isfinite(metrics[k]) for k in ("actor_loss", "value_loss"))
    mismatch = metrics["logp_mismatch"]
    tol = TOL_LOGP_BF16 if dtype == torch.bfloat16 else TOL_LOGP_FP32
    rep.add("correctness", f"PPO rollout vs recomputed old log-probs ({dt}, mean abs); losses finite",
            f"{mismatch:.2e}; {'finite' if finite else 'NOT finite'}", f"< {tol:g}",
            "ok" if mismatch < tol and finite else "FAIL")
    host = _rss("VmHWM") - host0
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
        rep.add("ppo", "  peak GPU memory (allocated) vs printed budget",
                f"{_gib(peak)} vs {_gib(budget['device_peak'])} ({peak / budget['device_peak']:.2f}x)", "<= budget",
                "ok" if peak <= budget["device_peak"] else "miss")
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    rep.add("ppo", "  peak host memory above the start vs printed budget (host)",
            f"{_gib(host)} vs {_gib(budget['host'])} ({host / budget['host']:.2f}x; RAM {_gib(ram)})",
            "within 10%, < 90% of RAM", "FAIL" if host > 0.9 * ram else
            "info" if budget["host"] < 2**28 else   # --tiny: below the process's own noise, nothing to compare
            "ok" if abs(host / budget["host"] - 1) <= 0.1 else "miss")
    del models
    _free(device)
    if not tiny:   # the paper's batch on the same card: what `ppo.py --model qwen2.5-3b` will plan
        full = ppo.resolve_memory(ppo.resolve_config(ppo.PPOConfig(device="cuda", print_budget=True,
                                                                   gpu_memory_gb=80)), mc)
        b = ppo.memory_budget(full, mc)
        rep.add("ppo", "paper batch 3B plan (256 x 4 x 1,024; computed)",
                f"GPU {_gib(b['device_peak'])}, host {_gib(b['host'])} (pinned {_gib(b['pinned'])}); "
                f"rollout {full.rollout_batch} prompts/call", "GPU <= 80 GB",
                "ok" if b["device_peak"] <= 80e9 else "miss")


def preflight(rep, args, dev) -> bool:
    """Versions, the GPU, host RAM and free disk against the 3B PPO budgets, the Triton toolchain.
    False (and a FAIL row naming the cause) when the check cannot run at all."""
    import shutil
    import sysconfig
    cuda = dev.type == "cuda"
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    rep.add("preflight", "torch / CUDA / cuDNN / driver",
            f"{torch.__version__} / {torch.version.cuda} / {cudnn} / {nvidia_driver()}", "driver >= 580 for CUDA 13")
    if cuda and not torch.cuda.is_available():
        rep.add("preflight", "CUDA device", no_cuda_help(), "a CUDA device", "FAIL")
        return False
    if cuda:
        props = torch.cuda.get_device_properties(0)
        rep.add("preflight", "GPU", f"{props.name}, {_gib(props.total_memory)}, sm {props.major}{props.minor}",
                ">= 80 GB for the 3B run", "ok" if props.total_memory >= 79e9 else "miss")
    mc = M.ModelConfig(**QWEN25_3B)
    plan = ppo.resolve_memory(ppo.resolve_config(ppo.PPOConfig(device="cuda", print_budget=True, gpu_memory_gb=80)), mc)
    b = ppo.memory_budget(plan, mc)
    with open("/proc/meminfo") as f:
        mem = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    rep.add("preflight", "host RAM (total / available) vs the 3B PPO host budget",
            f"{_gib(mem['MemTotal'])} / {_gib(mem['MemAvailable'])} vs {_gib(b['host'])}", "available >= budget",
            "ok" if mem["MemAvailable"] >= b["host"] else "miss")
    out_dir = Path(args.out).absolute().parent
    out_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out_dir).free
    need = 4 * b["checkpoint_policy"]   # the default checkpoint policy: the newest 3 step folders + one being written
    rep.add("preflight", "free disk vs the 3B run's checkpoints (4 policy folders; a state: +75 GiB)",
            f"{_gib(free)} vs {_gib(need)} (+ {_gib(b['checkpoint_state'])})", "free >= folders",
            "ok" if free >= need else "miss")
    gcc = shutil.which("gcc") or shutil.which("cc")
    header = Path(sysconfig.get_paths()["include"]) / "Python.h"
    ok = bool(gcc) and header.is_file()
    rep.add("preflight", "Triton toolchain (gcc, Python.h) for the compiled decode",
            f"{gcc or 'no gcc'}, {'Python.h found' if header.is_file() else 'no ' + str(header)}", "both",
            "ok" if ok else ("miss" if cuda else "info"))
    args.no_triton = cuda and not ok
    return True


# -----------------------------------------------------------------------------


def sft_step(rep, device, tiny):
    mcfg = TINY_LLAMA if tiny else LLAMA_3_2_3B
    dev = torch.device(device)
    _free(device)
    model = random_model(mcfg, device, torch.float32).train()
    model.gradient_checkpointing = True
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.01,
                            fused=dev.type == "cuda")
    micro, seq = (2, 64) if tiny else (4, 2048)
    g = torch.Generator().manual_seed(0)
    examples = [(torch.randint(0, mcfg["vocab_size"], (seq,), generator=g), seq // 2) for _ in range(2 * micro)]
    autocast = "bfloat16" if dev.type == "cuda" else "none"

    def step():
        opt.zero_grad(set_to_none=True)
        loss, _ = sft.batch_loss(model, examples, micro_batch_size=micro, pad_id=0, autocast=autocast, backward=True)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss
    step()                                                   # Adam's state allocated, kernels warm
    seconds, loss = _timed(step, device)
    tokens = 2 * micro * seq
    peak = f", peak GPU {_gib(torch.cuda.max_memory_allocated())}" if dev.type == "cuda" else ""
    rep.add("sft", f"one step, micro-batch {micro} x {seq} tokens, 2 micro-batches",
            f"{seconds:.2f} s, {tokens / seconds:,.0f} tokens/s{peak}", "", "ok" if math.isfinite(loss) else "FAIL")
    del model, opt
    _free(device)


# -----------------------------------------------------------------------------


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (the check) or cpu (with --tiny: test the script)")
    p.add_argument("--tiny", action="store_true", help="tiny configs and sizes: the same code path in about a minute")
    p.add_argument("--out", default="runs/gpu_check.md", help="where the table is written (default: %(default)s)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall-clock budget: a section whose estimate no longer fits is skipped (default: 480 on "
                        "a GPU, none with --tiny)")
    p.add_argument("--skip", default="", help="comma-separated sections to skip: " + ",".join(SECTIONS))
    p.add_argument("--compile-backend", default="",
                   help="torch.compile backend for the decode step (default: model.py's, inductor with CUDA "
                        "graphs; aot_eager with --device cpu, which needs no C++ build)")
    return p


# sections in order of value, with estimated seconds (H100/H200 full size, CPU --tiny)
SECTIONS = {"correctness": (120, 15), "attention": (5, 1), "canary": (40, 3), "ppo": (120, 8), "decode": (90, 8),
            "sft": (40, 4), "compiled": (240, 40)}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cpu" and not args.tiny:
        print("error: the full-size check is for a GPU; on CPU use --tiny", file=sys.stderr)
        return 2
    budget = args.budget_s if args.budget_s is not None else (None if args.tiny else 480.0)
    backend = args.compile_backend or ("aot_eager" if dev.type == "cpu" else "")
    if backend:   # model.py compiles with mode="reduce-overhead" (inductor + CUDA graphs); swap for a light one
        fast_decode._compiled_decode_step = torch.compile(fast_decode._decode_step, backend=backend, fullgraph=True,
                                                          dynamic=False)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    tiny = args.tiny
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    cuda_ok = dev.type == "cuda" and torch.cuda.is_available()
    name = torch.cuda.get_device_name(0) if cuda_ok else f"CPU ({torch.get_num_threads()} threads)"
    header = (f"# gpu_check: {name}, torch {torch.__version__}, {'tiny configs' if tiny else 'full size'}, "
              f"budget {f'{budget:.0f} s' if budget else 'none'}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    rep = Report(Path(args.out), header)
    t0 = time.perf_counter()

    def summary(stopped=""):
        rep.add("all", "wall time", f"{time.perf_counter() - t0:.0f} s", "<= 480 s on an H100/H200" if not tiny else "")
        counts = {k: rep.status.count(k) for k in ("ok", "miss", "FAIL", "skipped")}
        line = (f"summary: {counts['ok']} ok, {counts['miss']} missed goals, {counts['FAIL']} FAIL, "
                f"{counts['skipped']} sections skipped; {time.perf_counter() - t0:.0f} s"
                + (f" of a {budget:.0f} s budget" if budget else "") + stopped)
        print(f"\n{line}\ntable written to {args.out}")
        rep.write(["", line])
        return 1 if rep.failed else 0

    if not preflight(rep, args, dev):
        return summary("; preflight FAILED, nothing else ran")
    attention_backends(dev)

    def correctness():
        small = check_bf16_logits(rep, TINY if tiny else QWEN25_05B, args.device)
        check_rollout_logprobs(rep, small, args.device, tiny)
        check_compiled_sampling(rep, small, args.device)
        del small
        check_offloaded_adam(rep, args.device, tiny)
        check_ppo_paths(rep, args.device, tiny)

    models = {}

    def decode_models():
        if "hf" not in models:
            try:
                models["hf"], models["ours"] = build_models(TINY if tiny else QWEN25_3B, args.device, dtype)
            except ImportError:
                models["hf"], models["ours"] = None, random_model(TINY if tiny else QWEN25_3B, args.device, dtype)
                rep.add("decode", "transformers", "not installed: no baseline rows", "", "info")
        return models["hf"], models["ours"]

    def decode():   # shortened: 256 new tokens at batch 256 (the paper's rollouts: 1,024)
        hf, ours = decode_models()
        decode_case(rep, hf, ours, args.device, 4 if tiny else 256, 16 if tiny else 256, 32 if tiny else 256, 1.0,
                    True, tiny, compiled=False)

    def compiled():
        if args.no_triton:
            rep.add("compiled", "skipped", "no gcc or Python.h: Triton cannot build kernels", "", "skipped")
            return
        hf, ours = decode_models()
        plen = 16 if tiny else 256
        decode_case(rep, hf, ours, args.device, 1, plen, 24 if tiny else 256, 0.0, True, tiny, section="compiled")
        fast_decode.release_static_cache()
        decode_case(rep, hf, ours, args.device, 4 if tiny else 256, plen, 32 if tiny else 256, 1.0, False, tiny,
                    section="compiled")
        fast_decode.release_static_cache()

    run = {"correctness": correctness, "attention": lambda: attention_report(rep, args.device, tiny),
           "canary": lambda: decode_canary(rep, args.device, dtype, tiny),
           "ppo": lambda: ppo_scaled(rep, args.device, dtype, tiny), "decode": decode,
           "sft": lambda: sft_step(rep, args.device, tiny), "compiled": compiled}
    for key, fn in run.items():
        if key in skip:
            continue
        estimate = SECTIONS[key][1 if tiny else 0]
        left = budget - (time.perf_counter() - t0) if budget else None
        if left is not None and estimate > left:
            rep.add(key, "skipped", f"estimated {estimate} s, {max(left, 0):.0f} s of the budget left", "", "skipped")
            continue
        t = time.perf_counter()
        try:
            fn()
        except Exception as e:   # one broken section must not hide the others' results
            traceback.print_exc()
            rep.add(key, "error", f"{type(e).__name__}: {str(e)[:120]}", "", "FAIL")
        rep.add(key, "section wall time", f"{time.perf_counter() - t:.0f} s (estimated {estimate} s)")
        models.clear()   # the decode models go before the next section needs the memory
        _free(args.device)
    return summary()


if __name__ == "__main__":
    sys.exit(main())
