"""
Generation speed: our model.generate against transformers' generate, same weights, same batch and
lengths, measured in one run.

CPU (default): a small random Llama (58M parameters), batch 1 and batch 64, 64 prompt tokens and
128 new tokens, greedy and with T = 1 sampling (what PPO rollouts do); --ppo adds a PPO-like case:
8 prompts x 4 samples (ours shares each prompt's prefill, transformers' num_return_sequences does
not), 192-token prompts (a Countdown prompt is ~150-200) and 512 new tokens, at T = 1.
--cpu-static adds the fast path run eagerly (static=True, what compile=True compiles; inductor on
this CPU needs minutes of C++ builds per length bucket, --cpu-compile), with and without its
length-bucketed attention.
--gpu: Qwen2.5-3B's config in bfloat16 at batch 1 and batch 256 x 512 new tokens; our eager and
compiled (static shapes + CUDA graphs) paths against transformers, plus the memory bandwidth our
batch-1 decode achieves against the card's peak. --smoke runs that GPU code path on CPU with a tiny
config, to check the script (its numbers mean nothing).

Method: prefill time = a generate call with max_new_tokens=1 (prefill + one sample); decode time
= (time with N new tokens - that) / (N - 1) steps. Implementations alternate within each repeat
and the fastest repeat counts, because the machine may be shared. EOS is disabled so every row
runs N steps. transformers is a baseline here only; project code never imports it.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model as M  # noqa: E402
from plumbing import fast_decode  # noqa: E402

CPU_CONFIG = dict(model_type="llama", vocab_size=32000, hidden_size=512, intermediate_size=1536,
                  num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                  max_position_embeddings=4096, rope_theta=500000.0, tie_word_embeddings=False)
QWEN25_3B = dict(model_type="qwen2", vocab_size=151936, hidden_size=2048, intermediate_size=11008,
                 num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                 max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                 tie_word_embeddings=True)
SMOKE_CONFIG = dict(QWEN25_3B, vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2)
# peak DRAM bandwidth in GB/s by device name, used when torch does not report clock and bus width
PEAK_GBPS = {"H200": 4800, "H100 NVL": 3900, "H100 PCIe": 2000, "H100": 3350, "A100-SXM4-80GB": 2039,
             "A100 80GB PCIe": 1935, "A100": 1555, "L40S": 864, "A10G": 600, "RTX 4090": 1008}


def build_models(cfg: dict, device, dtype):
    """A random transformers model and our Transformer sharing its weight tensors (no second copy)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    hf_kw = {k: v for k, v in cfg.items() if k != "model_type"}
    if cfg["model_type"] == "llama":
        hf_cfg, cls = LlamaConfig(**hf_kw), LlamaForCausalLM
    else:
        hf_cfg, cls = Qwen2Config(**hf_kw), Qwen2ForCausalLM
    hf_cfg.bos_token_id = hf_cfg.eos_token_id = None  # no early stop: every row decodes N tokens
    hf_cfg.pad_token_id = 0
    with torch.device(device):
        hf = cls(hf_cfg).to(dtype).eval()
    hf.generation_config.eos_token_id = hf.generation_config.bos_token_id = None
    hf.generation_config.pad_token_id = 0
    with torch.device("meta"):  # the config via config.json's dict, so no default can differ
        ours = M.Transformer(M.ModelConfig.from_hf(hf.config.to_dict()))
    state = {M._hf_to_ours(k): v for k, v in hf.state_dict().items()}
    if cfg["tie_word_embeddings"]:
        state.pop("lm_head.weight", None)
    ours.load_state_dict(state, strict=False, assign=True)
    if cfg["tie_word_embeddings"]:
        ours.lm_head.weight = ours.embed_tokens.weight
    ours.inv_freq = M.rope_inv_freq(ours.config, device=torch.device(device))
    return hf, ours.eval()


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def runners(hf, ours, ids, compile_ours: bool, temperature: float = 0.0, n_samples: int = 1, static_ours=False):
    """name -> f(n_new) running one generation of n_new tokens for the prompts ids [B, P] (n_samples
    each): greedy at temperature 0, else plain sampling at that temperature (no top-k, no top-p)."""
    prompts = ids.tolist()
    sample = dict(do_sample=False) if temperature == 0 else dict(do_sample=True, temperature=temperature, top_k=0,
                                                                 top_p=1.0)

    def run_hf(n):
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              num_return_sequences=n_samples, **sample)
            return out[:, ids.shape[1]:]

    def run_ours(whole_cache=False, **fast):
        def run(n):
            attend_len = fast_decode._attend_len
            if whole_cache:   # the fast path as it was: every step attends over the whole cache
                fast_decode._attend_len = lambda filled, cache_len: cache_len
            try:
                return M.generate(ours, prompts, max_new_tokens=n, n_samples=n_samples, temperature=temperature,
                                  eos_id=-1, pad_id=0, seed=0, **fast).tokens
            finally:
                fast_decode._attend_len = attend_len
        return run

    out = {"transformers": run_hf, "ours": run_ours()}
    if static_ours:
        out["ours static, whole cache"] = run_ours(whole_cache=True, static=True)
        out["ours static"] = run_ours(static=True)
    if compile_ours:
        out["ours compiled"] = run_ours(compile=True)
    return out


