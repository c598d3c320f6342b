"""
model.py: one decoder-only transformer that runs Llama-3.x / SmolLM2 and Qwen2 / Qwen2.5 checkpoints,
in plain PyTorch, loaded straight from Hugging Face safetensors.

The two families are the same machine with a few switches:
    x = embed(tokens)
    for each layer:  x = x + Attention(RMSNorm(x))      (RoPE, grouped-query attention)
                     x = x + SwiGLU-MLP(RMSNorm(x))
    logits = lm_head(RMSNorm(x))                         (lm_head may be tied to embed)
Qwen2 adds biases to the q/k/v projections; Llama-3.1/3.2 stretch RoPE's low frequencies ("llama3"
rope scaling). Parameter names mirror Hugging Face's so checkpoints load without renaming tables.

Contents, in reading order: config -> layers -> tokenizer -> checkpoint files (read, load, save)
-> finding a checkpoint (alias, Hub download into the Hugging Face cache) -> generation with a
KV cache (plus a static-shape path that torch.compile turns into CUDA graphs) -> CLI.
"""

import argparse
import json
import math
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional, Sequence, Union
from urllib.parse import quote

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import countdown  # only for countdown.lock_dir, the project's one file lock (used by download)

# -----------------------------------------------------------------------------
# Config

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "llama3")


