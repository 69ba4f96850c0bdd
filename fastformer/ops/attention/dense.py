"""Dense attention entry points: validate once, pick a backend, run."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .fused import run_problem
from .problem import is_causal_bias, validate_attention_inputs
from .registry import auto_runs_torch, get_backend, select_backend


def _run(problem, backend: str):
    chosen = select_backend(problem, backend)
    if problem.is_empty:
        chosen = get_backend("reference")  # nothing to compute: torch's shapes and zeros, no kernel launch
    return run_problem(problem, chosen)


def _autocast(query, key, value, attn_mask):
    """As torch's autocast does for SDPA: inside ``torch.autocast`` for query's device type,
    floating q, k, v and float mask (float64 excepted) are cast to the autocast dtype."""
    device = getattr(query, "device", None)
    # meta tensors (shape inference): torch's autocast has no state for them and raises.
    if device is None or device.type == "meta" or not torch.is_autocast_enabled(device.type):
        return query, key, value, attn_mask
    dtype = torch.get_autocast_dtype(device.type)

    def cast(t):
        eligible = (isinstance(t, Tensor) and not is_causal_bias(t) and t.is_floating_point()
                    and t.dtype != torch.float64)
        return t.to(dtype) if eligible else t

    return cast(query), cast(key), cast(value), cast(attn_mask)


def _plain_torch_call(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, backend) -> bool:
    """Whether this drop-in call may go straight to torch's SDPA, skipping the problem object:
    ``"auto"`` would hand it, unchanged, to the ``reference`` backend (torch's SDPA), and the
    inputs are plainly valid (4-D plain tensors of one floating dtype and device, matching
    non-zero shapes, no mask, plain Python scalars), so no error or edge case of ours can
    differ from torch's. Building and validating the problem costs ~15-20 µs of Python: a
    visible share of small CPU problems and of launch-bound GPU ones (issue 20: ``auto`` is
    never slower than torch)."""
    if backend != "auto" or attn_mask is not None:
        return False
    if type(query) is not Tensor or type(key) is not Tensor or type(value) is not Tensor:
        return False
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return False
    dtype, device = query.dtype, query.device
    if dtype not in _PLAIN_DTYPES or key.dtype != dtype or value.dtype != dtype:
        return False
    if key.device != device or value.device != device:
        return False
    B, H, L, E = query.shape
    Bk, Hk, S, Ek = key.shape
    Bv, Hv, Sv, Ev = value.shape
    if B != Bk or B != Bv or Hk != Hv or S != Sv or E != Ek or min(B, H, L, E, Hk, S, Ev) == 0:
        return False
    if H != Hk and not (enable_gqa is True and H % Hk == 0):
        return False
    if type(is_causal) is not bool or type(enable_gqa) is not bool:
        return False
    if type(dropout_p) is not float or not 0.0 <= dropout_p < 1.0:
        return False
    if scale is not None and (type(scale) is not float or scale != scale):
        return False
    needs_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    return auto_runs_torch(device.type, dtype, needs_grad, is_causal, max(E, Ev), L, S)


_PLAIN_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


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
        value: ``(..., Hkv, S, Ev)``. The dimensions before the last two broadcast
            across query, key and value as in torch (e.g. key/value of batch 1).
        attn_mask: ``None``; a bool mask (``True`` = attend) or a float mask (float32 or
            query's dtype, as torch) added to the scores, broadcastable to ``(..., Hq, L, S)``;
            or a :class:`torch.nn.attention.bias.CausalBias` (``causal_upper_left(L, S)`` /
            ``causal_lower_right(L, S)``), run as the kernels' causal mode with that
            alignment (top-left / bottom-right), never materialised. Finite fills such as
            ``finfo.min`` behave as in torch: a row whose every key has the same huge fill
            attends uniformly (mean of V); ``-inf`` everywhere gives 0.
        dropout_p: dropout probability on the attention weights, applied whenever > 0
            (as in torch; pass 0.0 in evaluation). The kernels draw their own dropout
            masks from a seed taken from torch's generator: reproducible under
            ``torch.manual_seed``, with torch's keep probability and ``1/(1-p)`` scaling,
            but not the same random stream as torch's (equal seeds give different masks).
        is_causal: causal mask aligned top-left (query i sees keys j <= i), as torch.
        scale: score scale; ``None`` means ``1 / sqrt(E)``.
        enable_gqa: allow ``Hq`` to be a multiple of ``Hkv`` (grouped-query attention).
        backend: ``"auto"`` (fastest backend that supports the inputs, else
            ``"reference"``), or one of ``"reference"``, ``"naive"``, ``"triton"``,
            ``"cuda"``, ``"cpu"`` (raises if it cannot run these inputs).

    Inside ``torch.autocast`` for query's device type, floating inputs (float64
    excepted) are cast to the autocast dtype first, as torch does for SDPA.

    Returns:
        ``(..., Hq, L, Ev)`` (the broadcast leading dimensions) in query's dtype.

    Raises:
        :class:`~fastformer.ops.errors.AttentionInputError` (a ``ValueError`` and a
        ``RuntimeError``, torch's type) for bad shapes and values, e.g. a 1-D query or
        an ``attn_mask`` together with ``is_causal=True``;
        :class:`~fastformer.ops.errors.AttentionDtypeError` (``TypeError`` and
        ``RuntimeError``) for dtype mixes, e.g. float32 query with float16 key.
    """
    query, key, value, attn_mask = _autocast(query, key, value, attn_mask)
    if _plain_torch_call(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, backend):
        return torch.nn.functional.scaled_dot_product_attention(
            query, key, value, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    problem = validate_attention_inputs(
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa
    )
    out = _run(problem, backend)
    return out if len(problem.out_shape) == 4 else out.reshape(problem.out_shape)


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
    window_size: Tuple[int, int] = (-1, -1),
    alibi_slopes: Optional[Tensor] = None,
    softcap: float = 0.0,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Lower-level attention with the options torch's signature lacks.

    Same arguments as :func:`scaled_dot_product_attention`, plus:
        causal_bottom_right: align the causal mask bottom-right (query i sees keys
            ``j <= i + S - L``), as when decoding new tokens against a KV cache.
            ``attn_mask=causal_lower_right(L, S)`` says the same.
        window_size: ``(left, right)`` local (sliding) window, FlashAttention's
            convention: query ``i`` sees key ``j`` only when
            ``i + off - left <= j <= i + off + right``, with ``off`` the causal alignment
            in use (0, or ``S - L`` with ``causal_bottom_right``); ``-1`` = that side
            unlimited, ``(-1, -1)`` (default) = no window; ``is_causal`` means
            ``right = 0``. E.g. L = S = 6, ``is_causal=True, window_size=(2, 0)``
            (each query sees itself and the 2 keys before it)::

                keys j ->  0 1 2 3 4 5
                query 0    x . . . . .
                query 1    x x . . . .
                query 2    x x x . . .
                query 3    . x x x . .
                query 4    . . x x x .
                query 5    . . . x x x

            Bottom-right (``causal_bottom_right=True``), L = 2, S = 6, ``(2, 0)``:
            query 0 sees keys 2..4, query 1 keys 3..5. The fused kernels skip the tiles
            outside the window: the cost grows as L·W, not L·S. Combines with
            ``attn_mask`` (a key must pass both).
        alibi_slopes: ``None`` or float32 ``(Hq,)`` / ``(*batch, Hq)`` on query's device:
            adds ``-slope * |i + S - L - j|`` to the scores (ALiBi; the distance is
            bottom-right aligned whatever the causal alignment, as FlashAttention).
            Not differentiated.
        softcap: ``> 0``: scores (``scale * q·k``) become ``softcap * tanh(score / softcap)``
            before ALiBi, ``attn_mask`` and masking (Gemma 2's logit soft-capping); 0 = off.

        Every backend but ``"cuda"`` runs the three variants, forward and backward, with
        masks, GQA, dropout and ``return_lse``. ``"auto"`` runs them on the fused kernels
        that do so natively (``"triton"`` for CUDA tensors, ``"cpu"`` for CPU ones),
        else on ``"reference"``, as exact explicit math (memory ~ L·S).
        return_lse: also return the float32 log-sum-exp of each row of scaled,
            masked scores, shaped ``query.shape[:-1]`` (``-inf`` for fully masked
            rows). Only fused backends produce it; ``"auto"`` then falls back to the
            ``"naive"`` kernels where no fused backend supports the inputs. The
            log-sum-exp is returned detached (not differentiable).

    Returns:
        ``out`` or ``(out, lse)``.

    Raises:
        As :func:`scaled_dot_product_attention`, and ``TypeError`` / ``ValueError`` /
        ``RuntimeError`` naming ``window_size`` (not two ints, an entry < -1),
        ``alibi_slopes`` (not float32, not ``(Hq,)`` / ``(*batch, Hq)``, another device)
        or ``softcap`` (negative, NaN or infinite).
    """
    query, key, value, attn_mask = _autocast(query, key, value, attn_mask)
    problem = validate_attention_inputs(
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, causal_bottom_right,
        window_size, alibi_slopes, softcap,
    )
    if not return_lse:
        return _run(problem, backend).reshape(problem.out_shape)
    chosen = select_backend(problem, backend)
    if chosen.forward is None:
        if backend != "auto":
            raise ValueError(f"return_lse=True needs a fused backend; {backend!r} does not produce the log-sum-exp")
        chosen = get_backend("naive")
    out, lse = run_problem(problem, chosen, return_lse=True)
    return out.reshape(problem.out_shape), lse.reshape(problem.out_shape[:-1])


# TorchScript: the op below is ``scaled_dot_product_attention`` as a dispatcher op
# (CompositeImplicitAutograd, so autograd flows through the fused ops it calls), and
# the Python function is registered as a builtin that scripts to it. Scripted code
# that calls ``fastformer.scaled_dot_product_attention`` (the drop-in modules do)
# therefore compiles, saves and loads; ``import fastformer`` registers the op in the
# loading process.
_LIB = torch.library.Library("fastformer", "FRAGMENT")
_LIB.define(
    "scaled_dot_product_attention(Tensor query, Tensor key, Tensor value, Tensor? attn_mask=None, "
    "float dropout_p=0.0, bool is_causal=False, float? scale=None, bool enable_gqa=False, *, "
    "str backend='auto') -> Tensor"
)


def _scaled_dot_product_attention_op(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                     enable_gqa=False, *, backend="auto"):
    return scaled_dot_product_attention(
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, backend=backend
    )


_LIB.impl("scaled_dot_product_attention", _scaled_dot_product_attention_op, "CompositeImplicitAutograd")
torch.jit._builtins._register_builtin(scaled_dot_product_attention, "fastformer::scaled_dot_product_attention")
