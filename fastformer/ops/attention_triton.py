"""The ``"triton"`` backend: fused FlashAttention-style kernels in Triton.

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (how the
test suite checks it without a GPU). Kernels live in ``kernels/attention_fwd.py``
and ``kernels/attention_bwd.py``; this module holds the launchers (allocate
with :func:`new_output`, launch over a 1-D grid, return) and registers them
with the shared fused-attention custom ops (``fused_attention.py``) and with
dispatch.

fp32 inputs: the matmuls use TF32 tensor cores only when
``torch.backends.cuda.matmul.allow_tf32`` is True (torch's default is False,
so by default fp32 is computed in full precision, as torch's fp32 SDPA).

Autotuning: ``FASTFORMER_TRITON_AUTOTUNE`` = ``small`` (default; time <= 3 preferred
configs per shape key), ``full`` or ``off`` (no timing; for test runs), see
``kernels/attention_common.py``. The backward is always deterministic (no atomics).

The same launchers serve the packed variable-length layout (``varlen.py``):
a :class:`Layout` says how a tensor's (batch, head, row, dim) strides are read.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .attention_inputs import AttentionProblem
from .buffers import new_output
from .dispatch import AttentionBackend, register_backend
from .fused_attention import fused_attention, register_fused_kernels

MAX_HEAD_DIM = 256
# "auto" picks this backend for CUDA tensors it supports (issue 4). Unlike the hand-written
# CUDA kernels (attention_cuda.CUDA_VALIDATED_ON_GPU, off until a GPU run passes), these
# kernels' semantics are verified in CI by the Triton interpreter on the full feature matrix,
# and CI compiles them for sm_80/sm_90a through ptxas (bench/attention_triton_ptxas.py).
# Set False to keep "auto" off them if a GPU run of bench/gpu.sh shows a failure.
VALIDATED_ON_GPU = True


def _interpreting() -> bool:
    import os

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


def _block(d: int) -> int:
    return max(16, 1 << (int(d) - 1).bit_length())  # kernels.attention_common.head_block, without importing triton


def padded_tiles_unsupported(head_dim: int, head_dim_v: int, device: torch.device) -> Optional[str]:
    """Why Triton cannot take these head dims on this device, or None.

    On sm_90 with triton 3.6, ``_attn_fwd`` faults ("Invalid __shared__ read of size 512
    bytes", compute-sanitizer) when both head dims need padding to *different* tile widths,
    e.g. E=24 (tile 32) with Ev=8 (tile 16). Seen on an H200 (bench/NOTES.md, GPU run 2);
    E=24/Ev=16, E=32/Ev=8, E=5/Ev=7, E=40/Ev=40 and E=80/Ev=80 ran correctly there. The
    interpreter is unaffected. Other backends take these shapes."""
    if device.type != "cuda":
        return None
    be, bv = _block(head_dim), _block(head_dim_v)
    if be != head_dim and bv != head_dim_v and be != bv:
        return (f"head dims E={head_dim} and Ev={head_dim_v} pad to different tiles ({be}, {bv}), which "
                "faults in triton 3.6's sm_90 code (an invalid shared-memory read)")
    return None


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 follows torch.backends.cuda.matmul.allow_tf32 (default off: full precision)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # ignored by tl.dot for fp16/bf16 inputs


class Layout(NamedTuple):
    """How the kernels index a tensor: (batch, head, row, dim) strides; batch stride 0
    and ``cu_seqlens`` row offsets for the packed varlen layout."""

    varlen: bool

    def qkv(self, t: Tensor):  # dense (B, H, N, D) or packed (total, H, D)
        if self.varlen:
            return 0, t.stride(1), t.stride(0), t.stride(2)
        return t.stride(0), t.stride(1), t.stride(2), t.stride(3)

    def rows(self, t: Tensor):  # lse/delta: dense (B, H, N) or packed (H, total)
        if self.varlen:
            return 0, t.stride(0), t.stride(1)
        return t.stride(0), t.stride(1), t.stride(2)


class Dims(NamedTuple):
    batch: int
    heads: int
    heads_kv: int
    len_q: int  # dense length, or the longest sequence (varlen)
    len_k: int
    head_dim: int
    head_dim_v: int


def _dims(q: Tensor, k: Tensor, v: Tensor, layout: Layout, cu_q=None, max_q=0, max_k=0) -> Dims:
    if layout.varlen:
        return Dims(cu_q.numel() - 1, q.shape[1], k.shape[1], max_q, max_k, q.shape[2], v.shape[2])
    return Dims(q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3], v.shape[3])


def _mask_args(mask: Optional[Tensor], dummy: Tensor):
    """Kernel pointer + strides + flags for an attn_mask view (read in place, never expanded)."""
    if mask is None:
        return dummy, (0, 0, 0, 0), False, True
    if mask.dtype == torch.bool:
        return mask.view(torch.uint8), mask.stride(), True, True
    return mask, mask.stride(), True, False


def _dropout_scale(p: float) -> float:
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


def _common_meta(q, d: Dims, is_causal, dropout_p, layout, has_mask, mask_bool):
    from fastformer.kernels.attention_common import head_block, seq_bucket

    return dict(
        CAUSAL=bool(is_causal),
        HAS_MASK=has_mask,
        MASK_BOOL=mask_bool,
        DROPOUT=dropout_p > 0.0,
        VARLEN=layout.varlen,
        DOT_PRECISION=dot_precision(q.dtype),
        # Head dims are compile-time constants: the padding masks then fold away when
        # E is a power of two, so loads vectorise and the K/V loads software-pipeline
        # (with a run-time head dim, sm_90 code had no cp.async pipelining at all).
        HEAD_DIM=d.head_dim,
        HEAD_DIM_V=d.head_dim_v,
        BLOCK_D=head_block(d.head_dim),
        BLOCK_DV=head_block(d.head_dim_v),
    ), seq_bucket(d.len_q), seq_bucket(d.len_k)


def _refuse_faulting_tiles(d: "Dims", device: torch.device) -> None:
    # Every path into the kernels (dense, varlen, forced backends) passes here: never launch a shape
    # known to fault; backend selection already routes such problems elsewhere.
    reason = padded_tiles_unsupported(d.head_dim, d.head_dim_v, device)
    if reason is not None:
        raise ValueError(f"q/k/v head dims: {reason}; use another attention backend")


def _contiguous_last(t: Tensor) -> Tensor:
    # Any strides are correct; a unit stride on the head dim makes the loads vectorise.
    return t if t.stride(-1) == 1 else t.contiguous()


def launch_forward(q, k, v, mask, rng_state, dropout_p, is_causal, causal_bottom_right, scale,
                   layout: Layout = Layout(False), cu_q=None, cu_k=None, max_q=0, max_k=0):
    """Run ``_attn_fwd``. Dense: ``q (B, Hq, L, E)`` ... → ``out (B, Hq, L, Ev)``,
    ``lse (B, Hq, L)``. Varlen: ``q (Tq, Hq, E)`` ... → ``out (Tq, Hq, Ev)``, ``lse (Hq, Tq)``."""
    import triton

    from fastformer.kernels.attention_fwd import _attn_fwd
    from fastformer.kernels.launch_lock import AUTOTUNE_LOCK

    q, k, v = (_contiguous_last(t) for t in (q, k, v))
    d = _dims(q, k, v, layout, cu_q, max_q, max_k)
    _refuse_faulting_tiles(d, q.device)
    out_shape = (*q.shape[:-1], d.head_dim_v)
    out = new_output(out_shape, q.dtype, q.device)
    lse_shape = (d.heads, q.shape[0]) if layout.varlen else (d.batch, d.heads, d.len_q)
    lse = new_output(lse_shape, torch.float32, q.device)
    if d.len_k == 0 or d.batch * d.heads * d.len_q == 0 or d.head_dim_v == 0:
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse
    mask_ptr, mask_strides, has_mask, mask_bool = _mask_args(mask, q)
    meta, tune_lq, tune_lk = _common_meta(q, d, is_causal, dropout_p, layout, has_mask, mask_bool)
    grid = lambda META: (triton.cdiv(d.len_q, META["BLOCK_M"]) * d.batch * d.heads,)  # noqa: E731
    with AUTOTUNE_LOCK:  # triton's Autotuner is not thread-safe (kernels/launch_lock.py)
        _attn_fwd[grid](
            q, k, v, mask_ptr, out, lse,
            rng_state if rng_state is not None else q, cu_q if cu_q is not None else q, cu_k if cu_k is not None else q,
            *layout.qkv(q), *layout.qkv(k), *layout.qkv(v), *mask_strides, *layout.qkv(out), *layout.rows(lse),
            d.heads, d.heads // d.heads_kv, d.len_q, d.len_k, d.len_q,
            scale * 1.4426950408889634, float(dropout_p), _dropout_scale(dropout_p), int(causal_bottom_right),
            tune_lq, tune_lk,
            **meta,
        )
    return out, lse


def launch_backward(dout, q, k, v, out, lse, mask, rng_state, dropout_p, is_causal, causal_bottom_right, scale,
                    layout: Layout = Layout(False), cu_q=None, cu_k=None, max_q=0, max_k=0):
    """Run the three backward kernels; returns ``dq, dk, dv`` shaped like ``q, k, v``."""
    import triton

    from fastformer.kernels.attention_bwd import _attn_bwd_dkdv, _attn_bwd_dq, _attn_bwd_preprocess
    from fastformer.kernels.launch_lock import AUTOTUNE_LOCK

    q, k, v, out, dout = (_contiguous_last(t) for t in (q, k, v, out, dout))
    d = _dims(q, k, v, layout, cu_q, max_q, max_k)
    _refuse_faulting_tiles(d, q.device)
    dq = new_output(q.shape, q.dtype, q.device)
    dk = new_output(k.shape, k.dtype, k.device)
    dv = new_output(v.shape, v.dtype, v.device)
    if d.len_k == 0 or d.len_q == 0 or d.batch * d.heads == 0 or d.head_dim_v == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = new_output(lse.shape, torch.float32, q.device)
    mask_ptr, mask_strides, has_mask, mask_bool = _mask_args(mask, q)
    meta, tune_lq, tune_lk = _common_meta(q, d, is_causal, dropout_p, layout, has_mask, mask_bool)
    rng = rng_state if rng_state is not None else q
    cq = cu_q if cu_q is not None else q
    ck = cu_k if cu_k is not None else q
    pre_block = 64
    with AUTOTUNE_LOCK:  # triton's Autotuner is not thread-safe (kernels/launch_lock.py)
        _attn_bwd_preprocess[(triton.cdiv(d.len_q, pre_block) * d.batch * d.heads,)](
            out, dout, delta, cq,
            *layout.qkv(out), *layout.qkv(dout), *layout.rows(delta),
            d.heads, d.len_q, d.len_q,
            HEAD_DIM_V=d.head_dim_v, VARLEN=layout.varlen, BLOCK_M=pre_block, BLOCK_DV=meta["BLOCK_DV"],
        )
        common = (d.len_q, d.len_k)
        scalars = (scale, scale * 1.4426950408889634, float(dropout_p), _dropout_scale(dropout_p),
                   int(causal_bottom_right), tune_lq, tune_lk)
        grid_kv = lambda META: (triton.cdiv(d.len_k, META["BLOCK_N"]) * d.batch * d.heads_kv,)  # noqa: E731
        _attn_bwd_dkdv[grid_kv](
            q, k, v, mask_ptr, dout, lse, delta, dk, dv, rng, cq, ck,
            *layout.qkv(q), *layout.qkv(k), *layout.qkv(v), *mask_strides, *layout.qkv(dout), *layout.rows(lse),
            *layout.qkv(dk), *layout.qkv(dv),
            d.heads_kv, d.heads // d.heads_kv, *common, d.len_k,
            *scalars,
            **meta,
        )
        grid_q = lambda META: (triton.cdiv(d.len_q, META["BLOCK_M"]) * d.batch * d.heads,)  # noqa: E731
        _attn_bwd_dq[grid_q](
            q, k, v, mask_ptr, dout, lse, delta, dq, rng, cq, ck,
            *layout.qkv(q), *layout.qkv(k), *layout.qkv(v), *mask_strides, *layout.qkv(dout), *layout.rows(lse),
            *layout.qkv(dq),
            d.heads, d.heads // d.heads_kv, *common, d.len_q,
            *scalars,
            **meta,
        )
    return dq, dk, dv


def triton_forward(q, k, v, mask, rng_state, dropout_p, is_causal, causal_bottom_right, scale):
    return launch_forward(q, k, v, mask, rng_state, dropout_p, is_causal, causal_bottom_right, scale)


def triton_backward(dout, q, k, v, out, lse, mask, rng_state, dropout_p, is_causal, causal_bottom_right, scale):
    return launch_backward(dout, q, k, v, out, lse, mask, rng_state, dropout_p, is_causal, causal_bottom_right, scale)


register_fused_kernels("triton", triton_forward, triton_backward)


def _unsupported(problem: AttentionProblem) -> Optional[str]:
    reason = device_unsupported(problem.q.device)
    if reason is not None:
        return reason
    if problem.q.dtype == torch.float64:
        return "float64 inputs (the kernels compute in fp16/bf16/fp32)"
    if problem.head_dim > MAX_HEAD_DIM or problem.head_dim_v > MAX_HEAD_DIM:
        return f"head dim {max(problem.head_dim, problem.head_dim_v)} > {MAX_HEAD_DIM}"
    reason = padded_tiles_unsupported(problem.head_dim, problem.head_dim_v, problem.q.device)
    if reason is not None:
        return reason
    if problem.mask_needs_grad:
        return "a float attn_mask that requires grad (the kernels do not produce its gradient)"
    return None


register_backend(
    AttentionBackend(
        name="triton",
        description="fused FlashAttention-style Triton kernels (CUDA; CPU under TRITON_INTERPRET=1)",
        availability=triton_unavailable,
        unsupported=_unsupported,
        run=lambda problem: fused_attention(problem, "triton"),
        auto=VALIDATED_ON_GPU,
    )
)

__all__ = ["launch_forward", "launch_backward", "Layout", "dot_precision", "MAX_HEAD_DIM"]
