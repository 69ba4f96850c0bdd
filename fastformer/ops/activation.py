"""``F.gelu(x, approximate="tanh")`` (GPT-2's ``gelu_new``) with a CPU kernel, forward and backward.

torch's CPU GELU-tanh computes ``0.5 x (1 + tanh(u))`` with a general vector tanh that costs
about 60 cycles a vector: 2.7 ms forward and 3.0 ms backward for one MLP activation of a
nanoGPT-size model (B 4, T 256, 1536 features), 5 % of its training step. The C++ kernel
(``csrc/cpu/activation_cpu_impl.h``) writes it as ``x / (1 + exp(-2u))``: one exp2 and one
division a lane, a pass at memory speed (``bench/bench_cpu_activation.py``, ``bench/NOTES.md``
"GELU on the CPU"). Its results agree with torch's within torch's own rounding, and are
closer to the exact values where torch's ``1 + tanh(u)`` and ``1 - tanh(u)^2`` cancel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _ext
from . import kernel_backend

# The extension when it has the kernel (None: not built, or a build older than the kernel).
_C = _ext.C if hasattr(_ext.C, "gelu_tanh_cpu") else None
# Below this many elements torch's own call (~2 µs) is as fast: nothing to gain.
CPU_AUTO_MIN_NUMEL = 4096
_DTYPES = (torch.float32, torch.bfloat16)


class _GeluTanh(torch.autograd.Function):
    """The kernel's forward and backward; saves ``x``, as torch's ``GeluBackward0`` does."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return _C.gelu_tanh_cpu(x)

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: torch's differentiable formula
            return torch.ops.aten.gelu_backward(grad_output, x, approximate="tanh")
        return _C.gelu_tanh_backward_cpu(grad_output, x)


def _kernel_takes(x: Tensor) -> bool:
    """``auto``'s conditions besides size: a contiguous float32/bfloat16 CPU tensor (F.gelu keeps
    other memory formats, the kernel writes contiguous), a plain call (see ``direct_calls_allowed``)."""
    return (x.device.type == "cpu" and x.dtype in _DTYPES and x.layout == torch.strided
            and kernel_backend.direct_calls_allowed() and not torch.overrides.has_torch_function_unary(x)
            and x.is_contiguous())


def gelu(input: Tensor, approximate: str = "none", *, backend: str = "auto") -> Tensor:
    """``torch.nn.functional.gelu``'s arguments and result (any shape, float dtypes).

    Args:
        input: any shape (``F.gelu``'s name).
        approximate: ``"none"`` (exact, erf) or ``"tanh"``.
        backend: ``"auto"``, ``"cpu"`` or ``"torch"`` (``F.gelu``). ``"auto"`` runs the CPU kernel for
            ``approximate="tanh"`` on a contiguous float32 or bfloat16 CPU tensor of at least
            ``CPU_AUTO_MIN_NUMEL`` elements, outside ``torch.compile`` / ``torch.jit.trace`` / functorch
            transforms / dispatch modes / forward-mode AD, without a tensor subclass's ``__torch_function__``; its
            backward is the kernel too (torch's formula under ``create_graph``). Else ``F.gelu``.
            ``ops.use_kernel_backend("torch")`` makes ``"auto"`` mean ``"torch"``. ``"cpu"`` runs the
            kernel for any size and raises ``ValueError`` / ``TypeError`` for what it cannot take.

    Returns:
        ``input``'s shape and dtype (contiguous from the kernel). float32 results agree with
        ``F.gelu`` to float32 rounding, bfloat16 ones to the one rounding of the float32 value.
    """
    if backend == "auto":
        stack = kernel_backend._DEFAULT_STACK
        if (approximate == "tanh" and _C is not None and not (stack and stack[-1] == "torch")
                and _kernel_takes(input) and input.numel() >= CPU_AUTO_MIN_NUMEL):
            return _GeluTanh.apply(input)
        return F.gelu(input, approximate=approximate)
    if backend == "torch":
        return F.gelu(input, approximate=approximate)
    if backend == "cpu":
        if approximate != "tanh":
            raise ValueError(f"gelu(backend='cpu'): the kernel computes approximate='tanh', got {approximate!r}")
        if not kernel_backend.direct_calls_allowed() or torch.overrides.has_torch_function_unary(input):
            raise ValueError("gelu(backend='cpu'): a plain C++ call, invisible to torch.compile, torch.jit.trace, "
                             "functorch transforms and tensor subclasses; use backend='auto' there")
        if _C is None:
            _ext.require("gelu(backend='cpu')")
            raise RuntimeError("gelu(backend='cpu'): the compiled extension predates the kernel; rebuild it "
                               "('pip install --no-build-isolation -e .')")
        return _GeluTanh.apply(input)
    raise ValueError(f"gelu: backend must be 'auto', 'cpu' or 'torch', got {backend!r}")
