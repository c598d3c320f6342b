"""Several processes: torchrun + FSDP2 (process group, collectives, sharding, full state dicts).

Plumbing for sft.py and ppo.py: without torchrun's environment every function here is a no-op or
returns what one process has. Nothing here imports a core file.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
#
# `torchrun --nproc-per-node N sft.py|ppo.py ...` starts N copies of the script with RANK, WORLD_SIZE
# and LOCAL_RANK in their environment; without them (plain `python ...`) none of this runs and no
# process group exists. Each rank holds 1/N of every parameter (FSDP2's `fully_shard`, one unit per
# transformer block plus the root for the embedding, final norm and head): before a block runs its
# shards are all-gathered, after backward its gradients are reduce-scattered, so parameters,
# gradients and Adam state all cost 1/N per GPU. The single-process dtype split maps onto FSDP2's
# mixed precision: the sharded parameters are the fp32 master weights the optimizer steps, and
# `param_dtype` (bf16) is what the all-gathered copy computes in; gradients are reduced in fp32.
#
# Gradients are *summed* over ranks, not averaged (divide factor 1): every loss here is already
# divided by a global count (tokens of the whole batch, over all ranks), so the sum of the ranks'
# gradients is the single-process gradient, whatever the world size.
#
# Generation is the one thing FSDP does badly: every forward is a collective, so all ranks would
# have to take the same number of decode steps. `gather_full` instead all-gathers the weights into
# an ordinary, unsharded model on each rank (the "hybrid engine" of veRL and OpenRLHF), which then
# generates at its own pace with the single-process code.

DIST_TIMEOUT_S = 600   # a collective that waits longer than this (a rank died or hangs) raises instead of hanging


def init_distributed(device, timeout_s: float = DIST_TIMEOUT_S) -> torch.device:
    """Join the process group torchrun describes (env RANK, WORLD_SIZE, LOCAL_RANK) and return this
    rank's device: cuda:LOCAL_RANK with NCCL for a CUDA device, the CPU with gloo otherwise. Without
    torchrun's variables it does nothing and returns `device`. Idempotent."""
    import datetime
    import torch.distributed as dist
    device = torch.device(device)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        cuda = device.type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return device


def close_distributed():
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int):
    """sys.exit(code); under torchrun, flush and os._exit(code) instead. With gloo, after the process
    group was destroyed and every file written, the interpreter's shutdown sometimes aborted in
    torch's C++ teardown ("terminate called without an active exception", SIGABRT: about 1 run in
    20-40 on the 2-core test machine), which made torchrun report a finished run as failed."""
    if "RANK" not in os.environ:
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def is_collective_failure(e: BaseException) -> bool:
    """Whether an exception is a failed collective under torchrun (a rank died, hangs past the
    timeout, or its connection broke), as opposed to a bug in this rank."""
    import torch.distributed as dist
    text = str(e).lower()
    return distributed() and (isinstance(e, dist.DistError) or any(
        s in text for s in ("timed out", "timeout", "connection closed", "connection reset", "broken pipe")))


def collective_failure_message(e: BaseException, out) -> str:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    return (f"error: rank {rank()} of {world_size()}: a collective with the other processes failed ({first}). "
            "Another rank probably died or hangs (see its output above). "
            f"{out} keeps its last complete checkpoint; rerun the same torchrun command to resume.")


def distributed() -> bool:
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    import torch.distributed as dist
    return dist.get_rank() if distributed() else 0


def world_size() -> int:
    import torch.distributed as dist
    return dist.get_world_size() if distributed() else 1


def is_main() -> bool:
    """Rank 0, the one process that writes files and logs (always True without torchrun)."""
    return rank() == 0


def barrier():
    import torch.distributed as dist
    if distributed():
        dist.barrier()


