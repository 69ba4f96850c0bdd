"""Test-suite set-up shared by every test.

* Without a CUDA GPU, Triton kernels run on CPU tensors through the interpreter
  (``TRITON_INTERPRET=1``, set before anything imports triton).
* Kernel outputs are NaN-poisoned (``FASTFORMER_POISON_OUTPUTS=1``) so elements a
  kernel never writes fail the checks.
* ``@pytest.mark.cuda`` tests are skipped without a GPU.
* Skipped tests of an advertised integration (transformers, timm; see advertised.py)
  get their own section in the terminal summary, with the reason.
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FASTFORMER_POISON_OUTPUTS", "1")

import pytest  # noqa: E402

from advertised import SKIP_PREFIX  # noqa: E402


def pytest_sessionstart(session):
    """Under tests/run.sh (FASTFORMER_INFO_HEADER=1) the log opens with ``python -m fastformer.info``'s
    report, printed from here rather than by a separate Python start (one torch import less)."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if os.environ.get("FASTFORMER_INFO_HEADER") != "1" or reporter is None or hasattr(session.config, "workerinput"):
        return
    try:
        from fastformer.info import describe

        text = describe()
    except Exception as exc:  # the tests will say more; the header must not hide them
        text = f"fastformer.info failed: {type(exc).__name__}: {exc}"
    for line in text.splitlines() + [""]:
        reporter.write_line(line)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _cuda_fault_stays_in_its_test(request):
    """Under pytest-xdist (``-n N``, as bench/gpu.sh runs the GPU tests): a test that leaves a
    sticky CUDA error (an illegal address) would fail every later test of its process, so the
    worker exits and xdist reports this test as crashed and starts a fresh worker."""
    yield
    if "cuda" not in request.keywords or not os.environ.get("PYTEST_XDIST_WORKER") or not torch.cuda.is_available():
        return
    try:
        torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 - any CUDA error here is sticky
        sys.stderr.write(f"CUDA fault after {request.node.nodeid}: {exc}\n")
        sys.stderr.flush()
        os._exit(3)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """List the advertised integrations whose tests skipped here, with why (visible in CI's log)."""
    counts = {}
    for rep in terminalreporter.stats.get("skipped", []):
        if isinstance(rep.longrepr, tuple) and rep.longrepr[2].startswith("Skipped: " + SKIP_PREFIX):
            reason = rep.longrepr[2][len("Skipped: "):]
            counts.setdefault(reason, []).append(rep.nodeid)
    if not counts:
        return
    terminalreporter.section("advertised integrations NOT tested here", sep="=", yellow=True, bold=True)
    for reason, nodeids in sorted(counts.items()):
        files = sorted({n.split("::")[0] for n in nodeids})
        terminalreporter.line(f"{reason}: {len(nodeids)} test(s)/module(s) skipped in {', '.join(files)}")
    terminalreporter.line("(set FASTFORMER_EXPECT_INTEGRATIONS=<names> where they must run, to fail instead of skip)")
