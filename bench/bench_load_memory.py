"""
Peak host memory while model.load reads a checkpoint, against the size of its weights.

Builds a random Llama checkpoint of about --size-gb on disk (in --dtype), then loads it with
model.load in a fresh Python process and reports that process's peak resident memory (VmHWM, the
kernel's high-water mark, which also counts the interpreter and torch) against the weights' bytes.
(Not ru_maxrss: Linux carries it over from the parent across fork + exec.) The checkpoint is built
in a separate process too, so nothing of it is resident in the measuring one.
The target is a peak of at most 1.3x the weights. The checkpoint is deleted afterwards unless --keep.
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import model as M  # noqa: E402

# runs in the fresh process: memory after imports, then load, then the high-water mark
CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import torch, model as M

def status(key):  # kB figures from /proc/self/status
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
before = status("VmRSS")
m, tok = M.load(sys.argv[2], dtype=sys.argv[3])
weights = sum(p.numel() * p.element_size() for p in m.parameters())
print(json.dumps(dict(before=before, peak=status("VmHWM"), weights=weights,
                      dtype=str(next(m.parameters()).dtype).replace("torch.", ""))))
"""


def build_checkpoint(path: Path, size_gb: float, dtype: torch.dtype) -> Path:
    """A Llama (hidden 2048, 16 heads, 4 KV heads, vocab 32000) with as many layers as fit size_gb."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    base = dict(model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False, eos_token_id=0)
    per_layer = 2048 * (2048 + 512 + 512 + 2048) + 3 * 2048 * 5632 + 2 * 2048
    fixed = 2 * 32000 * 2048 + 2048
    layers = max(1, round((size_gb * 1e9 / dtype.itemsize - fixed) / per_layer))
    with torch.device("meta"):
        model = M.Transformer(M.ModelConfig(num_hidden_layers=layers, **base))
    g = torch.Generator().manual_seed(0)
    for name, p in list(model.named_parameters()):  # fill one tensor at a time, directly in dtype
        module, _, leaf = name.rpartition(".")
        t = torch.randn(p.shape, generator=g).mul_(0.02).to(dtype) if p.dim() > 1 else torch.ones(p.shape, dtype=dtype)
        setattr(model.get_submodule(module), leaf, torch.nn.Parameter(t, requires_grad=False))
    vocab = {"<eos>": 0, **{f"w{i}": i + 1 for i in range(31999)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return M.save(model, M.Tokenizer(tk, "<eos>"), path, max_shard_size=512 * 2**20)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=1.0)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"],
                    help="dtype of the weights on disk (and of the load)")
    ap.add_argument("--dir", default=None, help="where to build the checkpoint (default: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="bench_load_"))
    ckpt = work / "ckpt"
    if args.build_only:
        build_checkpoint(ckpt, args.size_gb, M.parse_dtype(args.dtype))
        return
    try:
        if not (ckpt / "config.json").is_file():
            print(f"building a ~{args.size_gb} GB {args.dtype} checkpoint in {ckpt} ...", file=sys.stderr)
            subprocess.run([sys.executable, __file__, "--build-only", "--dir", str(work), "--size-gb",
                            str(args.size_gb), "--dtype", args.dtype], check=True)
        on_disk = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
        out = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), str(ckpt), args.dtype],
                             check=True, capture_output=True, text=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    gb = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    w = r["weights"]
    print(f"| weights ({r['dtype']}) | safetensors on disk | RSS after imports | peak RSS (VmHWM) "
          f"| peak / weights | (peak - imports) / weights |")
    print("|---|---|---|---|---|---|")
    print(f"| {gb(w)} | {gb(on_disk)} | {gb(r['before'])} | {gb(r['peak'])} | {r['peak'] / w:.2f}x "
          f"| {(r['peak'] - r['before']) / w:.2f}x |")
    print(f"target: peak <= 1.3x weights -> {'met' if r['peak'] <= 1.3 * w else 'NOT met'}")


if __name__ == "__main__":
    main()
