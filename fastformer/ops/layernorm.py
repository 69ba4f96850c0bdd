"""LayerNorm and RMSNorm with a fused residual add and dropout.

``layer_norm(x, shape, w, b, eps, residual=r, dropout_p=p)`` computes
``LN(x + dropout(r))`` in one kernel (kernels/layernorm.py) and, with
``return_residual=True``, also returns the sum ``x + dropout(r)`` for the next
residual connection. ``rms_norm`` is the same with RMS normalisation.

The Triton path is the ``fastformer::norm_fwd`` / ``norm_bwd`` custom op pair
(fake impls + autograd); CPU tensors outside the interpreter, rows wider than
``MAX_FUSED_N`` and ``backend="torch"`` use plain torch ops.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .buffers import new_output
from .errors import DtypeError, InputError
from .kernel_backend import resolve_backend

_ShapeArg = Union[int, Sequence[int], torch.Size]


# ----------------------------------------------------------------------------- custom ops

@torch.library.custom_op("fastformer::norm_fwd", mutates_args=())
def _norm_fwd_op(
    x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor], seed: Optional[Tensor],
    eps: float, dropout_p: float, rms: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Rows ``(R, N)`` contiguous → ``y (R, N)``, ``h (R, N)`` (the sum; empty without residual), fp32 ``mean``, ``rstd`` ``(R,)``."""
    from fastformer.kernels.layernorm import norm_fwd

    R, N = x.shape
    y = new_output((R, N), x.dtype, x.device)
    h = new_output((R, N) if residual is not None else (0,), x.dtype, x.device)
    mean = new_output((R,), torch.float32, x.device)
    rstd = new_output((R,), torch.float32, x.device)
    if R > 0:
        norm_fwd(x, residual, weight, bias, y, h if residual is not None else None, mean, rstd, seed,
                 eps, dropout_p, rms)
    return y, h, mean, rstd


@_norm_fwd_op.register_fake
def _(x, residual, weight, bias, seed, eps, dropout_p, rms):
    R, N = x.shape
    h = x.new_empty((R, N) if residual is not None else (0,))
    return x.new_empty((R, N)), h, x.new_empty((R,), dtype=torch.float32), x.new_empty((R,), dtype=torch.float32)


