"""The transformer block: attention and MLP sub-layers with residuals, pre- or post-norm.

Names as timm's ViT ``Block`` (``norm1``, ``attn``, ``norm2``, ``mlp``). The residual add
that precedes a LayerNorm runs fused with it (``fastformer.ops.layer_norm(residual=...)``:
one kernel reads the branch output and the residual stream, writes the new stream and its
normalisation), in both placements.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Type, Union

from torch import Tensor, nn

from ._fused import add_layer_norm
from .attention import Attention
from .kv_cache import KVCache
from .layernorm import LayerNorm
from .mlp import Mlp
from .positional import RotaryEmbedding

__all__ = ["Block", "RenamedSubmodules"]


class Block(nn.Module):
    """One transformer layer.

    Args: ``dim``, ``num_heads``, ``mlp_ratio=4.0``, ``qkv_bias=True``, ``proj_bias=True``,
    ``norm_first=True`` (pre-norm, ViT/GPT; ``False`` is post-norm, BERT/"Attention Is All You
    Need"), ``eps=1e-6``, ``norm_bias=True``, ``act="gelu"`` (:func:`~fastformer.nn.mlp.activation_name`),
    ``gated=False`` (SwiGLU-style MLP), ``drop=0.0`` (after the projections and the MLP's activation),
    ``attn_drop=0.0``, ``num_kv_heads=None`` (GQA), ``rotary=None`` (a :class:`RotaryEmbedding`),
    ``attn_layer=Attention``, ``mlp_layer=Mlp``, ``norm_layer=LayerNorm`` (classes, as timm),
    ``mlp_hidden_dim=None`` (the MLP's width; ``None``: ``int(dim * mlp_ratio)``, timm's rule, which a
    ratio given as a quotient can round down: 30 / 22 * 22 = 29.99...), ``device``, ``dtype``.

    Forward: ``x (B, N, dim)``, ``attn_mask``, ``is_causal``, ``cache``/``layer``/``positions``
    (see :class:`Attention`) → ``(B, N, dim)``.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_bias: bool = True, norm_first: bool = True, eps: float = 1e-6, norm_bias: bool = True,
                 act: Union[str, type, Callable] = "gelu", gated: bool = False, drop: float = 0.0,
                 attn_drop: float = 0.0, num_kv_heads: Optional[int] = None, rotary: Optional[RotaryEmbedding] = None,
                 attn_layer: Type[nn.Module] = Attention, mlp_layer: Type[nn.Module] = Mlp,
                 norm_layer: Type[nn.Module] = LayerNorm, mlp_hidden_dim: Optional[int] = None, device=None,
                 dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm_first = norm_first
        self.norm1 = norm_layer(dim, eps=eps, bias=norm_bias, **dd)
        attn_kw = dict(qkv_bias=qkv_bias, proj_bias=proj_bias, attn_drop=attn_drop, proj_drop=drop, **dd)
        if num_kv_heads is not None:
            attn_kw["num_kv_heads"] = num_kv_heads
        if rotary is not None:
            attn_kw["rotary"] = rotary
        self.attn = attn_layer(dim, num_heads, **attn_kw)
        self.norm2 = norm_layer(dim, eps=eps, bias=norm_bias, **dd)
        mlp_kw = dict(act_layer=act, bias=proj_bias, drop=drop, **dd)
        if gated:
            mlp_kw["gated"] = True
        self.mlp = mlp_layer(dim, mlp_hidden_dim if mlp_hidden_dim is not None else int(dim * mlp_ratio), **mlp_kw)

    def _attend(self, x: Tensor, attn_mask, is_causal, cache, layer, positions) -> Tensor:
        if cache is None and positions is None and not is_causal:
            return self.attn(x, attn_mask) if attn_mask is not None else self.attn(x)  # any timm-style attn_layer
        return self.attn(x, attn_mask, is_causal, cache, layer, positions)

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False,
                cache: Optional[KVCache] = None, layer: int = 0, positions: Optional[Tensor] = None) -> Tensor:
        """The attention and MLP sub-layers, each with its residual.

        Pre-norm (``norm_first=True``): ``x = x + attn(norm1(x))``, then ``x + mlp(norm2(x))``.
        Post-norm: ``x = norm1(x + attn(x))``, then ``norm2(x + mlp(x))``. A residual add followed by
        a LayerNorm is done by the fused norm op.

        Args:
            x: ``(B, N, dim)``.
            attn_mask: ``None``, or SDPA's convention (bool ``True`` = attend, or float added to the
                scores), broadcastable to ``(B, H, N, N)``.
            is_causal: causal self-attention.
            cache, layer, positions: KV cache, this block's index in it and rotary positions; see
                :meth:`Attention.forward`.

        Without ``cache``, ``positions`` and ``is_causal``, ``attn`` is called as ``attn(x)`` or
        ``attn(x, attn_mask)``, so a timm-style ``attn_layer`` works.

        Returns:
            ``(B, N, dim)``.
        """
        if self.norm_first:
            a = self._attend(self.norm1(x), attn_mask, is_causal, cache, layer, positions)
            h, x = add_layer_norm(a, self.norm2, residual=x, return_residual=True)  # x += a; h = norm2(x)
            return x + self.mlp(h)
        x = add_layer_norm(self._attend(x, attn_mask, is_causal, cache, layer, positions), self.norm1, residual=x)
        return add_layer_norm(self.mlp(x), self.norm2, residual=x)


class RenamedSubmodules(nn.Module):
    """Mixin: keep a block's code while its submodules carry a checkpoint's own names.

    A subclass sets ``RENAMED = {"qkv": "c_attn", ...}`` and calls :meth:`_rename` at the end
    of ``__init__``: the submodules are re-registered under the new names (so ``state_dict``
    keys are the checkpoint's, in the same order) and reads of the old names resolve to them.
    """

    RENAMED: Dict[str, str] = {}

    def _rename(self) -> None:
        items = [(self.RENAMED.get(k, k), v) for k, v in self._modules.items()]
        self._modules.clear()
        self._modules.update(items)

    def __getattr__(self, name: str):
        return super().__getattr__(type(self).RENAMED.get(name, name))
