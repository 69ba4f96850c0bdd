"""Matmul with a fused bias + activation epilogue (and its backward), plus the
gated (SwiGLU/GeGLU) variant.

One matmul kernel ``C = prologue(A) @ B`` serves all three GEMMs of a layer
``y = act(x @ Wᵀ + b)`` by passing strides (a transposed operand is just
swapped strides):

* forward ``y = act(x @ Wᵀ + b)``: epilogue adds the bias, optionally stores the
  pre-activation ``h`` (only for activations whose derivative needs it: for ReLU
  ``y > 0`` already says where ``h > 0``, so nothing extra is stored), applies
  the activation, stores ``y``.
* ``dx = dh @ W`` and ``dW = dhᵀ @ x`` with ``dh = dy * act'(h)`` computed in the
  *prologue* as each A tile is loaded (``PROLOGUE_GRAD``), so ``dh`` never
  exists in memory; the ``dW`` launch also sums its A tiles along the reduction
  dim, which is exactly ``db = Σ_m dh`` (``ROWSUM``), written by the programs of
  the first column block.

Storing ``h`` (one ``M × N`` write + read) is chosen over recomputing it: the
recompute is a whole extra GEMM (``2·M·N·K`` FLOPs) while the store is
``2·M·N`` bytes of traffic — at d_model 768 the GEMM costs ~100× more.

Activation codes: 0 identity, 1 relu, 2 gelu (erf), 3 gelu_tanh, 4 silu.
fp32 inputs use IEEE fp32 dots (no TF32), matching torch's default matmul.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch_lock import AUTOTUNE_LOCK

ACTIVATIONS = {"identity": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4}

_SQRT1_2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327
_SQRT_2_OVER_PI = 0.7978845608028654


@triton.jit
def _tanh(u):
    # No portable tanh in tl (libdevice is GPU-only); the naive 1 - 2/(exp(2u)+1)
    # loses ~2e-7 absolute near 0, enough to fail the error rule on GELU-tanh
    # gradients. Odd Taylor series below |u| < 0.25 (truncation < 3e-9), else
    # (1 - e) / (1 + e) with e = exp(-2|u|) (no cancellation there, no overflow).
    a = tl.abs(u)
    u2 = u * u
    series = u * (1.0 + u2 * (-0.3333333333333333 + u2 * (0.13333333333333333
                  + u2 * (-0.05396825396825397 + u2 * 0.021869488536155203))))
    e = tl.exp(-2.0 * a)
    t = (1.0 - e) / (1.0 + e)
    return tl.where(a < 0.25, series, tl.where(u < 0, -t, t))


@triton.jit
def _act(h, ACT: tl.constexpr):
    if ACT == 1:
        out = tl.maximum(h, 0.0)
    elif ACT == 2:
        out = 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))
    elif ACT == 3:
        out = 0.5 * h * (1.0 + _tanh(0.7978845608028654 * (h + 0.044715 * h * h * h)))
    elif ACT == 4:
        out = h / (1.0 + tl.exp(-h))
    else:
        out = h
    return out


@triton.jit
def _act_grad(h, ACT: tl.constexpr):
    """d act / d h at ``h`` (for ReLU ``h`` may be the output ``y``: same sign)."""
    if ACT == 1:
        g = tl.where(h > 0.0, 1.0, 0.0)
    elif ACT == 2:
        g = 0.5 * (1.0 + tl.erf(h * 0.7071067811865476)) + h * 0.3989422804014327 * tl.exp(-0.5 * h * h)
    elif ACT == 3:
        t = _tanh(0.7978845608028654 * (h + 0.044715 * h * h * h))
        g = 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * h * h)
    elif ACT == 4:
        s = 1.0 / (1.0 + tl.exp(-h))
        g = s * (1.0 + h * (1.0 - s))
    else:
        g = tl.full(h.shape, 1.0, tl.float32)
    return g


@triton.jit
def _matmul_act(
    A, B, C, BIAS, PRE, AUX, ROWSUM,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_pm, stride_pn,
    stride_xm, stride_xk,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_PRE: tl.constexpr,
    PROLOGUE_GRAD: tl.constexpr, DO_ROWSUM: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped ordering: GROUP_M row blocks share each B column block while it is in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_size
    pid_n = (pid % group) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    # Loads wrap rows/columns past the edge (% M, % N) instead of masking them: only
    # the K tail needs a mask, which keeps the 2-D masks and most address registers
    # out of the loop (with full masks and int64 addresses the 128x128 tiles spilled
    # ~1.7 KB per thread on sm_90). The garbage rows/columns are never stored.
    # Offsets are int32: the launcher sends operands of >= 2**31 elements to torch.
    offs_am = tl.max_contiguous(tl.multiple_of(offs_m % M, BLOCK_M), BLOCK_M)
    offs_bn = tl.max_contiguous(tl.multiple_of(offs_n % N, BLOCK_N), BLOCK_N)
    a_ptrs = A + offs_am[:, None] * stride_am + offs_k[None, :] * stride_ak
    x_ptrs = AUX + offs_am[:, None] * stride_xm + offs_k[None, :] * stride_xk
    b_ptrs = B + offs_k[:, None] * stride_bk + offs_bn[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    rowsum = tl.zeros((BLOCK_M,), tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - kb * BLOCK_K
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        if PROLOGUE_GRAD:
            h = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0).to(tl.float32)
            a32 = a.to(tl.float32) * _act_grad(h, ACT)
            if DO_ROWSUM:
                rowsum += tl.sum(a32, 1)
            a = a32.to(A.dtype.element_ty)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        x_ptrs += BLOCK_K * stride_xk
        b_ptrs += BLOCK_K * stride_bk

    if DO_ROWSUM:
        if pid_n == 0:
            tl.store(ROWSUM + offs_m, rowsum, mask=m_ok)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    c_mask = m_ok[:, None] & n_ok[None, :]
    if STORE_PRE:
        p_ptrs = PRE + offs_m[:, None] * stride_pm + offs_n[None, :] * stride_pn
        tl.store(p_ptrs, acc.to(PRE.dtype.element_ty), mask=c_mask)
    if not PROLOGUE_GRAD:
        acc = _act(acc, ACT)
    c_ptrs = C + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=c_mask)


@triton.jit
def _gated_fwd(
    X, W, BIAS, OUT, PRE,
    M, H, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on, stride_pm, stride_pn,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_PRE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``out = act(x @ Waᵀ + ba) * (x @ Wbᵀ + bb)`` with ``W = [Wa; Wb]`` ``(2H, K)``; both halves in one program."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(H, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_size
    pid_n = (pid % group) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < H
    offs_xm = tl.max_contiguous(tl.multiple_of(offs_m % M, BLOCK_M), BLOCK_M)  # wrap, as _matmul_act
    offs_wn = tl.max_contiguous(tl.multiple_of(offs_n % H, BLOCK_N), BLOCK_N)
    x_ptrs = X + offs_xm[:, None] * stride_xm + offs_k[None, :] * stride_xk
    wa_ptrs = W + offs_k[:, None] * stride_wk + offs_wn[None, :] * stride_wn
    wb_ptrs = wa_ptrs + H * stride_wn
    acc_a = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_b = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - kb * BLOCK_K
        x = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        wa = tl.load(wa_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        wb = tl.load(wb_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc_a = tl.dot(x, wa, acc_a, input_precision=DOT_PRECISION)
        acc_b = tl.dot(x, wb, acc_b, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        wa_ptrs += BLOCK_K * stride_wk
        wb_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        acc_a += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        acc_b += tl.load(BIAS + H + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    c_mask = m_ok[:, None] & n_ok[None, :]
    if STORE_PRE:
        # Round like eager code does (pre-activations live in the input dtype there too).
        acc_a = acc_a.to(PRE.dtype.element_ty).to(tl.float32)
        acc_b = acc_b.to(PRE.dtype.element_ty).to(tl.float32)
        p_ptrs = PRE + offs_m[:, None] * stride_pm + offs_n[None, :] * stride_pn
        tl.store(p_ptrs, acc_a.to(PRE.dtype.element_ty), mask=c_mask)
        tl.store(p_ptrs + H * stride_pn, acc_b.to(PRE.dtype.element_ty), mask=c_mask)
    out = _act(acc_a, ACT) * acc_b
    o_ptrs = OUT + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=c_mask)


@triton.jit
def _gated_bwd(
    DOUT, PRE, DPRE, M, H,
    stride_dm, stride_dn, stride_pm, stride_pn, stride_qm, stride_qn,
    ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """``d[a; b] = [dout * b * act'(a); dout * act(a)]`` (elementwise, feeds the two gradient GEMMs)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < H)[None, :]
    rows = offs_m[:, None].to(tl.int64)
    d = tl.load(DOUT + rows * stride_dm + offs_n[None, :] * stride_dn, mask=mask, other=0.0).to(tl.float32)
    p = PRE + rows * stride_pm + offs_n[None, :] * stride_pn
    a = tl.load(p, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(p + H * stride_pn, mask=mask, other=0.0).to(tl.float32)
    q = DPRE + rows * stride_qm + offs_n[None, :] * stride_qn
    tl.store(q, (d * b * _act_grad(a, ACT)).to(DPRE.dtype.element_ty), mask=mask)
    tl.store(q + H * stride_qn, (d * _act(a, ACT)).to(DPRE.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launch configuration

def _configs(gated: bool = False):
    # Chosen from ptxas -v on sm_90a (bf16, as launches specialise unit strides): with a
    # 128x128 fp32 accumulator, 4 warps spill (the dW GEMM ~1.6 KB/thread) while 8 warps
    # fit in 174-237 registers; 64x128 with 4 warps fits. The gated kernel holds two
    # accumulators, so it gets the half-size tiles.
    # (256x128 and 128x64/4 warps spilled 1.2-1.8 KB in the dW GEMM and were dropped.)
    tiles = [(128, 256, 64, 3, 8), (128, 128, 64, 3, 8), (128, 128, 32, 4, 8), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4)]
    if gated:
        tiles = [(128, 128, 64, 3, 8), (64, 128, 64, 3, 4), (64, 128, 64, 4, 4), (128, 64, 64, 3, 4), (64, 64, 64, 4, 4)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=s, num_warps=w)
        for bm, bn, bk, s, w in tiles
    ]


# The flags are in the key: the forward and the two gradient GEMMs of one layer share (M, N, K) up to order.
_matmul_act_tuned = triton.autotune(_configs(), key=["M", "N", "K", "ACT", "PROLOGUE_GRAD", "DO_ROWSUM", "STORE_PRE"])(_matmul_act)
_gated_fwd_tuned = triton.autotune(_configs(gated=True), key=["M", "H", "K", "ACT", "STORE_PRE"])(_gated_fwd)

# Operands at or above this many elements overflow the kernels' int32 offsets: the ops use torch then.
MAX_ELEMENTS = 2**31 - 1

_INTERP_META = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def matmul_act(a, b, c, *, bias=None, pre=None, aux=None, rowsum=None, act: int = 0, prologue_grad: bool = False):
    """``c = act(a @ b + bias)`` or, with ``prologue_grad``, ``c = (a * act'(aux)) @ b`` (+ ``rowsum = Σ_k`` of it).

    ``a (M, K)``, ``b (K, N)``, ``c (M, N)``, any strides; ``aux`` like ``a``; ``pre (M, N)`` receives
    ``a @ b + bias`` when given; ``rowsum (M,)`` fp32.
    """
    M, K = a.shape
    N = b.shape[1]
    aux_t = aux if aux is not None else a
    pre_t = pre if pre is not None else c
    args = (
        a, b, c, bias if bias is not None else c, pre_t, aux_t, rowsum if rowsum is not None else c,
        M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        pre_t.stride(0), pre_t.stride(1), aux_t.stride(0), aux_t.stride(1),
    )
    flags = dict(ACT=act, HAS_BIAS=bias is not None, STORE_PRE=pre is not None, PROLOGUE_GRAD=prologue_grad,
                 DO_ROWSUM=rowsum is not None, DOT_PRECISION=_precision(a.dtype))
    if a.device.type == "cuda":
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
        with AUTOTUNE_LOCK:
            _matmul_act_tuned[grid](*args, **flags)
    else:
        grid = (triton.cdiv(M, _INTERP_META["BLOCK_M"]) * triton.cdiv(N, _INTERP_META["BLOCK_N"]),)
        _matmul_act[grid](*args, **flags, **_INTERP_META)


def gated_fwd(x, w, out, *, bias=None, pre=None, act: int = 4) -> None:
    """``out (M, H) = act(x @ w[:H]ᵀ + b[:H]) * (x @ w[H:]ᵀ + b[H:])``; ``pre (M, 2H)`` gets both halves when given."""
    M, K = x.shape
    H = w.shape[0] // 2
    pre_t = pre if pre is not None else out
    args = (
        x, w, bias if bias is not None else out, out, pre_t, M, H, K,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), out.stride(0), out.stride(1),
        pre_t.stride(0), pre_t.stride(1),
    )
    flags = dict(ACT=act, HAS_BIAS=bias is not None, STORE_PRE=pre is not None, DOT_PRECISION=_precision(x.dtype))
    if x.device.type == "cuda":
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(H, meta["BLOCK_N"]),)  # noqa: E731
        with AUTOTUNE_LOCK:
            _gated_fwd_tuned[grid](*args, **flags)
    else:
        grid = (triton.cdiv(M, _INTERP_META["BLOCK_M"]) * triton.cdiv(H, _INTERP_META["BLOCK_N"]),)
        _gated_fwd[grid](*args, **flags, **_INTERP_META)


def gated_bwd(dout, pre, dpre, act: int) -> None:
    """Fill ``dpre (M, 2H)`` from ``dout (M, H)`` and the stored pre-activations ``pre (M, 2H)``."""
    M, H = dout.shape
    BM, BN = 32, 64
    _gated_bwd[(triton.cdiv(M, BM), triton.cdiv(H, BN))](
        dout, pre, dpre, M, H, dout.stride(0), dout.stride(1), pre.stride(0), pre.stride(1),
        dpre.stride(0), dpre.stride(1), ACT=act, BLOCK_M=BM, BLOCK_N=BN, num_warps=4,
    )
