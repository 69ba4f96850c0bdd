"""The ``"cuda"`` attention backend: the hand-written flash-attention kernels of
``csrc/cuda`` (``mma.sync`` tensor cores, ``ldmatrix``, ``cp.async`` pipelining,
online softmax in registers; deterministic backward).

The kernels exist for head dims 64 and 128 in float16/bfloat16. Other head dims
up to 128 (and Ev != E) run by zero-padding q, k and v to the next of the two
inside the fused kernels' forward/backward, which leaves the scores and the first
Ev output columns unchanged (at the cost of a padded copy); larger head
dims, float32, dropout, the variants (window, ALiBi, soft-cap) and masks that need a gradient are unsupported here, so
``"auto"`` moves on and a forced ``backend="cuda"`` raises a ValueError saying why.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..._ext import C
from ..buffers import new_output
from ..cuda_device import cuda_extension_unavailable, launch_context, rows_aligned
from .problem import AttentionProblem
from .registry import AttentionBackend, register_backend

# "auto" may pick this backend only once its kernels have passed the shared GPU tests
# (tests/test_attention_backends.py, tests/test_attention_cuda.py) on real hardware.
# They were written and compile-checked on a machine without a GPU; the commit that
# records a passing GPU run flips this to True.
CUDA_VALIDATED_ON_GPU = False

KERNEL_HEAD_DIMS = (64, 128)
_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


def kernel_head_dim(head_dim: int, head_dim_v: int) -> Optional[int]:
    """The kernel head dim that q/k/v are padded to, or None when above 128."""
    need = max(head_dim, head_dim_v)
    for d in KERNEL_HEAD_DIMS:
        if need <= d:
            return d
    return None


def _causal_offset(is_causal: bool, bottom_right: bool, len_q: int, len_k: int) -> int:
    # Key j is visible to query i when j <= i + offset.
    return (len_k - len_q) if (is_causal and bottom_right) else 0


def _pad_last(t, d: int):
    # Zero columns change no score (q·k), give zero output columns (p·v) and add
    # nothing to rowsum(dO ∘ O); the kernels' gradients are sliced back.
    return t if t.shape[-1] == d else F.pad(t, (0, d - t.shape[-1]))


# The kernels scale a float mask by log2(e) in its dtype's range: bfloat16 fills beyond
# +-MASK_LIMIT (finfo.min) would overflow to -+inf, so they are saturated here first
# (as kernels/attention_common.MASK_LIMIT does inside the Triton kernels).
MASK_LIMIT = 2.3e38


def saturated_mask(mask):
    """``mask`` with finite values beyond +-MASK_LIMIT clamped (+-inf and NaN kept).

    Works on the mask's own storage (broadcast dims of the view are read once) and
    returns a view broadcast back to ``mask.shape``, so a broadcast mask is not materialised.
    """
    if mask is None or mask.dtype != torch.bfloat16:  # bool never, float16 cannot overflow
        return mask
    own = mask[tuple(slice(0, 1) if st == 0 else slice(None) for st in mask.stride())]
    fixed = torch.where(own.isfinite(), own.clamp(-MASK_LIMIT, MASK_LIMIT), own)
    return fixed.expand(mask.shape)


def cuda_forward(q, k, v, mask, rng_state, opts):
    """Fused-kernel contract (fused.py): out (B, Hq, L, Ev), lse (B, Hq, L) float32."""
    is_causal, causal_bottom_right, scale = opts.is_causal, opts.causal_bottom_right, opts.scale
    if opts.dropout_p > 0.0:
        raise ValueError("the cuda attention kernels do not implement dropout")
    E, Ev = q.shape[-1], v.shape[-1]
    d = kernel_head_dim(E, Ev)
    q, k, v = (rows_aligned(_pad_last(t, d)) for t in (q, k, v))
    B, H, L, _ = q.shape
    out = new_output(q.shape, q.dtype, q.device)
    lse = new_output((B, H, L), torch.float32, q.device)
    stream, sm_count, smem = launch_context(q.device)
    with torch.cuda.device(q.device):
        C.flash_attention_fwd(
            q, k, v, saturated_mask(mask), out, lse, float(scale), bool(is_causal),
            _causal_offset(is_causal, causal_bottom_right, L, k.shape[2]), stream, sm_count, smem,
        )
    # Sliced outputs are made contiguous: the ops' fake implementations promise dense tensors.
    return (out if Ev == d else out[..., :Ev].contiguous()), lse


def cuda_backward(dout, q, k, v, out, lse, mask, rng_state, opts):
    """Fused-kernel contract: dq, dk, dv shaped like q, k, v (deterministic kernels)."""
    is_causal, causal_bottom_right, scale = opts.is_causal, opts.causal_bottom_right, opts.scale
    if opts.dropout_p > 0.0:
        raise ValueError("the cuda attention kernels do not implement dropout")
    E, Ev = q.shape[-1], v.shape[-1]
    d = kernel_head_dim(E, Ev)
    q, k, v = (rows_aligned(_pad_last(t, d)) for t in (q, k, v))
    dout, out = (_pad_last(t, d).contiguous() for t in (dout, out))
    B, H, L, _ = q.shape
    dq = new_output(q.shape, q.dtype, q.device)
    dk = new_output(k.shape, k.dtype, k.device)
    dv = new_output(v.shape, v.dtype, v.device)
    delta = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    stream, sm_count, smem = launch_context(q.device)
    with torch.cuda.device(q.device):
        C.flash_attention_bwd(
            dout, q, k, v, out, lse, saturated_mask(mask), delta, dq, dk, dv, float(scale), bool(is_causal),
            _causal_offset(is_causal, causal_bottom_right, L, k.shape[2]), stream, sm_count, smem,
        )
    if E != d:
        dq, dk = dq[..., :E].contiguous(), dk[..., :E].contiguous()
    if Ev != d:
        dv = dv[..., :Ev].contiguous()
    return dq, dk, dv


def _unsupported(problem: AttentionProblem) -> Optional[str]:
    if problem.q.device.type != "cuda":
        return f"tensors are on {problem.q.device}, the kernels need a CUDA device"
    if problem.q.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {problem.q.dtype} is not supported (float16 and bfloat16 only)"
    if problem.dropout_p > 0.0:
        return "dropout is not implemented in the cuda kernels"
    if problem.options.variant_active:
        return "window_size / alibi_slopes / softcap are not implemented in the cuda kernels (the triton backend runs them)"
    if problem.mask_needs_grad:
        return "attn_mask requires grad (use the reference backend)"
    mask = problem.mask
    if mask is not None and mask.dtype not in (torch.bool, problem.q.dtype):
        return f"a {mask.dtype} attn_mask with {problem.q.dtype} inputs (the kernels read masks in q's dtype)"
    if problem.is_empty:
        return None  # the public entry points hand empty problems to the reference path
    d = kernel_head_dim(problem.head_dim, problem.head_dim_v)
    if d is None:
        return f"head dims above 128 are not supported (E={problem.head_dim}, Ev={problem.head_dim_v})"
    _, _, smem = launch_context(problem.q.device)
    return _launch_plan_refusal(
        _DTYPE_NAMES[problem.q.dtype], d, problem.batch, problem.heads_q, problem.heads_kv,
        problem.len_q, problem.len_k, smem,
    ) or None


@torch.compiler.assume_constant_result
def _launch_plan_refusal(dtype: str, d: int, batch: int, heads_q: int, heads_kv: int, len_q: int, len_k: int,
                         smem: int) -> str:
    """Why the launch planner refuses this forward ("" when it accepts). A pure function of
    ints, so torch.compile(fullgraph=True) runs it once while tracing instead of failing on
    the pybind call (seen on an H200: tests/test_attention_cuda.py)."""
    return C.cuda_launch_plan("forward", dtype, d, batch, heads_q, heads_kv, len_q, len_k, smem)["reason"]


register_backend(
    AttentionBackend(
        name="cuda",
        description="hand-written CUDA flash attention (mma.sync/ldmatrix/cp.async; head dims <= 128, fp16/bf16; "
                    "no dropout or window/ALiBi/soft-cap: those fall back)",
        availability=cuda_extension_unavailable,
        unsupported=_unsupported,
        auto=CUDA_VALIDATED_ON_GPU,
        forward=cuda_forward,
        backward=cuda_backward,
    )
)