@dataclass
class ModelConfig:
    """Architecture hyperparameters, named as in a Hugging Face config.json."""
    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 1376
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 8
    head_dim: Optional[int] = None          # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6            # transformers' default for both families
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None     # None or {"rope_type": "llama3", "factor": ..., ...}
    tie_word_embeddings: bool = False
    attention_bias: bool = False            # biases on q/k/v (Qwen2: always; Llama: also on o_proj)
    mlp_bias: bool = False
    bos_token_id: Optional[int] = None
    eos_token_id: Union[int, list, None] = None
    torch_dtype: str = "float32"
    extra: dict = field(default_factory=dict)  # other config.json keys, written back unchanged

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not supported; this file implements "
                             f"{', '.join(SUPPORTED_MODEL_TYPES)} (Llama-3.x, SmolLM2, Qwen2, Qwen2.5)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        rope_type = (self.rope_scaling or {}).get("rope_type", (self.rope_scaling or {}).get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")

    @property
    def qkv_bias(self) -> bool:
        return self.model_type == "qwen2" or self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.model_type == "llama" and self.attention_bias

    @classmethod
    def from_hf(cls, d: dict) -> "ModelConfig":
        """Build from a config.json dict (transformers 4.x or 5.x layout)."""
        d = dict(d)
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"config.json has model_type {model_type!r}; supported: "
                             f"{', '.join(SUPPORTED_MODEL_TYPES)} (Llama-3.x, SmolLM2, Qwen2, Qwen2.5)")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {d['hidden_act']!r} is not supported (only 'silu')")
        if d.get("use_sliding_window"):
            raise ValueError("use_sliding_window=true is not supported (Qwen2 checkpoints ship it off)")
        # transformers 5 folds rope_theta and rope_scaling into one "rope_parameters" dict
        rope = d.pop("rope_parameters", None)
        if rope is not None:
            rope = dict(rope)
            d.setdefault("rope_theta", rope.pop("rope_theta", 10000.0))
            if rope.get("rope_type", rope.get("type", "default")) != "default":
                d.setdefault("rope_scaling", rope)
        if "torch_dtype" not in d and "dtype" in d:
            d["torch_dtype"] = d.pop("dtype")
        required = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"config.json is missing required field(s): {', '.join(missing)}")
        names = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: d[k] for k in names if k in d and d[k] is not None}
        kwargs.setdefault("num_key_value_heads", d["num_attention_heads"])
        if kwargs.get("rope_scaling") and kwargs["rope_scaling"].get("rope_type", kwargs["rope_scaling"].get("type")) == "default":
            kwargs["rope_scaling"] = None
        kwargs["extra"] = {k: v for k, v in d.items() if k not in names}
        return cls(**kwargs)

    def to_hf(self) -> dict:
        """The config.json dict that transformers and vLLM load."""
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[self.model_type]
        d = dict(self.extra)
        for k in ("transformers_version", "rope_parameters", "dtype", "architectures"):
            d.pop(k, None)
        d.update({f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"})
        d.update(architectures=[arch], hidden_act="silu")
        if self.model_type == "qwen2":
            d.pop("attention_bias", None)   # Qwen2 always has q/k/v biases and no such key
            d.pop("mlp_bias", None)
        return d


# -----------------------------------------------------------------------------
# Layers

class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 (as HF does) and cast back."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(config: ModelConfig, device=None) -> torch.Tensor:
    """RoPE frequencies theta^(-2i/d), with Llama-3's long-context rescaling when configured.

    llama3 scaling keeps high frequencies (short wavelengths, local order) as they are, divides
    low frequencies by `factor` (so positions far beyond the training length stay in range), and
    blends linearly in between.
    """
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    rs = config.rope_scaling
    if rs and rs.get("rope_type", rs.get("type")) == "llama3":
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old_len = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / hi) & ~(wavelen > old_len / lo)
        inv_freq = torch.where(medium, blended, scaled)
    return inv_freq


def rope_cos_sin(inv_freq, position_ids, dtype):
    """cos/sin tables [B, T, head_dim] for integer positions [B, T] (float32 math, then cast)."""
    freqs = position_ids[..., None].float() * inv_freq  # [B, T, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)             # HF layout: the two halves share a frequency
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """Rotate pairs (x_i, x_{i+d/2}) by position-dependent angles ("rotate_half" layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]  # cos/sin [B, T, hd] broadcast over heads


class KVCache:
    """Preallocated keys/values for every layer: [B, n_kv_heads, max_len, head_dim] each.

    Slot s of row b holds the token at sequence index s (prompts are left-padded, so early slots
    of short prompts are padding); `key_valid[b, s]` says whether that slot may be attended to.
    """

    def __init__(self, config: ModelConfig, batch: int, max_len: int, dtype, device):
        # zeros, not empty: a masked slot gets probability exactly 0, but 0 * NaN garbage is still NaN
        shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.key_valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.padded = True  # False when no row has padding slots: then attention needs no mask

    def select_rows(self, keep):
        """Keep only rows `keep` (an index tensor), one layer at a time: never two full caches alive."""
        for i in range(len(self.k)):
            self.k[i], self.v[i] = self.k[i][keep], self.v[i][keep]
        self.key_valid = self.key_valid[keep]

    def compact_rows(self, keep):
        """Move rows `keep` (an index tensor of n rows) to the first n rows, in place: the tensors keep
        their addresses (the fast path's cache), rows n and beyond hold stale data from then on."""
        n = len(keep)
        for t in self.k + self.v:
            t[:n] = t[keep]               # t[keep] is a copy of n rows of one layer, so overlaps are safe
        self.key_valid[:n] = self.key_valid[keep]

    def fill_from(self, prefill: "KVCache", n: int):
        """Copy a prefill cache of B rows and P slots into this one's first P slots, n copies of each
        row (B * n rows here), in place: this cache's tensors keep their addresses."""
        P = prefill.key_valid.shape[1]
        for dst, src in zip(self.k + self.v, prefill.k + prefill.v):
            B = src.shape[0]                                   # a broadcast copy: no [B * n, ...] temporary
            dst[:, :, :P].view(B, n, *dst.shape[1:2], P, dst.shape[3]).copy_(src[:, None, :, :P])
        self.key_valid[:, :P] = prefill.key_valid.repeat_interleave(n, dim=0)
        self.padded = prefill.padded


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        D = config.hidden_size
        self.q_proj = nn.Linear(D, self.n_heads * self.hd, bias=config.qkv_bias)
        self.k_proj = nn.Linear(D, self.n_kv * self.hd, bias=config.qkv_bias)
        self.v_proj = nn.Linear(D, self.n_kv * self.hd, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.hd, D, bias=config.o_bias)

    def forward(self, x, cos, sin, mask, cache: Optional[KVCache] = None, start: int = 0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.hd).transpose(1, 2)  # [B, H, T, hd]
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)     # [B, Hkv, T, hd]
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            kc, vc = cache.k[self.layer_idx], cache.v[self.layer_idx]
            if isinstance(start, int):
                # write this step's keys/values into their slots, then attend over everything so far
                kc[:, :, start:start + T] = k
                vc[:, :, start:start + T] = v
                k, v = kc[:, :, :start + T], vc[:, :, :start + T]
            else:
                # static shapes (the compiled decode step): `start` is a one-element slot tensor, and
                # we attend over the cache's first L slots, L = the mask's length (a length bucket
                # at least as long as the filled prefix, see _attend_len); the mask hides slots not
                # written yet. Every step of one bucket has identical shapes, which CUDA graphs require.
                # After compaction the step runs only the cache's first B rows: this step's k/v are
                # padded to all rows (the others are finished, their slot is never read), so the
                # write stays one in-place index_copy_ into the whole cache tensor.
                R = kc.shape[0]
                if B < R:
                    k, v = F.pad(k, (0, 0, 0, 0, 0, 0, 0, R - B)), F.pad(v, (0, 0, 0, 0, 0, 0, 0, R - B))
                kc.index_copy_(2, start, k)
                vc.index_copy_(2, start, v)
                L = mask.shape[-1]
                k, v = kc[:B, :, :L], vc[:B, :, :L]
        # grouped-query attention: each group of G = n_heads // n_kv query heads shares one k/v head
        G = self.n_heads // self.n_kv
        if T == 1:
            # decoding, one query per row: fold each group's G query heads into SDPA's query axis,
            # [B, n_kv, G, hd] against [B, n_kv, S, hd]. Exact (the mask [B, 1, 1, S] is the same for
            # all G), and on CPU about twice as fast as SDPA with enable_gqa on [B, n_heads, 1, hd].
            y = F.scaled_dot_product_attention(q.reshape(B, self.n_kv, G, self.hd), k, v, attn_mask=mask)
            y = y.reshape(B, self.n_heads, 1, self.hd)
        elif mask is None:
            # causal, no mask: flash attention takes grouped k/v heads as they are (enable_gqa)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=G > 1)
        else:
            # with a mask: no fused CUDA kernel takes a mask together with enable_gqa, and SDPA's
            # fallback (the math kernel) builds [B, H, T, S] fp32 scores. Repeating each k/v head for
            # its G query heads (what enable_gqa means) costs [B, H, S, hd] and lets the
            # memory-efficient kernel, which accepts masks, run instead.
            if G > 1:
                k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        D, H = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(D, H, bias=config.mlp_bias)
        self.up_proj = nn.Linear(D, H, bias=config.mlp_bias)
        self.down_proj = nn.Linear(H, D, bias=config.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, cache=None, start=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, start)
        return x + self.mlp(self.post_attention_layernorm(x))


def attention_mask_4d(key_valid, q_start: int, T: int):
    """Boolean [B, 1, T, S] mask: query slot q_start+i may see key slot s <= q_start+i if s is valid.

    A padding query has no valid key before it; letting every slot see itself keeps its softmax
    finite. Its output is never used, because no real token attends to a padding key.
    """
    S = key_valid.shape[1]
    q = torch.arange(q_start, q_start + T, device=key_valid.device)[:, None]
    k = torch.arange(S, device=key_valid.device)[None, :]
    return (((k <= q) & key_valid[:, None, :]) | (k == q))[:, None]


def _pads_only_at_end(attention_mask) -> bool:
    """True when every row is real tokens followed by padding (or none): then plain causal attention
    gives every real token exactly what the mask would (the padding comes after it), and SDPA can
    run its fused causal kernel with no mask. Outputs at padding positions differ; they are unused.
    One host sync; training and scoring forwards (SFT's batches, unpadded ones) take this path."""
    m = attention_mask.bool()
    return bool(m[:, 0].all() and (m[:, 1:] <= m[:, :-1]).all())


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        # _weight skips nn.Embedding's own normal_() init: init_weights() below does it, and on the meta
        # device that call would import torch._dynamo (~70 MB of host memory while loading)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        device = self.embed_tokens.weight.device
        if device.type == "meta":
            # a model about to be filled from a checkpoint: compute nothing on meta (torch would
            # import its compiler stack for that), load_checkpoint_dir sets the real frequencies
            self.register_buffer("inv_freq", rope_inv_freq(config, device="cpu"), persistent=False)
        else:
            self.register_buffer("inv_freq", rope_inv_freq(config, device=device), persistent=False)
            self.init_weights()

    def init_weights(self, std: float = 0.02):
        """Random init for training from scratch: N(0, std) matrices, zero biases, unit norms."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16) would round the RoPE frequencies too; recompute them in float32 on the
        # new device instead (HF's bf16 reference model does not, defect D-P12 of the original)
        super()._apply(fn, recurse)
        self.inv_freq = rope_inv_freq(self.config, device=self.embed_tokens.weight.device)
        return self

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, *,
                      cache: Optional[KVCache] = None, cache_start: int = 0, cache_len: Optional[int] = None):
        """Final normed hidden states [B, T, D].

        attention_mask [B, T]: 1 for real tokens, 0 for padding (left or right; padding only on the
        right, or none, needs no mask: causal attention is exact for the real tokens). With a KV cache,
        the mask comes from cache.key_valid and input_ids sit at slots cache_start..cache_start+T-1;
        a tensor cache_start (one slot, T = 1) selects the static-shape decode step used by generate,
        which attends over the cache's first cache_len slots (default: all of them) of its first B rows.
        """
        B, T = input_ids.shape
        static = cache is not None and not isinstance(cache_start, int)
        if position_ids is None and static:
            raise ValueError("the static-shape decode step needs explicit position_ids")
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            else:
                position_ids = torch.arange(cache_start, cache_start + T, device=input_ids.device).expand(B, T)
        if static:
            mask = cache.key_valid[:B, None, None, :cache_len]  # [B, 1, 1, L]: one query per row sees its valid slots
        elif cache is not None and (cache.padded or (T > 1 and cache_start > 0)):
            mask = attention_mask_4d(cache.key_valid[:, :cache_start + T], cache_start, T)
        elif cache is not None:
            mask = None  # no padding anywhere: causal prefill from slot 0, or one query that sees all slots
        elif attention_mask is not None and not _pads_only_at_end(attention_mask):
            mask = attention_mask_4d(attention_mask.bool(), 0, T)
        else:
            mask = None  # plain causal attention
        x = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(self.inv_freq, position_ids, x.dtype)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and cache is None:
                # keep only each layer's input; recompute its activations during backward
                x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, cache_start)
        return self.norm(x)

    def logits(self, hidden):
        return self.lm_head(hidden)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        """Logits [B, T, V]."""
        return self.logits(self.hidden_states(input_ids, attention_mask, position_ids))


# -----------------------------------------------------------------------------
# Tokenizer

def _token_str(x):
    """tokenizer_config.json stores special tokens as strings or as {"content": ...} dicts."""
    return x.get("content") if isinstance(x, dict) else x


class Tokenizer:
    """A thin wrapper over `tokenizers.Tokenizer` that knows the special tokens.

    encode() adds no BOS unless asked: the paper tokenizes the Countdown prompt with
    add_special_tokens=False. pad falls back to eos when the checkpoint has none, as the reference.
    """

    def __init__(self, tk, eos_token: str, pad_token: Optional[str] = None, bos_token: Optional[str] = None,
                 config: Optional[dict] = None):
        self.tk = tk
        self.eos_token, self.bos_token = eos_token, bos_token
        self.pad_token = pad_token or eos_token
        self.eos_id = self._id(eos_token)
        self.pad_id = self._id(self.pad_token)
        self.bos_id = self._id(bos_token) if bos_token else None
        self.config = dict(config or {})  # the rest of tokenizer_config.json, written back by save()

    def _id(self, token):
        i = self.tk.token_to_id(token)
        if i is None:
            raise ValueError(f"special token {token!r} is not in the tokenizer's vocabulary")
        return i

    @classmethod
    def from_dir(cls, path) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer
        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise FileNotFoundError(f"{tj} not found: the checkpoint folder needs the fast-tokenizer file "
                                    "tokenizer.json (slow-only tokenizers such as tokenizer.model are not supported)")
        tk = HFTokenizer.from_file(str(tj))
        cfg = _read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
        eos, bos, pad = (_token_str(cfg.get(k)) for k in ("eos_token", "bos_token", "pad_token"))
        if eos is None:  # fall back to the model's eos id
            for name in ("generation_config.json", "config.json"):
                eid = _read_json(path / name).get("eos_token_id") if (path / name).is_file() else None
                if eid is not None:
                    eos = tk.id_to_token(eid[0] if isinstance(eid, list) else eid)
                    break
        if eos is None:
            raise ValueError(f"cannot tell the EOS token of {path}: set eos_token in tokenizer_config.json")
        return cls(tk, eos, pad, bos, config=cfg)

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, bos: bool = False) -> list:
        ids = self.tk.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos and self.bos_id is not None else []) + ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save(self, out_dir):
        out_dir = Path(out_dir)
        self.tk.save(str(out_dir / "tokenizer.json"))
        cfg = dict(self.config)
        cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        cfg.update(eos_token=self.eos_token, pad_token=self.pad_token, bos_token=self.bos_token)
        _write_json(out_dir / "tokenizer_config.json", cfg)


def add_tokens(model: "Transformer", tokenizer: Tokenizer, tokens) -> list:
    """Add `tokens` to the tokenizer as single, never-split tokens and give the model a row for each
    id past its embedding; returns their ids. Tokens already present keep their ids.

    They are added as plain (not special) tokens, so decode(..., skip_special_tokens=True) keeps
    them: Satori's meta-actions are part of the reasoning a reader and the reward look at. A new
    row starts at the mean of the existing embeddings (and head rows, when untied): the logits of
    the old tokens do not change, and a new token starts as an average token, not a random one.
    """
    from tokenizers import AddedToken
    new = [t for t in tokens if tokenizer.tk.token_to_id(t) is None]
    if new:
        tokenizer.tk.add_tokens([AddedToken(t, special=False, normalized=False, single_word=False) for t in new])
    ids = [tokenizer.tk.token_to_id(t) for t in tokens]
    old_rows = model.embed_tokens.weight.shape[0]
    rows = max(old_rows, max(ids) + 1)
    if rows > old_rows:
        with torch.no_grad():
            def grow(w):
                extra = w.mean(0, keepdim=True).expand(rows - old_rows, -1)
                return nn.Parameter(torch.cat([w, extra]), requires_grad=w.requires_grad)
            model.embed_tokens.weight = grow(model.embed_tokens.weight)
            model.embed_tokens.num_embeddings = rows
            if model.config.tie_word_embeddings:
                model.lm_head.weight = model.embed_tokens.weight
            else:
                model.lm_head.weight = grow(model.lm_head.weight)
            model.lm_head.out_features = rows
        model.config.vocab_size = rows
    return ids


# -----------------------------------------------------------------------------
# Checkpoint files: read safetensors, load a folder, save a folder

def _read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _write_json(path, obj):
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool}


def parse_dtype(dtype) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def read_safetensors(path, dtype=None):
    """Yield (name, tensor) from a .safetensors file, one tensor at a time.

    The format is an 8-byte header length, a JSON header {name: {dtype, shape, data_offsets}}, then
    raw little-endian bytes. Reading each tensor with readinto() (instead of memory-mapping the
    file) means the host holds at most one source tensor beside the weights already loaded.
    """
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path} is not a safetensors file (too short)")
        n = int.from_bytes(raw, "little")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{path} is not a valid safetensors file (bad header); re-download it") from None
        base = 8 + n
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            t = torch.empty(info["shape"], dtype=_ST_DTYPES[info["dtype"]])
            if end > start:
                f.seek(base + start)
                got = f.readinto(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
                if got != end - start:
                    raise ValueError(f"{path} is truncated (tensor {name} is incomplete); re-download it")
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            yield name, t


def _weight_files(path: Path) -> list:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_read_json(index)["weight_map"].values()))
        return [path / s for s in shards]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"no weights in {path}: expected model.safetensors, or shards listed in "
                            "model.safetensors.index.json (.bin/.pth checkpoints are not supported)")


def _hf_to_ours(name: str) -> str:
    return name[len("model."):] if name.startswith("model.") else name


def _ours_to_hf(name: str) -> str:
    return name if name.startswith("lm_head.") else "model." + name


def load_checkpoint_dir(path, device="cpu", dtype=None):
    """Load a local HF-layout folder. Parameters are created on the meta device (no memory) and
    filled tensor by tensor in the target dtype, so peak host memory stays near one copy."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder {path} does not exist")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json; a checkpoint folder holds config.json, "
                                "model.safetensors (or shards + index) and tokenizer.json")
    config = ModelConfig.from_hf(_read_json(path / "config.json"))
    dtype = parse_dtype(dtype) or parse_dtype(config.torch_dtype if config.torch_dtype in DTYPES else "float32")
    tokenizer = Tokenizer.from_dir(path)
    files = _weight_files(path)
    with torch.device("meta"):
        model = Transformer(config)
    params = dict(model.named_parameters())
    for file in files:
        for name, t in read_safetensors(file, dtype):
            key = _hf_to_ours(name)
            if key == "lm_head.weight" and config.tie_word_embeddings:
                continue  # tied: the embedding matrix is the head
            if key not in params:
                raise ValueError(f"{file.name} has unexpected tensor {name!r}; does config.json match the weights?")
            if tuple(t.shape) != tuple(params[key].shape):
                raise ValueError(f"tensor {name} has shape {tuple(t.shape)}, config.json implies {tuple(params[key].shape)}")
            module_name, _, leaf = key.rpartition(".")
            setattr(model.get_submodule(module_name), leaf, nn.Parameter(t.to(device), requires_grad=True))
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise ValueError(f"checkpoint {path} lacks weights for: {', '.join(missing[:5])}"
                         + (" ..." if len(missing) > 5 else ""))
    model.inv_freq = rope_inv_freq(config, device=torch.device(device))
    return model.eval(), tokenizer


