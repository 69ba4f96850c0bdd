"""Importing fastformer never fails because Triton or the compiled extension is missing:
the missing backends are reported with the reason and "auto" falls back."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys
    BLOCKED = {blocked!r}
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name in BLOCKED or any(name.startswith(b + ".") for b in BLOCKED):
                raise ImportError(f"{{name}} blocked for this test")
            return None
    sys.meta_path.insert(0, Block())
    """
)

CHECK = textwrap.dedent(
    """
    import torch, fastformer
    report = fastformer.backends()
    for name in {missing!r}:
        assert not report[name]["available"], (name, report[name])
        assert report[name]["reason"], name
    q = torch.randn(1, 2, 16, 8)
    out = fastformer.scaled_dot_product_attention(q, q, q, is_causal=True)
    ref = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    torch.testing.assert_close(out, ref)
    try:
        fastformer.scaled_dot_product_attention(q, q, q, backend={missing!r}[0])
    except RuntimeError as exc:
        assert "not available" in str(exc), exc
    else:
        raise AssertionError("forcing a missing backend must raise")
    import fastformer.nn, fastformer.models  # modules import too
    print("ok")
    """
)


@pytest.mark.parametrize(
    "blocked,missing",
    [(["triton"], ["triton"]), (["fastformer._C"], ["cpu", "cuda"]), (["triton", "fastformer._C"], ["triton", "cpu"])],
    ids=["no-triton", "no-extension", "neither"],
)
def test_import_without(blocked, missing):
    code = BLOCKER.format(blocked=blocked) + CHECK.format(missing=missing)
    env_cwd = Path(__file__).parent
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=env_cwd)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-4000:]
