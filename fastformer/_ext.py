"""Loads the compiled extension ``fastformer._C`` if it was built.

Never raises: when the extension is missing or fails to load, ``C`` is None
and ``LOAD_ERROR`` says why, so the backends that need it report themselves
unavailable while everything else keeps working.
"""

from __future__ import annotations

from typing import Optional

C = None
LOAD_ERROR: Optional[str] = None

try:
    import torch  # noqa: F401  (libtorch must be loaded before the extension)

    from . import _C as C  # type: ignore[attr-defined,no-redef]
except Exception as exc:  # ImportError, or an undefined symbol from a stale build
    LOAD_ERROR = (
        f"{type(exc).__name__}: {exc}. Build it with "
        "'pip install --no-build-isolation -e .' (see README)"
    )


def require(feature: str):
    """The extension module, or a RuntimeError naming the feature that needs it."""
    if C is None:
        raise RuntimeError(f"{feature} needs the compiled extension fastformer._C, which is unavailable: {LOAD_ERROR}")
    return C