def _comm_device() -> torch.device:
    import torch.distributed as dist
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_sum(*values, op: str = "sum") -> tuple:
    """Floats (or scalar tensors) summed (op="max": maximized) over ranks, as Python floats in one
    all-reduce; the values themselves without torchrun."""
    vals = [float(v) for v in values]
    if not distributed():
        return tuple(vals)
    import torch.distributed as dist
    t = torch.tensor(vals, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return tuple(t.tolist())


def all_true(flag: bool) -> bool:
    """Whether `flag` holds on every rank (the flag itself without torchrun)."""
    return flag if not distributed() else all_sum(0.0 if flag else 1.0)[0] == 0


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's [n, ...] tensor stacked in rank order ([sum n, ...]); dim 1 may differ between
    ranks and is right-padded with zeros to the widest. x itself without torchrun."""
    if not distributed():
        return x
    import torch.distributed as dist
    if x.dtype == torch.bool:   # not every backend reduces bool tensors
        return all_gather_rows(x.to(torch.uint8)).bool()
    dev = _comm_device()
    shape = torch.tensor(list(x.shape), device=dev)
    shapes = [torch.zeros_like(shape) for _ in range(world_size())]
    dist.all_gather(shapes, shape)
    width = max(int(s[1]) for s in shapes) if x.dim() > 1 else None
    padded = F.pad(x, (0, width - x.shape[1])) if width is not None else x
    rows = max(int(s[0]) for s in shapes)
    padded = torch.cat([padded, padded.new_zeros((rows - x.shape[0], *padded.shape[1:]))]).to(dev)
    parts = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:int(s[0])] for p, s in zip(parts, shapes)]).to(x.device)


def all_gather_objects(obj) -> list:
    """Every rank's picklable object, in rank order ([obj] without torchrun)."""
    if not distributed():
        return [obj]
    import torch.distributed as dist
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def shard(model: nn.Module, compute_dtype=None, forward_methods=()) -> nn.Module:
    """FSDP2 in place: one unit per transformer Block, then the root (embedding, norm, head, and a
    critic's value head). compute_dtype: the all-gathered parameters' dtype (None = the stored one);
    gradients are reduced in fp32. forward_methods: methods other than forward() that run the root's
    parameters (Transformer.hidden_states, .logits), so FSDP all-gathers them there too."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    mp = MixedPrecisionPolicy(param_dtype=_dtype(compute_dtype), reduce_dtype=torch.float32)
    # the Blocks are the elements of a Transformer's `layers` (the critic's backbone included)
    blocks = [b for m in model.modules() if isinstance(getattr(m, "layers", None), nn.ModuleList) for b in m.layers]
    for block in blocks:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    for name in forward_methods:
        register_fsdp_forward_method(model, name)
    # a critic's values are a view ([..., 0]) of its head's output; FSDP2 warns that an in-place op on a
    # returned view would skip its backward hook. Nothing here modifies a model's output in place.
    import warnings
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)   # sum over ranks: the losses are divided by global counts
            m.set_force_sum_reduction_for_comms(True)   # a plain SUM (gloo has no PREMUL_SUM)
    return model


def _dtype(d) -> Optional[torch.dtype]:
    """A torch dtype from a dtype, None, or one of the names model.DTYPES knows."""
    if isinstance(d, str):
        if d not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"unknown dtype {d!r}; use one of float32, bfloat16, float16")
        return getattr(torch, d)
    return d


def _full(t):
    """The whole tensor of a (possibly sharded) parameter; an all-gather for a DTensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def gather_full(model: nn.Module, into: Optional[nn.Module] = None, device=None, dtype=None,
                rank0_only: bool = False) -> Optional[nn.Module]:
    """An ordinary (unsharded) copy of a sharded Transformer, every tensor all-gathered: copied into
    `into` when given (a rollout model kept between iterations), else a new Transformer on `device`
    in `dtype` (None on ranks other than 0 with rank0_only, e.g. for saving). Every rank must call
    it (the all-gathers are collectives)."""
    if into is None:
        from torch.distributed.fsdp import FSDPModule
        # fully_shard turned the model's class into FSDP<class>(FSDPModule, class): build the plain class
        cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
        with torch.device("meta"):
            into = cls(model.config)
        for name, p in model.named_parameters():
            module_name, _, leaf = name.rpartition(".")
            full = _full(p.detach())
            if rank0_only and not is_main():
                continue
            full = full.to(device, _dtype(dtype) or p.dtype)
            setattr(into.get_submodule(module_name), leaf, nn.Parameter(full, requires_grad=False))
        if rank0_only and not is_main():
            return None
        if model.config.tie_word_embeddings:
            into.lm_head.weight = into.embed_tokens.weight
        into.to(device)   # buffers follow; the Transformer recomputes its RoPE frequencies on the device
        return into.eval()
    targets = dict(into.named_parameters())
    with torch.no_grad():
        for name, p in model.named_parameters():
            targets[name].copy_(_full(p.detach()))
    return into


def full_state_dict(model: nn.Module) -> dict:
    """model.state_dict() with every sharded tensor gathered, on rank 0's CPU ({} on other ranks,
    which must call it too: each tensor is one all-gather)."""
    out = {}
    for k, v in model.state_dict().items():
        full = _full(v.detach())
        if is_main():
            out[k] = full.cpu()
    return out


def full_optimizer_state(model: nn.Module, optimizer) -> dict:
    """The optimizer's state for the whole (unsharded) model, keyed by parameter name, on rank 0's CPU."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model: nn.Module, state: Optional[dict], optimizer=None, optimizer_state: Optional[dict] = None):
    """Load full_state_dict / full_optimizer_state output into a sharded model and its optimizer
    (each rank keeps its shard; every rank passes the full dicts). state None: the optimizer only."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True)
    if state is not None:
        set_model_state_dict(model, state, options=opts)
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=opts)


# -----------------------------------------------------------------------------
# Bookkeeping over ranks: running means, scalar sums, per-row tensors (ppo.py's update statistics)


class Accum:
    """Weighted running means for update statistics. Under torchrun, sums and weights are summed over
    ranks (token-weighted means of the global batch), except `replicated` values, the same on every
    rank already (a global loss or gradient norm)."""

    def __init__(self):
        self.sums, self.weights, self.replicated = {}, {}, set()

    def add(self, key, value, weight=1.0, replicated=False):
        self.sums[key] = self.sums.get(key, 0.0) + float(value) * float(weight)
        self.weights[key] = self.weights.get(key, 0.0) + float(weight)
        if replicated:
            self.replicated.add(key)

    def means(self):
        sums, weights = dict(self.sums), dict(self.weights)
        if distributed():
            keys = sorted(k for k in sums if k not in self.replicated)
            summed = all_sum(*(sums[k] for k in keys), *(weights[k] for k in keys))
            sums.update(zip(keys, summed[:len(keys)]))
            weights.update(zip(keys, summed[len(keys):]))
        return {k: sums[k] / weights[k] for k in sums if weights[k] > 0}


def global_sum(x):
    """A scalar tensor summed over ranks (x itself without torchrun)."""
    return x if not distributed() else torch.tensor(all_sum(x)[0], dtype=x.dtype, device=x.device)


def all_rows(obj, keys):
    """A copy of the dataclass obj whose tensor fields `keys` (those not None) hold every rank's rows,
    stacked in rank order (all_gather_rows)."""
    from dataclasses import replace
    return replace(obj, **{k: all_gather_rows(getattr(obj, k)) for k in keys if getattr(obj, k) is not None})
