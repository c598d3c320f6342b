"""sft.py's flags: the SFTConfig dataclass (one field per command-line flag, written to config.json),
the settings a resumed run may change, and the checks a run makes before it touches anything.

Plumbing: none of this is the training itself. Nothing here imports a core file.
"""

import argparse
from dataclasses import dataclass
from typing import Optional

from plumbing.dist import DIST_TIMEOUT_S
from plumbing.runs import add_flags, flag as _flag, require_at_least


@dataclass
class SFTConfig:
    """Every flag of a training run; written to <out>/config.json."""
    # what to train, from what, and where the run lives
    data: str = _flag(None, "training JSONL with 'query' and 'completion' fields (traces.py traces, curate.py)")
    out: str = _flag(None, "run folder, e.g. runs/sft/all_strategies; rerunning with the same --out resumes")
    model: Optional[str] = _flag(None, "checkpoint to fine-tune: a local folder, an alias (llama-3.2-3b) or a Hub id")
    init: Optional[str] = _flag(None, "train from scratch instead: a random-init Llama-architecture model of this "
                                "size and a BPE tokenizer trained on --data", choices=("tiny", "small", "base"))
    val_data: Optional[str] = _flag(None, "held-out JSONL for the per-epoch validation loss "
                                    "(default: split off --val-fraction)")
    val_fraction: float = _flag(0.1, "fraction of --data held out (seeded) when --val-data is not given; "
                                "0 = no validation")
    # the optimization (paper_spec 3.5)
    epochs: int = _flag(5, "passes over the training data (paper: 5)")
    batch_size: int = _flag(64, "global batch: examples per optimizer step (paper: 64); "
                            "a last partial batch is dropped")
    micro_batch_size: int = _flag(4, "examples per forward/backward (gradient accumulation); "
                                  "changes memory and speed, never the update")
    lr: Optional[float] = _flag(None, "peak learning rate (default: 1e-5 with --model, the paper's; "
                                "2e-3 with --init)")
    adam_beta1: float = _flag(0.9, "AdamW beta1")
    adam_beta2: float = _flag(0.95, "AdamW beta2 (paper: 0.95)")
    weight_decay: float = _flag(0.01, "AdamW weight decay, applied to every parameter as in the original")
    warmup_ratio: float = _flag(0.1, "linear warmup over int(ratio * total steps) steps, then cosine to 0")
    grad_clip: float = _flag(1.0, "clip the global gradient norm to this value")
    max_length: int = _flag(2048, "longest example in tokens (query + completion + EOS); "
                            "longer is an error unless --drop-long")
    drop_long: bool = _flag(False, "drop (and count) examples longer than --max-length instead of an error")
    seed: int = _flag(0, "seed of the validation split, the data order, the from-scratch init and tokenizer")
    # the machine
    device: str = _flag("auto", "cpu, cuda or auto (cuda when available)")
    autocast: str = _flag("auto", "bf16 autocast of the forward: auto (on CUDA only), bfloat16, or none (pure fp32)",
                          choices=("auto", "bfloat16", "none"))
    grad_checkpointing: bool = _flag(False, "recompute each layer (and the loss chunks) in backward: much less "
                                     "activation memory for one extra forward pass per step")
    # checkpoints and resuming
    save_every: int = _flag(0, "also checkpoint every N optimizer steps (0 = only at epoch ends); "
                            "only the newest such checkpoint is kept")
    stop_after: int = _flag(0, "stop after N optimizer steps of this invocation, checkpointing first "
                            "(0 = run to the end); rerun to continue")
    resume: bool = _flag(False, "require an existing run in --out to continue (a rerun resumes automatically anyway)")
    # greedy accuracy at each epoch's end
    eval_problems: Optional[str] = _flag(None, "JSONL of Countdown problems {nums, target}: greedy accuracy each "
                                         "epoch; training rows that carry the same (nums, target) are dropped")
    eval_n: int = _flag(200, "how many of --eval-problems to evaluate")
    eval_max_new_tokens: int = _flag(1024, "generation budget per problem for the accuracy evaluation")
    eval_batch_size: int = _flag(64, "prompts per generation batch in the accuracy evaluation")
    # the tokenizer
    vocab_size: int = _flag(1024, "BPE vocabulary size of the from-scratch tokenizer (--init only)")
    tokenizer_data: Optional[str] = _flag(None, "comma-separated JSONL files whose text also trains the from-scratch "
                                          "tokenizer, not the model (--init only): e.g. the priming traces a base "
                                          "model will be fine-tuned on later, so their words are tokens too")
    add_tokens: Optional[str] = _flag(None, "comma-separated tokens to add to the tokenizer as single tokens, the "
                                      "embedding grown to fit (model.add_tokens); 'coat' = Satori's meta-actions "
                                      "<|continue|>,<|reflect|>,<|explore|> for COAT format tuning")
    # processes
    num_threads: int = _flag(0, "CPU threads for torch (0 = torch's default)")
    dist_timeout: int = _flag(DIST_TIMEOUT_S, "under torchrun: seconds a collective waits for the other ranks "
                              "before this one stops with an error (a rank died or hangs)")


