"""The offloaded optimizer's step on CPU: ppo.MasterAdamW (torch's fused AdamW over fp32 masters)
against the same step with torch's per-tensor loop (foreach=False, what MasterAdamW ran before),
both measured here, on bf16 parameters shaped like a transformer's (a few large matrices).

Usage: python bench/bench_adam.py [--params-m 60] [--repeats 3] [--threads 0]
Prints seconds per whole step (clip, Adam, bf16 copy-back; best of --repeats) and the ratio; numbers
depend on the machine and its load.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ppo  # noqa: E402


def shapes(total_m: float):
    """Matrices of one 0.5B-like layer (896 x 4864 MLP, 896 x 896 attention), repeated to ~total_m million."""
    layer = [(4864, 896), (4864, 896), (896, 4864), (896, 896), (128, 896), (128, 896), (896, 896), (896,), (896,)]
    per = sum(torch.Size(s).numel() for s in layer)
    return layer * max(1, round(total_m * 1e6 / per))


def time_step(fused: bool, shp, repeats: int) -> float:
    torch.manual_seed(0)
    params = [torch.nn.Parameter((torch.randn(s) * 0.02).to(torch.bfloat16)) for s in shp]
    opt = ppo.MasterAdamW(params, lr=1e-6, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, master_device="cpu")
    if not fused:   # the same masters, stepped by torch's per-tensor loop
        opt.opt = torch.optim.AdamW(opt.master, lr=1e-6, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                                    foreach=False)
    grads = [torch.randn(s) for s in shp]
    best = float("inf")
    for _ in range(repeats + 1):   # the first step allocates Adam's moments: not timed
        opt._acc = [g.clone() for g in grads]
        t = time.perf_counter()
        opt.step(1e-6, 1.0)
        best = min(best, time.perf_counter() - t) if _ else best
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params-m", type=float, default=60, help="millions of parameters (default: 60)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shp = shapes(args.params_m)
    n = sum(torch.Size(s).numel() for s in shp)
    loop = time_step(False, shp, args.repeats)
    fused = time_step(True, shp, args.repeats)
    print(f"MasterAdamW step (clip, Adam, copy back to bf16) over {n / 1e6:.1f}M parameters ({len(shp)} tensors), "
          f"{torch.get_num_threads()} threads, "
          f"best of {args.repeats}:")
    print(f"  per-tensor loop (foreach=False) {loop:7.3f} s   ({n / loop / 1e6:6.1f}M params/s)")
    print(f"  fused                           {fused:7.3f} s   ({n / fused / 1e6:6.1f}M params/s)")
    print(f"  speedup fused / loop: {loop / fused:.2f}x; at this rate 3.09B parameters take "
          f"{3.09e9 / n * fused:.1f} s (fused) vs {3.09e9 / n * loop:.1f} s (loop) per step")


if __name__ == "__main__":
    main()
