"""LayerNorm / RMSNorm with a fused residual add and dropout, forward and backward.

Rows ``(R, N)``, contiguous; one row per program in the forward (the whole row
in registers, so ``N`` is limited to ``MAX_FUSED_N`` columns; the op falls back
to torch above that).

Forward: ``h = x + dropout(residual)`` (rounded to the input dtype, exactly what
an eager ``x + F.dropout(residual)`` produces, and what the backward re-reads),
then ``y = (h - mean) * rstd * w + b`` (LayerNorm) or ``y = h * rstd * w``
(RMSNorm, no mean). Stores ``y``, ``h`` (only when a residual is given), and
fp32 ``mean``/``rstd`` per row. The dropout mask is never stored: it comes
from Philox ``tl.rand(seed, row * N + col)`` and is regenerated in the backward.

Backward: ``G`` programs each take rows ``pid, pid + G, ...``; per row
``dx = rstd * (g - mean(g) - xhat * mean(g * xhat))`` with ``g = dy * w``
(RMSNorm drops the ``mean(g)`` term), plus the gradient flowing into the
returned sum; ``dresidual = dx * keep / (1 - p)``. ``dw``/``db`` are accumulated
in fp32 registers per program and written as ``(G, N)`` partial sums, reduced
by a second pass: deterministic, no atomics.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Wider rows go to torch: at 16384 columns the backward already spills ~450 B/thread
# with 16 warps (ptxas -v, sm_90a); at 65536 it would be hopeless.
MAX_FUSED_N = 16384


@triton.jit
def _norm_fwd(
    X, RES, W, B, Y, H, MEAN, RSTD, SEED,
    N, eps, dropout_p,
    HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, DROPOUT: tl.constexpr,
    RMS: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inb = cols < N
    base = row * N
    h = tl.load(X + base + cols, mask=inb, other=0.0)
    if HAS_RES:
        r = tl.load(RES + base + cols, mask=inb, other=0.0).to(tl.float32)
        if DROPOUT:
            seed = tl.load(SEED)
            keep = tl.rand(seed, (base + cols).to(tl.int32)) >= dropout_p
            r = tl.where(keep, r / (1.0 - dropout_p), 0.0)
        # Round the sum to the storage dtype: the returned residual and the
        # normalised value then agree, as in eager code.
        h = (h.to(tl.float32) + r).to(H.dtype.element_ty)
        tl.store(H + base + cols, h, mask=inb)
    h = h.to(tl.float32)
    if RMS:
        mean = 0.0
        var = tl.sum(h * h, 0) / N
        xc = h
    else:
        mean = tl.sum(h, 0) / N
        xc = tl.where(inb, h - mean, 0.0)
        var = tl.sum(xc * xc, 0) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    y = xc * rstd
    if HAS_W:
        y = y * tl.load(W + cols, mask=inb, other=0.0).to(tl.float32)
    if HAS_B:
        y = y + tl.load(B + cols, mask=inb, other=0.0).to(tl.float32)
    tl.store(Y + base + cols, y.to(Y.dtype.element_ty), mask=inb)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _norm_bwd(
    DY, DSUM, H, W, MEAN, RSTD, SEED, DX, DRES, DW_PART, DB_PART,
    R, N, dropout_p,
    HAS_DSUM: tl.constexpr, HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    DROPOUT: tl.constexpr, RMS: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    inb = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=inb, other=0.0).to(tl.float32)
    else:
        w = tl.full([BLOCK], 1.0, tl.float32)
    dw = tl.zeros([BLOCK], tl.float32)
    db = tl.zeros([BLOCK], tl.float32)
    if HAS_RES and DROPOUT:
        seed = tl.load(SEED)
    for row in range(pid, R, G):
        base = tl.cast(row, tl.int64) * N
        h = tl.load(H + base + cols, mask=inb, other=0.0).to(tl.float32)
        dy = tl.load(DY + base + cols, mask=inb, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        xhat = tl.where(inb, (h - mean) * rstd, 0.0)
        g = dy * w
        dw += dy * xhat
        db += dy
        c2 = tl.sum(g * xhat, 0) / N
        if RMS:
            dx = (g - xhat * c2) * rstd
        else:
            c1 = tl.sum(g, 0) / N
            dx = (g - c1 - xhat * c2) * rstd
        if HAS_DSUM:
            dx += tl.load(DSUM + base + cols, mask=inb, other=0.0).to(tl.float32)
        tl.store(DX + base + cols, dx.to(DX.dtype.element_ty), mask=inb)
        if HAS_RES:
            dr = dx
            if DROPOUT:
                keep = tl.rand(seed, (base + cols).to(tl.int32)) >= dropout_p
                dr = tl.where(keep, dx / (1.0 - dropout_p), 0.0)
            tl.store(DRES + base + cols, dr.to(DRES.dtype.element_ty), mask=inb)
    if HAS_W:
        tl.store(DW_PART + pid * N + cols, dw, mask=inb)
    if HAS_B:
        tl.store(DB_PART + pid * N + cols, db, mask=inb)


def _warps(block: int, backward: bool = False) -> int:
    # ptxas -v on sm_90a (bf16, residual + dropout): forward 8192 / 8 warps = 80 registers;
    # backward 8192 / 8 warps = 255 (occupancy 1 warp group per SM), / 16 warps = 128.
    # At 8192 the backward still spills ~220 B with 16 warps (150 B with 32, at 64 registers).
    if backward:
        return 8 if block <= 2048 else (16 if block <= 8192 else 32)
    return 4 if block <= 1024 else (8 if block <= 4096 else 16)


def norm_fwd(x, res, w, b, y, h, mean, rstd, seed, eps: float, dropout_p: float, rms: bool) -> None:
    """Fill ``y``, ``h`` (when ``res`` is given), ``mean``, ``rstd``; all row tensors ``(R, N)`` contiguous.

    ``seed``: int64 tensor of one element (read only when ``dropout_p > 0``).
    """
    R, N = x.shape
    block = triton.next_power_of_2(N)
    has_res = res is not None
    _norm_fwd[(R,)](
        x, res if has_res else x, w if w is not None else x, b if b is not None else x,
        y, h if has_res else y, mean, rstd, seed if seed is not None else mean,
        N, eps, dropout_p,
        HAS_RES=has_res, HAS_W=w is not None, HAS_B=b is not None,
        DROPOUT=has_res and dropout_p > 0.0, RMS=rms, BLOCK=block, num_warps=_warps(block),
    )


def norm_bwd(dy, dsum, h, w, mean, rstd, seed, dx, dres, dw_part, db_part, dropout_p: float, rms: bool,
             has_bias: bool) -> None:
    """Fill ``dx`` (grad of ``h``), ``dres`` and the ``(G, N)`` fp32 partials; ``G = dw_part.shape[0]``."""
    R, N = h.shape
    G = dw_part.shape[0]
    block = triton.next_power_of_2(N)
    has_res = dres is not None
    _norm_bwd[(G,)](
        dy, dsum if dsum is not None else dy, h, w if w is not None else h, mean, rstd,
        seed if seed is not None else mean, dx, dres if has_res else dx, dw_part, db_part,
        R, N, dropout_p,
        HAS_DSUM=dsum is not None, HAS_RES=has_res, HAS_W=w is not None, HAS_B=has_bias,
        DROPOUT=has_res and dropout_p > 0.0, RMS=rms, BLOCK=block, num_warps=_warps(block, backward=True),
    )
