"""
sft.py: supervised fine-tuning ("priming"), from a pretrained checkpoint or from a tiny model
trained from scratch.

The paper primes Llama-3.2-3B with a few dozen SFT steps on reasoning traces before PPO. One
example is the query followed by the completion and an EOS; the loss is next-token cross-entropy on
the completion tokens and the EOS only:

    ids  = tok(query) + tok(completion) + [EOS]            no BOS, no chat template
    loss = sum_{completion positions t} -log p(ids[t] | ids[<t]) / (completion tokens in the batch)

Recipe (paper_spec 3.5, the defaults here): AdamW lr 1e-5, betas (0.9, 0.95), weight decay 0.01,
10% linear warmup then cosine to 0, grad clip 1.0, 5 epochs, global batch 64, max length 2048, a
checkpoint and a held-out loss each epoch.

Simplifications and deliberate differences from the original (veRL's fsdp_sft_trainer):
- One process, one device; the global batch is built by gradient accumulation over micro-batches.
  Under torchrun each of N processes takes every N-th example of the batch and FSDP2 shards the
  model (model.py, "Several processes"); the loss keeps the whole batch's token count as its
  denominator, so the update is the single-process one.
- The loss is a token mean over the whole global batch (sum of CE over every micro-batch / all
  completion tokens of the batch), so the micro-batch size never changes the update. The original
  averaged per micro-batch token means, which weights tokens by how they were grouped.
- The query is exactly the RL prompt (it ends with "<think>", see countdown.sft_example), fixing the
  original's SFT/RL boundary mismatch (defect D-SFT-6).
- Micro-batches are padded to their own longest example, not to max_length (same loss, less work).
- The logits are computed only at completion positions (the prompt's would be masked out anyway).
- The learning-rate schedule is a pure function of the step, like the original's lr(0) = 0
  (the first update only fills Adam's moments). Its "state" is the step counter.
- `--init tiny|small|base` trains a random-init Llama-architecture model and a byte-level BPE
  tokenizer on the training text: the whole experiment can then run offline and on CPU. The
  tokenizer is cut only around digit runs, so the fixed prompt compresses to a few phrase tokens
  and every number is one token wherever it appears (see train_tokenizer).

Precision and memory. Master weights, gradients and Adam moments are fp32; on CUDA the forward runs
under bf16 autocast (the original: FSDP with fp32 master weights and bf16 compute). Full SFT of
Llama-3.2-3B (3.21e9 parameters, tied embeddings) on one 80 GB GPU, micro-batch b x 2048 tokens:
    fp32 weights 12.85 GB + fp32 grads 12.85 GB + Adam m, v 25.70 GB      = 51.4 GB
    bf16 weight copies cached by autocast during the forward              ~  6.4 GB
    --grad-checkpointing: each layer's fp32 input, 28 x 2048 x 3072 x 4 B = 0.70 GB per sequence
        (b = 4: 2.8 GB) plus one layer recomputed in backward (~150 KB/token in bf16: b = 4, 1.2 GB)
    loss: logits only at completion positions, in checkpointed chunks of 2048 tokens
        (2048 x 128256 x (2 + 4 + 4) B ~ 2.6 GB peak for bf16 logits, fp32 copy and its grad)
    total at b = 4 with checkpointing ~ 64 GB, plus CUDA context / allocator slack (~2-4 GB).
Without checkpointing every layer keeps ~150 KB/token: 28 x 150 KB x 8192 tokens ~ 34 GB at b = 4
(does not fit), ~ 8.6 GB at b = 1 (fits). Real Countdown examples are ~150 prompt + <= 1024
completion tokens, about half of 2048, so these figures are upper bounds. The per-token activation
figure is an estimate; `python bench/bench_sft.py memory` measures the peak on a GPU.

Run folder (design.md): runs/<name>/config.json (every flag), metrics.jsonl (one line per step and
per evaluation, same keys in every line), checkpoints/epoch_<E>/ (model.save folders, all kept) and
checkpoints/step_<N>/ (--save-every, only the newest kept), state/step_<N>.pt (optimizer, RNG and
progress beside the weights; only the newest kept), final/ (hard links to the last epoch's files).
Rerunning the same command resumes from the newest complete checkpoint; it never overwrites.
"""

import argparse
import json
import math
import re
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import countdown as C
import traces
import model as M
from plumbing import files, runs

# -----------------------------------------------------------------------------
# Config


_flag = runs.flag


