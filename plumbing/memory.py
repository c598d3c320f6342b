"""The memory plan of full-parameter PPO (and the optimizer that makes it fit): ppo.py's budget,
computed from the architecture and printed at start, the fp32-master AdamW with its state on the
GPU or in host memory, and the disk check of the checkpoints.

Plumbing: ppo.py's algorithm does not change with any of this; it decides only where tensors live.
Nothing here imports a core file (model.py's helpers it needs are passed in or restated).

Memory: full-parameter PPO of a 3B model (policy, critic, reference) on one 80 GB GPU.
Qwen2.5-3B has N = 3.09e9 parameters (tied embeddings; Llama-3.2-3B: 3.21e9), the critic as many.
  The textbook recipe (fp32 weights, fp32 grads, Adam m and v: 16 B/param) needs 46 GiB per model,
  92 GiB for policy + critic before the reference and any activation: it does not fit.
  What we do instead, per model (--dtype bfloat16 and, chosen by the budget, --optim-device cpu):
    bf16 weights on the GPU                  2 B/param   5.75 GiB
    fp32 gradient accumulator on the GPU     4 B/param  11.5 GiB  (only while that model trains)
    fp32 master weights + Adam m, v         12 B/param  34.5 GiB  in host memory (69 GiB for both)
  The reference (5.75 GiB bf16) waits in host memory between uses (--ref-offload). The KV cache
  costs 36,864 B/token for Qwen2.5-3B (36 layers x (k, v) x 2 kv heads x 128 x 2 B), so 128 prompts
  x 4 samples x 1,280 tokens = 22.5 GiB; rollouts run --rollout-batch prompts at a time (auto: as
  many as the budget allows) and the cache is freed before training. Gradient checkpointing keeps
  one [micro, T, D] tensor per layer (4 x 1,280 x 2,048 x 2 B x 36 = 0.7 GiB); log-probs and
  entropy go through the LM head --logprob-chunk tokens at a time (recomputed in backward), so a
  [B, T, 151,936] fp32 tensor never exists (for 1,024 x 1,280 tokens it would be 742 GiB; one
  1,024-token chunk is 0.58 GiB). Computed GPU peaks: ~39 GiB in rollout, ~26 GiB in the updates;
  host memory ~75 GiB. (A --state-checkpoints file is as big: 75 GiB; hence "last" by default.)
  Why fp32 master weights at all: at lr 1e-6 a bf16 weight cannot move. bf16 keeps 8 significant
  bits, so w + dw rounds back to w whenever |dw| is below ~2^-8 |w| (half a unit in the last place
  is 2^-9..2^-8 of |w|); Adam's step is ~lr = 1e-6, while 2^-8 of a typical |w| ~ 0.02 is 8e-5.
  The budget is computed (not measured) and printed at start; --print-budget prints it and exits.
  None of this has run on a GPU yet: the CUDA paths (bf16, offloading, pinned copies) are written
  from reading; CPU tests cover the same code in float32 and bfloat16, and bench/gpu_check.py is
  the one command that checks and measures them on a GPU.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn

from plumbing.device import own_optimizer_state
from plumbing.dist import distributed
from plumbing.runs import step_dirs

# glibc's mmap threshold (bytes) at which RSS tracks live tensors: freed blocks above it go back to the
# kernel at once (bench/bench_ppo.py FIXED_MMAP_THRESHOLD, and the budget's note on retained heap pages)
MMAP_THRESHOLD = 131072


# -----------------------------------------------------------------------------
# AdamW on fp32 master weights
#
# At lr 1e-6 a bf16 weight cannot move: bf16 has 8 significant bits, so an update smaller than
# ~2^-8 of the weight's magnitude rounds away (|w| ~ 0.02 needs |dw| > ~8e-5, Adam's step is ~1e-6).
# So the optimizer keeps fp32 master weights (and Adam's moments), on the GPU or in host memory
# (--optim-device cpu), steps them, and copies them back into the bf16 weights the model computes
# with. Gradients are summed in fp32 as each parameter's gradient is ready (a post-accumulate hook
# folds the bf16 .grad into an fp32 buffer and frees it), so 32 micro-batches do not accumulate
# bf16 rounding, and no second full set of bf16 gradients is ever alive.


def same_device(a, b) -> bool:
    """Whether two devices are one: by type and resolved index. torch.device("cuda") != "cuda:0" as
    objects, though both name the current GPU; comparing them raw would keep a needless fp32 copy."""
    a, b = torch.device(a), torch.device(b)

    def index(d):
        if d.index is not None:
            return d.index
        return torch.cuda.current_device() if d.type == "cuda" and torch.cuda.is_available() else 0
    return a.type == b.type and index(a) == index(b)


def copy_grads(grads, device) -> list:
    """grads (tensors or None) copied to `device`; returns only once every copy has landed.

    The copies are issued non_blocking so that GPU -> host transfers queue back to back, but a
    non_blocking device-to-host copy returns before its bytes arrive (into pinned memory): reading
    the result on the CPU before the stream has finished (clipping, the finite check, Adam) would
    read whatever the buffer held before. So we wait for the stream once, after the last copy.
    """
    device = torch.device(device)
    out = [None if g is None else g.to(device, non_blocking=True) for g in grads]
    if device.type == "cpu" and any(g is not None and g.is_cuda for g in grads):
        torch.cuda.synchronize()
    return out


def exact_pinning() -> bool:
    """Make torch's pinned (page-locked) host allocator allocate blocks above 64 MiB at their exact size.
    By default it rounds every block up to a power of two: a 3B model's fp32 masters pin 16.8 GiB for
    11.5, and the non-blocking gradient copies as much again. False where this torch lacks the setting."""
    try:
        torch._C._accelerator_setAllocatorSettings("pinned_max_round_threshold_mb:64")
        return True
    except (AttributeError, RuntimeError):
        return False


class MasterAdamW:
    def __init__(self, params, *, lr: float, betas, eps: float, weight_decay: float, master_device):
        self.params = [p for p in params if p.requires_grad]
        self.master_device = torch.device(master_device)
        self.mixed = any(p.dtype != torch.float32 or not same_device(p.device, self.master_device)
                         for p in self.params)
        if self.mixed:
            # pinned masters copy back to the GPU at full speed; unpinned where blocks would be rounded up
            pin = self.master_device.type == "cpu" and torch.cuda.is_available() and exact_pinning()
            self.master = [nn.Parameter(p.detach().to(self.master_device, torch.float32, copy=True))
                           for p in self.params]
            if pin:
                self.master = [nn.Parameter(m.data.pin_memory()) for m in self.master]
            self._acc = [None] * len(self.params)
            for i, p in enumerate(self.params):
                p.register_post_accumulate_grad_hook(partial(self._fold_grad, i))
        else:
            self.master = self.params
        # fp32 masters (offloaded or bf16 weights): fused, one multi-tensor kernel instead of a Python loop
        # over tensors (on CPU ~2.4x faster; 3.1B parameters took ~8-15 s per step). Plain fp32 models keep
        # torch's default, so CPU runs (the miniature study) step exactly as before; off under torchrun
        # (DTensor shards).
        fused = self.mixed and not distributed()
        self.opt = torch.optim.AdamW(self.master, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                     **({"fused": True} if fused else {}))

    def _fold_grad(self, i, p):
        g = p.grad.float()
        if self._acc[i] is None:
            self._acc[i] = g if g is not p.grad else g.clone()
        else:
            self._acc[i].add_(g)
        p.grad = None

    def zero_grad(self):
        if self.mixed:
            self._acc = [None] * len(self.params)
        for p in self.params:
            p.grad = None
        for m in self.master:
            m.grad = None

    def step(self, lr: float, max_norm: float):
        """Clip, step, copy back; returns (grad norm before clipping, applied?). Skips non-finite norms."""
        if self.mixed:
            for m, g in zip(self.master, copy_grads(self._acc, self.master_device)):
                m.grad = g
            self._acc = [None] * len(self.params)
        norm = float(torch.nn.utils.clip_grad_norm_(self.master, max_norm))
        if not math.isfinite(norm):
            self.zero_grad()
            return norm, False
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        self.zero_grad()
        if self.mixed:
            with torch.no_grad():
                for p, m in zip(self.params, self.master):
                    p.copy_(m)   # blocking: the next CPU step must not overwrite m while it is in flight
        return norm, True

    def state_dict(self):
        s = {"opt": self.opt.state_dict()}
        if self.mixed:
            s["master"] = [m.detach().cpu() for m in self.master]
        return s

    def load_state_dict(self, s):
        if self.mixed:
            saved = s.pop("master")   # dropped one by one as copied: never a full second set alive
            with torch.no_grad():
                for i, (p, m) in enumerate(zip(self.params, self.master)):
                    m.copy_(saved[i])
                    saved[i] = None
                    p.copy_(m)
        self.opt.load_state_dict(s["opt"])
        own_optimizer_state(self.opt)


# -----------------------------------------------------------------------------
# The budget (computed from the architecture, not measured)


def memory_budget(cfg, mc, n_params: int) -> dict:
    """Bytes of each resident item, where it lives, and the device peak of each phase, for ppo.py's
    config `cfg`, a model config `mc` and its parameter count (model.param_count)."""
    cuda = cfg.device == "cuda"
    wb = 2 if cfg.dtype == "bfloat16" else 4
    n_pol = n_params
    n_crit = (n_pol - (0 if mc.tie_word_embeddings else mc.vocab_size * mc.hidden_size) + mc.hidden_size + 1
              if cfg.adv == "gae" else 0)
    n_ref = n_pol if cfg.kl_coef > 0 else 0
    optim_on_device = not cuda or cfg.optim_device != "cpu"
    mixed = wb != 4 or not optim_on_device
    D, I, L, H = mc.hidden_size, mc.intermediate_size, mc.num_hidden_layers, mc.num_attention_heads
    S = cfg.max_prompt + cfg.max_response
    kv_row = S * L * 2 * mc.num_key_value_heads * mc.head_dim * wb
    layer_act = lambda b: b * S * (10 * D + 4 * I) * wb + b * H * S * S * wb  # noqa: E731  one layer, rough
    micro = max(cfg.micro_batch or 4, cfg.critic_micro_batch or 1)
    train_act = (micro * S * D * wb * L + layer_act(micro)) if cfg.grad_checkpointing else L * layer_act(micro)
    chunk = 3 * cfg.logprob_chunk * mc.vocab_size * 4
    rows = (cfg.rollout_batch or cfg.batch_prompts) * cfg.samples
    # the compiled decode step samples with pre-drawn noise [rows, vocab] fp32 kept beside its cache
    noise = rows * mc.vocab_size * 4 if cfg.compile_rollout else 0
    optim = (4 * (n_pol + n_crit) if mixed else 0) + 8 * (n_pol + n_crit)
    # generation also holds fp32 logits and their softmax for every row, and one layer of the prefill
    gen_work = 3 * rows * mc.vocab_size * 4 + (rows // cfg.samples) * cfg.max_prompt * (10 * D + 4 * I) * wb
    dev = "gpu" if cuda else "cpu"
    ref_where = "cpu" if (cuda and cfg.ref_offload) else dev
    # offloaded optimizer: pinned masters and the gradients' non-blocking copies (one model at a time;
    # torch's pinned-block cache keeps them), allocated exactly (exact_pinning), not rounded up to 2^k
    host_grads = 4 * max(n_pol, n_crit) if not optim_on_device else 0
    pinned = (4 * (n_pol + n_crit) + host_grads) if not optim_on_device else 0
    items = [  # (name, bytes, where)
        ("policy weights", n_pol * wb, dev),
        ("critic weights", n_crit * wb, dev),
        ("reference weights", n_ref * wb, ref_where),
        ("fp32 master weights (policy + critic)", 4 * (n_pol + n_crit) if mixed else 0,
         "cpu, pinned" if not optim_on_device else dev),
        ("Adam moments m, v fp32 (policy + critic)", 8 * (n_pol + n_crit), "cpu" if not optim_on_device else dev),
        ("fp32 gradients (one model at a time)", 4 * max(n_pol, n_crit), dev),
        ("their copies on the host for the CPU optimizer", host_grads, "cpu, pinned"),
        (f"rollout KV cache ({rows} rows x {S} tokens)", rows * kv_row, dev),
        ("compiled sampler's noise (rows x vocab fp32; --compile-rollout)", noise, dev),
        ("generation working set (~: logits, prefill layer)", gen_work, dev),
        ("training activations (~, per micro-batch)", train_act, dev),
        ("log-prob chunk (~)", chunk, dev),
    ]
    base = n_pol * wb + n_crit * wb + (n_ref * wb if ref_where == dev else 0) + (optim if optim_on_device else 0)
    kept = rows * kv_row + noise if cfg.compile_rollout else 0   # the compiled path's cache outlives the rollout
    phases = {
        "rollout": base + rows * kv_row + noise + gen_work,
        "old/ref log-probs, values": base + kept + (n_ref * wb if ref_where != dev else 0)
        + layer_act(cfg.infer_batch) + chunk,
        "update": base + kept + 4 * max(n_pol, n_crit) + train_act + chunk,
    }
    host_extra = (n_ref * wb if ref_where == "cpu" and cuda else 0) + (optim if not optim_on_device else 0) + host_grads
    state = n_crit * wb + optim
    return {"params_policy": n_pol, "params_critic": n_crit, "items": items, "phases": phases,
            "device_peak": max(phases.values()), "host": host_extra if cuda else max(phases.values()),
            "pinned": pinned if cuda else 0,
            "checkpoint_policy": n_pol * wb, "checkpoint_state": state, "kv_per_row": kv_row}


def _params(n) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def _size(n) -> str:
    return f"{n / 2**30:8.2f} GiB" if n >= 2**27 else f"{n / 2**20:8.2f} MiB"


def format_budget(b: dict, cfg) -> str:
    lines = [f"memory budget (computed, not measured) for {_params(b['params_policy'])}-parameter policy, "
             f"{_params(b['params_critic'])} critic; dtype {cfg.dtype}, device {cfg.device}, "
             f"optimizer on {cfg.optim_device}, reference offload {cfg.ref_offload and cfg.device == 'cuda'}:"]
    for name, n, where in b["items"]:
        if n:
            lines.append(f"  {name:<50} {_size(n)}  [{where}]")
    for name, n in b["phases"].items():
        lines.append(f"  peak during {name:<38} {_size(n)}  [{'gpu' if cfg.device == 'cuda' else 'cpu'}]")
    if cfg.device == "cuda":
        lines.append(f"  {'host memory held (offloaded parts)':<50} {_size(b['host'])}  [cpu]")
        lines.append(f"  {'  of which pinned (page-locked)':<50} {_size(b['pinned'])}  [cpu]")
    lines.append("  resume reads the training state memory-mapped (page cache), never a second copy in memory")
    lines.append("  glibc's malloc keeps freed heap pages: RSS can run ~10% above this at small scale "
                 f"(MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD} returns them; bench/bench_ppo.py --memory-only)")
    lines.append(f"  per checkpoint: policy folder {_size(b['checkpoint_policy']).strip()}, training state "
                 f"{_size(b['checkpoint_state']).strip()} (--state-checkpoints {cfg.state_checkpoints})")
    return "\n".join(lines)


def plan_memory(cfg, mc, n_params: int, world: int = 1, distributed: bool = False):
    """Pick the optimizer's device and the generation batch sizes from the budget (cuda), or trivially (cpu)."""
    c = replace(cfg)
    if c.device != "cuda":
        c.optim_device = "device"
        c.rollout_batch = c.rollout_batch or c.batch_prompts
        if c.compile_rollout:   # validation calls with the rollout's rows reuse its compiled graphs
            c.val_batch = c.val_batch or c.rollout_batch * c.samples
        return c
    gpu = c.gpu_memory_gb * 2**30 if c.gpu_memory_gb else (
        torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 80 * 2**30)
    usable = 0.85 * gpu   # headroom for the allocator's fragmentation and CUDA's own context
    if distributed:   # the budget below is one process's plan; under FSDP each GPU holds 1/N of the weights
        c.optim_device = "device" if c.optim_device == "auto" else c.optim_device   # and of the Adam state
        c.rollout_batch = c.rollout_batch or c.batch_prompts // world     # all of a rank's prompts at once
    if c.optim_device == "auto":
        trial = replace(c, optim_device="device", rollout_batch=c.rollout_batch or 1)
        c.optim_device = "device" if memory_budget(trial, mc, n_params)["device_peak"] <= usable else "cpu"
    b = memory_budget(replace(c, rollout_batch=c.rollout_batch or 1), mc, n_params)
    per_row = (b["kv_per_row"] + 3 * mc.vocab_size * 4                       # cache, logits
               + c.max_prompt * (10 * mc.hidden_size + 4 * mc.intermediate_size) * 2)   # prefill layer
    room = usable - (b["phases"]["rollout"] - c.samples * per_row)
    rows = int(room // per_row)
    if c.compile_rollout:   # its cache stays through the updates too: both phases must fit
        kept_row = b["kv_per_row"] + mc.vocab_size * 4                      # cache and sampler noise
        rows = min(rows, int((usable - (b["phases"]["update"] - c.samples * kept_row)) // kept_row))
    if not c.rollout_batch:   # the most prompts that fit, in calls of equal size (one compiled row count)
        most = max(1, min(c.batch_prompts, rows // c.samples))
        calls = next(k for k in range(math.ceil(c.batch_prompts / most), c.batch_prompts + 1)
                     if c.batch_prompts % k == 0)
        c.rollout_batch = c.batch_prompts // calls
    if not c.val_batch:   # validation prompts (1 sample each) per call: the rollout's row count, whose graphs
        c.val_batch = c.rollout_batch * c.samples   # --compile-rollout has compiled already; its memory fits
    return c


# -----------------------------------------------------------------------------
# Disk: the checkpoints of a run must fit


def remove_state(p: Path):
    """Delete a step folder's state.pt, and the file it links to under --state-dir."""
    target = p.resolve()
    p.unlink()
    if target != p.absolute():
        target.unlink(missing_ok=True)


def make_room_for_state(run: Path, step: int, where: Path):
    """With --state-checkpoints last, the previous state.pt is deleted once the new one is in place,
    so a crash mid-save still leaves one to resume from; but that needs room for two (2 x 75 GiB for
    3B). When the disk has no room for a second one, delete the previous one first, and say so."""
    old = [d / "state.pt" for s, d in step_dirs(run).items() if s != step and (d / "state.pt").is_file()]
    if not old:
        return
    need = max(p.stat().st_size for p in old) * 1.05 + 2**26    # the new one is as big, plus a margin
    if shutil.disk_usage(where).free >= need:
        return
    print(f"{run}: no disk room for a second training state ({need / 2**30:.1f} GiB); deleting the previous "
          "one before writing the new one (a crash during this save would leave no state to resume from)",
          file=sys.stderr)
    for p in old:
        remove_state(p)


def _existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path


def disk_preflight(cfg, mc, run: Path, start: int = 0, *, n_params: int, verbose: bool = True):
    """Compare the free disk with what the run's checkpoints will occupy at their peak (the kept
    policy folders plus the one being written, the training states); resolve --state-checkpoints
    auto (last if it fits, else none, said on stderr); raise ValueError with the numbers and the
    options when the chosen policy does not fit."""
    c = replace(cfg)
    b = memory_budget(c, mc, n_params)
    policy = b["checkpoint_policy"] * 1.01 + 2**25                   # + tokenizer and config files
    state = b["checkpoint_state"] * 1.01 + 2**20
    saves = len({s for s in range(start + 1, c.steps + 1) if s % c.save_every == 0 or s == c.steps})
    folders = min(saves, c.keep_policies + 1 if c.keep_policies else saves)   # + the one being written
    states = {"none": 0, "final": 1, "last": 1, "all": folders, "auto": 1}[c.state_checkpoints]
    run_disk = _existing(run)
    state_disk = _existing(Path(c.state_dir)) if c.state_dir else run_disk
    same = os.stat(run_disk).st_dev == os.stat(state_disk).st_dev
    free_run, free_state = shutil.disk_usage(run_disk).free, shutil.disk_usage(state_disk).free

    def fits(n_states):
        if same:
            return folders * policy + n_states * state <= free_run
        return folders * policy <= free_run and n_states * state <= free_state
    if c.state_checkpoints == "auto":
        c.state_checkpoints = "last" if fits(1) else "none"
        if c.state_checkpoints == "none" and fits(0) and verbose:
            print(f"disk: no room for a training state ({state / 2**30:.1f} GiB) beside {folders} policy folders "
                  f"({folders * policy / 2**30:.1f} GiB) in {free_run / 2**30:.1f} GiB free: saving weights only "
                  "(--state-checkpoints none), so a stopped run cannot resume its optimizer; for that give "
                  "--state-dir on a disk with room", file=sys.stderr)
        states = 1 if c.state_checkpoints == "last" else 0
    if fits(states):
        return c
    where = f"{_size(free_run).strip()} free in {run_disk}" + (
        "" if same else f", {_size(free_state).strip()} in {state_disk}")
    gib = lambda n: _size(n).strip()   # noqa: E731
    raise ValueError(
        f"not enough disk for this run's checkpoints: {saves} saves keep up to {folders} policy folders of "
        f"{gib(policy)} ({gib(folders * policy)}) and {states} training state(s) of {gib(state)} "
        f"({gib(states * state)}) at once; {where}. Options: "
        "--keep-policies N (keep the newest N step folders), --state-checkpoints none (weights-only saves) or "
        "final (the state only at the end), --state-dir PATH (states on another disk), --save-every N, or free "
        "some disk")

