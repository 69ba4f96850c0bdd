"""Running a check under each CPU kernel variant (``FASTFORMER_CPU_ISA`` forces one), in a fresh
process since the variant is chosen once per process. Shared by the attention and linear tests."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import fastformer

VARIANTS = ["generic", "avx2", "avx512", "avx512_bf16"]

# The processor features each variant needs.
NEEDS = {"generic": set(), "avx2": {"avx2", "fma"}, "avx512": {"avx512f", "avx2", "fma"},
         "avx512_bf16": {"avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx2", "fma"}}


def run_under_variant(variant: str, script: str) -> None:
    """Run ``python -c script variant`` with the variant forced; skip where this processor lacks
    it; fail unless the script exits 0 having printed ``ok``."""
    flags = set(fastformer._ext.C.cpu_features())
    missing = NEEDS[variant] - flags
    if missing:
        pytest.skip(f"this processor lacks {sorted(missing)}")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, FASTFORMER_CPU_ISA=variant)
    res = subprocess.run([sys.executable, "-c", script, variant], cwd=root, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout + res.stderr
