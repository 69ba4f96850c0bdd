"""The correctness rule every kernel test uses (as FlashAttention's tests).

Compare against a float64 reference computed on upcast inputs; a kernel's
largest error must be at most twice the largest error of PyTorch's own
computation in the same dtype against that reference, plus a tiny atol.
NaNs must appear exactly where the reference has them.
"""

from __future__ import annotations

import torch

# One unit in the last place at 1.0; scaled by the reference's magnitude when that exceeds 1.
TINY_ATOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-6,
    torch.float16: 1e-3,
    torch.bfloat16: 8e-3,
}


def max_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    diff = (actual.detach().double() - reference.detach().double()).abs()
    diff = diff[~torch.isnan(diff)]
    return diff.max().item() if diff.numel() else 0.0


def assert_close_by_rule(
    actual: torch.Tensor,
    reference64: torch.Tensor,
    torch_same_dtype: torch.Tensor,
    name: str = "output",
    factor: float = 2.0,
    atol: float | None = None,
) -> None:
    """``max|actual - ref| <= factor * max|torch - ref| + atol`` with matching NaNs."""
    assert actual.shape == reference64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(reference64.shape)}"
    nan_actual, nan_ref = torch.isnan(actual.detach()), torch.isnan(reference64.detach())
    assert torch.equal(nan_actual.cpu(), nan_ref.cpu()), (
        f"{name}: NaN where the reference has none (or the reverse): "
        f"{int(nan_actual.sum())} NaNs vs {int(nan_ref.sum())} in the reference"
    )
    if atol is None:
        # One unit in the last place at the reference's own scale (gradients can be >> 1).
        finite = reference64.detach()[torch.isfinite(reference64.detach())]
        magnitude = finite.abs().max().item() if finite.numel() else 1.0
        atol = TINY_ATOL[actual.dtype] * max(1.0, magnitude)
    ours = max_error(actual, reference64)
    theirs = max_error(torch_same_dtype, reference64)
    bound = factor * theirs + atol
    assert ours <= bound, (
        f"{name}: max error {ours:.3e} exceeds {factor} x torch's same-dtype error {theirs:.3e} + atol {atol:.1e}"
    )
