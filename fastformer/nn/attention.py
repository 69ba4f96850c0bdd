"""Self- and cross-attention blocks with timm's names, on fastformer's attention ops.

:class:`Attention` has timm's ``Attention`` constructor and submodules (``qkv``,
``q_norm``, ``k_norm``, ``attn_drop``, ``norm``, ``proj``, ``proj_drop``), so timm
checkpoints load unchanged (``fastformer.integrations.timm`` plugs it into timm
models; ``fastformer.convert`` swaps timm's for it). On top of timm's it takes
grouped-query attention (``num_kv_heads``: ``qkv`` projects ``Hq + 2·Hkv`` heads),
rotary positions (``rotary=``, a :class:`~fastformer.nn.RotaryEmbedding` run by the
fused RoPE op), the attention variants of :func:`fastformer.attention` (a sliding window,
ALiBi, logit soft-capping) and a KV-cache path for decoding (:class:`~fastformer.nn.KVCache`,
attended with the decode kernel, variants included). :class:`CrossAttention` attends from one sequence to
another (encoder memory), with a cached projection of the memory for decoding.
"""

from __future__ import annotations

from typing import Optional, Tuple, Type

import torch
from torch import Tensor, nn

from .. import ops
from ..ops.attention.variants import check_softcap, check_window
from ._fused import apply_linear
from .kv_cache import KVCache
from .positional import RotaryEmbedding, alibi_slopes as standard_alibi_slopes

__all__ = ["Attention", "CrossAttention"]


def _heads(x: Tensor, heads: int, head_dim: int) -> Tensor:
    B, T, _ = x.shape
    return x.view(B, T, heads, head_dim).transpose(1, 2)  # (B, h, T, hd), a view


