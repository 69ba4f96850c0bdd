"""What the CUDA kernels of ``fastformer._C`` need to know about a device.

The torch-facing bindings include no ATen CUDA headers (see
csrc/cuda/attention_binding.cpp), so Python hands them the current stream as
an integer and the device limits their launch planning depends on.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch

from .._ext import C, LOAD_ERROR


def cuda_extension_unavailable() -> Optional[str]:
    """None when fastformer._C has its CUDA kernels and a CUDA device is present, else why not."""
    if C is None:
        return f"the compiled extension fastformer._C is unavailable: {LOAD_ERROR}"
    if not getattr(C, "with_cuda", False):
        if torch.version.cuda is None:  # a rebuild cannot help here
            return (f"needs a CUDA GPU and a CUDA build of torch (this torch, {torch.__version__}, is a CPU-only "
                    "build, so fastformer._C was built without its CUDA kernels)")
        if not torch.cuda.is_available():
            return "needs a CUDA GPU (none is visible; fastformer._C was built without its CUDA kernels)"
        return (
            "fastformer._C was built without CUDA kernels although this torch has CUDA (nvcc was not found, "
            "or FASTFORMER_NO_CUDA=1); rebuild with 'pip install --no-build-isolation -e .'"
        )
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (none is visible)"
    return None


@functools.lru_cache(maxsize=None)
def device_limits(index: int) -> Tuple[int, int]:
    """(SM count, opt-in shared memory per block in bytes) of CUDA device ``index``."""
    props = torch.cuda.get_device_properties(index)
    smem = getattr(props, "shared_memory_per_block_optin", 0) or 48 * 1024
    return props.multi_processor_count, int(smem)


def launch_context(device: torch.device) -> Tuple[int, int, int]:
    """(stream handle, SM count, opt-in shared memory) for a launch on ``device``'s current stream."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    sm_count, smem = device_limits(index)
    return torch.cuda.current_stream(index).cuda_stream, sm_count, smem


def rows_aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` with a unit last stride, a 16-byte aligned base and 16-byte multiple strides
    (what cp.async row copies need); a contiguous copy when it has not."""
    es = t.element_size()
    ok = (
        t.stride(-1) == 1
        and t.data_ptr() % 16 == 0
        and all(t.size(i) == 1 or (t.stride(i) * es) % 16 == 0 for i in range(t.dim() - 1))
    )
    return t if ok else t.clone(memory_format=torch.contiguous_format)
