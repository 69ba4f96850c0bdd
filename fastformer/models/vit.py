"""ViT: the Vision Transformer with timm's options and parameter names.

Patch embedding as one matmul, optional class token, learned positions
(resampled bicubically when the input image size differs from ``img_size``),
pre-norm encoder blocks, and a linear head on the class token or the mean of
the patch tokens. Names match timm's ``VisionTransformer``
(``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.0.attn.qkv``,
``norm``/``fc_norm``, ``head``), so a timm state dict loads directly.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..nn import Block, LayerNorm, PatchEmbedding


def resample_grid(pos: Tensor, old: Tuple[int, int], new: Tuple[int, int]) -> Tensor:
    """Bicubic resampling of grid position embeddings ``(1, old_h*old_w, D)`` → ``(1, new_h*new_w, D)``."""
    if tuple(old) == tuple(new):
        return pos
    D = pos.shape[-1]
    grid = pos.reshape(1, old[0], old[1], D).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=new, mode="bicubic", align_corners=False, antialias=new[0] < old[0])
    return grid.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], D).to(pos.dtype)


def _pair(x: Union[int, Tuple[int, int]]) -> Tuple[int, int]:
    return (x, x) if isinstance(x, int) else (int(x[0]), int(x[1]))


class ViT(nn.Module):
    """``forward(images (B, in_chans, H, W))`` → logits ``(B, num_classes)`` (or the pooled
    features ``(B, embed_dim)`` when ``num_classes=0``); with ``global_pool=""`` (no pooling, as
    timm) one row per token, ``(B, prefix + N, num_classes)``.

    Args (as timm): img_size, patch_size, in_chans, num_classes, embed_dim, depth,
    num_heads, mlp_ratio, qkv_bias, global_pool (``"token"``, ``"avg"`` or ``""``),
    class_token; plus drop_rate, attn_drop_rate, eps (LayerNorm epsilon) and
    use_checkpoint (recompute blocks in the backward pass).
    """

    def __init__(self, img_size: Union[int, Tuple[int, int]] = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, global_pool: str = "token",
                 class_token: bool = True, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 eps: float = 1e-6, use_checkpoint: bool = False):
        super().__init__()
        if global_pool not in ("", "token", "avg"):
            raise ValueError(f"global_pool must be '', 'token' or 'avg', got {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs class_token=True")
        self.img_size = _pair(img_size)
        if self.img_size[0] % patch_size or self.img_size[1] % patch_size:
            raise ValueError(f"img_size {self.img_size} must be divisible by patch_size {patch_size}")
        self.grid = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.embed_dim = embed_dim
        self.use_checkpoint = use_checkpoint
        self.num_prefix_tokens = 1 if class_token else 0

        self.patch_embed = PatchEmbedding(self.img_size, patch_size, in_chans, embed_dim, dynamic_img_size=True)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        n = self.grid[0] * self.grid[1] + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.randn(1, n, embed_dim) * 0.02)
        self.pos_drop = nn.Dropout(drop_rate)
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, norm_first=True, eps=eps,
                         act="gelu", drop=drop_rate, attn_drop=attn_drop_rate)
            for _ in range(depth)
        ])
        # As timm: average pooling normalises after pooling (fc_norm), token pooling before.
        use_fc_norm = global_pool == "avg"
        self.norm = LayerNorm(embed_dim, eps=eps) if not use_fc_norm else nn.Identity()
        self.fc_norm = LayerNorm(embed_dim, eps=eps) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def _pos_embed(self, x: Tensor, grid: Tuple[int, int]) -> Tensor:
        pos = self.pos_embed
        prefix, patches = pos[:, : self.num_prefix_tokens], pos[:, self.num_prefix_tokens:]
        patches = resample_grid(patches, self.grid, grid)  # identity at the trained size
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + torch.cat([prefix, patches], dim=1)

    def forward_features(self, images: Tensor) -> Tensor:
        """Tokens after the encoder and final norm: ``(B, prefix + N, embed_dim)``."""
        if images.dim() != 4:
            raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
        grid = self.patch_embed.grid(images)
        x = self.patch_embed(images)
        x = self.pos_drop(self._pos_embed(x, grid))
        for block in self.blocks:
            if self.use_checkpoint and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens:].mean(dim=1)
        elif self.global_pool == "token":
            x = x[:, 0]
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def forward(self, images: Tensor) -> Tensor:
        """Classify ``images``: :meth:`forward_features`, then :meth:`forward_head`.

        Args:
            images: ``(B, in_chans, H, W)``; any ``H, W`` divisible by the patch size (the grid
                position embeddings are resampled bicubically when it differs from ``img_size``'s).

        Returns:
            Logits ``(B, num_classes)``, or the pooled features ``(B, embed_dim)`` when
            ``num_classes=0``. With ``global_pool=""`` nothing is pooled: one row per token,
            ``(B, prefix + N, num_classes or embed_dim)``.

        Raises:
            ValueError: ``images`` is not 4-D with ``in_chans`` channels, or ``H`` / ``W`` is not
                divisible by the patch size.
        """
        return self.forward_head(self.forward_features(images))

    def set_img_size(self, img_size: Union[int, Tuple[int, int]]) -> None:
        """Resample the stored position embeddings to a new default image size."""
        size = _pair(img_size)
        ph, pw = self.patch_embed.patch_size
        grid = (size[0] // ph, size[1] // pw)
        with torch.no_grad():
            prefix = self.pos_embed[:, : self.num_prefix_tokens]
            patches = resample_grid(self.pos_embed[:, self.num_prefix_tokens:], self.grid, grid)
            self.pos_embed = nn.Parameter(torch.cat([prefix, patches], dim=1))
        self.img_size, self.grid = size, grid

    @classmethod
    def from_hf(cls, model_or_path, **overrides) -> "ViT":
        """Load a Hugging Face ``ViTForImageClassification`` / ``ViTModel`` (object or local
        directory with ``config.json`` + ``*.safetensors``); no network. Returned in eval mode, as
        ``from_pretrained`` returns it."""
        from .hf_convert import vit_from_hf

        return vit_from_hf(cls, model_or_path, **overrides)

    def to_hf(self):
        """This model as ``transformers.ViTForImageClassification`` (class-token pooling only)."""
        from .hf_convert import vit_to_hf

        return vit_to_hf(self)
