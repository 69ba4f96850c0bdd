"""Attention of a few new tokens over a preallocated KV cache (inference only).

``decode_attention`` runs the split-K Triton kernels of ``kernels/decode.py``
on CUDA tensors (and on CPU tensors under ``TRITON_INTERPRET=1``, which is how
the tests exercise them), else an equivalent PyTorch path. The Triton path is
the ``fastformer::decode_attention`` custom op, so ``torch.compile`` sees one
opaque node with a fake implementation.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .buffers import new_output

DECODE_BACKENDS = ("auto", "triton", "torch")
_BLOCK_N = 64
_DEFAULT_STACK = []


@contextlib.contextmanager
def use_decode_backend(backend: str):
    """Make ``backend`` ("auto", "triton" or "torch") what ``decode_attention(backend="auto")``
    uses inside a ``with`` block (e.g. to decode with the PyTorch path under the interpreter)."""
    if backend not in DECODE_BACKENDS:
        raise ValueError(f"backend must be one of {DECODE_BACKENDS}, got {backend!r}")
    _DEFAULT_STACK.append(backend)
    try:
        yield
    finally:
        _DEFAULT_STACK.pop()


def _triton_usable(device: torch.device) -> Optional[str]:
    """None when the Triton kernels can run on ``device``, else why not."""
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "CPU tensors need TRITON_INTERPRET=1 for the Triton kernels"
    if device.type not in ("cpu", "cuda"):
        return f"no Triton kernels for device type {device.type!r}"
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - triton ships with torch on Linux
        return f"triton is not importable: {exc}"
    return None


def _num_splits(batch_heads_kv: int, max_len: int, device: torch.device) -> int:
    from fastformer.kernels.decode import decode_num_splits

    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return decode_num_splits(batch_heads_kv, max_len, sms, _BLOCK_N)


@torch.library.custom_op("fastformer::decode_attention", mutates_args=())
def _decode_attention_triton(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, scale: float, causal: bool, num_splits: int
) -> tuple[Tensor, Tensor]:
    from fastformer.kernels.decode import decode_attention_fwd

    B, Hq, Lq, _ = q.shape
    Dv = v_cache.shape[3]
    out = new_output((B, Hq, Lq, Dv), q.dtype, q.device)
    lse = new_output((B, Hq, Lq), torch.float32, q.device)
    o_part = new_output((B, Hq, Lq, num_splits, Dv), torch.float32, q.device)
    lse_part = new_output((B, Hq, Lq, num_splits), torch.float32, q.device)
    decode_attention_fwd(q, k_cache, v_cache, cache_seqlens, scale, causal, out, lse, o_part, lse_part,
                         num_splits=num_splits, block_n=_BLOCK_N)
    return out, lse


@_decode_attention_triton.register_fake
def _(q, k_cache, v_cache, cache_seqlens, scale, causal, num_splits):
    B, Hq, Lq, _ = q.shape
    return q.new_empty((B, Hq, Lq, v_cache.shape[3])), q.new_empty((B, Hq, Lq), dtype=torch.float32)


def _decode_attention_torch(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Union[Tensor, int],
                            scale: float, causal: bool) -> Tensor:
    B, Hq, Lq, _ = q.shape
    gqa = Hq != k_cache.shape[1]
    if isinstance(cache_seqlens, int):
        # Uniform lengths: slice the cache; a mask only when the new tokens need the causal one.
        S = cache_seqlens
        k, v = k_cache[:, :, :S], v_cache[:, :, :S]
        mask = None
        if causal and Lq > 1:
            mask = torch.ones(Lq, S, dtype=torch.bool, device=q.device).tril(S - Lq)
            if S < Lq:
                return _masked_sdpa(q, k, v, mask.expand(B, Lq, S), scale, gqa)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    lens = cache_seqlens.to(device=q.device, dtype=torch.long)
    S = _checked_max_length(lens, k_cache.shape[2])
    keys = torch.arange(S, device=q.device)
    valid = (keys[None, :] < lens[:, None])[:, None, :, None]  # (B, 1, S, 1)
    # Entries past a sequence's length are never read: whatever they hold (NaN in a
    # reused cache) must not reach the output through 0 * NaN.
    k = torch.where(valid, k_cache[:, :, :S], 0)
    v = torch.where(valid, v_cache[:, :, :S], 0)
    if causal:
        last = lens[:, None] - Lq + torch.arange(Lq, device=q.device)[None, :]  # (B, Lq)
    else:
        last = (lens - 1)[:, None].expand(B, Lq)
    return _masked_sdpa(q, k, v, keys[None, None, :] <= last[:, :, None], scale, gqa)


def _checked_max_length(lens: Tensor, cache_len: int) -> int:
    """The longest sequence, after checking every length lies in [0, cache_len].
    One host read of (min, max); the torch path needs the max anyway to slice."""
    if lens.numel() == 0:
        return 0
    lo, hi = (int(x) for x in torch.stack(torch.aminmax(lens)).tolist())
    if lo < 0 or hi > cache_len:
        raise ValueError(
            f"cache_seqlens must lie in [0, {cache_len}] (the cache length, dim 2 of k_cache), "
            f"got values in [{lo}, {hi}]: {lens.tolist()}"
        )
    return hi


def _masked_sdpa(q, k, v, mask, scale, gqa):
    """SDPA with a (B, Lq, S) bool mask; rows with no visible key give 0 (as the kernel)."""
    if k.shape[2] == 0:
        return q.new_zeros(q.shape[:-1] + (v.shape[-1],))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=scale, enable_gqa=gqa)
    return out.masked_fill(~mask.any(-1)[:, None, :, None], 0.0)


def _validate(q, k_cache, v_cache, cache_seqlens, scale, backend):
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D, got shape {tuple(t.shape)}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise TypeError(f"q, k_cache and v_cache must share a dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if not (q.device == k_cache.device == v_cache.device):
        raise RuntimeError(f"q, k_cache and v_cache must be on one device, got {q.device}, {k_cache.device}, {v_cache.device}")
    B, Hq, Lq, D = q.shape
    if k_cache.shape[0] != B or v_cache.shape[0] != B:
        raise ValueError(f"k_cache/v_cache batch must equal q's {B}: {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    if k_cache.shape[3] != D:
        raise ValueError(f"k_cache head dim {k_cache.shape[3]} must equal q's {D}")
    if k_cache.shape[1:3] != v_cache.shape[1:3]:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must agree on (Hkv, Smax)")
    if Hq % k_cache.shape[1] != 0:
        raise ValueError(f"q's heads ({Hq}) must be a multiple of the cache's heads ({k_cache.shape[1]})")
    if Lq < 1:
        raise ValueError("q must hold at least one query token (dim 2)")
    if isinstance(cache_seqlens, bool) or not isinstance(cache_seqlens, (int, Tensor)):
        raise TypeError(f"cache_seqlens must be an int or an int tensor of shape ({B},), got {type(cache_seqlens).__name__}")
    if isinstance(cache_seqlens, int):
        if not 0 <= cache_seqlens <= k_cache.shape[2]:
            raise ValueError(f"cache_seqlens={cache_seqlens} must lie in [0, {k_cache.shape[2]}] (the cache length)")
    else:
        if cache_seqlens.dtype not in (torch.int32, torch.int64) or tuple(cache_seqlens.shape) != (B,):
            raise TypeError(f"cache_seqlens must be an int32/int64 tensor of shape ({B},), got "
                            f"{cache_seqlens.dtype} {tuple(cache_seqlens.shape)}")
        if cache_seqlens.device != q.device and cache_seqlens.device.type != "cpu":
            raise RuntimeError(f"cache_seqlens must be on q's device ({q.device}) or the CPU, "
                               f"got {cache_seqlens.device}")
        if cache_seqlens.device.type == "cpu":
            # Host-side lengths are checked here, free of any device sync. Lengths already on
            # the GPU are not (that would sync every decoding step): the kernels clamp them
            # to [0, Smax] instead, so they never read outside the cache.
            _checked_max_length(cache_seqlens, k_cache.shape[2])
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if backend not in DECODE_BACKENDS:
        raise ValueError(f"backend must be one of {DECODE_BACKENDS}, got {backend!r}")


def decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Union[Tensor, int],
    scale: Optional[float] = None,
    *,
    causal: bool = True,
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
        num_splits: chunks of the cache per sequence for the split-K kernel
            (default: a heuristic from the GPU's SM count).
        backend: ``"auto"`` (Triton on CUDA, or on CPU under ``TRITON_INTERPRET=1``;
            otherwise PyTorch), ``"triton"`` or ``"torch"``.

    Returns:
        ``(B, Hq, Lq, Dv)`` in q's dtype. Rows that see no key are 0. Not differentiable.
    """
    _validate(q, k_cache, v_cache, cache_seqlens, scale, backend)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if backend == "auto" and _DEFAULT_STACK:
        backend = _DEFAULT_STACK[-1]
    why_not = _triton_usable(q.device)
    if why_not is None:
        from .attention_triton import padded_tiles_unsupported

        why_not = padded_tiles_unsupported(q.shape[-1], v_cache.shape[-1], q.device)
    if backend == "triton" and why_not is not None:
        raise RuntimeError(f"decode_attention backend 'triton' cannot run here: {why_not}")
    if backend == "torch" or (backend == "auto" and why_not is not None):
        return _decode_attention_torch(q, k_cache, v_cache, cache_seqlens, scale, causal)
    B, Hkv = q.shape[0], k_cache.shape[1]
    if isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((B,), cache_seqlens, dtype=torch.int32, device=q.device)
    if num_splits is None:
        num_splits = _num_splits(B * Hkv, k_cache.shape[2], q.device)
    if not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits must be a positive int, got {num_splits!r}")
    out, _ = _decode_attention_triton(q, k_cache, v_cache, cache_seqlens.to(q.device), scale, causal, num_splits)
    return out
