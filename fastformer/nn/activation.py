"""``MultiheadAttention``: a drop-in for :class:`torch.nn.MultiheadAttention` on fastformer's attention.

Same constructor, parameters (``in_proj_weight`` or ``q/k/v_proj_weight``,
``in_proj_bias``, ``bias_k``, ``bias_v``, ``out_proj``), ``state_dict`` keys,
forward signature, return values and mask conventions as torch's, so a
``state_dict`` moves between the two with no remapping.

What differs is how the output is computed: the projections are applied once on
the caller's layout and viewed as ``(B, H, L, D)`` (no head-splitting copies),
and attention (``need_weights=False``) runs through :func:`fastformer.scaled_dot_product_attention`, i.e.
the fastest fused backend for the device. Masks are converted once: torch's
``True`` = *masked* becomes SDPA's ``True`` = *attend*; two bool masks stay a
bool mask (fused kernels skip fully masked blocks), a float mask is added.
"""

import math
import warnings
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear
from torch.nn.parameter import Parameter

from ..ops import attention, scaled_dot_product_attention
from ..ops import linear as _ops_linear
from ..ops.attention.problem import causal_bias_alignment, is_causal_bias
from ..ops.errors import AttentionInputError, MultiheadAttentionDtypeError, MultiheadAttentionShapeError

__all__ = ["MultiheadAttention", "multi_head_attention"]


