"""
bench/gpu_check.py: ONE command that checks and measures the one-GPU path, with no download.

    python bench/gpu_check.py                          # on a CUDA machine (an 80 GB H100 or an H200)
    python bench/gpu_check.py --device cpu --tiny      # the same code on CPU with tiny configs (~1 min)

Expected wall time on an H100/H200: about 8-10 minutes (an estimate from the arithmetic below; this
script has not run on a GPU yet): ~4-5 min of torch.compile for six decode graphs (the 3B config's
length buckets 512, 1024 and 1280 and its batch-1 graph, two row counts of the 0.5B config) and the
decode timings, ~4 min for the PPO iteration, under a minute for the rest. It prints one markdown table
as it goes, writes it to --out, and exits 1 if a correctness check fails (0 otherwise; a missed
speed goal is reported, not fatal).

The models are random weights in real configs: Qwen2.5-3B's (36 layers, d 2048, vocab 151,936),
Qwen2.5-0.5B's for the fp32 checks, Llama-3.2-3B's for SFT. Random weights never emit an EOS, so
every response runs to its length limit: the worst case.

  correctness (0.5B config)  bf16 logits against fp32 (relative L2 error, tolerance 5e-2); a PPO
                             rollout's log-probs against ppo.py's recomputation (fp32, 1e-3); the
                             CPU-offloaded MasterAdamW against torch's AdamW on the same gradients
                             (equal: a GPU->host copy read before it lands would differ); compiled
                             vs eager T = 1 tokens (fp32) with rows ending at different steps (the
                             sampler inside the compiled step, finished rows compacted)
  decode (3B config, bf16)   batch 1 (256 prompt + 256 new, greedy) and batch 256 (256 prompt +
                             1,024 new, T = 1 sampling): tokens/s of transformers' generate, ours
                             eager (batch 1) and ours compiled (attention over length buckets of the
                             filled cache: 512, 1024, 1280 here, one graph each, compiled in the
                             warm-up run); compiled vs eager greedy tokens equal
                             (a split at a near-tie of the top-2 logits, gap < 0.1 in bf16, is
                             allowed and shown); achieved bandwidth = (weights + filled KV cache
                             bytes) per step / step time, against the card's peak.
                             Goals: >= 2x transformers at batch 256, >= 60% of peak at batch 1.
  PPO (3B config)            one ppo_iteration at the paper's batch (256 prompts x 4 samples, 256-token
                             prompts, --ppo-max-response new tokens) with the memory plan ppo.py
                             picks for an 80 GB card: seconds per phase, peak GPU memory (goal:
                             within 80 GB), peak host memory, and the log-prob mismatch (bf16, 0.05).
  SFT (Llama-3.2-3B config)  one step at micro-batch 4 x 2,048 tokens (2 micro-batches), as sft.py
                             trains (fp32 weights, bf16 autocast, fused AdamW, gradient
                             checkpointing): seconds and peak GPU memory.
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
    """The table: rows (section, check, measured, goal, status), printed as they come, written at the end."""

    def __init__(self, out: Path, header: str):
        self.out, self.rows, self.failed = out, [], False
        self.lines = [header, "", "| section | check | measured | goal / tolerance | status |", "|---|---|---|---|---|"]
        print("\n".join(self.lines), flush=True)

    def add(self, section, check, measured, goal="", status="info"):
        if status == "FAIL":
            self.failed = True
        line = f"| {section} | {check} | {measured} | {goal} | {status} |"
        self.lines.append(line)
        print(line, flush=True)

    def write(self):
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(f".{self.out.name}.tmp-{os.getpid()}")
        tmp.write_text("\n".join(self.lines) + "\n", encoding="utf-8")
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
    cfg = ppo._resolve(ppo.PPOConfig(device=torch.device(device).type, dtype="float32", adv="grpo", kl_coef=0.0,
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
    inner = M._compiled_step()
    M._compiled_decode_step = lambda *a: rows.append(a[2].shape[0]) or inner(*a)
    try:
        comp = M.generate(policy, prompts, eos_id=eos, compile=True, **kw)
    finally:
        M._compiled_decode_step = inner
        M.release_static_cache()
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
    theirs = torch.optim.AdamW(ref, **kw)
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


def decode_case(rep, hf, ours, device, batch, plen, new, temperature, eager, tiny):
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
    impls["ours compiled"] = (lambda: ours_run(True, short, -1), lambda: ours_run(True, new, -1))
    # one full-length run compiles (and records the CUDA graph of) every length bucket it crosses
    t_compile, _ = _timed(impls["ours compiled"][1], device)
    rep.add("decode", f"compile + warm-up, batch {batch}", f"{t_compile:.1f} s")
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
        rep.add("decode", f"{name}: {label}", f"{batch / step_s:,.0f} tok/s{vs}", goal, status)
    # achieved bandwidth: weights + the filled part of the KV cache, read once per step (mean fill)
    step_s = rates["ours compiled"]
    gbps = bytes_per_decode_step(ours, batch, plen + new // 2) / step_s / 1e9
    if torch.device(device).type == "cuda":
        peak, source = peak_bandwidth_gbps()
        share = gbps / peak if peak else None
        goal = ">= 60% of peak" if batch == 1 else ""
        status = ("ok" if share >= 0.6 else "miss") if (share is not None and batch == 1) else "info"
        rep.add("decode", f"ours compiled, batch {batch}: achieved bandwidth",
                f"{gbps:,.0f} GB/s = {share:.0%} of {peak:,.0f} GB/s ({source})" if share else f"{gbps:,.0f} GB/s",
                goal, status)
    else:
        rep.add("decode", f"ours compiled, batch {batch}: achieved bandwidth", f"{gbps:.2f} GB/s (CPU: no peak)")
    if temperature == 0 and eager:   # compiled vs eager greedy tokens
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
        rep.add("correctness", "compiled vs eager greedy tokens (bf16)" if not tiny else "compiled vs eager greedy tokens",
                detail, f"equal, or split at a top-2 gap < {TIE_GAP_BF16}", "FAIL" if bad else "ok")


# -----------------------------------------------------------------------------
# one PPO iteration, one SFT step


def ppo_iteration(rep, device, dtype, tiny, max_response):
    mcfg = TINY if tiny else QWEN25_3B
    dev = torch.device(device)
    dt = "bfloat16" if dtype == torch.bfloat16 else "float32"
    cfg = ppo._resolve(ppo.PPOConfig(device=dev.type, dtype=dt, gpu_memory_gb=80, progress=False,
                                     batch_prompts=8 if tiny else 256, mini_batch_prompts=4 if tiny else 128,
                                     max_prompt=256, max_response=max_response))
    mc = M.ModelConfig(**mcfg)
    cfg = ppo._resolve_memory(cfg, mc)
    budget = ppo.memory_budget(cfg, mc)
    _free(device)
    policy = random_model(mcfg, device, dtype)
    policy.gradient_checkpointing = cfg.grad_checkpointing
    backbone = copy.deepcopy(policy)
    ref = copy.deepcopy(policy).requires_grad_(False)
    if cfg.ref_offload and dev.type == "cuda":
        ref = ref.to("cpu")
    critic = ppo.Critic(backbone).eval()
    optim = "cpu" if cfg.optim_device == "cpu" else dev
    adam = dict(betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
                master_device=optim)
    models = ppo.Models(policy, critic, ref, ppo.MasterAdamW(policy.parameters(), lr=cfg.actor_lr, **adam),
                        ppo.MasterAdamW(critic.parameters(), lr=cfg.critic_lr, **adam), dev,
                        ref_offload=cfg.ref_offload and dev.type == "cuda")
    prompts = _prompts(cfg.batch_prompts, mc.vocab_size, (3 * 256) // 4 if not tiny else 8, 256 if not tiny else 16, 2)
    rng = random.Random(0)
    reward = lambda responses: ([float(rng.random() < 0.3) for _ in responses], {})  # noqa: E731
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    metrics, _, _ = ppo.ppo_iteration(models, prompts, reward, cfg, 1, eos_id=-1, pad_id=0)
    total = time.perf_counter() - t
    where = (f"{cfg.batch_prompts} x {cfg.samples}, {cfg.max_response} new tokens; optimizer on {cfg.optim_device}, "
             f"rollout {cfg.rollout_batch} prompts/call")
    rep.add("ppo", f"one iteration ({where})", f"{total:.1f} s")
    for k in ("rollout", "reward", "prepare", "critic", "actor"):
        rep.add("ppo", f"  phase {k}", f"{metrics['time_' + k]:.1f} s ({100 * metrics['time_' + k] / total:.0f}%)")
    rep.add("ppo", "  rollout tokens/s", f"{metrics['tokens_per_s']:,.0f}")
    mismatch = metrics["logp_mismatch"]
    tol = TOL_LOGP_BF16 if dtype == torch.bfloat16 else TOL_LOGP_FP32
    rep.add("correctness", f"PPO rollout vs recomputed old log-probs ({dt}, mean abs)", f"{mismatch:.2e}",
            f"< {tol:g}", "ok" if mismatch < tol else "FAIL")
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
        rep.add("ppo", "  peak GPU memory (allocated; budget computed)",
                f"{_gib(peak)} (budget {_gib(budget['device_peak'])})", "<= 80 GiB",
                "ok" if peak <= 80 * 2**30 else "miss")
    rep.add("ppo", "  peak host memory (process RSS so far)", _gib(_host_peak()))
    del models, policy, backbone, ref, critic
    _free(device)


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
    p.add_argument("--ppo-max-response", type=int, default=0,
                   help="new tokens per PPO rollout (default: 1,024, the paper's; 16 with --tiny)")
    p.add_argument("--skip", default="", help="comma-separated sections to skip: correctness,decode,ppo,sft")
    p.add_argument("--compile-backend", default="",
                   help="torch.compile backend for the decode step (default: model.py's, inductor with CUDA "
                        "graphs; aot_eager with --device cpu, which needs no C++ build)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device; run on a GPU machine, or test the script with --device cpu --tiny",
              file=sys.stderr)
        return 2
    if dev.type == "cpu" and not args.tiny:
        print("error: the full-size check is for a GPU; on CPU use --tiny", file=sys.stderr)
        return 2
    backend = args.compile_backend or ("aot_eager" if dev.type == "cpu" else "")
    if backend:   # model.py compiles with mode="reduce-overhead" (inductor + CUDA graphs); swap for a light one
        M._compiled_decode_step = torch.compile(M._decode_step, backend=backend, fullgraph=True, dynamic=False)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    tiny = args.tiny
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(0) if dev.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    header = (f"# gpu_check: {name}, torch {torch.__version__}, {'tiny configs' if tiny else 'full size'}, "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    rep = Report(Path(args.out), header)
    t0 = time.perf_counter()

    def section(key, fn, *a):
        if key in skip:
            return
        t = time.perf_counter()
        try:
            fn(*a)
        except Exception as e:   # one broken section must not hide the others' results
            traceback.print_exc()
            rep.add(key, "error", f"{type(e).__name__}: {str(e)[:120]}", "", "FAIL")
        rep.add(key, "section wall time", f"{time.perf_counter() - t:.0f} s")
        _free(args.device)

    def correctness():
        small = check_bf16_logits(rep, TINY if tiny else QWEN25_05B, args.device)
        check_rollout_logprobs(rep, small, args.device, tiny)
        check_compiled_sampling(rep, small, args.device)
        del small
        check_offloaded_adam(rep, args.device, tiny)

    def decode():
        try:
            hf, ours = build_models(TINY if tiny else QWEN25_3B, args.device, dtype)
        except ImportError:
            hf, ours = None, random_model(TINY if tiny else QWEN25_3B, args.device, dtype)
            rep.add("decode", "transformers", "not installed: no baseline rows", "", "info")
        plen = 16 if tiny else 256
        decode_case(rep, hf, ours, args.device, 1, plen, 24 if tiny else 256, 0.0, True, tiny)
        M.release_static_cache()
        decode_case(rep, hf, ours, args.device, 4 if tiny else 256, plen, 32 if tiny else 1024, 1.0, False, tiny)
        M.release_static_cache()

    section("correctness", correctness)
    section("decode", decode)
    section("ppo", ppo_iteration, rep, args.device, dtype, tiny, args.ppo_max_response or (16 if tiny else 1024))
    section("sft", sft_step, rep, args.device, tiny)
    rep.add("all", "wall time", f"{time.perf_counter() - t0:.0f} s", "<= 480 s on an H100/H200" if not tiny else "")
    rep.write()
    print(f"\ntable written to {args.out}; {'a correctness check FAILED' if rep.failed else 'all correctness checks ok'}")
    return 1 if rep.failed else 0


if __name__ == "__main__":
    sys.exit(main())
