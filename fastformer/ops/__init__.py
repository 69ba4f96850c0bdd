"""Functional ops: validation, backend dispatch and autograd around the kernels."""

from .attention import attention, scaled_dot_product_attention
from .decode_attention import decode_attention
from .dispatch import backends, use_backend
# Issue 7: fused softmax, norms, feed-forward and positional encodings.
from .softmax import softmax
from .layernorm import layer_norm, rms_norm

__all__ = ["attention", "scaled_dot_product_attention", "backends", "use_backend", "decode_attention",
           "softmax", "layer_norm", "rms_norm"]