class MultiheadAttention(nn.Module):
    r"""Multi-head attention, ``torch.nn.MultiheadAttention``'s drop-in.

    Args (exactly torch's):
        embed_dim: model width ``E``; ``num_heads`` must divide it.
        num_heads: number of heads ``H`` (head dim ``D = E // H``).
        dropout: dropout on the attention weights, applied in training mode.
        bias: learn ``in_proj_bias`` and ``out_proj.bias``.
        add_bias_kv: learn ``bias_k``/``bias_v`` ``(1, 1, E)`` appended to the key/value sequence.
        add_zero_attn: append a zero key/value to the sequence (after the bias).
        kdim, vdim: key/value feature sizes (default ``E``); when either differs,
            separate ``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` replace ``in_proj_weight``.
        batch_first: inputs are ``(B, L, E)`` instead of ``(L, B, E)``.

    Forward: see :meth:`forward`.

    Cost of ``need_weights=True`` (torch's default): the weights have to exist as an
    ``(B, H, L, S)`` tensor in the input's dtype — O(L·S) memory, one ``q kᵀ`` GEMM
    and a softmax, as in torch. The output is then one more GEMM on those weights
    (``weights @ v``) rather than a second, fused pass that would recompute
    ``q kᵀ`` and the softmax: cheaper, one dropout sample shared by output and
    weights (as torch), and a single gradient path. (Measured: running the fused
    kernel for the output *and* the explicit weights for the return value sums two
    gradient paths into ``k``/``q`` and broke the fp32 error rule by 5× on
    ``k_proj_weight``.) ``need_weights=False`` — what the transformer layers pass —
    runs the fused kernel only: O(L) extra memory.
    """

    __constants__ = ["batch_first"]
    bias_k: Optional[Tensor]
    bias_v: Optional[Tensor]

    def __init__(
        self,
        embed_dim,
        num_heads,
        dropout=0.0,
        bias=True,
        add_bias_kv=False,
        add_zero_attn=False,
        kdim=None,
        vdim=None,
        batch_first=False,
        device=None,
        dtype=None,
    ) -> None:
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(
                f"embed_dim and num_heads must be greater than 0, got embed_dim={embed_dim} and "
                f"num_heads={num_heads} instead"
            )
        if embed_dim % num_heads != 0:
            raise MultiheadAttentionShapeError(  # torch: an AssertionError; ours is both
                f"embed_dim must be divisible by num_heads, got embed_dim={embed_dim}, num_heads={num_heads}")
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.head_dim = embed_dim // num_heads

        if not self._qkv_same_embed_dim:
            self.q_proj_weight = Parameter(torch.empty((embed_dim, embed_dim), **factory_kwargs))
            self.k_proj_weight = Parameter(torch.empty((embed_dim, self.kdim), **factory_kwargs))
            self.v_proj_weight = Parameter(torch.empty((embed_dim, self.vdim), **factory_kwargs))
            self.register_parameter("in_proj_weight", None)
        else:
            self.in_proj_weight = Parameter(torch.empty((3 * embed_dim, embed_dim), **factory_kwargs))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        if bias:
            self.in_proj_bias = Parameter(torch.empty(3 * embed_dim, **factory_kwargs))
        else:
            self.register_parameter("in_proj_bias", None)
        # torch's class for out_proj, so quantization tooling treats both modules alike.
        self.out_proj = NonDynamicallyQuantizableLinear(embed_dim, embed_dim, bias=bias, **factory_kwargs)
        if add_bias_kv:
            self.bias_k = Parameter(torch.empty((1, 1, embed_dim), **factory_kwargs))
            self.bias_v = Parameter(torch.empty((1, 1, embed_dim), **factory_kwargs))
        else:
            self.bias_k = self.bias_v = None
        self.add_zero_attn = add_zero_attn
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # torch's initialisation, so freshly built models are statistically alike.
        if self._qkv_same_embed_dim:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            nn.init.xavier_uniform_(self.q_proj_weight)
            nn.init.xavier_uniform_(self.k_proj_weight)
            nn.init.xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            nn.init.xavier_normal_(self.bias_k)
        if self.bias_v is not None:
            nn.init.xavier_normal_(self.bias_v)

    def __setstate__(self, state):
        # Support loading old pickles that predate _qkv_same_embed_dim (as torch does).
        if "_qkv_same_embed_dim" not in state:
            state["_qkv_same_embed_dim"] = True
        super().__setstate__(state)

    def merge_masks(
        self, attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor], query: Tensor
    ) -> Tuple[Optional[Tensor], Optional[int]]:
        """torch's helper, kept because torch's ``TransformerEncoderLayer`` fast path calls it on
        its ``self_attn`` (e.g. a layer :func:`fastformer.convert` could not swap whole).

        Returns ``(mask, mask_type)``: type 1 = key padding ``(B, S)``, type 2 = merged
        ``(B, H, L, S)`` (masks already in torch's float form are added), ``(None, None)``.
        """
        if attn_mask is None:
            return (key_padding_mask, 1) if key_padding_mask is not None else (None, None)
        batch, seq_len, _ = query.shape
        if attn_mask.dim() == 3:
            merged = attn_mask.view(batch, -1, seq_len, seq_len)
        else:
            merged = attn_mask.view(1, 1, seq_len, seq_len).expand(batch, self.num_heads, -1, -1)
        if key_padding_mask is not None:
            merged = merged + key_padding_mask.view(batch, 1, 1, seq_len).expand(-1, self.num_heads, -1, -1)
        return merged, 2

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        r"""Attend from ``query`` to ``key``/``value``.

        Args:
            query: ``(L, B, E)``, ``(B, L, E)`` if ``batch_first``, or unbatched ``(L, E)``.
            key: ``(S, B, kdim)`` / ``(B, S, kdim)`` / ``(S, kdim)``.
            value: ``(S, B, vdim)`` / ``(B, S, vdim)`` / ``(S, vdim)``.
            key_padding_mask: ``(B, S)`` (``(S,)`` unbatched); bool ``True`` = ignore
                that key, or float added to the scores.
            need_weights: also return the attention weights (materialised; see the class
                docstring for the cost). ``False`` keeps attention on the fused kernel.
            attn_mask: ``(L, S)`` or ``(B·H, L, S)``; bool ``True`` = *not* allowed to
                attend, or float added to the scores. Also a
                :class:`torch.nn.attention.bias.CausalBias` built for ``(L, S)``
                (``causal_upper_left`` / ``causal_lower_right``; an extension, torch's
                module rejects it): without a key padding mask, ``bias_k`` or the zero
                key and with ``need_weights=False`` it runs as the kernel's causal mode
                with that alignment, never materialised; otherwise it is materialised.
            average_attn_weights: average the returned weights over heads.
            is_causal: hint that ``attn_mask`` is the causal mask (an ``attn_mask`` is
                still required, as in torch). Without a key padding mask and with
                ``need_weights=False`` the kernel's causal mode replaces the mask, which is
                then neither used nor shape-checked (torch's rule); otherwise the mask is used.

        The attention dropout (``dropout``) applies while this module is in training
        mode. Its random stream is the kernels' own (seeded from torch's generator):
        the same probability and scaling as torch's, not the same masks.

        Returns:
            ``(output, weights)``: output shaped like ``query`` with ``E`` features;
            weights ``(B, L, S')`` averaged or ``(B, H, L, S')`` per head (batch dim
            dropped when unbatched; ``S'`` counts ``bias_k`` and the zero key), or ``None``.

        Raises:
            :class:`~fastformer.ops.errors.MultiheadAttentionShapeError` (``ValueError`` and
            torch's ``AssertionError``) for shapes torch's module asserts on;
            :class:`~fastformer.ops.errors.MultiheadAttentionDtypeError` (``TypeError`` and
            ``AssertionError``) for integer masks;
            :class:`~fastformer.ops.errors.AttentionInputError` (``ValueError`` and
            torch's ``RuntimeError``) for a wrongly shaped ``attn_mask`` or batch mismatch.
            Under TorchScript every error is a ``torch.jit.Error`` with the message, as with torch's module.
        """
        bottom_right: Optional[bool] = None
        if not torch.jit.is_scripting():
            if is_causal_bias(attn_mask):
                # CausalBias: (L, S) in the caller's layout, before bias_k / the zero key.
                bottom_right = causal_bias_alignment(
                    attn_mask, _seq_len(query, self.batch_first), _seq_len(key, self.batch_first)
                )
                if key_padding_mask is None and not need_weights and self.bias_k is None and not self.add_zero_attn:
                    attn_mask = None  # the kernel's causal mode, nothing materialised
                else:
                    attn_mask = attn_mask._materialize(query.device).logical_not()  # torch's True = masked
                    bottom_right = None
        return self._attend(
            query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal, bottom_right
        )

    def _attend(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor],
        need_weights: bool,
        attn_mask: Optional[Tensor],
        average_attn_weights: bool,
        is_causal: bool,
        bottom_right: Optional[bool],
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """The computation (TorchScript-compatible); ``bottom_right`` set = a CausalBias
        already turned into the kernel's causal mode with that alignment."""
        batched = _check_shapes(query, key, value, key_padding_mask, attn_mask, self.num_heads)
        _check_mask_dtype(key_padding_mask, "key_padding_mask")
        _check_mask_dtype(attn_mask, "attn_mask")
        if key_padding_mask is not None and attn_mask is not None and key_padding_mask.dtype != attn_mask.dtype:
            warnings.warn(
                "Support for mismatched key_padding_mask and attn_mask is deprecated. Use same type for both instead."
            )
        if is_causal and attn_mask is None and bottom_right is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint. You may use the Transformer module method "
                "`generate_square_subsequent_mask` to create this mask."
            )
        if query.shape[-1] != self.embed_dim:
            raise MultiheadAttentionShapeError(
                f"was expecting embedding dimension of {self.embed_dim}, but got {query.shape[-1]}"
            )
        if key.shape[:-1] != value.shape[:-1]:
            raise MultiheadAttentionShapeError(f"key shape {key.shape} does not match value shape {value.shape}")
        if key.shape[-1] != self.kdim or value.shape[-1] != self.vdim:
            raise MultiheadAttentionShapeError(
                f"expected key/value feature sizes kdim={self.kdim}, vdim={self.vdim}, got key.shape={key.shape}, "
                f"value.shape={value.shape}"
            )

        # Layout: batch-first (B, L, E) or sequence-first (L, B, E); unbatched is batch-first with B = 1.
        batch_first = self.batch_first or not batched
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        bsz = query.shape[0] if batch_first else query.shape[1]
        len_q = query.shape[1] if batch_first else query.shape[0]
        len_k = key.shape[1] if batch_first else key.shape[0]
        key_bsz = key.shape[0] if batch_first else key.shape[1]
        if key_bsz != bsz:
            raise AttentionInputError(
                f"query and key must have the same batch size, got query.shape={query.shape}, key.shape={key.shape}"
            )
        num_heads, head_dim = self.num_heads, self.head_dim

        # torch's rule for the is_causal hint: without a key padding mask (and without
        # weights to return) the causal flag replaces the mask, unchecked; otherwise the mask is used.
        use_causal_flag = bottom_right is not None or (is_causal and key_padding_mask is None and not need_weights)
        if use_causal_flag:
            attn_mask = None
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                expected = [len_q, len_k]
                shown = f"({len_q}, {len_k})"
            else:
                expected = [bsz * num_heads, len_q, len_k]
                shown = f"({bsz * num_heads}, {len_q}, {len_k})"
            if list(attn_mask.shape) != expected:
                raise AttentionInputError(
                    f"The shape of the {attn_mask.dim()}D attn_mask is {attn_mask.shape}, but should be {shown}."
                )
        if key_padding_mask is not None and list(key_padding_mask.shape) != [bsz, len_k]:
            raise MultiheadAttentionShapeError(
                f"expecting key_padding_mask shape of {[bsz, len_k]}, but got {key_padding_mask.shape}"
            )

        q, k, v = self._project(query, key, value)
        q = _heads(q, num_heads, batch_first)  # (B, H, L, D)
        k = _heads(k, num_heads, batch_first)  # (B, H, S, D)
        v = _heads(v, num_heads, batch_first)

        extra_keys = 0
        bias_k, bias_v = self.bias_k, self.bias_v
        if bias_k is not None and bias_v is not None:
            k = torch.cat([k, bias_k.view(1, num_heads, 1, head_dim).expand(bsz, -1, -1, -1)], dim=2)
            v = torch.cat([v, bias_v.view(1, num_heads, 1, head_dim).expand(bsz, -1, -1, -1)], dim=2)
            extra_keys += 1
        elif bias_k is not None or bias_v is not None:
            raise ValueError("bias_k and bias_v must be both set or both None")
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(bsz, num_heads, 1, head_dim)], dim=2)
            v = torch.cat([v, v.new_zeros(bsz, num_heads, 1, head_dim)], dim=2)
            extra_keys += 1

        mask = _merge_masks(attn_mask, key_padding_mask, bsz, num_heads, len_q, len_k, extra_keys, q.dtype)
        dropout_p = self.dropout if self.training else 0.0

        weights: Optional[Tensor] = None
        if need_weights:
            w = _attention_weights(q, k, mask, 1.0 / math.sqrt(head_dim))
            if dropout_p > 0.0:
                # Output and returned weights must share one dropout sample, as in torch.
                w = F.dropout(w, p=dropout_p)
            out = torch.matmul(w, v)
            weights = w.mean(dim=1) if average_attn_weights else w
        elif bottom_right is not None and bottom_right:
            out = _bottom_right_causal(q, k, v, dropout_p)
        else:
            out = scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=use_causal_flag)

        # (B, H, L, D) → the caller's layout with E features, then the output projection.
        if batch_first:
            out = out.transpose(1, 2).reshape(bsz, len_q, self.embed_dim)
        else:
            out = out.permute(2, 0, 1, 3).reshape(len_q, bsz, self.embed_dim)
        out = _linear(out, self.out_proj.weight, self.out_proj.bias)

        if not batched:
            out = out.squeeze(0)
            if weights is not None:
                weights = weights.squeeze(0)
        return out, weights

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """The q, k, v projections, each ``(..., E)`` in the input's layout; one GEMM for
        self-attention with packed weights (the common case), two when key is value.

        A bias in another dtype than the weights (e.g. a half ``in_proj_bias`` in a float64
        module) is cast to the weights' dtype, which is what torch's module computes."""
        e = self.embed_dim
        b = self.in_proj_bias
        w = self.in_proj_weight
        if w is not None:
            if b is not None and b.dtype != w.dtype:
                b = b.to(w.dtype)
            if query is key and key is value:
                qkv = _linear(query, w, b).chunk(3, dim=-1)
                return qkv[0], qkv[1], qkv[2]
            bq: Optional[Tensor] = None
            bkv: Optional[Tensor] = None
            if b is not None:
                bq, bkv = b[:e], b[e:]
            q = _linear(query, w[:e], bq)
            if key is value:
                kv = _linear(key, w[e:], bkv).chunk(2, dim=-1)
                return q, kv[0], kv[1]
            bk: Optional[Tensor] = None
            bv: Optional[Tensor] = None
            if bkv is not None:
                bk, bv = bkv[:e], bkv[e:]
            return q, _linear(key, w[e : 2 * e], bk), _linear(value, w[2 * e :], bv)
        wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        assert wq is not None and wk is not None and wv is not None
        bq2: Optional[Tensor] = None
        bk2: Optional[Tensor] = None
        bv2: Optional[Tensor] = None
        if b is not None:
            if b.dtype != wq.dtype:
                b = b.to(wq.dtype)
            bq2, bk2, bv2 = b[:e], b[e : 2 * e], b[2 * e :]
        return _linear(query, wq, bq2), _linear(key, wk, bk2), _linear(value, wv, bv2)


