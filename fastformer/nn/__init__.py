"""Every transformer building block once, on fastformer's fused ops, and the torch.nn drop-ins built from them.

Blocks (timm's names and constructor arguments): :class:`Attention` (GQA, rotary, q/k norm, KV cache),
:class:`CrossAttention`, :class:`Mlp` / :class:`GatedMlp` (fused FFN), :class:`FeedForward`
(torch's ``linear1``/``linear2`` names), :class:`Block` (pre/post norm, fused residual + LayerNorm),
:class:`LayerNorm` / :class:`RMSNorm`, :class:`RotaryEmbedding` / :class:`SinusoidalPositionalEncoding`
(and :func:`alibi_slopes`),
:class:`PatchEmbedding`, :class:`KVCache`. Drop-ins: :class:`MultiheadAttention`, ``Transformer*``.
``convert`` swaps a model's torch.nn (and timm) modules for these.
"""

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
from .positional import RotaryEmbedding, SinusoidalPositionalEncoding, alibi_slopes

# Issue 17: one family of blocks.
from .kv_cache import KVCache
from .attention import Attention, CrossAttention
from .mlp import GatedMlp, Mlp
from .block import Block, RenamedSubmodules
