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

Contents, in reading order: config -> layers (RMSNorm, RoPE, KV cache, attention, MLP, block)
-> Transformer -> generation (sampling, eager decode with a KV cache) -> new tokens -> checkpoint
folders (load, save) -> plumbing below the marked line (re-exports) -> CLI.
Infrastructure lives in plumbing/: hub.py (the Hub, safetensors files, the tokenizer), fast_decode.py
(the static-shape decode that torch.compile turns into CUDA graphs), dist.py (torchrun + FSDP2),
device.py (CUDA diagnostics, RNG and optimizer state).
"""

import argparse
import math
import os
import shutil
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from plumbing import fast_decode, files, hub


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
        rs = kwargs.get("rope_scaling")
        if rs and rs.get("rope_type", rs.get("type")) == "default":
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
    Attention calls update() and attn_mask() only: the fast decode's StaticKVCache
    (plumbing/fast_decode.py) has the same two methods, for fixed shapes.
    """

    def __init__(self, config: ModelConfig, batch: int, max_len: int, dtype, device):
        # zeros, not empty: a masked slot gets probability exactly 0, but 0 * NaN garbage is still NaN
        shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.key_valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.padded = True  # False when no row has padding slots: then attention needs no mask

    def update(self, layer: int, k, v, start: int):
        """Write T new keys/values [B, Hkv, T, hd] into slots start..start+T-1 of one layer; return the
        keys and values of every slot so far (what these queries attend over)."""
        T = k.shape[2]
        kc, vc = self.k[layer], self.v[layer]
        kc[:, :, start:start + T] = k
        vc[:, :, start:start + T] = v
        return kc[:, :, :start + T], vc[:, :, :start + T]

    def attn_mask(self, start: int, T: int):
        """The attention mask of T queries at slots start..start+T-1 (None: plain causal attention)."""
        if self.padded or (T > 1 and start > 0):
            return attention_mask_4d(self.key_valid[:, :start + T], start, T)
        return None  # no padding anywhere: causal prefill from slot 0, or one query that sees all slots

    def select_rows(self, keep):
        """Keep only rows `keep` (an index tensor), one layer at a time: never two full caches alive."""
        for i in range(len(self.k)):
            self.k[i], self.v[i] = self.k[i][keep], self.v[i][keep]
        self.key_valid = self.key_valid[keep]

    def fill_from(self, prefill: "KVCache", n: int):
        """Copy a prefill cache of B rows and P slots into this one's first P slots, n copies of each
        row (B * n rows here), in place: this cache's tensors keep their addresses.

        It reads and writes only k, v, key_valid and padded, which the fast decode's StaticKVCache
        has in the same layout: generate() calls it on that cache too."""
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
            # write this step's keys/values into their slots, then attend over everything so far
            k, v = cache.update(self.layer_idx, k, v, start)
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
                      cache: Optional[KVCache] = None, cache_start: int = 0):
        """Final normed hidden states [B, T, D].

        attention_mask [B, T]: 1 for real tokens, 0 for padding (left or right; padding only on the
        right, or none, needs no mask: causal attention is exact for the real tokens). With a KV cache,
        input_ids sit at slots cache_start..cache_start+T-1 and the cache gives the mask (from its
        key_valid). The fast decode's static cache (plumbing/fast_decode.py) has the same interface,
        with a one-element tensor slot as cache_start.
        """
        B, T = input_ids.shape
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            else:
                position_ids = torch.arange(cache_start, cache_start + T, device=input_ids.device).expand(B, T)
        if cache is not None:
            mask = cache.attn_mask(cache_start, T)
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


_COMPACT_BELOW = 0.75      # eager path: drop finished rows from the cache once <= 3/4 of its rows are left