# ----------------------------------------------------------------------------- the computation
# Plain functions, TorchScript-compatible: torch.jit.script(MultiheadAttention(...)) compiles them.


def _linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``F.linear``; eager calls go through :func:`fastformer.ops.linear` (the CPU decoding kernel
    where it applies), scripted ones through torch's op."""
    if torch.jit.is_scripting():
        return F.linear(x, weight, bias)
    return _ops_linear(x, weight, bias)


def _check_mask_dtype(mask: Optional[Tensor], name: str) -> None:
    if mask is not None and mask.dtype != torch.bool and not torch.is_floating_point(mask):
        raise MultiheadAttentionDtypeError(f"only bool and floating types of {name} are supported, got {mask.dtype}")


def _check_shapes(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Optional[Tensor],
    attn_mask: Optional[Tensor],
    num_heads: int,
) -> bool:
    """torch's ``_mha_shape_check`` (its messages; errors are also ``ValueError``); returns whether batched."""
    if not torch.jit.is_scripting():
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if query.dim() != 2 and query.dim() != 3:
        raise MultiheadAttentionShapeError(
            f"query should be unbatched 2D or batched 3D tensor but received {query.dim()}-D query tensor"
        )
    batched = query.dim() == 3
    kind = "batched (3-D)" if batched else "unbatched (2-D)"
    if key.dim() != query.dim() or value.dim() != query.dim():
        raise MultiheadAttentionShapeError(
            f"For {kind} `query`, expected `key` and `value` to be {query.dim()}-D but found "
            f"{key.dim()}-D and {value.dim()}-D tensors respectively"
        )
    if key_padding_mask is not None and key_padding_mask.dim() != query.dim() - 1:
        raise MultiheadAttentionShapeError(
            f"For {kind} `query`, expected `key_padding_mask` to be `None` or {query.dim() - 1}-D but found "
            f"{key_padding_mask.dim()}-D tensor instead"
        )
    if attn_mask is not None:
        if attn_mask.dim() != 2 and attn_mask.dim() != 3:
            raise MultiheadAttentionShapeError(
                f"For {kind} `query`, expected `attn_mask` to be `None`, 2-D or 3-D but found "
                f"{attn_mask.dim()}-D tensor instead"
            )
        if not batched and attn_mask.dim() == 3:
            if list(attn_mask.shape) != [num_heads, query.shape[0], key.shape[0]]:
                raise MultiheadAttentionShapeError(
                    f"Expected `attn_mask` shape to be ({num_heads}, {query.shape[0]}, {key.shape[0]}) "
                    f"but got {attn_mask.shape}"
                )
    return batched


