"""ppo.py's run folder and data: starting or resuming a run (checks, memory plan, disk preflight,
config.json), the problems, the per-step batches, checkpoints (policy + state.pt) and Ctrl-C.

Run folder (design.md): runs/<name>/config.json, metrics.jsonl (one line per step, same keys),
completions/step_<N>.jsonl, data/{train,test}.jsonl, checkpoints/step_<N>/policy (model.save
format) and checkpoints/step_<N>/state.pt (critic, optimizers with master weights, RNG, step).
Rerunning the same command resumes from the newest checkpoint; a first Ctrl-C finishes the step,
checkpoints and exits, a second one aborts (checkpoints are written to a temp folder, then renamed).

Plumbing for ppo.py: what needs a core function gets it as an argument (model.save,
model.checkpoint_config, countdown.make_splits). Nothing here imports a core file.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Optional

import torch

from plumbing import dist, files, memory, runs
from plumbing.device import rng_state, set_rng_state
from plumbing.hub import resolve_checkpoint
from plumbing.memory import format_budget
from plumbing.ppo_config import RESUMABLE_CHANGES, PPOConfig, disk_preflight, memory_budget, resolve_memory
from plumbing.runs import step_dirs


# -----------------------------------------------------------------------------
# Starting a run


def start_run(cfg: PPOConfig, model_config: Callable, make_splits: Callable) -> tuple:
    """Everything ppo._train_loop needs before its first step: (cfg with the memory plan filled in, run
    folder, checkpoint to resume or None, train problems, test problems, initial checkpoint path).

    model_config(path) -> the checkpoint's model config (model.checkpoint_config); make_splits as
    countdown.make_splits. Rank 0 checks and writes the folder; under torchrun the others then read it.
    """
    run = Path(cfg.out)
    world = dist.world_size()
    for name, n in (("--mini-batch-prompts", cfg.mini_batch_prompts), ("--critic-mini-batch", cfg.critic_mini_batch)):
        if n % world:
            raise ValueError(f"{name} {n} does not split evenly over {world} processes; use a multiple of {world}")
    if dist.distributed() and cfg.optim_device == "cpu":
        # FSDP2's CPUOffloadPolicy would also need a gloo group beside NCCL for the offloaded shards: not done
        raise ValueError("--optim-device cpu is not supported under torchrun: FSDP already puts 1/N of the Adam "
                         "state on each GPU; use --optim-device auto or device, or more GPUs")
    if dist.distributed() and (cfg.rae or cfg.preference_bonus or cfg.save_correct):
        raise ValueError("--rae, --preference-bonus and --save-correct run in one process only: their restart "
                         "buffers, outcome reward model and correct.jsonl are not shared across ranks yet; drop "
                         "torchrun")
    init_path = resolve_checkpoint(cfg.model)
    mc = model_config(init_path)
    cfg = resolve_memory(cfg, mc)
    resumable = latest_checkpoint(run)
    cfg = disk_preflight(cfg, mc, run, int(resumable.name[5:]) if resumable else 0)
    if dist.distributed():   # every rank must save the same way (the state's gathers are collectives)
        cfg = replace(cfg, state_checkpoints=dist.all_gather_objects(cfg.state_checkpoints)[0])
    if not dist.is_main():   # rank 0 checks the folder and writes the data files; the others then read them
        dist.barrier()
        return (cfg, run, latest_checkpoint(run), *load_problems(cfg, run, make_splits), init_path)
    ckpt = open_run(cfg, run)
    print(format_budget(memory_budget(cfg, mc), cfg)
          + (f"\n  (one process's plan; under torchrun each of the {world} GPUs holds 1/{world} of the weights, "
             "gradients and Adam state)" if dist.distributed() else ""), file=sys.stderr)
    seqs = cfg.batch_prompts * cfg.samples
    print(f"ppo: {cfg.adv}; per iteration {seqs} sequences, {seqs // (cfg.mini_batch_prompts * cfg.samples)} actor "
          + (f"and {math.ceil(seqs / cfg.critic_mini_batch)} critic " if cfg.adv == "gae" else "")
          + f"optimizer steps; loss aggregation {cfg.loss_agg}; first iteration lr "
          f"{'0 (original)' if cfg.lr_zero_first_step else 'as set'}; value loss on "
          f"{'response + post-EOS states (original)' if cfg.value_post_eos else 'response tokens'}",
          file=sys.stderr)
    train_set, test_set = load_problems(cfg, run, make_splits)
    dist.barrier()
    return cfg, run, ckpt, train_set, test_set, init_path


METRIC_KEYS = (
    "step", "reward_mean", "accuracy", "format_rate", "response_length", "response_length_max", "truncated_frac",
    "kl", "logp_mismatch", "sequence_reward_mean", "advantage_raw_mean", "entropy", "pg_loss", "actor_loss",
    "pg_clipfrac", "ppo_kl", "value_loss", "vf_clipfrac", "value_mean", "return_mean", "explained_var",
    "actor_grad_norm", "critic_grad_norm", "actor_lr", "critic_lr", "skipped_updates",
    "val_accuracy", "val_score", "val_format_rate", "val_response_length", "val_truncated_frac",
    "time_rollout", "time_reward", "time_prepare", "time_critic", "time_actor", "time_val", "time_step",
    "tokens_per_s", "peak_mem_gb", "elapsed_s", "restart_frac", "restart_pos_accuracy", "restart_neg_accuracy",
    "preference_bonus_mean", "orm_loss", "orm_pair_accuracy")


def log_metrics(run: Path, line: dict) -> dict:
    """line as a metrics.jsonl row: every METRIC_KEYS key (None where absent), in that order; rank 0 appends it."""
    row = {k: line.get(k) for k in METRIC_KEYS}
    row = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}  # strict JSON
    if dist.is_main():
        files.append_jsonl(run / "metrics.jsonl", row)
    return row


class TrainingStopped(RuntimeError):
    """Too many non-finite updates in a row (--max-bad-updates): the run stops with a checkpoint."""


@contextmanager
def stop_on_sigint():
    """Yields {"requested": bool}: a first Ctrl-C sets it (the loop finishes the step, checkpoints and
    stops), a second one raises KeyboardInterrupt. Only in the main thread (where signals arrive)."""
    stop = {"requested": False}
    previous_handler = None
    if threading.current_thread() is threading.main_thread():
        def on_sigint(signum, frame):
            if stop["requested"]:
                raise KeyboardInterrupt
            stop["requested"] = True
            print("\nCtrl-C: finishing this step, then checkpointing and stopping (Ctrl-C again aborts)",
                  file=sys.stderr)
        previous_handler = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield stop
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)


# -----------------------------------------------------------------------------
# Data


def read_problems(path) -> list:
    rows = files.read_jsonl(path)
    for i, r in enumerate(rows):
        ok = (isinstance(r, dict) and isinstance(r.get("nums"), list) and r["nums"]
              and all(isinstance(x, int) for x in r["nums"]) and isinstance(r.get("target"), int))
        if not ok:
            raise ValueError(f"{path}: row {i + 1} is not a problem {{\"nums\": [ints], \"target\": int}}: "
                             f"{str(r)[:80]}")
    if not rows:
        raise ValueError(f"{path} holds no problems")
    return [{"nums": r["nums"], "target": r["target"], "id": r.get("id", i)} for i, r in enumerate(rows)]


def load_problems(cfg: PPOConfig, run: Path, make_splits: Callable):
    """(train, test): the run folder's copy when resuming, else --train/test-data, else generated."""
    data = run / "data"
    if (data / "train.jsonl").is_file() and (data / "test.jsonl").is_file():
        return read_problems(data / "train.jsonl"), read_problems(data / "test.jsonl")
    if bool(cfg.train_data) != bool(cfg.test_data):
        raise ValueError("give both --train-data and --test-data, or neither (then problems are generated)")
    if cfg.train_data:
        train, test = read_problems(cfg.train_data), read_problems(cfg.test_data)
    else:
        n_train = cfg.n_train or cfg.steps * cfg.batch_prompts
        print(f"generating {n_train} training and {cfg.n_test} test problems ({cfg.distribution!r}, "
              f"seed {cfg.seed}) ...", file=sys.stderr)
        train, test = make_splits(n_train, cfg.n_test, distribution=cfg.distribution, seed=cfg.seed)
    if len(train) < cfg.batch_prompts:
        raise ValueError(f"{len(train)} training problems, fewer than one batch (--batch-prompts {cfg.batch_prompts})")
    files.write_jsonl(data / "test.jsonl", test)     # a copy in the run folder: what this run used
    files.write_jsonl(data / "train.jsonl", train)
    return train, test


