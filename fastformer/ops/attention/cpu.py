"""The ``"cpu"`` backend: fused flash-style attention in C++ for CPU tensors.

Forward and backward run in ``fastformer._C`` (csrc/cpu/attention_cpu*.cpp):
blocked over queries and keys with an online softmax and the log-sum-exp
saved, parallel over batch x heads x query blocks on torch's thread pool
(``torch.set_num_threads`` applies), float32 accumulation for float32 and
bfloat16 inputs, and the widest vector ISA of the processor picked at run time
(AVX-512 with AVX512_BF16 — bf16 inputs then run as bf16 dot products with
fp32 accumulation —, AVX-512, AVX2+FMA, or a portable fallback). The variants
(local window with tile skipping, ALiBi, soft-cap) run natively, forward and backward. ``auto`` runs
these kernels only on the shape classes where committed benchmarks measured
them faster than torch's SDPA on this variant (:func:`auto_prefers_cpu`). Causal tiles above the diagonal
are skipped; masks are read through their (broadcast) strides; GQA reads the
shared K/V heads in place; dropout is a counter-based hash of
``(seed, offset, batch*head, i, j)``, so the backward regenerates the mask.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ..._ext import C, LOAD_ERROR
from ..buffers import new_output
from .registry import AttentionBackend, register_backend

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)
MAX_HEAD_DIM = 256


def _seed_offset(rng_state: Optional[Tensor]):
    if rng_state is None:
        return 0, 0
    seed, offset = (int(x) for x in rng_state.tolist())
    return seed, offset


def _empty(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Nothing to compute: no query rows, no keys or no output columns (a zero head
    dim E is not empty: run_problem pads it, every score is then 0)."""
    return q.shape[0] * q.shape[1] * q.shape[2] == 0 or k.shape[2] == 0 or v.shape[3] == 0


def cpu_forward(q, k, v, mask, rng_state, opts, out: Optional[Tensor] = None):
    """Kernel contract of fused.py: ``out (B, Hq, L, Ev)`` in q's dtype, ``lse (B, Hq, L)`` float32.
    ``out``, when given, is written in place: any layout with unit stride along ``Ev`` and no
    overlapping elements (``AttentionBackend.strided_outputs``)."""
    B, H, L, _ = q.shape
    if out is None:
        out = new_output((B, H, L, v.shape[-1]), q.dtype, q.device)
    lse = new_output((B, H, L), torch.float32, q.device)
    if _empty(q, k, v):  # nothing to attend: torch's zeros
        return out.zero_(), lse.fill_(float("-inf"))
    seed, offset = _seed_offset(rng_state)
    C.attention_cpu_forward(q, k, v, mask, float(opts.dropout_p), seed, offset, bool(opts.is_causal),
                            bool(opts.causal_bottom_right), float(opts.scale), out, lse, int(opts.window_left),
                            int(opts.window_right), opts.alibi_slopes, float(opts.softcap))
    return out, lse


def cpu_backward(dout, q, k, v, out, lse, mask, rng_state, opts, grads: Optional[Tuple[Tensor, Tensor, Tensor]] = None):
    """Kernel contract of fused.py: ``dq, dk, dv`` shaped like q, k, v. ``grads``, when given, are
    those three written in place (layouts as ``cpu_forward``'s ``out``: e.g. slices of one packed
    ``(B, L, 3, H, E)`` gradient)."""
    if grads is None:
        dq = new_output(q.shape, q.dtype, q.device)
        dk = new_output(k.shape, k.dtype, k.device)
        dv = new_output(v.shape, v.dtype, v.device)
    else:
        dq, dk, dv = grads
    if _empty(q, k, v):  # no weights or no output columns: every gradient is 0
        return dq.zero_(), dk.zero_(), dv.zero_()
    seed, offset = _seed_offset(rng_state)
    C.attention_cpu_backward(dout, q, k, v, out, lse, mask, float(opts.dropout_p), seed, offset,
                             bool(opts.is_causal), bool(opts.causal_bottom_right), float(opts.scale), dq, dk, dv,
                             int(opts.window_left), int(opts.window_right), opts.alibi_slopes, float(opts.softcap))
    return dq, dk, dv


def dropout_keep_mask(rng_state: Tensor, shape, p: float, device=None) -> Tensor:
    """The keep-mask (True = kept) the CPU kernels apply for ``rng_state``, bool ``shape = (B, Hq, L, S)``.

    A debug helper: tests check output and gradients against the float64 reference
    with this mask applied explicitly.
    """
    seed, offset = _seed_offset(rng_state)
    return C.attention_cpu_dropout_keep_mask(*shape, float(p), seed, offset)


@torch.compiler.assume_constant_result
def isa() -> str:
    """The instruction-set variant the kernels run with on this machine (avx512_bf16 / avx512 / avx2 / generic).
    Constant for the process, so torch.compile evaluates it once while tracing (the pybind call is opaque to it)."""
    return C.attention_cpu_isa()


# ----------------------------------------------------------------------------- auto policy

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


@functools.lru_cache(maxsize=None)
def _policy_classes(variant: str) -> Dict[Tuple[str, str, bool], Dict[int, List[Tuple[int, float, str]]]]:
    """The committed policy rows of ``variant`` as {(dtype, mode, causal): {head_dim: [(seqlen, speedup, choice)]}}."""
    from ..attention_cpu_policy import POLICY

    classes: Dict = {}
    for dtype, mode, causal, head_dim, seqlen, speedup, choice in POLICY.get(variant, []):
        classes.setdefault((dtype, mode, causal), {}).setdefault(head_dim, []).append((seqlen, speedup, choice))
    return classes


