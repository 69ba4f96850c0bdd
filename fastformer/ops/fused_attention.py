"""The custom ops every fused attention backend plugs into.

One forward op and one backward op, ``fastformer::attention_fwd`` and
``fastformer::attention_bwd``, registered with ``torch.library`` (schema,
fake implementation, autograd), so ``torch.compile(fullgraph=True)`` traces
through any fused backend without graph breaks. A backend contributes a pair
of plain functions to :data:`FUSED_KERNELS`; the ``backend`` string argument
of the ops picks the pair at run time.

Kernel contract (all tensors in the canonical layout of ``attention_inputs``):

``forward(q, k, v, mask, rng_state, dropout_p, is_causal, causal_bottom_right, scale)``
    returns ``out (B, Hq, L, Ev)`` in q's dtype and ``lse (B, Hq, L)`` float32,
    the natural-log log-sum-exp of each row of scaled, masked scores
    (``-inf`` for rows where every key is masked; those rows output 0).

``backward(dout, q, k, v, out, lse, mask, rng_state, dropout_p, is_causal, causal_bottom_right, scale)``
    returns ``dq, dk, dv`` shaped like ``q, k, v``.

``rng_state`` is ``None`` without dropout, else an int64 tensor ``[seed, offset]``
on q's device, drawn from torch's generator so results are reproducible under
``torch.manual_seed``; the backward must regenerate the same dropout mask from it.
"""

from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor


class FusedKernels(NamedTuple):
    forward: Callable
    backward: Callable


FUSED_KERNELS: Dict[str, FusedKernels] = {}


def register_fused_kernels(name: str, forward: Callable, backward: Callable) -> None:
    """Make ``forward``/``backward`` reachable through the fused attention ops as ``backend=name``."""
    FUSED_KERNELS[name] = FusedKernels(forward, backward)


def _kernels(backend: str) -> FusedKernels:
    if backend not in FUSED_KERNELS:
        from .dispatch import _load  # backend modules register their kernels on import

        _load(backend)
    try:
        return FUSED_KERNELS[backend]
    except KeyError:
        raise RuntimeError(
            f"backend {backend!r} has no fused attention kernels registered "
            f"(registered: {sorted(FUSED_KERNELS)})"
        ) from None


@torch.library.custom_op("fastformer::attention_fwd", mutates_args=())
def attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Optional[Tensor],
    rng_state: Optional[Tensor],
    dropout_p: float,
    is_causal: bool,
    causal_bottom_right: bool,
    scale: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    out, lse = _kernels(backend).forward(q, k, v, mask, rng_state, dropout_p, is_causal, causal_bottom_right, scale)
    # Outputs are contiguous whatever the kernel did: the fake implementation promises it to compile.
    return out.contiguous(), lse.contiguous()


@attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, mask, rng_state, dropout_p, is_causal, causal_bottom_right, scale, backend):
    B, H, L, _ = q.shape
    out = q.new_empty((B, H, L, v.shape[-1]))
    lse = q.new_empty((B, H, L), dtype=torch.float32)
    return out, lse


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
    dropout_p: float,
    is_causal: bool,
    causal_bottom_right: bool,
    scale: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = _kernels(backend).backward(
        dout, q, k, v, out, lse, mask, rng_state, dropout_p, is_causal, causal_bottom_right, scale
    )
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@attention_bwd.register_fake
def _attention_bwd_fake(dout, q, k, v, out, lse, mask, rng_state, dropout_p, is_causal, causal_bottom_right, scale, backend):
    # Contiguous, like the real op's outputs (empty_like would copy q's strides).
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, rng_state, dropout_p, is_causal, causal_bottom_right, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask, rng_state)
    ctx.options = (dropout_p, is_causal, causal_bottom_right, scale, backend)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, mask, rng_state = ctx.saved_tensors
    dropout_p, is_causal, causal_bottom_right, scale, backend = ctx.options
    # Only the output is differentiable: the public API hands the log-sum-exp out
    # detached (see fused_attention), so dlse carries nothing and is ignored.
    dq, dk, dv = attention_bwd(
        dout.contiguous(), q, k, v, out, lse, mask, rng_state, dropout_p, is_causal, causal_bottom_right, scale, backend
    )
    return dq, dk, dv, None, None, None, None, None, None, None


torch.library.register_autograd("fastformer::attention_fwd", _backward, setup_context=_setup_context)


def draw_rng_state(dropout_p: float, device: torch.device) -> Optional[Tensor]:
    """Seed and offset for in-kernel dropout, drawn from torch's generator of ``device``."""
    if dropout_p == 0.0:
        return None
    return torch.randint(0, 2**31 - 1, (2,), dtype=torch.int64, device=device)


def fused_attention(problem, backend: str, return_lse: bool = False):
    """Run a registered fused backend on a validated problem; differentiable in q, k, v."""
    rng_state = draw_rng_state(problem.dropout_p, problem.q.device)
    q, k = problem.q, problem.k
    if problem.head_dim == 0:
        # Head dim 0: every score is 0 and torch attends uniformly (mean of V). One zero
        # column gives any kernel those scores; the pad's gradient slices dq, dk back to 0 wide.
        q, k = F.pad(q, (0, 1)), F.pad(k, (0, 1))
    out, lse = attention_fwd(
        q,
        k,
        problem.v,
        problem.mask,
        rng_state,
        problem.dropout_p,
        problem.is_causal,
        problem.causal_bottom_right,
        problem.scale,
        backend,
    )
    # lse is returned detached: the kernels' backward differentiates the output only.
    return (out, lse.detach()) if return_lse else out