def load(name_or_path, device="cpu", dtype=None):
    """(model, tokenizer) from a local folder, a short alias (qwen2.5-3b) or a Hub repo id."""
    parse_dtype(dtype)  # fail on a bad dtype name before any download
    return load_checkpoint_dir(resolve_checkpoint(name_or_path), device=device, dtype=dtype)


def save(model: Transformer, tokenizer: Tokenizer, out_dir, *, max_shard_size: int = 5 * 2**30,
         dtype=None, overwrite: bool = False):
    """Write an HF-compatible folder that model.load, transformers and vLLM load unchanged.

    Written into a temporary sibling folder, then renamed into place, so an interrupted save never
    leaves a half-written checkpoint under out_dir.
    """
    from safetensors.torch import save_file
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True or choose another folder")
    dtype = parse_dtype(dtype)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tied = model.config.tie_word_embeddings
    tensors = [(n, p) for n, p in model.state_dict(keep_vars=True).items()
               if not (tied and n == "lm_head.weight")]
    el = lambda p: p.numel() * (dtype.itemsize if dtype else p.element_size())  # noqa: E731
    shards, size = [[]], 0
    for n, p in tensors:  # greedy shards of at most max_shard_size bytes (one tensor may exceed it)
        if shards[-1] and size + el(p) > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append((n, p))
        size += el(p)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        sd = {_ours_to_hf(n): p.detach().to("cpu", dtype or p.dtype).contiguous() for n, p in shard}
        save_file(sd, str(tmp / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in sd})
        del sd
    if len(shards) > 1:
        total = sum(el(p) for _, p in tensors)
        _write_json(tmp / "model.safetensors.index.json",
                    {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    cfg = model.config.to_hf()
    cfg["torch_dtype"] = {v: k for k, v in DTYPES.items()}[dtype or next(model.parameters()).dtype]
    _write_json(tmp / "config.json", cfg)
    gen = {"bos_token_id": cfg.get("bos_token_id"), "eos_token_id": cfg.get("eos_token_id")}
    _write_json(tmp / "generation_config.json", {k: v for k, v in gen.items() if v is not None})
    tokenizer.save(tmp)
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    return out


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


def param_count(mc: ModelConfig) -> int:
    """Parameters of a Transformer with this config (tied embeddings counted once)."""
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


def checkpoint_config(name_or_path) -> ModelConfig:
    """The ModelConfig of a checkpoint folder, alias or Hub id (downloaded if needed), or of a config.json."""
    p = Path(name_or_path)
    if p.is_file() and p.suffix == ".json":
        return ModelConfig.from_hf(_read_json(p))
    return ModelConfig.from_hf(_read_json(resolve_checkpoint(name_or_path) / "config.json"))


# -----------------------------------------------------------------------------
# Finding a checkpoint: local folder, alias, or Hugging Face Hub repo
#
# The Hub is plain HTTPS, so `requests` is all a download needs:
#   GET {endpoint}/api/models/{repo}/revision/{rev}              -> {"sha": commit id, ...}
#   GET {endpoint}/api/models/{repo}/tree/{commit}               -> [{"type", "path", "size", "oid",
#                                                     "lfs": {"oid": sha256} for large files}, ...]
#   GET {endpoint}/{repo}/resolve/{commit}/{path}                -> the file (large ones redirect
#                                                                   to a CDN; Range requests work)
# Files land in the Hugging Face cache layout, so huggingface_hub and this file share downloads:
#   {cache}/models--{org}--{name}/blobs/{sha256, or git oid for small files}
#                                /snapshots/{commit}/{path} -> ../../blobs/{...}   (relative symlink)
#                                /refs/{revision}                                  (text: the commit)

ALIASES = {
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B", "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B",
    "qwen2.5-3b": "Qwen/Qwen2.5-3B", "qwen2.5-7b": "Qwen/Qwen2.5-7B",
    "qwen2.5-0.5b-instruct": "Qwen/Qwen2.5-0.5B-Instruct", "qwen2.5-1.5b-instruct": "Qwen/Qwen2.5-1.5B-Instruct",
    "qwen2.5-3b-instruct": "Qwen/Qwen2.5-3B-Instruct", "qwen2.5-7b-instruct": "Qwen/Qwen2.5-7B-Instruct",
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B", "llama-3.2-3b": "meta-llama/Llama-3.2-3B",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M", "smollm2-360m": "HuggingFaceTB/SmolLM2-360M",
    "smollm2-1.7b": "HuggingFaceTB/SmolLM2-1.7B",
}
_CHECKPOINT_FILES = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                     "special_tokens_map.json", "model.safetensors", "model.safetensors.index.json"}
_SHARD_NAME = re.compile(r"model-\d+-of-\d+\.safetensors")
_DOWNLOAD_CHUNK = 1 << 20  # bytes per write; a broken connection loses at most the chunk in flight
LOCAL_LAYOUT_HELP = ("Without the Hub you can pass --model (or load()) a local folder holding config.json, "
                     "model.safetensors (or model-0000X-of-0000N.safetensors shards + model.safetensors.index.json), "
                     "tokenizer.json and tokenizer_config.json, e.g. copied from a machine that has the model.")


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _hf_home() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME", "~/.cache")
    return Path(os.environ.get("HF_HOME") or os.path.join(xdg, "huggingface")).expanduser()


def hub_cache_dir() -> Path:
    """$HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub (huggingface_hub's rule)."""
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    return Path(cache).expanduser() if cache else _hf_home() / "hub"


def _hub_token() -> Optional[str]:
    """HF_TOKEN, HUGGING_FACE_HUB_TOKEN, or the file `huggingface-cli login` writes. Never logged."""
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if not token:
        path = Path(os.environ.get("HF_TOKEN_PATH") or _hf_home() / "token").expanduser()
        token = path.read_text().strip() if path.is_file() else None
    return token or None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_checkpoint(name_or_path, revision: str = "main") -> Path:
    """A local folder is used as it is; an alias or repo id is looked up in the cache or downloaded."""
    p = Path(name_or_path)
    if p.is_dir():
        return p
    name = str(name_or_path)
    repo = ALIASES.get(name.lower(), name)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo) or p.exists():
        raise FileNotFoundError(f"{name!r} is not a checkpoint folder, a known alias ({', '.join(ALIASES)}) "
                                "or a Hub repo id like Qwen/Qwen2.5-3B")
    try:
        return download(repo, revision=revision)
    except (FileNotFoundError, PermissionError) as e:
        if repo != name:  # an alias: the message is about the Hub
            raise
        raise type(e)(f"{e} (there is no local folder {name!r} either)") from None


