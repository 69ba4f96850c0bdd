"""``PatchEmbedding``: image → sequence of patch embeddings (ViT's stem), as one GEMM.

The stride-``p`` convolution with a ``p × p`` kernel that ViTs use reads every
pixel exactly once, so it is a matmul: regroup the image into ``(B·N, C·p·p)``
patch rows (one permute copy) and multiply by the kernel viewed as ``(E, C·p·p)``.
That skips the convolution machinery (im2col / algorithm selection) and is what
fuses best with the bias add. Parameters live in ``proj`` (an ``nn.Conv2d`` used
only as storage), so ``state_dict`` keys are timm's ``PatchEmbed`` (``proj.weight``
``(E, C, p, p)``, ``proj.bias``) and weights load either way.
"""

from __future__ import annotations

from typing import Tuple, Union

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PatchEmbedding"]


def _pair(x: Union[int, Tuple[int, int]], name: str) -> Tuple[int, int]:
    pair = (x, x) if isinstance(x, int) else tuple(x)
    if len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair of them, got {x!r}")
    return pair


class PatchEmbedding(nn.Module):
    """Split an image into non-overlapping patches and embed each one.

    Args:
        img_size: expected ``H, W`` (int or pair); must be divisible by ``patch_size``.
        patch_size: patch side ``p`` (int or pair).
        in_chans: image channels ``C``.
        embed_dim: embedding size ``E``.
        bias: learn ``proj.bias``.
        dynamic_img_size: accept any ``H, W`` divisible by the patch size (timm's flag;
            :meth:`grid` gives the patch grid of an input), not only ``img_size``.

    Forward: ``x`` ``(B, C, H, W)`` → ``(B, N, E)`` with ``N = (H/p)·(W/p)`` patches in
    row-major order (timm's ``PatchEmbed`` with ``flatten=True``).
    """

    def __init__(
        self,
        img_size: Union[int, Tuple[int, int]] = 224,
        patch_size: Union[int, Tuple[int, int]] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        bias: bool = True,
        dynamic_img_size: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.img_size = _pair(img_size, "img_size")
        self.patch_size = _pair(patch_size, "patch_size")
        if self.img_size[0] % self.patch_size[0] or self.img_size[1] % self.patch_size[1]:
            raise ValueError(f"img_size {self.img_size} must be divisible by patch_size {self.patch_size}")
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.dynamic_img_size = dynamic_img_size
        self.proj = nn.Conv2d(
            in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size, bias=bias, device=device, dtype=dtype
        )

    def forward(self, x: Tensor) -> Tensor:
        """Embed each non-overlapping patch: ``proj`` (a stride-``p`` convolution) computed as one GEMM.

        Args:
            x: images ``(B, in_chans, H, W)``; ``(H, W)`` must be ``img_size``, or, with
                ``dynamic_img_size``, any size divisible by the patch size.

        Returns:
            ``(B, N, embed_dim)`` with ``N = (H/ph)·(W/pw)`` patches in row-major order.

        Raises:
            ValueError: ``x`` is not 4-D with ``in_chans`` channels, or its size is one the module
                does not take (see :meth:`grid`).
        """
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected x of shape (B, {self.in_chans}, H, W), got {tuple(x.shape)}")
        b, c, h, w = x.shape
        gh, gw = self.grid(x)
        ph, pw = self.patch_size
        # (B, C, gh, ph, gw, pw) → (B, gh, gw, C, ph, pw): one row of C·ph·pw pixels per patch,
        # in the order of the conv kernel's (C, ph, pw) so the weight is used as stored.
        patches = x.reshape(b, c, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * ph * pw)
        return F.linear(patches, self.proj.weight.reshape(self.embed_dim, -1), self.proj.bias)

    def grid(self, x: Tensor) -> Tuple[int, int]:
        """The patch grid ``(H/p, W/p)`` of images ``x (B, C, H, W)``; ValueError for a size it cannot take."""
        h, w = x.shape[-2], x.shape[-1]
        if not self.dynamic_img_size:
            if (h, w) != self.img_size:
                raise ValueError(f"input image size ({h}x{w}) doesn't match model ({self.img_size[0]}x{self.img_size[1]})")
            return self.grid_size
        ph, pw = self.patch_size
        if h % ph or w % pw:
            raise ValueError(f"image size {h}x{w} must be divisible by the patch size {self.patch_size}")
        return h // ph, w // pw

    def extra_repr(self) -> str:
        return f"img_size={self.img_size}, patch_size={self.patch_size}, in_chans={self.in_chans}, embed_dim={self.embed_dim}"
