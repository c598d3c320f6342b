"""sft.py's run folder: opening (or resuming) it, checkpoints, the training state, metrics lines.

Layout (design.md): runs/<name>/config.json (every flag), metrics.jsonl (one line per step and per
evaluation, same keys in every line), checkpoints/epoch_<E>/ (model.save folders, all kept) and
checkpoints/step_<N>/ (--save-every, only the newest kept), state/step_<N>.pt (optimizer, RNG and
progress beside the weights; only the newest kept), final/ (hard links to the last epoch's files).
Rerunning the same command resumes from the newest complete checkpoint; it never overwrites.

Plumbing: none of this is the training itself. Nothing here imports a core file; model.save comes in
as the argument `save`.
"""

import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

from plumbing import dist, files, runs
from plumbing.device import attention_backends, own_optimizer_state, rng_state, set_rng_state
from plumbing.sft_config import RESUMABLE_CHANGES, SFTConfig

# One JSON object per line, the same keys in every line (null where a value does not apply).
# kind "train": one optimizer step; tokens = non-padding tokens (prompt + completion) of the step,
# tokens_per_s = tokens / the step's wall time. kind "eval": end of an epoch (val_loss, accuracy).
METRIC_KEYS = ("kind", "step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s",
               "val_loss", "accuracy")


def metric(**kw) -> dict:
    return {k: kw.get(k) for k in METRIC_KEYS}


def problem_key(p) -> tuple:
    """A Countdown problem up to the order of its numbers."""
    return tuple(sorted(p["nums"])), p["target"]


# -----------------------------------------------------------------------------
# Opening a run folder


def open_run(cfg: SFTConfig, run: Path) -> tuple:
    """(device, the newest state file to resume from or None). Starts torch.distributed under torchrun
    and checks that an existing run folder belongs to this run."""
    device = dist.init_distributed(runs.resolve_device(cfg.device), cfg.dist_timeout)   # cuda:LOCAL_RANK (torchrun)
    attention_backends(device)
    world = dist.world_size()
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} does not split evenly over {world} processes; "
                         f"use a multiple of {world}")
    state = latest_state(run) if run.exists() else None
    saved = runs.read_config(run)
    if saved is not None:
        diff = runs.changed_settings(saved, asdict(cfg), asdict(SFTConfig()), RESUMABLE_CHANGES, every_key=True)
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
    return device, state


def write_config(cfg: SFTConfig, run: Path):
    """config.json is written once the data and the model have loaded, so a typo in a flag leaves
    no run folder behind that a corrected command would then refuse."""
    if not (run / "config.json").exists():
        runs.write_config(run, asdict(cfg))


def load_state(run: Path, state_file: Path) -> dict:
    """The training state to resume from, checked against this run's number of processes."""
    # memory-mapped: the tensors are read from the page cache as they are copied in, never a second
    # resident copy (and under torchrun the ranks share one)
    state = torch.load(state_file, map_location="cpu", weights_only=True, mmap=True)
    world = dist.world_size()
    if state.get("world_size", 1) != world:
        raise ValueError(f"{run} was checkpointed by {state.get('world_size', 1)} process(es) and this is {world}: "
                         "its optimizer state is laid out per process; resume with torchrun --nproc-per-node "
                         f"{state.get('world_size', 1)} (or plain python for 1)")
    return state


def resume(model, optimizer, state: Optional[dict], metrics_file: Path) -> tuple:
    """(step, elapsed seconds, tokens seen): restore the optimizer and the RNG from `state` (if any),
    and forget metrics lines written after that checkpoint."""
    step, elapsed, tokens_seen = 0, 0.0, 0
    if state is not None:
        if dist.distributed():   # the whole model's optimizer state: each rank keeps its shard
            dist.load_full_state(model, None, optimizer, state["optimizer"])
        else:
            optimizer.load_state_dict(state["optimizer"])
            own_optimizer_state(optimizer)
        set_rng_state(state["rng"])
        step, elapsed, tokens_seen = state["step"], state["elapsed_s"], state["tokens"]
    if metrics_file.exists() and dist.is_main():  # forget lines written after the checkpoint we resume from
        files.write_jsonl(metrics_file, [m for m in files.read_jsonl(metrics_file) if m["step"] <= step])
    return step, elapsed, tokens_seen


def make_state(step: int, steps_per_epoch: int, optimizer, elapsed: float, tokens: int, total_steps: int) -> dict:
    """What state/step_<N>.pt holds beside the weights."""
    return {"step": step, "epoch": step // steps_per_epoch, "optimizer": optimizer.state_dict(),
            "rng": rng_state(), "elapsed_s": elapsed, "tokens": tokens, "total_steps": total_steps}


# -----------------------------------------------------------------------------
# Checkpoints: weights in model.save folders, training state beside them, both written atomically


def state_path(run: Path, step: int) -> Path:
    return run / "state" / f"step_{step}.pt"


def latest_state(run: Path) -> Optional[Path]:
    """The newest complete checkpoint's state file. The state file is written last, after the
    weights folder has been renamed into place, so its existence marks a complete checkpoint."""
    states = runs.numbered(run / "state", "step_", ".pt")
    return states[max(states)] if states else None


def save_checkpoint(run: Path, name: str, model, tokenizer, state: dict, save) -> Path:
    """Write checkpoints/<name>/ (save = model.save: temp folder + rename), then state/step_<N>.pt
    (temp file + os.replace), then remove older state files and older step_ folders."""
    ckpt = run / "checkpoints" / name
    save(model, tokenizer, ckpt, overwrite=True)  # a leftover from an interrupted attempt is replaced
    path = state_path(run, state["step"])
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


def checkpoint(run: Path, name: str, model, tokenizer, optimizer, state, save):
    """save_checkpoint of the whole model; state: a function returning make_state's dict."""
    if not dist.distributed():
        return save_checkpoint(run, name, model, tokenizer, state(), save)
    # torchrun: every rank all-gathers, rank 0 writes one model.save folder and one state file
    full = dist.gather_full(model, device="cpu", rank0_only=True)
    state_ = dict(state(), optimizer=dist.full_optimizer_state(model, optimizer), world_size=dist.world_size())
    if dist.is_main():
        save_checkpoint(run, name, full, tokenizer, state_, save)
    dist.barrier()


def finish(run: Path, epochs: int, total_steps: int, tokens_seen: int, elapsed: float) -> Path:
    """final/ = hard links to the last epoch's checkpoint (rank 0), then every rank waits for it."""
    final = run / "final"
    if dist.is_main():
        runs.publish_links(run / "checkpoints" / f"epoch_{epochs}", final)
        print(f"done: {total_steps} steps, {tokens_seen / max(elapsed, 1e-9):.0f} tokens/s over {elapsed:.1f} s of "
              f"training; model in {final}", file=sys.stderr)
    dist.barrier()
    return final