@dataclass
class SFTConfig:
    """Every flag of a training run; written to <out>/config.json."""
    data: str = _flag(None, "training JSONL with 'query' and 'completion' fields (traces.py traces, curate.py)")
    out: str = _flag(None, "run folder, e.g. runs/sft/all_strategies; rerunning with the same --out resumes")
    model: Optional[str] = _flag(None, "checkpoint to fine-tune: a local folder, an alias (llama-3.2-3b) or a Hub id")
    init: Optional[str] = _flag(None, "train from scratch instead: a random-init Llama-architecture model of this "
                                "size and a BPE tokenizer trained on --data", choices=("tiny", "small", "base"))
    val_data: Optional[str] = _flag(None, "held-out JSONL for the per-epoch validation loss "
                                    "(default: split off --val-fraction)")
    val_fraction: float = _flag(0.1, "fraction of --data held out (seeded) when --val-data is not given; "
                                "0 = no validation")
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
    device: str = _flag("auto", "cpu, cuda or auto (cuda when available)")
    autocast: str = _flag("auto", "bf16 autocast of the forward: auto (on CUDA only), bfloat16, or none (pure fp32)",
                          choices=("auto", "bfloat16", "none"))
    grad_checkpointing: bool = _flag(False, "recompute each layer (and the loss chunks) in backward: much less "
                                     "activation memory for one extra forward pass per step")
    save_every: int = _flag(0, "also checkpoint every N optimizer steps (0 = only at epoch ends); "
                            "only the newest such checkpoint is kept")
    stop_after: int = _flag(0, "stop after N optimizer steps of this invocation, checkpointing first "
                            "(0 = run to the end); rerun to continue")
    resume: bool = _flag(False, "require an existing run in --out to continue (a rerun resumes automatically anyway)")
    eval_problems: Optional[str] = _flag(None, "JSONL of Countdown problems {nums, target}: greedy accuracy each "
                                         "epoch; training rows that carry the same (nums, target) are dropped")
    eval_n: int = _flag(200, "how many of --eval-problems to evaluate")
    eval_max_new_tokens: int = _flag(1024, "generation budget per problem for the accuracy evaluation")
    eval_batch_size: int = _flag(64, "prompts per generation batch in the accuracy evaluation")
    vocab_size: int = _flag(1024, "BPE vocabulary size of the from-scratch tokenizer (--init only)")
    tokenizer_data: Optional[str] = _flag(None, "comma-separated JSONL files whose text also trains the from-scratch "
                                          "tokenizer, not the model (--init only): e.g. the priming traces a base "
                                          "model will be fine-tuned on later, so their words are tokens too")
    add_tokens: Optional[str] = _flag(None, "comma-separated tokens to add to the tokenizer as single tokens, the "
                                      "embedding grown to fit (model.add_tokens); 'coat' = Satori's meta-actions "
                                      "<|continue|>,<|reflect|>,<|explore|> for COAT format tuning")
    num_threads: int = _flag(0, "CPU threads for torch (0 = torch's default)")
    dist_timeout: int = _flag(M.DIST_TIMEOUT_S, "under torchrun: seconds a collective waits for the other ranks "
                              "before this one stops with an error (a rank died or hangs)")


# Settings that may change when a run is resumed; everything else must match config.json.
# ("out" too: a run folder may be moved.)
_RESUMABLE_CHANGES = {"out", "resume", "stop_after", "device", "num_threads", "eval_batch_size", "dist_timeout"}

# From-scratch sizes (Llama architecture: RMSNorm, RoPE, SwiGLU, grouped-query attention, tied head).
# Parameters without the embedding: tiny 0.8M, small 4.7M, base 25M.
SIZES = {
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4),
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4),
    "base": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4),
}
EOS_TOKEN = "<|endoftext|>"
FROM_SCRATCH_LR = 2e-3  # what the from-scratch Countdown runs used (tiny, batch 32)
PAPER_LR = 1e-5

# -----------------------------------------------------------------------------
# Data: JSONL rows -> token ids with the prompt length
#
# Why the boundary matches RL exactly (defect D-SFT-6): countdown.sft_example puts the whole RL
# prompt, ending "<think>", in `query`, and the rest of the answer in `completion`. We tokenize the
# two strings separately, just as RL tokenizes the prompt alone and the model then emits tokens one
# by one. So the training targets are exactly the token sequence the policy must produce after the
# RL prompt: no BPE merge straddles the boundary and no BOS or template is added on either side.


def load_examples(path) -> list:
    """Rows of a JSONL file with string fields 'query' and 'completion'."""
    rows = C.read_jsonl(path)
    if not rows:
        raise ValueError(f"{path} has no examples; expected JSONL rows with 'query' and 'completion'")
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not isinstance(r.get("query"), str) or not isinstance(r.get("completion"), str):
            raise ValueError(f"{path}: row {i} needs string fields 'query' and 'completion' "
                             f"(got keys {sorted(r) if isinstance(r, dict) else type(r).__name__})")
        if not r["query"]:
            raise ValueError(f"{path}: row {i} has an empty query; the first completion token needs a prompt before it")
    return rows


def tokenize_example(tokenizer, query: str, completion: str) -> tuple:
    """(ids, n_prompt): ids = tok(query) + tok(completion) + [EOS], the first n_prompt from the query."""
    q = tokenizer.encode(query)       # encode() adds no BOS
    return q + tokenizer.encode(completion) + [tokenizer.eos_id], len(q)


def tokenize_examples(tokenizer, rows, max_length: int, drop_long: bool = False, name: str = "data") -> tuple:
    """([(ids LongTensor, n_prompt)], n_dropped). Too long: ValueError naming the row, or dropped."""
    out, dropped = [], 0
    for i, r in enumerate(rows):
        ids, n_prompt = tokenize_example(tokenizer, r["query"], r["completion"])
        if len(ids) > max_length:
            if drop_long:
                dropped += 1
                continue
            raise ValueError(f"{name}: example {i} has {len(ids)} tokens (query {n_prompt} + completion and EOS "
                             f"{len(ids) - n_prompt}), more than --max-length {max_length}; raise --max-length "
                             "or pass --drop-long to skip such examples")
        out.append((torch.tensor(ids, dtype=torch.long), n_prompt))
    if not out:
        raise ValueError(f"{name}: no example is left after dropping {dropped} longer than {max_length} tokens")
    return out, dropped


