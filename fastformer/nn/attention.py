"""timm: a ViT attention layer on fastformer, and ``convert`` support for timm's ``Attention``.

    from fastformer.integrations.timm import Attention
    model = timm.models.vision_transformer.VisionTransformer(..., attn_layer=Attention)

    model, report = fastformer.convert(timm_model)   # swaps every timm Attention block

:class:`Attention` has timm's ``Attention`` constructor and submodules
(``qkv``, ``q_norm``, ``k_norm``, ``attn_drop``, ``norm``, ``proj``, ``proj_drop``),
so pretrained ``state_dict`` s load unchanged. It does not import timm; the
converter is registered with :func:`fastformer.convert` when timm is importable.
"""

from __future__ import annotations

from typing import Optional, Type

import torch
from torch import nn

from ..ops import scaled_dot_product_attention

__all__ = ["Attention"]


class Attention(nn.Module):
    """Multi-head self-attention with one QKV projection (timm's ``Attention``), fused.

    Args (timm's): ``dim``, ``num_heads=8``, ``attn_head_dim=None`` (default ``dim // num_heads``),
    ``dim_out=None`` (default ``dim``), ``qkv_bias=False``, ``qk_norm=False``,
    ``scale_norm=False``, ``proj_bias=True``, ``attn_drop=0.``, ``proj_drop=0.``,
    ``norm_layer=None`` (required for ``qk_norm``/``scale_norm``), ``device``, ``dtype``.
    Other keyword arguments newer timm versions pass are accepted and ignored only
    when they are at their neutral value (else ``TypeError``).

    Forward: ``x`` ``(B, N, dim)``, ``attn_mask`` (SDPA convention: bool ``True`` =
    attend, or float added; broadcastable to ``(B, H, N, N)``), ``is_causal`` →
    ``(B, N, dim_out)``.
    """

    fused_attn: bool = True  # timm reads this flag; the fused path is the only path here

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        attn_head_dim: Optional[int] = None,
        dim_out: Optional[int] = None,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Optional[Type[nn.Module]] = None,
        device=None,
        dtype=None,
        **unused,
    ) -> None:
        super().__init__()
        for name, value in unused.items():
            if value not in (None, False, 0, 0.0):
                raise TypeError(f"Attention got an unsupported argument {name}={value!r}")
        dd = {"device": device, "dtype": dtype}
        dim_out = dim_out or dim
        head_dim = attn_head_dim
        if head_dim is None:
            if dim % num_heads != 0:
                raise ValueError(f"dim should be divisible by num_heads, got dim={dim}, num_heads={num_heads}")
            head_dim = dim // num_heads
        if (qk_norm or scale_norm) and norm_layer is None:
            raise ValueError("norm_layer must be provided if qk_norm or scale_norm is True")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.attn_dim = num_heads * head_dim
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(self.attn_dim, **dd) if scale_norm else nn.Identity()
        self.proj = nn.Linear(self.attn_dim, dim_out, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        b, n, _ = x.shape
        # (B, N, 3·H·D) viewed as (3, B, H, N, D): no copy, the kernel reads the strides.
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        out = scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.attn_drop.p if self.training else 0.0,
            is_causal=is_causal,
            scale=self.scale,
        )
        out = out.transpose(1, 2).reshape(b, n, self.attn_dim)
        return self.proj_drop(self.proj(self.norm(out)))
