"""Benchmarks for sft.py: training-step throughput and memory. Prints measured figures only.

    python bench/bench_sft.py throughput [--size tiny] [--device cpu] [--threads 1]
        tokens/s of one SFT step (global batch 32) for several micro-batch sizes, with and without
        gradient checkpointing, as ratios to micro-batch 32 without checkpointing measured in the
        same run; also checks that every variant gives the same loss.
    python bench/bench_sft.py memory [--micro-batch-size 4] [--seq-len 2048] [--layers 28]
        full SFT of a random-init Llama-3.2-3B-shaped model (no download) on CUDA: fp32 master
        weights, bf16 autocast, fused AdamW, gradient checkpointing; prints the arithmetic estimate
        and the measured peak CUDA memory of a few steps (needs a GPU; says so and exits otherwise).
    python bench/bench_sft.py processes [--nproc 2] [--size tiny] [--steps 20]
        tokens/s of `python sft.py` (one process) and `torchrun --nproc-per-node N sft.py` (FSDP2 over
        gloo on CPU, one thread per process) on the same data, read from each run's metrics.jsonl
        (median over the steps after the first), and the largest weight difference of the results.
        On a 2-core machine expect little or no gain: the point is the mechanics.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import traces  # noqa: E402
import model as M  # noqa: E402
import sft  # noqa: E402
from plumbing import files  # noqa: E402

LLAMA_3_2_3B = dict(model_type="llama", vocab_size=128256, hidden_size=3072, intermediate_size=8192,
                    num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8, head_dim=128,
                    max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                    rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                    tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001)


def _step(model, optimizer, examples, micro, pad_id, autocast):
    optimizer.zero_grad(set_to_none=True)
    loss, n_tok = sft.batch_loss(model, examples, micro_batch_size=micro, pad_id=pad_id, autocast=autocast,
                                 backward=True)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss, n_tok


def throughput(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = traces.generate_traces(args.condition, 256, seed=0)
    tok = sft.train_tokenizer((t for r in rows for t in (r["query"], r["completion"])), 1024)
    examples, _ = sft.tokenize_examples(tok, rows, 2048)
    batch = examples[:32]
    print(f"{args.size} model, {args.condition} traces, global batch 32, "
          f"{sum(len(e[0]) for e in batch) / 32:.0f} tokens/example, {device}, {torch.get_num_threads()} threads")
    results = {}
    for gc in (False, True):
        for micro in (32, 8, 1):
            model = sft.init_model(args.size, tok, 2048, seed=0).to(device).train()
            model.gradient_checkpointing = gc
            # lr 0: every variant does the same work on the same weights, so losses must agree
            opt = torch.optim.AdamW(model.parameters(), lr=0.0)
            _step(model, opt, batch, micro, tok.pad_id, "none")          # warm-up
            times, loss = [], None
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                loss, n_tok = _step(model, opt, batch, micro, tok.pad_id, "none")
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            best = min(times)
            results[(gc, micro)] = (n_tok / best, loss)
    base_tps, base_loss = results[(False, 32)]
    print(f"{'grad ckpt':>9} {'micro':>5} {'tokens/s':>10} {'vs micro 32':>12} {'loss':>10}")
    for (gc, micro), (tps, loss) in results.items():
        print(f"{str(gc):>9} {micro:>5} {tps:>10.0f} {tps / base_tps:>11.2f}x {loss:>10.6f}")
    worst = max(abs(loss - base_loss) for _, loss in results.values())
    print(f"largest loss difference between variants: {worst:.2e}")


def memory(args):
    est_params = 3_212_749_824
    print("arithmetic (Llama-3.2-3B, 3.21e9 parameters): fp32 weights 12.85 GB + grads 12.85 GB + "
          "Adam m, v 25.70 GB = 51.4 GB, + bf16 weight copies 6.4 GB + activations")
    if not torch.cuda.is_available():
        print("CUDA is not available: the measurement needs a GPU; nothing measured")
        return
    cfg = M.ModelConfig(**dict(LLAMA_3_2_3B, num_hidden_layers=args.layers))
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = M.Transformer(cfg)
    model.train()
    model.gradient_checkpointing = not args.no_grad_checkpointing
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {args.layers} layers, {n_params / 1e9:.3f}e9 parameters "
          f"({n_params / est_params:.3f} of Llama-3.2-3B); "
          f"micro-batch {args.micro_batch_size} x {args.seq_len} tokens, "
          f"grad checkpointing {model.gradient_checkpointing}")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.01, fused=True)
    g = torch.Generator().manual_seed(0)
    # examples of exactly seq_len tokens whose second half is the completion (worst case for the loss)
    examples = [(torch.randint(0, cfg.vocab_size, (args.seq_len,), generator=g), args.seq_len // 2)
                for _ in range(args.micro_batch_size * args.accum)]
    torch.cuda.reset_peak_memory_stats()
    for i in range(args.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss, n_tok = _step(model, opt, examples, args.micro_batch_size, 0, "bfloat16")
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        print(f"step {i}: loss {loss:.4f}, {n_tok / dt:.0f} tokens/s, peak allocated "
              f"{torch.cuda.max_memory_allocated() / 1e9:.2f} GB, "
              f"peak reserved {torch.cuda.max_memory_reserved() / 1e9:.2f} GB")
    print(f"measured peak: {torch.cuda.max_memory_allocated() / 1e9:.2f} GB allocated, "
          f"{torch.cuda.max_memory_reserved() / 1e9:.2f} GB reserved, of "
          f"{torch.cuda.get_device_properties(0).total_memory / 1e9:.1f} GB")


def processes(args):
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "traces.jsonl"
        files.write_jsonl(data, traces.generate_traces(args.condition, args.steps * args.batch_size, seed=0))
        flags = ["--init", args.size, "--data", str(data), "--val-fraction", "0", "--epochs", "1", "--batch-size",
                 str(args.batch_size), "--micro-batch-size", str(args.micro_batch_size), "--device", "cpu",
                 "--num-threads", "1"]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        results = {}
        for n in (1, args.nproc):
            launch = [sys.executable] if n == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                                                      str(n)]
            t0 = time.perf_counter()
            subprocess.run(launch + [str(root / "sft.py"), *flags, "--out", str(tmp / f"run{n}")], cwd=root, env=env,
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wall = time.perf_counter() - t0
            steps = [m for m in files.read_jsonl(tmp / f"run{n}" / "metrics.jsonl") if m["kind"] == "train"]
            results[n] = (statistics.median(m["tokens_per_s"] for m in steps[1:]), wall, steps[-1]["loss"])
        weights = [M.load(tmp / f"run{n}" / "final", dtype="float32")[0].state_dict() for n in (1, args.nproc)]
        dw = max((weights[0][k] - weights[1][k]).abs().max().item() for k in weights[0])
    print(f"{args.size} model from scratch, {args.condition} traces, {args.steps} steps of batch {args.batch_size} "
          f"(micro-batch {args.micro_batch_size}), CPU, 1 thread per process, {os.cpu_count()} cores")
    print(f"{'processes':>9} {'tokens/s (median step)':>23} {'vs 1':>6} {'wall s (incl. start)':>21} {'last loss':>10}")
    for n, (tps, wall, loss) in results.items():
        print(f"{n:>9} {tps:>23.0f} {tps / results[1][0]:>5.2f}x {wall:>21.1f} {loss:>10.6f}")
    print(f"largest |weight difference| after {args.steps} steps, 1 vs {args.nproc} processes: {dw:.2e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("throughput", help="tokens/s by micro-batch size and gradient checkpointing")
    t.add_argument("--size", default="tiny", choices=list(sft.SIZES), help="from-scratch model size")
    t.add_argument("--condition", default="negative_control", help="countdown.py trace condition")
    t.add_argument("--device", default="cpu", help="cpu or cuda")
    t.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    t.add_argument("--repeats", type=int, default=3, help="timed steps per variant (the best is reported)")
    m = sub.add_parser("memory", help="peak CUDA memory of full SFT of a Llama-3.2-3B-shaped model")
    m.add_argument("--micro-batch-size", type=int, default=4, help="sequences per forward/backward")
    m.add_argument("--accum", type=int, default=2, help="micro-batches per step")
    m.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence")
    m.add_argument("--layers", type=int, default=28, help="decoder layers (28 = Llama-3.2-3B)")
    m.add_argument("--steps", type=int, default=3, help="optimizer steps")
    m.add_argument("--no-grad-checkpointing", action="store_true", help="keep all activations")
    p = sub.add_parser("processes", help="tokens/s of sft.py in one process and under torchrun (CPU, gloo)")
    p.add_argument("--nproc", type=int, default=2, help="processes of the torchrun run")
    p.add_argument("--size", default="tiny", choices=list(sft.SIZES), help="from-scratch model size")
    p.add_argument("--condition", default="negative_control", help="countdown.py trace condition")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=32, help="global batch")
    p.add_argument("--micro-batch-size", type=int, default=8, help="examples per forward/backward")
    args = ap.parse_args()
    {"throughput": throughput, "memory": memory, "processes": processes}[args.cmd](args)


if __name__ == "__main__":
    main()