def _nearest(options, x: float):
    best, best_dist = options[0], float("inf")
    for o in options:
        dist = abs(math.log(o / x))
        if dist < best_dist:
            best, best_dist = o, dist
    return best


def auto_prefers_cpu(problem) -> bool:
    """Whether ``auto`` runs this CPU problem on the ``cpu`` kernels rather than torch's SDPA.

    Looks the problem's shape class up in the table derived from committed
    benchmarks (``ops/attention_cpu_policy.py``, written by ``bench/cpu_policy.py``) for
    the kernel variant of this processor: dtype, forward or forward+backward
    (``needs_grad``), causal or not, nearest measured head dim (max of E, Ev) and
    nearest measured length (geometric mean of L and S). A class or variant never
    measured goes to torch. ``FASTFORMER_CPU_AUTO=always`` (or ``never``) overrides.
    A window, ALiBi or a soft-cap runs here whatever the table says: torch's SDPA has none
    of them (the alternative is the reference backend's explicit math, memory ~ L·S, no
    tile skipping).
    """
    if _AUTO_OVERRIDE is not None:
        return _AUTO_OVERRIDE
    if problem.options.variant_active:
        return True
    return prefers_cpu_shape(problem.q.dtype, problem.needs_grad, bool(problem.is_causal),
                             max(problem.head_dim, problem.head_dim_v), problem.len_q, problem.len_k)


def prefers_cpu_shape(dtype: torch.dtype, needs_grad: bool, is_causal: bool, head_dim: int, len_q: int,
                      len_k: int) -> bool:
    """:func:`auto_prefers_cpu` for a plain problem (no window, ALiBi or soft-cap) given by its
    features alone, so a caller can ask before building the problem object."""
    if _AUTO_OVERRIDE is not None:
        return _AUTO_OVERRIDE
    # Plain Python over the table read at import (no extension call, no generators),
    # so torch.compile(fullgraph=True) traces through the choice.
    by_dim = _CLASSES_HERE.get((_DTYPE_NAMES.get(dtype), "fwd_bwd" if needs_grad else "fwd", is_causal))
    if not by_dim:
        return False
    rows = by_dim[_nearest(list(by_dim), max(head_dim, 1))]
    length = math.sqrt(max(len_q, 1) * max(len_k, 1))
    best, best_dist = "torch", float("inf")
    for seqlen, _, choice in rows:
        dist = abs(math.log(seqlen / length))
        if dist < best_dist:
            best, best_dist = choice, dist
    return best == "cpu"


def policy_summary() -> List[str]:
    """The ``auto`` policy of this processor's kernel variant, one line per class (``python -m fastformer.info``)."""
    if _available() is not None:
        return []
    variant = isa()
    if _AUTO_OVERRIDE is not None:
        return [f"cpu auto policy: FASTFORMER_CPU_AUTO={os.environ.get('FASTFORMER_CPU_AUTO')} (table ignored)"]
    classes = _CLASSES_HERE
    if not classes:
        return [f"cpu auto policy ({variant}): never measured on this variant -> torch's SDPA everywhere"]
    lines = [f"cpu auto policy ({variant}; class -> choice at each measured length, torch/ours in brackets):"]
    for (dtype, mode, causal), by_dim in sorted(classes.items()):
        for head_dim, rows in sorted(by_dim.items()):
            cells = " ".join(f"L{s}:{c}({x:.2f})" for s, x, c in sorted(rows))
            lines.append(f"  {dtype:8s} {mode:7s} {'causal' if causal else 'full  '} d{head_dim:<3d} {cells}")
    return lines


_AUTO_OVERRIDE = {"always": True, "never": False}.get(os.environ.get("FASTFORMER_CPU_AUTO", "").lower())


def _available() -> Optional[str]:
    if C is None:
        return f"the compiled extension is unavailable ({LOAD_ERROR})"
    if not hasattr(C, "attention_cpu_forward"):
        return "fastformer._C was built without the CPU attention kernels (rebuild the extension)"
    return None


def _unsupported(problem) -> Optional[str]:
    q = problem.q
    if q.device.type != "cpu":
        return f"CPU tensors only (got {q.device})"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} (float32 and bfloat16 only)"
    if problem.head_dim > MAX_HEAD_DIM or problem.head_dim_v > MAX_HEAD_DIM:
        return f"head dim {problem.head_dim}/{problem.head_dim_v} > {MAX_HEAD_DIM}"
    if problem.mask_needs_grad:
        return "attn_mask requires grad (use the reference backend)"
    return None


# This processor's policy classes, read once: auto_prefers_cpu must not call the extension.
_CLASSES_HERE = _policy_classes(isa()) if _available() is None else {}

register_backend(
    AttentionBackend(
        name="cpu",
        description="C++ flash-style attention for CPU tensors (float32/bfloat16; AVX-512 with bf16 dot products, AVX-512, AVX2 at run time; window/ALiBi/soft-cap)",
        availability=_available,
        unsupported=_unsupported,
        forward=cpu_forward,
        backward=cpu_backward,
        strided_outputs=True,
        auto_policy=auto_prefers_cpu,
        shape_policy=prefers_cpu_shape,
    )
)
