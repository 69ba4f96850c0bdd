"""The custom ops every fused attention backend plugs into, and the one runner.

Four ops, registered with ``torch.library`` (schema, fake implementation,
autograd where differentiable), so ``torch.compile(fullgraph=True)`` traces
through any fused backend without graph breaks:

* ``fastformer::attention_fwd`` / ``attention_bwd``: dense attention;
* ``fastformer::varlen_attention_fwd`` / ``varlen_attention_bwd``: packed sequences;
* ``fastformer::decode_attention``: new tokens over a KV cache (inference only).

Their ``backend`` string argument picks the kernels a backend registered
(``registry.AttentionBackend``); the :class:`~.problem.AttentionOptions` travel
as scalar arguments in field order (``options.op_args()``) plus the one tensor
option, ``alibi_slopes`` (``Optional[Tensor]``, right after ``rng_state``), and are
rebuilt with ``AttentionOptions(*args, alibi_slopes=...)`` before the kernels see
them. Kernels read the variants (window, ALiBi, soft-cap) from the options; a
backend is only handed a problem whose options its ``unsupported()`` accepted.

Kernel contracts (plain functions; they allocate their outputs with
``ops.buffers.new_output`` and launch):

``forward(q, k, v, mask, rng_state, options)``
    canonical 4-D tensors of ``problem.py`` → ``out (B, Hq, L, Ev)`` in q's dtype and
    ``lse (B, Hq, L)`` float32, the natural-log log-sum-exp of each row of scaled,
    masked scores (``-inf`` for rows where every key is masked; those rows output 0).
``backward(dout, q, k, v, out, lse, mask, rng_state, options)`` → ``dq, dk, dv``.
    A backend with ``strided_outputs`` also takes ``forward(..., out=)`` and
    ``backward(..., grads=(dq, dk, dv))``: views with a unit last stride to write in place
    (``run_qkvpacked``: FlashAttention's ``(B, L, H, E)`` output, one packed qkv gradient).
``varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, rng_state, options)`` → packed
    ``out (Tq, Hq, Ev)``, ``lse (Hq, Tq)``; ``varlen_backward(dout, q, k, v, out, lse,
    cu_q, cu_k, max_q, max_k, rng_state, options)`` → ``dq, dk, dv``.
``decode_forward(q, k_cache, v_cache, cache_seqlens, block_table, options, num_splits)`` →
    ``out (B, Hq, Lq, Dv)``, ``lse (B, Hq, Lq)``; ``cache_seqlens`` int32 ``(B,)``,
    ``block_table`` None or int32 ``(B, max_blocks)`` over a paged cache (validated),
    ``num_splits`` 0 for the kernel's own choice.

``rng_state`` is ``None`` without dropout, else an int64 tensor ``[seed, offset]``
on q's device, drawn from torch's generator so results are reproducible under
``torch.manual_seed``; the backward must regenerate the same dropout mask from it.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..buffers import new_output
from ..kernel_backend import direct_calls_allowed
from .problem import AttentionOptions
from .registry import get_backend


def _kernels(backend: str, what: str):
    fn = getattr(get_backend(backend), what)
    if fn is None:
        raise RuntimeError(f"attention backend {backend!r} registered no {what} kernel")
    return fn


# ----------------------------------------------------------------------------------------- dense


@torch.library.custom_op("fastformer::attention_fwd", mutates_args=())
def attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Optional[Tensor],
    rng_state: Optional[Tensor],
    alibi_slopes: Optional[Tensor],
    dropout_p: float,
    is_causal: bool,
    causal_bottom_right: bool,
    scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    options = AttentionOptions(dropout_p, is_causal, causal_bottom_right, scale, window_left, window_right, softcap,
                               alibi_slopes)
    out, lse = _kernels(backend, "forward")(q, k, v, mask, rng_state, options)
    # Outputs are contiguous whatever the kernel did: the fake implementation promises it to compile.
    return out.contiguous(), lse.contiguous()


@attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, mask, rng_state, *options_and_backend):
    B, H, L, _ = q.shape
    return q.new_empty((B, H, L, v.shape[-1])), q.new_empty((B, H, L), dtype=torch.float32)


@torch.library.custom_op("fastformer::attention_bwd", mutates_args=())
def attention_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    mask: Optional[Tensor],
    rng_state: Optional[Tensor],
    alibi_slopes: Optional[Tensor],
    dropout_p: float,
    is_causal: bool,
    causal_bottom_right: bool,
    scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    options = AttentionOptions(dropout_p, is_causal, causal_bottom_right, scale, window_left, window_right, softcap,
                               alibi_slopes)
    dq, dk, dv = _kernels(backend, "backward")(dout, q, k, v, out, lse, mask, rng_state, options)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@attention_bwd.register_fake
def _attention_bwd_fake(dout, q, k, v, *rest):
    # Contiguous, like the real op's outputs (empty_like would copy q's strides).
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, rng_state, alibi_slopes, *options, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask, rng_state, alibi_slopes)
    ctx.options = (*options, backend)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, mask, rng_state, alibi_slopes = ctx.saved_tensors
    # Only the output is differentiable (not the mask, the slopes or the log-sum-exp, which
    # the public API hands out detached, so dlse carries nothing and is ignored).
    dq, dk, dv = attention_bwd(dout.contiguous(), q, k, v, out, lse, mask, rng_state, alibi_slopes, *ctx.options)
    return (dq, dk, dv) + (None,) * (3 + len(ctx.options))


torch.library.register_autograd("fastformer::attention_fwd", _backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------- varlen


@torch.library.custom_op("fastformer::varlen_attention_fwd", mutates_args=())
def varlen_attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    rng_state: Optional[Tensor],
    alibi_slopes: Optional[Tensor],
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float,
    is_causal: bool,
    causal_bottom_right: bool,
    scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    options = AttentionOptions(dropout_p, is_causal, causal_bottom_right, scale, window_left, window_right, softcap,
                               alibi_slopes)
    out, lse = _kernels(backend, "varlen_forward")(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, rng_state, options
    )
    return out.contiguous(), lse.contiguous()


@varlen_attention_fwd.register_fake
def _varlen_fwd_fake(q, k, v, *rest):
    out = q.new_empty((q.shape[0], q.shape[1], v.shape[2]))
    lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("fastformer::varlen_attention_bwd", mutates_args=())
def varlen_attention_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    rng_state: Optional[Tensor],
    alibi_slopes: Optional[Tensor],
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float,
    is_causal: bool,
    causal_bottom_right: bool,
    scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    options = AttentionOptions(dropout_p, is_causal, causal_bottom_right, scale, window_left, window_right, softcap,
                               alibi_slopes)
    dq, dk, dv = _kernels(backend, "varlen_backward")(
        dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, rng_state, options
    )
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@varlen_attention_bwd.register_fake
def _varlen_bwd_fake(dout, q, k, v, *rest):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _varlen_setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, rng_state, alibi_slopes, max_q, max_k, *options, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, rng_state, alibi_slopes)
    ctx.options = (max_q, max_k, *options, backend)


def _varlen_backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k, rng_state, alibi_slopes = ctx.saved_tensors
    max_q, max_k, *options = ctx.options
    dq, dk, dv = varlen_attention_bwd(dout.contiguous(), q, k, v, out, lse, cu_q, cu_k, rng_state, alibi_slopes,
                                      max_q, max_k, *options)
    return (dq, dk, dv) + (None,) * (4 + len(ctx.options))


torch.library.register_autograd(
    "fastformer::varlen_attention_fwd", _varlen_backward, setup_context=_varlen_setup_context
)


# ---------------------------------------------------------------------------------------- decode


@torch.library.custom_op("fastformer::decode_attention", mutates_args=())
def decode_attention_op(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    block_table: Optional[Tensor],
    alibi_slopes: Optional[Tensor],
    dropout_p: float,
    is_causal: bool,
    causal_bottom_right: bool,
    scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    num_splits: int,
    backend: str,
) -> tuple[Tensor, Tensor]:
    options = AttentionOptions(dropout_p, is_causal, causal_bottom_right, scale, window_left, window_right, softcap,
                               alibi_slopes)
    return _kernels(backend, "decode_forward")(q, k_cache, v_cache, cache_seqlens, block_table, options, num_splits)


@decode_attention_op.register_fake
def _decode_fake(q, k_cache, v_cache, *rest):
    B, Hq, Lq, _ = q.shape
    return q.new_empty((B, Hq, Lq, v_cache.shape[3])), q.new_empty((B, Hq, Lq), dtype=torch.float32)


# ---------------------------------------------------------------------------------------- runner


def draw_rng_state(dropout_p: float, device: torch.device) -> Optional[Tensor]:
    """Seed and offset for in-kernel dropout, drawn from torch's generator of ``device``."""
    if dropout_p == 0.0:
        return None
    return torch.randint(0, 2**31 - 1, (2,), dtype=torch.int64, device=device)


