"""The transformer MLP as one module: ``linear2(dropout(act(linear1(x))))``.

Submodules are named ``linear1`` / ``linear2`` as in
``torch.nn.TransformerEncoderLayer``, so its feed-forward weights load without
remapping. The first GEMM runs with the activation fused into its epilogue
(``fastformer.ops.linear_act`` / ``gated_linear``).
"""

from __future__ import annotations

from typing import Callable, Union

import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..ops.ffn import ACTIVATIONS, _act_torch
from ._fused import mlp_modules, plain_linear

# torch callables the fused epilogue reproduces exactly.
_CALLABLES = {F.relu: "relu", F.gelu: "gelu", F.silu: "silu"}


class FeedForward(nn.Module):
    """``FeedForward(d_model, dim_feedforward, activation="gelu", dropout=0.0, bias=True, gated=False, device=None, dtype=None)``.

    ``activation``: ``"relu"``, ``"gelu"``, ``"gelu_tanh"``, ``"silu"``, ``"identity"`` or
    ``F.relu``/``F.gelu``/``F.silu``; any other callable runs unfused. ``gated=True`` makes
    ``linear1`` ``(2·dim_feedforward, d_model)`` and computes ``act(a) * b`` (SwiGLU with
    ``"silu"``, GeGLU with ``"gelu"``). ``dropout`` acts after the activation, in training only.

    ``forward(x)``: ``(..., d_model)`` → ``(..., d_model)``.
    """

    def __init__(self, d_model: int, dim_feedforward: int, activation: Union[str, Callable] = "gelu",
                 dropout: float = 0.0, bias: bool = True, gated: bool = False, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        if isinstance(activation, str) and activation not in ACTIVATIONS:
            raise ValueError(f"FeedForward: activation must be one of {ACTIVATIONS} or a callable, got {activation!r}")
        self.activation = activation
        self.gated = gated
        self.linear1 = nn.Linear(d_model, dim_feedforward * (2 if gated else 1), bias=bias, **factory)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias, **factory)

    def _activation_name(self):
        if isinstance(self.activation, str):
            return self.activation
        return _CALLABLES.get(self.activation)

    def forward(self, x: Tensor) -> Tensor:
        """``linear2(dropout(act(linear1(x))))``; with ``gated=True``, ``act(a) * b`` replaces
        ``act(linear1(x))``, ``[a, b]`` being the two halves of ``linear1(x)``.

        A named activation or ``F.relu``/``F.gelu``/``F.silu`` runs :func:`fastformer.ops.feed_forward`
        on ``linear1``'s and ``linear2``'s weights and biases; any other callable, or a replaced (LoRA,
        quantized) or hooked ``linear1``/``linear2``, runs in plain torch, calling the submodules. ``dropout`` applies in training mode only.

        Args:
            x: ``(..., d_model)``.

        Returns:
            ``(..., d_model)``.
        """
        p = self.dropout.p if self.training else 0.0
        name = self._activation_name()
        if name is None or not (plain_linear(self.linear1) and plain_linear(self.linear2)):
            # a custom callable, or a replaced (LoRA, quantized) or hooked linear: plain torch
            act = self.activation if name is None else (lambda t: _act_torch(t, name))
            return mlp_modules(x, self.linear1, self.linear2, act, self.gated, self.dropout)
        return ops.feed_forward(x, self.linear1.weight, self.linear1.bias, self.linear2.weight, self.linear2.bias,
                                name, dropout_p=p, gated=self.gated)

    def extra_repr(self) -> str:
        act = self.activation if isinstance(self.activation, str) else getattr(self.activation, "__name__", "callable")
        return f"activation={act}, gated={self.gated}"