def download(repo_id: str, revision: str = "main", cache_dir=None) -> Path:
    """The local snapshot folder of a Hub model repo, downloading only the files a checkpoint needs.

    Files already in the cache (ours or huggingface_hub's) are not fetched again; a partial file
    from an interrupted run is resumed. HF_HUB_OFFLINE=1 uses the cache only; so does a failed
    connection when the cache already holds a complete snapshot.
    """
    import requests
    repo_dir = Path(cache_dir or hub_cache_dir()) / ("models--" + repo_id.replace("/", "--"))
    cached = _cached_snapshot(repo_dir, revision)
    if _offline():
        if cached is None:
            raise FileNotFoundError(f"HF_HUB_OFFLINE is set and {repo_id} ({revision}) is not in the cache "
                                    f"{repo_dir.parent}. {LOCAL_LAYOUT_HELP}")
        return cached
    endpoint, token = hub_endpoint(), _hub_token()
    api = f"{endpoint}/api/models/{repo_id}"
    try:
        commit = _hub_get(f"{api}/revision/{quote(revision, safe='')}", repo_id, token).json()["sha"]
        listing, url = [], f"{api}/tree/{commit}"  # the top folder is all we need; long lists come in pages
        while url:
            r = _hub_get(url, repo_id, token)
            listing += r.json()
            url = r.links.get("next", {}).get("url")
    except (requests.ConnectionError, requests.Timeout) as e:
        if cached is not None:
            print(f"cannot reach {endpoint} ({type(e).__name__}); using the cached {cached}", file=sys.stderr)
            return cached
        raise ConnectionError(f"cannot reach {endpoint} to download {repo_id} ({type(e).__name__}). "
                              f"{LOCAL_LAYOUT_HELP} (HF_ENDPOINT selects a mirror.)") from None
    files = _checkpoint_files(listing, repo_id)
    snapshot = repo_dir / "snapshots" / commit
    for f in files:
        dest = snapshot / f["path"]
        if dest.is_file() and dest.stat().st_size == f["size"]:
            continue  # already here, downloaded by us or by huggingface_hub
        blob = repo_dir / "blobs" / ((f.get("lfs") or {}).get("oid") or f["oid"])
        # one downloader per file: a second process waits, then finds the blob complete. The lock file
        # is the one huggingface_hub takes (.locks/models--org--name/<blob>.lock), so it waits for us too.
        with countdown.lock_dir(repo_dir.parent / ".locks" / repo_dir.name, f"download of {repo_id} {f['path']}",
                                wait=True, name=blob.name + ".lock"):
            if not (blob.is_file() and blob.stat().st_size == f["size"]):
                url = f"{endpoint}/{repo_id}/resolve/{commit}/{quote(f['path'])}"
                _download_file(url, blob, f["size"], (f.get("lfs") or {}).get("oid"), token, repo_id)
            _link(blob, dest)
    if revision != commit:  # remember which commit the branch/tag named, for offline use
        ref = repo_dir / "refs" / revision
        ref.parent.mkdir(parents=True, exist_ok=True)
        _write_text(ref, commit)
    return snapshot


