"""
sft.py: supervised fine-tuning ("priming"), from a pretrained checkpoint or from a tiny model
trained from scratch.

The paper primes Llama-3.2-3B with a few dozen SFT steps on reasoning traces before PPO. One
example is the query followed by the completion and an EOS; the loss is next-token cross-entropy on
the completion tokens and the EOS only:

    ids  = tok(query) + tok(completion) + [EOS]            no BOS, no chat template
    loss = sum_{completion positions t} -log p(ids[t] | ids[<t]) / (completion tokens in the batch)

The loss mask (collate): position t predicts ids[t + 1], and counts iff ids[t + 1] is a completion
token or the EOS (t + 1 >= number of query tokens) and is not padding. The query is exactly the RL
prompt (ending "<think>", countdown.sft_example), so SFT teaches exactly the tokens the policy must
emit after it in RL; the original's SFT/RL boundary did not match (defect D-SFT-6).

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
- Micro-batches are padded to their own longest example, and the logits are computed only at
  completion positions (same loss, less work).
- The learning-rate schedule is a pure function of the step, like the original's lr(0) = 0
  (the first update only fills Adam's moments). Its "state" is the step counter.
- `--init tiny|small|base` trains a random-init Llama-architecture model and a byte-level BPE
  tokenizer on the training text: the whole experiment can then run offline and on CPU.

Precision: fp32 master weights, gradients and Adam moments, bf16 autocast of the forward on CUDA;
the memory of a full 3B run is worked out in docs/reference.md ("sft.py: priming"). The run folder
(config.json, metrics.jsonl, checkpoints/, state/, final/) is described in plumbing/sft_run.py.

Reading order: data and the loss mask, the loss, the lr schedule, the from-scratch tokenizer and
model, the training loop; below the marked plumbing line, the glue and main().
"""

import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import countdown as C
import traces
import model as M
from plumbing import dist, files, runs, sft_eval, sft_run
from plumbing.device import autocast as _autocast, autocast_bf16, param_count, refuse_cpu_fallback
from plumbing.sft_config import SFTConfig, build_parser, check_config, tokens_to_add
from plumbing.sft_run import metric, problem_key

# From-scratch sizes (Llama architecture: RMSNorm, RoPE, SwiGLU, grouped-query attention, tied head).
# Parameters without the embedding: tiny 0.8M, small 4.7M, base 25M.
SIZES = {
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=4),
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6,
                  num_attention_heads=8, num_key_value_heads=4),
    "base": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                 num_attention_heads=8, num_key_value_heads=4),
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
    rows = files.read_jsonl(path)
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


def training_rows(cfg: SFTConfig) -> tuple:
    """(train rows, validation rows, evaluation problems) of a run. The split is seeded, so a resumed
    run rebuilds exactly the same sets."""
    rows = load_examples(cfg.data)
    if cfg.val_data:
        train_rows, val_rows = rows, load_examples(cfg.val_data)
    else:
        train_rows, val_rows = split_validation(rows, cfg.val_fraction, cfg.seed)
    problems = files.read_jsonl(cfg.eval_problems) if cfg.eval_problems else []
    if problems:  # decontaminate: no training example may be an evaluation problem
        held = {problem_key(p) for p in problems}
        kept = [r for r in train_rows if not ("nums" in r and "target" in r and problem_key(r) in held)]
        if len(kept) < len(train_rows):
            print(f"dropped {len(train_rows) - len(kept)} training examples whose problem is in --eval-problems",
                  file=sys.stderr)
        train_rows, problems = kept, problems[:cfg.eval_n]
    return train_rows, val_rows, problems


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


