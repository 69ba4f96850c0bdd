"""Attention of a few new tokens over a preallocated KV cache (inference only).

``decode_attention`` validates once into a ``DecodeProblem`` and lets the registry
pick the backend: the split-K Triton kernels of ``kernels/decode.py`` (custom op
``fastformer::decode_attention``, one opaque node for ``torch.compile``) on CUDA
tensors and on CPU tensors under ``TRITON_INTERPRET=1`` (how the tests exercise
them), else the ``"reference"`` PyTorch path.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

from torch import Tensor

from .fused import run_problem
from .problem import validate_decode_inputs
from .registry import select_backend, use_decode_backend

__all__ = ["decode_attention", "use_decode_backend"]


def decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Union[Tensor, int],
    scale: Optional[float] = None,
    *,
    causal: bool = True,
    window_size: Tuple[int, int] = (-1, -1),
    alibi_slopes: Optional[Tensor] = None,
    softcap: float = 0.0,
    block_table: Optional[Tensor] = None,
    num_splits: Optional[int] = None,
    backend: str = "auto",
) -> Tensor:
    """Attention of ``Lq`` new query tokens over the first ``cache_seqlens`` cache entries.

    Args:
        q: ``(B, Hq, Lq, D)``, the new tokens (their K/V already written to the cache).
        k_cache: ``(B, Hkv, Smax, D)``; ``Hq`` must be a multiple of ``Hkv`` (GQA/MQA).
        v_cache: ``(B, Hkv, Smax, Dv)``.
        cache_seqlens: valid entries per sequence, an int32/int64 tensor ``(B,)`` (on q's
            device or the CPU) or one int for all, each in ``[0, Smax]``; entries past it
            are never read (NaN there does not reach the output). Values outside
            ``[0, Smax]`` raise ``ValueError`` naming ``cache_seqlens`` when they can be
            checked without a device sync (an int, a CPU tensor, the PyTorch path); lengths
            already on the GPU are clamped to ``[0, Smax]`` inside the kernel instead.
        scale: score scale, default ``1 / sqrt(D)``.
        causal: bottom-right causal alignment: query ``i`` sees keys
            ``j <= cache_seqlens - Lq + i`` (the new tokens are the cache's last ones).
            ``False`` attends to every valid entry (e.g. cached cross-attention).
        window_size: ``(left, right)``, FlashAttention's convention: the query at cache
            position ``pos = cache_seqlens - Lq + i`` sees keys ``pos - left <= j <= pos + right``
            (-1 = unlimited; ``causal`` means ``right = 0``). The kernel reads only the window.
        alibi_slopes: ``None`` or float32 ``(Hq,)`` / ``(B, Hq)``: adds ``-slope * |pos - j|``.
        softcap: ``> 0``: scores become ``softcap * tanh(score / softcap)`` (Gemma 2); 0 = off.
        block_table: paged KV cache (vLLM / ``flash_attn_with_kvcache``): int32
            ``(B, max_blocks)`` on q's device; ``k_cache`` / ``v_cache`` are then pools of
            blocks ``(num_blocks, block_size, Hkv, D)`` / ``(..., Dv)``, and sequence ``b``'s
            position ``j`` lives in block ``block_table[b, j // block_size]``, row
            ``j % block_size``. Lengths must lie in ``[0, max_blocks * block_size]`` and
            the ids a sequence uses (its first ``ceil(len / block_size)`` entries) in
            ``[0, num_blocks)``; both are checked on the host (one device sync per call,
            also for lengths on the GPU) and violations raise ``ValueError`` naming the
            entry. The remaining entries of a row are never read (e.g. -1 padding).
        num_splits: chunks of the cache per sequence for the split-K kernel
            (default: a heuristic from the GPU's SM count).
        backend: ``"auto"`` (Triton on CUDA, or on CPU under ``TRITON_INTERPRET=1``;
            otherwise PyTorch), or a backend name: ``"triton"``, ``"reference"`` (also
            spelled ``"torch"``); one without decode kernels raises ``ValueError``.

    Returns:
        ``(B, Hq, Lq, Dv)`` in q's dtype. Rows that see no key are 0. Not differentiable.

    Raises:
        ``TypeError`` / ``ValueError`` / ``RuntimeError`` naming the argument: shapes,
        dtypes and devices of the tensors, ``cache_seqlens`` out of range, ``block_table``
        (not int32 ``(B, max_blocks)``, an id in use outside ``[0, num_blocks)``),
        ``window_size``, ``alibi_slopes``, ``softcap``, ``num_splits``.
    """
    problem = validate_decode_inputs(q, k_cache, v_cache, cache_seqlens, scale, causal, num_splits, window_size,
                                     alibi_slopes, softcap, block_table)
    return run_problem(problem, select_backend(problem, "reference" if backend == "torch" else backend))
