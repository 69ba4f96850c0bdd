"""pyproject's pytest warning filters silence the known third-party noise (the Triton
interpreter's NumPy deprecations) and nothing of ours: the filters are active while
this test runs, so warnings issued "from" a module are checked against them."""

import sys
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NUMPY_MSG = "Conversion of an array with ndim > 0 to a scalar is deprecated, and will error in future."


@pytest.fixture
def shown(monkeypatch):
    def check(message, category, module):
        seen = []
        monkeypatch.setattr(warnings, "showwarning", lambda *args, **kw: seen.append(args))
        warnings.warn_explicit(message, category, "somefile.py", 1, module=module, registry={})
        return bool(seen)

    return check


def test_triton_interpreter_numpy_deprecation_is_filtered(shown):
    assert not shown(NUMPY_MSG, DeprecationWarning, "triton.runtime.interpreter")


@pytest.mark.parametrize("module", ["fastformer.ops.softmax", "fastformer.kernels.softmax", "test_softmax", "numpy"])
def test_same_warning_elsewhere_stays_visible(shown, module):
    assert shown(NUMPY_MSG, DeprecationWarning, module)


@pytest.mark.parametrize("category", [UserWarning, DeprecationWarning, RuntimeWarning])
def test_our_warnings_stay_visible(shown, category):
    assert shown("fastformer: falling back to the reference backend", category, "fastformer.ops.dispatch")


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib")
def test_every_ignore_names_a_third_party_module():
    import tomllib

    filters = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["filterwarnings"]
    for f in filters:
        action, _msg, _cat, module = (f.split(":") + ["", "", ""])[:4]
        if action == "ignore":
            assert module and not module.startswith(("fastformer", "kernels", "tests")), f