_ORDERS = {}


def batch_indices(n: int, batch: int, step: int, seed: int) -> list:
    """Problems of iteration `step` (1-based): a seeded shuffle per epoch, last partial batch dropped."""
    per_epoch = n // batch
    epoch, j = divmod(step - 1, per_epoch)
    key = (n, seed, epoch)
    if key not in _ORDERS:
        order = list(range(n))
        random.Random(f"ppo-order:{seed}:{epoch}").shuffle(order)
        _ORDERS.clear()
        _ORDERS[key] = order
    return _ORDERS[key][j * batch:(j + 1) * batch]


def rank_share(problems, group: int) -> list:
    """This rank's problems of an iteration under torchrun (all of them in one process): the r-th
    1/W of every consecutive `group` (a mini-batch of prompts), so that the ranks' k-th local
    mini-batches together hold exactly the single-process k-th mini-batch's prompts."""
    r, w = dist.rank(), dist.world_size()
    lo, hi = r * group // w, (r + 1) * group // w
    return [p for i in range(0, len(problems), group) for p in problems[i:i + group][lo:hi]]


def check_response_cap(tokenizer, paths, max_response: int) -> dict:
    """{file: p99 tokens of its completions (with EOS)}; a ValueError with the numbers when
    max_response is below any of them."""
    p99 = {}
    for f in paths:
        lengths = sorted(len(tokenizer.encode(r["completion"], bos=False)) + 1 for r in files.read_jsonl(f))
        if not lengths:
            raise ValueError(f"--cap-traces {f}: no rows")
        p99[f] = lengths[min(len(lengths) - 1, math.ceil(0.99 * len(lengths)) - 1)]
    short = {f: p for f, p in p99.items() if p > max_response}
    if short:
        raise ValueError(f"--max-response {max_response} would cut the priming traces: p99 completion length "
                         + ", ".join(f"{f} {p}" for f, p in short.items()) + f" tokens; raise --max-response to "
                         f">= {max(short.values())}")
    return p99