def _seq_len(x: Tensor, batch_first: bool) -> int:
    """The sequence length of ``(L, E)``, ``(L, B, E)`` or (batch_first) ``(B, L, E)``."""
    return x.shape[1] if x.dim() == 3 and batch_first else x.shape[0]


def _heads(x: Tensor, num_heads: int, batch_first: bool) -> Tensor:
    """``(B, L, H·D)`` (batch_first) or ``(L, B, H·D)`` → a ``(B, H, L, D)`` view, no copy."""
    if batch_first:
        b, n, e = x.shape
        return x.view(b, n, num_heads, e // num_heads).transpose(1, 2)
    n, b, e = x.shape
    return x.view(n, b, num_heads, e // num_heads).permute(1, 2, 0, 3)


def _to_float_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """torch's convention: bool ``True`` (masked) → ``-inf``, float unchanged."""
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
    return mask


def _merge_masks(
    attn_mask: Optional[Tensor],
    key_padding_mask: Optional[Tensor],
    batch: int,
    num_heads: int,
    len_q: int,
    len_k: int,
    extra_keys: int,
    dtype: torch.dtype,
) -> Optional[Tensor]:
    """Both masks (torch's ``True`` = masked) → one SDPA mask broadcastable to
    ``(B, H, L, S + extra_keys)``: bool ``True`` = attend when both are bool,
    else float (bool converted to ``-inf``, then added, as torch adds them)."""
    am: Optional[Tensor] = None
    if attn_mask is not None:
        am = attn_mask.view(1, 1, len_q, len_k) if attn_mask.dim() == 2 else attn_mask.view(batch, num_heads, len_q, len_k)
    kpm: Optional[Tensor] = None
    if key_padding_mask is not None:
        kpm = key_padding_mask.view(batch, 1, 1, len_k)
    merged: Optional[Tensor] = None
    if (am is None or am.dtype == torch.bool) and (kpm is None or kpm.dtype == torch.bool):
        if am is not None and kpm is not None:
            merged = am | kpm
        elif am is not None:
            merged = am
        else:
            merged = kpm
        if merged is None:
            return None
        if extra_keys > 0:  # bias_k / zero key: always attended
            merged = torch.cat([merged, merged.new_zeros(list(merged.shape[:-1]) + [extra_keys])], dim=-1)
        return merged.logical_not()
    if am is not None:
        merged = _to_float_mask(am, dtype)
    if kpm is not None:
        kf = _to_float_mask(kpm, dtype)
        merged = kf if merged is None else merged + kf
    if merged is not None and extra_keys > 0:
        merged = torch.cat([merged, merged.new_zeros(list(merged.shape[:-1]) + [extra_keys])], dim=-1)
    return merged


def _attention_weights(q: Tensor, k: Tensor, mask: Optional[Tensor], scale: float) -> Tensor:
    """``softmax(q kᵀ · scale + mask)``, ``(B, H, L, S)`` in q's dtype, as torch's need_weights path."""
    scores = torch.matmul(q * scale, k.transpose(-2, -1))
    if mask is not None:
        if mask.dtype == torch.bool:
            # Added as a -inf bias, as torch's (it turns bool masks into float ones first): a NaN
            # or inf key under the mask still makes the weights NaN, as torch's.
            scores = scores + torch.zeros_like(scores).masked_fill(mask.logical_not(), float("-inf"))
        else:
            # In the scores' dtype, as torch's baddbmm(mask, q, kᵀ): under autocast a float32 mask
            # must not promote bfloat16 scores (torch returns bfloat16 weights; pytorch#99012).
            scores = scores + mask.to(scores.dtype)
    return torch.softmax(scores, dim=-1)


@torch.jit.unused
def _bottom_right_causal(q: Tensor, k: Tensor, v: Tensor, dropout_p: float) -> Tensor:
    """Causal attention aligned bottom-right (a ``causal_lower_right`` CausalBias; eager only)."""
    return attention(q, k, v, dropout_p=dropout_p, is_causal=True, causal_bottom_right=True)


def multi_head_attention(
    mha: MultiheadAttention,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Optional[Tensor] = None,
    need_weights: bool = True,
    attn_mask: Optional[Tensor] = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> Tuple[Tensor, Optional[Tensor]]:
    """The forward of :class:`MultiheadAttention` (arguments and returns as there)."""
    return mha(
        query,
        key,
        value,
        key_padding_mask=key_padding_mask,
        need_weights=need_weights,
        attn_mask=attn_mask,
        average_attn_weights=average_attn_weights,
        is_causal=is_causal,
    )
