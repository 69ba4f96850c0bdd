"""Pieces shared by the fused attention forward and backward kernels.

* :func:`_dropout_keep` — the in-kernel dropout decision for element
  ``(sequence b, query head h, query row i, key column j)``: Philox-4x32 keyed
  by the seed, counter ``(j, i, b * H + h, offset)``. Every element has its own
  counter, so forward, backward and :func:`dropout_keep_mask` (the debug helper
  tests use) regenerate the same mask whatever their tiling, and there is no
  2^31 overflow of a flattened index.
* :func:`_load_mask_tile` — one tile of a bool/float ``attn_mask`` read through
  its (possibly stride-0) strides, turned into an additive log2-domain bias.
* :func:`_scores`, :func:`_visible` — the attention variants shared by every
  kernel (FlashAttention's semantics): the logit soft-cap
  ``softcap * tanh(score / softcap)``, the ALiBi bias ``-slope * |i + S - L - j|``
  (bottom-right aligned distance), and the visibility of key ``j`` to query ``i``
  under a causal mask / local window ``i + off - left <= j <= i + off + right``
  (``off`` = 0 top-left, ``S - L`` bottom-right; causal is ``right = 0``).
  :func:`key_range` / :func:`query_range` give the tiles a block visits, so a
  window of width W costs O(L * W), not O(L * S).
* Autotune plumbing: :func:`interpreting`, :func:`seq_bucket`, :func:`choose_configs`.
* Launch plumbing shared by ``attention_fwd.attention_fwd`` and
  ``attention_bwd.attention_bwd``: :class:`Layout` (dense or packed strides),
  :class:`Dims`, :func:`launch_meta`.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .ffn import _tanh

LOG2E = 1.4426950408889634  # scores are kept in the log2 domain so the kernels use exp2
LN2 = 0.6931471805599453
# Float-mask values are saturated to +-MASK_LIMIT before scaling by log2(e) (see
# _load_mask_tile): MASK_LIMIT * LOG2E = 3.3e38 stays finite, with room below FLT_MAX
# for the scaled q.k term.
MASK_LIMIT = tl.constexpr(2.3e38)
# Philox rounds: 7 passes BigCrush (Salmon et al. 2011) and costs 30% less than 10.
PHILOX_ROUNDS = 7


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1`` (Triton kernels on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def seq_bucket(n: int) -> int:
    """Autotune key for a sequence length: the next power of two (at least 16), so
    varying lengths (varlen batches, decoding) do not re-tune on every call."""
    return max(16, triton.next_power_of_2(max(int(n), 1)))


def autotune_mode() -> str:
    """``FASTFORMER_TRITON_AUTOTUNE``: ``small`` (default: time the <= 3 preferred
    configs that fit), ``full`` (time every config that fits), ``off`` (the first
    preferred config, compiled once: what tests want, since each config costs a
    compile of several seconds per kernel variant)."""
    mode = os.environ.get("FASTFORMER_TRITON_AUTOTUNE", "small").lower()
    return mode if mode in ("small", "full", "off") else "small"


def choose_configs(configs, fits, preferred, named_args, kwargs):
    """Autotune pruning shared by the attention kernels.

    ``fits(conf, args)`` drops configs that spill or overflow shared memory;
    ``preferred(args)`` lists ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` best
    first (from the ptxas analysis in bench/NOTES.md). Always returns >= 1 config.
    """
    args = {**kwargs, **named_args}
    kept = [c for c in configs if fits(c, args)] or list(configs[:1])
    mode = autotune_mode()
    if mode == "full":
        return kept
    order = {t: i for i, t in enumerate(preferred(args))}
    key = lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)  # noqa: E731
    ranked = sorted((c for c in kept if key(c) in order), key=lambda c: order[key(c)]) or kept
    return ranked[: 1 if mode == "off" else 3]


@functools.lru_cache(maxsize=None)
def _smem_limit(device_index: int) -> int:
    props = torch.cuda.get_device_properties(device_index)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024)


def shared_memory_limit(t) -> int:
    """Opt-in shared memory per block of ``t``'s GPU (227 KiB on H100, 163 KiB on A100)."""
    if not getattr(t, "is_cuda", False):
        return 227 * 1024
    return _smem_limit(t.device.index if t.device.index is not None else torch.cuda.current_device())


def registers_fit(fp32_per_thread: float, num_warps: int) -> bool:
    """Whether a tile's fp32 accumulators/scores (per thread) leave ptxas room without
    spilling, calibrated on sm_90a (bench/NOTES.md): <= 160 with 8 warps, <= 128 with 4."""
    return fp32_per_thread <= (160 if num_warps >= 8 else 128)


def head_block(d: int) -> int:
    """Head dim padded to the next power of two (at least 16, tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(int(d)))


@triton.jit
def _dropout_keep(seed, rng_offset, bh, rows, cols, dropout_p):
    """True where the element at query ``rows`` / key ``cols`` (broadcastable int32
    tiles) of query head ``bh`` (= b * H + h) is kept."""
    c0 = cols + rows * 0  # broadcast both index tiles to the tile's shape
    c1 = rows + cols * 0
    r, _, _, _ = tl.philox(seed, c0, c1, c0 * 0 + bh, c0 * 0 + rng_offset, n_rounds=7)
    return tl.uint_to_uniform_float(r) >= dropout_p


@triton.jit
def _scores(qk, rows, cols, scale_log2, softcap_in, softcap_out, slope_log2, alibi_off,
            SOFTCAP: tl.constexpr, ALIBI: tl.constexpr):
    """Log2-domain scores of a ``q·kᵀ`` tile (fp32): scaled, soft-capped
    (``softcap_out * tanh(qk * softcap_in)`` with ``softcap_in = scale / softcap``,
    ``softcap_out = softcap * log2 e``), then the ALiBi bias
    ``-slope_log2 * |rows + alibi_off - cols|``. ``rows``/``cols`` are broadcastable
    int32 index tiles."""
    if SOFTCAP:
        s = _tanh(qk * softcap_in) * softcap_out
    else:
        s = qk * scale_log2
    if ALIBI:
        s -= slope_log2 * tl.abs(rows + alibi_off - cols).to(tl.float32)
    return s


@triton.jit
def _visible(rows, cols, seqlen_k, diag_off, win_left, win_right,
             LIMIT_LEFT: tl.constexpr, LIMIT_RIGHT: tl.constexpr):
    """Key ``cols`` exists and lies in query ``rows``' window
    ``[rows + diag_off - win_left, rows + diag_off + win_right]`` (each side only
    when limited; causal is ``win_right = 0``)."""
    vis = (cols < seqlen_k) & (rows == rows)  # broadcast to the tile
    if LIMIT_RIGHT:
        vis = vis & (cols <= rows + diag_off + win_right)
    if LIMIT_LEFT:
        vis = vis & (cols >= rows + diag_off - win_left)
    return vis


@triton.jit
def key_range(m0, seqlen_k, diag_off, win_left, win_right,
              LIMIT_LEFT: tl.constexpr, LIMIT_RIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key tiles for query rows ``[m0, m0 + BLOCK_M)``: ``lo <= full_lo <= full_hi <= hi``
    where ``[lo, hi)`` holds every key some row sees (``lo`` a multiple of BLOCK_N) and
    ``[full_lo, full_hi)`` whole tiles every row sees (no masking needed there)."""
    if LIMIT_RIGHT:
        hi = tl.minimum(tl.maximum(m0 + BLOCK_M + diag_off + win_right, 0), seqlen_k)
        full_hi = (tl.minimum(tl.maximum(m0 + diag_off + win_right + 1, 0), seqlen_k) // BLOCK_N) * BLOCK_N
    else:
        hi = seqlen_k
        full_hi = (seqlen_k // BLOCK_N) * BLOCK_N
    if LIMIT_LEFT:
        lo = tl.minimum((tl.maximum(m0 + diag_off - win_left, 0) // BLOCK_N) * BLOCK_N, hi)
        full_lo = tl.minimum(tl.cdiv(tl.maximum(m0 + BLOCK_M - 1 + diag_off - win_left, 0), BLOCK_N) * BLOCK_N, hi)
    else:
        lo = hi * 0
        full_lo = hi * 0
    full_hi = tl.maximum(full_hi, full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def query_range(n0, seqlen_q, diag_off, win_left, win_right,
                LIMIT_LEFT: tl.constexpr, LIMIT_RIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query rows for key tile ``[n0, n0 + BLOCK_N)``: ``lo <= full_lo <= full_hi <= hi``,
    ``[lo, hi)`` every row that sees some key of it (``lo`` a multiple of BLOCK_M),
    ``[full_lo, full_hi)`` rows that see all of them (``full_hi`` a multiple of BLOCK_M
    unless it is ``hi``)."""
    if LIMIT_LEFT:
        hi = tl.minimum(tl.maximum(n0 + BLOCK_N - diag_off + win_left, 0), seqlen_q)
        full_hi = (tl.minimum(tl.maximum(n0 - diag_off + win_left + 1, 0), seqlen_q) // BLOCK_M) * BLOCK_M
    else:
        hi = seqlen_q
        full_hi = seqlen_q
    if LIMIT_RIGHT:
        lo = tl.minimum((tl.maximum(n0 - diag_off - win_right, 0) // BLOCK_M) * BLOCK_M, hi)
        full_lo = tl.minimum(tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - diag_off - win_right, 0), BLOCK_M) * BLOCK_M, hi)
    else:
        lo = hi * 0
        full_lo = hi * 0
    full_hi = tl.maximum(full_hi, full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _load_mask_tile(mask_base, rows, cols, ok, stride_mm, stride_mn, MASK_BOOL: tl.constexpr):
    """Additive log2-domain bias of an attn_mask tile: 0/-inf for bool masks
    (True = attend), value * log2(e) for float masks (finite values saturated at
    +-MASK_LIMIT). ``rows``/``cols`` are
    broadcastable index tiles; ``ok`` masks the load."""
    ptrs = mask_base + rows.to(tl.int64) * stride_mm + cols.to(tl.int64) * stride_mn
    if MASK_BOOL:
        keep = tl.load(ptrs, mask=ok, other=0)
        bias = tl.where(keep != 0, 0.0, float("-inf"))
    else:
        # Finite fills beyond +-MASK_LIMIT (finfo.min: Hugging Face's padding fill) would
        # overflow to -+inf when scaled by log2(e); saturating them keeps a row of equal
        # huge fills a row of equal finite scores (uniform weights, as torch) and -inf masked.
        x = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
        x = tl.where((tl.abs(x) > MASK_LIMIT) & (tl.abs(x) < float("inf")),
                     tl.where(x > 0, MASK_LIMIT, -MASK_LIMIT), x)
        bias = x * 1.4426950408889634
    return bias


@triton.jit
def _dropout_mask_kernel(
    RNG, KEEP,
    stride_kb, stride_kh, stride_km, stride_kn,
    H, L, S, dropout_p,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    bh = tl.program_id(2)
    seed = tl.load(RNG)
    rng_offset = tl.load(RNG + 1).to(tl.int32)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _dropout_keep(seed, rng_offset, bh, rows[:, None], cols[None, :], dropout_p)
    b = bh // H
    h = bh % H
    ptrs = (KEEP + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
            + rows[:, None].to(tl.int64) * stride_km + cols[None, :].to(tl.int64) * stride_kn)
    tl.store(ptrs, keep.to(tl.int8), mask=(rows[:, None] < L) & (cols[None, :] < S))


def dropout_keep_mask(rng_state: torch.Tensor, shape, p: float, device=None) -> torch.Tensor:
    """The exact keep-mask (bool ``(B, H, L, S)``, True = kept) that the Triton
    attention kernels apply for ``rng_state`` (int64 ``[seed, offset]``) and
    dropout probability ``p``. For tests and debugging; for varlen input, B is the
    sequence index and L/S positions within each sequence."""
    B, H, L, S = (int(x) for x in shape)
    device = rng_state.device if device is None else torch.device(device)
    keep = torch.empty((B, H, L, S), dtype=torch.int8, device=device)
    if keep.numel() == 0:
        return keep.bool()
    grid = (triton.cdiv(L, 32), triton.cdiv(S, 32), B * H)
    _dropout_mask_kernel[grid](
        rng_state.to(device), keep, *keep.stride(), H, L, S, float(p), BLOCK_M=32, BLOCK_N=32,
    )
    return keep.bool()


class Layout(NamedTuple):
    """How the kernels index a tensor: (batch, head, row, dim) strides; batch stride 0
    and ``cu_seqlens`` row offsets for the packed varlen layout."""

    varlen: bool

    def qkv(self, t: torch.Tensor):  # dense (B, H, N, D) or packed (total, H, D)
        if self.varlen:
            return 0, t.stride(1), t.stride(0), t.stride(2)
        return t.stride(0), t.stride(1), t.stride(2), t.stride(3)

    def rows(self, t: torch.Tensor):  # lse/delta: dense (B, H, N) or packed (H, total)
        if self.varlen:
            return 0, t.stride(0), t.stride(1)
        return t.stride(0), t.stride(1), t.stride(2)


DENSE = Layout(False)
PACKED = Layout(True)


class Dims(NamedTuple):
    batch: int
    heads: int
    heads_kv: int
    len_q: int  # dense length, or the longest sequence (varlen)
    len_k: int
    head_dim: int
    head_dim_v: int


def dims(q, k, v, layout: Layout, cu_q=None, max_q: int = 0, max_k: int = 0) -> Dims:
    """The problem sizes the grids and compile-time constants are made of."""
    if layout.varlen:
        return Dims(cu_q.numel() - 1, q.shape[1], k.shape[1], max_q, max_k, q.shape[2], v.shape[2])
    return Dims(q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3], v.shape[3])


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 follows torch.backends.cuda.matmul.allow_tf32 (default off: full precision)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # ignored by tl.dot for fp16/bf16 inputs


def dropout_scale(p: float) -> float:
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


def mask_args(mask: Optional[torch.Tensor], dummy: torch.Tensor):
    """Kernel pointer + strides + flags for an attn_mask view (read in place, never expanded)."""
    if mask is None:
        return dummy, (0, 0, 0, 0), False, True
    if mask.dtype == torch.bool:
        return mask.view(torch.uint8), mask.stride(), True, True
    return mask, mask.stride(), True, False


def variant_args(variant, is_causal: bool, scale: float, dummy):
    """Kernel arguments of the attention variants: ``(softcap_in, softcap_out)``,
    ``(win_left, win_right)``, ``(slopes pointer, stride_b, stride_h)`` and the
    constexpr flags. ``variant``: None, or anything with ``window_left``,
    ``window_right`` (-1 = unlimited), ``alibi_slopes`` (None or fp32 ``(B, Hq)``) and
    ``softcap`` (0 = off); ``is_causal`` forces ``window_right = 0``."""
    left = int(getattr(variant, "window_left", -1))
    right = 0 if is_causal else int(getattr(variant, "window_right", -1))
    slopes = getattr(variant, "alibi_slopes", None)
    softcap = float(getattr(variant, "softcap", 0.0))
    flags = dict(LIMIT_LEFT=left >= 0, LIMIT_RIGHT=right >= 0, SOFTCAP=softcap > 0.0, ALIBI=slopes is not None)
    cap = (scale / softcap if softcap > 0.0 else 0.0, softcap * LOG2E)
    slope_args = (dummy, 0, 0) if slopes is None else (slopes, slopes.stride(0), slopes.stride(1))
    return cap, (max(left, 0), max(right, 0)), slope_args, flags


def launch_meta(q, d: Dims, flags: dict, dropout_p: float, layout: Layout, has_mask: bool, mask_bool: bool):
    """Compile-time constants shared by the forward and backward kernels, and the autotune keys
    (``flags``: the variant flags of :func:`variant_args`)."""
    return dict(
        **flags,
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