@torch.no_grad()
def generate(model: Transformer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, n_samples: int = 1,
             temperature: float = 1.0, top_p: float = 1.0, eos_id, pad_id: int, seed: Optional[int] = None,
             generator: Optional[torch.Generator] = None, progress: bool = False,
             static: bool = False, compile: bool = False) -> Generation:
    """Sample n_samples continuations of each prompt with a preallocated KV cache.

    Prompts are left-padded to a common length P and prefilled once; the cache rows are then copied
    n_samples times, so samples of one prompt share its prefill. Row i*n_samples + j is sample j
    of prompt i. Each row stops at its first EOS.

    static=True takes the fast path of plumbing/fast_decode.py: decode steps with fixed shapes
    (attention over length buckets of the filled cache, the sampler inside the step) and a check for
    "all rows done" only every few steps, so a GPU never waits for the host. compile=True (implies
    static) also compiles the step with torch.compile(mode="reduce-overhead"), a CUDA graph on a GPU.
    The tokens, log-probs and lengths are the eager path's (up to the float rounding of compiled kernels).
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

    was_training = model.training
    model.eval()
    try:
        R = B * n_samples
        # The prefill writes straight into the cache, or (n samples per prompt, or the fast path's
        # cache) into a small one of B rows x P slots whose rows are then copied n times: samples of
        # one prompt share its prefill, and only one full-size cache exists.
        if static:   # one cache, reused by every call that fits it
            cache = fast_decode.static_cache(model.config, R, P + max_new_tokens, dtype, device, mark_static=compile)
        else:
            cache = KVCache(model.config, R, P + max_new_tokens, dtype, device)
        prefill = cache if n_samples == 1 and not static else KVCache(model.config, B, P, dtype, device)
        prefill.key_valid[:, :P] = valid
        prefill.padded = any(len(p) < P for p in prompts)
        pos = (valid.long().cumsum(-1) - 1).clamp(min=0)
        h = model.hidden_states(ids, position_ids=pos, cache=prefill, cache_start=0)
        logits = model.logits(h[:, -1])                      # [B, V]: only the last position is needed
        if prefill is not cache:
            KVCache.fill_from(cache, prefill, n_samples)   # cache may be the fast path's StaticKVCache
            del prefill
        if n_samples > 1:
            logits = logits.repeat_interleave(n_samples, dim=0)
        next_pos = valid.sum(-1).repeat_interleave(n_samples)  # position id of the next token, per row
        tokens = torch.full((R, max_new_tokens), pad_id, dtype=torch.long, device=device)
        logprobs = torch.zeros(R, max_new_tokens, dtype=torch.float32, device=device)
        done = torch.zeros(R, dtype=torch.bool, device=device)
        lengths = torch.zeros(R, dtype=torch.long, device=device)
        fast = fast_decode.Decoder(model, cache, P, temperature, top_p, generator, compile,
                                   sample=sample_next, draw_noise=exponential_noise) if static else None
        steps = range(max_new_tokens)
        if progress:
            from tqdm import tqdm
            steps = tqdm(steps, desc="generate", file=sys.stderr, leave=False)
        # the rows the decode step runs: finished rows are dropped (a cache of fewer rows), so they
        # stop costing a forward (the fast path moves unfinished rows to the front of its cache)
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
            if fast is not None:   # the fast path: its step samples too, and returns None once all rows are done
                step = fast.step(t, tok, fin, done, rows, next_pos)
                if step is None:
                    break
                drawn, rows = step
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
# New tokens (Satori's meta-actions): a tokenizer entry and an embedding row each

def add_tokens(model: Transformer, tokenizer: hub.Tokenizer, tokens) -> list:
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
# Checkpoint folders (Hugging Face's layout): load, save. The file formats: plumbing/hub.py

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(dtype) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


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
    config = ModelConfig.from_hf(files.read_json(path / "config.json"))
    dtype = parse_dtype(dtype) or parse_dtype(config.torch_dtype if config.torch_dtype in DTYPES else "float32")
    tokenizer = hub.Tokenizer.from_dir(path)
    weight_files = hub.weight_files(path)
    with torch.device("meta"):
        model = Transformer(config)
    params = dict(model.named_parameters())
    for file in weight_files:
        for name, t in hub.read_safetensors(file, dtype):
            key = _hf_to_ours(name)
            if key == "lm_head.weight" and config.tie_word_embeddings:
                continue  # tied: the embedding matrix is the head
            if key not in params:
                raise ValueError(f"{file.name} has unexpected tensor {name!r}; does config.json match the weights?")
            if tuple(t.shape) != tuple(params[key].shape):
                raise ValueError(f"tensor {name} has shape {tuple(t.shape)}, "
                                 f"config.json implies {tuple(params[key].shape)}")
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
    return load_checkpoint_dir(hub.resolve_checkpoint(name_or_path), device=device, dtype=dtype)


def save(model: Transformer, tokenizer: hub.Tokenizer, out_dir, *, max_shard_size: int = 5 * 2**30,
         dtype=None, overwrite: bool = False):
    """Write an HF-compatible folder that model.load, transformers and vLLM load unchanged.

    Written into a temporary sibling folder, then renamed into place, so an interrupted save never
    leaves a half-written checkpoint under out_dir.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True or choose another folder")
    dtype = parse_dtype(dtype)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tied = model.config.tie_word_embeddings   # a tied head is the embedding matrix: stored once
    hub.write_weights(tmp, [(_ours_to_hf(n), p) for n, p in model.state_dict(keep_vars=True).items()
                            if not (tied and n == "lm_head.weight")], max_shard_size, dtype)
    cfg = model.config.to_hf()
    cfg["torch_dtype"] = {v: k for k, v in DTYPES.items()}[dtype or next(model.parameters()).dtype]
    files.write_json(tmp / "config.json", cfg)
    gen = {"bos_token_id": cfg.get("bos_token_id"), "eos_token_id": cfg.get("eos_token_id")}
    files.write_json(tmp / "generation_config.json", {k: v for k, v in gen.items() if v is not None})
    tokenizer.save(tmp)
    files.replace_dir(tmp, out)
    return out


def checkpoint_config(name_or_path) -> ModelConfig:
    """The ModelConfig of a checkpoint folder, alias or Hub id (downloaded if needed), or of a config.json."""
    p = Path(name_or_path)
    if p.is_file() and p.suffix == ".json":
        return ModelConfig.from_hf(files.read_json(p))
    return ModelConfig.from_hf(files.read_json(hub.resolve_checkpoint(name_or_path) / "config.json"))


# ----- plumbing below: the Tokenizer's re-export, then the CLI -----

# re-exported: a checkpoint is a model and its tokenizer (load returns both), so callers name it M.Tokenizer
from plumbing.hub import Tokenizer  # noqa: E402,F401


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
