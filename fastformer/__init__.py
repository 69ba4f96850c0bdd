"""fastformer: fused Triton and C++/CUDA kernels for transformers, as drop-in PyTorch ops and modules."""

from .ops import attention, backends, scaled_dot_product_attention, use_backend
from .ops import decode_attention
from .ops import softmax  # issue 7: fused scaled/masked/causal softmax
from .ops.varlen import varlen_attention
from .convert import convert  # issue 8: swap torch.nn transformer modules for fastformer.nn

__version__ = "0.1.0"

__all__ = ["attention", "backends", "scaled_dot_product_attention", "use_backend", "decode_attention", "varlen_attention", "convert", "softmax", "__version__"]
