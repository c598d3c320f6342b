"""The fast decode path of model.generate (static=True / compile=True), gpt-fast style.

A CUDA graph replays a fixed sequence of kernels on fixed buffers, so the decode step must not change
shape from one token to the next: it writes one cache slot chosen by a tensor index, and attends over
the cache's first L slots under the key mask, where L is a length bucket: the filled length rounded up
to 256, 512, 1024, ... (capped at the cache's length). Within a bucket every step has the same shapes;
torch.compile makes one graph per bucket, a handful per cache, and the attention reads at most twice
the filled prefix (or 256 slots) instead of the whole preallocated cache (the eager path slices to the
filled prefix exactly, which is cheaper on CPU but changes shape every step). The step also samples
(model.sample_next, compiled into the same graph): at top_p = 1 a softmax, a divide by exponential
noise and an argmax, no sort; the noise is drawn before the step into a buffer of the cache, from the
caller's generator, so the tokens are those the eager path draws.
The cache length is rounded up to a multiple of 256, and a cache that is long enough is reused, so
calls with slightly different prompt lengths reuse the same graphs.

Plumbing: model.py's generate calls it through one branch; nothing here imports a core file (the
model, its sampler and its noise come in as arguments).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

_STATIC_LEN_MULTIPLE = 256
_DONE_CHECK_EVERY = 16     # look at "all rows done?" (a host sync) every 16 steps only
_ROW_HALVINGS = 3          # at a done check, unfinished rows move to the cache's first R/2, R/4 or R/8
                           # rows when they fit, and the step runs only those (one graph per size)
_compiled_decode_step = None
_static_cache: Optional["StaticKVCache"] = None   # the one KV cache, reused by every call that fits it


class StaticKVCache:
    """model.KVCache's layout ([R, n_kv_heads, max_len, head_dim] keys and values per layer, key_valid
    [R, max_len]) with the decode step's interface: update() writes one slot chosen by a tensor, and
    the step attends over the first `attend` slots of the first `rows` rows (both set by Decoder).
    Same layout, so model.generate fills it from the prefill with model.KVCache.fill_from."""

    def __init__(self, config, rows: int, max_len: int, dtype, device):
        shape = (rows, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.key_valid = torch.zeros(rows, max_len, dtype=torch.bool, device=device)
        self.noise = torch.empty(rows, config.vocab_size, dtype=torch.float32, device=device)  # sampler's draws
        self.padded = True
        self.rows, self.attend = rows, max_len

    def update(self, layer: int, k, v, slot):
        """Write one step's k/v [B, Hkv, 1, hd] at `slot` (a one-element tensor); return the keys and
        values of the first `attend` slots. After compaction the step runs only the first B rows: k/v
        are padded to all rows (the others are finished, their slot is never read), so the write stays
        one in-place index_copy_ into the whole cache tensor."""
        kc, vc = self.k[layer], self.v[layer]
        B, R = k.shape[0], kc.shape[0]
        if B < R:
            k, v = F.pad(k, (0, 0, 0, 0, 0, 0, 0, R - B)), F.pad(v, (0, 0, 0, 0, 0, 0, 0, R - B))
        kc.index_copy_(2, slot, k)
        vc.index_copy_(2, slot, v)
        return kc[:B, :, :self.attend], vc[:B, :, :self.attend]

    def attn_mask(self, slot, T: int):
        # [B, 1, 1, L]: the one query per row sees its valid slots; slots not written yet are masked
        return self.key_valid[:self.rows, None, None, :self.attend]

    def compact_rows(self, keep):
        """Move rows `keep` (an index tensor of n rows) to the first n rows, in place: the tensors keep
        their addresses, rows n and beyond hold stale data from then on."""
        n = len(keep)
        for t in self.k + self.v:
            t[:n] = t[keep]               # t[keep] is a copy of n rows of one layer, so overlaps are safe
        self.key_valid[:n] = self.key_valid[keep]
        self.rows = n


def static_cache(config, rows: int, max_len: int, dtype, device, mark_static: bool) -> StaticKVCache:
    """The fast path's KV cache, max_len rounded up to a multiple of 256: one per process, reused
    (zeroed) by every call with the same rows and at most its length.

    A compiled step treats the cache as a static input. A fresh cache per call would, where
    mark_static_address guards on the tensor (its default up to torch 2.6), recompile the step and
    keep every old cache alive through the guards (a 3B model at 256 rows: ~12 GB a call), and a
    CUDA graph would be re-recorded for each new address. Reusing one cache avoids both; a longer
    one costs no attention (the step attends over length buckets of the filled prefix). A call
    that does not fit frees the old cache before allocating its own. release_static_cache() frees it.
    """
    global _static_cache
    max_len = -(-max_len // _STATIC_LEN_MULTIPLE) * _STATIC_LEN_MULTIPLE
    key = (config.num_hidden_layers, config.num_key_value_heads, config.head_dim, config.vocab_size, rows, dtype,
           torch.device(device).type, mark_static)   # a cache marked static must not serve an eager caller, or back
    c = _static_cache
    if (c is not None and getattr(c, "key", None) == key and c.key_valid.device == torch.device(device)
            and c.key_valid.shape[1] >= max_len):
        with torch.no_grad():
            for t in c.k + c.v:
                t.zero_()   # not needed for correctness (masked slots weigh 0) but never NaN-risky
            c.key_valid.zero_()
        c.rows = rows
        return c
    _static_cache = c = None   # drop the old cache before the new one exists: never two at once
    c = StaticKVCache(config, rows, max_len, dtype, device)
    c.key = key
    if mark_static:   # the cache is mutated in place: CUDA graphs may keep its addresses
        for t in c.k + c.v + [c.key_valid, c.noise]:
            torch._dynamo.mark_static_address(t, guard=False)
    _static_cache = c
    return c


def release_static_cache():
    """Free the fast path's KV cache (e.g. before a phase that needs the memory)."""
    global _static_cache
    _static_cache = None


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