def load_or_init(cfg: SFTConfig, run: Path, state: Optional[dict], train_rows, device) -> tuple:
    """(model, tokenizer) in fp32 (the master weights): the checkpoint a resumed run continues from,
    the --model checkpoint, or a new tokenizer and model (--init); then --add-tokens."""
    if state is not None:
        model, tok = M.load(run / "checkpoints" / state["checkpoint"], device=device, dtype="float32")
        if dist.is_main():
            print(f"resuming {run} from step {state['step']} ({state['checkpoint']})", file=sys.stderr)
    elif cfg.model:
        model, tok = M.load(cfg.model, device=device, dtype="float32")
    else:
        extra = [r for path in (cfg.tokenizer_data or "").split(",") if path for r in load_examples(path)]
        tok = train_tokenizer((t for r in train_rows + extra for t in (r["query"], r["completion"])), cfg.vocab_size)
        if dist.distributed():   # every rank must hold the same tokenizer: rank 0's
            from tokenizers import Tokenizer as HFTokenizer
            tok = M.Tokenizer(HFTokenizer.from_str(dist.all_gather_objects(tok.tk.to_str())[0]), EOS_TOKEN)
        model = init_model(cfg.init, tok, cfg.max_length, cfg.seed).to(device)
    if cfg.add_tokens and state is None:  # a resumed run's checkpoint has them already
        added = M.add_tokens(model, tok, tokens_to_add(cfg.add_tokens, traces.COAT_TOKENS))
        print(f"tokens {cfg.add_tokens} have ids {added}; vocabulary {model.config.vocab_size}", file=sys.stderr)
    return model, tok


# -----------------------------------------------------------------------------
# Training: the loop, an evaluation at each epoch's end, checkpoints


def greedy_accuracy(model, tokenizer, problems, **kw) -> tuple:
    """(accuracy, rows): greedy completions of the RL prompt, scored by countdown.is_correct (plumbing/sft_eval.py)."""
    return sft_eval.greedy_accuracy(model, tokenizer, problems, generate=M.generate, prompt=C.make_prompt,
                                    is_correct=C.is_correct, **kw)


def _train(cfg: SFTConfig) -> Optional[Path]:
    run = Path(cfg.out)
    final = run / "final"
    if final.exists():
        print(f"{run} is finished: the model is in {final}; choose a new --out to train again", file=sys.stderr)
        return final
    device, state_file = sft_run.open_run(cfg, run)   # torch.distributed under torchrun; the resume check
    rank, world = dist.rank(), dist.world_size()
    train_rows, val_rows, problems = training_rows(cfg)
    state = sft_run.load_state(run, state_file) if state_file is not None else None
    model, tok = load_or_init(cfg, run, state, train_rows, device)
    model.train()
    model.gradient_checkpointing = cfg.grad_checkpointing
    if dist.distributed():   # FSDP2: fp32 shards are the master weights; bf16 compute where autocast would be on
        dist.shard(model, compute_dtype=torch.bfloat16 if autocast_bf16(device, cfg.autocast) else None,
                   forward_methods=("hidden_states", "logits"))

    # the tokenization is deterministic too: a resumed run sees the same examples in the same order
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
    if dist.is_main():
        sft_run.write_config(cfg, run)
    total_steps = steps_per_epoch * cfg.epochs
    peak_lr = cfg.lr if cfg.lr is not None else (PAPER_LR if cfg.model else FROM_SCRATCH_LR)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=peak_lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    metrics_file = run / "metrics.jsonl"
    step, elapsed, tokens_seen = sft_run.resume(model, optimizer, state, metrics_file)   # (0, 0.0, 0) if new
    n_params = sum(p.numel() for p in params)
    if dist.is_main():
        print(f"sft: {len(train_ex)} train / {len(val_ex)} val examples, {steps_per_epoch} steps/epoch x {cfg.epochs} "
              f"epochs = {total_steps} steps, {n_params / 1e6:.2f}M parameters on {device}"
              + (f", {world} processes" if dist.distributed() else ""), file=sys.stderr)

    def checkpoint_(name):   # the whole model (gathered under torchrun) and the training state
        sft_run.checkpoint(run, name, model, tok, optimizer, save=M.save, state=lambda: sft_run.make_state(
            step, steps_per_epoch, optimizer, elapsed, tokens_seen, total_steps))

    def evaluate():
        """(val loss, greedy accuracy); under torchrun each rank takes its share of both, on an
        unsharded copy (generation cannot run in lockstep), and the sums are all-reduced."""
        net = model if not dist.distributed() else dist.gather_full(model, device=device, dtype="float32")
        val_loss = accuracy = None
        if val_ex:
            val_loss, _ = batch_loss(net, val_ex[rank::world], micro_batch_size=cfg.micro_batch_size,
                                     pad_id=tok.pad_id, autocast=cfg.autocast, n_global=n_loss_tokens(val_ex))
            val_loss = dist.all_sum(val_loss)[0]
        if problems:
            accuracy, rows = greedy_accuracy(net, tok, problems[rank::world], max_new_tokens=cfg.eval_max_new_tokens,
                                             batch_size=cfg.eval_batch_size, autocast=cfg.autocast)
            if dist.distributed():
                accuracy = dist.all_sum(sum(r["correct"] for r in rows))[0] / len(problems)
        return val_loss, accuracy

    from tqdm import tqdm
    bar = tqdm(total=total_steps, initial=step, desc="sft", file=sys.stderr, dynamic_ncols=True,
               disable=not dist.is_main())
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
            loss, n_tok = dist.all_sum(loss, n_tok)   # the ranks' shares of the batch (unchanged in one process)
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
            if dist.is_main():
                files.append_jsonl(metrics_file, metric(kind="train", step=step, epoch=round(step / steps_per_epoch, 4),
                                                    loss=loss, lr=lr, grad_norm=grad_norm, tokens=n_tok,
                                                    tokens_per_s=round(n_tok / dt, 1), elapsed_s=round(elapsed, 2)))
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{n_tok / dt:.0f}")

            if step % steps_per_epoch == 0:  # end of an epoch: evaluate, then checkpoint
                e = step // steps_per_epoch
                model.eval()
                val_loss, accuracy = evaluate()
                model.train()
                if dist.is_main():
                    files.append_jsonl(metrics_file, metric(kind="eval", step=step, epoch=e,
                                                            elapsed_s=round(elapsed, 2), val_loss=val_loss,
                                                            accuracy=accuracy))
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
                if dist.is_main():
                    print(f"stopped after {steps_run} steps at step {step}/{total_steps}; rerun the same command to "
                          "continue", file=sys.stderr)
                return None
    finally:
        bar.close()
    return sft_run.finish(run, cfg.epochs, total_steps, tokens_seen, elapsed)