def _num_partials(R: int, device: torch.device) -> int:
    """Programs in the backward: enough to fill the GPU, few enough that the partials stay small."""
    if device.type == "cuda":
        return max(1, min(R, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(R, 4))


@torch.library.custom_op("fastformer::norm_bwd", mutates_args=())
def _norm_bwd_op(
    dy: Tensor, dsum: Optional[Tensor], h: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor,
    seed: Optional[Tensor], has_residual: bool, has_bias: bool, dropout_p: float, rms: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """→ ``dx (R, N)``, ``dresidual`` (empty without residual), ``dweight``, ``dbias`` (``(N,)``, empty when absent)."""
    from fastformer.kernels.layernorm import norm_bwd

    R, N = h.shape
    dy = dy.contiguous()
    dsum = dsum.contiguous() if dsum is not None else None
    dx = new_output((R, N), h.dtype, h.device)
    dres = new_output((R, N), h.dtype, h.device) if has_residual else None
    G = _num_partials(R, h.device)
    dw_part = new_output((G, N) if weight is not None else (1, 1), torch.float32, h.device)
    db_part = new_output((G, N) if has_bias else (1, 1), torch.float32, h.device)
    if R > 0:
        norm_bwd(dy, dsum, h, weight, mean, rstd, seed, dx, dres, dw_part, db_part, dropout_p, rms, has_bias)
    # Second stage of the weight/bias reduction: (G, N) partials → (N,).
    if R > 0:
        dw = dw_part.sum(0).to(weight.dtype) if weight is not None else h.new_empty((0,))
        db = db_part.sum(0).to(weight.dtype if weight is not None else h.dtype) if has_bias else h.new_empty((0,))
    else:
        dw = torch.zeros(N, dtype=weight.dtype, device=h.device) if weight is not None else h.new_empty((0,))
        db = torch.zeros(N, dtype=h.dtype, device=h.device) if has_bias else h.new_empty((0,))
    return dx, (dres if dres is not None else h.new_empty((0,))), dw, db


@_norm_bwd_op.register_fake
def _(dy, dsum, h, weight, mean, rstd, seed, has_residual, has_bias, dropout_p, rms):
    R, N = h.shape
    dw = h.new_empty((N,), dtype=weight.dtype) if weight is not None else h.new_empty((0,))
    db = h.new_empty((N,), dtype=weight.dtype if weight is not None else h.dtype) if has_bias else h.new_empty((0,))
    return h.new_empty((R, N)), h.new_empty((R, N) if has_residual else (0,)), dw, db


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, seed, eps, dropout_p, rms = inputs
    _, h, mean, rstd = output
    ctx.has_residual = residual is not None
    ctx.has_weight = weight is not None
    ctx.has_bias = bias is not None
    ctx.dropout_p, ctx.rms = dropout_p, rms
    ctx.save_for_backward(h if residual is not None else x, weight, mean, rstd, seed)


def _backward(ctx, dy, dsum, _dmean, _drstd):
    h, weight, mean, rstd, seed = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(h)
    dsum = dsum if (ctx.has_residual and dsum is not None) else None
    dx, dres, dw, db = _norm_bwd_op(dy, dsum, h, weight, mean, rstd, seed, ctx.has_residual, ctx.has_bias,
                                    ctx.dropout_p, ctx.rms)
    return (dx, dres if ctx.has_residual else None, dw if ctx.has_weight else None,
            db if ctx.has_bias else None, None, None, None, None)


torch.library.register_autograd("fastformer::norm_fwd", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public API

def _normalized_shape(normalized_shape: _ShapeArg) -> Tuple[int, ...]:
    if isinstance(normalized_shape, int):
        return (normalized_shape,)
    return tuple(int(s) for s in normalized_shape)


def _check(op: str, x: Tensor, shape: Tuple[int, ...], weight, bias, residual, dropout_p: float) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: x must be a Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise DtypeError(f"{op}: x must be floating point, got {x.dtype}")
    if len(shape) == 0 or tuple(x.shape[x.dim() - len(shape):]) != shape or x.dim() < len(shape):
        raise InputError(f"{op}: normalized_shape {shape} does not match the trailing dims of x {tuple(x.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != shape:
            raise InputError(f"{op}: {name} must have shape {shape}, got {tuple(t.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise InputError(f"{op}: residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    if not 0.0 <= dropout_p < 1.0:
        raise InputError(f"{op}: dropout_p must be in [0, 1), got {dropout_p}")


def _norm(op: str, rms: bool, x: Tensor, normalized_shape: _ShapeArg, weight: Optional[Tensor],
          bias: Optional[Tensor], eps: float, residual: Optional[Tensor], dropout_p: float,
          return_residual: bool, backend: str):
    shape = _normalized_shape(normalized_shape)
    _check(op, x, shape, weight, bias, residual, dropout_p)
    N = 1
    for s in shape:
        N *= s
    chosen = resolve_backend(backend, x.device, op, dtype=x.dtype)
    if chosen == "triton":
        # Imported only on the Triton path: without Triton installed the torch path must run.
        from fastformer.kernels.layernorm import MAX_FUSED_N

        if N > MAX_FUSED_N:  # rows longer than the fused kernel's block: torch's own norm
            chosen = "torch"
    mixed = any(t is not None and t.dtype != x.dtype for t in (residual,))
    if chosen == "torch" or mixed:
        total = x
        if residual is not None:
            total = x + (F.dropout(residual, dropout_p, training=True) if dropout_p > 0 else residual)
        if rms:
            y = F.rms_norm(total, shape, weight, eps)
        else:
            y = F.layer_norm(total, shape, weight, bias, eps)
        return (y, total) if return_residual else y

    x2 = x.reshape(-1, N).contiguous()
    r2 = residual.reshape(-1, N).contiguous() if residual is not None else None
    w1 = weight.reshape(N).contiguous() if weight is not None else None
    b1 = bias.reshape(N).contiguous() if bias is not None else None
    seed = None
    if residual is not None and dropout_p > 0.0:
        seed = torch.randint(0, 2**31 - 1, (1,), device=x.device, dtype=torch.int64)
    y, h, _, _ = _norm_fwd_op(x2, r2, w1, b1, seed, float(eps), float(dropout_p) if r2 is not None else 0.0, rms)
    y = y.view(x.shape)
    if not return_residual:
        return y
    return y, (h.view(x.shape) if residual is not None else x)


def layer_norm(
    x: Tensor,
    normalized_shape: _ShapeArg,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    *,
    residual: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    return_residual: bool = False,
    backend: str = "auto",
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """``LayerNorm(x + dropout(residual))`` over the trailing ``normalized_shape`` dims.

    Args:
        x: ``(..., *normalized_shape)``; fp16, bf16 or fp32 (statistics in fp32).
        weight, bias: ``normalized_shape`` or None.
        residual: None or shaped like ``x``; dropout (``dropout_p``, always applied
            when > 0 — pass 0 in eval) acts on it before the add.
        return_residual: also return ``x + dropout(residual)`` (``x`` itself without a residual).
        backend: ``"auto"`` (torch: the Triton kernel measured slower on an H200, see ``ops.kernel_backend``), ``"triton"`` or ``"torch"``.

    Returns:
        ``y`` shaped like ``x``, or ``(y, sum)`` with ``return_residual``.
    """
    return _norm("layer_norm", False, x, normalized_shape, weight, bias, eps, residual, dropout_p,
                 return_residual, backend)


def default_rms_eps(dtype: torch.dtype) -> float:
    """torch's RMSNorm epsilon for ``eps=None``: that of the type it computes in (float64 for
    float64 inputs, else float32)."""
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


def rms_norm(
    x: Tensor,
    normalized_shape: _ShapeArg,
    weight: Optional[Tensor] = None,
    eps: Optional[float] = None,
    *,
    residual: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    return_residual: bool = False,
    backend: str = "auto",
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """``RMSNorm(x + dropout(residual))``: ``h / sqrt(mean(h²) + eps) * weight``.

    ``eps=None`` means the machine epsilon of the type torch computes in (its "opmath" type):
    float32's for float16, bfloat16 and float32 inputs, float64's for float64, as
    ``F.rms_norm`` does (not ``finfo(x.dtype).eps``, which is 7.8e-3 for bfloat16).
    Shapes, ``residual``, ``dropout_p``, ``return_residual`` and ``backend`` as :func:`layer_norm`.
    """
    if eps is None:
        eps = default_rms_eps(x.dtype) if isinstance(x, Tensor) else 1e-6
    return _norm("rms_norm", True, x, normalized_shape, weight, None, eps, residual, dropout_p,
                 return_residual, backend)