# Settings that may change when a run is resumed; everything else must match config.json.
# ("out" too: a run folder may be moved.)
RESUMABLE_CHANGES = {"out", "resume", "stop_after", "device", "num_threads", "eval_batch_size", "dist_timeout"}


def check_config(cfg: SFTConfig, coat: dict):
    """ValueError for flags that cannot work together (coat: traces.COAT_TOKENS, for --add-tokens)."""
    if not cfg.data or not cfg.out:
        raise ValueError("--data and --out are required")
    if (cfg.model is None) == (cfg.init is None):
        raise ValueError("give exactly one of --model (fine-tune a checkpoint) and --init (train from scratch)")
    if cfg.tokenizer_data and not cfg.init:
        raise ValueError("--tokenizer-data trains a new tokenizer, so it needs --init; a --model keeps its own")
    if cfg.add_tokens:
        tokens_to_add(cfg.add_tokens, coat)
    require_at_least(cfg, ("epochs", "batch_size", "micro_batch_size", "max_length"), 1)
    require_at_least(cfg, ("save_every", "stop_after", "eval_n"), 0)


def tokens_to_add(spec: str, coat: dict) -> list:
    """--add-tokens: 'coat' (Satori's meta-action tokens, coat = traces.COAT_TOKENS) or a comma-separated list."""
    if spec == "coat":
        return list(coat.values())
    tokens = [t for t in spec.split(",") if t]
    if not tokens or any(t != t.strip() for t in tokens):
        raise ValueError(f"--add-tokens {spec!r}: give 'coat' or comma-separated tokens without spaces around them")
    return tokens


def build_parser() -> argparse.ArgumentParser:
    """`python sft.py --help`: one flag per SFTConfig field."""
    p = argparse.ArgumentParser(
        prog="sft.py",
        description="Supervised fine-tuning on {query, completion} JSONL with the paper's priming recipe, from a "
                    "checkpoint (--model) or from scratch (--init). Loss on the completion and EOS only. "
                    "Greedy Countdown accuracy of a checkpoint: python sft.py eval --help",
        epilog="examples:\n"
               "  python sft.py --model llama-3.2-3b --data data/all_strategies.jsonl "
               "--out runs/sft/all_strategies \\\n"
               "      --grad-checkpointing\n"
               "  python sft.py --init tiny --data data/negative_control.jsonl "
               "--eval-problems data/priming/test.jsonl \\\n"
               "      --out runs/sft_tiny --epochs 2 --batch-size 32 --num-threads 1\n"
               "  python sft.py eval --model runs/sft_tiny/final --problems data/priming/test.jsonl --n 1000",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(p, SFTConfig, required=("data", "out"))
    return p
