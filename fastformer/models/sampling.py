"""Choosing the next token from logits: greedy, temperature, top-k and nucleus (top-p)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _check_filters(top_k: Optional[int], top_p: Optional[float]) -> None:
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")


def warp_logits(logits: Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None) -> Tensor:
    """``logits (B, V)`` as float32 after transformers' sampling warpers, in their order and
    with their arithmetic: ``logits / temperature`` (``TemperatureLogitsWarper``), then
    ``TopKLogitsWarper`` (tokens below the ``top_k``-th largest get -inf; 0 or None = off), then
    ``TopPLogitsWarper`` (the least likely tokens get -inf while their cumulative probability,
    ascending, stays at most ``1 - top_p``; the most likely one always stays; 1.0 or None = off).

    Raises ``ValueError`` for ``temperature <= 0``, a negative ``top_k`` and a ``top_p`` outside
    ``(0, 1]``.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 to sample (0 = greedy in sample_next), got {temperature}")
    _check_filters(top_k, top_p)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= (1 - top_p)
        drop_sorted[..., -1:] = False  # the most likely token always stays
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> Tensor:
    """Next token ids ``(B,)`` from ``logits (B, V)``: argmax for ``temperature == 0``, else one
    draw from the softmax of :func:`warp_logits` (transformers' temperature / top-k / top-p).

    Raises ``ValueError`` for a negative ``temperature`` (and as :func:`warp_logits`).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if temperature == 0:
        _check_filters(top_k, top_p)
        return logits.argmax(dim=-1)
    probs = warp_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