# -----------------------------------------------------------------------------
# Checkpoints and the run folder


def latest_checkpoint(run: Path) -> Optional[Path]:
    """The newest checkpoint folder that can be resumed (one with a state.pt)."""
    dirs = {s: d for s, d in step_dirs(run).items() if (d / "state.pt").is_file()}
    return dirs[max(dirs)] if dirs else None


def save_checkpoint(run: Path, step: int, models, tokenizer, cfg: PPOConfig, counters: dict,
                    extension=None, last_save: bool = True, *, save: Callable) -> Path:
    """checkpoints/step_<N>/{policy/, state.pt}, written in a temp folder and renamed into place.
    Under torchrun every rank gathers its shards and rank 0 writes the same files, plus the fp32
    policy (the master weights) and the world size in state.pt."""
    ck = run / "checkpoints"
    with_state = cfg.state_checkpoints in ("last", "all", "auto") or (cfg.state_checkpoints == "final" and last_save)
    last_only = cfg.state_checkpoints in ("last", "final", "auto")   # older states go once this one is in place
    final = ck / f"step_{step}"
    policy, trained = models.policy, None
    if dist.distributed():
        policy = dist.gather_full(models.policy, device="cpu", dtype=cfg.dtype, rank0_only=True)
        if with_state:
            trained = full_training_state(models)
        if not dist.is_main():
            dist.barrier()   # until rank 0 has written
            return final
    tmp = ck / f".step_{step}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save(policy, tokenizer, tmp / "policy")   # model.save
    if with_state and last_only:
        memory.make_room_for_state(run, step, Path(cfg.state_dir) if cfg.state_dir else run)
    if with_state:
        state = {"step": step, "config": asdict(cfg), "counters": dict(counters), "rng": rng_state(),
                 **(trained or {
                     "actor_opt": models.actor_opt.state_dict(),
                     "critic": models.critic.state_dict() if models.critic is not None else None,
                     "critic_opt": models.critic_opt.state_dict() if models.critic_opt is not None else None}),
                 **(extension.state_dict() if extension is not None else {})}
        if cfg.state_dir:   # the file there, a link to it in the step folder (so resume finds it as usual)
            target = Path(cfg.state_dir).absolute() / f"{run.absolute().name}-step_{step}.pt"
            target.parent.mkdir(parents=True, exist_ok=True)
            runs.save_atomic(torch.save, state, target, target.with_name(f".{target.name}.tmp-{os.getpid()}"))
            (tmp / "state.pt").symlink_to(target)
        else:
            torch.save(state, tmp / "state.pt")
    files.replace_dir(tmp, final)   # an existing one only after a resume re-reaches its step (identical content)
    if with_state and last_only:
        for s, d in step_dirs(run).items():
            if s != step and (d / "state.pt").is_file():
                memory.remove_state(d / "state.pt")
    if cfg.keep_policies:   # the newest N step folders stay, this one among them, and the newest state's
        resumable = latest_checkpoint(run)
        for s, d in sorted(step_dirs(run).items())[:-cfg.keep_policies]:
            if d == resumable:
                continue
            if (d / "state.pt").is_file():
                memory.remove_state(d / "state.pt")
            shutil.rmtree(d)
    dist.barrier()
    return final


