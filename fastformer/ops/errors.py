"""Exception classes that are both torch's type and the Pythonic one.

Code written against torch catches torch's exception types: ``RuntimeError``
from ``F.scaled_dot_product_attention`` (a C++ ``TORCH_CHECK``) and
``AssertionError`` from ``nn.MultiheadAttention``'s shape checks. Code written
for a Python library expects ``ValueError`` for a bad shape or value and
``TypeError`` for a bad dtype. Each class below derives from both, so
``except RuntimeError``, ``except AssertionError``, ``except ValueError`` and
``except TypeError`` all keep working wherever they would with torch or with
plain Python conventions.

Messages use torch's wording where torch's own tests match on it.
"""

from __future__ import annotations

__all__ = [
    "InputError",
    "DtypeError",
    "AttentionInputError",
    "AttentionDtypeError",
    "MultiheadAttentionShapeError",
    "MultiheadAttentionDtypeError",
]


class InputError(ValueError, RuntimeError):
    """A shape or value an op cannot take where torch's op raises ``RuntimeError`` (e.g. a norm's shape)."""


class DtypeError(TypeError, RuntimeError):
    """A dtype an op cannot take where torch's op raises ``RuntimeError``."""


class AttentionInputError(InputError):
    """A shape or value that scaled-dot-product attention cannot take (torch raises ``RuntimeError``)."""


class AttentionDtypeError(DtypeError):
    """A dtype (or dtype mix) scaled-dot-product attention cannot take (torch raises ``RuntimeError``)."""


class MultiheadAttentionShapeError(ValueError, AssertionError):
    """A shape ``MultiheadAttention`` cannot take (torch raises ``AssertionError``)."""


class MultiheadAttentionDtypeError(TypeError, AssertionError):
    """A dtype ``MultiheadAttention`` cannot take, e.g. an integer mask (torch raises ``AssertionError``)."""
