"""Packed variable-length attention, as FlashAttention's ``flash_attn_varlen_func``.

A batch of sequences of different lengths is passed without padding:
``q (total_q, Hq, E)`` holds every sequence's queries back to back and
``cu_seqlens_q (B + 1,)`` int32 their boundaries (sequence ``b`` is rows
``cu_seqlens_q[b]:cu_seqlens_q[b+1]``); likewise for keys/values.

The inputs are validated once into a ``VarlenProblem``; the registry picks the
backend: the Triton kernels (custom ops ``fastformer::varlen_attention_fwd`` /
``_bwd`` of ``fused.py``) where they run, else the ``"reference"`` per-sequence
loop over ``torch.nn.functional.scaled_dot_product_attention``.
"""

from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor

from .fused import run_problem
from .problem import validate_varlen_inputs
from .registry import select_backend

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
    window_size: Tuple[int, int] = (-1, -1),
    alibi_slopes: Optional[Tensor] = None,
    softcap: float = 0.0,
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
        window_size: ``(left, right)`` local window per sequence, aligned bottom-right like
            ``causal``: query ``i`` sees keys ``i + S_b - L_b - left <= j <= i + S_b - L_b + right``
            (-1 = unlimited; see :func:`fastformer.attention` for a picture).
        alibi_slopes: ``None`` or float32 ``(Hq,)`` / ``(B, Hq)`` (B = number of sequences):
            adds ``-slope * |i + S_b - L_b - j|``.
        softcap: ``> 0``: scores become ``softcap * tanh(score / softcap)``; 0 = off.
        return_lse: also return the fp32 log-sum-exp, ``(Hq, total_q)``, detached.
        backend: ``"auto"`` (Triton where it runs and is validated, else the per-sequence
            torch fallback), or a backend name (``"triton"``, ``"reference"``); one without
            packed kernels raises ``ValueError``. The torch fallback runs the variants as
            per-sequence explicit math.

    Returns:
        ``out (total_q, Hq, Ev)`` in q's dtype, or ``(out, lse)``.

    Raises:
        ``TypeError`` / ``ValueError`` / ``RuntimeError`` naming the argument (bad
        ``cu_seqlens``, ``window_size``, ``alibi_slopes``, ``softcap``, ...).
    """
    problem = validate_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                     softmax_scale, causal, window_size, alibi_slopes, softcap)
    return run_problem(problem, select_backend(problem, backend), return_lse)
