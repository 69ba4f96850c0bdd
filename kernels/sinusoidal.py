"""``x + PE`` with the sinusoidal encoding of "Attention Is All You Need", one elementwise kernel.

``PE[pos, 2i] = sin(pos * f_i)``, ``PE[pos, 2i + 1] = cos(pos * f_i)``,
``f_i = 10000^(-2i / D)`` (``inv_freq``, precomputed in float64 and rounded to
fp32 by the launcher). Rows ``(R, D)`` contiguous, row ``r`` at position
``r % L + offset``. The encoding is computed in registers (fp32), never stored,
so the op costs one read and one write of ``x`` at any length.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _add_sinusoidal(X, OUT, INV_FREQ, R, L, D, offset,
                    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (offs_r < R)[:, None] & (offs_d < D)[None, :]
    pos = ((offs_r % L) + offset).to(tl.float32)
    freq = tl.load(INV_FREQ + offs_d // 2, mask=offs_d < D, other=0.0)
    angle = pos[:, None] * freq[None, :]
    pe = tl.where((offs_d % 2 == 0)[None, :], tl.sin(angle), tl.cos(angle))
    ptrs = offs_r[:, None].to(tl.int64) * D + offs_d[None, :]
    x = tl.load(X + ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + ptrs, (x + pe).to(OUT.dtype.element_ty), mask=mask)


def add_sinusoidal(x, out, inv_freq, L: int, offset: int) -> None:
    """``out = x + PE`` for rows ``(R, D)`` contiguous (row ``r`` at position ``r % L + offset``)."""
    R, D = x.shape
    block_d = min(triton.next_power_of_2(D), 256)
    block_r = max(1, min(64, 4096 // block_d))
    grid = (triton.cdiv(R, block_r), triton.cdiv(D, block_d))
    _add_sinusoidal[grid](x, out, inv_freq, R, L, D, offset, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4)
