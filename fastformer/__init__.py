"""fastformer: fused Triton and C++/CUDA kernels for transformers, as drop-in PyTorch ops and modules.

Importing ``fastformer`` (or ``fastformer.ops``, ``fastformer.kernels``) loads the ops only;
``fastformer.nn`` and ``fastformer.models`` load when first used, and ``fastformer.convert``
(which swaps torch.nn modules for ``fastformer.nn``'s) with them.
"""

from .ops import attention, attention_qkvpacked, backends, scaled_dot_product_attention, use_backend
from .ops import decode_attention
from .ops import softmax  # issue 7: fused scaled/masked/causal softmax
from .ops import varlen_attention

__version__ = "0.1.0"

__all__ = ["attention", "attention_qkvpacked", "backends", "scaled_dot_product_attention", "use_backend", "decode_attention", "varlen_attention", "convert", "softmax", "__version__"]


def __getattr__(name):
    # Lazy, so that importing the ops never imports nn/ (PEP 562).
    if name == "convert":
        from .nn.convert import convert

        globals()["convert"] = convert
        return convert
    if name in ("nn", "models", "integrations"):
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'fastformer' has no attribute {name!r}")
