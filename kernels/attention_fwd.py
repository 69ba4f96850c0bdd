"""Fused attention forward (FlashAttention-2 style), as Triton's fused-attention tutorial.

One program computes ``BLOCK_M`` query rows of one (sequence, query head):
it streams the keys/values of that head's KV head (``h // GROUP``: GQA/MQA
without repeating K/V) in ``BLOCK_N`` tiles, keeps a running max ``m_i`` and
sum ``l_i`` of the softmax in the log2 domain (scores pre-multiplied by
``scale * log2(e)`` so ``exp2`` is used), and never materialises the L x S
matrix. Outputs: ``O`` and the natural-log log-sum-exp ``LSE`` (fp32).

Layouts. Every tensor is read through explicit strides:
``Q (B, H, L, D)``, ``K (B, HKV, S, D)``, ``V (B, HKV, S, DV)``,
``MASK (B, H, L, S)`` (stride 0 where broadcast), ``O`` like ``Q`` with DV,
``LSE (B, H, L)``. Packed variable-length input (``VARLEN``) passes batch
strides 0 and ``CU_Q``/``CU_K`` cumulative sequence lengths; a sequence's rows
start at ``CU_Q[b]``.

Causal mask and local window: key ``j`` is visible to query ``i`` when
``i + off - win_left <= j <= i + off + win_right`` (each side only when
``LIMIT_LEFT`` / ``LIMIT_RIGHT``; causal is ``win_right = 0``) with ``off = 0``
(top-left, torch) or ``off = S_b - L_b`` (bottom-right). The key loop runs in
three stages (``key_range``): tiles crossing the left edge (masked), tiles every
row of the block fully sees (no masking), then the diagonal/right-edge/tail
tiles (masked); tiles outside the window are never visited. Soft-cap and ALiBi
(``attention_common._scores``) apply to every tile, before the attn_mask.

Head dims are padded to ``BLOCK_D``/``BLOCK_DV`` (next power of two) with
masked loads. Rows whose every key is masked output 0 with ``lse = -inf``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .attention_common import (
    DENSE, LOG2E, Layout, _dropout_keep, _load_mask_tile, _scores, _visible, choose_configs, dims, dropout_scale,
    interpreting, key_range, launch_meta, mask_args, registers_fit, shared_memory_limit, variant_args,
)
from .launch_lock import AUTOTUNE_LOCK


def fwd_configs(interpret=None):
    """Candidate tilings: one small config under the interpreter (tests stay fast);
    on GPUs a sweep over tiles/stages/warps for Hopper and Ampere, pruned per call."""
    if interpreting() if interpret is None else interpret:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm in (64, 128)
        for bn in (32, 64, 128)
        for s in (2, 3, 4)
        for w in (4, 8)
    ]


def _fwd_fits(conf, args) -> bool:
    """No register spills or shared-memory overflow (rules from ptxas on sm_90a, bench/NOTES.md)."""
    bm, bn, w, st = conf.kwargs["BLOCK_M"], conf.kwargs["BLOCK_N"], conf.num_warps, conf.num_stages
    bd, bdv = args["BLOCK_D"], args["BLOCK_DV"]
    if bm > 64 and args["TUNE_LQ"] <= 64:  # short queries: 128-row tiles are mostly padding
        return False
    # Registers per thread: the fp32 accumulator (bm x bdv) and the score tile (bm x bn).
    # ptxas sm_90a, D=128: 128x64/4 warps spills 184 B, 64x128/4 warps 28 B; 128x128/8 warps fits (240 regs).
    if not registers_fit(bm * (bdv + bn) / (32 * w), w) or (bdv >= 128 and bn >= 128 and w == 4):
        return False
    smem = 2 * (bm * bd + st * bn * (bd + bdv))  # Q tile + pipelined K/V tiles (16-bit)
    if args["Q"].dtype.itemsize == 4:
        smem *= 2
    return smem <= shared_memory_limit(args["Q"])


def _fwd_preferred(args):
    d = max(args["BLOCK_D"], args["BLOCK_DV"])
    if d <= 64:
        return [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (64, 32, 4, 2)]
    if d <= 128:
        return [(128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2)]
    return [(128, 32, 8, 2), (64, 32, 8, 2), (64, 64, 8, 2)]


def prune_fwd(configs, named_args, **kwargs):
    return choose_configs(configs, _fwd_fits, _fwd_preferred, named_args, kwargs)


@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q,
    k_base, v_base, mask_base,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
    offs_m, row_ok, start, end, seqlen_k, diag_off, win_left, win_right,
    scale_log2, softcap_in, softcap_out, slope_log2, alibi_off,
    seed, rng_offset, bh, dropout_p, dropout_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BOUNDARY: tl.constexpr,
    LIMIT_LEFT: tl.constexpr, LIMIT_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Accumulate key tiles ``[start, end)``. ``BOUNDARY``: apply the window/causal and
    key-bounds masks (tiles crossing a window edge or the end of the keys)."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < seqlen_k
        k = tl.load(k_base + offs_n[None, :].to(tl.int64) * stride_kn + offs_d[:, None] * stride_kd,
                    mask=n_ok[None, :] & (offs_d[:, None] < HEAD_DIM), other=0.0)  # (BLOCK_D, BLOCK_N)
        qk = tl.dot(q, k, input_precision=DOT_PRECISION, out_dtype=tl.float32)
        s = _scores(qk, offs_m[:, None], offs_n[None, :], scale_log2, softcap_in, softcap_out, slope_log2, alibi_off,
                    SOFTCAP, ALIBI)
        if HAS_MASK:
            s += _load_mask_tile(mask_base, offs_m[:, None], offs_n[None, :], row_ok[:, None] & n_ok[None, :],
                                 stride_mm, stride_mn, MASK_BOOL)
        if BOUNDARY:
            visible = _visible(offs_m[:, None], offs_n[None, :], seqlen_k, diag_off, win_left, win_right,
                               LIMIT_LEFT, LIMIT_RIGHT)
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no visible key keeps m = -inf: shift by 0, not -inf (no inf - inf).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            # l_i normalises the un-dropped weights; dropout only touches what reaches V.
            keep = _dropout_keep(seed, rng_offset, bh, offs_m[:, None], offs_n[None, :], dropout_p)
            p = tl.where(keep, p * dropout_scale, 0.0)
        v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vn + offs_dv[None, :] * stride_vd,
                    mask=n_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)  # (BLOCK_N, BLOCK_DV)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION, out_dtype=tl.float32)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(
    configs=fwd_configs(),
    key=["TUNE_LQ", "TUNE_LK", "BLOCK_D", "BLOCK_DV", "LIMIT_LEFT", "LIMIT_RIGHT", "SOFTCAP", "ALIBI", "HAS_MASK",
         "DROPOUT", "VARLEN"],
    prune_configs_by={"early_config_prune": prune_fwd},
)
@triton.jit
def _attn_fwd(
    Q, K, V, MASK, O, LSE, RNG, CU_Q, CU_K, SLOPES,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    stride_sb, stride_sh,
    H, GROUP, SEQLEN_Q, SEQLEN_K, MAX_SEQLEN_Q,
    scale_log2, softcap_in, softcap_out, dropout_p, dropout_scale, causal_bottom_right, win_left, win_right,
    TUNE_LQ, TUNE_LK,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    LIMIT_LEFT: tl.constexpr, LIMIT_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # 1-D grid, query blocks fastest: the programs sharing one head's K/V run together (L2 reuse),
    # and there is no 65535 limit on batch * heads.
    pid = tl.program_id(0)
    num_m = tl.cdiv(MAX_SEQLEN_Q, BLOCK_M)
    bh = pid // num_m
    pid_m = pid % num_m
    if LIMIT_RIGHT and not LIMIT_LEFT:  # causal: the last query blocks see the most keys: launch them first
        pid_m = num_m - 1 - pid_m
    b = bh // H
    h = bh % H
    hkv = h // GROUP
    if VARLEN:
        q_start = tl.load(CU_Q + b).to(tl.int64)  # int64: offsets into a packed batch
        seqlen_q = (tl.load(CU_Q + b + 1) - tl.load(CU_Q + b)).to(tl.int32)
        k_start = tl.load(CU_K + b).to(tl.int64)
        seqlen_k = (tl.load(CU_K + b + 1) - tl.load(CU_K + b)).to(tl.int32)
    else:
        q_start = 0
        seqlen_q = SEQLEN_Q
        k_start = 0
        seqlen_k = SEQLEN_K
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen_q:  # varlen: this sequence is shorter than the longest
        return

    offs_m = m0 + tl.arange(0, BLOCK_M)
    row_ok = offs_m < seqlen_q
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + q_start * stride_qm
    q = tl.load(q_base + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + hkv.to(tl.int64) * stride_kh + k_start * stride_kn
    v_base = V + b.to(tl.int64) * stride_vb + hkv.to(tl.int64) * stride_vh + k_start * stride_vn
    mask_base = MASK + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh

    if DROPOUT:
        seed = tl.load(RNG)
        rng_offset = tl.load(RNG + 1).to(tl.int32)
    else:
        seed = 0
        rng_offset = 0
    if ALIBI:
        slope_log2 = tl.load(SLOPES + b.to(tl.int64) * stride_sb + h.to(tl.int64) * stride_sh).to(tl.float32) * 1.4426950408889634
    else:
        slope_log2 = 0.0
    alibi_off = seqlen_k - seqlen_q  # ALiBi distances are bottom-right aligned, whatever the causal alignment
    diag_off = (seqlen_k - seqlen_q) * causal_bottom_right

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    # [lo, full_lo): tiles crossing the window's left edge; [full_lo, full_hi): whole tiles every
    # row sees (no masking); [full_hi, hi): the diagonal/right edge and the end of the keys.
    # Tiles outside [lo, hi) are never visited: a window of width W costs O(W) per row.
    lo, full_lo, full_hi, hi = key_range(m0, seqlen_k, diag_off, win_left, win_right,
                                         LIMIT_LEFT, LIMIT_RIGHT, BLOCK_M, BLOCK_N)
    if LIMIT_LEFT:
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, mask_base,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
            offs_m, row_ok, lo, full_lo, seqlen_k, diag_off, win_left, win_right,
            scale_log2, softcap_in, softcap_out, slope_log2, alibi_off, seed, rng_offset, bh, dropout_p, dropout_scale,
            HEAD_DIM, HEAD_DIM_V, True, LIMIT_LEFT, LIMIT_RIGHT, SOFTCAP, ALIBI, HAS_MASK, MASK_BOOL, DROPOUT,
            DOT_PRECISION, BLOCK_N, BLOCK_D, BLOCK_DV,
        )
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, mask_base,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
        offs_m, row_ok, full_lo, full_hi, seqlen_k, diag_off, win_left, win_right,
        scale_log2, softcap_in, softcap_out, slope_log2, alibi_off, seed, rng_offset, bh, dropout_p, dropout_scale,
        HEAD_DIM, HEAD_DIM_V, False, LIMIT_LEFT, LIMIT_RIGHT, SOFTCAP, ALIBI, HAS_MASK, MASK_BOOL, DROPOUT,
        DOT_PRECISION, BLOCK_N, BLOCK_D, BLOCK_DV,
    )
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, mask_base,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
        offs_m, row_ok, full_hi, hi, seqlen_k, diag_off, win_left, win_right,
        scale_log2, softcap_in, softcap_out, slope_log2, alibi_off, seed, rng_offset, bh, dropout_p, dropout_scale,
        HEAD_DIM, HEAD_DIM_V, True, LIMIT_LEFT, LIMIT_RIGHT, SOFTCAP, ALIBI, HAS_MASK, MASK_BOOL, DROPOUT,
        DOT_PRECISION, BLOCK_N, BLOCK_D, BLOCK_DV,
    )

    has_keys = l_i > 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(has_keys, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    o_base = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + q_start * stride_om
    tl.store(o_base + offs_m[:, None].to(tl.int64) * stride_om + offs_dv[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))
    l_base = LSE + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + q_start * stride_lm
    tl.store(l_base + offs_m.to(tl.int64) * stride_lm, lse, mask=row_ok)


def attention_fwd(q, k, v, mask, out, lse, rng_state, *, scale: float, dropout_p: float, is_causal: bool,
                  causal_bottom_right: bool, layout: Layout = DENSE, cu_q=None, cu_k=None, max_q: int = 0,
                  max_k: int = 0, variant=None) -> None:
    """Launch ``_attn_fwd``, writing ``out`` and ``lse`` (allocated by the caller).

    Dense: ``q (B, Hq, L, E)``, ``k (B, Hkv, S, E)``, ``v (B, Hkv, S, Ev)``, ``mask`` None or
    a bool/float view broadcast to ``(B, Hq, L, S)``, ``out (B, Hq, L, Ev)`` in q's dtype,
    ``lse (B, Hq, L)`` float32. Packed (``layout=PACKED``): ``q (Tq, Hq, E)`` ..., ``out (Tq, Hq, Ev)``,
    ``lse (Hq, Tq)``, int32 ``cu_q``/``cu_k`` boundaries and the longest lengths. ``rng_state``:
    None, or int64 ``[seed, offset]`` when ``dropout_p > 0``. The caller handles empty problems.
    ``variant``: window / ALiBi / soft-cap (see :func:`attention_common.variant_args`), or None.
    """
    d = dims(q, k, v, layout, cu_q, max_q, max_k)
    mask_ptr, mask_strides, has_mask, mask_bool = mask_args(mask, q)
    cap, window, slope_args, flags = variant_args(variant, is_causal, scale, q)
    meta, tune_lq, tune_lk = launch_meta(q, d, flags, dropout_p, layout, has_mask, mask_bool)
    grid = lambda META: (triton.cdiv(d.len_q, META["BLOCK_M"]) * d.batch * d.heads,)  # noqa: E731
    with AUTOTUNE_LOCK:  # triton's Autotuner is not thread-safe (launch_lock.py)
        _attn_fwd[grid](
            q, k, v, mask_ptr, out, lse,
            rng_state if rng_state is not None else q, cu_q if cu_q is not None else q, cu_k if cu_k is not None else q,
            slope_args[0],
            *layout.qkv(q), *layout.qkv(k), *layout.qkv(v), *mask_strides, *layout.qkv(out), *layout.rows(lse),
            *slope_args[1:],
            d.heads, d.heads // d.heads_kv, d.len_q, d.len_k, d.len_q,
            scale * LOG2E, *cap, float(dropout_p), dropout_scale(dropout_p), int(causal_bottom_right),
            *window, tune_lq, tune_lk,
            **meta,
        )
