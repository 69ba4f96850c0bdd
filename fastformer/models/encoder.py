"""The bidirectional transformer layer shared by BERT, ViT and the time-series model.

Self-attention with fused q/k/v projection through
:func:`fastformer.scaled_dot_product_attention` (optional mask), an MLP, and
residual connections with the norm either before (``norm_first``, ViT) or
after (BERT, "Attention Is All You Need") each sub-layer.
"""

from __future__ import annotations

from typing import Optional

import torch.nn as nn
from torch import Tensor

import fastformer
from ._layers import activation, layer_norm


class SelfAttention(nn.Module):
    """``x (B, T, D)`` → ``(B, T, D)``; ``mask`` as in torch SDPA (bool: True = attend)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, T, hd)
        y = fastformer.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.attn_drop if self.training else 0.0, is_causal=is_causal)
        return self.proj_drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str = "gelu", bias: bool = True, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = activation(act)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class EncoderBlock(nn.Module):
    """One transformer encoder layer (names as timm's ViT ``Block``: norm1, attn, norm2, mlp)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 norm_first: bool = True, eps: float = 1e-6, act: str = "gelu", drop: float = 0.0,
                 attn_drop: float = 0.0):
        super().__init__()
        self.norm_first = norm_first
        self.norm1 = layer_norm(dim, eps)
        self.attn = SelfAttention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.norm2 = layer_norm(dim, eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act=act, drop=drop)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        if self.norm_first:
            x = x + self.attn(self.norm1(x), mask, is_causal)
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + self.attn(x, mask, is_causal))
        return self.norm2(x + self.mlp(x))
