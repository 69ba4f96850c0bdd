"""Fused attention backward (FlashAttention-2 style), deterministic: no atomics.

Three kernels, as Triton's fused-attention tutorial:

* ``_attn_bwd_preprocess``: ``delta_i = rowsum(dO_i * O_i)`` (fp32), the
  ``rowsum(P * dP)`` term of the softmax gradient.
* ``_attn_bwd_dkdv``: one program per ``BLOCK_N`` keys of one KV head; it
  recomputes ``Pᵀ = exp2(K Qᵀ * scale * log2 e - lse * log2 e)`` tile by tile
  over the query rows that see these keys, for every query head of the GQA
  group in turn, accumulating ``dV += Pᵀ dO`` and ``dK += dSᵀ Q`` in
  registers, so the group's sum is formed in a fixed order (deterministic,
  no repeated K/V, no atomics).
* ``_attn_bwd_dq``: one program per ``BLOCK_M`` query rows; ``dQ += dS K``.

With dropout, the keep-mask is regenerated from the same Philox counters as the
forward (``_dropout_keep``): ``dV`` uses the dropped, rescaled ``P``, and ``dP``
is dropped and rescaled before ``dS = P * (dP - delta)``.

Layouts, causal/window alignment, soft-cap and ALiBi as in ``attention_fwd``;
``LSE``/``DELTA`` share one layout. Tiles outside the causal diagonal / window
are skipped (``key_range``, ``query_range``); masking is applied only on the
tiles crossing an edge. With a soft-cap, ``dS`` is multiplied by
``1 - tanh²`` (the cap's derivative) before it meets K or Q.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .attention_common import (
    DENSE, LOG2E, Layout, _dropout_keep, _load_mask_tile, _tanh, _visible, choose_configs, dims, dropout_scale,
    interpreting, key_range, launch_meta, mask_args, query_range, registers_fit, shared_memory_limit, variant_args,
)
from .launch_lock import AUTOTUNE_LOCK


def bwd_configs(block_m_small: bool, interpret=None):
    """(BLOCK_M, BLOCK_N) sweeps. dK/dV programs hold a key tile and stream queries
    (``block_m_small``: queries are the short side); dQ programs the opposite."""
    if interpreting() if interpret is None else interpret:
        small, big = 16, 32
        bm, bn = (small, big) if block_m_small else (big, small)
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=4, num_stages=1)]
    pairs = ([(16, 32), (16, 64), (16, 128), (32, 64), (32, 128), (64, 64), (64, 128)] if block_m_small
             else [(64, 16), (64, 32), (64, 64), (128, 32), (128, 64)])
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn in pairs
        for s in (2, 3)
        for w in (4, 8)
    ]


def _smem_ok(bytes_16bit, args) -> bool:
    scale = 2 if args["Q"].dtype.itemsize == 4 else 1
    return bytes_16bit * scale <= shared_memory_limit(args["Q"])


def _dkdv_fits(conf, args) -> bool:
    """dK and dV accumulate in registers: <= 128 fp32 of them per thread (ptxas, sm_90a:
    D=256 16x64 fits in 8 warps with 254 registers, spills 3268 B in 4)."""
    bm, bn, w, st = conf.kwargs["BLOCK_M"], conf.kwargs["BLOCK_N"], conf.num_warps, conf.num_stages
    bd, bdv = args["BLOCK_D"], args["BLOCK_DV"]
    if bn * (bd + bdv) > 128 * 32 * w:
        return False
    return _smem_ok(2 * (bn * (bd + bdv) + st * bm * (bd + bdv)), args)


def _dq_fits(conf, args) -> bool:
    bm, bn, w, st = conf.kwargs["BLOCK_M"], conf.kwargs["BLOCK_N"], conf.num_warps, conf.num_stages
    bd, bdv = args["BLOCK_D"], args["BLOCK_DV"]
    if not registers_fit(bm * (bd + 2 * bn) / (32 * w), w):  # dQ accumulator + S/dP tiles
        return False
    return _smem_ok(2 * (bm * (bd + bdv) + st * bn * (bd + bdv)), args)


def _dkdv_preferred(args):
    d = max(args["BLOCK_D"], args["BLOCK_DV"])
    if d <= 64:
        return [(32, 128, 8, 2), (32, 64, 4, 2), (16, 64, 4, 2)]
    if d <= 128:
        return [(32, 64, 8, 2), (16, 128, 8, 2), (32, 128, 8, 2), (16, 64, 4, 2)]
    return [(16, 64, 8, 2), (16, 32, 4, 2)]


def _dq_preferred(args):
    d = max(args["BLOCK_D"], args["BLOCK_DV"])
    if d <= 64:
        return [(128, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 3), (64, 64, 4, 2)]
    if d <= 128:
        return [(128, 32, 8, 2), (64, 32, 4, 2), (128, 64, 8, 2), (64, 64, 8, 2)]
    return [(128, 32, 8, 2), (64, 32, 8, 2), (64, 16, 8, 2)]


def prune_dkdv(configs, named_args, **kwargs):
    return choose_configs(configs, _dkdv_fits, _dkdv_preferred, named_args, kwargs)


def prune_dq(configs, named_args, **kwargs):
    return choose_configs(configs, _dq_fits, _dq_preferred, named_args, kwargs)


@triton.jit
def _attn_bwd_preprocess(
    O, DO, DELTA, CU_Q,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_lb, stride_lh, stride_lm,
    H, SEQLEN_Q, MAX_SEQLEN_Q,
    HEAD_DIM_V: tl.constexpr, VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(MAX_SEQLEN_Q, BLOCK_M)
    bh = pid // num_m
    pid_m = pid % num_m
    b = bh // H
    h = bh % H
    if VARLEN:
        q_start = tl.load(CU_Q + b).to(tl.int64)
        seqlen_q = (tl.load(CU_Q + b + 1) - tl.load(CU_Q + b)).to(tl.int32)
    else:
        q_start = 0
        seqlen_q = SEQLEN_Q
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    ok = (offs_m[:, None] < seqlen_q) & (offs_dv[None, :] < HEAD_DIM_V)
    rows = (q_start + offs_m[:, None]).to(tl.int64)
    o = tl.load(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + rows * stride_om
                + offs_dv[None, :] * stride_od, mask=ok, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh + rows * stride_dom
                 + offs_dv[None, :] * stride_dod, mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh
             + (q_start + offs_m).to(tl.int64) * stride_lm, delta, mask=offs_m < seqlen_q)


@triton.jit
def _attn_bwd_dkdv_inner(
    dk, dv, k, v,
    q_base0, do_base0, mask_base0, lse_base0, delta_base0, slopes_base0,
    stride_qh, stride_qm, stride_qd, stride_doh, stride_dom, stride_dod,
    stride_mh, stride_mm, stride_mn, stride_lh, stride_lm, stride_sh,
    offs_n, n_ok, start, count, group, bh0, seqlen_q, seqlen_k, diag_off, win_left, win_right,
    scale_log2, softcap_in, softcap_out, alibi_off,
    seed, rng_offset, dropout_p, dropout_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BOUNDARY: tl.constexpr,
    LIMIT_LEFT: tl.constexpr, LIMIT_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Accumulate ``count`` query tiles from row ``start`` of each of the ``group`` query
    heads sharing this K/V into this key tile's dK, dV (transposed tiles: rows = keys,
    columns = queries), heads in order. One flat loop over (head, tile): a nested head
    loop cost ~300-500 B of register spills on sm_90a. ``BOUNDARY`` applies the window/causal mask."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for t in range(0, group * count):
        g = t // count
        start_m = start + (t - g * count) * BLOCK_M
        bh = bh0 + g
        q_base = q_base0 + g.to(tl.int64) * stride_qh
        do_base = do_base0 + g.to(tl.int64) * stride_doh
        mask_base = mask_base0 + g.to(tl.int64) * stride_mh
        lse_base = lse_base0 + g.to(tl.int64) * stride_lh
        delta_base = delta_base0 + g.to(tl.int64) * stride_lh
        if ALIBI:
            slope_log2 = tl.load(slopes_base0 + g.to(tl.int64) * stride_sh).to(tl.float32) * 1.4426950408889634
        else:
            slope_log2 = 0.0
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < seqlen_q
        qT = tl.load(q_base + offs_m[None, :].to(tl.int64) * stride_qm + offs_d[:, None] * stride_qd,
                     mask=m_ok[None, :] & (offs_d[:, None] < HEAD_DIM), other=0.0)  # (BLOCK_D, BLOCK_M)
        lse = tl.load(lse_base + offs_m.to(tl.int64) * stride_lm, mask=m_ok, other=0.0)
        # A row with every key masked has lse = -inf and only -inf scores: shift by 0 so P = 0.
        lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
        qkT = tl.dot(k, qT, input_precision=DOT_PRECISION, out_dtype=tl.float32)
        if SOFTCAP:
            capT = _tanh(qkT * softcap_in)
            sT = capT * softcap_out
        else:
            sT = qkT * scale_log2
        if ALIBI:
            sT -= slope_log2 * tl.abs(offs_m[None, :] + alibi_off - offs_n[:, None]).to(tl.float32)
        if HAS_MASK:
            sT += _load_mask_tile(mask_base, offs_m[None, :], offs_n[:, None], m_ok[None, :] & n_ok[:, None],
                                  stride_mm, stride_mn, MASK_BOOL)
        if BOUNDARY:
            visT = _visible(offs_m[None, :], offs_n[:, None], seqlen_k, diag_off, win_left, win_right,
                            LIMIT_LEFT, LIMIT_RIGHT)
            sT = tl.where(visT, sT, float("-inf"))
        pT = tl.math.exp2(sT - lse2[None, :])
        pT = tl.where(m_ok[None, :], pT, 0.0)  # rows past the end of the queries
        do = tl.load(do_base + offs_m[:, None].to(tl.int64) * stride_dom + offs_dv[None, :] * stride_dod,
                     mask=m_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)  # (BLOCK_M, BLOCK_DV)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION, out_dtype=tl.float32)  # (BLOCK_N, BLOCK_M)
        if DROPOUT:
            keepT = _dropout_keep(seed, rng_offset, bh, offs_m[None, :], offs_n[:, None], dropout_p)
            pdT = tl.where(keepT, pT * dropout_scale, 0.0)
            dpT = tl.where(keepT, dpT * dropout_scale, 0.0)
        else:
            pdT = pT
        dv += tl.dot(pdT.to(do.dtype), do, input_precision=DOT_PRECISION, out_dtype=tl.float32)
        delta = tl.load(delta_base + offs_m.to(tl.int64) * stride_lm, mask=m_ok, other=0.0)
        dsT = pT * (dpT - delta[None, :])
        if SOFTCAP:  # d(softcap * tanh(x / softcap)) / dx = 1 - tanh^2
            dsT = dsT * (1.0 - capT * capT)
        dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT), input_precision=DOT_PRECISION, out_dtype=tl.float32)
    return dk, dv


@triton.autotune(
    configs=bwd_configs(block_m_small=True),
    key=["TUNE_LQ", "TUNE_LK", "BLOCK_D", "BLOCK_DV", "LIMIT_LEFT", "LIMIT_RIGHT", "SOFTCAP", "ALIBI", "HAS_MASK",
         "DROPOUT", "VARLEN"],
    prune_configs_by={"early_config_prune": prune_dkdv},
)
@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, MASK, DO, LSE, DELTA, DK, DV, RNG, CU_Q, CU_K, SLOPES,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_lb, stride_lh, stride_lm,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_sb, stride_sh,
    HKV, GROUP, SEQLEN_Q, SEQLEN_K, MAX_SEQLEN_K,
    scale, scale_log2, softcap_in, softcap_out, dropout_p, dropout_scale, causal_bottom_right, win_left, win_right,
    TUNE_LQ, TUNE_LK,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    LIMIT_LEFT: tl.constexpr, LIMIT_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid = tl.program_id(0)
    num_n = tl.cdiv(MAX_SEQLEN_K, BLOCK_N)
    bhk = pid // num_n
    pid_n = pid % num_n
    b = bhk // HKV
    hkv = bhk % HKV
    if VARLEN:
        q_start = tl.load(CU_Q + b).to(tl.int64)
        seqlen_q = (tl.load(CU_Q + b + 1) - tl.load(CU_Q + b)).to(tl.int32)
        k_start = tl.load(CU_K + b).to(tl.int64)
        seqlen_k = (tl.load(CU_K + b + 1) - tl.load(CU_K + b)).to(tl.int32)
    else:
        q_start = 0
        seqlen_q = SEQLEN_Q
        k_start = 0
        seqlen_k = SEQLEN_K
    n0 = pid_n * BLOCK_N
    if n0 >= seqlen_k:
        return

    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < seqlen_k
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k_rows = (k_start + offs_n[:, None]).to(tl.int64)
    k = tl.load(K + b.to(tl.int64) * stride_kb + hkv.to(tl.int64) * stride_kh + k_rows * stride_kn
                + offs_d[None, :] * stride_kd, mask=n_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    v = tl.load(V + b.to(tl.int64) * stride_vb + hkv.to(tl.int64) * stride_vh + k_rows * stride_vn
                + offs_dv[None, :] * stride_vd, mask=n_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    if DROPOUT:
        seed = tl.load(RNG)
        rng_offset = tl.load(RNG + 1).to(tl.int32)
    else:
        seed = 0
        rng_offset = 0
    diag_off = (seqlen_k - seqlen_q) * causal_bottom_right
    alibi_off = seqlen_k - seqlen_q

    # Query rows [lo, hi) see some key of this tile, [full_lo, full_hi) see all of them.
    lo, full_lo, full_hi, hi = query_range(n0, seqlen_q, diag_off, win_left, win_right,
                                           LIMIT_LEFT, LIMIT_RIGHT, BLOCK_M, BLOCK_N)

    # Query heads h = hkv * GROUP + g share this K/V: their contributions are summed here, in order.
    h0 = hkv * GROUP
    q_base0 = Q + b.to(tl.int64) * stride_qb + h0.to(tl.int64) * stride_qh + q_start * stride_qm
    do_base0 = DO + b.to(tl.int64) * stride_dob + h0.to(tl.int64) * stride_doh + q_start * stride_dom
    lse_base0 = LSE + b.to(tl.int64) * stride_lb + h0.to(tl.int64) * stride_lh + q_start * stride_lm
    delta_base0 = DELTA + b.to(tl.int64) * stride_lb + h0.to(tl.int64) * stride_lh + q_start * stride_lm
    mask_base0 = MASK + b.to(tl.int64) * stride_mb + h0.to(tl.int64) * stride_mh
    slopes_base0 = SLOPES + b.to(tl.int64) * stride_sb + h0.to(tl.int64) * stride_sh
    bh0 = b * (HKV * GROUP) + h0
    if LIMIT_RIGHT:  # the tiles crossing the diagonal / right edge
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, q_base0, do_base0, mask_base0, lse_base0, delta_base0, slopes_base0,
            stride_qh, stride_qm, stride_qd, stride_doh, stride_dom, stride_dod,
            stride_mh, stride_mm, stride_mn, stride_lh, stride_lm, stride_sh,
            offs_n, n_ok, lo, tl.cdiv(full_lo - lo, BLOCK_M), GROUP, bh0, seqlen_q, seqlen_k, diag_off, win_left, win_right,
            scale_log2, softcap_in, softcap_out, alibi_off, seed, rng_offset, dropout_p, dropout_scale,
            HEAD_DIM, HEAD_DIM_V, True, LIMIT_LEFT, LIMIT_RIGHT, SOFTCAP, ALIBI, HAS_MASK, MASK_BOOL, DROPOUT,
            DOT_PRECISION, BLOCK_M, BLOCK_D, BLOCK_DV,
        )
    dk, dv = _attn_bwd_dkdv_inner(
        dk, dv, k, v, q_base0, do_base0, mask_base0, lse_base0, delta_base0, slopes_base0,
        stride_qh, stride_qm, stride_qd, stride_doh, stride_dom, stride_dod,
        stride_mh, stride_mm, stride_mn, stride_lh, stride_lm, stride_sh,
        offs_n, n_ok, full_lo, tl.cdiv(full_hi - full_lo, BLOCK_M), GROUP, bh0, seqlen_q, seqlen_k, diag_off,
        win_left, win_right, scale_log2, softcap_in, softcap_out, alibi_off, seed, rng_offset, dropout_p, dropout_scale,
        HEAD_DIM, HEAD_DIM_V, False, LIMIT_LEFT, LIMIT_RIGHT, SOFTCAP, ALIBI, HAS_MASK, MASK_BOOL, DROPOUT,
        DOT_PRECISION, BLOCK_M, BLOCK_D, BLOCK_DV,
    )
    if LIMIT_LEFT:  # the tiles crossing the window's left edge
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, q_base0, do_base0, mask_base0, lse_base0, delta_base0, slopes_base0,
            stride_qh, stride_qm, stride_qd, stride_doh, stride_dom, stride_dod,
            stride_mh, stride_mm, stride_mn, stride_lh, stride_lm, stride_sh,
            offs_n, n_ok, full_hi, tl.cdiv(hi - full_hi, BLOCK_M), GROUP, bh0, seqlen_q, seqlen_k, diag_off,
            win_left, win_right, scale_log2, softcap_in, softcap_out, alibi_off, seed, rng_offset, dropout_p,
            dropout_scale,
            HEAD_DIM, HEAD_DIM_V, True, LIMIT_LEFT, LIMIT_RIGHT, SOFTCAP, ALIBI, HAS_MASK, MASK_BOOL, DROPOUT,
            DOT_PRECISION, BLOCK_M, BLOCK_D, BLOCK_DV,
        )

    dk *= scale
    tl.store(DK + b.to(tl.int64) * stride_dkb + hkv.to(tl.int64) * stride_dkh + k_rows * stride_dkn
             + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty),
             mask=n_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    tl.store(DV + b.to(tl.int64) * stride_dvb + hkv.to(tl.int64) * stride_dvh + k_rows * stride_dvn
             + offs_dv[None, :] * stride_dvd, dv.to(DV.dtype.element_ty),
             mask=n_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))


@triton.jit
def _attn_bwd_dq_inner(
    dq, q, do, lse2, delta,
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
    """Accumulate key tiles ``[start, end)`` into this query tile's dQ."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < seqlen_k
        kT = tl.load(k_base + offs_n[None, :].to(tl.int64) * stride_kn + offs_d[:, None] * stride_kd,
                     mask=n_ok[None, :] & (offs_d[:, None] < HEAD_DIM), other=0.0)  # (BLOCK_D, BLOCK_N)
        vT = tl.load(v_base + offs_n[None, :].to(tl.int64) * stride_vn + offs_dv[:, None] * stride_vd,
                     mask=n_ok[None, :] & (offs_dv[:, None] < HEAD_DIM_V), other=0.0)  # (BLOCK_DV, BLOCK_N)
        qk = tl.dot(q, kT, input_precision=DOT_PRECISION, out_dtype=tl.float32)
        if SOFTCAP:
            cap = _tanh(qk * softcap_in)
            s = cap * softcap_out
        else:
            s = qk * scale_log2
        if ALIBI:
            s -= slope_log2 * tl.abs(offs_m[:, None] + alibi_off - offs_n[None, :]).to(tl.float32)
        if HAS_MASK:
            s += _load_mask_tile(mask_base, offs_m[:, None], offs_n[None, :], row_ok[:, None] & n_ok[None, :],
                                 stride_mm, stride_mn, MASK_BOOL)
        if BOUNDARY:
            visible = _visible(offs_m[:, None], offs_n[None, :], seqlen_k, diag_off, win_left, win_right,
                               LIMIT_LEFT, LIMIT_RIGHT)
            s = tl.where(visible, s, float("-inf"))
        p = tl.math.exp2(s - lse2[:, None])
        dp = tl.dot(do, vT, input_precision=DOT_PRECISION, out_dtype=tl.float32)
        if DROPOUT:
            keep = _dropout_keep(seed, rng_offset, bh, offs_m[:, None], offs_n[None, :], dropout_p)
            dp = tl.where(keep, dp * dropout_scale, 0.0)
        ds = tl.where(p == 1.0, 0.0, p * (dp - delta[:, None]))  # see _attn_bwd_dkdv_inner
        if SOFTCAP:
            ds = ds * (1.0 - cap * cap)
        dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=DOT_PRECISION, out_dtype=tl.float32)
    return dq


