"""Public attention entry points: validate, pick a backend, run."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from .attention_inputs import validate_attention_inputs
from .dispatch import select_backend
from .fused_attention import FUSED_KERNELS, fused_attention


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    *,
    backend: str = "auto",
) -> Tensor:
    """Drop-in for :func:`torch.nn.functional.scaled_dot_product_attention`.

    Args:
        query: ``(..., Hq, L, E)`` (any number of leading batch dimensions, or none).
        key: ``(..., Hkv, S, E)``.
        value: ``(..., Hkv, S, Ev)``.
        attn_mask: ``None``; a bool mask (``True`` = attend) or a float mask of query's
            dtype added to the scores, broadcastable to ``(..., Hq, L, S)``.
        dropout_p: dropout probability on the attention weights, applied whenever > 0
            (as in torch; pass 0.0 in evaluation).
        is_causal: causal mask aligned top-left (query i sees keys j <= i), as torch.
        scale: score scale; ``None`` means ``1 / sqrt(E)``.
        enable_gqa: allow ``Hq`` to be a multiple of ``Hkv`` (grouped-query attention).
        backend: ``"auto"`` (fastest backend that supports the inputs, else
            ``"reference"``), or one of ``"reference"``, ``"naive"``, ``"triton"``,
            ``"cuda"``, ``"cpu"`` (raises if it cannot run these inputs).

    Returns:
        ``(..., Hq, L, Ev)`` in query's dtype.
    """
    problem = validate_attention_inputs(
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa
    )
    out = select_backend(problem, backend).run(problem)
    return out if query.dim() == 4 else out.reshape(problem.out_shape)


def attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    *,
    causal_bottom_right: bool = False,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Lower-level attention with the options torch's signature lacks.

    Same arguments as :func:`scaled_dot_product_attention`, plus:
        causal_bottom_right: align the causal mask bottom-right (query i sees keys
            ``j <= i + S - L``), as when decoding new tokens against a KV cache.
        return_lse: also return the float32 log-sum-exp of each row of scaled,
            masked scores, shaped ``query.shape[:-1]`` (``-inf`` for fully masked
            rows). Only fused backends produce it; ``"auto"`` then falls back to the
            ``"naive"`` kernels where no fused backend supports the inputs. The
            log-sum-exp is returned detached (not differentiable).

    Returns:
        ``out`` or ``(out, lse)``.
    """
    problem = validate_attention_inputs(
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, causal_bottom_right
    )
    chosen = select_backend(problem, backend)
    if not return_lse:
        return chosen.run(problem).reshape(problem.out_shape)
    name = chosen.name if chosen.name in FUSED_KERNELS else None
    if name is None:
        if backend != "auto":
            raise ValueError(f"return_lse=True needs a fused backend; {backend!r} does not produce the log-sum-exp")
        name = "naive"
    out, lse = fused_attention(problem, name, return_lse=True)
    return out.reshape(problem.out_shape), lse.reshape(problem.out_shape[:-1])