def _hub_get(url, repo_id, token, **kw):
    """GET with our auth header; turn the Hub's error statuses into errors that say what to do."""
    import requests
    r = requests.get(url, headers=_auth_header(token), timeout=(10, 60), **kw)
    _check_status(r, repo_id, token)
    return r


def _auth_header(token) -> dict:
    # requests drops this header when a redirect leaves the host, so CDNs never see the token
    return {"Authorization": f"Bearer {token}"} if token else {}


def _check_status(r, repo_id, token):
    if r.status_code < 400:
        return
    endpoint, code = hub_endpoint(), r.headers.get("X-Error-Code", "")
    if r.status_code == 404 or code in ("RevisionNotFound", "EntryNotFound"):
        raise FileNotFoundError(f"{repo_id}: not found on {endpoint} (HTTP {r.status_code} {code}) at {r.url}; "
                                "check the repo name (e.g. Qwen/Qwen2.5-3B), the revision, and HF_ENDPOINT")
    if r.status_code in (401, 403):
        # the Hub answers 401 for a missing repo too, so as not to reveal private names
        sent = ("a token was sent (HF_TOKEN, or the huggingface-cli login file) but it has no access or is invalid"
                if token else "no token was sent (HF_TOKEN is unset)")
        raise PermissionError(
            f"{repo_id}: access denied by {endpoint} (HTTP {r.status_code} {code}); {sent}. If the name is "
            f"right, the repo is gated or private: open {endpoint}/{repo_id} while logged in and accept its "
            f"license, create a read token at {endpoint}/settings/tokens, then `export HF_TOKEN=...` and retry.")
    raise ConnectionError(f"{repo_id}: {endpoint} answered HTTP {r.status_code} for {r.url}; try again later")


def _checkpoint_files(listing, repo_id) -> list:
    """The tree entries a checkpoint needs: configs, tokenizer files, safetensors weights."""
    top = {f["path"]: f for f in listing if f.get("type", "file") == "file" and "/" not in f["path"]}
    want = [f for p, f in top.items() if p in _CHECKPOINT_FILES or _SHARD_NAME.fullmatch(p)]
    if "model.safetensors.index.json" in top:  # sharded: skip a stray single-file copy
        want = [f for f in want if f["path"] != "model.safetensors"]
    names = {f["path"] for f in want}
    missing = [n for n in ("config.json", "tokenizer.json") if n not in names]
    if not names & {"model.safetensors", "model.safetensors.index.json"}:
        missing.append("model.safetensors (or shards + model.safetensors.index.json)")
    if missing:
        raise FileNotFoundError(f"{repo_id} has no {', '.join(missing)}; only safetensors checkpoints with a "
                                "fast tokenizer are supported (.bin/.pth weights and tokenizer.model are not)")
    return sorted(want, key=lambda f: f["size"])  # small files first: fail fast on bad configs