def bench_case(hf, ours, batch, prompt_len, new_tokens, device, repeats, compile_ours, temperature=0.0, n_samples=1,
               static_ours=False):
    """batch prompts x n_samples rows; decode tok/s counts every row's tokens."""
    vocab = ours.config.vocab_size
    ids = torch.randint(1, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(batch)).to(device)
    fns = runners(hf, ours, ids, compile_ours, temperature, n_samples, static_ours)
    rows_n = batch * n_samples
    outs = {name: f(new_tokens) for name, f in fns.items()}  # warm-up (and compilation), same shapes
    for f in fns.values():
        f(1)
    ref = outs["transformers"]
    agree = {name: float((o == ref).float().mean()) for name, o in outs.items()}
    t1 = {name: [] for name in fns}
    tn = {name: [] for name in fns}
    for _ in range(repeats):
        for name, f in fns.items():  # alternate implementations within a repeat
            t1[name].append(timed(lambda: f(1), device))
            tn[name].append(timed(lambda: f(new_tokens), device))
    rows = {}
    for name in fns:
        p, full = min(t1[name]), min(tn[name])
        decode_s = max(full - p, 1e-9) / (new_tokens - 1)  # seconds per decode step
        rows[name] = dict(prefill=batch * prompt_len / p, decode=rows_n / decode_s, step_s=decode_s,
                          agree=agree[name], spread=statistics.pstdev(tn[name]) / statistics.mean(tn[name]))
    return rows


def peak_bandwidth_gbps(override=None):
    if override:
        return override, "--peak-gbps"
    props = torch.cuda.get_device_properties(0)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:  # double data rate: two transfers per clock
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9, "clock x bus width"
    for key, gbps in PEAK_GBPS.items():
        if key in props.name:
            return gbps, "name table"
    return None, "unknown (pass --peak-gbps)"


