"""Positional encodings: sinusoidal (added to the input) and rotary (applied to q, k) as
modules, and ALiBi's head slopes (:func:`alibi_slopes`, a bias the attention kernels add).

None holds parameters or buffers: the encodings are computed inside the
kernels, so any length works and nothing lands in the ``state_dict``.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from .. import ops


class SinusoidalPositionalEncoding(nn.Module):
    """``SinusoidalPositionalEncoding(d_model, dropout=0.0, max_len=None)``: ``dropout(x + PE)``.

    ``forward(x, offset=0)``: ``x (..., L, d_model)`` (batch-first: the sequence is the
    second-to-last dim) → same shape; positions ``offset .. offset + L - 1``. ``max_len``,
    when set, bounds ``offset + L`` (a ValueError past it); None means unbounded.
    """

    def __init__(self, d_model: int, dropout: float = 0.0, max_len: Optional[int] = None):
        super().__init__()
        self.d_model = d_model
        self.max_len = max_len
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        """``dropout(x + PE[offset : offset + L])``, the encoding computed on the fly (nothing stored).

        ``PE[pos, 2i] = sin(pos / 10000^(2i/d_model))``, ``PE[pos, 2i+1] = cos(pos / 10000^(2i/d_model))``,
        in float32.

        Args:
            x: ``(..., L, d_model)``, floating point (the sequence is the second-to-last dim).
            offset: position of the first row, an int ``>= 0`` (e.g. the tokens already decoded).

        Returns:
            A new tensor shaped like ``x``, in ``x``'s dtype.

        Raises:
            ValueError: ``x`` has fewer than 2 dims, its last dim is not ``d_model``, ``offset + L``
                exceeds ``max_len``, or ``offset`` is not an int ``>= 0``.
            TypeError: ``x`` is not floating point.
        """
        if x.dim() < 2:  # (L, d_model) at least: a bare (d_model,) has no sequence dim
            raise ValueError(f"SinusoidalPositionalEncoding: x must be (..., L, d_model), got shape {tuple(x.shape)}")
        if x.shape[-1] != self.d_model:
            raise ValueError(f"SinusoidalPositionalEncoding: x's last dim {x.shape[-1]} != d_model {self.d_model}")
        if self.max_len is not None and offset + x.shape[-2] > self.max_len:
            raise ValueError(f"SinusoidalPositionalEncoding: positions up to {offset + x.shape[-2]} exceed max_len {self.max_len}")
        return self.dropout(ops.add_sinusoidal_positions(x, offset))

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, max_len={self.max_len}"


class RotaryEmbedding(nn.Module):
    """``RotaryEmbedding(head_dim, base=10000.0, interleaved=False)``: RoPE on q and k in one kernel.

    ``forward(q, k, positions=None)``: ``q (B, Hq, L, head_dim)``, ``k (B, Hk, L, head_dim)``,
    ``positions`` None (``0..L-1``), ``(L,)`` or ``(B, L)`` → ``(q_rot, k_rot)``.
    Rotate-half pairing (HF Llama) by default.
    """

    def __init__(self, head_dim: int, base: float = 10000.0, interleaved: bool = False):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RotaryEmbedding: head_dim must be even, got {head_dim}")
        self.head_dim = head_dim
        self.base = base
        self.interleaved = interleaved

    def forward(self, q: Tensor, k: Tensor, positions: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Rotate ``q`` and ``k`` by their positions (RoPE) with :func:`fastformer.ops.apply_rotary`.

        Pairs dims ``(i, i + head_dim/2)`` (rotate-half, HF Llama), or ``(2i, 2i+1)`` with
        ``interleaved=True``; the angle of pair ``i`` is ``pos * base^(-2i/head_dim)``.

        Args:
            q: ``(B, Hq, L, head_dim)``, floating point.
            k: ``(B, Hk, L, head_dim)``, with ``q``'s ``B``, ``L``, dtype and device.
            positions: ``None`` (``0 .. L-1``), or integer/float ``(L,)`` or ``(B, L)``.

        Returns:
            ``(q_rot, k_rot)``: new tensors shaped like ``q`` and ``k``.

        Raises:
            ValueError: ``q``'s last dim is not ``head_dim``, or shapes / ``positions`` that
                :func:`fastformer.ops.apply_rotary` rejects (``TypeError`` for dtype/device mismatches).
        """
        if q.shape[-1] != self.head_dim:
            raise ValueError(f"RotaryEmbedding: q's head dim {q.shape[-1]} != head_dim {self.head_dim}")
        return ops.apply_rotary(q, k, positions, self.base, self.interleaved)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base}, interleaved={self.interleaved}"


def alibi_slopes(num_heads: int, device=None) -> Tensor:
    """ALiBi's per-head slopes (Press et al. 2022, as BLOOM and MPT compute them).

    For ``n`` a power of two: the geometric sequence ``2^(-8h/n)``, ``h = 1..n``. Otherwise
    the ``p`` slopes of the largest power of two ``p < n``, followed by the odd-numbered
    slopes ``2^(-8h/2p)`` (``h = 1, 3, 5, ...``) of ``2p`` heads until there are ``n``.

    Returns float32 ``(num_heads,)`` on ``device`` (the dtype the attention ops require of
    ``alibi_slopes``), for ``-slope * |i - j|`` added to head ``h``'s scores.

    Raises:
        ValueError: ``num_heads < 1``.
    """
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"alibi_slopes: num_heads must be a positive int, got {num_heads!r}")

    def powers(n: int) -> List[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (h + 1) for h in range(n)]

    low = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = powers(low)
    if low < num_heads:
        slopes += powers(2 * low)[0::2][: num_heads - low]
    return torch.tensor(slopes, dtype=torch.float32, device=device)
