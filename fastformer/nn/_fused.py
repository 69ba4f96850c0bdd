"""The fused building-block ops the transformer layers call, in one place.

The layers call ``fastformer.ops.layer_norm`` (residual add + dropout + LayerNorm
in one kernel) and ``fastformer.ops.linear_act`` (GEMM + bias + activation)
when the ops package provides them, and the same math in plain torch
otherwise, so the modules work on every install and every input.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple, Union

import torch.nn.functional as F
from torch import Tensor, nn

from torch.nn.modules.module import (
    _global_backward_hooks,
    _global_backward_pre_hooks,
    _global_forward_hooks,
    _global_forward_pre_hooks,
)

from .. import ops as _ops

_fused_layer_norm = getattr(_ops, "layer_norm", None)
_fused_linear_act = getattr(_ops, "linear_act", None)

# Activations the fused GEMM epilogue knows, by the name it takes.
_ACTIVATION_NAMES = {F.relu: "relu", F.gelu: "gelu"}


def activation_name(activation: Union[str, Callable]) -> Optional[str]:
    """``"relu"``/``"gelu"`` for torch's relu/gelu in any spelling, else ``None`` (a custom callable)."""
    if isinstance(activation, str):
        return activation if activation in ("relu", "gelu") else None
    if isinstance(activation, nn.ReLU):
        return "relu"
    if isinstance(activation, nn.GELU) and activation.approximate == "none":
        return "gelu"
    return _ACTIVATION_NAMES.get(activation)


def is_plain_layer_norm(norm: nn.Module) -> bool:
    """True when ``norm`` is a LayerNorm whose math the fused op reproduces (so it can be fused with the add)."""
    return isinstance(norm, nn.LayerNorm) or (type(norm).__name__ == "LayerNorm" and hasattr(norm, "normalized_shape"))


def make_layer_norm(d_model: int, eps: float, bias: bool, **factory_kwargs) -> nn.Module:
    """fastformer's LayerNorm when the package has it, else torch's (same parameters and keys)."""
    try:
        from .layernorm import LayerNorm
    except ImportError:
        LayerNorm = nn.LayerNorm
    return LayerNorm(d_model, eps=eps, bias=bias, **factory_kwargs)


def add_layer_norm(
    x: Tensor,
    norm: nn.Module,
    residual: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    return_residual: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """``norm(residual + dropout(x))`` and, with ``return_residual``, also the sum.

    ``x``, ``residual``: ``(..., N)``. ``norm`` is any module; a plain LayerNorm goes
    through the fused op, anything else (RMSNorm, a user's norm) is called as is.
    ``dropout_p`` is applied only when > 0 (callers pass 0 in eval).
    """
    if _fused_layer_norm is not None and residual is not None and dropout_p < 1.0 and is_plain_layer_norm(norm):
        # The op computes LN(a + dropout(b)): the residual stream is ``a``, the branch output ``b``.
        return _fused_layer_norm(
            residual,
            norm.normalized_shape,
            norm.weight,
            getattr(norm, "bias", None),
            norm.eps,
            residual=x,
            dropout_p=dropout_p,
            return_residual=return_residual,
        )
    if dropout_p > 0.0:
        x = F.dropout(x, p=dropout_p, training=True)
    total = x if residual is None else residual + x
    out = norm(total)
    return (out, total) if return_residual else out


def plain_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a plain ``nn.Linear`` that no hook watches, so its weight and bias may
    be read directly by a fused op; a replaced module (LoRA, a quantized linear) or a hooked one
    must be called as a module to behave as it would in torch."""
    return (type(module) is nn.Linear and not module._forward_hooks and not module._forward_pre_hooks
            and not module._backward_hooks and not module._backward_pre_hooks
            and not _global_forward_hooks and not _global_forward_pre_hooks and not _global_backward_hooks
            and not _global_backward_pre_hooks)


def apply_linear(module: nn.Module, x: Tensor) -> Tensor:
    """``module(x)``; a :func:`plain_linear` runs :func:`fastformer.ops.linear` instead (the same
    math; a CPU decoding step takes the C++ kernel)."""
    if plain_linear(module):
        return _ops.linear(x, module.weight, module.bias)
    return module(x)


def linear_act(x: Tensor, linear: nn.Module, activation: Union[str, Callable]) -> Tensor:
    """``activation(linear(x))``, fused into the GEMM when the activation is relu/gelu and ``linear``
    is a :func:`plain_linear` (a replaced or hooked one is called as a module, as torch's layers do)."""
    name = activation_name(activation)
    if name is not None and _fused_linear_act is not None and plain_linear(linear):
        return _fused_linear_act(x, linear.weight, linear.bias, name)
    h = apply_linear(linear, x)
    if name is not None:
        return F.relu(h) if name == "relu" else F.gelu(h)
    return activation(h)


def mlp_modules(x: Tensor, first: nn.Module, second: nn.Module, act: Callable, gated: bool,
                dropout: nn.Module) -> Tensor:
    """``second(dropout(act(first(x))))`` with the linears called as modules (gated: ``act(a) * b``
    of ``first(x)``'s two halves): the MLPs' unfused form, for a custom activation or a replaced
    (LoRA, quantized) or hooked linear that the fused op, reading ``.weight``, would bypass."""
    h = first(x)
    if gated:
        a, b = h.chunk(2, dim=-1)
        h = act(a) * b
    else:
        h = act(h)
    return second(dropout(h))


