"""``F.linear`` with a CPU kernel for decoding: few rows of ``x`` against a large weight.

A decoding step multiplies one new token per sequence by every weight of the model.
At M = 1-8 rows that is a handful of matrix-vector products, bound by reading the
weight from memory once. torch's CPU ``F.linear`` (MKL's GEMV) reads it at about
9 GB/s on the machines we measured, under half of what two cores stream; the C++
kernel (``csrc/cpu/linear_cpu.cpp``: 4 weight rows streamed at a time per thread,
the x rows reused from L1, fp32 accumulation) reads at 17-25 GB/s
(``bench/bench_cpu_linear.py``, ``bench/NOTES.md`` "CPU linear for decoding").

``backend="auto"`` runs it where it measured faster than ``F.linear`` and nothing
else is asked of the call (see :func:`linear`); everywhere else, and for every
gradient, this is ``F.linear`` itself.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _ext
from . import kernel_backend

# Where "auto" takes the CPU kernel, from bench/results/cpu-amd-epyc-avx512/cpu_linear.json (ours ÷
# F.linear, weights read from memory and from cache, d = 384…2048; bench/NOTES.md "CPU linear for
# decoding"): float32 up to 8 rows (1.54-6.7× there; at 16 rows one cached shape is 1.08×);
# bfloat16 up to 8 rows with the vdpbf16ps kernel (avx512_bf16: 1.08-5.4×, 0.99× at 16 rows), but
# only up to 2 rows with the widening kernels of other processors (1.12-2.1×; from 4 rows torch's
# oneDNN GEMM won); and weights of at least CPU_AUTO_MIN_WEIGHT_BYTES (below, the ~2 µs a call
# costs around the kernel is a visible share).
# The extension when it has the kernel (None: not built, or a build older than the kernel).
_C = _ext.C if hasattr(_ext.C, "linear_cpu_auto") else None
_ISA = _C.linear_cpu_isa() if _C is not None else "none"
CPU_AUTO_MAX_ROWS = {torch.float32: 8, torch.bfloat16: 8 if _ISA == "avx512_bf16" else 2}
CPU_AUTO_MIN_WEIGHT_BYTES = 256 << 10


def _kernel_hidden(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
    """True where the kernel must not run: the C++ call writes through raw pointers, which
    torch.compile / export, ``torch.jit.trace``, functorch transforms and dispatch modes (e.g.
    ``FlopCounterMode``) cannot see (:func:`kernel_backend.direct_calls_allowed`), and it would
    bypass a tensor subclass's ``__torch_function__`` (``F.linear`` honours all of them)."""
    return not kernel_backend.direct_calls_allowed() or torch.overrides.has_torch_function_variadic(x, weight, bias)


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, backend: str = "auto") -> Tensor:
    """``x @ weightᵀ + bias``: ``torch.nn.functional.linear``'s arguments and result.

    Args:
        x: ``(..., in_features)``.
        weight: ``(out_features, in_features)``.
        bias: ``(out_features,)`` or None.
        backend: ``"auto"``, ``"cpu"`` or ``"torch"`` (``F.linear``). ``"auto"`` runs the CPU decoding
            kernel where it measured faster: CPU strided tensors of one dtype, float32 with at most
            ``CPU_AUTO_MAX_ROWS[float32]`` rows of x (the product of its leading dims) or bfloat16
            with at most ``CPU_AUTO_MAX_ROWS[bfloat16]``, a weight of at least
            ``CPU_AUTO_MIN_WEIGHT_BYTES`` with unit stride along ``in_features``, no gradient to
            record, no autocast, outside ``torch.compile`` / ``torch.jit.trace`` / functorch transforms /
            dispatch modes, no tensor subclass with ``__torch_function__``; else ``F.linear``.
            ``ops.use_kernel_backend("torch")`` makes ``"auto"`` mean ``"torch"``. ``"cpu"`` runs the
            kernel for any row count and raises ``ValueError`` naming what it cannot take.

    Returns:
        ``(..., out_features)``, ``x``'s dtype. The kernel accumulates in float32 and rounds
        once (bfloat16); its sums run in a different order than MKL's, so results agree
        with ``F.linear`` to float32 rounding, not bit for bit.
    """
    if backend == "auto":
        C = _C
        stack = kernel_backend._DEFAULT_STACK
        if C is not None and not (stack and stack[-1] == "torch") and not _kernel_hidden(x, weight, bias):
            y = C.linear_cpu_auto(x, weight, bias, CPU_AUTO_MAX_ROWS[torch.float32],
                                  CPU_AUTO_MAX_ROWS[torch.bfloat16], CPU_AUTO_MIN_WEIGHT_BYTES)
            if y is not None:
                return y
        return F.linear(x, weight, bias)
    if backend == "torch":
        return F.linear(x, weight, bias)
    if backend == "cpu":
        if _kernel_hidden(x, weight, bias):
            raise ValueError("linear(backend='cpu'): a plain C++ call, invisible to torch.compile, torch.jit.trace, "
                             "functorch transforms and tensor subclasses; use backend='auto' there")
        if _C is None:
            _ext.require("linear(backend='cpu')")
            raise RuntimeError("linear(backend='cpu'): the compiled extension predates the kernel; rebuild it "
                               "('pip install --no-build-isolation -e .')")
        return _C.linear_cpu(x, weight, bias)
    raise ValueError(f"linear: backend must be 'auto', 'cpu' or 'torch', got {backend!r}")