def _download_file(url, blob: Path, size: int, sha256: Optional[str], token, repo_id, retries: int = 5):
    """Stream url into blob. A broken transfer is resumed with an HTTP Range request, from where
    the .incomplete file stops (also across runs); size and sha256 are checked before os.replace."""
    import hashlib
    import requests
    from tqdm import tqdm
    part = blob.with_name(blob.name + ".incomplete")
    part.parent.mkdir(parents=True, exist_ok=True)
    name = url.rsplit("/", 1)[-1]
    for attempt in range(retries):
        have = part.stat().st_size if part.exists() else 0
        if have == size:
            break  # complete but not yet verified (a previous run stopped right here)
        headers = _auth_header(token)
        if 0 < have < size:
            headers["Range"] = f"bytes={have}-"
        try:
            with requests.get(url, headers=headers, stream=True, timeout=(10, 60)) as r:
                _check_status(r, repo_id, token)
                if r.status_code != 206:  # 200: the server sent the whole file, start over
                    have = 0
                with open(part, "ab" if have else "wb") as f, \
                        tqdm(total=size, initial=have, unit="B", unit_scale=True, desc=name, file=sys.stderr) as bar:
                    for chunk in r.iter_content(chunk_size=_DOWNLOAD_CHUNK):
                        f.write(chunk)
                        bar.update(len(chunk))
            break
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
            if attempt == retries - 1:
                raise ConnectionError(f"downloading {url} failed {retries} times ({type(e).__name__}); "
                                      f"run again to resume from {part}. {LOCAL_LAYOUT_HELP}") from None
            print(f"{name}: connection broke ({type(e).__name__}); resuming", file=sys.stderr)
            time.sleep(min(0.5 * 2 ** attempt, 8))
    got = part.stat().st_size
    if got != size:
        part.unlink()
        raise ValueError(f"{name} from {repo_id}: received {got} bytes but the Hub lists {size}; the partial "
                         "file was deleted, run again (a proxy or mirror may be truncating downloads)")
    if sha256:
        h = hashlib.sha256()
        with open(part, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
        if h.hexdigest() != sha256:
            part.unlink()
            raise ValueError(f"{name} from {repo_id}: sha256 {h.hexdigest()} does not match the Hub's {sha256}; "
                             "the corrupt file was deleted, run again")
    os.replace(part, blob)


def _link(blob: Path, dest: Path):
    """Point snapshots/{commit}/{path} at its blob with a relative symlink (a copy where symlinks fail)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.symlink(os.path.relpath(blob, dest.parent), tmp)
    except OSError:
        shutil.copyfile(blob, tmp)
    os.replace(tmp, dest)


def _write_text(path: Path, text: str):
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _cached_snapshot(repo_dir: Path, revision: str) -> Optional[Path]:
    """The cached snapshot for revision if it holds a complete checkpoint, else None."""
    ref = repo_dir / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snap = repo_dir / "snapshots" / commit
    if not ((snap / "config.json").is_file() and (snap / "tokenizer.json").is_file()):
        return None
    try:
        return snap if all(f.is_file() for f in _weight_files(snap)) else None
    except (FileNotFoundError, ValueError, KeyError):
        return None


# -----------------------------------------------------------------------------
# Generation

@dataclass
class Generation:
    tokens: torch.Tensor    # [rows, T] new tokens; pad after a row's EOS (the EOS itself kept)
    logprobs: torch.Tensor  # [rows, T] float32 log-prob of each sampled token; 0 at padding
    lengths: torch.Tensor   # [rows] valid new tokens, EOS included


def exponential_noise(shape, generator=None, device=None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """E ~ Exp(1) float32 draws of the given shape [rows, V] (into `out` when given), for _sample_index.
    A draw that rounds to 0 is raised to the smallest float: 0/0 would be NaN, which argmax picks."""
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=device)
    return out.exponential_(1.0, generator=generator).clamp_min_(torch.finfo(out.dtype).tiny)


def _sample_index(probs, generator=None, rows=slice(None), total_rows: Optional[int] = None, noise=None):
    """One index per row, drawn with probability proportional to probs [R, V].

    argmax_i p_i / E_i with E_i ~ Exp(1) picks i with probability p_i / sum(p) (the "exponential
    race", Gumbel-max in another guise). It is the draw torch.multinomial makes for one sample,
    from the same generator stream (identical tokens), but without multinomial's input check,
    which copies a flag to the host and so stalls the CPU on every CUDA decode step.
    When probs holds only some rows (`rows` of `total_rows`, the unfinished ones), the draws are
    made for all total_rows and these rows' are used: each row gets the draws it would have got in
    the full batch, so dropping finished rows never changes what the others sample.
    noise: the draws [total_rows, V], made beforehand by exponential_noise (the compiled decode
    step takes them as an input: no generator inside the graph, same stream as here).
    """
    if noise is None:
        n = probs.shape[0] if total_rows is None else total_rows
        noise = exponential_noise((n, probs.shape[1]), generator, probs.device)
    return (probs / noise[rows]).argmax(dim=-1)


def sample_next(logits, temperature: float, top_p: float, generator=None, rows=slice(None),
                total_rows: Optional[int] = None, noise=None):
    """Pick one token per row from logits [R, V]; return (tokens [R], their log-probs [R]).
    (rows, total_rows, noise: these logits are rows `rows` of a batch of total_rows; see _sample_index.)

    The log-prob is log softmax(logits / T) before top-p truncation, i.e. the policy's own
    probability at temperature T (at T = 1, top_p = 1 exactly what PPO recomputes later).
    It is read off the softmax the draw needs anyway (greedy: logit[tok] - logsumexp), which skips
    writing a full [R, V] log-softmax. At top_p = 1 nothing is sorted: one softmax, one divide, one
    argmax, which torch.compile fuses into the decode step.
    """
    logits = logits.float()
    if temperature == 0:
        tok = logits.argmax(dim=-1)                      # greedy; log-probs at temperature 1
        return tok, logits.gather(-1, tok[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
    if temperature != 1:
        logits = logits / temperature
    probs = torch.softmax(logits, dim=-1)                # one fused pass; the log-prob is read off it below
    if top_p < 1.0:
        # nucleus: keep the smallest set of most likely tokens whose mass reaches top_p. The set is
        # found in sorted order and mapped back to token order, so each draw belongs to a token, not
        # to a sorted position: a rounding-level change of the probabilities (a compiled kernel's)
        # that swaps two nearly equal ones in the sort swaps nothing else.
        sp, si = probs.sort(dim=-1, descending=True)
        out = (sp.cumsum(-1) - sp) >= top_p
        tok = _sample_index(probs.masked_fill(out.scatter(-1, si, out), 0.0), generator, rows, total_rows, noise)
    else:
        tok = _sample_index(probs, generator, rows, total_rows, noise)
    # log p(tok): a drawn token has p > 0, and fp32 keeps p's relative precision down to ~1e-38
    return tok, probs.gather(-1, tok[:, None])[:, 0].log()


# The fast path (static=True / compile=True), gpt-fast style. A CUDA graph replays a fixed
# sequence of kernels on fixed buffers, so the decode step must not change shape from one token
# to the next: it writes one cache slot chosen by a tensor index, and attends over the cache's
# first L slots under the key mask, where L is a length bucket: the filled length rounded up to
# 256, 512, 1024, ... (capped at the cache's length). Within a bucket every step has the same
# shapes; torch.compile makes one graph per bucket, a handful per cache, and the attention reads
# at most twice the filled prefix (or 256 slots) instead of the whole preallocated cache (the eager path slices
# to the filled prefix exactly, which is cheaper on CPU but changes shape every step). The step
# also samples (sample_next, compiled into the same graph): at top_p = 1 a softmax, a divide by
# exponential noise and an argmax, no sort; the noise is drawn before the step into a buffer of
# the cache, from the caller's generator, so the tokens are those the default path draws.
# The cache length is rounded up to a multiple of 256, and a cache that is long enough is
# reused, so calls with slightly different prompt lengths reuse the same graphs.
_STATIC_LEN_MULTIPLE = 256
_DONE_CHECK_EVERY = 16     # fast path: look at "all rows done?" (a host sync) every 16 steps only
_COMPACT_BELOW = 0.75      # default path: drop finished rows from the cache once <= 3/4 of its rows are left
_ROW_HALVINGS = 3          # fast path: at a done check, unfinished rows move to the cache's first R/2, R/4
                           # or R/8 rows when they fit, and the step runs only those (one graph per size)
_compiled_decode_step = None
_static_cache: Optional[KVCache] = None   # the fast path's one KV cache, reused by every call that fits it


def _attend_len(filled: int, cache_len: int) -> int:
    """The length bucket a decode step attends over: the smallest 256 * 2^k >= filled, capped at cache_len."""
    L = _STATIC_LEN_MULTIPLE
    while L < filled:
        L *= 2
    return min(L, cache_len)


def _active_rows(left: int, R: int) -> int:
    """How many of the fast path's R cache rows the step runs when `left` rows are unfinished:
    the smallest of R, R/2, ..., R/2^_ROW_HALVINGS (rounded up) that holds them."""
    n = R
    for k in range(1, _ROW_HALVINGS + 1):
        if -(-R // 2 ** k) < left:
            break
        n = -(-R // 2 ** k)
    return n


def _decode_step(model, cache: KVCache, tok, pos, slot, attend: int, temperature: float, top_p: float, noise,
                 rows=slice(None)):
    """The next token per row and its log-prob ([B] each), from one new token for each of the
    cache's first B rows: tok, pos [B, 1]; slot [1] is its cache slot; attend (a Python int: one
    graph per value) the number of slots attended; noise [R, V] the sampler's draws for all R rows
    (None when greedy), of which these rows use rows `rows` (after compaction, an index tensor)."""
    cache.key_valid.index_fill_(1, slot, True)
    h = model.hidden_states(tok, position_ids=pos, cache=cache, cache_start=slot, cache_len=attend)
    return sample_next(model.logits(h[:, -1]), temperature, top_p, rows=rows, noise=noise)


def _compiled_step():
    # compiled once per process; torch.compile recompiles per new (rows, cache length, length
    # bucket, sampling settings, dtype): a few buckets times a few shapes (rollout, validation)
    # exceed dynamo's default of 8 graphs per function, which fullgraph=True turns into an error
    global _compiled_decode_step
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    if _compiled_decode_step is None:
        _compiled_decode_step = torch.compile(_decode_step, mode="reduce-overhead", fullgraph=True, dynamic=False)
    return _compiled_decode_step


def static_cache(config: ModelConfig, rows: int, max_len: int, dtype, device, mark_static: bool) -> KVCache:
    """The fast path's KV cache: one per process, reused (zeroed) by every call with the same rows
    and at most its length. It also holds `noise`, the sampler's [rows, vocab] float32 draws.

    A compiled step treats the cache as a static input. A fresh cache per call would, where
    mark_static_address guards on the tensor (its default up to torch 2.6), recompile the step and
    keep every old cache alive through the guards (a 3B model at 256 rows: ~12 GB a call), and a
    CUDA graph would be re-recorded for each new address. Reusing one cache avoids both; a longer
    one costs no attention (the step attends over length buckets of the filled prefix). A call
    that does not fit frees the old cache before allocating its own. release_static_cache() frees it.
    """
    global _static_cache
    key = (config.num_hidden_layers, config.num_key_value_heads, config.head_dim, config.vocab_size, rows, dtype,
           torch.device(device).type, mark_static)   # a cache marked static must not serve an eager caller, or back
    c = _static_cache
    if (c is not None and getattr(c, "key", None) == key and c.key_valid.device == torch.device(device)
            and c.key_valid.shape[1] >= max_len):
        with torch.no_grad():
            for t in c.k + c.v:
                t.zero_()   # not needed for correctness (masked slots weigh 0) but never NaN-risky
            c.key_valid.zero_()
        return c
    _static_cache = c = None   # drop the old cache before the new one exists: never two at once
    c = KVCache(config, rows, max_len, dtype, device)
    c.key = key
    c.noise = torch.empty(rows, config.vocab_size, dtype=torch.float32, device=device)
    if mark_static:   # the cache is mutated in place: CUDA graphs may keep its addresses
        for t in c.k + c.v + [c.key_valid, c.noise]:
            torch._dynamo.mark_static_address(t, guard=False)
    _static_cache = c
    return c


def release_static_cache():
    """Free the fast path's KV cache (e.g. before a phase that needs the memory)."""
    global _static_cache
    _static_cache = None


@torch.no_grad()
def generate(model: Transformer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, n_samples: int = 1,
             temperature: float = 1.0, top_p: float = 1.0, eos_id, pad_id: int, seed: Optional[int] = None,
             generator: Optional[torch.Generator] = None, progress: bool = False,
             static: bool = False, compile: bool = False) -> Generation:
    """Sample n_samples continuations of each prompt with a preallocated KV cache.

    Prompts are left-padded to a common length P and prefilled once; the cache rows are then copied
    n_samples times, so samples of one prompt share its prefill. Row i*n_samples + j is sample j
    of prompt i. Each row stops at its first EOS.

    static=True runs the decode steps with fixed shapes (attention over length buckets of the
    filled cache, the sampler inside the step) and checks for "all rows done" only every few steps,
    so a GPU never waits for the host; there it also moves unfinished rows to the front of the cache
    and runs only those (R/2, R/4 or R/8 rows). compile=True (implies static) also compiles the
    step with torch.compile(mode="reduce-overhead"), which captures it as a CUDA graph on a GPU:
    one graph per (rows, length bucket) pair met. The tokens, log-probs and lengths are the default
    path's (up to the float rounding of compiled kernels).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt and every prompt needs at least one token")
    if max_new_tokens < 1 or n_samples < 1:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) and n_samples ({n_samples}) must be >= 1")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 (0 = greedy) and 0 < top_p <= 1, got {temperature}, {top_p}")
    static = static or compile
    device = model.embed_tokens.weight.device
    dtype = model.embed_tokens.weight.dtype
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    eos = torch.tensor([eos_id] if isinstance(eos_id, int) else list(eos_id), device=device)
    B, P = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, P), pad_id, dtype=torch.long)
    valid = torch.zeros(B, P, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        valid[i, P - len(p):] = True
    ids, valid = ids.to(device), valid.to(device)
    S = P + max_new_tokens
    if static:
        S = -(-S // _STATIC_LEN_MULTIPLE) * _STATIC_LEN_MULTIPLE

    was_training = model.training
    model.eval()
    try:
        R = B * n_samples
        # the fast path keeps one cache for all calls. The prefill writes straight into the cache,
        # or (n samples per prompt) into a small one of B rows x P slots whose rows are then copied
        # n times: samples of one prompt share its prefill, and only one full-size cache exists.
        if static:
            cache = static_cache(model.config, R, S, dtype, device, mark_static=compile)
        else:
            cache = KVCache(model.config, R, S, dtype, device)
        prefill = cache if n_samples == 1 else KVCache(model.config, B, P, dtype, device)
        prefill.key_valid[:, :P] = valid
        prefill.padded = any(len(p) < P for p in prompts)
        pos = (valid.long().cumsum(-1) - 1).clamp(min=0)
        h = model.hidden_states(ids, position_ids=pos, cache=prefill, cache_start=0)
        logits = model.logits(h[:, -1])                      # [B, V]: only the last position is needed
        if n_samples > 1:
            cache.fill_from(prefill, n_samples)
            del prefill
            logits = logits.repeat_interleave(n_samples, dim=0)
        next_pos = valid.sum(-1).repeat_interleave(n_samples)  # position id of the next token, per row
        tokens = torch.full((R, max_new_tokens), pad_id, dtype=torch.long, device=device)
        logprobs = torch.zeros(R, max_new_tokens, dtype=torch.float32, device=device)
        done = torch.zeros(R, dtype=torch.bool, device=device)
        lengths = torch.zeros(R, dtype=torch.long, device=device)
        if static:
            step = _compiled_step() if compile else _decode_step
            slot = torch.full((1,), P, dtype=torch.long, device=device)
            S = cache.key_valid.shape[1]        # a reused cache may be longer than this call needs
            noise = cache.noise if temperature > 0 else None
        steps = range(max_new_tokens)
        if progress:
            from tqdm import tqdm
            steps = tqdm(steps, desc="generate", file=sys.stderr, leave=False)
        # the rows the decode step runs: on the default path finished rows are dropped (a cache of
        # fewer rows), so they stop costing a forward; the fast path moves unfinished rows to the
        # front of its cache at a done check and runs R/2, R/4, ... rows (a few fixed shapes)
        rows = slice(None)
        drawn = None   # the fast path's step returns the next tokens and log-probs, sampled in the graph
        for t in steps:
            if drawn is None:
                tok, lp = sample_next(logits, temperature, top_p, generator, rows, R)
            else:
                tok, lp = drawn
            fin = done[rows]
            tok = torch.where(fin, pad_id, tok)
            tokens[rows, t] = tok
            logprobs[rows, t] = torch.where(fin, 0.0, lp)
            lengths[rows] += (~fin).long()
            fin = fin | torch.isin(tok, eos)
            done[rows] = fin
            if t == max_new_tokens - 1:
                break
            if static:
                if (t + 1) % _DONE_CHECK_EVERY == 0:
                    left = R - int(done.sum())         # the one host sync, every 16 steps
                    if left == 0:
                        break
                    n = _active_rows(left, R)
                    if n < len(tok):
                        # compaction: unfinished rows first, then finished ones as filler up to n rows
                        keep = torch.sort(fin.int(), stable=True).indices[:n]
                        rows = (torch.arange(R, device=device) if isinstance(rows, slice) else rows)[keep]
                        cache.compact_rows(keep)
                        tok = tok[keep]
                if compile:
                    torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are consumed
                if noise is not None:
                    exponential_noise(None, generator, out=noise)  # the draws the default path makes here
                drawn = step(model, cache, tok[:, None], next_pos[rows][:, None], slot, _attend_len(P + t + 1, S),
                             temperature, top_p, noise, rows)
                slot += 1
            else:
                left = len(fin) - int(fin.sum())   # one host sync per step, as "all done?" needs anyway
                if left == 0:
                    break
                if left <= _COMPACT_BELOW * len(fin):
                    keep = (~fin).nonzero()[:, 0]
                    rows = (torch.arange(R, device=device) if isinstance(rows, slice) else rows)[keep]
                    cache.select_rows(keep)
                    tok = tok[keep]
                cache.key_valid[:, P + t] = True
                h = model.hidden_states(tok[:, None], position_ids=next_pos[rows][:, None], cache=cache,
                                        cache_start=P + t)
                logits = model.logits(h[:, -1])
            next_pos += 1
    finally:
        model.train(was_training)
    T = int(lengths.max())  # the static path may run past the step where every row finished
    return Generation(tokens[:, :T], logprobs[:, :T], lengths)


# -----------------------------------------------------------------------------
# Several processes: torchrun + FSDP2
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
    mp = MixedPrecisionPolicy(param_dtype=parse_dtype(compute_dtype), reduce_dtype=torch.float32)
    for block in [m for m in model.modules() if isinstance(m, Block)]:
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
        with torch.device("meta"):
            into = Transformer(model.config)
        for name, p in model.named_parameters():
            module_name, _, leaf = name.rpartition(".")
            full = _full(p.detach())
            if rank0_only and not is_main():
                continue
            full = full.to(device, parse_dtype(dtype) or p.dtype)
            setattr(into.get_submodule(module_name), leaf, nn.Parameter(full, requires_grad=False))
        if rank0_only and not is_main():
            return None
        if model.config.tie_word_embeddings:
            into.lm_head.weight = into.embed_tokens.weight
        into.inv_freq = rope_inv_freq(model.config, device=torch.device(device))
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
# CLI

def main(argv=None):
    ap = argparse.ArgumentParser(description="Load a Llama/Qwen checkpoint and complete a prompt. "
                                 "Prints only the completion on stdout.")
    ap.add_argument("--model", required=True, help="local folder, alias (e.g. qwen2.5-3b) or Hub repo id")
    ap.add_argument("--prompt", required=True, help="text to complete (tokenized without BOS)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: the checkpoint's dtype")
    ap.add_argument("--compile", action="store_true",
                    help="fast path for CUDA: static shapes + torch.compile (CUDA graphs) of the decode step")
    args = ap.parse_args(argv)
    try:
        if args.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda, but torch sees no CUDA device (use --device cpu)")
        model, tok = load(args.model, device=args.device, dtype=args.dtype)
        # stop at the tokenizer's EOS and at any other end token config.json lists (instruct models)
        eos_ids = {tok.eos_id} | set(_as_list(model.config.eos_token_id))
        out = generate(model, [tok.encode(args.prompt)], max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, top_p=args.top_p, eos_id=sorted(eos_ids),
                       pad_id=tok.pad_id, seed=args.seed, compile=args.compile)
    except (FileNotFoundError, ValueError, PermissionError, ConnectionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ids = out.tokens[0, :int(out.lengths[0])].tolist()
    if ids and ids[-1] in eos_ids:
        ids = ids[:-1]
    print(tok.decode(ids))
    return 0


def _as_list(x) -> list:
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]


if __name__ == "__main__":
    sys.exit(main())
