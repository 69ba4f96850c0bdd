"""Functional ops: validation, backend dispatch and autograd around the kernels.

Importing this package imports nothing of ``fastformer.nn`` or ``fastformer.models``.
"""

from . import decode_attention as _old_decode_path  # noqa: F401  (bind the module first; the function wins below)
from .attention import (
    attention,
    attention_qkvpacked,
    backends,
    decode_attention,
    load_all_backends,
    scaled_dot_product_attention,
    use_backend,
    varlen_attention,
)
# Issue 7: fused softmax, norms, feed-forward and positional encodings.
from .softmax import softmax
from .layernorm import layer_norm, rms_norm
from .ffn import feed_forward, gated_linear, linear_act
from .linear import linear
from .activation import gelu
from .rope import apply_rotary
from .sinusoidal import add_sinusoidal_positions

__all__ = ["attention", "attention_qkvpacked", "scaled_dot_product_attention", "varlen_attention", "backends", "use_backend",
           "decode_attention", "linear", "gelu", "softmax", "layer_norm", "rms_norm", "linear_act", "gated_linear", "feed_forward",
           "apply_rotary", "add_sinusoidal_positions"]

# Backends register themselves on import; do it now, outside any torch.compile trace.
load_all_backends()
