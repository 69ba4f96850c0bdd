"""Validation and normalisation of scaled-dot-product-attention arguments.

Every backend receives the same normalised problem: 4-D tensors
``q (B, Hq, L, E)``, ``k (B, Hkv, S, E)``, ``v (B, Hkv, S, Ev)`` with
``Hq % Hkv == 0`` and a mask that is either ``None`` or a *view* broadcast to
``(B, Hq, L, S)`` (stride 0 along broadcast dimensions, never copied), so
kernels read any mask layout through its strides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .errors import AttentionDtypeError, AttentionInputError

try:  # torch >= 2.3
    from torch.nn.attention.bias import CausalBias, CausalVariant
except ImportError:  # pragma: no cover - older torch: no CausalBias to accept
    CausalBias = CausalVariant = None

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class AttentionProblem:
    """A validated attention call in the canonical 4-D layout."""

    q: Tensor  # (B, Hq, L, E)
    k: Tensor  # (B, Hkv, S, E)
    v: Tensor  # (B, Hkv, S, Ev)
    mask: Optional[Tensor]  # None, or bool/float view broadcast to (B, Hq, L, S)
    dropout_p: float
    is_causal: bool
    causal_bottom_right: bool
    scale: float
    out_shape: tuple  # shape of the user-facing output: query.shape[:-1] + (Ev,)

    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def heads_q(self) -> int:
        return self.q.shape[1]

    @property
    def heads_kv(self) -> int:
        return self.k.shape[1]

    @property
    def len_q(self) -> int:
        return self.q.shape[2]

    @property
    def len_k(self) -> int:
        return self.k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.q.shape[3]

    @property
    def head_dim_v(self) -> int:
        return self.v.shape[3]

    @property
    def is_empty(self) -> bool:
        """True when there is nothing to compute: zero batch, heads, queries, keys or output
        columns (a zero head dim E is not empty: every score is 0, torch gives mean(V))."""
        q = self.q
        return q.shape[0] * q.shape[1] * q.shape[2] == 0 or self.k.shape[2] == 0 or self.v.shape[3] == 0

    @property
    def needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (self.q, self.k, self.v)
        )

    @property
    def mask_needs_grad(self) -> bool:
        return self.mask is not None and self.mask.requires_grad and torch.is_grad_enabled()


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise AttentionDtypeError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
            f"got dtype {t.dtype}"
        )


def is_causal_bias(attn_mask) -> bool:
    """True for a :class:`torch.nn.attention.bias.CausalBias` (``causal_upper_left`` / ``causal_lower_right``)."""
    return CausalBias is not None and isinstance(attn_mask, CausalBias)


def causal_bias_alignment(bias, len_q: int, len_k: int) -> bool:
    """Check a ``CausalBias`` against the problem's sizes; return ``causal_bottom_right``.

    ``causal_upper_left`` is the top-left alignment of ``is_causal=True`` (query ``i`` sees
    keys ``j <= i``); ``causal_lower_right`` the bottom-right one (``j <= i + S - L``).
    Neither is ever materialised. Raises :class:`AttentionInputError` when the bias was
    built for other sequence lengths (torch would silently use its own).
    """
    if (bias.seq_len_q, bias.seq_len_kv) != (len_q, len_k):
        raise AttentionInputError(
            f"attn_mask is a CausalBias for seq_len_q={bias.seq_len_q}, seq_len_kv={bias.seq_len_kv}, "
            f"but query has L={len_q} and key has S={len_k}"
        )
    return bias.variant == CausalVariant.LOWER_RIGHT


def _broadcastable(src: tuple, dst: tuple) -> bool:
    if len(src) > len(dst):
        return False
    for s, d in zip(reversed(src), reversed(dst)):
        if s != 1 and s != d:
            return False
    return True


def _leading_dims(query: Tensor, key: Tensor, value: Tensor, enable_gqa: bool):
    """The output's leading dimensions ``(*batch, Hq)`` and the key/value head count.

    As torch (its matmuls broadcast): every dimension before ``(L, E)`` broadcasts
    across query, key and value, e.g. key/value of batch 1 serve every query batch,
    and key/value with one head serve every query head (run as grouped-query
    attention, without copies). With ``enable_gqa``, ``Hq`` must be a multiple of
    the key and value head counts instead.
    """
    def heads(t):
        return t.shape[-3] if t.dim() >= 3 else 1

    hq, hk, hv = heads(query), heads(key), heads(value)
    if (query.dim() == key.dim() == value.dim() == 4 and query.shape[0] == key.shape[0] == value.shape[0]
            and hk == hv and (hk == hq or (enable_gqa and hk > 0 and hq % hk == 0))):
        return (query.shape[0], hq), hk  # the common case, without the general broadcast (µs per call)
    gqa = enable_gqa and query.dim() >= 3 and (hk != hq or hv != hq)
    if gqa:
        if hk == 0 or hv == 0 or hq % hk != 0 or hq % hv != 0:
            raise AttentionInputError(
                f"enable_gqa=True requires the number of query heads ({hq}) to be a multiple of the "
                f"number of key heads ({hk}) and value heads ({hv})"
            )
        shapes = (query.shape[:-3], key.shape[:-3], value.shape[:-3])
    else:
        shapes = (query.shape[:-2], key.shape[:-2], value.shape[:-2])
    batch = _broadcast(*shapes)
    if batch is None:
        hint = "" if gqa or hk == hq else " (different head counts need enable_gqa=True)"
        raise AttentionInputError(
            "query, key and value's batch and head dimensions (all but the last two) must be "
            f"broadcastable{hint}: query.shape={tuple(query.shape)}, key.shape={tuple(key.shape)}, "
            f"value.shape={tuple(value.shape)}"
        ) from None
    if gqa:
        lead = (*batch, hq)
        heads_kv = hk if hk == hv else hq  # different key/value head counts: both repeated to Hq
    else:
        lead = batch if batch else (1,)
        # Key and value with one head serve every query head: grouped-query attention.
        heads_kv = 1 if hk == hv == 1 else lead[-1]
    return lead, heads_kv


def _broadcast(*shapes):
    """numpy/torch broadcasting of shapes (tuples), or None when they do not broadcast."""
    out = []
    for dims in zip(*(((1,) * (max(map(len, shapes)) - len(sh)) + tuple(sh)) for sh in shapes)):
        sizes = {d for d in dims if d != 1}
        if len(sizes) > 1:
            return None
        out.append(sizes.pop() if sizes else 1)
    return tuple(out)


def _kv_heads(t: Tensor, batch_dims: tuple, heads_kv: int) -> Tensor:
    """``t`` (key or value) as a ``(*batch_dims, heads_kv, S, D)`` view (GQA groups repeated
    only when key and value have different head counts)."""
    h = t.shape[-3] if t.dim() >= 3 else 1
    if t.dim() < 3:
        t = t.unsqueeze(0)
    if h not in (1, heads_kv):  # enable_gqa with key and value heads that differ
        t = t.repeat_interleave(heads_kv // h, dim=-3)
    return t.expand(*batch_dims, heads_kv, *t.shape[-2:])


def validate_attention_inputs(
    query,
    key,
    value,
    attn_mask=None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    causal_bottom_right: bool = False,
) -> AttentionProblem:
    """Check the arguments of ``scaled_dot_product_attention`` as torch does and
    return the canonical :class:`AttentionProblem`.

    ``attn_mask`` may be a :class:`torch.nn.attention.bias.CausalBias`: it becomes
    ``is_causal=True`` with its alignment (``causal_lower_right`` = bottom-right), no mask.

    Errors name the offending argument. Each is an instance of torch's type
    (``RuntimeError``, as from torch's SDPA) and of the Pythonic one:
    :class:`~fastformer.ops.errors.AttentionDtypeError` (also ``TypeError``) for dtypes,
    :class:`~fastformer.ops.errors.AttentionInputError` (also ``ValueError``) for shapes
    and values; ``RuntimeError`` for device mixes, ``TypeError`` for non-tensors.
    """
    _check_tensor("query", query)
    _check_tensor("key", key)
    _check_tensor("value", value)
    if min(query.dim(), key.dim(), value.dim()) < 2:
        raise AttentionInputError(
            "Expected query, key, and value to all be at least 2 dimensional, but got "
            f"query.dim: {query.dim()} key.dim: {key.dim()} and value.dim: {value.dim()} instead."
        )

    if not (query.dtype == key.dtype == value.dtype):
        raise AttentionDtypeError(
            "Expected query, key, and value to have the same dtype, but got "
            f"query.dtype: {query.dtype} key.dtype: {key.dtype} and value.dtype: {value.dtype} instead."
        )
    if not (query.device == key.device == value.device):
        raise RuntimeError(
            "query, key and value must be on the same device, got "
            f"query.device={query.device}, key.device={key.device}, value.device={value.device}"
        )
    if query.shape[-1] != key.shape[-1]:
        raise AttentionInputError(
            f"key's last dimension (head dim E) must equal query's: query.shape={tuple(query.shape)}, "
            f"key.shape={tuple(key.shape)}"
        )
    if key.shape[-2] != value.shape[-2]:
        raise AttentionInputError(
            f"key and value must have the same sequence length S (dim -2): key.shape={tuple(key.shape)}, "
            f"value.shape={tuple(value.shape)}"
        )
    lead, heads_kv = _leading_dims(query, key, value, enable_gqa)

    if not isinstance(dropout_p, (int, float)) or isinstance(dropout_p, bool):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if not (0.0 <= float(dropout_p) <= 1.0) or math.isnan(dropout_p):
        raise AttentionInputError(f"dropout probability has to be between 0 and 1, but got {dropout_p}")
    if scale is not None:
        if not isinstance(scale, (int, float)) or isinstance(scale, bool):
            raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
        scale = float(scale)
    else:
        scale = 1.0 / math.sqrt(query.shape[-1]) if query.shape[-1] > 0 else 1.0

    L, E = query.shape[-2], query.shape[-1]
    S, Ev = key.shape[-2], value.shape[-1]
    batch_dims, hq = lead[:-1], lead[-1]
    B = math.prod(batch_dims)
    canonical = query.dim() == key.dim() == value.dim() == 4 and query.shape[0] == key.shape[0] == value.shape[0]
    if canonical and key.shape[1] == value.shape[1] == heads_kv and query.shape[1] == hq:
        q4, k4, v4 = query, key, value  # already canonical: skip the views (µs each, on every call)
    else:
        # Broadcast dimensions become stride-0 views (a copy only where merging them into
        # one batch dimension needs it); autograd sums the gradients back over them.
        q4 = query.expand(*batch_dims, hq, L, E).reshape(B, hq, L, E)
        k4 = _kv_heads(key, batch_dims, heads_kv).reshape(B, heads_kv, S, E)
        v4 = _kv_heads(value, batch_dims, heads_kv).reshape(B, heads_kv, S, Ev)

    out_lead = lead if max(query.dim(), key.dim(), value.dim()) > 2 else ()  # 2-D inputs give (L, Ev)
    mask4 = None
    if is_causal_bias(attn_mask):
        # A CausalBias is one of the two native causal alignments: run it as the flag.
        if is_causal:
            raise AttentionInputError("CausalBias should not be used with causal=True")
        bottom_right = causal_bias_alignment(attn_mask, L, S)
        if causal_bottom_right and not bottom_right:
            raise AttentionInputError(
                "attn_mask is causal_upper_left (top-left alignment) but causal_bottom_right=True was passed"
            )
        attn_mask, is_causal, causal_bottom_right = None, True, bottom_right
    if attn_mask is not None:
        if is_causal:
            raise AttentionInputError(
                "_scaled_dot_product_attention: Explicit attn_mask should not be set when is_causal=True "
                "(pass either an explicit mask or is_causal, not both)"
            )
        if not isinstance(attn_mask, Tensor):
            raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):
            raise AttentionDtypeError(
                "attn_mask must be a bool tensor, a float32 tensor or have query's dtype "
                f"({query.dtype}), as in torch; got {attn_mask.dtype}"
            )
        if attn_mask.device != query.device:
            raise RuntimeError(
                f"attn_mask must be on query's device ({query.device}), got {attn_mask.device}"
            )
        full = (*out_lead, L, S)
        if not _broadcastable(tuple(attn_mask.shape), full):
            raise AttentionInputError(
                f"attn_mask of shape {tuple(attn_mask.shape)} is not broadcastable to the attention "
                f"weights' shape {full} (batch..., heads, L, S)"
            )
        mask4 = attn_mask.expand(full)
        if len(full) != 4:
            mask4 = mask4.reshape(B, hq, L, S)

    return AttentionProblem(
        q=q4,
        k=k4,
        v=v4,
        mask=mask4,
        dropout_p=float(dropout_p),
        is_causal=bool(is_causal),
        causal_bottom_right=bool(causal_bottom_right),
        scale=scale,
        out_shape=(*out_lead, L, Ev),
    )
