"""Fused scaled, masked, causal softmax: ``fastformer.softmax``.

Backends: ``"triton"`` (kernels/softmax.py, the ``fastformer::softmax_fwd`` /
``softmax_bwd`` custom ops with fake impls and autograd), ``"torch"`` (plain
torch ops, any device), ``"cuda"`` (the C++/CUDA twin in
``fastformer.ops.softmax_cuda``, imported lazily) and ``"auto"`` (Triton on CUDA
tensors where it measured faster than torch, torch elsewhere: ``ops.kernel_backend``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .buffers import new_output
from .errors import DtypeError
from .kernel_backend import resolve_backend

SOFTMAX_BACKENDS = ("auto", "triton", "torch", "cuda")


# ----------------------------------------------------------------------------- custom ops (Triton)

@torch.library.custom_op("fastformer::softmax_fwd", mutates_args=())
def _softmax_fwd_op(x: Tensor, mask: Optional[Tensor], scale: float, is_causal: bool, max_block: int) -> Tensor:
    """``x``: ``(A, B, C, N)`` unit stride on N; ``mask``: None or a view of the same shape. Returns y."""
    from fastformer.kernels.softmax import softmax_fwd

    y = new_output(x.shape, x.dtype, x.device)
    softmax_fwd(x, y, mask, scale, is_causal, max_block or None)
    return y


@_softmax_fwd_op.register_fake
def _(x, mask, scale, is_causal, max_block):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("fastformer::softmax_bwd", mutates_args=())
def _softmax_bwd_op(dy: Tensor, y: Tensor, scale: float, max_block: int) -> Tensor:
    """``dx = scale * y * (dy - sum(dy * y))`` over the last dim of ``(A, B, C, N)`` tensors."""
    from fastformer.kernels.softmax import softmax_bwd

    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    dx = new_output(y.shape, y.dtype, y.device)
    softmax_bwd(dy, y, dx, scale, max_block or None)
    return dx


@_softmax_bwd_op.register_fake
def _(dy, y, scale, max_block):
    return torch.empty_like(y, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    _, _, scale, _, max_block = inputs
    ctx.scale, ctx.max_block = scale, max_block
    ctx.save_for_backward(output)


def _backward(ctx, dy):
    (y,) = ctx.saved_tensors
    return _softmax_bwd_op(dy, y, ctx.scale, ctx.max_block), None, None, None, None


torch.library.register_autograd("fastformer::softmax_fwd", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- CUDA twin

class _SoftmaxCuda(torch.autograd.Function):
    """Autograd around ``fastformer.ops.softmax_cuda`` (4-D contiguous x, mask view of the same shape)."""

    @staticmethod
    def forward(ctx, x4, mask4, scale, is_causal):
        from . import softmax_cuda

        y = softmax_cuda.softmax_cuda_forward(x4, mask4, scale, is_causal)
        ctx.scale = scale
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, dy):
        from . import softmax_cuda

        (y,) = ctx.saved_tensors
        return softmax_cuda.softmax_cuda_backward(dy.contiguous(), y, ctx.scale), None, None, None


def _cuda_twin_unavailable() -> Optional[str]:
    try:
        from . import softmax_cuda
    except Exception as exc:  # not built yet, no CUDA torch, or the module is missing
        return f"fastformer.ops.softmax_cuda is not importable ({exc})"
    for name in ("softmax_cuda_forward", "softmax_cuda_backward"):
        if not hasattr(softmax_cuda, name):
            return f"fastformer.ops.softmax_cuda has no {name}"
    return None


# ----------------------------------------------------------------------------- torch path

def _softmax_torch(x: Tensor, dim: int, scale: float, mask: Optional[Tensor], is_causal: bool) -> Tensor:
    s = x * scale if scale != 1.0 else x
    keep = None
    if mask is not None:
        if mask.dtype == torch.bool:
            keep = mask
        else:
            s = s + mask.to(s.dtype)
    if is_causal:
        L, N = x.shape[-2], x.shape[-1]
        tri = torch.ones(L, N, dtype=torch.bool, device=x.device).tril()
        keep = tri if keep is None else keep & tri
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    # fp32 math for half inputs (as the kernels), then one rounding.
    y = torch.softmax(s, dim, dtype=torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else None)
    if keep is None and mask is None:
        return y.to(x.dtype)  # nothing masked: no dead rows to fix, skip the extra passes
    # Fully masked rows give NaN in torch.softmax; the contract says 0.
    dead = s.amax(dim, keepdim=True) == float("-inf")
    return torch.where(dead, torch.zeros((), dtype=y.dtype, device=y.device), y).to(x.dtype)


# ----------------------------------------------------------------------------- public API

def _to_4d(t: Tensor) -> Tensor:
    """``(..., C, N)`` → ``(A, B, C, N)`` as a view when possible."""
    if t.dim() <= 4:
        return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))
    return t.reshape(-1, t.shape[-3], t.shape[-2], t.shape[-1])


def _check(x: Tensor, dim: int, mask: Optional[Tensor], is_causal: bool) -> Tuple[int, Optional[Tensor]]:
    if not isinstance(x, Tensor):
        raise TypeError(f"softmax: x must be a Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise DtypeError(f"softmax: x must be floating point, got {x.dtype}")  # torch: a RuntimeError
    if x.dim() == 0:
        raise ValueError("softmax: x must have at least one dimension")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"softmax: dim {dim} out of range for x with {x.dim()} dims")
    dim = dim % x.dim()
    if is_causal and (x.dim() < 2 or dim != x.dim() - 1):
        raise ValueError("softmax: is_causal needs x with >= 2 dims and dim=-1 (causal over the last two dims)")
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise TypeError(f"softmax: mask must be a Tensor or None, got {type(mask).__name__}")
        if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
            raise TypeError(f"softmax: mask must be bool (True = keep) or floating point (added), got {mask.dtype}")
        if mask.device != x.device:
            raise ValueError(f"softmax: mask is on {mask.device} but x is on {x.device}")
        try:
            mask = mask.expand(x.shape)
        except RuntimeError:
            raise ValueError(f"softmax: mask of shape {tuple(mask.shape)} does not broadcast to x {tuple(x.shape)}") from None
    return dim, mask


def softmax(
    x: Tensor,
    dim: int = -1,
    *,
    scale: float = 1.0,
    mask: Optional[Tensor] = None,
    is_causal: bool = False,
    backend: str = "auto",
    _max_block: int = 0,
) -> Tensor:
    """``softmax(x * scale + mask, dim)``, fused; forward and backward.

    Args:
        x: any shape ``(..., N)``; fp16, bf16 or fp32. Math is fp32 inside.
        dim: the softmax dimension.
        scale: multiplies ``x`` before the mask is applied.
        mask: broadcastable to ``x``; bool (True = keep) or float (added after scaling).
            No gradient flows to a float mask.
        is_causal: top-left causal mask over the last two dims (column ``j`` of row
            ``i`` kept when ``j <= i``); needs ``dim=-1``.
        backend: ``"auto"`` (Triton on CUDA tensors with rows of 4096 or more, where it
            measured faster than torch; torch elsewhere), ``"triton"``,
            ``"torch"`` or ``"cuda"`` (the C++/CUDA twin; RuntimeError when not built).

    Returns:
        a tensor shaped and typed like ``x``. Rows with every column masked are 0.
    """
    dim, mask = _check(x, dim, mask, is_causal)
    chosen = resolve_backend(backend, x.device, "softmax", SOFTMAX_BACKENDS, dtype=x.dtype,
                             row=x.shape[dim] if x.dim() else 1)
    if chosen == "torch" or x.numel() == 0:
        return _softmax_torch(x, dim, scale, mask, is_causal)

    last = x.dim() - 1
    xt = x.movedim(dim, -1) if dim != last else x
    mt = mask.movedim(dim, -1) if (mask is not None and dim != last) else mask
    shape = xt.shape
    if xt.stride(-1) != 1:
        xt = xt.contiguous()
    x4 = _to_4d(xt)
    m4 = _to_4d(mt) if mt is not None else None

    if chosen == "cuda":
        reason = _cuda_twin_unavailable()
        if reason is not None:
            raise RuntimeError(f"softmax: backend='cuda' unavailable: {reason}")
        if x.device.type != "cuda":
            raise RuntimeError(f"softmax: backend='cuda' needs CUDA tensors, got {x.device}")
        y4 = _SoftmaxCuda.apply(x4.contiguous(), m4, float(scale), bool(is_causal))
    else:
        y4 = _softmax_fwd_op(x4, m4, float(scale), bool(is_causal), int(_max_block))
    y = y4.reshape(shape)
    return y.movedim(-1, dim) if dim != last else y
