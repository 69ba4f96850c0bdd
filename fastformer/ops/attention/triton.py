"""The ``"triton"`` backend: fused FlashAttention-style kernels in Triton, for dense,
packed variable-length and decode attention.

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (how the
test suite checks it without a GPU). The kernels and their launch helpers live in
``kernels/attention_fwd.py``, ``kernels/attention_bwd.py`` (dense and packed
layouts, :class:`~fastformer.kernels.attention_common.Layout`) and
``kernels/decode.py``; the functions here allocate the outputs with
:func:`new_output`, handle empty problems and call the launch helpers (the
kernel contracts of ``fused.py``).

fp32 inputs: the matmuls use TF32 tensor cores only when
``torch.backends.cuda.matmul.allow_tf32`` is True (torch's default is False,
so by default fp32 is computed in full precision, as torch's fp32 SDPA).

Autotuning: ``FASTFORMER_TRITON_AUTOTUNE`` = ``small`` (default; time <= 3 preferred
configs per shape key), ``full`` or ``off`` (no timing; for test runs), see
``kernels/attention_common.py``. The backward is always deterministic (no atomics).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from ..buffers import new_output
from .registry import AttentionBackend, register_backend

MAX_HEAD_DIM = 256
# "auto" picks this backend for CUDA tensors it supports (issue 4). Unlike the hand-written
# CUDA kernels (cuda.CUDA_VALIDATED_ON_GPU, off until a GPU run passes), these
# kernels' semantics are verified in CI by the Triton interpreter on the full feature matrix,
# and CI compiles them for sm_80/sm_90a through ptxas (bench/attention_triton_ptxas.py).
# Set False to keep "auto" off them if a GPU run of bench/gpu.sh shows a failure.
VALIDATED_ON_GPU = True
DECODE_BLOCK_N = 64


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_unavailable() -> Optional[str]:
    """None when Triton kernels can run here (a CUDA GPU, or the interpreter), else why not."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # broken installs raise more than ImportError
        return f"triton is not importable: {exc}"
    if torch.cuda.is_available() or _interpreting():
        return None
    return "no CUDA GPU (set TRITON_INTERPRET=1 to run the Triton kernels on CPU tensors, slowly)"


def device_unsupported(device: torch.device) -> Optional[str]:
    if device.type == "cuda":
        return None
    if device.type == "cpu" and _interpreting():
        return None
    return f"Triton kernels need CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got {device.type}"


def padded_tiles_unsupported(head_dim: int, head_dim_v: int, device: torch.device) -> Optional[str]:
    """Why Triton cannot take these head dims on this device, or None.

    On sm_90 with triton 3.6, ``_attn_fwd`` faults ("Invalid __shared__ read of size 512
    bytes", compute-sanitizer) when both head dims need padding to *different* tile widths,
    e.g. E=24 (tile 32) with Ev=8 (tile 16). Seen on an H200 (bench/NOTES.md, GPU run 2);
    E=24/Ev=16, E=32/Ev=8, E=5/Ev=7, E=40/Ev=40 and E=80/Ev=80 ran correctly there. The
    interpreter is unaffected. Other backends take these shapes."""
    if device.type != "cuda":
        return None
    # Only reached once the backend is available (triton importable): selection checks that first.
    from fastformer.kernels.attention_common import head_block

    be, bv = head_block(head_dim), head_block(head_dim_v)
    if be != head_dim and bv != head_dim_v and be != bv:
        return (f"head dims E={head_dim} and Ev={head_dim_v} pad to different tiles ({be}, {bv}), which "
                "faults in triton 3.6's sm_90 code (an invalid shared-memory read)")
    return None


