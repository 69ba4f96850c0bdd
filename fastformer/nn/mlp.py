"""The transformer MLP with timm's names: ``fc2(drop(act(fc1(x))))``, on the fused FFN op.

:class:`Mlp` keeps timm's ``Mlp`` submodule names (``fc1``, ``fc2``), so timm/ViT/BERT-style
checkpoints load unchanged; :class:`FeedForward` (``feedforward.py``) is the same block with
``torch.nn.TransformerEncoderLayer``'s names (``linear1``, ``linear2``). Both run
:func:`fastformer.ops.feed_forward`: the first GEMM with the activation (or the gate,
``gated=True``: SwiGLU/GeGLU) fused into its epilogue (``ops.linear_act`` / ``ops.gated_linear``).
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..ops.ffn import ACTIVATIONS, _act_torch
from ._fused import mlp_modules, plain_linear

# Activation classes and callables the fused epilogue reproduces exactly, by the name it takes.
_BY_CALLABLE = {F.relu: "relu", F.gelu: "gelu", F.silu: "silu"}
_BY_CLASS = {nn.ReLU: "relu", nn.SiLU: "silu", nn.Identity: "identity"}


def activation_name(act: Union[str, type, Callable, nn.Module]) -> str:
    """The fused-epilogue name of ``act``: a name (``"gelu"``, ``"gelu_tanh"``, ``"relu"``,
    ``"silu"``, ``"identity"``), torch's callable, or an activation class/instance as timm's
    ``act_layer`` (``nn.GELU`` with ``approximate="tanh"`` is ``"gelu_tanh"``).
    Raises ``ValueError`` for anything else."""
    if isinstance(act, str):
        if act not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {act!r}")
        return act
    if isinstance(act, type):
        if act is nn.GELU:
            return "gelu"
        if act in _BY_CLASS:
            return _BY_CLASS[act]
    elif isinstance(act, nn.GELU):
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    elif type(act) in _BY_CLASS:
        return _BY_CLASS[type(act)]
    elif act in _BY_CALLABLE:
        return _BY_CALLABLE[act]
    raise ValueError(f"activation {act!r} has no fused form; use one of {ACTIVATIONS}")


class Mlp(nn.Module):
    """``Mlp(in_features, hidden_features=None, out_features=None, act_layer="gelu", bias=True,
    drop=0.0, gated=False, device=None, dtype=None)`` (timm's arguments).

    ``act_layer``: a name or timm-style class (see :func:`activation_name`). ``gated=True``
    makes ``fc1`` ``(2·hidden, in)`` and computes ``act(a) * b`` (SwiGLU with ``"silu"``).
    ``drop`` acts after the activation and after ``fc2``, in training only.

    ``forward(x)``: ``(..., in_features)`` → ``(..., out_features)``.
    """

    def __init__(self, in_features: int, hidden_features: Optional[int] = None, out_features: Optional[int] = None,
                 act_layer: Union[str, type, Callable] = "gelu", bias: bool = True, drop: float = 0.0,
                 gated: bool = False, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        hidden = hidden_features or in_features
        out = out_features or in_features
        self.act_name = activation_name(act_layer)
        self.gated = gated
        self.fc1 = nn.Linear(in_features, hidden * (2 if gated else 1), bias=bias, **dd)
        self.drop = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, out, bias=bias, **dd)

    def forward(self, x: Tensor) -> Tensor:
        """``drop(fc2(drop(act(fc1(x)))))``; with ``gated=True``, ``act(a) * b`` replaces
        ``act(fc1(x))``, ``[a, b]`` being the two halves of ``fc1(x)``.

        Runs :func:`fastformer.ops.feed_forward` on ``fc1``'s and ``fc2``'s weights and biases
        when both are plain ``nn.Linear`` without hooks; a replaced (LoRA, quantized) or hooked
        ``fc1``/``fc2`` is called as a module, as in timm's ``Mlp``.
        ``drop`` applies in training mode only.

        Args:
            x: ``(..., in_features)``.

        Returns:
            ``(..., out_features)``.
        """
        if not (plain_linear(self.fc1) and plain_linear(self.fc2)):
            act = lambda t: _act_torch(t, self.act_name)  # noqa: E731
            return self.drop(mlp_modules(x, self.fc1, self.fc2, act, self.gated, self.drop))
        p = self.drop.p if self.training else 0.0
        y = ops.feed_forward(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, self.act_name,
                             dropout_p=p, gated=self.gated)
        return self.drop(y)

    def extra_repr(self) -> str:
        return f"act={self.act_name}, gated={self.gated}"


class GatedMlp(Mlp):
    """:class:`Mlp` with ``gated=True`` and SiLU by default (SwiGLU, as Llama's MLP)."""

    def __init__(self, in_features: int, hidden_features: Optional[int] = None, out_features: Optional[int] = None,
                 act_layer: Union[str, type, Callable] = "silu", bias: bool = True, drop: float = 0.0,
                 device=None, dtype=None):
        super().__init__(in_features, hidden_features, out_features, act_layer, bias, drop, gated=True,
                         device=device, dtype=dtype)
