"""Split-K ("flash-decoding") attention of a few new query tokens over a KV cache.

Decoding attends 1..few query tokens to a long cache: one program per
(batch, head) would leave most of a GPU idle, so the cache is split along its
length into ``NUM_SPLITS`` chunks, each program computes a partial softmax
over one chunk (output normalised within the chunk plus the chunk's
log-sum-exp), and a second kernel combines the partials with their lse.

Shapes (any strides): ``q (B, Hq, Lq, D)``, caches ``(B, Hkv, Smax, D)`` /
``(B, Hkv, Smax, Dv)``, or paged: ``(num_blocks, block_size, Hkv, D)`` with a
``block_table (B, max_blocks)`` int32 of block ids (vLLM / FlashAttention's
``flash_attn_with_kvcache``), ``cache_seqlens (B,)`` int32 = the number of valid
cache entries of each sequence (the new tokens included), clamped to ``[0, Smax]``
(paged: ``[0, max_blocks * block_size]``). Query ``i`` sits at
position ``pos = seqlen - Lq + i`` (bottom-right) and sees keys
``pos - left <= j <= pos + right`` (causal: right = 0); a window reads only the
keys some row sees. Soft-cap and ALiBi (``-slope * |pos - j|``) as the dense kernels.
GQA: the ``G = Hq / Hkv`` query heads of one KV head are packed, with their
``Lq`` tokens, into the rows of one block, so each key block is loaded once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .ffn import _tanh


@triton.jit
def _decode_split_kernel(
    Q, K, V, SEQLENS, O_PART, LSE_PART, BLOCK_TABLE, SLOPES,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_os, stride_od,
    stride_lb, stride_lh, stride_lm, stride_ls,
    stride_tb, stride_sb, stride_sh,
    HKV, LQ, G, D, DV, SMAX, PAGE_SIZE, NUM_BLOCKS,
    scale_log2, softcap_in, softcap_out, win_left, win_right,
    NUM_SPLITS: tl.constexpr, LIMIT_LEFT: tl.constexpr, LIMIT_RIGHT: tl.constexpr, PAGED: tl.constexpr,
    SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = pid_bh // HKV
    hkv = pid_bh % HKV
    # Clamped to the cache: lengths on the GPU are not checked on the host (no sync).
    seqlen = tl.minimum(tl.maximum(tl.load(SEQLENS + b).to(tl.int32), 0), SMAX)

    # Row r of the block is query token r % LQ of query head hkv * G + r // LQ.
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < G * LQ
    head = hkv * G + rows // LQ
    tok = rows % LQ
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    q_ptrs = (Q + b.to(tl.int64) * stride_qb + head[:, None].to(tl.int64) * stride_qh
              + tok[:, None] * stride_qm + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)

    # Query token t sits at cache position seqlen - LQ + t (bottom-right alignment); it sees
    # keys [pos - win_left, pos + win_right] (each side when limited; causal: win_right = 0).
    pos = seqlen - LQ + tok
    # The keys any row may see, split into NUM_SPLITS chunks of whole key blocks: with a
    # window only [first row's left edge, last row's right edge) is read.
    if LIMIT_LEFT:
        lo = tl.maximum(seqlen - LQ - win_left, 0)
    else:
        lo = 0
    if LIMIT_RIGHT:
        hi = tl.minimum(tl.maximum(seqlen + win_right, 0), seqlen)
    else:
        hi = seqlen
    chunk = tl.cdiv(tl.cdiv(tl.maximum(hi - lo, 0), NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = lo + pid_s * chunk
    end = tl.minimum(start + chunk, hi)
    if ALIBI:
        slope_log2 = tl.load(SLOPES + b.to(tl.int64) * stride_sb + head.to(tl.int64) * stride_sh,
                             mask=row_ok, other=0.0).to(tl.float32) * 1.4426950408889634
    else:
        slope_log2 = tl.zeros([BLOCK_M], dtype=tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    k_base = K + hkv.to(tl.int64) * stride_kh
    v_base = V + hkv.to(tl.int64) * stride_vh
    if not PAGED:
        k_base += b.to(tl.int64) * stride_kb
        v_base += b.to(tl.int64) * stride_vb
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        if PAGED:
            # Cache (num_blocks, PAGE_SIZE, Hkv, D): key n lives in block BLOCK_TABLE[b, n // PAGE_SIZE]
            # (ids validated on the host), row n % PAGE_SIZE. stride_kb/vb are the per-block strides.
            page = tl.load(BLOCK_TABLE + b.to(tl.int64) * stride_tb + offs_n // PAGE_SIZE, mask=n_ok, other=0)
            page = tl.minimum(tl.maximum(page, 0), NUM_BLOCKS - 1)  # never outside the pool
            k_rows = page.to(tl.int64) * stride_kb + (offs_n % PAGE_SIZE).to(tl.int64) * stride_kn
            v_rows = page.to(tl.int64) * stride_vb + (offs_n % PAGE_SIZE).to(tl.int64) * stride_vn
        else:
            k_rows = offs_n.to(tl.int64) * stride_kn
            v_rows = offs_n.to(tl.int64) * stride_vn
        k = tl.load(k_base + k_rows[None, :] + offs_d[:, None] * stride_kd,
                    mask=n_ok[None, :] & (offs_d[:, None] < D), other=0.0)  # (BLOCK_D, BLOCK_N)
        qk = tl.dot(q, k, input_precision=DOT_PRECISION, out_dtype=tl.float32)
        if SOFTCAP:
            s = _tanh(qk * softcap_in) * softcap_out
        else:
            s = qk * scale_log2
        if ALIBI:
            s -= slope_log2[:, None] * tl.abs(pos[:, None] - offs_n[None, :]).to(tl.float32)
        visible = n_ok[None, :] & (pos[:, None] == pos[:, None])
        if LIMIT_RIGHT:
            visible = visible & (offs_n[None, :] <= pos[:, None] + win_right)
        if LIMIT_LEFT:
            visible = visible & (offs_n[None, :] >= pos[:, None] - win_left)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows that have seen no visible key yet keep m = -inf: shift by 0 to avoid inf - inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + v_rows[:, None] + offs_dv[None, :] * stride_vd,
                    mask=n_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)  # (BLOCK_N, BLOCK_DV)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION, out_dtype=tl.float32)
        m_i = m_new

    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    # natural-log lse of this chunk; -inf when the chunk holds no visible key
    lse = tl.where(has_keys, (m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) * 0.6931471805599453, float("-inf"))

    o_ptrs = (O_PART + b.to(tl.int64) * stride_ob + head[:, None].to(tl.int64) * stride_oh
              + tok[:, None] * stride_om + pid_s * stride_os + offs_dv[None, :] * stride_od)
    tl.store(o_ptrs, out, mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    l_ptrs = (LSE_PART + b.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh
              + tok * stride_lm + pid_s * stride_ls)
    tl.store(l_ptrs, lse, mask=row_ok)


@triton.jit
def _decode_combine_kernel(
    O_PART, LSE_PART, OUT, LSE,
    stride_ob, stride_oh, stride_om, stride_os, stride_od,
    stride_lb, stride_lh, stride_lm, stride_ls,
    stride_outb, stride_outh, stride_outm, stride_outd,
    H, LQ, DV,
    NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // (H * LQ)
    h = (pid // LQ) % H
    m = pid % LQ
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    s_ok = offs_s < NUM_SPLITS

    l_base = LSE_PART + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + m * stride_lm
    lse = tl.load(l_base + offs_s * stride_ls, mask=s_ok, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    any_keys = lse_max > float("-inf")
    shift = tl.where(any_keys, lse_max, 0.0)
    w = tl.exp(lse - shift)  # 0 for empty chunks
    total = tl.sum(w, 0)

    o_base = O_PART + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + m * stride_om
    o = tl.load(o_base + offs_s[:, None] * stride_os + offs_dv[None, :] * stride_od,
                mask=s_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.where(any_keys, total, 1.0)
    out_ptrs = OUT + b.to(tl.int64) * stride_outb + h.to(tl.int64) * stride_outh + m * stride_outm
    tl.store(out_ptrs + offs_dv * stride_outd, out.to(OUT.dtype.element_ty), mask=offs_dv < DV)
    final = tl.where(any_keys, shift + tl.log(tl.where(any_keys, total, 1.0)), float("-inf"))
    tl.store(LSE + pid, final)


def decode_num_splits(batch_heads_kv: int, max_len: int, num_sms: int, block_n: int) -> int:
    """Chunks per sequence: enough programs to fill ~2 waves of SMs, never chunks
    shorter than one key block (a chunk has fixed cost: q load and the combine)."""
    blocks = triton.cdiv(max_len, block_n)
    want = triton.cdiv(2 * num_sms, max(1, batch_heads_kv))
    return max(1, min(want, blocks, 64))


def decode_attention_fwd(q, k_cache, v_cache, cache_seqlens, scale, causal, out, lse, o_part, lse_part,
                         num_splits: int, block_n: int = 64, num_warps: int = 4, *, window=(-1, -1),
                         alibi_slopes=None, softcap: float = 0.0, block_table=None):
    """Launch the two kernels; every buffer is allocated by the caller.

    ``o_part (B, Hq, Lq, num_splits, Dv)`` and ``lse_part (B, Hq, Lq, num_splits)``
    are float32 scratch; ``out (B, Hq, Lq, Dv)`` in q's dtype, ``lse (B, Hq, Lq)`` float32.
    ``window`` (left, right; -1 unlimited, right forced to 0 by ``causal``), ``alibi_slopes``
    (fp32 ``(B, Hq)`` view) and ``softcap`` as the dense kernels. ``block_table`` (int32
    ``(B, max_blocks)``, validated by the caller): the caches are paged, ``(num_blocks,
    block_size, Hkv, D)``.
    """
    B, Hq, Lq, D = q.shape
    paged = block_table is not None
    if paged:
        num_blocks, page_size, Hkv, Dv = k_cache.shape[0], k_cache.shape[1], k_cache.shape[2], v_cache.shape[3]
        smax = block_table.shape[1] * page_size
        # (num_blocks, block_size, Hkv, D): per-block stride as "batch", then head, row, dim
        k_strides = (k_cache.stride(0), k_cache.stride(2), k_cache.stride(1), k_cache.stride(3))
        v_strides = (v_cache.stride(0), v_cache.stride(2), v_cache.stride(1), v_cache.stride(3))
        table_args = (block_table, block_table.stride(0))
    else:
        num_blocks, page_size, Hkv, Dv = 1, 1, k_cache.shape[1], v_cache.shape[3]
        smax = k_cache.shape[2]
        k_strides, v_strides = k_cache.stride(), v_cache.stride()
        table_args = (cache_seqlens, 0)
    G = Hq // Hkv
    left, right = (int(window[0]), 0 if causal else int(window[1]))
    softcap = float(softcap)
    slope_args = (alibi_slopes, alibi_slopes.stride(0), alibi_slopes.stride(1)) if alibi_slopes is not None \
        else (q, 0, 0)
    block_m = max(16, triton.next_power_of_2(G * Lq))
    block_d = max(16, triton.next_power_of_2(D))
    block_dv = max(16, triton.next_power_of_2(Dv))
    LOG2E = 1.4426950408889634
    _decode_split_kernel[(B * Hkv, num_splits)](
        q, k_cache, v_cache, cache_seqlens, o_part, lse_part, table_args[0], slope_args[0],
        *q.stride(), *k_strides, *v_strides, *o_part.stride(), *lse_part.stride(),
        table_args[1], *slope_args[1:],
        Hkv, Lq, G, D, Dv, smax, page_size, num_blocks,
        scale * LOG2E, scale / softcap if softcap > 0 else 0.0, softcap * LOG2E,
        max(left, 0), max(right, 0),
        NUM_SPLITS=num_splits, LIMIT_LEFT=left >= 0, LIMIT_RIGHT=right >= 0, PAGED=paged,
        SOFTCAP=softcap > 0, ALIBI=alibi_slopes is not None,
        # fp32 caches get true fp32 products (tf32 would break the error rule)
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv,
        num_warps=num_warps,
    )
    _decode_combine_kernel[(B * Hq * Lq,)](
        o_part, lse_part, out, lse,
        *o_part.stride(), *lse_part.stride(), *out.stride(),
        Hq, Lq, Dv,
        NUM_SPLITS=num_splits, BLOCK_S=max(2, triton.next_power_of_2(num_splits)), BLOCK_DV=block_dv,
        num_warps=1 if block_dv <= 64 else 2,
    )
