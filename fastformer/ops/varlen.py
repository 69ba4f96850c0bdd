"""Packed variable-length attention, as FlashAttention's ``flash_attn_varlen_func``.

A batch of sequences of different lengths is passed without padding:
``q (total_q, Hq, E)`` holds every sequence's queries back to back and
``cu_seqlens_q (B + 1,)`` int32 their boundaries (sequence ``b`` is rows
``cu_seqlens_q[b]:cu_seqlens_q[b+1]``); likewise for keys/values.

Two custom ops, ``fastformer::varlen_attention_fwd`` / ``varlen_attention_bwd``
(fake implementations + autograd, so ``torch.compile`` traces them), run the
Triton kernels of ``attention_triton`` in their packed layout. Where Triton
cannot run, a per-sequence loop over ``torch.nn.functional.scaled_dot_product_attention``
gives the same answer.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention_naive import causal_mask
from .fused_attention import draw_rng_state

_BACKENDS = ("auto", "triton", "reference")


@torch.library.custom_op("fastformer::varlen_attention_fwd", mutates_args=())
def varlen_attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    rng_state: Optional[Tensor],
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float,
    causal: bool,
    scale: float,
) -> tuple[Tensor, Tensor]:
    from .attention_triton import Layout, launch_forward

    return launch_forward(
        q, k, v, None, rng_state, dropout_p, causal, True, scale,
        layout=Layout(True), cu_q=cu_seqlens_q, cu_k=cu_seqlens_k, max_q=max_seqlen_q, max_k=max_seqlen_k,
    )


@varlen_attention_fwd.register_fake
def _varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, rng_state, max_seqlen_q, max_seqlen_k, dropout_p, causal, scale):
    out = q.new_empty((q.shape[0], q.shape[1], v.shape[2]))
    lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("fastformer::varlen_attention_bwd", mutates_args=())
def varlen_attention_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    rng_state: Optional[Tensor],
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float,
    causal: bool,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    from .attention_triton import Layout, launch_backward

    return launch_backward(
        dout, q, k, v, out, lse, None, rng_state, dropout_p, causal, True, scale,
        layout=Layout(True), cu_q=cu_seqlens_q, cu_k=cu_seqlens_k, max_q=max_seqlen_q, max_k=max_seqlen_k,
    )


@varlen_attention_bwd.register_fake
def _varlen_bwd_fake(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, rng_state, max_seqlen_q, max_seqlen_k,
                     dropout_p, causal, scale):
    # Contiguous, like the real op's outputs (empty_like would copy q's strides).
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, rng_state, max_q, max_k, dropout_p, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, rng_state)
    ctx.options = (max_q, max_k, dropout_p, causal, scale)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k, rng_state = ctx.saved_tensors
    max_q, max_k, dropout_p, causal, scale = ctx.options
    # The log-sum-exp is handed out detached; only the output is differentiated.
    dq, dk, dv = varlen_attention_bwd(
        dout.contiguous(), q, k, v, out, lse, cu_q, cu_k, rng_state, max_q, max_k, dropout_p, causal, scale
    )
    return dq, dk, dv, None, None, None, None, None, None, None, None


torch.library.register_autograd("fastformer::varlen_attention_fwd", _backward, setup_context=_setup_context)


def _check_cu_seqlens(name: str, cu: Tensor, total: int, device: torch.device) -> list:
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


def _validate(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p):
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
    len_q = [b - a for a, b in zip(cq, cq[1:])]
    len_k = [b - a for a, b in zip(ck, ck[1:])]
    _check_max("max_seqlen_q", max_seqlen_q, len_q)
    _check_max("max_seqlen_k", max_seqlen_k, len_k)
    if not isinstance(dropout_p, (int, float)) or isinstance(dropout_p, bool) or not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1], got {dropout_p!r}")
    return cq, ck


def _triton_unsupported(q: Tensor, v: Tensor) -> Optional[str]:
    from .attention_triton import MAX_HEAD_DIM, device_unsupported, triton_unavailable

    reason = triton_unavailable() or device_unsupported(q.device)
    if reason:
        return reason
    if q.dtype == torch.float64:
        return "float64 inputs"
    if max(q.shape[2], v.shape[2]) > MAX_HEAD_DIM:
        return f"head dim > {MAX_HEAD_DIM}"
    if q.shape[2] == 0:
        return "head dim 0"
    return None


def varlen_reference(q, k, v, cq: list, ck: list, dropout_p: float, scale: float, causal: bool, return_lse: bool):
    """Per-sequence torch SDPA (the fallback); lse, when asked, from the explicit scores."""
    outs, lses = [], []
    gqa = q.shape[1] != k.shape[1]
    for (q0, q1), (k0, k1) in zip(zip(cq, cq[1:]), zip(ck, ck[1:])):
        qb, kb, vb = q[q0:q1].transpose(0, 1), k[k0:k1].transpose(0, 1), v[k0:k1].transpose(0, 1)  # (H, n, D)
        mask = causal_mask(q1 - q0, k1 - k0, True, q.device) if causal else None
        if k1 == k0:
            ob = q.new_zeros((q.shape[1], q1 - q0, v.shape[2]))  # no keys: torch's answer is 0
        else:
            ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, dropout_p=dropout_p, scale=scale, enable_gqa=gqa)
        outs.append(ob.transpose(0, 1))
        if return_lse:
            kf = kb.repeat_interleave(q.shape[1] // k.shape[1], 0) if gqa else kb
            acc = torch.promote_types(q.dtype, torch.float32)
            s = (qb.to(acc) @ kf.to(acc).transpose(-2, -1)) * scale
            if mask is not None:
                s = s.masked_fill(~mask, float("-inf"))
            lses.append(torch.logsumexp(s, -1) if k1 > k0 else s.new_full((q.shape[1], q1 - q0), float("-inf")))
    out = torch.cat(outs, 0) if outs else q.new_zeros((0, q.shape[1], v.shape[2]))
    if not return_lse:
        return out
    lse = torch.cat(lses, 1).float() if lses else q.new_zeros((q.shape[1], 0), dtype=torch.float32)
    return out, lse.detach()


def varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    *,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Attention over a packed batch of variable-length sequences (no padding).

    Args:
        q: ``(total_q, Hq, E)``, the sequences' queries back to back.
        k: ``(total_k, Hkv, E)``; ``Hq`` a multiple of ``Hkv`` (GQA/MQA).
        v: ``(total_k, Hkv, Ev)``.
        cu_seqlens_q: int32 ``(B + 1,)`` on q's device, ``0 = c_0 <= c_1 <= ... = total_q``;
            sequence ``b`` is rows ``c_b:c_{b+1}``.
        cu_seqlens_k: int32 ``(B + 1,)``, likewise for k/v.
        max_seqlen_q, max_seqlen_k: the longest sequence (or any larger bound).
        dropout_p: dropout on the attention weights (applied whenever > 0).
        softmax_scale: score scale; ``None`` means ``1 / sqrt(E)``.
        causal: causal mask aligned bottom-right per sequence (query ``i`` sees keys
            ``j <= i + S_b - L_b``), as ``flash_attn_varlen_func``.
        return_lse: also return the fp32 log-sum-exp, ``(Hq, total_q)``, detached.
        backend: ``"auto"`` (Triton where it runs and is validated, else the per-sequence
            torch fallback), ``"triton"`` or ``"reference"``.

    Returns:
        ``out (total_q, Hq, Ev)`` in q's dtype, or ``(out, lse)``.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    cq, ck = _validate(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[2]) if q.shape[2] > 0 else 1.0
    scale = float(softmax_scale)
    reason = _triton_unsupported(q, v)
    if backend == "triton" and reason is not None:
        raise ValueError(f"varlen_attention backend 'triton' cannot run these inputs: {reason}")
    use_triton = backend == "triton" or (backend == "auto" and reason is None and q.is_cuda and _validated())
    if not use_triton:
        return varlen_reference(q, k, v, cq, ck, float(dropout_p), scale, bool(causal), return_lse)
    rng_state = draw_rng_state(float(dropout_p), q.device)
    out, lse = varlen_attention_fwd(
        q, k, v, cu_seqlens_q, cu_seqlens_k, rng_state, int(max_seqlen_q), int(max_seqlen_k),
        float(dropout_p), bool(causal), scale,
    )
    return (out, lse.detach()) if return_lse else out


def _validated() -> bool:
    from .attention_triton import VALIDATED_ON_GPU

    return VALIDATED_ON_GPU