def split_validation(rows, fraction: float, seed: int) -> tuple:
    """(train, val): a seeded random fraction of the rows held out."""
    if not 0 <= fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1), got {fraction}")
    n_val = int(round(len(rows) * fraction))
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(perm[:n_val])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


def epoch_order(n: int, epoch: int, seed: int) -> list:
    """The example order of one epoch: a permutation that depends only on (seed, epoch), so a
    resumed run needs no sampler state, just the step counter."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def collate(examples, pad_id: int, device) -> tuple:
    """Right-padded (inputs [B, T], targets [B, T], loss_mask [B, T] bool), T = longest - 1.

    Position t predicts ids[t + 1]; it is in the loss iff ids[t + 1] is a completion token or the
    EOS, i.e. t + 1 >= n_prompt, and it is not padding.
    """
    T = max(len(ids) for ids, _ in examples) - 1
    inputs = torch.full((len(examples), T), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(examples), T, dtype=torch.bool)
    for b, (ids, n_prompt) in enumerate(examples):
        L = len(ids)
        inputs[b, :L - 1] = ids[:-1]
        targets[b, :L - 1] = ids[1:]
        mask[b, n_prompt - 1:L - 1] = True
    return inputs.to(device), targets.to(device), mask.to(device)


def n_loss_tokens(examples) -> int:
    """Completion tokens + EOS over a list of examples: the loss's denominator."""
    return sum(len(ids) - n_prompt for ids, n_prompt in examples)


# -----------------------------------------------------------------------------
# Loss


def _ce_sum(model, hidden, targets):
    return F.cross_entropy(model.logits(hidden).float(), targets, reduction="sum")


def completion_ce_sum(model, inputs, targets, mask, chunk: int = 2048):
    """Sum of next-token cross-entropy over the masked (completion + EOS) positions.

    No attention mask is passed: padding sits on the right, and causal attention already keeps
    every real token from seeing it. Only the masked positions reach the LM head (with a 128k
    vocabulary the logits are the biggest tensor of the step); with gradient checkpointing on they
    are also computed in checkpointed chunks, so at most `chunk` rows of logits exist at once.
    """
    h = model.hidden_states(inputs)               # [B, T, D]
    h, y = h[mask], targets[mask]                 # [N, D], [N]
    if not (model.training and model.gradient_checkpointing) or len(y) <= chunk:
        return _ce_sum(model, h, y)
    return sum(checkpoint(_ce_sum, model, h[i:i + chunk], y[i:i + chunk], use_reentrant=False)
               for i in range(0, len(y), chunk))