def _eager(q: Tensor, k: Tensor, v: Tensor) -> Optional[str]:
    """How a dense forward may skip the custom op: ``"no_grad"`` (call the kernel itself),
    ``"grad"`` (:class:`_EagerAttention`) or None (the custom op: under torch.compile, export,
    ``torch.jit.trace``, functorch transforms or a dispatch mode such as ``FlopCounterMode``, or
    for tensor subclasses such as fake tensors)."""
    if type(q) is not Tensor or type(k) is not Tensor or type(v) is not Tensor:
        return None
    if not direct_calls_allowed():
        return None
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return "grad"
    return "no_grad"


class _EagerAttention(torch.autograd.Function):
    """``attention_fwd`` with its registered backward, as a plain autograd Function for eager calls:
    the same kernels, outputs and saved tensors, without torch's custom-op dispatch. That dispatch
    costs ~300 us of Python per forward+backward under torch 2.13 (its ``fill_defaults`` rebuilds
    the schema's argument list once per argument), 5-10 % of a 3-6 ms CPU training call."""

    @staticmethod
    def forward(ctx, q, k, v, mask, rng_state, opts, backend):
        out, lse = _kernels(backend, "forward")(q, k, v, mask, rng_state, opts)
        out, lse = out.contiguous(), lse.contiguous()
        ctx.save_for_backward(q, k, v, out, lse, mask, rng_state, opts.alibi_slopes)
        ctx.opts, ctx.backend = opts, backend
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, mask, rng_state, _slopes = ctx.saved_tensors
        # The cpu kernels read dout through its strides (in training it arrives transposed from
        # the (B, L, H, D) layout of the output projection's input): no copy for them.
        if ctx.backend != "cpu":
            dout = dout.contiguous()
        dq, dk, dv = _kernels(ctx.backend, "backward")(dout, q, k, v, out, lse, mask, rng_state, ctx.opts)
        return dq.contiguous(), dk.contiguous(), dv.contiguous(), None, None, None, None


