"""``python -m fastformer.info``: versions, device and the attention backend table."""

from __future__ import annotations

import platform

import torch

from . import __version__, _ext
from .ops.attention.registry import AUTO_ORDER, backends


def describe() -> str:
    lines = [f"fastformer {__version__}", f"python {platform.python_version()}", f"torch {torch.__version__}"]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except Exception as exc:
        lines.append(f"triton: not importable ({type(exc).__name__})")
    if torch.cuda.is_available():
        lines.append(f"device: {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})")
    else:
        lines.append("device: CPU only (no CUDA GPU visible)")
    if _ext.C is not None:
        lines.append(
            f"extension fastformer._C: built ({'with' if _ext.C.with_cuda else 'without'} CUDA); "
            f"CPU features: {', '.join(_ext.C.cpu_features()) or 'baseline'}"
        )
        build = getattr(_ext.C, "build_info", {})  # absent in builds older than the attribute
        if _ext.C.with_cuda:
            lines.append(
                f"CUDA kernels: built for {', '.join(build.get('cuda_archs', [])) or '?'} with "
                f"{build.get('cuda_toolkit') or 'an unrecorded toolkit'}"
            )
        if build.get("torch") and build["torch"] != torch.__version__.split("+")[0]:
            lines.append(f"WARNING: fastformer._C was built against torch {build['torch']}: rebuild it")
    else:
        lines.append(f"extension fastformer._C: unavailable ({_ext.LOAD_ERROR})")
    lines.append("")
    lines.append(backends().table())
    lines.append("")
    order = "; ".join(f"{dev}: {' > '.join(names + ['reference'])}" for dev, names in AUTO_ORDER.items())
    lines.append(f'"auto" tries, per device: {order}; other devices: reference')
    try:
        from .ops.attention.cpu import policy_summary

        lines += policy_summary()
    except ImportError as exc:  # the cpu backend module itself failed to import
        lines.append(f"cpu auto policy: unavailable ({exc})")
    return "\n".join(lines)


if __name__ == "__main__":
    print(describe())
