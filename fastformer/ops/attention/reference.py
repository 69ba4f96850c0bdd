"""The ``"reference"`` backend: PyTorch's own attention, for every kind of problem.

Exact torch semantics on any device and dtype: dense attention is
``torch.nn.functional.scaled_dot_product_attention`` (differentiable in q, k, v
and a float mask; memory linear in L wherever torch picks a fused kernel);
packed variable-length attention is a per-sequence loop over it; decoding
slices the valid part of the cache. It is what ``"auto"`` falls back to for
anything a fused backend does not support.

The variants (local window, ALiBi, soft-cap; torch's SDPA has no soft-cap) and
paged KV caches run as exact explicit math in torch ops instead
(``variants.variant_math_attention``, float32 — float64 for float64 inputs —,
differentiable in q, k, v and a float mask; memory grows as L·S there).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F

from .problem import AttentionProblem, DecodeProblem, VarlenProblem, causal_mask, checked_length_range, checked_max_length
from .registry import AttentionBackend, register_backend
from .variants import variant_math_attention


def reference_attention(problem: AttentionProblem):
    q, k, v, mask, is_causal = problem.q, problem.k, problem.v, problem.mask, problem.is_causal
    out_shape = (*q.shape[:-1], v.shape[-1])
    if 0 in out_shape:
        # Nothing to compute, and torch 2.11's CPU SDPA dies with SIGFPE on zero heads (the GPU
        # image's torch; 2.13 is fixed): an empty output, still connected to q, k, v for autograd.
        return q.new_zeros(out_shape) + (q.sum() + k.sum() + v.sum()).to(q.dtype) * 0
    opts = problem.options
    if opts.variant_active:
        return variant_math_attention(q, k, v, mask, opts.dropout_p, is_causal, opts.causal_bottom_right, opts.scale,
                                      opts)
    if is_causal and problem.causal_bottom_right and problem.len_q != problem.len_k:
        # torch's is_causal is top-left aligned; build the bottom-right mask explicitly.
        mask, is_causal = causal_mask(problem.len_q, problem.len_k, True, q.device), False
    return F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=mask,
        dropout_p=problem.dropout_p,
        is_causal=is_causal,
        scale=problem.scale,
        enable_gqa=problem.heads_q != problem.heads_kv,
    )


def varlen_reference(problem: VarlenProblem, return_lse: bool = False):
    """Per-sequence torch SDPA; the log-sum-exp, when asked, from the explicit scores."""
    q, k, v = problem.q, problem.k, problem.v
    cq, ck = problem.seq_bounds_q, problem.seq_bounds_k
    dropout_p, scale, causal = problem.options.dropout_p, problem.options.scale, problem.options.is_causal
    outs, lses = [], []
    gqa = q.shape[1] != k.shape[1]
    opts = problem.options
    for b, ((q0, q1), (k0, k1)) in enumerate(zip(zip(cq, cq[1:]), zip(ck, ck[1:]))):
        qb, kb, vb = q[q0:q1].transpose(0, 1), k[k0:k1].transpose(0, 1), v[k0:k1].transpose(0, 1)  # (H, n, D)
        if opts.variant_active:
            # Window / ALiBi / soft-cap: the explicit math, bottom-right aligned per sequence.
            slopes = None if opts.alibi_slopes is None else opts.alibi_slopes[b:b + 1]
            ob, lb = variant_math_attention(qb[None], kb[None], vb[None], None, dropout_p, causal, True, scale,
                                            dataclasses.replace(opts, alibi_slopes=slopes), return_lse=True)
            outs.append(ob[0].transpose(0, 1))
            lses.append(lb[0])
            continue
        mask = causal_mask(q1 - q0, k1 - k0, True, q.device) if causal else None
        if k1 == k0:
            ob = q.new_zeros((q.shape[1], q1 - q0, v.shape[2]))  # no keys: torch's answer is 0
        else:
            ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, dropout_p=dropout_p, scale=scale, enable_gqa=gqa)
        outs.append(ob.transpose(0, 1))
        if return_lse:
            kf = kb.repeat_interleave(q.shape[1] // k.shape[1], 0) if gqa else kb
            acc = torch.promote_types(q.dtype, torch.float32)
            s = (qb.to(acc) @ kf.to(acc).transpose(-2, -1)) * scale
            if mask is not None:
                s = s.masked_fill(~mask, float("-inf"))
            lses.append(torch.logsumexp(s, -1) if k1 > k0 else s.new_full((q.shape[1], q1 - q0), float("-inf")))
    out = torch.cat(outs, 0) if outs else q.new_zeros((0, q.shape[1], v.shape[2]))
    if not return_lse:
        return out
    lse = torch.cat(lses, 1).float() if lses else q.new_zeros((q.shape[1], 0), dtype=torch.float32)
    return out, lse.detach()


def gather_pages(cache, block_table, length: int):
    """The contiguous ``(B, Hkv, length, D)`` copy of a paged ``cache (num_blocks, block_size, Hkv, D)``.
    Positions past a sequence's own length hold whatever its table points at (unused
    entries, e.g. -1 padding, read block 0); callers mask them."""
    num_blocks, block_size, hkv, d = cache.shape
    B = block_table.shape[0]
    n = (length + block_size - 1) // block_size
    ids = block_table[:, :n].long().clamp(0, max(num_blocks - 1, 0))
    pages = cache[ids.reshape(-1)].view(B, n * block_size, hkv, d)[:, :length]  # (B, S, Hkv, D)
    return pages.transpose(1, 2)


def decode_math(problem: DecodeProblem):
    """Decoding with a paged cache and/or the variants: explicit math in float32 (float64 for
    float64), each query at cache position ``cache_seqlens - Lq + i``; 0 for rows that see no key."""
    q, k_cache, v_cache = problem.q, problem.k_cache, problem.v_cache
    opts, block_table = problem.options, problem.block_table
    B, Hq, Lq, _ = q.shape
    if isinstance(problem.cache_seqlens, int):
        lens = torch.full((B,), problem.cache_seqlens, dtype=torch.long, device=q.device)
    else:
        lens = problem.cache_seqlens.to(device=q.device, dtype=torch.long)
    S = checked_max_length(lens, problem.capacity)
    if block_table is not None:
        k, v = gather_pages(k_cache, block_table, S), gather_pages(v_cache, block_table, S)
    else:
        k, v = k_cache[:, :, :S], v_cache[:, :, :S]
    keys = torch.arange(S, device=q.device)
    valid = keys[None, :] < lens[:, None]  # (B, S)
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    # Entries past a sequence's length are never read: zero them (NaN there must not leak).
    k = torch.where(valid[:, None, :, None], k, 0).to(work)
    v = torch.where(valid[:, None, :, None], v, 0).to(work)
    g = Hq // k.shape[1]
    if g > 1:
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = torch.matmul(q.to(work), k.transpose(-2, -1)) * opts.scale  # (B, Hq, Lq, S)
    if opts.softcap > 0:
        s = torch.tanh(s / opts.softcap) * opts.softcap
    pos = lens[:, None] - Lq + torch.arange(Lq, device=q.device)[None, :]  # (B, Lq): each query's position
    rel = keys[None, None, :] - pos[:, :, None]  # (B, Lq, S): key j's offset from query i
    if opts.alibi_slopes is not None:
        s = s - opts.alibi_slopes.to(work)[:, :, None, None] * rel.abs()[:, None].to(work)
    ok = valid[:, None, :].expand(B, Lq, S)
    right = 0 if opts.is_causal else opts.window_right
    if right >= 0:
        ok = ok & (rel <= right)
    if opts.window_left >= 0:
        ok = ok & (rel >= -opts.window_left)
    s = s.masked_fill(~ok[:, None], float("-inf"))
    dead = ~ok.any(-1)[:, None, :, None]  # (B, 1, Lq, 1)
    p = torch.softmax(s.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    return torch.matmul(p, v).to(q.dtype)


def decode_reference(problem: DecodeProblem):
    """Attention of the new tokens over the valid cache entries with torch SDPA (no kernel).
    A paged cache is gathered once (the pages in use) and then read as a contiguous one."""
    if problem.options.variant_active:
        return decode_math(problem)
    q, k_cache, v_cache, cache_seqlens = problem.q, problem.k_cache, problem.v_cache, problem.cache_seqlens
    scale, causal = problem.options.scale, problem.options.is_causal
    B, Hq, Lq, _ = q.shape
    if not isinstance(cache_seqlens, int):
        lo, hi = checked_length_range(cache_seqlens.to(device=q.device, dtype=torch.long), problem.capacity)
        if lo == hi:  # one length for all: the uniform path below (no mask, no copy of the cache)
            cache_seqlens = hi
    if problem.block_table is not None:
        S = cache_seqlens if isinstance(cache_seqlens, int) else hi
        k_cache = gather_pages(k_cache, problem.block_table, S)
        v_cache = gather_pages(v_cache, problem.block_table, S)
    gqa = Hq != k_cache.shape[1]
    if isinstance(cache_seqlens, int):
        return _decode_uniform(q, k_cache, v_cache, cache_seqlens, causal, scale, gqa)
    if q.device.type == "cpu":
        # Ragged lengths on the CPU: one SDPA call per sequence over its own slice of the
        # cache (a few µs each) instead of a masked copy of the whole cache per call.
        lengths = cache_seqlens.tolist()
        return torch.cat([_decode_uniform(q[b:b + 1], k_cache[b:b + 1], v_cache[b:b + 1], int(n), causal, scale, gqa)
                          for b, n in enumerate(lengths)])
    lens, S = cache_seqlens.to(device=q.device, dtype=torch.long), hi
    keys = torch.arange(S, device=q.device)
    valid = (keys[None, :] < lens[:, None])[:, None, :, None]  # (B, 1, S, 1)
    # Entries past a sequence's length are never read: whatever they hold (NaN in a
    # reused cache) must not reach the output through 0 * NaN.
    k = torch.where(valid, k_cache[:, :, :S], 0)
    v = torch.where(valid, v_cache[:, :, :S], 0)
    if causal:
        last = lens[:, None] - Lq + torch.arange(Lq, device=q.device)[None, :]  # (B, Lq)
    else:
        last = (lens - 1)[:, None].expand(B, Lq)
    return _masked_sdpa(q, k, v, keys[None, None, :] <= last[:, :, None], scale, gqa)


def _decode_uniform(q, k_cache, v_cache, S: int, causal: bool, scale, gqa: bool):
    """Every sequence of the batch holds S entries: slice the cache, and mask only when
    the new tokens need the causal one (or when there are fewer entries than new tokens)."""
    B, _, Lq, _ = q.shape
    k, v = k_cache[:, :, :S], v_cache[:, :, :S]
    mask = None
    if causal and Lq > 1:
        mask = torch.ones(Lq, S, dtype=torch.bool, device=q.device).tril(S - Lq)
        if S < Lq:
            return _masked_sdpa(q, k, v, mask.expand(B, Lq, S), scale, gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def _masked_sdpa(q, k, v, mask, scale, gqa):
    """SDPA with a (B, Lq, S) bool mask; rows with no visible key give 0 (as the kernel)."""
    if k.shape[2] == 0:
        return q.new_zeros(q.shape[:-1] + (v.shape[-1],))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=scale, enable_gqa=gqa)
    return out.masked_fill(~mask.any(-1)[:, None, :, None], 0.0)


def _run(problem, return_lse: bool = False):
    if problem.kind == "varlen":
        return varlen_reference(problem, return_lse)
    if return_lse:
        raise ValueError("return_lse=True needs a fused backend; 'reference' does not produce the log-sum-exp")
    if problem.kind == "decode":
        return decode_reference(problem)
    return reference_attention(problem)


def _available() -> Optional[str]:
    return None


def _supports_everything(problem) -> Optional[str]:
    return None


register_backend(
    AttentionBackend(
        name="reference",
        description="torch.nn.functional.scaled_dot_product_attention (any device/dtype; the fallback; "
                    "window/ALiBi/soft-cap and paged caches as explicit math)",
        availability=_available,
        unsupported=_supports_everything,
        run=_run,
        run_kinds=("dense", "varlen", "decode"),
    )
)