def bytes_per_decode_step(ours, batch, cache_len) -> int:
    """Weights (each read once per step; a tied head is the embedding, counted once) + KV cache read."""
    cfg = ours.config
    weights = sum(p.numel() * p.element_size() for p in ours.parameters())  # parameters() dedups ties
    el = ours.embed_tokens.weight.element_size()
    kv = 2 * cfg.num_hidden_layers * batch * cfg.num_key_value_heads * cache_len * cfg.head_dim * el
    return weights + kv


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", action="store_true", help="Qwen2.5-3B config, bf16, on CUDA")
    ap.add_argument("--smoke", action="store_true", help="run the --gpu code path on CPU with a tiny config")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for both implementations")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cpu-compile", action="store_true", help="CPU mode: also time our compiled path (inductor "
                    "builds C++ for each length bucket's graph first: minutes on a 2-core CPU)")
    ap.add_argument("--cpu-static", action="store_true", help="CPU mode: also time the fast path without compiling "
                    "(static=True: length-bucketed attention, the sampler as the compiled step runs it), and "
                    "the same path attending over the whole preallocated cache, as it did before the buckets")
    ap.add_argument("--peak-gbps", type=float, default=None, help="the card's peak memory bandwidth")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=None, help="default: 128 on CPU, 512 with --gpu")
    ap.add_argument("--greedy-only", action="store_true", help="CPU mode: skip the T = 1 sampling cases")
    ap.add_argument("--sampled-only", action="store_true", help="CPU mode: skip the greedy cases")
    ap.add_argument("--ppo", action="store_true", help="CPU mode: add the PPO-like case (8 x 4 rows, 192 + 512 tokens)")
    ap.add_argument("--ppo-only", action="store_true", help="CPU mode: only the PPO-like case")
    ap.add_argument("--ppo-prompts", type=int, default=8, help="prompts (x 4 samples) of the PPO-like case")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    if args.gpu or args.smoke:
        if args.gpu and not torch.cuda.is_available():
            sys.exit("error: --gpu needs a CUDA device (try --smoke to check the script on CPU)")
        device, dtype = ("cuda", torch.bfloat16) if args.gpu else ("cpu", torch.float32)
        cfg = QWEN25_3B if args.gpu else SMOKE_CONFIG
        new = args.new_tokens or (512 if args.gpu else 16)
        cases = [(1, args.prompt_len, new), (256, args.prompt_len, new)] if args.gpu else [(1, 8, new), (4, 8, new)]
        compile_ours = True
    else:
        device, dtype, cfg = "cpu", torch.float32, CPU_CONFIG
        new = args.new_tokens or 128
        cases = [] if args.sampled_only else [(1, args.prompt_len, new), (64, args.prompt_len, new)]
        if not args.greedy_only:
            cases += [(1, args.prompt_len, new, 1.0), (64, args.prompt_len, new, 1.0)]
        if args.ppo_only:
            cases = []
        if args.ppo or args.ppo_only:
            cases += [(args.ppo_prompts, 192, 512, 1.0, 4)]
        compile_ours = args.cpu_compile
    hf, ours = build_models(cfg, device, dtype)
    n_params = sum(p.numel() for p in ours.parameters())
    name = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# {name}; torch {torch.__version__}; model {cfg['model_type']} {n_params / 1e6:.0f}M params, "
          f"{str(dtype).replace('torch.', '')}; best of {args.repeats}")
    print("| rows (prompts x samples) | prompt | new | sampling | implementation | prefill tok/s | decode tok/s "
          "| decode vs transformers | same tokens as transformers |")
    print("|---|---|---|---|---|---|---|---|---|")
    results = {}
    for batch, plen, new, *rest in cases:
        temperature = rest[0] if len(rest) > 0 else 0.0
        n_samples = rest[1] if len(rest) > 1 else 1
        rows = bench_case(hf, ours, batch, plen, new, device, args.repeats, compile_ours, temperature, n_samples,
                          static_ours=args.cpu_static and device == "cpu" and not args.smoke)
        if temperature == 0:
            results[batch] = (rows, plen, new)
        base = rows["transformers"]["decode"]
        for impl, r in rows.items():
            same = f"{r['agree']:.0%}" if temperature == 0 else "n/a (sampled)"
            sampling = "greedy" if temperature == 0 else f"T = {temperature:g}"
            print(f"| {batch} x {n_samples} | {plen} | {new} | {sampling} "
                  f"| {impl} | {r['prefill']:,.0f} | {r['decode']:,.1f} | {r['decode'] / base:.2f}x | {same} |")
        sys.stdout.flush()
    if device == "cuda" or args.smoke:
        rows, plen, new = results[1]
        r = rows["ours compiled"]
        gbps = bytes_per_decode_step(ours, 1, plen + new // 2) / r["step_s"] / 1e9   # the mean filled length
        peak, source = peak_bandwidth_gbps(args.peak_gbps) if device == "cuda" else (None, "n/a on CPU")
        share = f"{gbps / peak:.0%} of peak {peak:,.0f} GB/s ({source})" if peak else f"peak: {source}"
        print(f"\nbatch-1 compiled decode: {1 / r['step_s']:.1f} tok/s, achieved memory bandwidth "
              f"{gbps:,.0f} GB/s = {share}")


if __name__ == "__main__":
    main()
