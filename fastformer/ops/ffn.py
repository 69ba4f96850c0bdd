"""Linear + bias + activation fused into the matmul, the gated (SwiGLU/GeGLU)
variant, and the two-layer feed-forward block built from them.

Triton path: custom ops ``fastformer::linear_act_fwd/_bwd`` and
``fastformer::gated_linear_fwd/_bwd`` (fake impls + autograd) over
kernels/ffn.py. What the forward stores for the backward: nothing beyond
``x`` and ``W`` for identity, the output ``y`` for ReLU (its sign is ``h``'s),
the pre-activation ``h`` (input dtype) for GELU/SiLU, and both halves
``[a; b]`` for the gated ops. See kernels/ffn.py for why ``h`` is stored
rather than recomputed. Torch path: ``F.linear`` + the activation.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .activation import gelu
from .buffers import new_output
from .kernel_backend import resolve_backend
from .linear import linear

ACTIVATIONS = ("identity", "relu", "gelu", "gelu_tanh", "silu")
_CODES = {name: i for i, name in enumerate(ACTIVATIONS)}  # same codes as kernels/ffn.py


def _act_torch(h: Tensor, activation: str, backend: str = "torch") -> Tensor:
    """The activation outside the Triton epilogue: torch's, except GELU-tanh, which is
    :func:`fastformer.ops.activation.gelu` (its CPU kernel under ``backend="auto"``)."""
    if activation == "relu":
        return F.relu(h)
    if activation == "gelu":
        return F.gelu(h)
    if activation == "gelu_tanh":
        return gelu(h, approximate="tanh", backend=backend)
    if activation == "silu":
        return F.silu(h)
    return h


def _stores_pre(act: int) -> bool:
    return act not in (_CODES["identity"], _CODES["relu"])


# ----------------------------------------------------------------------------- linear_act custom ops

@torch.library.custom_op("fastformer::linear_act_fwd", mutates_args=())
def _linear_act_fwd_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], act: int, save_pre: bool) -> Tuple[Tensor, Tensor]:
    """``x (M, K)``, ``weight (N, K)`` → ``y (M, N)``, ``pre (M, N)`` (empty unless stored)."""
    from fastformer.kernels.ffn import matmul_act

    M, N = x.shape[0], weight.shape[0]
    y = new_output((M, N), x.dtype, x.device)
    pre = new_output((M, N), x.dtype, x.device) if save_pre else x.new_empty((0, 0))
    if M > 0 and N > 0:
        if x.shape[1] == 0:
            # Empty reduction: the kernel would never write; h = bias (or 0).
            h = bias.expand(M, N).to(x.dtype) if bias is not None else x.new_zeros((M, N))
            y.copy_(_act_torch(h, ACTIVATIONS[act]))
            if save_pre:
                pre.copy_(h)
        else:
            matmul_act(x, weight.t(), y, bias=bias, pre=pre if save_pre else None, act=act)
    return y, pre


@_linear_act_fwd_op.register_fake
def _(x, weight, bias, act, save_pre):
    M, N = x.shape[0], weight.shape[0]
    return x.new_empty((M, N)), x.new_empty((M, N) if save_pre else (0, 0))


@torch.library.custom_op("fastformer::linear_act_bwd", mutates_args=())
def _linear_act_bwd_op(dy: Tensor, x: Tensor, weight: Tensor, aux: Tensor, act: int, has_bias: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """``dh = dy * act'(aux)`` in both GEMM prologues → ``dx (M, K)``, ``dW (N, K)``, ``db (N,)`` (empty without bias)."""
    from fastformer.kernels.ffn import matmul_act

    M, K = x.shape
    N = weight.shape[0]
    dx = new_output((M, K), x.dtype, x.device)
    dw = new_output((N, K), weight.dtype, x.device)
    rowsum = torch.zeros((N,), dtype=torch.float32, device=x.device) if has_bias else None
    if M == 0 or N == 0 or K == 0:
        dx.zero_(), dw.zero_()
        if has_bias and M > 0 and N > 0:
            rowsum.copy_((dy.float() * _act_grad_torch(aux.float(), act)).sum(0))
    else:
        grad = act != _CODES["identity"]
        # dx = dh @ W: A = dy (M, N), B = W (N, K).
        matmul_act(dy, weight, dx, aux=aux if grad else None, act=act, prologue_grad=grad)
        # dW = dhᵀ @ x: A = dyᵀ (N, M), B = x (M, K); db = Σ_m dh rides along as the A row sums.
        matmul_act(dy.t(), x, dw, aux=aux.t() if grad else dy.t(), act=act, prologue_grad=True, rowsum=rowsum)
    db = rowsum.to(weight.dtype) if has_bias else x.new_empty((0,))
    return dx, dw, db


def _act_grad_torch(h: Tensor, act: int) -> Tensor:
    h = h.detach().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(_act_torch(h, ACTIVATIONS[act]).sum(), h)
    return g


@_linear_act_bwd_op.register_fake
def _(dy, x, weight, aux, act, has_bias):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), x.new_empty((weight.shape[0],) if has_bias else (0,))