def qkv_views(qkv: Tensor):
    """q, k, v of a packed ``qkv (B, L, 3, H, E)`` as ``(B, H, L, E)`` views (no copy)."""
    return tuple(qkv.select(2, i).transpose(1, 2) for i in range(3))


def _packed_forward(q, k, v, mask, rng_state, opts, backend: str):
    """``out (B, L, H, Ev)``, written by ``backend``'s forward through its ``(B, H, L, Ev)`` view, and ``lse``."""
    B, H, L, _ = q.shape
    out = new_output((B, L, H, v.shape[-1]), q.dtype, q.device)
    _, lse = _kernels(backend, "forward")(q, k, v, mask, rng_state, opts, out=out.transpose(1, 2))
    return out, lse


class _PackedAttention(torch.autograd.Function):
    """Attention over a packed ``qkv (B, L, 3, H, E)`` on a backend with ``strided_outputs``: the
    output is written in FlashAttention's ``(B, L, H, E)`` layout and the backward writes dq, dk, dv
    into one packed gradient of ``qkv``'s shape. The split form's autograd instead copies each
    gradient out of its transposed view and concatenates the three (SplitBackward's cat), and the
    output projection copies ``(B, H, L, E)`` to ``(B, L, H·E)``: four passes over L·H·E values a
    layer that this form does not make."""

    @staticmethod
    def forward(ctx, qkv, mask, rng_state, opts, backend):
        out, lse = _packed_forward(*qkv_views(qkv), mask, rng_state, opts, backend)
        ctx.save_for_backward(qkv, out, lse, mask, rng_state, opts.alibi_slopes)
        ctx.opts, ctx.backend = opts, backend
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        qkv, out, lse, mask, rng_state, _slopes = ctx.saved_tensors
        q, k, v = qkv_views(qkv)
        dqkv = new_output(qkv.shape, qkv.dtype, qkv.device)  # contiguous: (B, L, 3, H, E)
        grads = qkv_views(dqkv)
        _kernels(ctx.backend, "backward")(dout.transpose(1, 2), q, k, v, out.transpose(1, 2), lse, mask, rng_state,
                                          ctx.opts, grads=grads)
        return dqkv, None, None, None, None


