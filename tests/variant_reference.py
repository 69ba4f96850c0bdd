"""Float64 reference for the attention variants, built from an explicit mask and bias.

Independent of the kernels and of ``fastformer``: the visibility of every
(query, key) pair is written out with index grids, the ALiBi bias as its
formula, and the soft-cap as ``softcap * tanh(scores / softcap)`` applied to the
scaled scores before the bias and the mask (FlashAttention's and Gemma 2's order).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch


def visible(L: int, S: int, is_causal: bool, bottom_right: bool, window: Tuple[int, int]) -> torch.Tensor:
    """Bool (L, S): True where query i sees key j. Window sides of -1 are unlimited;
    ``off`` aligns the diagonal top-left (0) or bottom-right (S - L)."""
    off = S - L if bottom_right else 0
    i = torch.arange(L)[:, None]
    j = torch.arange(S)[None, :]
    ok = torch.ones(L, S, dtype=torch.bool)
    left, right = window
    if is_causal:
        right = 0
    if right >= 0:
        ok &= j <= i + off + right
    if left >= 0:
        ok &= j >= i + off - left
    return ok


def alibi_bias(slopes: torch.Tensor, L: int, S: int) -> torch.Tensor:
    """(B|1, H, L, S) float64: -slope * |i + S - L - j| (bottom-right aligned, as FlashAttention)."""
    i = torch.arange(L, dtype=torch.float64)[:, None]
    j = torch.arange(S, dtype=torch.float64)[None, :]
    dist = (i + S - L - j).abs().to(slopes.device)
    s = slopes.double()
    if s.dim() == 1:
        s = s[None]
    return -s[:, :, None, None] * dist


def reference_attention(q, k, v, *, attn_mask=None, is_causal=False, bottom_right=False, scale=None,
                        window=(-1, -1), alibi_slopes: Optional[torch.Tensor] = None, softcap: float = 0.0,
                        keep: Optional[torch.Tensor] = None, dropout_p: float = 0.0):
    """Attention in the inputs' dtype (upcast them for the float64 reference).

    q (B, Hq, L, E), k/v (B, Hkv, S, *): GQA by repeating K/V. ``keep``: the
    dropout keep-mask (B, Hq, L, S) the kernel used. Returns (out, lse); fully
    hidden rows give out 0 and lse -inf.
    """
    B, Hq, L, E = q.shape
    S = k.shape[2]
    g = Hq // k.shape[1]
    k = k.repeat_interleave(g, dim=1)
    v = v.repeat_interleave(g, dim=1)
    scale = E ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-2, -1)) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if alibi_slopes is not None:
        s = s + alibi_bias(alibi_slopes, L, S).to(s.dtype)
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask
    s = s.masked_fill(~visible(L, S, is_causal, bottom_right, window).to(s.device), float("-inf"))
    # Fully hidden rows: softmax over zeros instead, then 0 (no inf - inf: NaN-free gradients,
    # also when a float mask's -inf is added rather than filled).
    dead = torch.isneginf(s).all(-1, keepdim=True)
    s = s.masked_fill(dead, 0.0)
    # Normalised by the row sum (torch.softmax), not exp(s - lse): next to a huge finite fill
    # (finfo.min) lse cannot hold log(S) and exp(s - lse) would weigh every key 1.
    p = torch.softmax(s, -1).masked_fill(dead, 0.0)
    lse = torch.logsumexp(s, -1).masked_fill(dead.squeeze(-1), float("-inf"))
    if keep is not None and dropout_p > 0:
        p = p * keep.to(p.dtype) / (1.0 - dropout_p)
    # A float32 mask on float16/bfloat16 scores promotes them (as torch adds it in float32); the
    # weights meet V in V's dtype.
    return p.to(v.dtype) @ v, lse
