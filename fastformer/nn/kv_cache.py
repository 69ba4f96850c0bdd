"""A preallocated key/value cache for autoregressive decoding, updated in place.

One buffer per tensor for all layers, ``k (layers, B, Hkv, max_len, D)``, so a
decoding step never allocates: each layer writes its new keys/values at
``[length, length + T)`` and attends over the first ``length + T`` entries
with :func:`fastformer.decode_attention` (through :class:`fastformer.nn.Attention`), which reads only those. After every
layer has written, :meth:`KVCache.advance` moves the shared length on.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


class KVCache:
    """Keys and values of the tokens seen so far, for every layer of a decoder.

    Args:
        num_layers, batch, heads, max_len, head_dim: buffer shape; ``max_len`` is
            the most tokens (prompt + generated) it can hold.
        head_dim_v: value head dim (default ``head_dim``).
        dtype, device: of the buffers (the model's).
    """

    def __init__(self, num_layers: int, batch: int, heads: int, max_len: int, head_dim: int,
                 head_dim_v: Optional[int] = None, dtype: torch.dtype = torch.float32, device=None):
        if min(num_layers, batch, heads, max_len, head_dim) < 1:
            raise ValueError(f"KVCache sizes must be positive, got layers={num_layers}, batch={batch}, "
                             f"heads={heads}, max_len={max_len}, head_dim={head_dim}")
        dv = head_dim if head_dim_v is None else head_dim_v
        self.k = torch.zeros(num_layers, batch, heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(num_layers, batch, heads, max_len, dv, dtype=dtype, device=device)
        self.length = 0  # tokens held, the same for every sequence of the batch

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def write(self, layer: int, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
        """Store ``k (B, Hkv, T, D)`` / ``v`` at positions ``[length, length + T)`` of
        ``layer``; returns that layer's whole buffers ``(B, Hkv, max_len, D)``
        (valid up to ``length + T``)."""
        T = k.shape[2]
        if self.length + T > self.max_len:
            raise RuntimeError(f"KVCache is full: {self.length} + {T} tokens > max_len {self.max_len}")
        self.k[layer, :, :, self.length:self.length + T] = k
        self.v[layer, :, :, self.length:self.length + T] = v
        return self.k[layer], self.v[layer]

    def advance(self, n: int) -> None:
        """Count ``n`` more tokens as held (call once per step, after every layer wrote)."""
        self.length += n

    def reorder(self, index: Tensor) -> None:
        """Keep sequence ``index[i]`` in row ``i`` (beam search), in place."""
        self.k.copy_(self.k.index_select(1, index))
        self.v.copy_(self.v.index_select(1, index))

    def reset(self) -> None:
        self.length = 0
