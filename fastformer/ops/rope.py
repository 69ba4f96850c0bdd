"""Rotary position embedding of q and k: ``fastformer.ops.apply_rotary``.

Triton path: the ``fastformer::rotary`` custom op (fake impl + autograd; the
backward is the same op with the inverse rotation). Torch path: the HF Llama
formula ``x * cos + rotate_half(x) * sin`` with cos/sin in fp32.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .buffers import new_output
from .kernel_backend import resolve_backend


def rotary_inv_freq(head_dim: int, base: float, device) -> Tensor:
    """``base^(-2i/head_dim)`` for ``i < head_dim/2``, computed in float64, returned fp32."""
    i = torch.arange(0, head_dim // 2, dtype=torch.float64, device=device)
    return (base ** (-2.0 * i / head_dim)).to(torch.float32)


@torch.library.custom_op("fastformer::rotary", mutates_args=())
def _rotary_op(q: Tensor, k: Tensor, positions: Tensor, inv_freq: Tensor, interleaved: bool,
               inverse: bool) -> Tuple[Tensor, Tensor]:
    """``q (B, Hq, L, D)``, ``k (B, Hk, L, D)``, ``positions (1 or B, L)`` fp32 → rotated q, k."""
    from fastformer.kernels.rope import rope

    q_out = new_output(q.shape, q.dtype, q.device)
    k_out = new_output(k.shape, k.dtype, k.device)
    if q.numel() or k.numel():
        rope(q, k, q_out, k_out, positions, inv_freq, interleaved, inverse)
    return q_out, k_out


@_rotary_op.register_fake
def _(q, k, positions, inv_freq, interleaved, inverse):
    return torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(k, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    q, k, positions, inv_freq, interleaved, inverse = inputs
    ctx.q_shape, ctx.k_shape, ctx.dtype = q.shape, k.shape, q.dtype
    ctx.interleaved, ctx.inverse = interleaved, inverse
    ctx.save_for_backward(positions, inv_freq)


def _backward(ctx, dq, dk):
    positions, inv_freq = ctx.saved_tensors
    # Only one of q_rot / k_rot may have been used downstream.
    dq = dq if dq is not None else torch.zeros(ctx.q_shape, dtype=ctx.dtype, device=positions.device)
    dk = dk if dk is not None else torch.zeros(ctx.k_shape, dtype=ctx.dtype, device=positions.device)
    dq_in, dk_in = _rotary_op(dq, dk, positions, inv_freq, ctx.interleaved, not ctx.inverse)
    return dq_in, dk_in, None, None, None, None


torch.library.register_autograd("fastformer::rotary", _backward, setup_context=_setup_context)


def _rotary_torch(x: Tensor, positions: Tensor, inv_freq: Tensor, interleaved: bool) -> Tensor:
    angle = positions[:, None, :, None] * inv_freq  # (Bp, 1, L, D/2), fp32
    cos, sin = angle.cos(), angle.sin()
    xf = x.float()
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        half = x.shape[-1] // 2
        x1, x2 = xf[..., :half], xf[..., half:]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


def apply_rotary(q: Tensor, k: Tensor, positions: Optional[Tensor] = None, base: float = 10000.0,
                 interleaved: bool = False, *, backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """Rotate ``q`` and ``k`` by their positions (RoPE), both in one kernel.

    Args:
        q: ``(B, Hq, L, D)``; k: ``(B, Hk, L, D)``; ``D`` even; same dtype and device.
        positions: None (``0..L-1``) or integer/float ``(L,)`` or ``(B, L)``.
        base: the frequency base (``theta_i = pos * base^(-2i/D)``).
        interleaved: pair dims ``(2i, 2i+1)`` (GPT-J) instead of ``(i, i + D/2)`` (HF Llama rotate-half).
        backend: ``"auto"`` (torch until the kernel is measured on a GPU: ``ops.kernel_backend``), ``"triton"`` or ``"torch"``.

    Returns:
        ``(q_rot, k_rot)`` shaped like the inputs (new tensors).
    """
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, Tensor):
            raise TypeError(f"apply_rotary: {name} must be a Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"apply_rotary: {name} must be 4-D (B, H, L, D), got shape {tuple(t.shape)}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"apply_rotary: {name} must be floating point, got {t.dtype}")
    B, _, L, D = q.shape
    if k.shape[0] != B or k.shape[2] != L or k.shape[3] != D:
        raise ValueError(f"apply_rotary: k {tuple(k.shape)} must match q {tuple(q.shape)} in B, L and D")
    if k.dtype != q.dtype or k.device != q.device:
        raise TypeError(f"apply_rotary: q and k must share dtype and device, got {q.dtype}/{q.device} and {k.dtype}/{k.device}")
    if D % 2:
        raise ValueError(f"apply_rotary: head dim must be even, got {D}")
    if positions is None:
        pos = torch.arange(L, device=q.device, dtype=torch.float32)[None]
    else:
        if not isinstance(positions, Tensor):
            raise TypeError(f"apply_rotary: positions must be a Tensor or None, got {type(positions).__name__}")
        pos = positions.to(device=q.device, dtype=torch.float32)
        if pos.dim() == 1:
            pos = pos[None]
        if pos.dim() != 2 or pos.shape[1] != L or pos.shape[0] not in (1, B):
            raise ValueError(f"apply_rotary: positions must be (L,) or (B, L) = ({L},) or ({B}, {L}), got {tuple(positions.shape)}")
    inv_freq = rotary_inv_freq(D, base, q.device)
    chosen = resolve_backend(backend, q.device, "apply_rotary", dtype=q.dtype)
    if chosen == "torch":
        return _rotary_torch(q, pos, inv_freq, interleaved), _rotary_torch(k, pos, inv_freq, interleaved)
    return _rotary_op(q, k, pos.contiguous(), inv_freq, bool(interleaved), False)
