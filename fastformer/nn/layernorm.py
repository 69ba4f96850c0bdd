"""Drop-in ``LayerNorm`` and ``RMSNorm`` running on the fused norm kernels.

They subclass ``torch.nn.LayerNorm`` / ``torch.nn.RMSNorm``: same constructor
arguments and defaults, same parameters and ``state_dict`` keys, ``isinstance``
checks keep working. Only ``forward`` changes, and it accepts an optional
``residual`` (``norm(x, residual)`` = ``norm(x + residual)``, fused).
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops


class LayerNorm(nn.LayerNorm):
    """``torch.nn.LayerNorm(normalized_shape, eps=1e-5, elementwise_affine=True, bias=True, device=None, dtype=None)``.

    ``forward(x, residual=None)``: ``x`` ``(..., *normalized_shape)`` → same shape.
    """

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        """Layer normalization over the trailing ``normalized_shape`` dims, as ``torch.nn.LayerNorm``.

        Args:
            input: ``(*, *normalized_shape)``, floating point.
            residual: fastformer's extension: ``None`` or a tensor of ``input``'s shape, added
                before normalizing by the same op: ``norm(input + residual)``.

        Returns:
            Shaped like ``input``.

        Raises:
            :class:`~fastformer.ops.errors.InputError` (``ValueError`` and torch's ``RuntimeError``)
            when the trailing dims of ``input`` are not ``normalized_shape`` or ``residual``'s shape is
            not ``input``'s; :class:`~fastformer.ops.errors.DtypeError` (``TypeError`` and
            ``RuntimeError``) for a non-floating ``input``. Under TorchScript it runs
            ``F.layer_norm`` on ``input + residual`` (torch's errors).
        """
        if torch.jit.is_scripting():  # TorchScript: torch's op (the fused one is a Python function)
            x = input if residual is None else input + residual
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return ops.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps, residual=residual)


class RMSNorm(nn.RMSNorm):
    """``torch.nn.RMSNorm(normalized_shape, eps=None, elementwise_affine=True, device=None, dtype=None)``.

    ``eps=None`` uses the epsilon of the type torch computes in (float32's for 16-bit and
    float32 inputs, float64's for float64), as ``torch.nn.RMSNorm`` does.
    """

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        """RMS normalization over the trailing ``normalized_shape`` dims, as ``torch.nn.RMSNorm``:
        ``x / sqrt(mean(x²) + eps) * weight``.

        Args:
            x: ``(*, *normalized_shape)``, floating point.
            residual: fastformer's extension: ``None`` or a tensor of ``x``'s shape, added before
                normalizing by the same op: ``norm(x + residual)``.

        Returns:
            Shaped like ``x``.

        Raises:
            As :meth:`LayerNorm.forward` (``x`` in place of ``input``).
        """
        if torch.jit.is_scripting():  # TorchScript: torch's op (the fused one is a Python function)
            h = x if residual is None else x + residual
            return F.rms_norm(h, self.normalized_shape, self.weight, self.eps)
        return ops.rms_norm(x, self.normalized_shape, self.weight, self.eps, residual=residual)
