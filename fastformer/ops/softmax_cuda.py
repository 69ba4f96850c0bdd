"""The CUDA twin of ``fastformer.softmax``: fused scaled, masked, causal softmax
(csrc/cuda/softmax.cu), called by ``fastformer.ops.softmax`` for ``backend="cuda"``.

Contract (what the softmax dispatcher calls):

``softmax_cuda_forward(x4, mask4, scale, is_causal) -> y4``
    ``x4``: ``(A, B, C, N)`` CUDA tensor, float16/bfloat16/float32, contiguous;
    softmax over N of ``x4 * scale + mask``. ``mask4``: None, or a bool
    (True = keep) or floating tensor *viewed* at x4's shape (stride 0 along
    broadcast dims is read as is, never materialised); a float mask of another
    dtype than x is converted first. ``is_causal``: column ``j`` of row ``i``
    (index along C) is kept only when ``j <= i`` (top-left, like torch).
    Returns ``y4``, contiguous, x4's shape and dtype; rows with every column
    masked are 0.

``softmax_cuda_backward(dy4, y4, scale) -> dx4``
    ``dx = scale * y * (dy - sum(dy * y))`` over N; all three ``(A, B, C, N)``.

Other dtypes (float64) compute with torch ops instead, so every valid input works.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._ext import C
from .buffers import new_output
from .cuda_device import cuda_extension_unavailable, launch_context

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_available(x: Tensor) -> None:
    reason = cuda_extension_unavailable()
    if reason is not None:
        raise RuntimeError(f"softmax_cuda: {reason}")
    if x.device.type != "cuda":
        raise RuntimeError(f"softmax_cuda: x must be a CUDA tensor, got device {x.device}")


def _torch_softmax(x4: Tensor, mask4: Optional[Tensor], scale: float, is_causal: bool) -> Tensor:
    s = x4 * scale
    if mask4 is not None:
        s = s.masked_fill(~mask4, float("-inf")) if mask4.dtype == torch.bool else s + mask4.to(s.dtype)
    if is_causal:
        C_, N = x4.shape[-2], x4.shape[-1]
        keep = torch.ones(C_, N, dtype=torch.bool, device=x4.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    y = torch.softmax(s, dim=-1)
    return torch.nan_to_num(y, nan=0.0)  # rows with every column masked are 0


def softmax_cuda_forward(x4: Tensor, mask4: Optional[Tensor], scale: float, is_causal: bool) -> Tensor:
    """``softmax(x4 * scale + mask4)`` over the last dim with an optional top-left causal mask."""
    _check_available(x4)
    if x4.dim() != 4:
        raise ValueError(f"softmax_cuda_forward: x4 must be 4-D (A, B, C, N), got shape {tuple(x4.shape)}")
    if mask4 is not None and tuple(mask4.shape) != tuple(x4.shape):
        raise ValueError(
            f"softmax_cuda_forward: mask4 must be viewed at x4's shape {tuple(x4.shape)}, got {tuple(mask4.shape)}"
        )
    if x4.dtype not in KERNEL_DTYPES:
        return _torch_softmax(x4, mask4, scale, is_causal)
    x4 = x4.contiguous()
    if mask4 is not None and mask4.dtype != torch.bool and mask4.dtype != x4.dtype:
        mask4 = mask4.to(x4.dtype)
    A, B, C_, N = x4.shape
    y4 = new_output(x4.shape, x4.dtype, x4.device)
    if x4.numel() == 0:
        return y4
    stream, _, smem = launch_context(x4.device)
    with torch.cuda.device(x4.device):
        C.softmax_fwd(x4.view(A * B * C_, N), mask4, y4.view(A * B * C_, N), float(scale), bool(is_causal),
                      C_, 0, stream, smem)
    return y4


def softmax_cuda_backward(dy4: Tensor, y4: Tensor, scale: float) -> Tensor:
    """Gradient of :func:`softmax_cuda_forward` with respect to x4, from its output ``y4``."""
    _check_available(y4)
    if dy4.shape != y4.shape:
        raise ValueError(f"softmax_cuda_backward: dy4 {tuple(dy4.shape)} must match y4 {tuple(y4.shape)}")
    if y4.dtype not in KERNEL_DTYPES:
        return scale * y4 * (dy4 - (dy4 * y4).sum(-1, keepdim=True))
    y4, dy4 = y4.contiguous(), dy4.to(y4.dtype).contiguous()
    dx4 = new_output(y4.shape, y4.dtype, y4.device)
    if y4.numel() == 0:
        return dx4
    N = y4.shape[-1]
    stream, _, smem = launch_context(y4.device)
    with torch.cuda.device(y4.device):
        C.softmax_bwd(y4.view(-1, N), dy4.view(-1, N), dx4.view(-1, N), float(scale), stream, smem)
    return dx4
