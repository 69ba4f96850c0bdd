"""Row softmax with scale, broadcast mask and causal mask, forward and backward.

The launcher views the input as ``(A, B, C, N)`` (leading dims padded with 1s)
with the softmax over ``N``; one program handles one row ``(a, b, c)``. The
mask, when given, is a *view* broadcast to that shape (stride-0 dims), read
through its strides and never materialised. Causal masking is top-left over
the last two dims: column ``j`` of row ``c`` is kept when ``j <= c``.

Forward: ``y = softmax(x * scale + mask)`` in fp32. A row that fits one block
(``ONE_BLOCK``) lives in registers: one read, one write. A longer row uses the
online two-pass scheme: pass 1 streams the row keeping a running max and a
running sum rescaled whenever the max grows, pass 2 re-reads the row and
writes ``exp(s - m) / l``. Rows a mask hides entirely produce 0, not NaN; a row with NaN or
+inf, or of -inf inputs without a mask, is NaN, as ``F.softmax`` gives it.

Backward: ``dx = scale * y * (dy - sum(dy * y))``, the same one/two-pass split.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _masked_scores(x_row, m_row, cols, c, N, scale,
                   HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, CAUSAL: tl.constexpr,
                   stride_mn, BLOCK: tl.constexpr):
    """Load one block of a row as fp32 scores with scale and masks applied (-inf where masked)."""
    inb = cols < N
    s = tl.load(x_row + cols, mask=inb, other=0.0).to(tl.float32) * scale
    keep = inb
    if HAS_MASK:
        if MASK_IS_BOOL:
            mk = tl.load(m_row + cols * stride_mn, mask=inb, other=0)
            keep = keep & (mk != 0)
        else:
            s = s + tl.load(m_row + cols * stride_mn, mask=inb, other=0.0).to(tl.float32)
    if CAUSAL:
        keep = keep & (cols <= c)
    return tl.where(keep, s, float("-inf"))


@triton.jit
def _shift(m, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr):
    """The row max to subtract. With a mask, a fully masked row (max -inf) subtracts 0, so its
    weights are exp(-inf) = 0 and the row comes out 0 (the op's contract). Without one, a row of
    -inf inputs is torch's: -inf - (-inf) = NaN, a NaN row, as F.softmax gives."""
    if HAS_MASK or CAUSAL:
        return tl.where(m == float("-inf"), 0.0, m)
    return m


@triton.jit
def _inverse_sum(denom):
    """1 / denom; 1 for a dead row (denom 0: its weights are all 0 anyway); NaN when the sum is
    NaN. The row max skips NaN (tl.max on GPUs), so a NaN or +inf input leaves the other weights
    finite and only the sum says so: the whole row must then be NaN, as F.softmax's."""
    return tl.where(denom != denom, denom, 1.0 / tl.where(denom > 0, denom, 1.0))


@triton.jit
def _softmax_fwd(
    X, Y, MASK,
    stride_xa, stride_xb, stride_xc,
    stride_ya, stride_yb, stride_yc,
    stride_ma, stride_mb, stride_mc, stride_mn,
    B, C, N, scale,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, CAUSAL: tl.constexpr,
    ONE_BLOCK: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    a = row // (B * C)
    b = (row // C) % B
    c = row % C
    x_row = X + a * stride_xa + b * stride_xb + c * stride_xc
    y_row = Y + a * stride_ya + b * stride_yb + c * stride_yc
    m_row = MASK + a * stride_ma + b * stride_mb + c * stride_mc
    offs = tl.arange(0, BLOCK)
    if ONE_BLOCK:
        s = _masked_scores(x_row, m_row, offs, c, N, scale, HAS_MASK, MASK_IS_BOOL, CAUSAL, stride_mn, BLOCK)
        m = tl.max(s, 0)
        m_safe = _shift(m, HAS_MASK, CAUSAL)
        p = tl.exp(s - m_safe)
        denom = tl.sum(p, 0)
        tl.store(y_row + offs, (p * _inverse_sum(denom)).to(Y.dtype.element_ty), mask=offs < N)
    else:
        # Pass 1: running max and rescaled running sum, per lane, combined at the end.
        m_i = tl.full([BLOCK], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK], tl.float32)
        for start in range(0, N, BLOCK):
            cols = start + offs
            s = _masked_scores(x_row, m_row, cols, c, N, scale, HAS_MASK, MASK_IS_BOOL, CAUSAL, stride_mn, BLOCK)
            m_new = tl.maximum(m_i, s)
            # Per lane always: a lane may see only the padding past N (the row's own -inf rows are
            # decided below, by the combined max).
            m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp(m_i - m_new_safe) + tl.exp(s - m_new_safe)
            m_i = m_new
        m = tl.max(m_i, 0)
        m_safe = _shift(m, HAS_MASK, CAUSAL)
        denom = tl.sum(l_i * tl.exp(m_i - m_safe), 0)
        inv = _inverse_sum(denom)
        # Pass 2: normalise and write.
        for start in range(0, N, BLOCK):
            cols = start + offs
            s = _masked_scores(x_row, m_row, cols, c, N, scale, HAS_MASK, MASK_IS_BOOL, CAUSAL, stride_mn, BLOCK)
            tl.store(y_row + cols, (tl.exp(s - m_safe) * inv).to(Y.dtype.element_ty), mask=cols < N)


@triton.jit
def _softmax_bwd(
    DY, Y, DX,
    stride_dya, stride_dyb, stride_dyc,
    stride_ya, stride_yb, stride_yc,
    stride_dxa, stride_dxb, stride_dxc,
    B, C, N, scale,
    ONE_BLOCK: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    a = row // (B * C)
    b = (row // C) % B
    c = row % C
    dy_row = DY + a * stride_dya + b * stride_dyb + c * stride_dyc
    y_row = Y + a * stride_ya + b * stride_yb + c * stride_yc
    dx_row = DX + a * stride_dxa + b * stride_dxb + c * stride_dxc
    offs = tl.arange(0, BLOCK)
    if ONE_BLOCK:
        inb = offs < N
        dy = tl.load(dy_row + offs, mask=inb, other=0.0).to(tl.float32)
        y = tl.load(y_row + offs, mask=inb, other=0.0).to(tl.float32)
        dot = tl.sum(dy * y, 0)
        tl.store(dx_row + offs, (scale * y * (dy - dot)).to(DX.dtype.element_ty), mask=inb)
    else:
        acc = tl.zeros([BLOCK], tl.float32)
        for start in range(0, N, BLOCK):
            cols = start + offs
            inb = cols < N
            dy = tl.load(dy_row + cols, mask=inb, other=0.0).to(tl.float32)
            y = tl.load(y_row + cols, mask=inb, other=0.0).to(tl.float32)
            acc += dy * y
        dot = tl.sum(acc, 0)
        for start in range(0, N, BLOCK):
            cols = start + offs
            inb = cols < N
            dy = tl.load(dy_row + cols, mask=inb, other=0.0).to(tl.float32)
            y = tl.load(y_row + cols, mask=inb, other=0.0).to(tl.float32)
            tl.store(dx_row + cols, (scale * y * (dy - dot)).to(DX.dtype.element_ty), mask=inb)


def _launch_params(n: int, elem_bytes: int, max_block: int | None):
    """(BLOCK, ONE_BLOCK, num_warps): whole row in registers up to 64 KiB of fp32 per row."""
    cap = max_block if max_block is not None else 16384
    block = min(triton.next_power_of_2(max(n, 1)), cap)
    one = n <= block
    # ptxas -v (sm_90a): the two-pass loop at 16384 spills with 16 warps (float mask), not with 32.
    num_warps = 4 if block <= 2048 else (8 if block <= 8192 else (16 if one else 32))
    return block, one, num_warps


def softmax_fwd(x4, y4, mask4, scale: float, causal: bool, max_block: int | None = None) -> None:
    """Write ``softmax(x4 * scale + mask4)`` (over the last dim) into ``y4``.

    ``x4``/``y4``: ``(A, B, C, N)`` with unit stride on ``N``; ``mask4``: None or
    a bool/float view of the same shape (any strides, stride-0 broadcast dims).
    ``max_block`` caps the block (tests use it to exercise the two-pass path).
    """
    A, B, C, N = x4.shape
    block, one, warps = _launch_params(N, x4.element_size(), max_block)
    has_mask = mask4 is not None
    is_bool = has_mask and mask4.dtype == torch.bool
    # Bool masks are read as bytes (same layout; avoids int1 pointer quirks).
    m = (mask4.view(torch.uint8) if is_bool else mask4) if has_mask else x4
    ms = mask4.stride() if has_mask else (0, 0, 0, 0)
    _softmax_fwd[(A * B * C,)](
        x4, y4, m,
        *x4.stride()[:3], *y4.stride()[:3], *ms,
        B, C, N, scale,
        HAS_MASK=has_mask, MASK_IS_BOOL=is_bool,
        CAUSAL=causal, ONE_BLOCK=one, BLOCK=block, num_warps=warps,
    )


def softmax_bwd(dy4, y4, dx4, scale: float, max_block: int | None = None) -> None:
    """Write ``scale * y * (dy - sum(dy * y))`` into ``dx4``; all ``(A, B, C, N)``, unit stride on ``N``."""
    A, B, C, N = y4.shape
    block, one, warps = _launch_params(N, y4.element_size(), max_block)
    _softmax_bwd[(A * B * C,)](
        dy4, y4, dx4,
        *dy4.stride()[:3], *y4.stride()[:3], *dx4.stride()[:3],
        B, C, N, scale,
        ONE_BLOCK=one, BLOCK=block, num_warps=warps,
    )