@triton.autotune(
    configs=bwd_configs(block_m_small=False),
    key=["TUNE_LQ", "TUNE_LK", "BLOCK_D", "BLOCK_DV", "LIMIT_LEFT", "LIMIT_RIGHT", "SOFTCAP", "ALIBI", "HAS_MASK",
         "DROPOUT", "VARLEN"],
    prune_configs_by={"early_config_prune": prune_dq},
)
@triton.jit
def _attn_bwd_dq(
    Q, K, V, MASK, DO, LSE, DELTA, DQ, RNG, CU_Q, CU_K, SLOPES,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_lb, stride_lh, stride_lm,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_sb, stride_sh,
    H, GROUP, SEQLEN_Q, SEQLEN_K, MAX_SEQLEN_Q,
    scale, scale_log2, softcap_in, softcap_out, dropout_p, dropout_scale, causal_bottom_right, win_left, win_right,
    TUNE_LQ, TUNE_LK,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    LIMIT_LEFT: tl.constexpr, LIMIT_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
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
        q_start = tl.load(CU_Q + b).to(tl.int64)
        seqlen_q = (tl.load(CU_Q + b + 1) - tl.load(CU_Q + b)).to(tl.int32)
        k_start = tl.load(CU_K + b).to(tl.int64)
        seqlen_k = (tl.load(CU_K + b + 1) - tl.load(CU_K + b)).to(tl.int32)
    else:
        q_start = 0
        seqlen_q = SEQLEN_Q
        k_start = 0
        seqlen_k = SEQLEN_K
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen_q:
        return

    offs_m = m0 + tl.arange(0, BLOCK_M)
    row_ok = offs_m < seqlen_q
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = (q_start + offs_m[:, None]).to(tl.int64)
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + rows * stride_qm
                + offs_d[None, :] * stride_qd, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    do = tl.load(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh + rows * stride_dom
                 + offs_dv[None, :] * stride_dod, mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
    l_offs = b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + (q_start + offs_m).to(tl.int64) * stride_lm
    lse = tl.load(LSE + l_offs, mask=row_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
    delta = tl.load(DELTA + l_offs, mask=row_ok, other=0.0)
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
    alibi_off = seqlen_k - seqlen_q
    diag_off = (seqlen_k - seqlen_q) * causal_bottom_right

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, full_lo, full_hi, hi = key_range(m0, seqlen_k, diag_off, win_left, win_right,
                                         LIMIT_LEFT, LIMIT_RIGHT, BLOCK_M, BLOCK_N)
    if LIMIT_LEFT:
        dq = _attn_bwd_dq_inner(
            dq, q, do, lse2, delta, k_base, v_base, mask_base,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
            offs_m, row_ok, lo, full_lo, seqlen_k, diag_off, win_left, win_right,
            scale_log2, softcap_in, softcap_out, slope_log2, alibi_off, seed, rng_offset, bh, dropout_p, dropout_scale,
            HEAD_DIM, HEAD_DIM_V, True, LIMIT_LEFT, LIMIT_RIGHT, SOFTCAP, ALIBI, HAS_MASK, MASK_BOOL, DROPOUT,
            DOT_PRECISION, BLOCK_N, BLOCK_D, BLOCK_DV,
        )
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse2, delta, k_base, v_base, mask_base,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
        offs_m, row_ok, full_lo, full_hi, seqlen_k, diag_off, win_left, win_right,
        scale_log2, softcap_in, softcap_out, slope_log2, alibi_off, seed, rng_offset, bh, dropout_p, dropout_scale,
        HEAD_DIM, HEAD_DIM_V, False, LIMIT_LEFT, LIMIT_RIGHT, SOFTCAP, ALIBI, HAS_MASK, MASK_BOOL, DROPOUT,
        DOT_PRECISION, BLOCK_N, BLOCK_D, BLOCK_DV,
    )
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse2, delta, k_base, v_base, mask_base,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
        offs_m, row_ok, full_hi, hi, seqlen_k, diag_off, win_left, win_right,
        scale_log2, softcap_in, softcap_out, slope_log2, alibi_off, seed, rng_offset, bh, dropout_p, dropout_scale,
        HEAD_DIM, HEAD_DIM_V, True, LIMIT_LEFT, LIMIT_RIGHT, SOFTCAP, ALIBI, HAS_MASK, MASK_BOOL, DROPOUT,
        DOT_PRECISION, BLOCK_N, BLOCK_D, BLOCK_DV,
    )
    dq *= scale
    tl.store(DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh + rows * stride_dqm
             + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


PREPROCESS_BLOCK_M = 64


def attention_bwd(dout, q, k, v, out, lse, mask, rng_state, dq, dk, dv, delta, *, scale: float, dropout_p: float,
                  is_causal: bool, causal_bottom_right: bool, layout: Layout = DENSE, cu_q=None, cu_k=None,
                  max_q: int = 0, max_k: int = 0, variant=None) -> None:
    """Launch the three backward kernels, writing ``dq``, ``dk``, ``dv`` (shaped like q, k, v)
    and the float32 scratch ``delta`` (shaped like ``lse``); every buffer is the caller's.
    Layouts and arguments as :func:`fastformer.kernels.attention_fwd.attention_fwd`."""
    d = dims(q, k, v, layout, cu_q, max_q, max_k)
    mask_ptr, mask_strides, has_mask, mask_bool = mask_args(mask, q)
    cap, window, slope_args, flags = variant_args(variant, is_causal, scale, q)
    meta, tune_lq, tune_lk = launch_meta(q, d, flags, dropout_p, layout, has_mask, mask_bool)
    rng = rng_state if rng_state is not None else q
    cq = cu_q if cu_q is not None else q
    ck = cu_k if cu_k is not None else q
    with AUTOTUNE_LOCK:  # triton's Autotuner is not thread-safe (launch_lock.py)
        _attn_bwd_preprocess[(triton.cdiv(d.len_q, PREPROCESS_BLOCK_M) * d.batch * d.heads,)](
            out, dout, delta, cq,
            *layout.qkv(out), *layout.qkv(dout), *layout.rows(delta),
            d.heads, d.len_q, d.len_q,
            HEAD_DIM_V=d.head_dim_v, VARLEN=layout.varlen, BLOCK_M=PREPROCESS_BLOCK_M, BLOCK_DV=meta["BLOCK_DV"],
        )
        common = (d.len_q, d.len_k)
        scalars = (scale, scale * LOG2E, *cap, float(dropout_p), dropout_scale(dropout_p),
                   int(causal_bottom_right), *window, tune_lq, tune_lk)
        grid_kv = lambda META: (triton.cdiv(d.len_k, META["BLOCK_N"]) * d.batch * d.heads_kv,)  # noqa: E731
        _attn_bwd_dkdv[grid_kv](
            q, k, v, mask_ptr, dout, lse, delta, dk, dv, rng, cq, ck, slope_args[0],
            *layout.qkv(q), *layout.qkv(k), *layout.qkv(v), *mask_strides, *layout.qkv(dout), *layout.rows(lse),
            *layout.qkv(dk), *layout.qkv(dv), *slope_args[1:],
            d.heads_kv, d.heads // d.heads_kv, *common, d.len_k,
            *scalars,
            **meta,
        )
        grid_q = lambda META: (triton.cdiv(d.len_q, META["BLOCK_M"]) * d.batch * d.heads,)  # noqa: E731
        _attn_bwd_dq[grid_q](
            q, k, v, mask_ptr, dout, lse, delta, dq, rng, cq, ck, slope_args[0],
            *layout.qkv(q), *layout.qkv(k), *layout.qkv(v), *mask_strides, *layout.qkv(dout), *layout.rows(lse),
            *layout.qkv(dq), *slope_args[1:],
            d.heads, d.heads // d.heads_kv, *common, d.len_q,
            *scalars,
            **meta,
        )
