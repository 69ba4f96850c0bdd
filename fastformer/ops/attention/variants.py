"""Attention variants (issue 18): local window, ALiBi and logit soft-cap.

FlashAttention's names and semantics, so users can switch:

* ``window_size=(left, right)``: query ``i`` sees key ``j`` only when
  ``i + off - left <= j <= i + off + right``; ``-1`` leaves that side unlimited,
  ``(-1, -1)`` is no window. ``off`` is the causal alignment in use: 0 (top-left,
  torch's) or ``S - L`` (``causal_bottom_right=True``). ``is_causal`` is
  ``right = 0``. For L = S = 6, ``window_size=(2, 0)`` (a causal window of 3 keys)::

        keys j ->  0 1 2 3 4 5
        query 0    x . . . . .
        query 1    x x . . . .
        query 2    x x x . . .
        query 3    . x x x . .
        query 4    . . x x x .
        query 5    . . . x x x

  and for L = 2, S = 6 bottom-right aligned (``off = 4``), query 0 sees keys 2..4,
  query 1 keys 3..5.
* ``alibi_slopes``: float32 ``(H,)`` or ``(*batch, H)``; adds
  ``-slope * |i + S - L - j|`` to the scores (the distance is bottom-right aligned
  whatever the causal alignment, as FlashAttention).
* ``softcap > 0``: scores become ``softcap * tanh(scores / softcap)`` (scores =
  ``scale * q·k``), before ALiBi and any ``attn_mask`` (Gemma 2, Grok).

:func:`variant_math_attention` is the exact semantics in plain torch (the
``"reference"`` backend's path for these options, differentiable in everything).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


class Variant(NamedTuple):
    """Validated variant options. ``alibi_slopes`` is ``None`` or a float32 ``(B, H)``
    view (stride 0 where broadcast) in the problem's canonical batch."""

    window_left: int = -1
    window_right: int = -1
    alibi_slopes: Optional[Tensor] = None
    softcap: float = 0.0

    @property
    def active(self) -> bool:
        return self.window_left >= 0 or self.window_right >= 0 or self.alibi_slopes is not None or self.softcap > 0


PLAIN = Variant()


def check_window(window_size) -> Tuple[int, int]:
    """``window_size`` as ``(left, right)`` ints >= -1; raises naming the argument."""
    if window_size is None:
        return -1, -1
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(isinstance(w, int) and not isinstance(w, bool) for w in window_size)):
        raise TypeError(f"window_size must be a pair of ints (left, right), got {window_size!r}")
    left, right = (int(w) for w in window_size)
    if left < -1 or right < -1:
        raise ValueError(f"window_size sides must be >= 0, or -1 for unlimited, got {window_size!r}")
    return left, right


def check_softcap(softcap) -> float:
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"softcap must be a float, got {type(softcap).__name__}")
    softcap = float(softcap)
    if not math.isfinite(softcap) or softcap < 0.0:
        raise ValueError(f"softcap must be finite and >= 0 (0 = off), got {softcap}")
    return softcap


def check_slopes(alibi_slopes, batch_dims: tuple, heads: int, device) -> Optional[Tensor]:
    """``alibi_slopes`` ``(H,)`` or ``(*batch_dims, H)`` float32 on ``device`` -> a
    ``(prod(batch_dims), H)`` view (stride 0 along a broadcast batch)."""
    if alibi_slopes is None:
        return None
    if not isinstance(alibi_slopes, Tensor):
        raise TypeError(f"alibi_slopes must be a torch.Tensor or None, got {type(alibi_slopes).__name__}")
    if alibi_slopes.dtype != torch.float32:
        raise TypeError(f"alibi_slopes must be float32 (as FlashAttention), got {alibi_slopes.dtype}")
    if alibi_slopes.device != device:
        raise RuntimeError(f"alibi_slopes must be on the inputs' device ({device}), got {alibi_slopes.device}")
    shape = tuple(alibi_slopes.shape)
    B = math.prod(batch_dims)
    if shape == (heads,):
        return alibi_slopes[None].expand(B, heads)
    if shape == (*batch_dims, heads) and batch_dims:
        return alibi_slopes.reshape(B, heads)
    raise ValueError(
        f"alibi_slopes must have shape ({heads},) or {(*batch_dims, heads)} (batch..., query heads), got {shape}"
    )


