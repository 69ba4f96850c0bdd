"""Self-attention over one packed projection: FlashAttention's ``flash_attn_qkvpacked_func``.

``qkv (B, L, 3, H, E)`` is what a transformer's fused QKV projection produces, viewed; the
result is ``(B, L, H, E)``, which the output projection reads as ``(B, L, H·E)``. Besides the
layout, the packed form saves copies in training on the ``cpu`` backend: the output is written
in that layout and the backward writes one packed gradient of ``qkv`` (see
``fused._PackedAttention``), where the split form (``q, k, v = qkv.unbind(2)``, transposed)
has autograd copy each gradient out of its transposed view and concatenate them, and the output
projection copy the output. Other backends run the split form.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..errors import AttentionInputError
from .dense import _autocast, _plain_torch_call
from .fused import qkv_views, run_problem, run_qkvpacked
from .problem import check_flag, validate_attention_inputs
from .registry import get_backend, select_backend


def attention_qkvpacked(
    qkv: Tensor,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
    *,
    backend: str = "auto",
) -> Tensor:
    """Attention of a sequence to itself from packed projections (FlashAttention's names and layout).

    Args:
        qkv: ``(batch, seqlen, 3, nheads, headdim)``: queries, keys, values along dim 2.
        dropout_p: dropout on the attention weights, applied whenever > 0 (pass 0.0 in eval).
        softmax_scale: score scale; ``None`` means ``1 / sqrt(headdim)``.
        causal: query ``i`` sees keys ``j <= i``.
        window_size, softcap, alibi_slopes: as :func:`fastformer.attention` (``alibi_slopes``
            float32 ``(nheads,)`` or ``(batch, nheads)``).
        backend: as :func:`fastformer.scaled_dot_product_attention` (``"auto"`` picks as it would
            for ``q, k, v = qkv.unbind(2)`` transposed to ``(batch, nheads, seqlen, headdim)``).

    Inside ``torch.autocast`` for qkv's device type, a floating ``qkv`` (float64 excepted) is cast
    to the autocast dtype first, as torch's SDPA casts q, k and v.

    Returns:
        ``(batch, seqlen, nheads, headdim)``, contiguous, in qkv's dtype: the values of
        ``scaled_dot_product_attention(q, k, v, ...)`` for those views, transposed.

    Raises:
        :class:`~fastformer.ops.errors.AttentionInputError` (``ValueError``) naming ``qkv`` when it
        is not 5-D with 3 along dim 2 (``TypeError`` when not a tensor); otherwise as
        :func:`fastformer.attention`, whose messages name the q/k/v views ``query``, ``key``, ``value``.
    """
    if not isinstance(qkv, Tensor):
        raise TypeError(f"attention_qkvpacked: qkv must be a Tensor, got {type(qkv).__name__}")
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise AttentionInputError(
            f"attention_qkvpacked: qkv must be (batch, seqlen, 3, nheads, headdim), got shape {tuple(qkv.shape)}")
    if torch.is_autocast_enabled(qkv.device.type):
        qkv = _autocast(qkv, qkv, qkv, None)[0]  # one cast for the three: the views stay packed
    check_flag(causal, "causal")  # before the fast path, which would hand a non-bool to torch's message
    q, k, v = qkv_views(qkv)
    no_window = window_size is None or (isinstance(window_size, (tuple, list)) and tuple(window_size) == (-1, -1))
    plain = no_window and alibi_slopes is None and isinstance(softcap, (int, float)) and softcap == 0.0
    if plain and _plain_torch_call(q, k, v, None, dropout_p, causal, softmax_scale, False, backend):
        # auto hands these inputs to torch's SDPA: without building the problem (as the drop-in does).
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal,
                                                               scale=softmax_scale)
        return out.transpose(1, 2).contiguous()
    problem = validate_attention_inputs(q, k, v, None, dropout_p, causal, softmax_scale, False, False,
                                        window_size, alibi_slopes, softcap)
    chosen = select_backend(problem, backend)
    if problem.is_empty:
        chosen = get_backend("reference")  # nothing to compute: torch's shapes and zeros
    if problem.q is not q or problem.k is not k or problem.v is not v:  # not views of qkv any more
        return run_problem(problem, chosen).transpose(1, 2).contiguous()
    return run_qkvpacked(problem, chosen, qkv)
