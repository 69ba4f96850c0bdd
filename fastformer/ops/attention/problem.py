"""Attention inputs, validated once: the options object and the three problem kinds.

Every public entry point (dense ``scaled_dot_product_attention`` / ``attention``,
``varlen_attention``, ``decode_attention``) checks its arguments here, once, and
hands the backends one problem object:

* :class:`AttentionProblem` (``kind = "dense"``): 4-D tensors ``q (B, Hq, L, E)``,
  ``k (B, Hkv, S, E)``, ``v (B, Hkv, S, Ev)`` with ``Hq % Hkv == 0`` and a mask that
  is ``None`` or a *view* broadcast to ``(B, Hq, L, S)`` (stride 0 along broadcast
  dimensions, never copied), so kernels read any mask layout through its strides.
* :class:`VarlenProblem` (``kind = "varlen"``): packed ``q (total_q, Hq, E)`` ... with
  ``cu_seqlens`` boundaries.
* :class:`DecodeProblem` (``kind = "decode"``): new tokens ``q (B, Hq, Lq, D)`` over a
  preallocated KV cache and its valid lengths.

Whatever changes the attention weights travels in one :class:`AttentionOptions`
(dropout, causal alignment, scale, and the variants of issue 18: local window,
ALiBi slopes, logit soft-cap); a new variant is one more field there, checked
beside the others below (:func:`check_variant`).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..errors import AttentionDtypeError, AttentionInputError
from .variants import check_slopes, check_softcap, check_window

try:  # torch >= 2.3
    from torch.nn.attention.bias import CausalBias, CausalVariant
except ImportError:  # pragma: no cover - older torch: no CausalBias to accept
    CausalBias = CausalVariant = None

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class AttentionOptions:
    """Everything besides the tensors that decides the attention weights.

    Attributes:
        dropout_p: dropout probability on the weights (applied whenever > 0).
        is_causal: apply a causal mask.
        causal_bottom_right: align it bottom-right (query ``i`` sees keys
            ``j <= i + S - L``; decoding against a cache) instead of top-left (torch).
        scale: the score scale, already resolved (``1 / sqrt(E)`` by default).
        window_left, window_right: local window sides (``window_size``; -1 = unlimited;
            see ``variants.py`` for the picture). ``is_causal`` implies ``right = 0``.
        softcap: logit soft-cap (0 = off): scores become ``softcap * tanh(score / softcap)``.
        alibi_slopes: ``None`` or a float32 ``(B, Hq)`` view (stride 0 where broadcast):
            ALiBi adds ``-slope * |i + S - L - j|``.

    The fused custom ops carry the scalar fields as scalar arguments in this field
    order (:meth:`op_args` / ``AttentionOptions(*args, alibi_slopes)``), and the one
    tensor field, ``alibi_slopes`` (last), as an ``Optional[Tensor]`` argument of each
    op (saved for the backward, never differentiated). Adding a scalar option is one
    field here (before ``alibi_slopes``) plus one argument in each op schema of ``fused.py``.
    The options also serve as the kernels' ``variant`` (``window_left``,
    ``window_right``, ``alibi_slopes``, ``softcap``).
    """

    dropout_p: float = 0.0
    is_causal: bool = False
    causal_bottom_right: bool = False
    scale: float = 1.0
    window_left: int = -1
    window_right: int = -1
    softcap: float = 0.0
    alibi_slopes: Optional[Tensor] = field(default=None, compare=False)

    def op_args(self) -> tuple:
        """The scalar options as the custom ops' scalar arguments, in field order
        (``alibi_slopes``, a tensor, travels separately)."""
        return (self.dropout_p, self.is_causal, self.causal_bottom_right, self.scale, self.window_left,
                self.window_right, self.softcap)

    @property
    def variant_active(self) -> bool:
        """True when a window, ALiBi or a soft-cap is in use (torch's SDPA runs none of them)."""
        return self.window_left >= 0 or self.window_right >= 0 or self.softcap > 0.0 or self.alibi_slopes is not None


def check_variant(window_size, alibi_slopes, softcap, batch_dims: tuple, heads: int, device) -> dict:
    """Validate the variant options (FlashAttention's names) into ``AttentionOptions`` keyword
    arguments: ``window_left``, ``window_right``, ``softcap``, ``alibi_slopes`` (``(H,)`` or
    ``(*batch_dims, H)`` float32 on ``device`` -> a ``(prod(batch_dims), H)`` view).

    Raises ``TypeError`` (window entries not ints, slopes not a float32 tensor, softcap not
    a number), ``ValueError`` (window entries < -1, slopes of the wrong shape, a negative or
    non-finite softcap) or ``RuntimeError`` (slopes on another device), naming the argument.
    """
    if (alibi_slopes is None and type(softcap) in (float, int) and softcap == 0
            and type(window_size) is tuple and window_size == (-1, -1)):
        return {}  # the plain problem: no checks to run (µs per call)
    left, right = check_window(window_size)
    return dict(window_left=left, window_right=right, softcap=check_softcap(softcap),
                alibi_slopes=check_slopes(alibi_slopes, batch_dims, heads, device))


def _real(x, name: str, what: str) -> float:
    """A float argument as torch's argument parser takes it: a Python or NumPy real number, or a
    0-d real tensor (read once, as torch does); anything else (bool included) is a TypeError."""
    if isinstance(x, numbers.Real) and not isinstance(x, bool):  # NumPy bools are not numbers.Real
        return float(x)
    if isinstance(x, Tensor) and x.dim() == 0 and x.dtype != torch.bool and not x.is_complex():
        return float(x)
    raise TypeError(f"{name} must be {what}, got {type(x).__name__}")


def check_flag(value, name: str) -> bool:
    """A bool argument (``is_causal``, ``enable_gqa``, ...): exactly a Python bool, as torch's
    SDPA demands ("argument 'is_causal' must be bool, not str"): a string such as "False" is
    truthy and would silently mean True."""
    if type(value) is not bool:
        raise TypeError(f"argument '{name}' must be bool, not {type(value).__name__}")
    return value


def check_dropout(dropout_p) -> float:
    dropout_p = _real(dropout_p, "dropout_p", "a float")
    if not (0.0 <= dropout_p <= 1.0) or math.isnan(dropout_p):
        raise AttentionInputError(f"dropout probability has to be between 0 and 1, but got {dropout_p}")
    return dropout_p


def resolve_scale(scale, head_dim: int, name: str = "scale") -> float:
    """``scale`` as a float; ``None`` means ``1 / sqrt(head_dim)``."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
    return _real(scale, name, "a float or None")


def causal_mask(L: int, S: int, bottom_right: bool, device) -> Tensor:
    """Bool (L, S) mask, True = attend. Top-left: key j visible to query i when j <= i;
    bottom-right: when j <= i + (S - L), the alignment used when decoding with a cache."""
    offset = S - L if bottom_right else 0
    i = torch.arange(L, device=device)[:, None]
    j = torch.arange(S, device=device)[None, :]
    return j <= i + offset


@dataclass
class AttentionProblem:
    """A validated dense attention call in the canonical 4-D layout."""

    q: Tensor  # (B, Hq, L, E)
    k: Tensor  # (B, Hkv, S, E)
    v: Tensor  # (B, Hkv, S, Ev)
    mask: Optional[Tensor]  # None, or bool/float view broadcast to (B, Hq, L, S)
    options: AttentionOptions
    out_shape: tuple  # shape of the user-facing output: query.shape[:-1] + (Ev,)
    kind = "dense"

    @property
    def dropout_p(self) -> float:
        return self.options.dropout_p

    @property
    def is_causal(self) -> bool:
        return self.options.is_causal

    @property
    def causal_bottom_right(self) -> bool:
        return self.options.causal_bottom_right

    @property
    def scale(self) -> float:
        return self.options.scale


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
    window_size: Tuple[int, int] = (-1, -1),
    alibi_slopes: Optional[Tensor] = None,
    softcap: float = 0.0,
) -> AttentionProblem:
    """Check the arguments of ``scaled_dot_product_attention`` as torch does and
    return the canonical :class:`AttentionProblem`.

    ``attn_mask`` may be a :class:`torch.nn.attention.bias.CausalBias`: it becomes
    ``is_causal=True`` with its alignment (``causal_lower_right`` = bottom-right), no mask.
    ``window_size``, ``alibi_slopes`` (``(Hq,)`` or ``(*batch, Hq)``) and ``softcap``:
    see :func:`check_variant`.

    Errors name the offending argument. Each is an instance of torch's type
    (``RuntimeError``, as from torch's SDPA) and of the Pythonic one:
    :class:`~fastformer.ops.errors.AttentionDtypeError` (also ``TypeError``) for dtypes,
    :class:`~fastformer.ops.errors.AttentionInputError` (also ``ValueError``) for shapes
    and values; ``RuntimeError`` for device mixes, ``TypeError`` for non-tensors.
    """
    _check_tensor("query", query)
    _check_tensor("key", key)
    _check_tensor("value", value)
    check_flag(is_causal, "is_causal")
    check_flag(enable_gqa, "enable_gqa")
    check_flag(causal_bottom_right, "causal_bottom_right")
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

    dropout_p = check_dropout(dropout_p)
    scale = resolve_scale(scale, query.shape[-1])

    L, E = query.shape[-2], query.shape[-1]
    S, Ev = key.shape[-2], value.shape[-1]
    batch_dims, hq = lead[:-1], lead[-1]
    variant = check_variant(window_size, alibi_slopes, softcap, batch_dims, hq, query.device)
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
        options=AttentionOptions(dropout_p, bool(is_causal), bool(causal_bottom_right), scale, **variant),
        out_shape=(*out_lead, L, Ev),
    )


@dataclass
class VarlenProblem:
    """A validated packed variable-length call (``flash_attn_varlen_func``'s layout)."""

    q: Tensor  # (total_q, Hq, E)
    k: Tensor  # (total_k, Hkv, E)
    v: Tensor  # (total_k, Hkv, Ev)
    cu_seqlens_q: Tensor  # int32 (B + 1,)
    cu_seqlens_k: Tensor
    seq_bounds_q: list  # cu_seqlens_q as Python ints (read once, for the fallback's loop)
    seq_bounds_k: list
    max_seqlen_q: int
    max_seqlen_k: int
    options: AttentionOptions  # causal alignment is always bottom-right per sequence
    kind = "varlen"

    @property
    def needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(t.requires_grad for t in (self.q, self.k, self.v))


@dataclass
class DecodeProblem:
    """A validated decoding call: ``Lq`` new tokens over the valid part of a KV cache."""

    q: Tensor  # (B, Hq, Lq, D)
    k_cache: Tensor  # (B, Hkv, Smax, D); paged: (num_blocks, block_size, Hkv, D)
    v_cache: Tensor  # (B, Hkv, Smax, Dv); paged: (num_blocks, block_size, Hkv, Dv)
    cache_seqlens: object  # int (one length for all) or int32/int64 tensor (B,)
    options: AttentionOptions  # is_causal with bottom-right alignment, or attend to every valid entry
    num_splits: Optional[int]
    block_table: Optional[Tensor] = None  # paged cache: int32 (B, max_blocks), every id in use checked
    kind = "decode"

    @property
    def heads_kv(self) -> int:
        return self.k_cache.shape[2] if self.block_table is not None else self.k_cache.shape[1]

    @property
    def capacity(self) -> int:
        """The longest sequence the cache holds (Smax, or max_blocks * block_size when paged)."""
        if self.block_table is not None:
            return self.block_table.shape[1] * self.k_cache.shape[1]
        return self.k_cache.shape[2]


def _check_cu_seqlens(name: str, cu, total: int, device: torch.device) -> list:
    if not isinstance(cu, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must have dtype torch.int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{name} must be 1-D with batch + 1 entries, got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise RuntimeError(f"{name} must be on q's device ({device}), got {cu.device}")
    values = cu.tolist()  # one host sync: the checks below need the values
    if values[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {values[0]}")
    if any(b < a for a, b in zip(values, values[1:])):
        raise ValueError(f"{name} must be non-decreasing (cumulative sequence lengths), got {values}")
    if values[-1] != total:
        raise ValueError(f"{name}[-1] must equal the packed length {total}, got {values[-1]}")
    return values


def _check_max(name: str, given, lengths: list) -> int:
    if not isinstance(given, int) or isinstance(given, bool):
        raise TypeError(f"{name} must be an int, got {type(given).__name__}")
    longest = max(lengths, default=0)
    if given < longest:
        raise ValueError(f"{name}={given} is smaller than the longest sequence ({longest})")
    return given


def validate_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), alibi_slopes=None,
                           softcap=0.0) -> VarlenProblem:
    """Check ``varlen_attention``'s arguments (errors name the argument) and build the problem.
    ``alibi_slopes``: ``(Hq,)`` or ``(B, Hq)`` with B the number of sequences."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.dim() != 3:
            raise ValueError(f"{name} must be 3-D (total_tokens, heads, head_dim), got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise RuntimeError(f"q, k and v must be on the same device, got {q.device}, {k.device}, {v.device}")
    if k.shape[:2] != v.shape[:2]:
        raise ValueError(f"k and v must agree on (total_k, heads): k.shape={tuple(k.shape)}, v.shape={tuple(v.shape)}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must have the same head dim: q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"q's heads ({q.shape[1]}) must be a multiple of k/v's heads ({k.shape[1]})")
    cq = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
    ck = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device)
    if len(cq) != len(ck):
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1), got {len(cq)} and {len(ck)}")
    _check_max("max_seqlen_q", max_seqlen_q, [b - a for a, b in zip(cq, cq[1:])])
    _check_max("max_seqlen_k", max_seqlen_k, [b - a for a, b in zip(ck, ck[1:])])
    if not isinstance(dropout_p, (int, float)) or isinstance(dropout_p, bool) or not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1], got {dropout_p!r}")
    scale = resolve_scale(softmax_scale, q.shape[2], "softmax_scale")
    variant = check_variant(window_size, alibi_slopes, softcap, (len(cq) - 1,), q.shape[1], q.device)
    options = AttentionOptions(float(dropout_p), check_flag(causal, "causal"), True, scale, **variant)
    return VarlenProblem(q, k, v, cu_seqlens_q, cu_seqlens_k, cq, ck, int(max_seqlen_q), int(max_seqlen_k), options)


def checked_length_range(lens: Tensor, cache_len: int) -> Tuple[int, int]:
    """(shortest, longest) sequence, after checking every length lies in [0, cache_len].
    One host read of (min, max); the torch path needs the max anyway to slice."""
    if lens.numel() == 0:
        return 0, 0
    lo, hi = (int(x) for x in torch.stack(torch.aminmax(lens)).tolist())
    if lo < 0 or hi > cache_len:
        raise ValueError(
            f"cache_seqlens must lie in [0, {cache_len}] (the cache length, dim 2 of k_cache), "
            f"got values in [{lo}, {hi}]: {lens.tolist()}"
        )
    return lo, hi


def checked_max_length(lens: Tensor, cache_len: int) -> int:
    """The longest sequence, after checking every length lies in [0, cache_len]."""
    return checked_length_range(lens, cache_len)[1]


def _check_paged(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens, block_table) -> None:
    """A paged cache (vLLM / ``flash_attn_with_kvcache``): ``k_cache (num_blocks, block_size, Hkv, D)``,
    ``v_cache (num_blocks, block_size, Hkv, Dv)``, ``block_table (B, max_blocks)`` int32.

    Every length must lie in ``[0, max_blocks * block_size]`` and every id a sequence uses
    (its first ``ceil(len / block_size)`` entries) in ``[0, num_blocks)``; the rest of a row may
    hold anything (e.g. -1 padding). All of it is checked on the host with one device read,
    so a bad id or length is a ``ValueError`` naming the entry, never an out-of-bounds read.
    """
    if not isinstance(block_table, Tensor):
        raise TypeError(f"block_table must be a torch.Tensor or None, got {type(block_table).__name__}")
    if block_table.dtype != torch.int32:
        raise TypeError(f"block_table must be int32 (as flash_attn_with_kvcache), got {block_table.dtype}")
    B, Hq, _, D = q.shape
    if block_table.dim() != 2 or block_table.shape[0] != B:
        raise ValueError(f"block_table must have shape (B={B}, max_blocks), got {tuple(block_table.shape)}")
    if block_table.device != q.device:
        raise RuntimeError(f"block_table must be on q's device ({q.device}), got {block_table.device}")
    num_blocks, block_size, hkv, d = k_cache.shape
    if v_cache.shape[:3] != k_cache.shape[:3]:
        raise ValueError(f"paged k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must agree on "
                         "(num_blocks, block_size, Hkv)")
    if d != D:
        raise ValueError(f"paged k_cache head dim {d} (dim 3 of (num_blocks, block_size, Hkv, D)) must equal q's {D}")
    if block_size < 1:
        raise ValueError(f"paged k_cache block_size (dim 1 of (num_blocks, block_size, Hkv, D)) must be >= 1, "
                         f"got shape {tuple(k_cache.shape)}")
    if hkv < 1 or Hq % hkv:
        raise ValueError(f"q's heads ({Hq}) must be a multiple of the paged cache's heads (dim 2 of "
                         f"(num_blocks, block_size, Hkv, D) = {tuple(k_cache.shape)})")
    capacity = block_table.shape[1] * block_size
    if isinstance(cache_seqlens, int):
        if not 0 <= cache_seqlens <= capacity:
            raise ValueError(f"cache_seqlens={cache_seqlens} must lie in [0, {capacity}] (block_table's "
                             f"{block_table.shape[1]} blocks x block_size {block_size})")
        lens = torch.full((B,), cache_seqlens, dtype=torch.int64, device=q.device)
    else:
        lens = cache_seqlens.to(device=q.device, dtype=torch.int64)
    if B == 0 or torch.compiler.is_compiling():
        return  # nothing to check / data-dependent checks cannot run inside a compiled graph
    # One device read for all of it: the bad lengths and the bad ids among the blocks in use.
    bad_len = (lens < 0) | (lens > capacity)
    n_used = (lens.clamp(min=0) + block_size - 1) // block_size
    used = torch.arange(block_table.shape[1], device=q.device)[None, :] < n_used[:, None]
    bad_id = used & ((block_table < 0) | (block_table >= num_blocks))
    if bool(bad_len.any() | bad_id.any()):
        if bool(bad_len.any()):
            b = int(bad_len.nonzero()[0, 0])
            raise ValueError(f"cache_seqlens[{b}] = {int(lens[b])} must lie in [0, {capacity}] (block_table's "
                             f"{block_table.shape[1]} blocks x block_size {block_size})")
        b, i = (int(x) for x in bad_id.nonzero()[0])
        raise ValueError(f"block_table[{b}, {i}] = {int(block_table[b, i])} is not a block of the cache: ids must lie "
                         f"in [0, {num_blocks}) for the {int(n_used[b])} blocks that sequence {b}'s "
                         f"{int(lens[b])} entries use")


def validate_decode_inputs(q, k_cache, v_cache, cache_seqlens, scale=None, causal=True, num_splits=None,
                           window_size=(-1, -1), alibi_slopes=None, softcap=0.0,
                           block_table=None) -> DecodeProblem:
    """Check ``decode_attention``'s arguments (errors name the argument) and build the problem.
    ``alibi_slopes``: ``(Hq,)`` or ``(B, Hq)``; ``block_table``: see :func:`_check_paged`."""
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D, got shape {tuple(t.shape)}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise TypeError(f"q, k_cache and v_cache must share a dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if not (q.device == k_cache.device == v_cache.device):
        raise RuntimeError(f"q, k_cache and v_cache must be on one device, got {q.device}, {k_cache.device}, {v_cache.device}")
    B, Hq, Lq, D = q.shape
    if Lq < 1:
        raise ValueError("q must hold at least one query token (dim 2)")
    if isinstance(cache_seqlens, bool) or not isinstance(cache_seqlens, (int, Tensor)):
        raise TypeError(f"cache_seqlens must be an int or an int tensor of shape ({B},), got {type(cache_seqlens).__name__}")
    if isinstance(cache_seqlens, Tensor):
        if cache_seqlens.dtype not in (torch.int32, torch.int64) or tuple(cache_seqlens.shape) != (B,):
            raise TypeError(f"cache_seqlens must be an int32/int64 tensor of shape ({B},), got "
                            f"{cache_seqlens.dtype} {tuple(cache_seqlens.shape)}")
        if cache_seqlens.device != q.device and cache_seqlens.device.type != "cpu":
            raise RuntimeError(f"cache_seqlens must be on q's device ({q.device}) or the CPU, "
                               f"got {cache_seqlens.device}")
    if block_table is not None:
        _check_paged(q, k_cache, v_cache, cache_seqlens, block_table)
    else:
        if k_cache.shape[0] != B or v_cache.shape[0] != B:
            raise ValueError(f"k_cache/v_cache batch must equal q's {B}: {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
        if k_cache.shape[3] != D:
            raise ValueError(f"k_cache head dim {k_cache.shape[3]} must equal q's {D}")
        if k_cache.shape[1:3] != v_cache.shape[1:3]:
            raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must agree on (Hkv, Smax)")
        if Hq % k_cache.shape[1] != 0:
            raise ValueError(f"q's heads ({Hq}) must be a multiple of the cache's heads ({k_cache.shape[1]})")
        if isinstance(cache_seqlens, int):
            if not 0 <= cache_seqlens <= k_cache.shape[2]:
                raise ValueError(f"cache_seqlens={cache_seqlens} must lie in [0, {k_cache.shape[2]}] (the cache length)")
        elif cache_seqlens.device.type == "cpu":
            # Host-side lengths are checked here, free of any device sync. Lengths already on
            # the GPU are not (that would sync every decoding step): the kernels clamp them
            # to [0, Smax] instead, so they never read outside the cache.
            checked_max_length(cache_seqlens, k_cache.shape[2])
    if num_splits is not None and (not isinstance(num_splits, int) or isinstance(num_splits, bool) or num_splits < 1):
        raise ValueError(f"num_splits must be a positive int, got {num_splits!r}")
    variant = check_variant(window_size, alibi_slopes, softcap, (B,), Hq, q.device)
    options = AttentionOptions(0.0, check_flag(causal, "causal"), True, resolve_scale(scale, D), **variant)
    return DecodeProblem(q, k_cache, v_cache, cache_seqlens, options, num_splits, block_table)
