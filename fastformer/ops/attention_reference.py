"""The ``"reference"`` backend: PyTorch's own ``scaled_dot_product_attention``.

Exact torch semantics on any device and dtype, differentiable in q, k, v and a
float mask; memory stays linear in L wherever torch picks a fused kernel. It is
what ``"auto"`` falls back to for anything a fused backend does not support.
"""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F

from .attention_inputs import AttentionProblem
from .attention_naive import causal_mask
from .dispatch import AttentionBackend, register_backend


def reference_attention(problem: AttentionProblem):
    q, k, v, mask, is_causal = problem.q, problem.k, problem.v, problem.mask, problem.is_causal
    if is_causal and problem.causal_bottom_right and problem.len_q != problem.len_k:
        # torch's is_causal is top-left aligned; build the bottom-right mask explicitly.
        mask, is_causal = causal_mask(problem.len_q, problem.len_k, True, q.device), False
    return F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=mask,
        dropout_p=problem.dropout_p,
        is_causal=is_causal,
        scale=problem.scale,
        enable_gqa=problem.heads_q != problem.heads_kv,
    )


def _available() -> Optional[str]:
    return None


def _supports_everything(problem: AttentionProblem) -> Optional[str]:
    return None


register_backend(
    AttentionBackend(
        name="reference",
        description="torch.nn.functional.scaled_dot_product_attention (any device/dtype; the fallback)",
        availability=_available,
        unsupported=_supports_everything,
        run=reference_attention,
    )
)