def make_variant(window_size, alibi_slopes, softcap, batch_dims: tuple, heads: int, device) -> Variant:
    left, right = check_window(window_size)
    return Variant(left, right, check_slopes(alibi_slopes, batch_dims, heads, device), check_softcap(softcap))


def visible_mask(L: int, S: int, is_causal: bool, bottom_right: bool, left: int, right: int, device) -> Tensor:
    """Bool ``(L, S)``, True where query i sees key j (causal and window; see the module docstring)."""
    off = S - L if bottom_right else 0
    i = torch.arange(L, device=device)[:, None]
    j = torch.arange(S, device=device)[None, :]
    ok = torch.ones(L, S, dtype=torch.bool, device=device)
    if is_causal:
        right = 0
    if right >= 0:
        ok = ok & (j <= i + off + right)
    if left >= 0:
        ok = ok & (j >= i + off - left)
    return ok


def alibi_bias(slopes: Tensor, L: int, S: int, dtype=torch.float32) -> Tensor:
    """``(B, H, L, S)``: ``-slope * |i + S - L - j|``."""
    i = torch.arange(L, device=slopes.device, dtype=dtype)[:, None]
    j = torch.arange(S, device=slopes.device, dtype=dtype)[None, :]
    return -slopes.to(dtype)[:, :, None, None] * (i + (S - L) - j).abs()


def variant_math_attention(q, k, v, mask, dropout_p: float, is_causal: bool, bottom_right: bool, scale: float,
                           variant: Variant, return_lse: bool = False):
    """Exact variant semantics in torch ops, computed in float32 (float64 for float64
    inputs) and differentiable in q, k, v and a float mask. Canonical 4-D inputs;
    rows that see no key output 0 (lse ``-inf``)."""
    B, Hq, L, _ = q.shape
    S = k.shape[2]
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    g = Hq // k.shape[1]
    kf = k.to(work).repeat_interleave(g, dim=1) if g > 1 else k.to(work)
    vf = v.to(work).repeat_interleave(g, dim=1) if g > 1 else v.to(work)
    s = torch.matmul(q.to(work), kf.transpose(-2, -1)) * scale
    if variant.softcap > 0:
        s = torch.tanh(s / variant.softcap) * variant.softcap
    if variant.alibi_slopes is not None:
        s = s + alibi_bias(variant.alibi_slopes, L, S, work)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.to(work)
    if is_causal or variant.window_left >= 0 or variant.window_right >= 0:
        vis = visible_mask(L, S, is_causal, bottom_right, variant.window_left, variant.window_right, q.device)
        s = s.masked_fill(~vis, float("-inf"))
    # Rows that see no key: softmax over zeros instead (no inf - inf, no NaN gradients), then 0.
    dead = torch.isneginf(s).all(dim=-1, keepdim=True)
    s = s.masked_fill(dead, 0.0)
    # Normalised by the row sum (torch.softmax), not exp(s - lse): next to a huge finite fill
    # (finfo.min, as Hugging Face pads) lse cannot hold log(S) and exp(s - lse) would weigh
    # every key 1 where torch attends uniformly.
    p = torch.softmax(s, dim=-1).masked_fill(dead, 0.0)
    lse = torch.logsumexp(s, dim=-1).masked_fill(dead.squeeze(-1), float("-inf"))
    if dropout_p > 0.0:
        p = F.dropout(p, dropout_p)
    out = torch.matmul(p, vf).to(q.dtype)
    return (out, lse.float().detach()) if return_lse else out
