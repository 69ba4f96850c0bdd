"""The third-party integrations the README advertises (transformers, timm), imported
by their tests through :func:`require_integration`.

Where one cannot be imported its tests skip with a reason starting
``advertised integration``, and the conftest lists every such skip in its own
section of the terminal summary, so CI's log says which advertised integration
went untested here and why. An environment that must run them (CI's rehearsal
venv with timm installed) sets ``FASTFORMER_EXPECT_INTEGRATIONS=timm,transformers``:
then a missing one fails instead of skipping.
"""

import importlib
import os

import pytest

ADVERTISED = ("transformers", "timm")
SKIP_PREFIX = "advertised integration"


def require_integration(name: str):
    """The imported module ``name``; skip (module-level safe) if it cannot be imported, or fail
    if FASTFORMER_EXPECT_INTEGRATIONS lists it."""
    assert name in ADVERTISED, name
    try:
        return importlib.import_module(name)
    except Exception as exc:  # ImportError, or a broken install failing at import (e.g. torchvision ops)
        expected = [n for n in os.environ.get("FASTFORMER_EXPECT_INTEGRATIONS", "").split(",") if n]
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if name in expected:
            pytest.fail(f"{name} is expected here (FASTFORMER_EXPECT_INTEGRATIONS) but cannot be imported: {why}")
        pytest.skip(f"{SKIP_PREFIX} {name} not importable here ({why})", allow_module_level=True)
