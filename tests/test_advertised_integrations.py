"""An advertised integration (transformers, timm) that cannot be imported shows in the
terminal summary with its reason, and fails where FASTFORMER_EXPECT_INTEGRATIONS says
it must run (CI's environment that installs it)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TIMM_TEST = "tests/test_integrations_timm.py::test_convert_timm_vit"


def _pytest(env_extra):
    env = {k: v for k, v in os.environ.items() if k != "FASTFORMER_EXPECT_INTEGRATIONS"}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-m", "pytest", TIMM_TEST, "-q", "-p", "no:cacheprovider"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_timm_skip_is_listed_or_test_runs():
    proc = _pytest({})
    if importlib.util.find_spec("timm") is None:
        assert proc.returncode == 0, proc.stdout[-2000:]
        assert "advertised integrations NOT tested here" in proc.stdout
        assert "advertised integration timm not importable here" in proc.stdout
    else:
        assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout[-2000:]
        assert "NOT tested here" not in proc.stdout


@pytest.mark.skipif(importlib.util.find_spec("timm") is not None, reason="timm is installed here")
def test_expected_integration_fails_instead_of_skipping():
    proc = _pytest({"FASTFORMER_EXPECT_INTEGRATIONS": "timm"})
    assert proc.returncode != 0
    assert "timm is expected here (FASTFORMER_EXPECT_INTEGRATIONS)" in proc.stdout