def run_qkvpacked(problem, backend, qkv: Tensor) -> Tensor:
    """Run a dense self-attention problem whose q, k, v are :func:`qkv_views` of ``qkv``; returns
    ``out (B, L, H, Ev)`` (contiguous). A backend with ``strided_outputs`` writes the output and
    the packed gradient in place (:class:`_PackedAttention`); any other, and the traced paths
    (torch.compile, transforms, subclasses), run :func:`run_problem` and transpose."""
    fused = (backend.strided_outputs and backend.forward is not None and problem.head_dim > 0
             and not (backend.run is not None and "dense" in backend.run_kinds))
    eager = _eager(problem.q, problem.k, problem.v) if fused else None
    if eager is None:
        return run_problem(problem, backend).transpose(1, 2).contiguous()
    opts = problem.options
    rng_state = draw_rng_state(opts.dropout_p, qkv.device)
    if eager == "grad":
        return _PackedAttention.apply(qkv, problem.mask, rng_state, opts, backend.name)
    return _packed_forward(problem.q, problem.k, problem.v, problem.mask, rng_state, opts, backend.name)[0]


def run_problem(problem, backend, return_lse: bool = False):
    """Run a validated problem of any kind on a selected :class:`AttentionBackend`.

    Returns ``out`` (differentiable in q, k, v for dense and varlen), or ``(out, lse)``
    with the log-sum-exp detached when ``return_lse``.
    """
    kind = problem.kind
    if backend.run is not None and kind in backend.run_kinds:
        return backend.run(problem, return_lse=True) if return_lse else backend.run(problem)
    opts = problem.options
    if kind == "dense":
        rng_state = draw_rng_state(opts.dropout_p, problem.q.device)
        q, k = problem.q, problem.k
        if problem.head_dim == 0:
            # Head dim 0: every score is 0 and torch attends uniformly (mean of V). One zero
            # column gives any kernel those scores; the pad's gradient slices dq, dk back to 0 wide.
            q, k = F.pad(q, (0, 1)), F.pad(k, (0, 1))
        eager = _eager(q, k, problem.v)
        if eager == "no_grad":
            # Nothing for autograd to record: the op's own body, without the custom op's dispatch
            # (~25-45 us of Python a call: a visible share of a 0.3-1 ms CPU problem).
            out, lse = _kernels(backend.name, "forward")(q, k, problem.v, problem.mask, rng_state, opts)
            out, lse = out.contiguous(), lse.contiguous()
        elif eager == "grad":
            out, lse = _EagerAttention.apply(q, k, problem.v, problem.mask, rng_state, opts, backend.name)
        else:
            out, lse = attention_fwd(q, k, problem.v, problem.mask, rng_state, opts.alibi_slopes, *opts.op_args(),
                                     backend.name)
    elif kind == "varlen":
        rng_state = draw_rng_state(opts.dropout_p, problem.q.device)
        out, lse = varlen_attention_fwd(
            problem.q, problem.k, problem.v, problem.cu_seqlens_q, problem.cu_seqlens_k, rng_state, opts.alibi_slopes,
            problem.max_seqlen_q, problem.max_seqlen_k, *opts.op_args(), backend.name,
        )
    else:
        q, lens = problem.q, problem.cache_seqlens
        if isinstance(lens, int):
            lens = torch.full((q.shape[0],), lens, dtype=torch.int32, device=q.device)
        out, lse = decode_attention_op(q, problem.k_cache, problem.v_cache, lens.to(q.device), problem.block_table,
                                       opts.alibi_slopes, *opts.op_args(), problem.num_splits or 0, backend.name)
    # lse is returned detached: the kernels' backward differentiates the output only.
    return (out, lse.detach()) if return_lse else out