def _decode_step(model, cache: StaticKVCache, tok, pos, slot, temperature: float, top_p: float, noise,
                 rows=slice(None), sample=None):
    """The next token per row and its log-prob ([B] each), from one new token for each of the
    cache's first B rows: tok, pos [B, 1]; slot [1] is its cache slot; noise [R, V] the sampler's
    draws for all R rows (None when greedy), of which these rows use rows `rows` (after compaction,
    an index tensor); sample: model.sample_next."""
    cache.key_valid.index_fill_(1, slot, True)
    h = model.hidden_states(tok, position_ids=pos, cache=cache, cache_start=slot)
    return sample(model.logits(h[:, -1]), temperature, top_p, rows=rows, noise=noise)


def _compiled_step():
    # compiled once per process; torch.compile recompiles per new (rows, cache length, length
    # bucket, sampling settings, dtype): a few buckets times a few shapes (rollout, validation)
    # exceed dynamo's default of 8 graphs per function, which fullgraph=True turns into an error
    global _compiled_decode_step
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    if _compiled_decode_step is None:
        _compiled_decode_step = torch.compile(_decode_step, mode="reduce-overhead", fullgraph=True, dynamic=False)
    return _compiled_decode_step


class Decoder:
    """The decode steps of one generate call on the fast path. generate samples the first token and
    records every token; step() makes the next one: at a done check (every 16 steps, the one host
    sync) it stops when all rows are done, or moves the unfinished rows to the front of the cache and
    runs only R/2, R/4 or R/8 rows; then it draws the sampler's noise and runs the (compiled) step."""

    def __init__(self, model, cache: StaticKVCache, P: int, temperature: float, top_p: float, generator,
                 compile: bool, sample, draw_noise):
        self.model, self.cache, self.P = model, cache, P
        self.temperature, self.top_p, self.generator, self.compile = temperature, top_p, generator, compile
        self.sample, self.draw_noise = sample, draw_noise
        self.fn = _compiled_step() if compile else _decode_step
        self.slot = torch.full((1,), P, dtype=torch.long, device=cache.key_valid.device)
        self.S = cache.key_valid.shape[1]        # a reused cache may be longer than this call needs
        self.noise = cache.noise if temperature > 0 else None

    def step(self, t: int, tok, fin, done, rows, next_pos):
        """(the next (tokens, log-probs) of the rows the step ran, those rows), or None when every row is
        done. tok, fin: step t's tokens and finished flags of rows `rows`; done: all R rows' flags."""
        R, cache = len(done), self.cache
        if (t + 1) % _DONE_CHECK_EVERY == 0:
            left = R - int(done.sum())         # the one host sync, every 16 steps
            if left == 0:
                return None
            n = _active_rows(left, R)
            if n < len(tok):
                # compaction: unfinished rows first, then finished ones as filler up to n rows
                keep = torch.sort(fin.int(), stable=True).indices[:n]
                rows = (torch.arange(R, device=done.device) if isinstance(rows, slice) else rows)[keep]
                cache.compact_rows(keep)
                tok = tok[keep]
        if self.compile:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are consumed
        if self.noise is not None:
            self.draw_noise(None, self.generator, out=self.noise)  # the draws the eager path makes here
        cache.attend = _attend_len(self.P + t + 1, self.S)
        drawn = self.fn(self.model, cache, tok[:, None], next_pos[rows][:, None], self.slot,
                        self.temperature, self.top_p, self.noise, rows, self.sample)
        self.slot += 1
        return drawn, rows
