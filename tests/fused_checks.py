"""Shared check for the fused softmax / norm / FFN / positional ops (issue 7).

``check_by_rule(ours, eager, inputs, dtype)`` runs ``ours`` on the inputs in
``dtype``, ``eager`` (plain torch math) on the same inputs in ``dtype`` and in
float64, backpropagates one fixed random cotangent per output through all
three, and applies the correctness rule of tests/error_rule.py to every output
and to the gradient of every floating input that requires grad.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from error_rule import assert_close_by_rule


def _as_tuple(out):
    return out if isinstance(out, (tuple, list)) else (out,)


def _run(fn, inputs, dtype, grad_mask, cotangents=None):
    xs = []
    for t, g in zip(inputs, grad_mask):
        if isinstance(t, torch.Tensor) and t.dtype.is_floating_point:
            t = t.detach().to(dtype).requires_grad_(g)
        xs.append(t)
    outs = _as_tuple(fn(*xs))
    if cotangents is None:
        cotangents = [torch.randn(o.shape, dtype=torch.float64, device=o.device) for o in outs]
    leaves = [x for x, g in zip(xs, grad_mask) if g]
    grads = []
    if leaves:
        total = sum((o.double() * c).sum() for o, c in zip(outs, cotangents))
        grads = torch.autograd.grad(total, leaves, allow_unused=True)
    return [o.detach() for o in outs], list(grads), cotangents


def check_by_rule(ours: Callable, eager: Callable, inputs: Sequence, dtype: torch.dtype,
                  grad: Sequence[bool] | None = None, names: Sequence[str] | None = None) -> None:
    """Outputs and the grads of the inputs flagged in ``grad`` (default: every float tensor) by the rule."""
    if grad is None:
        grad = [isinstance(t, torch.Tensor) and t.dtype.is_floating_point for t in inputs]
    ref_out, ref_grads, cot = _run(eager, inputs, torch.float64, grad)
    same_out, same_grads, _ = _run(eager, inputs, dtype, grad, cot)
    our_out, our_grads, _ = _run(ours, inputs, dtype, grad, cot)
    for i, (a, r, s) in enumerate(zip(our_out, ref_out, same_out)):
        assert a.dtype == s.dtype, f"output {i}: dtype {a.dtype} != eager {s.dtype}"
        assert_close_by_rule(a, r, s, name=f"output {i}")
    labels = names or [f"input {i}" for i in range(len(inputs))]
    flagged = [labels[i] for i, g in enumerate(grad) if g]
    for name, a, r, s in zip(flagged, our_grads, ref_grads, same_grads):
        if r is None:
            assert a is None or not a.abs().max() > 0, f"grad of {name}: nonzero where the reference has none"
            continue
        assert a is not None, f"grad of {name}: missing"
        assert_close_by_rule(a, r, s, name=f"grad of {name}")
