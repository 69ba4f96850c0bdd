"""Old import path of :mod:`fastformer.nn.convert` (``from fastformer.convert import ...`` keeps working).

``fastformer.convert(model)`` stays callable even after ``import fastformer.convert`` has bound
this module to the package attribute: the module itself forwards calls to
:func:`fastformer.nn.convert.convert`.
"""

import sys
import types

from .nn.convert import _CONVERTERS, ConversionReport, convert, register_converter  # noqa: F401  (the same registry)

__all__ = ["convert", "ConversionReport", "register_converter"]


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return convert(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
