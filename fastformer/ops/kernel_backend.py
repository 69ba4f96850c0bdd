"""Backend choice shared by the elementwise / row-wise / GEMM ops (softmax,
norms, feed-forward, positional encodings).

``"auto"`` runs the Triton kernels on CUDA tensors only where they measured
faster than torch's own kernels (:data:`CUDA_AUTO_MIN_ROW`), and plain torch ops
everywhere else; ``"triton"`` forces the kernels (on CPU tensors this needs
``TRITON_INTERPRET=1``, which is how the tests run them); ``"torch"`` forces
the torch-ops path.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterable, Iterator, List

import torch
import torch.autograd.forward_ad as _forward_ad


def triton_unavailable(device: torch.device) -> str | None:
    """None when the Triton kernels can run on ``device``, else the reason."""
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "CPU tensors need TRITON_INTERPRET=1 for the Triton kernels"
    if device.type not in ("cpu", "cuda"):
        return f"no Triton kernels for device type {device.type!r}"
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - triton ships with torch on Linux
        return f"triton is not importable: {exc}"
    return None


# The dtypes the kernels compute for (fp32 math inside); others (float64) take the torch path.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


_DEFAULT_STACK: List[str] = []

# What "auto" picks on CUDA: the Triton kernel for ``op`` when the row (the reduced, last dim) is at
# least this long, else torch; ops not listed always take torch. From GPU run 3 (H200, bf16,
# forward + backward, paired with torch eager in one run; bench/results/nvidia-h200/kernels.json):
#   softmax    n=768 0.16x, 1024 0.74x, 4096 1.43x, 8192 2.60x torch eager    -> Triton from 4096
#   layer_norm n=768...8192: 0.14x-0.91x                                      -> torch
#   linear_act (fused bias + GELU FFN) 0.31x-0.42x, gated_linear (SwiGLU) 0.89x -> torch
# rms_norm, rotary and sinusoidal positions have not been measured on a GPU: torch until they are.
CUDA_AUTO_MIN_ROW = {"softmax": 4096}


@contextlib.contextmanager
def use_kernel_backend(backend: str) -> Iterator[None]:
    """Make ``backend`` (``"triton"`` or ``"torch"``) what ``backend="auto"`` means for the softmax,
    norm, feed-forward and positional ops inside a ``with`` block (e.g. ``"triton"`` on CPU tensors
    under ``TRITON_INTERPRET=1``, to run a whole model on the kernels). Blocks nest; process-wide."""
    if backend not in ("triton", "torch"):
        raise ValueError(f"use_kernel_backend: backend must be 'triton' or 'torch', got {backend!r}")
    _DEFAULT_STACK.append(backend)
    try:
        yield
    finally:
        _DEFAULT_STACK.pop()


def resolve_backend(backend: str, device: torch.device, op: str, choices: Iterable[str] = ("auto", "triton", "torch"),
                    dtype: torch.dtype | None = None, row: int | None = None) -> str:
    """The concrete backend (``"triton"``/``"torch"``/other forced name) for ``op`` on ``device``.

    A dtype the kernels do not cover (float64) goes to ``"torch"`` even when
    ``"triton"`` is forced: valid input, just not the kernels' business. ``row``: the
    length of the reduced dim, for the measured CUDA rule (:data:`CUDA_AUTO_MIN_ROW`).
    """
    choices = tuple(choices)
    if backend == "auto" and _DEFAULT_STACK and _DEFAULT_STACK[-1] in choices:
        backend = _DEFAULT_STACK[-1]
    if backend not in choices:
        raise ValueError(f"{op}: backend must be one of {choices}, got {backend!r}")
    if dtype is not None and dtype not in KERNEL_DTYPES and backend in ("auto", "triton"):
        return "torch"
    if backend == "auto":
        min_row = CUDA_AUTO_MIN_ROW.get(op)
        if device.type != "cuda" or min_row is None or (row or 0) < min_row:
            return "torch"
        return "triton" if triton_unavailable(device) is None else "torch"
    if backend == "triton":
        reason = triton_unavailable(device)
        if reason is not None:
            raise RuntimeError(f"{op}: backend='triton' unavailable: {reason}")
    return backend


def direct_calls_allowed() -> bool:
    """True where a kernel may be called directly rather than through a torch op: outside
    torch.compile / export, ``torch.jit.trace``, functorch transforms and dispatch modes
    (``FlopCounterMode``, op recorders), which see only the ops dispatched through torch, and
    outside a forward-mode AD level (``torch.autograd.forward_ad.dual_level``), whose tangents a
    raw-pointer kernel would drop."""
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch._C._are_functorch_transforms_active()
                or torch._C._len_torch_dispatch_stack() > 0 or _forward_ad._current_level >= 0)


def new_seed() -> int:
    """A dropout seed drawn from torch's default CPU generator (so torch.manual_seed reproduces it)."""
    return int(torch.randint(0, 2**31 - 1, (1,)).item())
