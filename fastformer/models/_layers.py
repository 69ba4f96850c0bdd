"""The few building blocks the models take from ``fastformer.nn`` / ``fastformer.ops``.

Each is one small function so that when a fused module lands it is switched
on here, in one place, for every model. Until then (or when the fused module
is missing from this install) the PyTorch equivalent is used; both keep
torch's parameter names (``weight``, ``bias``), so checkpoints do not change.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def layer_norm(dim: int, eps: float = 1e-5, bias: bool = True) -> nn.Module:
    """``LayerNorm(dim)``: fastformer's fused one when present, else torch's."""
    try:
        from fastformer.nn import LayerNorm  # issue 7
    except ImportError:
        LayerNorm = nn.LayerNorm
    return LayerNorm(dim, eps=eps, bias=bias)


def activation(name: str):
    """The MLP nonlinearity by name: ``gelu`` (erf), ``gelu_tanh`` (GPT-2's gelu_new), ``relu``, ``silu``."""
    table = {
        "gelu": F.gelu,
        "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "relu": F.relu,
        "silu": F.silu,
    }
    if name not in table:
        raise ValueError(f"activation must be one of {sorted(table)}, got {name!r}")
    return table[name]


# ----------------------------------------------------------------------------- positions

def rotary_cos_sin(positions: Tensor, head_dim: int, base: float, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """cos/sin tables ``(T, head_dim)`` for integer ``positions (T,)`` (rotate-half layout)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # (T, head_dim / 2)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x (B, H, T, D)`` by the angles of ``cos/sin (T, D)`` (GPT-NeoX / Llama layout)."""
    half = x.shape[-1] // 2
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # autocast: q/k may be bf16 while the tables are fp32
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def sinusoidal_table(length: int, dim: int, device=None, dtype=torch.float32) -> Tensor:
    """The fixed positional encoding of "Attention Is All You Need": ``(length, dim)``,
    sin on even channels, cos on odd ones."""
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim, device=device, dtype=torch.float32)
    table[:, 0::2] = torch.sin(pos * div)
    table[:, 1::2] = torch.cos(pos * div)[:, : dim // 2]
    return table.to(dtype)


# ----------------------------------------------------------------------------- patches

class PatchEmbed(nn.Module):
    """Image ``(B, C, H, W)`` → patch tokens ``(B, N, D)``: a stride-``p`` convolution
    computed as one matmul over unfolded patches. The weight keeps the conv layout
    ``proj.weight (D, C, p, p)`` (as timm), so checkpoints load unchanged."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, bias: bool = True):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size, bias=bias)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tuple[int, int]]:
        B, C, H, W = x.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} must be divisible by the patch size {p}")
        gh, gw = H // p, W // p
        patches = x.reshape(B, C, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, C * p * p)
        tokens = F.linear(patches, self.proj.weight.reshape(self.proj.out_channels, -1), self.proj.bias)
        return tokens, (gh, gw)


def resample_grid(pos: Tensor, old: Tuple[int, int], new: Tuple[int, int]) -> Tensor:
    """Bicubic resampling of grid position embeddings ``(1, old_h*old_w, D)`` → ``(1, new_h*new_w, D)``."""
    if tuple(old) == tuple(new):
        return pos
    D = pos.shape[-1]
    grid = pos.reshape(1, old[0], old[1], D).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=new, mode="bicubic", align_corners=False, antialias=new[0] < old[0])
    return grid.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], D).to(pos.dtype)
