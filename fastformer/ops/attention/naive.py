"""The ``"naive"`` backend: textbook attention that materialises the L x S matrix.

It is the baseline the benchmarks compare against (its memory grows as L*S),
written as any user would: ``softmax(mask(Q Kᵀ · scale)) · V`` with the
softmax in float32. It goes through the fused-op machinery (forward and a
hand-written backward) so that the custom-op plumbing every fused backend
uses is exercised and tested on any machine.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .registry import AttentionBackend, register_backend
from .variants import alibi_bias, visible_mask


def _expand_kv(t: Tensor, heads_q: int) -> Tensor:
    if t.shape[1] in (0, heads_q):  # no GQA (or no heads at all: nothing to repeat)
        return t
    return t.repeat_interleave(heads_q // t.shape[1], dim=1)


def _reduce_kv(grad: Tensor, heads_kv: int) -> Tensor:
    B, Hq, S, D = grad.shape
    return grad if Hq == heads_kv or heads_kv == 0 else grad.view(B, heads_kv, Hq // heads_kv, S, D).sum(2)


def dropout_keep_mask(rng_state: Tensor, shape, p: float, device) -> Tensor:
    """The naive backend's dropout mask (True = keep), a pure function of ``rng_state``."""
    gen = torch.Generator(device=device)
    seed, offset = (int(x) for x in rng_state.tolist())
    gen.manual_seed(seed * 1_000_003 + offset)
    return torch.rand(shape, generator=gen, device=device) >= p


def _scores(q, k, mask, opts):
    """Scaled (soft-capped, ALiBi-biased), masked scores in float32, (B, Hq, L, S), and the
    soft-cap's ``tanh`` (None without one) for the backward."""
    if q.dtype == torch.float16:
        # q·kᵀ can pass float16's 65504 where torch's (float32) scores are finite.
        q, k = q.float(), k.float()
    s = torch.matmul(q, _expand_kv(k, q.shape[1]).transpose(-2, -1)).float()
    cap = None
    if opts.softcap > 0:
        cap = torch.tanh(s * (opts.scale / opts.softcap))
        s = cap * opts.softcap
    else:
        s = s * opts.scale
    L, S = q.shape[2], k.shape[2]
    if opts.alibi_slopes is not None:
        s = s + alibi_bias(opts.alibi_slopes, L, S)
    if opts.is_causal or opts.window_left >= 0 or opts.window_right >= 0:
        vis = visible_mask(L, S, opts.is_causal, opts.causal_bottom_right, opts.window_left, opts.window_right,
                           q.device)
        s = s.masked_fill(~vis, float("-inf"))
    if mask is not None:
        # A bool mask is added as a -inf bias (not filled in), as torch does: a NaN score at a
        # masked key still turns the row NaN, as torch's output.
        s = s + (torch.where(mask, 0.0, float("-inf")) if mask.dtype == torch.bool else mask.float())
    return s, cap


def _softmax(s: Tensor):
    """Row softmax of float32 scores and the natural-log log-sum-exp, ``(p, lse)``.

    Normalised by the row sum, not by ``exp(s - lse)``: where |scores| are huge
    (a row of ``finfo.min`` fills, scores ~1e11) ``lse = max + log(sum)`` cannot hold
    ``log(sum)`` in float32 and ``exp(s - lse)`` would weigh every key 1. Rows with
    every key masked (-inf) attend to nothing: p = 0, lse = -inf (torch gives 0).
    """
    if s.shape[-1] == 0:
        return s, s.new_full(s.shape[:-1], float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    e = torch.exp(s - m)
    total = e.sum(-1, keepdim=True)
    p = e / torch.where(total == 0, torch.ones_like(total), total)
    return p, (m + torch.log(total)).squeeze(-1)


def _keep_scale(p: float) -> float:
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


def naive_forward(q, k, v, mask, rng_state, opts):
    """Kernel contract of fused.py."""
    dropout_p = opts.dropout_p
    p, lse = _softmax(_scores(q, k, mask, opts)[0])
    if dropout_p > 0.0:
        p = p * dropout_keep_mask(rng_state, p.shape, dropout_p, q.device) * _keep_scale(dropout_p)
    out = torch.matmul(p.to(v.dtype), _expand_kv(v, q.shape[1]))
    return out, lse


def naive_backward(dout, q, k, v, out, lse, mask, rng_state, opts):
    """Kernel contract of fused.py."""
    dropout_p, scale = opts.dropout_p, opts.scale
    Hkv = k.shape[1]
    k_full, v_full = _expand_kv(k, q.shape[1]), _expand_kv(v, q.shape[1])
    s, cap = _scores(q, k, mask, opts)
    p, _ = _softmax(s)
    dp = torch.matmul(dout.float(), v_full.float().transpose(-2, -1))
    p_used = p
    if dropout_p > 0.0:
        keep = dropout_keep_mask(rng_state, p.shape, dropout_p, q.device) * _keep_scale(dropout_p)
        p_used = p * keep
        dp = dp * keep
    dv = torch.matmul(p_used.transpose(-2, -1), dout.float())
    # rowsum(P ∘ dP) (= rowsum(dO ∘ O)); formed from P and dP so that a row whose weight
    # sits on one key gets an exactly zero score gradient.
    delta = (p * dp).sum(-1, keepdim=True)
    ds = p * (dp - delta) * scale
    if cap is not None:  # d(softcap * tanh(x / softcap)) / dx = 1 - tanh^2
        ds = ds * (1.0 - cap * cap)
    dq = torch.matmul(ds, k_full.float())
    dk = torch.matmul(ds.transpose(-2, -1), q.float())
    return dq.to(q.dtype), _reduce_kv(dk, Hkv).to(k.dtype), _reduce_kv(dv, Hkv).to(v.dtype)


def _always_available() -> Optional[str]:
    return None


def _naive_unsupported(problem) -> Optional[str]:
    if problem.mask_needs_grad:
        return "attn_mask requires grad (use the reference backend)"
    return None


register_backend(
    AttentionBackend(
        name="naive",
        description="textbook baseline: materialises Q·Kᵀ (memory grows as L·S; window/ALiBi/soft-cap)",
        availability=_always_available,
        unsupported=_naive_unsupported,
        auto=False,
        forward=naive_forward,
        backward=naive_backward,
    )
)
