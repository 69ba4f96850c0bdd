"""The interpreter accepts code the GPU compiler rejects: compile the softmax, norm, FFN
and positional Triton kernels for sm_90a (no GPU needed; in a subprocess, since kernels
under the interpreter cannot be compiled) and check ptxas's spills."""

import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_issue7_kernels_compile_for_sm90_without_spills():
    pytest.importorskip("triton.backends.nvidia")
    script = Path(__file__).resolve().parents[1] / "bench" / "kernels_triton_ptxas.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(script), "--check", "--quick"], env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