def _linear_act_setup(ctx, inputs, output):
    x, weight, bias, act, save_pre = inputs
    y, pre = output
    ctx.act, ctx.has_bias = act, bias is not None
    aux = pre if _stores_pre(act) else (y if act == _CODES["relu"] else None)
    ctx.save_for_backward(x, weight, aux)


def _linear_act_backward(ctx, dy, _dpre):
    x, weight, aux = ctx.saved_tensors
    if _stores_pre(ctx.act) and aux.numel() == 0 and x.shape[0] * weight.shape[0] > 0:
        raise RuntimeError("linear_act: backward needs the pre-activation, which was not saved (save_pre=False)")
    dx, dw, db = _linear_act_bwd_op(dy.contiguous(), x, weight, aux if aux is not None else dy, ctx.act, ctx.has_bias)
    return dx, dw, (db if ctx.has_bias else None), None, None


torch.library.register_autograd("fastformer::linear_act_fwd", _linear_act_backward, setup_context=_linear_act_setup)


# ----------------------------------------------------------------------------- gated custom ops

@torch.library.custom_op("fastformer::gated_linear_fwd", mutates_args=())
def _gated_fwd_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], act: int, save_pre: bool) -> Tuple[Tensor, Tensor]:
    """``x (M, K)``, ``weight (2H, K)`` → ``out (M, H)``, ``pre (M, 2H)`` (empty unless stored)."""
    from fastformer.kernels.ffn import gated_fwd

    M, H = x.shape[0], weight.shape[0] // 2
    out = new_output((M, H), x.dtype, x.device)
    pre = new_output((M, 2 * H), x.dtype, x.device) if save_pre else x.new_empty((0, 0))
    if M > 0 and H > 0:
        if x.shape[1] == 0:
            h = bias.expand(M, 2 * H).to(x.dtype) if bias is not None else x.new_zeros((M, 2 * H))
            out.copy_(_act_torch(h[:, :H], ACTIVATIONS[act]) * h[:, H:])
            if save_pre:
                pre.copy_(h)
        else:
            gated_fwd(x, weight, out, bias=bias, pre=pre if save_pre else None, act=act)
    return out, pre


@_gated_fwd_op.register_fake
def _(x, weight, bias, act, save_pre):
    M, H = x.shape[0], weight.shape[0] // 2
    return x.new_empty((M, H)), x.new_empty((M, 2 * H) if save_pre else (0, 0))


@torch.library.custom_op("fastformer::gated_linear_bwd", mutates_args=())
def _gated_bwd_op(dout: Tensor, x: Tensor, weight: Tensor, pre: Tensor, act: int, has_bias: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """→ ``dx (M, K)``, ``dW (2H, K)``, ``db (2H,)`` (empty without bias)."""
    from fastformer.kernels.ffn import gated_bwd, matmul_act

    M, K = x.shape
    H2 = weight.shape[0]
    dpre = new_output((M, H2), x.dtype, x.device)
    if M > 0 and H2 > 0:
        gated_bwd(dout, pre, dpre, act)
    dx = new_output((M, K), x.dtype, x.device)
    dw = new_output((H2, K), weight.dtype, x.device)
    rowsum = torch.zeros((H2,), dtype=torch.float32, device=x.device) if has_bias else None
    if M == 0 or H2 == 0 or K == 0:
        dx.zero_(), dw.zero_()
        if has_bias and M > 0 and H2 > 0:
            rowsum.copy_(dpre.float().sum(0))
    else:
        matmul_act(dpre, weight, dx)
        # Identity prologue (act'(·) = 1) just to get the fused row sums = dbias.
        matmul_act(dpre.t(), x, dw, aux=dpre.t(), act=0, prologue_grad=True, rowsum=rowsum)
    db = rowsum.to(weight.dtype) if has_bias else x.new_empty((0,))
    return dx, dw, db


@_gated_bwd_op.register_fake
def _(dout, x, weight, pre, act, has_bias):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), x.new_empty((weight.shape[0],) if has_bias else (0,))


def _gated_setup(ctx, inputs, output):
    x, weight, bias, act, save_pre = inputs
    ctx.act, ctx.has_bias = act, bias is not None
    ctx.save_for_backward(x, weight, output[1])


def _gated_backward(ctx, dout, _dpre):
    x, weight, pre = ctx.saved_tensors
    if pre.numel() == 0 and x.shape[0] * weight.shape[0] > 0:
        raise RuntimeError("gated_linear: backward needs the pre-activations, which were not saved (save_pre=False)")
    dx, dw, db = _gated_bwd_op(dout.contiguous(), x, weight, pre, ctx.act, ctx.has_bias)
    return dx, dw, (db if ctx.has_bias else None), None, None


torch.library.register_autograd("fastformer::gated_linear_fwd", _gated_backward, setup_context=_gated_setup)


# ----------------------------------------------------------------------------- public API

