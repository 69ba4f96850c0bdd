"""A tensor subclass that records every torch function called on it (``__torch_function__``),
for the tests that check a CPU kernel steps aside for subclasses: the raw-pointer kernels
would hide the call from the subclass. Shared by the linear and GELU tests."""

from __future__ import annotations

from typing import Callable, List

import torch


def logged(x: torch.Tensor, seen: List[Callable]) -> torch.Tensor:
    """``x`` as a subclass whose torch function calls are appended to ``seen``."""

    class Logged(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            seen.append(func)
            return super().__torch_function__(func, types, args, kwargs or {})

    return x.as_subclass(Logged)
