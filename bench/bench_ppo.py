"""Measure what ppo.py's chunked log-probs buy, and where a PPO step spends its time.

1. Log-prob + entropy forward/backward through an LM head of a large vocabulary: the plain
   [N, V] fp32 log_softmax against ppo.token_logprobs in chunks (recomputed in backward). Each
   variant runs in a fresh subprocess; we report its peak resident memory above a baseline
   subprocess that builds the same inputs but computes nothing, and its time.
2. One PPO iteration on a small random model (CPU or CUDA): seconds per phase from ppo's metrics.

Usage: python bench/bench_ppo.py [--tokens 2048] [--vocab 151936] [--device cpu]
Numbers depend on the machine and its load; they are printed, never asserted.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from plumbing.memory import MMAP_THRESHOLD  # noqa: E402


def _logprob_child(kind: str, tokens: int, vocab: int, hidden: int, chunk: int):
    import torch
    import torch.nn.functional as F
    import ppo
    torch.manual_seed(0)
    head = torch.nn.Linear(hidden, vocab, bias=False)
    h = torch.randn(1, tokens, hidden, requires_grad=True)
    y = torch.randint(0, vocab, (1, tokens))
    mask = torch.ones(1, tokens)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    if kind == "full":
        logp_all = F.log_softmax(head(h).float(), -1)                     # [1, N, V] fp32
        lp = logp_all.gather(-1, y[..., None])[..., 0]
        ent = -(logp_all.exp() * logp_all).sum(-1)
        (lp.sum() + 0.001 * ent.sum()).backward()
    elif kind == "chunked":
        lp, ent = ppo.token_logprobs(head, h, y, mask, chunk=chunk, with_entropy=True)
        (lp.sum() + 0.001 * ent.sum()).backward()
    dt = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"kind": kind, "extra_peak_mib": (peak - base) / 1024, "seconds": dt}))


def bench_logprobs(args):
    print(f"log-prob + entropy, forward + backward, {args.tokens} tokens, vocab {args.vocab}, hidden {args.hidden}:")
    full_bytes = args.tokens * args.vocab * 4
    print(f"  one [N, V] fp32 tensor is {full_bytes / 2**20:.0f} MiB")
    rows = {}
    for kind in ("none", "full", "chunked"):
        out = subprocess.run([sys.executable, __file__, "--child", kind, "--tokens", str(args.tokens), "--vocab",
                              str(args.vocab), "--hidden", str(args.hidden), "--chunk", str(args.chunk)],
                             capture_output=True, text=True, check=True)
        rows[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    for kind in ("full", "chunked"):
        r = rows[kind]
        extra = r['extra_peak_mib'] - rows['none']['extra_peak_mib']
        print(f"  {kind:<8} peak +{extra:8.0f} MiB   {r['seconds']:6.2f} s")
    ratio = (rows["full"]["extra_peak_mib"] - rows["none"]["extra_peak_mib"]) / max(
        1.0, rows["chunked"]["extra_peak_mib"] - rows["none"]["extra_peak_mib"])
    print(f"  memory ratio full / chunked (chunk {args.chunk}): {ratio:.1f}x; "
          f"time ratio chunked / full: {rows['chunked']['seconds'] / rows['full']['seconds']:.2f}x")


def bench_step(args):
    import copy
    import random
    import torch
    import model as M
    import ppo
    torch.manual_seed(0)
    mc = M.ModelConfig(vocab_size=1024, hidden_size=256, intermediate_size=768, num_hidden_layers=6,
                       num_attention_heads=8, num_key_value_heads=4, eos_token_id=0, tie_word_embeddings=True)
    device = torch.device(args.device)
    policy = M.Transformer(mc).to(device).eval()
    cfg = ppo.resolve_config(ppo.PPOConfig(device=args.device, dtype="float32", batch_prompts=16, samples=4,
                                           mini_batch_prompts=8, micro_batch=16, max_response=args.max_response,
                                           actor_lr=1e-5, critic_lr=1e-5, progress=False))
    adam = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, master_device=device)
    critic = ppo.Critic(copy.deepcopy(policy)).eval()
    ref = copy.deepcopy(policy).requires_grad_(False)
    models = ppo.Models(policy, critic, ref, ppo.MasterAdamW(policy.parameters(), lr=1e-5, **adam),
                        ppo.MasterAdamW(critic.parameters(), lr=1e-5, **adam), device)
    rng = random.Random(0)
    prompts = [[rng.randint(1, 1023) for _ in range(40)] for _ in range(cfg.batch_prompts)]
    print(f"one PPO iteration, {sum(p.numel() for p in policy.parameters()) / 1e6:.1f}M-parameter random model on "
          f"{args.device}, {cfg.batch_prompts} prompts x {cfg.samples} samples, 40-token prompts, "
          f"{cfg.max_response} new tokens (random weights rarely stop early):")
    for step in (1, 2):
        m, _, _ = ppo.ppo_iteration(models, prompts, lambda r: ([0.0] * len(r), {}), cfg, step, eos_id=0, pad_id=0)
    phases = ["time_rollout", "time_prepare", "time_critic", "time_actor"]
    total = sum(m[k] for k in phases)
    for k in phases:
        print(f"  {k[5:]:<8} {m[k]:7.2f} s  ({100 * m[k] / total:4.1f}%)")
    print(f"  rollout tokens/s {m['tokens_per_s']:.0f}")


# -----------------------------------------------------------------------------
# 3. The printed memory budget against the measured peak (CPU, small scale)

MEMORY_MODEL = dict(vocab_size=16384, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                    num_attention_heads=6, num_key_value_heads=2, eos_token_id=0, tie_word_embeddings=True)


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def _memory_child(spec: dict):
    import copy
    import random
    import torch
    import model as M
    import ppo
    torch.set_num_threads(1)
    mc = M.ModelConfig(**spec["model"])
    cfg = ppo.resolve_memory(ppo.resolve_config(ppo.PPOConfig(device="cpu", progress=False, **spec["ppo"])), mc)
    rng = random.Random(0)
    prompts = [[rng.randint(1, mc.vocab_size - 1) for _ in range(cfg.max_prompt)] for _ in range(cfg.batch_prompts)]
    torch.ones(8) @ torch.ones(8)                       # torch's own first allocations: in the baseline
    base = _rss("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:       # reset the peak (VmHWM) to the current RSS
        f.write("5")
    torch.manual_seed(0)
    policy = M.Transformer(mc).eval()
    policy.gradient_checkpointing = cfg.grad_checkpointing
    critic = ppo.Critic(copy.deepcopy(policy)).eval()
    ref = copy.deepcopy(policy).requires_grad_(False)
    adam = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, master_device="cpu")
    models = ppo.Models(policy, critic, ref, ppo.MasterAdamW(policy.parameters(), lr=1e-5, **adam),
                        ppo.MasterAdamW(critic.parameters(), lr=1e-5, **adam), torch.device("cpu"))
    for step in (1, 2):                                 # the second: Adam's moments exist from the start
        ppo.ppo_iteration(models, prompts, lambda r: ([float(i % 2) for i in range(len(r))], {}), cfg, step,
                          eos_id=-1, pad_id=0)
    budget = ppo.memory_budget(cfg, mc)
    print(json.dumps({"measured": _rss("VmHWM") - base, "budget": budget["host"], "baseline": base,
                      "params": budget["params_policy"]}))


# glibc's malloc raises its mmap threshold (up to 32 MiB) each time it frees a mapped block, so later
# blocks below that size come from its heap, which keeps freed pages: the peak RSS then carries the
# allocator's retention (measured 5-18% above the tensors alive at this scale) on top of what PPO
# allocates. A fixed threshold returns every large freed block at once, so RSS tracks the live tensors
# that memory_budget counts. Both figures are reported.
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}


def measure_memory(model: Optional[dict] = None, fixed_threshold: bool = True, **ppo_kw) -> dict:
    """One subprocess: two PPO iterations on a random model; its peak RSS above the process's baseline
    (after imports) against memory_budget's host total for the same settings. fixed_threshold: glibc's
    mmap threshold fixed (see above); False: the allocator's defaults, retention included."""
    spec = {"model": model or MEMORY_MODEL,
            "ppo": dict(dict(batch_prompts=4, samples=2, mini_batch_prompts=4, max_prompt=32, max_response=32,
                             infer_batch=8), **ppo_kw)}
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    env.update(FIXED_MMAP_THRESHOLD if fixed_threshold else {})
    out = subprocess.run([sys.executable, __file__, "--memory-child", json.dumps(spec)], capture_output=True,
                         text=True, check=True, cwd=ROOT, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_memory():
    for fixed in (True, False):
        r = measure_memory(fixed_threshold=fixed)
        how = "glibc mmap threshold fixed at 128 KiB" if fixed else "glibc defaults (its retention included)"
        print(f"host memory, one PPO process on CPU ({r['params'] / 1e6:.1f}M-parameter policy, critic and "
              f"reference, AdamW; {how}): peak RSS above the {r['baseline'] / 2**20:.0f} MiB baseline "
              f"{r['measured'] / 2**20:.0f} MiB, printed budget {r['budget'] / 2**20:.0f} MiB: "
              f"measured / budget {r['measured'] / r['budget']:.3f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-response", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--memory-only", action="store_true", help="only the budget vs measured memory check")
    args = ap.parse_args()
    if args.memory_child:
        _memory_child(json.loads(args.memory_child))
        return
    if args.memory_only:
        bench_memory()
        return
    if args.child:
        _logprob_child(args.child, args.tokens, args.vocab, args.hidden, args.chunk)
        return
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    bench_logprobs(args)
    bench_step(args)
    bench_memory()


if __name__ == "__main__":
    main()
