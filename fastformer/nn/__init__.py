"""Drop-in replacements for torch.nn transformer modules, running on fastformer's kernels."""

# Issue 8: drop-in attention and transformer modules, patch embedding.
from .activation import MultiheadAttention
from .patch_embedding import PatchEmbedding
from .transformer import (
    Transformer,
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)

# Issue 7: fused norms, feed-forward and positional encodings.
from .layernorm import LayerNorm, RMSNorm
from .feedforward import FeedForward
from .positional import RotaryEmbedding, SinusoidalPositionalEncoding

# Issue 17: one family of blocks.
from .attention import Attention
