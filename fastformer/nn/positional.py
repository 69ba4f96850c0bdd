"""Positional encodings as modules: sinusoidal (added to the input) and rotary (applied to q, k).

Neither holds parameters or buffers: the encodings are computed inside the
kernels, so any length works and nothing lands in the ``state_dict``.
"""

from __future__ import annotations

from typing import Optional, Tuple

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
        if q.shape[-1] != self.head_dim:
            raise ValueError(f"RotaryEmbedding: q's head dim {q.shape[-1]} != head_dim {self.head_dim}")
        return ops.apply_rotary(q, k, positions, self.base, self.interleaved)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base}, interleaved={self.interleaved}"