def _refuse_faulting_tiles(q: Tensor, v: Tensor) -> None:
    # Every path into the kernels (dense, varlen, forced backends) passes here: never launch a shape
    # known to fault; backend selection already routes such problems elsewhere.
    reason = padded_tiles_unsupported(q.shape[-1], v.shape[-1], q.device)
    if reason is not None:
        raise ValueError(f"q/k/v head dims: {reason}; use another attention backend")


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 follows torch.backends.cuda.matmul.allow_tf32 (default off: full precision)."""
    from fastformer.kernels.attention_common import dot_precision as kernel_precision

    return kernel_precision(dtype)


def _contiguous_last(t: Tensor) -> Tensor:
    # Any strides are correct; a unit stride on the head dim makes the loads vectorise.
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch_forward(q, k, v, mask, rng_state, opts, varlen=False, cu_q=None, cu_k=None, max_q=0, max_k=0):
    from fastformer.kernels.attention_common import DENSE, PACKED, dims
    from fastformer.kernels.attention_fwd import attention_fwd

    q, k, v = (_contiguous_last(t) for t in (q, k, v))
    _refuse_faulting_tiles(q, v)
    out = new_output((*q.shape[:-1], v.shape[-1]), q.dtype, q.device)
    lse_shape = (q.shape[1], q.shape[0]) if varlen else q.shape[:-1]
    lse = new_output(lse_shape, torch.float32, q.device)
    d = dims(q, k, v, PACKED if varlen else DENSE, cu_q, max_q, max_k)
    if d.len_k == 0 or d.batch * d.heads * d.len_q == 0 or d.head_dim_v == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    attention_fwd(q, k, v, mask, out, lse, rng_state, scale=opts.scale, dropout_p=opts.dropout_p,
                  is_causal=opts.is_causal, causal_bottom_right=opts.causal_bottom_right,
                  layout=PACKED if varlen else DENSE, cu_q=cu_q, cu_k=cu_k, max_q=max_q, max_k=max_k,
                  variant=opts if opts.variant_active else None)
    return out, lse


def _launch_backward(dout, q, k, v, out, lse, mask, rng_state, opts, varlen=False, cu_q=None, cu_k=None,
                     max_q=0, max_k=0):
    from fastformer.kernels.attention_bwd import attention_bwd
    from fastformer.kernels.attention_common import DENSE, PACKED, dims

    q, k, v, out, dout = (_contiguous_last(t) for t in (q, k, v, out, dout))
    _refuse_faulting_tiles(q, v)
    dq = new_output(q.shape, q.dtype, q.device)
    dk = new_output(k.shape, k.dtype, k.device)
    dv = new_output(v.shape, v.dtype, v.device)
    d = dims(q, k, v, PACKED if varlen else DENSE, cu_q, max_q, max_k)
    if d.len_k == 0 or d.len_q == 0 or d.batch * d.heads == 0 or d.head_dim_v == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = new_output(lse.shape, torch.float32, q.device)
    attention_bwd(dout, q, k, v, out, lse, mask, rng_state, dq, dk, dv, delta, scale=opts.scale,
                  dropout_p=opts.dropout_p, is_causal=opts.is_causal, causal_bottom_right=opts.causal_bottom_right,
                  layout=PACKED if varlen else DENSE, cu_q=cu_q, cu_k=cu_k, max_q=max_q, max_k=max_k,
                  variant=opts if opts.variant_active else None)
    return dq, dk, dv


def triton_forward(q, k, v, mask, rng_state, opts):
    """Dense kernel contract of fused.py."""
    return _launch_forward(q, k, v, mask, rng_state, opts)


def triton_backward(dout, q, k, v, out, lse, mask, rng_state, opts):
    """Dense kernel contract of fused.py."""
    return _launch_backward(dout, q, k, v, out, lse, mask, rng_state, opts)


def triton_varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, rng_state, opts):
    """Packed kernel contract of fused.py: ``q (Tq, Hq, E)`` → ``out (Tq, Hq, Ev)``, ``lse (Hq, Tq)``."""
    return _launch_forward(q, k, v, None, rng_state, opts, True, cu_q, cu_k, max_q, max_k)


def triton_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, rng_state, opts):
    """Packed kernel contract of fused.py."""
    return _launch_backward(dout, q, k, v, out, lse, None, rng_state, opts, True, cu_q, cu_k, max_q, max_k)


def decode_num_splits(batch_heads_kv: int, max_len: int, device: torch.device) -> int:
    """The split-K chunk count the kernels pick when the caller gives none (from the SM count)."""
    from fastformer.kernels.decode import decode_num_splits as choose

    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return choose(batch_heads_kv, max_len, sms, DECODE_BLOCK_N)


def triton_decode_forward(q, k_cache, v_cache, cache_seqlens, block_table, opts, num_splits):
    """Decode kernel contract of fused.py: split-K over the cache (contiguous, or paged through
    ``block_table``), then a combine kernel."""
    from fastformer.kernels.decode import decode_attention_fwd

    B, Hq, Lq, _ = q.shape
    if num_splits <= 0:
        if block_table is not None:  # paged: (num_blocks, block_size, Hkv, D)
            hkv, capacity = k_cache.shape[2], block_table.shape[1] * k_cache.shape[1]
        else:
            hkv, capacity = k_cache.shape[1], k_cache.shape[2]
        num_splits = decode_num_splits(B * hkv, capacity, q.device)
    Dv = v_cache.shape[3]
    out = new_output((B, Hq, Lq, Dv), q.dtype, q.device)
    lse = new_output((B, Hq, Lq), torch.float32, q.device)
    o_part = new_output((B, Hq, Lq, num_splits, Dv), torch.float32, q.device)
    lse_part = new_output((B, Hq, Lq, num_splits), torch.float32, q.device)
    decode_attention_fwd(q, k_cache, v_cache, cache_seqlens, opts.scale, opts.is_causal, out, lse, o_part, lse_part,
                         num_splits=num_splits, block_n=DECODE_BLOCK_N, window=(opts.window_left, opts.window_right),
                         alibi_slopes=opts.alibi_slopes, softcap=opts.softcap, block_table=block_table)
    return out, lse


def _unsupported(problem) -> Optional[str]:
    reason = device_unsupported(problem.q.device)
    if reason is not None:
        return reason
    if problem.kind == "decode":
        return padded_tiles_unsupported(problem.q.shape[-1], problem.v_cache.shape[-1], problem.q.device)
    q, v = problem.q, problem.v
    if q.dtype == torch.float64:
        return "float64 inputs (the kernels compute in fp16/bf16/fp32)"
    head_dim, head_dim_v = q.shape[-1], v.shape[-1]
    if max(head_dim, head_dim_v) > MAX_HEAD_DIM:
        return f"head dim {max(head_dim, head_dim_v)} > {MAX_HEAD_DIM}"
    if head_dim == 0 and problem.kind == "varlen":
        return "head dim 0"
    reason = padded_tiles_unsupported(head_dim, head_dim_v, q.device)
    if reason is not None:
        return reason
    if problem.kind == "dense" and problem.mask_needs_grad:
        return "a float attn_mask that requires grad (the kernels do not produce its gradient)"
    return None


register_backend(
    AttentionBackend(
        name="triton",
        description="fused FlashAttention-style Triton kernels (CUDA; CPU under TRITON_INTERPRET=1; "
                    "window/ALiBi/soft-cap, paged decode)",
        availability=triton_unavailable,
        unsupported=_unsupported,
        auto=VALIDATED_ON_GPU,
        forward=triton_forward,
        backward=triton_backward,
        varlen_forward=triton_varlen_forward,
        varlen_backward=triton_varlen_backward,
        decode_forward=triton_decode_forward,
    )
)

__all__ = ["MAX_HEAD_DIM", "VALIDATED_ON_GPU", "dot_precision", "triton_unavailable", "device_unsupported"]