def _autocast(device, mode: str):
    use = mode == "bfloat16" or (mode == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if use else nullcontext()


def batch_loss(model, examples, *, micro_batch_size: int, pad_id: int, autocast="none", backward: bool = False,
               n_global: Optional[int] = None) -> tuple:
    """Token-mean loss over `examples` as one global batch: sum of CE / all completion tokens.

    With backward=True each micro-batch's share, CE_sum / N_global, is backpropagated at once, so
    the accumulated gradient is exactly the gradient of the global token mean whatever the
    micro-batch size. Returns (loss, tokens in the batch). Under torchrun `examples` is this rank's
    share and n_global the loss tokens of the whole batch: the ranks' losses and gradients then sum
    to the single-process ones.
    """
    device = next(model.parameters()).device
    n_global = n_loss_tokens(examples) if n_global is None else n_global
    # similar lengths together: less padding; the sum does not depend on the grouping
    examples = sorted(examples, key=lambda e: len(e[0]))
    total, tokens = 0.0, 0
    for i in range(0, len(examples), micro_batch_size):
        mb = examples[i:i + micro_batch_size]
        inputs, targets, mask = collate(mb, pad_id, device)
        with _autocast(device, autocast), (nullcontext() if backward else torch.no_grad()):
            ce = completion_ce_sum(model, inputs, targets, mask)
        if backward:
            (ce / n_global).backward()
        total += ce.item()
        tokens += sum(len(ids) for ids, _ in mb)
    return total / n_global, tokens


# -----------------------------------------------------------------------------
# Learning-rate schedule (transformers' get_cosine_schedule_with_warmup, as the original)


def lr_at(step: int, total_steps: int, peak_lr: float, warmup_ratio: float = 0.1) -> float:
    """lr of optimizer step `step` (0-based): peak * step / W for step < W = int(ratio * total),
    then peak * (1 + cos(pi * (step - W) / (total - W))) / 2. So lr(0) = 0 when W > 0."""
    warmup = int(warmup_ratio * total_steps)
    if step < warmup:
        return peak_lr * step / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# -----------------------------------------------------------------------------
# From scratch: a BPE tokenizer trained on the data, a random-init Llama-architecture model


def train_tokenizer(texts, vocab_size: int = 1024) -> M.Tokenizer:
    """Byte-level BPE (any text encodes, byte fallback) with EOS "<|endoftext|>" (id 0), pad = EOS.

    Made for a small model on a narrow domain, not for general text. The text is cut only around
    runs of digits, and BPE may merge anything in between, whole phrases included: the fixed
    Countdown prompt becomes ~17 tokens instead of ~130, so the model's compute goes to the parts
    that vary. And "14" in "[14, 5]" and in " 14 + 5" is the same token (a GPT-2 pre-tokenizer
    makes "14" and " 14" different tokens), so copying a number from the prompt is one lookup.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"[0-9]+"), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer)
    return M.Tokenizer(tk, EOS_TOKEN)


def init_model(size: str, tokenizer: M.Tokenizer, max_length: int, seed: int) -> M.Transformer:
    """A random-init Llama-architecture model sized for `tokenizer`, seeded."""
    if size not in SIZES:
        raise ValueError(f"unknown --init size {size!r}; choose one of {', '.join(SIZES)}")
    config = M.ModelConfig(model_type="llama", vocab_size=tokenizer.vocab_size, max_position_embeddings=max_length,
                           tie_word_embeddings=True, eos_token_id=tokenizer.eos_id, bos_token_id=None,
                           torch_dtype="float32", **SIZES[size])
    torch.manual_seed(seed)
    return M.Transformer(config)


# -----------------------------------------------------------------------------
# Greedy accuracy on Countdown problems


@torch.no_grad()
def greedy_accuracy(model, tokenizer, problems, *, max_new_tokens: int = 1024, batch_size: int = 64,
                    autocast: str = "none", progress: bool = False) -> tuple:
    """(accuracy, rows): greedy (temperature 0) completions of the RL prompt, scored by
    countdown.is_correct. rows: {"nums", "target", "completion", "correct", "length"}."""
    device = next(model.parameters()).device
    if not isinstance(_autocast(device, autocast), nullcontext) and next(model.parameters()).dtype != torch.bfloat16:
        # generate in the compute dtype: a bf16 copy of the weights, so the KV cache is bf16 too (autocast
        # over fp32 weights would keep an fp32 cache and recast every weight at every step)
        model = M.gather_full(model, device=device, dtype=torch.bfloat16)
    rows = []
    batches = range(0, len(problems), batch_size)
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, desc="eval", file=sys.stderr, leave=False)
    for i in batches:
        chunk = problems[i:i + batch_size]
        prompts = [tokenizer.encode(C.make_prompt(p["nums"], p["target"])) for p in chunk]
        gen = M.generate(model, prompts, max_new_tokens=max_new_tokens, temperature=0.0,
                         eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
        for p, toks, n in zip(chunk, gen.tokens, gen.lengths.tolist()):
            text = tokenizer.decode(toks[:n], skip_special_tokens=True)
            rows.append({"nums": p["nums"], "target": p["target"], "completion": text,
                         "correct": C.is_correct(text, p["nums"], p["target"]), "length": n})
    accuracy = sum(r["correct"] for r in rows) / max(1, len(rows))
    return accuracy, rows


@torch.no_grad()
def arithmetic_accuracy(model, tokenizer, n: int, seed: int, batch_size: int = 64) -> tuple:
    """({"n", "arithmetic_accuracy"}, rows): greedy results of n facts "a op b = c" of the restart
    drill (traces.restart_drill with `seed`, the first fact of each row), each prompted as the drill
    writes it, "Arithmetic:" then " a op b = ", and right when the next number generated is c."""
    facts = [r["completion"].split(".")[0].strip() for r in traces.restart_drill(n, seed=seed, per_row=1)]
    rows = []
    for i in range(0, n, batch_size):
        chunk = facts[i:i + batch_size]
        # the prompt ends where the result begins, " = " included: a tokenizer may merge " = " whole
        prompts = [tokenizer.encode("Arithmetic:") + tokenizer.encode(" " + f.split(" = ")[0] + " = ") for f in chunk]
        gen = M.generate(model, prompts, max_new_tokens=6, temperature=0.0, eos_id=tokenizer.eos_id,
                         pad_id=tokenizer.pad_id)
        for f, toks, k in zip(chunk, gen.tokens, gen.lengths.tolist()):
            got = re.match(r"\s*(\d+)", tokenizer.decode(toks[:k], skip_special_tokens=True))
            want = f.split("= ")[1]
            rows.append({"fact": f, "answer": got.group(1) if got else None, "correct": bool(got) and got.group(1) == want})
    right = sum(r["correct"] for r in rows)
    return {"n": len(rows), "correct": right, "arithmetic_accuracy": right / max(1, len(rows))}, rows


# -----------------------------------------------------------------------------
# Checkpoints: weights in model.save folders, training state beside them, both written atomically


def _state_path(run: Path, step: int) -> Path:
    return run / "state" / f"step_{step}.pt"


def latest_state(run: Path) -> Optional[Path]:
    """The newest complete checkpoint's state file. The state file is written last, after the
    weights folder has been renamed into place, so its existence marks a complete checkpoint."""
    states = runs.numbered(run / "state", "step_", ".pt")
    return states[max(states)] if states else None


def save_checkpoint(run: Path, name: str, model, tokenizer, state: dict) -> Path:
    """Write checkpoints/<name>/ (model.save: temp folder + rename), then state/step_<N>.pt
    (temp file + os.replace), then remove older state files and older step_ folders."""
    ckpt = run / "checkpoints" / name
    M.save(model, tokenizer, ckpt, overwrite=True)  # a leftover from an interrupted attempt is replaced
    path = _state_path(run, state["step"])
    path.parent.mkdir(parents=True, exist_ok=True)
    # Ctrl-C mid-write: no half file remains, the previous checkpoint stays the newest
    runs.save_atomic(torch.save, dict(state, checkpoint=name), path)
    for old in (run / "state").glob("step_*.pt"):
        if old != path:
            old.unlink(missing_ok=True)
    for old in (run / "checkpoints").glob("step_*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return ckpt


# -----------------------------------------------------------------------------
# Training

# One JSON object per line, the same keys in every line (null where a value does not apply).
# kind "train": one optimizer step; tokens = non-padding tokens (prompt + completion) of the step,
# tokens_per_s = tokens / the step's wall time. kind "eval": end of an epoch (val_loss, accuracy).
METRIC_KEYS = ("kind", "step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s",
               "val_loss", "accuracy")


def _problem_key(p) -> tuple:
    """A Countdown problem up to the order of its numbers."""
    return tuple(sorted(p["nums"])), p["target"]


def _metric(**kw) -> dict:
    return {k: kw.get(k) for k in METRIC_KEYS}


_resolve_device = runs.resolve_device


def _check_config(cfg: SFTConfig):
    if not cfg.data or not cfg.out:
        raise ValueError("--data and --out are required")
    if (cfg.model is None) == (cfg.init is None):
        raise ValueError("give exactly one of --model (fine-tune a checkpoint) and --init (train from scratch)")
    if cfg.tokenizer_data and not cfg.init:
        raise ValueError("--tokenizer-data trains a new tokenizer, so it needs --init; a --model keeps its own")
    if cfg.add_tokens:
        _tokens_to_add(cfg.add_tokens)
    for name in ("epochs", "batch_size", "micro_batch_size", "max_length"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name in ("save_every", "stop_after", "eval_n"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")


def _open_run(cfg: SFTConfig, run: Path) -> Optional[Path]:
    """Check that an existing run folder belongs to this run; return the newest state file to
    resume from (or None)."""
    state = latest_state(run) if run.exists() else None
    saved = runs.read_config(run)
    if saved is not None:
        diff = runs.changed_settings(saved, asdict(cfg), asdict(SFTConfig()), _RESUMABLE_CHANGES, every_key=True)
        if diff:
            raise runs.different_settings(run, diff, "choose a new --out")
    elif runs.foreign_folder(run):
        raise FileExistsError(f"{run} exists, is not empty and has no config.json: not a run folder of sft.py; "
                              "choose a new --out")
    # leftovers of a save interrupted by Ctrl-C: temp folders/files that never got renamed into place
    for junk in [*run.glob("checkpoints/.*.tmp-*"), *run.glob("state/*.tmp-*"), *run.glob(".final.tmp-*")]:
        shutil.rmtree(junk, ignore_errors=True) if junk.is_dir() else junk.unlink(missing_ok=True)
    if cfg.resume and state is None:
        raise FileNotFoundError(f"--resume: {run} has no complete checkpoint to continue from")
    return state


def _write_config(cfg: SFTConfig, run: Path):
    """config.json is written once the data and the model have loaded, so a typo in a flag leaves
    no run folder behind that a corrected command would then refuse."""
    if not (run / "config.json").exists():
        runs.write_config(run, asdict(cfg))


def train(cfg: SFTConfig) -> Optional[Path]:
    """Run (or resume) SFT. Returns <out>/final, or None when --stop-after stopped it early."""
    _check_config(cfg)
    if cfg.device == "auto" and cfg.model and _resolve_device("auto").type == "cpu":
        M.refuse_cpu_fallback(M.param_count(M.checkpoint_config(cfg.model)))   # no GPU: fine only for small models
    M.init_distributed(_resolve_device(cfg.device), cfg.dist_timeout)   # nothing without torchrun
    with files.lock_dir(cfg.out, "sft.py run folder") if M.is_main() else nullcontext():  # one writer per --out
        return _train(cfg)


def _tokens_to_add(spec: str) -> list:
    """--add-tokens: 'coat' (Satori's meta-action tokens) or a comma-separated list."""
    if spec == "coat":
        return list(traces.COAT_TOKENS.values())
    tokens = [t for t in spec.split(",") if t]
    if not tokens or any(t != t.strip() for t in tokens):
        raise ValueError(f"--add-tokens {spec!r}: give 'coat' or comma-separated tokens without spaces around them")
    return tokens


def _train(cfg: SFTConfig) -> Optional[Path]:
    run = Path(cfg.out)
    final = run / "final"
    if final.exists():
        print(f"{run} is finished: the model is in {final}; choose a new --out to train again", file=sys.stderr)
        return final
    device = M.init_distributed(_resolve_device(cfg.device), cfg.dist_timeout)   # cuda:LOCAL_RANK under torchrun
    M.attention_backends(device)
    rank, world = M.rank(), M.world_size()
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} does not split evenly over {world} processes; "
                         f"use a multiple of {world}")
    state_file = _open_run(cfg, run)

    # data: the split and the tokenization are deterministic, so a resumed run rebuilds them exactly
    rows = load_examples(cfg.data)
    if cfg.val_data:
        train_rows, val_rows = rows, load_examples(cfg.val_data)
    else:
        train_rows, val_rows = split_validation(rows, cfg.val_fraction, cfg.seed)
    problems = C.read_jsonl(cfg.eval_problems) if cfg.eval_problems else []
    if problems:  # decontaminate: no training example may be an evaluation problem
        held = {_problem_key(p) for p in problems}
        kept = [r for r in train_rows if not ("nums" in r and "target" in r and _problem_key(r) in held)]
        if len(kept) < len(train_rows):
            print(f"dropped {len(train_rows) - len(kept)} training examples whose problem is in --eval-problems",
                  file=sys.stderr)
        train_rows, problems = kept, problems[:cfg.eval_n]

    state = None
    if state_file is not None:
        # memory-mapped: the tensors are read from the page cache as they are copied in, never a second
        # resident copy (and under torchrun the ranks share one)
        state = torch.load(state_file, map_location="cpu", weights_only=True, mmap=True)
        if state.get("world_size", 1) != world:
            raise ValueError(f"{run} was checkpointed by {state.get('world_size', 1)} process(es) and this is {world}: "
                             "its optimizer state is laid out per process; resume with torchrun --nproc-per-node "
                             f"{state.get('world_size', 1)} (or plain python for 1)")
        model, tok = M.load(run / "checkpoints" / state["checkpoint"], device=device, dtype="float32")
        if M.is_main():
            print(f"resuming {run} from step {state['step']} ({state['checkpoint']})", file=sys.stderr)
    elif cfg.model:
        model, tok = M.load(cfg.model, device=device, dtype="float32")   # fp32 master weights
    else:
        extra = [r for path in (cfg.tokenizer_data or "").split(",") if path for r in load_examples(path)]
        tok = train_tokenizer((t for r in train_rows + extra for t in (r["query"], r["completion"])), cfg.vocab_size)
        if M.distributed():   # every rank must hold the same tokenizer: rank 0's
            from tokenizers import Tokenizer as HFTokenizer
            tok = M.Tokenizer(HFTokenizer.from_str(M.all_gather_objects(tok.tk.to_str())[0]), EOS_TOKEN)
        model = init_model(cfg.init, tok, cfg.max_length, cfg.seed).to(device)
    if cfg.add_tokens and state is None:  # a resumed run's checkpoint has them already
        added = M.add_tokens(model, tok, _tokens_to_add(cfg.add_tokens))
        print(f"tokens {cfg.add_tokens} have ids {added}; vocabulary {model.config.vocab_size}", file=sys.stderr)
    model.train()
    model.gradient_checkpointing = cfg.grad_checkpointing
    if M.distributed():   # FSDP2: fp32 shards are the master weights; bf16 compute where autocast would be on
        bf16 = not isinstance(_autocast(device, cfg.autocast), nullcontext)
        M.shard(model, compute_dtype=torch.bfloat16 if bf16 else None, forward_methods=("hidden_states", "logits"))

    train_ex, dropped = tokenize_examples(tok, train_rows, cfg.max_length, cfg.drop_long, name=cfg.data)
    val_ex, val_dropped = ([], 0) if not val_rows else tokenize_examples(
        tok, val_rows, cfg.max_length, cfg.drop_long, name=cfg.val_data or "validation split")
    if dropped or val_dropped:
        print(f"--drop-long: dropped {dropped} training and {val_dropped} validation examples longer than "
              f"{cfg.max_length} tokens", file=sys.stderr)
    steps_per_epoch = len(train_ex) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_ex)} training examples do not fill one batch of --batch-size {cfg.batch_size}; "
                         "lower --batch-size or add data")
    if M.is_main():
        _write_config(cfg, run)
    total_steps = steps_per_epoch * cfg.epochs
    peak_lr = cfg.lr if cfg.lr is not None else (PAPER_LR if cfg.model else FROM_SCRATCH_LR)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=peak_lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    step, elapsed, tokens_seen = 0, 0.0, 0
    metrics_file = run / "metrics.jsonl"
    if state is not None:
        if M.distributed():   # the whole model's optimizer state: each rank keeps its shard
            M.load_full_state(model, None, optimizer, state["optimizer"])
        else:
            optimizer.load_state_dict(state["optimizer"])
            M.own_optimizer_state(optimizer)
        M.set_rng_state(state["rng"])
        step, elapsed, tokens_seen = state["step"], state["elapsed_s"], state["tokens"]
    if metrics_file.exists() and M.is_main():  # forget lines written after the checkpoint we resume from
        C.write_jsonl(metrics_file, [m for m in C.read_jsonl(metrics_file) if m["step"] <= step])
    n_params = sum(p.numel() for p in params)
    if M.is_main():
        print(f"sft: {len(train_ex)} train / {len(val_ex)} val examples, {steps_per_epoch} steps/epoch x {cfg.epochs} "
              f"epochs = {total_steps} steps, {n_params / 1e6:.2f}M parameters on {device}"
              + (f", {world} processes" if M.distributed() else ""), file=sys.stderr)

    def make_state():
        return {"step": step, "epoch": step // steps_per_epoch, "optimizer": optimizer.state_dict(),
                "rng": M.rng_state(), "elapsed_s": elapsed, "tokens": tokens_seen, "total_steps": total_steps}

    def checkpoint_(name):
        if not M.distributed():
            return save_checkpoint(run, name, model, tok, make_state())
        # torchrun: every rank all-gathers, rank 0 writes one model.save folder and one state file
        full = M.gather_full(model, device="cpu", rank0_only=True)
        state_ = dict(make_state(), optimizer=M.full_optimizer_state(model, optimizer), world_size=world)
        if M.is_main():
            save_checkpoint(run, name, full, tok, state_)
        M.barrier()

    def evaluate():
        """(val loss, greedy accuracy); under torchrun each rank takes its share of both, on an
        unsharded copy (generation cannot run in lockstep), and the sums are all-reduced."""
        net = model if not M.distributed() else M.gather_full(model, device=device, dtype="float32")
        val_loss = accuracy = None
        if val_ex:
            val_loss, _ = batch_loss(net, val_ex[rank::world], micro_batch_size=cfg.micro_batch_size,
                                     pad_id=tok.pad_id, autocast=cfg.autocast, n_global=n_loss_tokens(val_ex))
            val_loss = M.all_sum(val_loss)[0]
        if problems:
            accuracy, rows = greedy_accuracy(net, tok, problems[rank::world], max_new_tokens=cfg.eval_max_new_tokens,
                                             batch_size=cfg.eval_batch_size, autocast=cfg.autocast)
            if M.distributed():
                accuracy = M.all_sum(sum(r["correct"] for r in rows))[0] / len(problems)
        return val_loss, accuracy

    from tqdm import tqdm
    bar = tqdm(total=total_steps, initial=step, desc="sft", file=sys.stderr, dynamic_ncols=True,
               disable=not M.is_main())
    steps_run, saved_at = 0, step
    try:
        while step < total_steps:
            epoch = step // steps_per_epoch
            order = epoch_order(len(train_ex), epoch, cfg.seed)
            s = step - epoch * steps_per_epoch
            batch = [train_ex[i] for i in order[s * cfg.batch_size:(s + 1) * cfg.batch_size]]

            t0 = time.perf_counter()
            lr = lr_at(step, total_steps, peak_lr, cfg.warmup_ratio)
            for g in optimizer.param_groups:
                g["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            loss, n_tok = batch_loss(model, batch[rank::world], micro_batch_size=cfg.micro_batch_size,
                                     pad_id=tok.pad_id, autocast=cfg.autocast, backward=True,
                                     n_global=n_loss_tokens(batch))
            loss, n_tok = M.all_sum(loss, n_tok)   # the ranks' shares of the batch (unchanged in one process)
            n_tok = int(n_tok)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip).item()   # a global norm under FSDP
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                raise FloatingPointError(f"step {step}: loss {loss} / grad norm {grad_norm} is not finite; "
                                         "lower --lr (the last checkpoint is intact)")
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            step += 1
            steps_run += 1
            elapsed += dt
            tokens_seen += n_tok
            if M.is_main():
                C.append_jsonl(metrics_file, _metric(kind="train", step=step, epoch=round(step / steps_per_epoch, 4),
                                                     loss=loss, lr=lr, grad_norm=grad_norm, tokens=n_tok,
                                                     tokens_per_s=round(n_tok / dt, 1), elapsed_s=round(elapsed, 2)))
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{n_tok / dt:.0f}")

            if step % steps_per_epoch == 0:  # end of an epoch: evaluate, then checkpoint
                e = step // steps_per_epoch
                model.eval()
                val_loss, accuracy = evaluate()
                model.train()
                if M.is_main():
                    C.append_jsonl(metrics_file, _metric(kind="eval", step=step, epoch=e, elapsed_s=round(elapsed, 2),
                                                         val_loss=val_loss, accuracy=accuracy))
                    bar.write(f"epoch {e}: step {step}, train loss {loss:.4f}"
                              + (f", val loss {val_loss:.4f}" if val_loss is not None else "")
                              + (f", greedy accuracy {accuracy:.3f} (n={len(problems)})"
                                 if accuracy is not None else ""))
                checkpoint_(f"epoch_{e}")
                saved_at = step
            elif cfg.save_every and step % cfg.save_every == 0:
                checkpoint_(f"step_{step}")
                saved_at = step
            if cfg.stop_after and steps_run >= cfg.stop_after and step < total_steps:
                if saved_at != step:
                    checkpoint_(f"step_{step}")
                bar.close()
                if M.is_main():
                    print(f"stopped after {steps_run} steps at step {step}/{total_steps}; rerun the same command to "
                          "continue", file=sys.stderr)
                return None
    finally:
        bar.close()
    if M.is_main():
        runs.publish_links(run / "checkpoints" / f"epoch_{cfg.epochs}", final)
        print(f"done: {total_steps} steps, {tokens_seen / max(elapsed, 1e-9):.0f} tokens/s over {elapsed:.1f} s of "
              f"training; model in {final}", file=sys.stderr)
    M.barrier()
    return final