def _check(op: str, x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str, gated: bool) -> None:
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if x.dim() < 1 or weight.dim() != 2:
        raise ValueError(f"{op}: need x (..., in) and weight (out, in), got {tuple(x.shape)} and {tuple(weight.shape)}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{op}: x's last dim {x.shape[-1]} != weight's in_features {weight.shape[1]}")
    if gated and weight.shape[0] % 2:
        raise ValueError(f"{op}: weight must be (2 * hidden, in) for a gated layer, got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{op}: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{op}: {name} dtype {t.dtype} != x dtype {x.dtype}")
        if t is not None and t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")


def _too_big(x: Tensor, weight: Tensor) -> bool:
    """Operands past the kernels' int32 offsets (2**31 elements) go to torch."""
    from fastformer.kernels.ffn import MAX_ELEMENTS

    M = x.numel() // max(x.shape[-1], 1)
    return max(x.numel(), weight.numel(), M * weight.shape[0]) >= MAX_ELEMENTS


def _needs_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def _linear_backend(backend: str) -> str:
    """What the torch path's matmul and activation run: ``ops.linear``'s and ``ops.activation.gelu``'s
    choice (the CPU kernels: decoding GEMM for a few rows, GELU-tanh) unless the caller forced
    plain torch."""
    return "torch" if backend == "torch" else "auto"


def linear_act(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: str = "gelu", *,
               backend: str = "auto") -> Tensor:
    """``act(x @ weightᵀ + bias)`` with the activation in the matmul epilogue.

    Args:
        x: ``(..., in)``; weight: ``(out, in)``; bias: ``(out,)`` or None (same dtype as x).
        activation: ``"relu"``, ``"gelu"`` (exact erf), ``"gelu_tanh"``, ``"silu"`` or ``"identity"``.
        backend: ``"auto"`` (torch: the Triton kernel measured slower on an H200, see ``ops.kernel_backend``;
            its matmul is :func:`fastformer.ops.linear`, so a CPU decoding step runs the C++ kernel),
            ``"triton"`` or ``"torch"`` (plain ``F.linear`` + the activation).

    Returns:
        ``(..., out)``.
    """
    _check("linear_act", x, weight, bias, activation, gated=False)
    chosen = resolve_backend(backend, x.device, "linear_act", dtype=x.dtype)
    if chosen == "torch" or _too_big(x, weight):
        return _act_torch(linear(x, weight, bias, backend=_linear_backend(backend)), activation,
                          _linear_backend(backend))
    act = _CODES[activation]
    x2 = x.reshape(-1, x.shape[-1])
    y, _ = _linear_act_fwd_op(x2, weight, bias, act, _stores_pre(act) and _needs_grad(x, weight, bias))
    return y.view(*x.shape[:-1], weight.shape[0])


def gated_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: str = "silu", *,
                 backend: str = "auto") -> Tensor:
    """``act(a) * b`` with ``[a, b] = x @ weightᵀ + bias`` split in halves (SwiGLU: silu, GeGLU: gelu).

    ``x (..., in)``, ``weight (2·hidden, in)`` (first half feeds the activation), ``bias (2·hidden,)``
    → ``(..., hidden)``. Both halves are computed by the same program and never leave registers
    before the product (they are stored once for the backward when grads are needed).
    """
    _check("gated_linear", x, weight, bias, activation, gated=True)
    chosen = resolve_backend(backend, x.device, "gated_linear", dtype=x.dtype)
    if chosen == "torch" or _too_big(x, weight):
        a, b = linear(x, weight, bias, backend=_linear_backend(backend)).chunk(2, dim=-1)
        return _act_torch(a, activation, _linear_backend(backend)) * b
    x2 = x.reshape(-1, x.shape[-1])
    out, _ = _gated_fwd_op(x2, weight, bias, _CODES[activation], _needs_grad(x, weight, bias))
    return out.view(*x.shape[:-1], weight.shape[0] // 2)


def feed_forward(x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor],
                 activation: str = "gelu", dropout_p: float = 0.0, gated: bool = False, *,
                 backend: str = "auto") -> Tensor:
    """``linear2(dropout(act(linear1(x))))`` (or the gated form), the transformer MLP.

    ``x (..., d_model)``, ``w1 (hidden, d_model)`` (``(2·hidden, d_model)`` when gated), ``w2 (d_model, hidden)``.
    The first GEMM carries the fused epilogue; the second is :func:`fastformer.ops.linear`
    (``F.linear``: cuBLAS with its bias epilogue, nothing left to fuse; on CPU at decoding row
    counts, the C++ decoding kernel). ``dropout_p`` is applied when > 0 (pass 0 in eval).
    """
    if not 0.0 <= dropout_p <= 1.0:  # 1 drops everything, as F.dropout (NaN fails here too)
        raise ValueError(f"feed_forward: dropout_p must be in [0, 1], got {dropout_p}")
    if gated:
        h = gated_linear(x, w1, b1, activation, backend=backend)
    else:
        h = linear_act(x, w1, b1, activation, backend=backend)
    if dropout_p > 0.0:
        h = F.dropout(h, dropout_p, training=True)
    return linear(h, w2, b2, backend=_linear_backend(backend))