def full_training_state(models) -> dict:
    """state.pt's trained parts gathered from the shards (on rank 0; every rank must call it)."""
    def opt_state(net, opt):
        return {"opt": dist.full_optimizer_state(net, opt.opt)}
    critic = models.critic is not None
    return {"world_size": dist.world_size(), "policy": dist.full_state_dict(models.policy),
            "actor_opt": opt_state(models.policy, models.actor_opt),
            "critic": dist.full_state_dict(models.critic) if critic else None,
            "critic_opt": opt_state(models.critic, models.critic_opt) if critic else None}


def load_training_state(ckpt: Path, models, extension=None) -> tuple:
    """Restore the critic, both optimizers and the RNGs from ckpt/state.pt; returns (step, counters).

    The loaded dict holds a second copy of the fp32 master weights and of the critic (~29 GiB of
    host memory for 3B) once they are copied in; it lives only inside this function, so it is freed
    on return instead of for the whole run. Adam's moments are copied out of the memory-mapped file one
    tensor at a time (own_optimizer_state).
    """
    # memory-mapped: read from the page cache as it is copied in; a plain load would hold the whole
    # ~75 GiB 3B state in RAM beside the live optimizer (killed on a 128 GiB host)
    state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True, mmap=True)
    saved_world = state.get("world_size", 1)
    if saved_world != dist.world_size():
        raise ValueError(f"{ckpt} was written by {saved_world} process(es) and this run has {dist.world_size()}: its "
                         "rollout streams and mini-batch shares are per process; resume with torchrun "
                         f"--nproc-per-node {saved_world}" + (" (or plain python)" if saved_world == 1 else ""))
    if dist.distributed():   # every rank reads the full state (memory-mapped) and keeps its shards
        dist.load_full_state(models.policy, state["policy"], models.actor_opt.opt, state["actor_opt"]["opt"])
        if models.critic is not None:
            dist.load_full_state(models.critic, state["critic"], models.critic_opt.opt, state["critic_opt"]["opt"])
        set_rng_state(state["rng"])
        return state["step"], state["counters"]
    models.actor_opt.load_state_dict(state.pop("actor_opt"))
    if models.critic is not None:
        models.critic.load_state_dict(state.pop("critic"))
        models.critic_opt.load_state_dict(state.pop("critic_opt"))
    if extension is not None:
        extension.load_state_dict(state)
    set_rng_state(state["rng"])
    return state["step"], state["counters"]


def open_run(cfg: PPOConfig, run: Path) -> Optional[Path]:
    """Create the run folder, or check it belongs to this config and return its newest checkpoint."""
    if runs.foreign_folder(run):
        raise ValueError(f"{run} exists, is not empty and has no config.json: it is not a ppo.py run; "
                         "choose another --out")
    saved, new = runs.read_config(run), asdict(cfg)
    if saved is None:
        if cfg.resume:
            raise ValueError(f"--resume: no run to resume in {run}")
        runs.write_config(run, new)
        return None
    diff = runs.changed_settings(saved, new, asdict(PPOConfig()), RESUMABLE_CHANGES)
    if diff and not step_dirs(run) and not (run / "metrics.jsonl").is_file():
        # an attempt that died before recording anything (a typo in a path, say): nothing to lose
        print(f"{run}: the earlier attempt recorded nothing; starting over with the new settings", file=sys.stderr)
        shutil.rmtree(run / "data", ignore_errors=True)
        runs.write_config(run, new)
        return None
    if diff:
        raise runs.different_settings(run, diff)
    ckpt = latest_checkpoint(run)
    if ckpt is None and step_dirs(run):
        raise ValueError(f"{run} has checkpoints but none with training state (--state-checkpoints none?), so it "
                         "cannot be resumed and will not be overwritten; choose another --out")
    if ckpt is None and cfg.resume:
        raise ValueError(f"--resume: {run} has no checkpoint with training state to resume from")
    step = int(ckpt.name[5:]) if ckpt else 0
    for log in (run / "metrics.jsonl", run / "correct.jsonl"):
        if log.is_file():   # lines after the checkpoint describe steps that will be redone (identically)
            rows = files.read_jsonl(log)
            keep = [r for r in rows if r.get("step", 0) < step or (ckpt and r.get("step") == step)]
            if len(keep) != len(rows):
                print(f"{log}: dropping {len(rows) - len(keep)} line(s) after the checkpoint at step {step}; "
                      "those steps are redone", file=sys.stderr)
                files.write_jsonl(log, keep)
    runs.write_config(run, new)
    print(f"resuming {run} from step {step}" if ckpt else f"{run}: no checkpoint yet, starting from step 0",
          file=sys.stderr)
    return ckpt