# -----------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sft.py",
        description="Supervised fine-tuning on {query, completion} JSONL with the paper's priming recipe, from a "
                    "checkpoint (--model) or from scratch (--init). Loss on the completion and EOS only. "
                    "Greedy Countdown accuracy of a checkpoint: python sft.py eval --help",
        epilog="examples:\n"
               "  python sft.py --model llama-3.2-3b --data data/all_strategies.jsonl --out runs/sft/all_strategies \\\n"
               "      --grad-checkpointing\n"
               "  python sft.py --init tiny --data data/negative_control.jsonl --eval-problems data/priming/test.jsonl \\\n"
               "      --out runs/sft_tiny --epochs 2 --batch-size 32 --num-threads 1\n"
               "  python sft.py eval --model runs/sft_tiny/final --problems data/priming/test.jsonl --n 1000",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    runs.add_flags(p, SFTConfig, required=("data", "out"))
    return p


def build_eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sft.py eval", description="Greedy (temperature 0) Countdown accuracy of a "
                                "checkpoint on the RL prompt, scored with countdown.is_correct.")
    p.add_argument("--model", required=True, help="checkpoint folder (e.g. runs/sft_tiny/final), alias or Hub id")
    p.add_argument("--problems", help="JSONL of problems {nums, target}; default: generate --n with countdown.py")
    p.add_argument("--distribution", default="priming",
                   help="countdown.py distribution when generating problems (default: priming)")
    p.add_argument("--seed", type=int, default=12345, help="seed of the generated problems (default: 12345)")
    p.add_argument("--exclude-data", help="JSONL files (comma-separated) whose rows' (sorted nums, target) are removed "
                   "from the problems, e.g. the training data (rows need 'nums' and 'target'); this shifts the mix "
                   "towards problems the training data rarely covers (4 numbers): see --per-count")
    p.add_argument("--n", type=int, default=200, help="number of problems (default: 200)")
    p.add_argument("--per-count", action="store_true",
                   help="generated problems: half with 3 numbers, half with 4, as the test splits")
    p.add_argument("--arithmetic", type=int, default=0, metavar="N",
                   help="instead: greedy arithmetic on N held-out facts of the restart drill (traces.restart_drill, "
                        "seeded by --seed): the prompt 'Arithmetic: a op b = ', right when the next number is a op b")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="generation budget per problem (default: 1024)")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per generation batch (default: 64)")
    p.add_argument("--out", help="write the completions here as JSONL (refuses to overwrite)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    p.add_argument("--autocast", default="auto", choices=("auto", "bfloat16", "none"),
                   help="bf16 autocast: auto = on CUDA only (default: auto)")
    p.add_argument("--num-threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    return p


def eval_main(argv) -> int:
    args = build_eval_parser().parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    try:
        if args.out and Path(args.out).exists():
            raise FileExistsError(f"{args.out} exists; choose another --out")
        if args.arithmetic:
            device = _resolve_device(args.device)
            model, tok = M.load(args.model, device=device, dtype="float32")
            summary, rows = arithmetic_accuracy(model, tok, args.arithmetic, args.seed, args.batch_size)
            if args.out:
                C.write_jsonl(args.out, rows)
            print(json.dumps(dict(summary, model=str(args.model))))
            return 0
        exclude = {_problem_key(r) for f in (args.exclude_data or "").split(",") if f
                   for r in C.read_jsonl(f) if "nums" in r}
        if args.problems:
            problems = [p for p in C.read_jsonl(args.problems) if _problem_key(p) not in exclude][:args.n]
        else:  # distinct problems from a seeded stream, minus the excluded ones
            # --per-count: as many 3-number as 4-number problems (the test splits' mix), however few of
            # one kind are left outside --exclude-data (a large training file takes most 3-number ones)
            quota = {3: args.n // 2, 4: args.n - args.n // 2} if args.per_count else None
            problems, seen, k = [], set(exclude), 0
            while len(problems) < args.n:
                for p in C.generate_problems(4 * args.n, args.distribution, seed=args.seed * 1000 + k):
                    kind = len(p["nums"])
                    if quota is not None and quota.get(kind, 0) == 0:
                        continue
                    if _problem_key(p) not in seen and len(problems) < args.n:
                        seen.add(_problem_key(p))
                        problems.append(p)
                        if quota is not None:
                            quota[kind] -= 1
                k += 1
                if k > 200:
                    raise ValueError(f"could not find {args.n} distinct problems outside --exclude-data; lower --n")
        device = _resolve_device(args.device)
        model, tok = M.load(args.model, device=device, dtype="float32")
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError, ConnectionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    acc, rows = greedy_accuracy(model, tok, problems, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                autocast=args.autocast, progress=True)
    by_k = {}
    for r in rows:
        by_k.setdefault(len(r["nums"]), []).append(r["correct"])
    summary = {"model": str(args.model), "n": len(rows), "accuracy": acc,
               "accuracy_by_count": {str(k): round(sum(v) / len(v), 4) for k, v in sorted(by_k.items())},
               "n_by_count": {str(k): len(v) for k, v in sorted(by_k.items())},
               "mean_length": sum(r["length"] for r in rows) / max(1, len(rows)),
               "seconds": round(time.perf_counter() - t0, 1)}
    if args.out:
        C.write_jsonl(args.out, rows)
    print(json.dumps(summary))
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "eval":
        return eval_main(argv[1:])
    args = build_parser().parse_args(argv)
    cfg = SFTConfig(**vars(args))
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    try:
        train(cfg)
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError, PermissionError, ConnectionError,
            files.FolderLocked) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: {cfg.out} keeps its last complete checkpoint; rerun the same command to resume",
              file=sys.stderr)
        return 130
    except RuntimeError as e:
        if not M.is_collective_failure(e):
            raise
        print(M.collective_failure_message(e, cfg.out), file=sys.stderr)
        return 1
    finally:
        M.close_distributed()
    return 0


if __name__ == "__main__":
    M.exit_process(main())
