"""Module parity under the correctness rule: a fastformer.nn module against its torch.nn twin.

Same weights in three modules: ours (in ``dtype``), torch's in ``dtype`` (its
same-dtype error) and torch's in float64 on upcast weights and inputs (the
reference). Outputs, input gradients and every parameter gradient must satisfy
``tests/error_rule.py``.
"""

from __future__ import annotations

import copy
from typing import Dict, Sequence

import pytest
import torch
from torch import nn

from error_rule import assert_close_by_rule


@pytest.fixture(autouse=False)
def single_thread():
    """Tiny modules on a loaded 2-core machine: one intra-op thread is ~25x faster
    (no thread-pool contention); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _outputs(result) -> list:
    if isinstance(result, torch.Tensor):
        return [result]
    return [r for r in result if isinstance(r, torch.Tensor)]


def _upcast(x, grad: bool):
    if not isinstance(x, torch.Tensor):
        return x
    if x.dtype == torch.bool:
        return x
    y = x.detach().double()
    return y.requires_grad_(grad and x.requires_grad)


def _same(x, dtype, grad: bool):
    if not isinstance(x, torch.Tensor) or x.dtype == torch.bool:
        return x
    y = x.detach().to(dtype)
    return y.requires_grad_(grad and x.requires_grad)


def check_parity(
    torch_module: nn.Module,
    ours: nn.Module,
    args: Sequence,
    kwargs: Dict = None,
    dtype: torch.dtype = torch.float32,
    train: bool = True,
    grad: bool = True,
) -> None:
    """Load ``torch_module``'s weights into ``ours`` and compare outputs (and gradients).

    ``args``/``kwargs`` hold float tensors (given ``requires_grad`` where their
    gradient is checked) and masks; float masks are cast with the inputs (torch
    requires a float mask in the query's dtype), bool masks pass through.
    """
    kwargs = dict(kwargs or {})
    ours.load_state_dict(torch_module.state_dict())
    ours.zero_grad(set_to_none=True)  # a module reused across checks must not accumulate
    ref = copy.deepcopy(torch_module).double()
    same = copy.deepcopy(torch_module).to(dtype)
    ours = ours.to(dtype)
    for m in (ref, same, ours):
        m.train(train)

    def cast(fn):  # bool masks pass through; float tensors (inputs, float masks) take the run's dtype
        return [fn(x) for x in args], {n: fn(v) for n, v in kwargs.items()}

    runs = {}
    for name, module, caster in (
        ("ref", ref, lambda x: _upcast(x, grad)),
        ("same", same, lambda x: _same(x, dtype, grad)),
        ("ours", ours, lambda x: _same(x, dtype, grad)),
    ):
        a, k = cast(caster)
        with torch.set_grad_enabled(grad):
            out = _outputs(module(*a, **k))
        runs[name] = (module, a, out)

    n_out = len(runs["ref"][2])
    assert len(runs["ours"][2]) == n_out, "ours returns a different number of tensors than torch"
    for i in range(n_out):
        assert_close_by_rule(runs["ours"][2][i], runs["ref"][2][i], runs["same"][2][i], name=f"output[{i}]")
    if not grad:
        return

    # One fixed random upstream gradient per output, shared by the three runs.
    upstream = [torch.randn_like(o, dtype=torch.float64) for o in runs["ref"][2]]
    for name, (module, a, out) in runs.items():
        loss = sum((o * g.to(o.dtype)).sum() for o, g in zip(out, upstream) if o.requires_grad)
        loss.backward()
    for i, x in enumerate(runs["ref"][1]):
        if isinstance(x, torch.Tensor) and x.requires_grad:
            assert_close_by_rule(runs["ours"][1][i].grad, x.grad, runs["same"][1][i].grad, name=f"grad of arg {i}")
    ref_params = dict(runs["ref"][0].named_parameters())
    same_params = dict(runs["same"][0].named_parameters())
    for pname, p in runs["ours"][0].named_parameters():
        if ref_params[pname].grad is None:
            assert p.grad is None or not p.grad.any(), f"{pname}: gradient where torch has none"
            continue
        assert p.grad is not None, f"{pname}: no gradient"
        assert_close_by_rule(p.grad, ref_params[pname].grad, same_params[pname].grad, name=f"grad of {pname}")


def random_mask(shape, kind: str, generator_p: float = 0.3, keep_first: bool = True) -> torch.Tensor:
    """A torch.nn-convention mask: ``kind`` ``"bool"`` (``True`` = masked) or ``"float"``
    (``-inf`` masked, small random biases elsewhere). The first key is never masked,
    so no row is fully masked."""
    masked = torch.rand(shape) < generator_p
    if keep_first:
        masked[..., 0] = False
    if kind == "bool":
        return masked
    return torch.randn(shape).mul_(0.5).masked_fill_(masked, float("-inf"))

