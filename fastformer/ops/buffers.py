"""Output allocation for kernel launchers.

Launchers allocate through :func:`new_output` instead of ``torch.empty`` so the
test suite can set ``FASTFORMER_POISON_OUTPUTS=1`` and get NaN-filled buffers:
any element a kernel forgets to write then fails the correctness checks.
"""

from __future__ import annotations

import os

import torch


def poison_enabled() -> bool:
    return os.environ.get("FASTFORMER_POISON_OUTPUTS") == "1"


def new_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised output buffer (NaN-poisoned under FASTFORMER_POISON_OUTPUTS=1)."""
    if poison_enabled() and (dtype.is_floating_point or dtype.is_complex):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)