# ----- plumbing below: starting a run (lock, processes), the eval subcommand, main -----


def train(cfg: SFTConfig) -> Optional[Path]:
    """Run (or resume) SFT. Returns <out>/final, or None when --stop-after stopped it early."""
    check_config(cfg, traces.COAT_TOKENS)
    if cfg.device == "auto" and cfg.model and runs.resolve_device("auto").type == "cpu":
        refuse_cpu_fallback(param_count(M.checkpoint_config(cfg.model)))   # no GPU: fine only for small models
    dist.init_distributed(runs.resolve_device(cfg.device), cfg.dist_timeout)   # nothing without torchrun
    with files.lock_dir(cfg.out, "sft.py run folder") if dist.is_main() else nullcontext():  # one writer per --out
        return _train(cfg)


def eval_main(argv) -> int:
    """`python sft.py eval ...` (plumbing/sft_eval.py), with this file's greedy_accuracy."""
    return sft_eval.eval_main(argv, load=M.load, greedy_accuracy=greedy_accuracy, generate=M.generate,
                              drill=traces.restart_drill, generate_problems=C.generate_problems)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "eval":
        return eval_main(argv[1:])
    args = build_parser().parse_args(argv)
    cfg = SFTConfig(**vars(args))
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    # beyond the usual user errors: a loss that diverged, a folder it may not write, a Hub it cannot reach
    user_errors = (FloatingPointError, PermissionError, ConnectionError)
    return runs.run_training(lambda: train(cfg), cfg.out, user_errors=user_errors,
                             interrupted=f"interrupted: {cfg.out} keeps its last complete checkpoint; rerun the same "
                                         "command to resume")


if __name__ == "__main__":
    dist.exit_process(main())