class Attention(nn.Module):
    """Multi-head self-attention with one QKV projection (timm's ``Attention``), fused.

    Args (timm's): ``dim``, ``num_heads=8``, ``attn_head_dim=None`` (default ``dim // num_heads``),
    ``dim_out=None`` (default ``dim``), ``qkv_bias=False``, ``qk_norm=False``,
    ``scale_norm=False``, ``proj_bias=True``, ``attn_drop=0.``, ``proj_drop=0.``,
    ``norm_layer=None`` (required for ``qk_norm``/``scale_norm``), ``device``, ``dtype``.
    fastformer's: ``num_kv_heads=None`` (fewer key/value heads: GQA/MQA; ``num_heads`` must be
    a multiple), ``rotary=None`` (a :class:`RotaryEmbedding` applied to q and k after q/k norm).
    Variants (:func:`fastformer.attention`'s, FlashAttention's names): ``window_size=(-1, -1)``
    (``(left, right)``: query ``i`` sees keys ``i - left .. i + right``, ``-1`` = unlimited; a
    causal sliding window of ``W`` tokens is ``(W - 1, 0)``); ``alibi=False`` (ALiBi with the
    standard slopes of :func:`~fastformer.nn.alibi_slopes`) or ``alibi_slopes=None`` (your own,
    a float ``(num_heads,)`` tensor; kept float32 whatever the module's dtype), adding
    ``-slope · |i - j|``; ``softcap=0.0`` (``> 0``: scores become ``softcap · tanh(scores / softcap)``).
    They apply to full sequences and to the KV-cache decoding steps alike.
    Other keyword arguments newer timm versions pass are accepted and ignored only when they
    are at their neutral value (else ``TypeError``).

    Forward: ``x (B, N, dim)``; ``attn_mask`` (SDPA convention: bool ``True`` = attend, or
    float added; broadcastable to ``(B, H, N, N)``); ``is_causal``; ``cache`` (a
    :class:`KVCache`: this layer's new keys/values are written at ``cache.length`` and,
    once the cache holds earlier tokens, the ``N`` new queries attend over all of them with
    the decode kernel, causal bottom-right); ``layer``: this block's index in the cache;
    ``positions``: rotary positions ``(N,)`` or ``(B, N)`` (default ``cache.length + arange(N)``)
    → ``(B, N, dim_out)``.
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
        num_kv_heads: Optional[int] = None,
        rotary: Optional[RotaryEmbedding] = None,
        window_size: Tuple[int, int] = (-1, -1),
        alibi: bool = False,
        alibi_slopes: Optional[Tensor] = None,
        softcap: float = 0.0,
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
        kv_heads = num_kv_heads or num_heads
        if num_heads % kv_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({kv_heads})")
        if (qk_norm or scale_norm) and norm_layer is None:
            raise ValueError("norm_layer must be provided if qk_norm or scale_norm is True")
        self.num_heads = num_heads
        self.num_kv_heads = kv_heads
        self.head_dim = head_dim
        self.attn_dim = num_heads * head_dim
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, (num_heads + 2 * kv_heads) * head_dim, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(self.attn_dim, **dd) if scale_norm else nn.Identity()
        self.proj = nn.Linear(self.attn_dim, dim_out, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.rotary = rotary
        self.window_size = check_window(tuple(window_size) if isinstance(window_size, list) else window_size)
        self.softcap = check_softcap(softcap)
        if alibi and alibi_slopes is not None:
            raise ValueError("Attention: pass alibi=True (standard slopes) or alibi_slopes, not both")
        if alibi_slopes is not None:
            if not isinstance(alibi_slopes, Tensor) or not alibi_slopes.is_floating_point():
                raise TypeError(f"Attention: alibi_slopes must be a float tensor, got {alibi_slopes!r}")
            if tuple(alibi_slopes.shape) != (num_heads,):
                raise ValueError(f"Attention: alibi_slopes must have shape ({num_heads},) (num_heads), "
                                 f"got {tuple(alibi_slopes.shape)}")
            alibi_slopes = alibi_slopes.detach().to(device=device, dtype=torch.float32)
        elif alibi:
            alibi_slopes = standard_alibi_slopes(num_heads, device=device)
        # Fixed, not learned, and float32 whatever the module's dtype (the ops' contract): a plain
        # attribute (not a buffer, which .half() would cast), moved to the inputs' device on use.
        self.alibi_slopes = alibi_slopes

    def _variant(self, device) -> dict:
        """The variant keyword arguments of the attention ops; ``{}`` when none is set."""
        window = getattr(self, "window_size", (-1, -1))  # modules converted from timm lack them
        softcap = getattr(self, "softcap", 0.0)
        slopes = getattr(self, "alibi_slopes", None)
        if window == (-1, -1) and slopes is None and softcap == 0.0:
            return {}
        if slopes is not None and slopes.device != device:
            slopes = self.alibi_slopes = slopes.to(device)
        return dict(window_size=window, alibi_slopes=slopes, softcap=softcap)

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False,
                cache: Optional[KVCache] = None, layer: int = 0, positions: Optional[Tensor] = None) -> Tensor:
        """Self-attention over ``x``, optionally with a KV cache for decoding.

        Args:
            x: ``(B, N, dim)``.
            attn_mask: ``None``, or SDPA's convention: bool ``True`` = attend, or float added to the
                scores; broadcastable to ``(B, H, N, N)``. Not used on a decoding step (below).
            is_causal: causal mask, aligned top-left (query ``i`` sees keys ``j <= i``).
            cache: a :class:`KVCache`. While it is empty (prefill), ``x`` attends within itself
                (``attn_mask``, ``is_causal`` as given) and its keys/values are written to the cache.
                Once it holds earlier tokens (decoding), the new keys/values are written at
                ``cache.length`` and the ``N`` queries attend over all ``cache.length + N`` entries
                (:func:`fastformer.decode_attention`, causal bottom-right, whatever ``is_causal``;
                an ``attn_mask`` there is refused, as it cannot be applied).
                ``cache.length`` is not advanced here: call :meth:`KVCache.advance` once every layer wrote.
            layer: this layer's index in ``cache``.
            positions: rotary positions ``(N,)`` or ``(B, N)``; default ``cache.length + arange(N)``
                (``arange(N)`` without a cache). Used only when the module has ``rotary``.

        The variants (``window_size``, ALiBi, ``softcap``) apply on every path. ``attn_drop`` applies
        in training mode, except on decoding steps.

        Returns:
            ``(B, N, dim_out)``.

        Raises:
            ``RuntimeError`` from :meth:`KVCache.write` when the cache cannot hold ``N`` more tokens;
            ``ValueError`` naming ``attn_mask`` when one is given on a decoding step;
            errors of :func:`fastformer.scaled_dot_product_attention` for an ``attn_mask`` it rejects.
        """
        B, N, _ = x.shape
        kv_heads = getattr(self, "num_kv_heads", None) or self.num_heads  # modules converted from timm lack it
        q_dim, kv_dim = self.num_heads * self.head_dim, kv_heads * self.head_dim
        rotary = getattr(self, "rotary", None)
        y = apply_linear(self.qkv, x)
        if (cache is None and attn_mask is None and kv_heads == self.num_heads and rotary is None
                and isinstance(self.q_norm, nn.Identity) and isinstance(self.k_norm, nn.Identity)):
            # Self-attention straight from the projection: the packed op writes (B, N, H, hd), which
            # proj reads as (B, N, H·hd), and (on CPU) the packed gradient of y, all without copies.
            out = ops.attention_qkvpacked(
                y.view(B, N, 3, self.num_heads, self.head_dim), self.attn_drop.p if self.training else 0.0,
                softmax_scale=self.scale, causal=is_causal, **self._variant(x.device),
            )
            return self.proj_drop(apply_linear(self.proj, self.norm(out.reshape(B, N, self.attn_dim))))
        # One GEMM for q, k, v; each is a strided view of its output, (B, h, N, hd): no copy.
        q, k, v = y.split([q_dim, kv_dim, kv_dim], dim=-1)
        q = _heads(q, self.num_heads, self.head_dim)
        k = _heads(k, kv_heads, self.head_dim)
        v = _heads(v, kv_heads, self.head_dim)
        q, k = self.q_norm(q), self.k_norm(k)
        start = cache.length if cache is not None else 0
        if rotary is not None:
            if positions is None:
                positions = torch.arange(start, start + N, device=x.device)
            q, k = rotary(q, k, positions)
        variant = self._variant(x.device)
        if cache is not None and cache.length > 0:  # decoding: the new tokens attend over the cache
            if attn_mask is not None:  # decode_attention takes no mask: ignoring it would be silently wrong
                raise ValueError("Attention: attn_mask cannot be applied on a decoding step (a cache that already "
                                 "holds tokens): the new tokens attend over every cached entry, causal "
                                 "bottom-right; pass attn_mask=None (e.g. trim padding instead)")
            k_all, v_all = cache.write(layer, k, v)
            # Bottom-right aligned: the window and ALiBi's distances count from each new token's position.
            out = ops.decode_attention(q, k_all, v_all, cache.length + N, self.scale, **variant)
        else:
            if cache is not None:  # prefill: attend within the prompt, then remember it
                cache.write(layer, k, v)
            sdpa = ops.attention if variant else ops.scaled_dot_product_attention
            out = sdpa(
                q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop.p if self.training else 0.0,
                is_causal=is_causal, scale=self.scale, enable_gqa=kv_heads != self.num_heads, **variant,
            )
        out = out.transpose(1, 2).reshape(B, N, self.attn_dim)  # (B, N, H·hd)
        return self.proj_drop(apply_linear(self.proj, self.norm(out)))


class CrossAttention(nn.Module):
    """Attention from ``x`` to another sequence (the encoder memory).

    Args: ``dim`` (of ``x``), ``num_heads``, ``kv_dim=None`` (of the memory, default ``dim``),
    ``qkv_bias=True``, ``proj_bias=True``, ``attn_drop=0.``, ``proj_drop=0.``, ``device``, ``dtype``.
    Submodules: ``q`` ``(dim → dim)``, ``kv`` ``(kv_dim → 2·dim)``, ``proj``.

    Forward: ``x (B, T, dim)``, ``memory (B, S, kv_dim)`` or its projection ``memory_kv``
    (from :meth:`memory_kv`, computed once per source when decoding), ``attn_mask``
    broadcastable to ``(B, H, T, S)`` → ``(B, T, dim)``.
    """

    def __init__(self, dim: int, num_heads: int = 8, kv_dim: Optional[int] = None, qkv_bias: bool = True,
                 proj_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0, device=None, dtype=None):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim should be divisible by num_heads, got dim={dim}, num_heads={num_heads}")
        dd = {"device": device, "dtype": dtype}
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.kv = nn.Linear(kv_dim or dim, 2 * dim, bias=qkv_bias, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def memory_kv(self, memory: Tensor) -> Tuple[Tensor, Tensor]:
        """Keys and values of ``memory (B, S, kv_dim)`` → 2 × ``(B, H, S, hd)``."""
        k, v = apply_linear(self.kv, memory).chunk(2, dim=-1)
        return _heads(k, self.num_heads, self.head_dim), _heads(v, self.num_heads, self.head_dim)

    def forward(self, x: Tensor, memory: Optional[Tensor] = None, attn_mask: Optional[Tensor] = None,
                memory_kv: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
        """Attend from ``x`` to the encoder memory (not causal).

        Args:
            x: queries ``(B, T, dim)``.
            memory: ``(B, S, kv_dim)``, projected by ``kv`` on this call; ignored when
                ``memory_kv`` is given.
            attn_mask: ``None``, or SDPA's convention: bool ``True`` = attend, or float added to the
                scores; broadcastable to ``(B, H, T, S)`` (e.g. a ``(B, 1, 1, S)`` padding mask).
            memory_kv: ``(k, v)``, each ``(B, H, S, dim // H)``, from :meth:`memory_kv` (computed
                once per source when decoding).

        ``attn_drop`` applies in training mode.

        Returns:
            ``(B, T, dim)``.

        Raises:
            ValueError: neither ``memory`` nor ``memory_kv`` is given.
        """
        if memory_kv is None:
            if memory is None:
                raise ValueError("CrossAttention needs memory or memory_kv")
            memory_kv = self.memory_kv(memory)
        B, T, C = x.shape
        q = _heads(apply_linear(self.q, x), self.num_heads, self.head_dim)
        out = ops.scaled_dot_product_attention(
            q, memory_kv[0], memory_kv[1], attn_mask=attn_mask, dropout_p=self.attn_drop.p if self.training else 0.0)
        return self.proj_drop(apply_linear(self.proj, out.transpose(1, 2).reshape(B, T, C)))
