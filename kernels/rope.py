"""Rotary position embedding (RoPE) of q and k in one kernel, forward and backward.

``q (B, Hq, L, D)``, ``k (B, Hk, L, D)`` (any strides), positions ``(B or 1, L)``
fp32, ``inv_freq (D/2,)`` fp32. One program per (batch, block of positions):
it computes ``cos``/``sin`` of ``pos * inv_freq`` once in fp32 and applies them
to every head of q and of k, so the trigonometry is shared by ``Hq + Hk`` heads
and each element is read and written once.

Pairs: rotate-half (HF Llama) pairs dim ``i`` with ``i + D/2``; interleaved
(GPT-J / original RoPE) pairs ``2i`` with ``2i + 1``. Each pair ``(x1, x2)``
becomes ``(x1 cos - x2 sin, x2 cos + x1 sin)``. The backward is the inverse
rotation (``INVERSE``: ``sin → -sin``) applied to the gradients.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _rotate_heads(X, OUT, b, offs_l, offs_i, l_ok, i_ok, cos, sin, NH,
                  stride_b, stride_h, stride_l, stride_d, stride_ob, stride_oh, stride_ol, stride_od,
                  D2, INTERLEAVED: tl.constexpr):
    mask = l_ok[:, None] & i_ok[None, :]
    if INTERLEAVED:
        d1 = offs_i * 2
        d2 = d1 + 1
    else:
        d1 = offs_i
        d2 = offs_i + D2
    rows = b * stride_b + offs_l[:, None].to(tl.int64) * stride_l
    orows = b * stride_ob + offs_l[:, None].to(tl.int64) * stride_ol
    for h in range(NH):
        base = X + rows + h * stride_h
        x1 = tl.load(base + d1[None, :] * stride_d, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(base + d2[None, :] * stride_d, mask=mask, other=0.0).to(tl.float32)
        obase = OUT + orows + h * stride_oh
        tl.store(obase + d1[None, :] * stride_od, (x1 * cos - x2 * sin).to(OUT.dtype.element_ty), mask=mask)
        tl.store(obase + d2[None, :] * stride_od, (x2 * cos + x1 * sin).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    Q, K, QO, KO, POS, INV_FREQ,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_qob, stride_qoh, stride_qol, stride_qod,
    stride_kob, stride_koh, stride_kol, stride_kod,
    stride_pb, stride_pl,
    HQ, HK, L, D2,
    INTERLEAVED: tl.constexpr, INVERSE: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_I: tl.constexpr,
):
    num_lb = tl.cdiv(L, BLOCK_L)
    b = (tl.program_id(0) // num_lb).to(tl.int64)
    offs_l = (tl.program_id(0) % num_lb) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_i = tl.arange(0, BLOCK_I)
    l_ok = offs_l < L
    i_ok = offs_i < D2
    pos = tl.load(POS + b * stride_pb + offs_l * stride_pl, mask=l_ok, other=0.0)
    inv_freq = tl.load(INV_FREQ + offs_i, mask=i_ok, other=0.0)
    angle = pos[:, None] * inv_freq[None, :]
    cos = tl.cos(angle)
    sin = tl.sin(angle)
    if INVERSE:
        sin = -sin
    _rotate_heads(Q, QO, b, offs_l, offs_i, l_ok, i_ok, cos, sin, HQ,
                  stride_qb, stride_qh, stride_ql, stride_qd, stride_qob, stride_qoh, stride_qol, stride_qod,
                  D2, INTERLEAVED)
    _rotate_heads(K, KO, b, offs_l, offs_i, l_ok, i_ok, cos, sin, HK,
                  stride_kb, stride_kh, stride_kl, stride_kd, stride_kob, stride_koh, stride_kol, stride_kod,
                  D2, INTERLEAVED)


def rope(q, k, q_out, k_out, positions, inv_freq, interleaved: bool, inverse: bool) -> None:
    """Rotate ``q``/``k`` into ``q_out``/``k_out`` (shapes in the module docstring); ``positions (Bp, L)`` with Bp 1 or B."""
    B, HQ, L, D = q.shape
    HK = k.shape[1]
    D2 = D // 2
    block_i = triton.next_power_of_2(max(D2, 1))
    block_l = max(1, min(triton.next_power_of_2(L), 4096 // block_i, 64))
    stride_pb = positions.stride(0) if positions.shape[0] > 1 else 0
    grid = (B * triton.cdiv(L, block_l),)
    _rope_kernel[grid](
        q, k, q_out, k_out, positions, inv_freq,
        *q.stride(), *k.stride(), *q_out.stride(), *k_out.stride(),
        stride_pb, positions.stride(1),
        HQ, HK, L, D2,
        INTERLEAVED=interleaved, INVERSE=inverse, BLOCK_L=block_l, BLOCK_I=block_i,
        num_warps=8,  # 4 warps spilled ~600 B at head dim 128 (ptxas -v, sm_90a); 8: none

    )
