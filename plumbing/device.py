"""The machine and the process: CUDA diagnostics, SDPA kernel choice, random and optimizer state.

Plumbing for the training CLIs (sft.py, ppo.py) and the benchmarks. Nothing here imports a core file.
"""

from __future__ import annotations

import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import torch


def rng_state() -> dict:
    """Every random generator a training run draws from (python, torch CPU, CUDA), for resuming
    exactly: sft.py and ppo.py store it beside their checkpoints."""
    s = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict):
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def param_count(mc) -> int:
    """Parameters of a model.Transformer with this ModelConfig (tied embeddings counted once): what
    refuse_cpu_fallback and ppo.py's memory estimate weigh, known before any weight is loaded."""
    D, I, V, hd = mc.hidden_size, mc.intermediate_size, mc.vocab_size, mc.head_dim
    H, KV = mc.num_attention_heads, mc.num_key_value_heads
    attn = D * H * hd + 2 * D * KV * hd + H * hd * D
    attn += (H * hd + 2 * KV * hd) if mc.qkv_bias else 0
    attn += D if mc.o_bias else 0
    mlp = 3 * D * I + ((2 * I + D) if mc.mlp_bias else 0)
    layer = attn + mlp + 2 * D
    return V * D + mc.num_hidden_layers * layer + D + (0 if mc.tie_word_embeddings else V * D)


CPU_FALLBACK_MAX_PARAMS = 10**9   # --device auto may fall back to the CPU only below this


def refuse_cpu_fallback(n_params: int):
    """--device auto found no usable CUDA device: raise for a model above ~1B parameters, which on the
    CPU would train in fp32 for days and look hung; the message names the usual cause and its fix."""
    if n_params <= CPU_FALLBACK_MAX_PARAMS:
        return
    raise ValueError(f"--device auto: {no_cuda_help()} A {n_params / 1e9:.2f}B-parameter model would train on the CPU "
                     "in fp32, for days. To train on the CPU all the same, pass --device cpu.")


def nvidia_driver() -> Optional[str]:
    """The NVIDIA kernel module's version (None without an NVIDIA driver)."""
    try:
        return Path("/proc/driver/nvidia/version").read_text().split("Kernel Module")[1].split()[0]
    except (OSError, IndexError):
        return None


def no_cuda_help() -> str:
    """Why torch.cuda.is_available() may be False on a machine with a GPU, and the fix."""
    driver = nvidia_driver()
    return (f"CUDA is not available (torch {torch.__version__}, built for CUDA {torch.version.cuda}; "
            + (f"NVIDIA driver {driver}" if driver else "no NVIDIA driver found in /proc/driver/nvidia/version")
            + "). The usual cause is a driver/wheel mismatch: torch's default wheel is built for CUDA 13 and needs "
            "an NVIDIA driver >= 580 (nvidia-smi shows yours). With an older driver install the CUDA 12.x build: "
            "pip install torch --index-url https://download.pytorch.org/whl/cu126 (or upgrade the driver).")


def attention_backends(device) -> list:
    """Choose SDPA's CUDA kernels deliberately (call before the first CUDA attention): flash and
    memory-efficient, math as the fallback, never cuDNN. PyTorch prefers cuDNN attention on H100 with
    cuDNN >= 9.15 and CUDA >= 12.9, and it builds and caches a plan per exact shape: the eager decode's
    key length grows every step and its row count shrinks as rows finish, so nearly every step would
    pay a plan build. A no-op on CPU. Returns the names of the CUDA backends left enabled."""
    b = torch.backends.cuda
    if torch.device(device).type == "cuda":
        b.enable_cudnn_sdp(False)
        b.enable_flash_sdp(True)
        b.enable_mem_efficient_sdp(True)
        b.enable_math_sdp(True)
    return [name for name, on in (("flash", b.flash_sdp_enabled()), ("efficient", b.mem_efficient_sdp_enabled()),
                                  ("math", b.math_sdp_enabled()), ("cudnn", b.cudnn_sdp_enabled())) if on]


def own_optimizer_state(optimizer):
    """After load_state_dict from torch.load(..., mmap=True): copy the state tensors it adopted as they
    were (CPU tensors of the right dtype, e.g. Adam's moments) into memory of their own, one at a time.
    A mapping would read lazily from the file and keep its disk space after the file is deleted."""
    for st in optimizer.state.values():
        for k, v in st.items():
            if torch.is_tensor(v) and v.device.type == "cpu":
                st[k] = v.clone()


def autocast_bf16(device, mode: str) -> bool:
    """--autocast: compute in bf16 when asked for (bfloat16) or on CUDA (auto)."""
    return mode == "bfloat16" or (mode == "auto" and device.type == "cuda")


def autocast(device, mode: str):
    """--autocast as a context: bf16 autocast (autocast_bf16), otherwise a no-op."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if autocast_bf16(device, mode) else nullcontext()


class Timer:
    """Seconds between laps; on CUDA it waits for the queued kernels first, so a lap is their time."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.t = time.perf_counter()

    def lap(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        return dt


def peak_memory_gb(device) -> float:
    """The device's peak allocated memory since the last reset (cuda), or the host's peak RSS (cpu), in GiB."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KiB on Linux: host peak RSS
