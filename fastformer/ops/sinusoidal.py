"""``x + PE`` with the sinusoidal positional encoding: ``fastformer.ops.add_sinusoidal_positions``.

Triton path: the ``fastformer::add_sinusoidal`` custom op (the gradient is the
identity). Torch path: the encoding built in fp32 and added.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .buffers import new_output
from .kernel_backend import resolve_backend


def sinusoidal_inv_freq(d_model: int, device) -> Tensor:
    """``f`` with ``f[c] = 10000^(-2·(c//2)/D)`` for ``c < D`` halved: ``(ceil(D/2),)`` fp32 from float64."""
    i = torch.arange(0, (d_model + 1) // 2, dtype=torch.float64, device=device)
    return torch.exp(i * (-2.0 * math.log(10000.0) / d_model)).to(torch.float32)


def sinusoidal_table(length: int, d_model: int, offset: int = 0, device=None, dtype=torch.float32) -> Tensor:
    """The encoding ``(length, d_model)`` itself (positions ``offset .. offset + length - 1``)."""
    pos = torch.arange(offset, offset + length, dtype=torch.float32, device=device)[:, None]
    angle = pos * sinusoidal_inv_freq(d_model, device).repeat_interleave(2)[:d_model]
    even = (torch.arange(d_model, device=device) % 2 == 0)
    return torch.where(even, angle.sin(), angle.cos()).to(dtype)


@torch.library.custom_op("fastformer::add_sinusoidal", mutates_args=())
def _add_sinusoidal_op(x: Tensor, inv_freq: Tensor, length: int, offset: int) -> Tensor:
    """``x (R, D)`` contiguous, row ``r`` at position ``r % length + offset`` → ``x + PE``."""
    from fastformer.kernels.sinusoidal import add_sinusoidal

    out = new_output(x.shape, x.dtype, x.device)
    if x.numel():
        add_sinusoidal(x, out, inv_freq, length, offset)
    return out


@_add_sinusoidal_op.register_fake
def _(x, inv_freq, length, offset):
    return torch.empty_like(x)


def _backward(ctx, dy):
    return dy, None, None, None


torch.library.register_autograd("fastformer::add_sinusoidal", _backward)


def add_sinusoidal_positions(x: Tensor, offset: int = 0, *, backend: str = "auto") -> Tensor:
    """``x + PE[offset : offset + L]`` for ``x (..., L, D)`` (any ``L``; odd ``D`` allowed).

    ``PE[pos, 2i] = sin(pos / 10000^(2i/D))``, ``PE[pos, 2i+1] = cos(pos / 10000^(2i/D))``,
    computed in fp32 inside the kernel (no table in memory). Returns a new tensor shaped like ``x``.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"add_sinusoidal_positions: x must be a Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"add_sinusoidal_positions: x must be (..., L, D), got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"add_sinusoidal_positions: x must be floating point, got {x.dtype}")
    if not isinstance(offset, int) or offset < 0:
        raise ValueError(f"add_sinusoidal_positions: offset must be a non-negative int, got {offset!r}")
    L, D = x.shape[-2], x.shape[-1]
    chosen = resolve_backend(backend, x.device, "add_sinusoidal_positions", dtype=x.dtype)
    if chosen == "torch":
        return (x.float() + sinusoidal_table(L, D, offset, x.device)).to(x.dtype)
    out = _add_sinusoidal_op(x.reshape(-1, D).contiguous(), sinusoidal_inv_freq(D, x.device), L, offset)
    return out.view(x.shape)
