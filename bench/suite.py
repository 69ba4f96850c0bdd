"""Run every benchmark available on this machine, one after another.

    python bench/suite.py                   # this machine's default sets
    python bench/suite.py --quick           # CI smoke: tiny sets, valid JSON
    python bench/suite.py --device cuda     # what bench/gpu.sh runs

Each entry of SUITE is a script in bench/ taking ``--device`` and ``--quick``;
entries whose script is missing are reported and skipped. Each runs in its own
process under a time limit, so one failure or hang cannot sink the rest.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent

# (script, time limit in seconds on the GPU set, extra arguments). Fixed order.
SUITE = [  # in priority order: with --budget, later entries run only if time is left
    ("attention.py", 240, []),
    ("bench_cuda_kernels.py", 300, []),  # issue 6: CUDA flash attention and softmax vs torch flash
    ("bench_kernels.py", 240, []),  # issue 7: softmax, LayerNorm, FFN
    ("bench_nn.py", 240, []),  # issue 8: fastformer.nn vs torch.nn
    ("bench_models.py", 240, []),  # issue 9: GPT/ViT vs transformers/timm
    ("bench_pytest.py", 120, []),  # the same attention comparisons as pytest-benchmark JSON
    ("bench_cpu_attention.py", 600, []),  # issue 5: "cpu" backend vs torch CPU SDPA (on a GPU host: its CPU, 2 threads)
    ("bench_cpu_linear.py", 240, []),  # issue 20: the CPU decoding GEMM vs F.linear (CPU only)
    ("bench_cpu_activation.py", 120, []),  # issue 20: the CPU GELU-tanh kernel vs torch (CPU only)
    ("bench_variants.py", 240, []),  # issue 18: window time vs L, ALiBi/soft-cap overhead, paged vs contiguous decode
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", nargs="*", help="run only these scripts, in the order given")
    p.add_argument("--budget", type=float, default=None, help="stop starting new entries after this many seconds")
    args = p.parse_args(argv)
    start = time.time()
    failures = []
    entries = SUITE
    if args.only:  # the caller's order: bench/gpu.sh puts what has never run on a GPU first
        by_name = {e[0]: e for e in SUITE}
        unknown = [s for s in args.only if s not in by_name]
        if unknown:
            p.error(f"--only: unknown scripts {unknown}; known: {sorted(by_name)}")
        entries = [by_name[s] for s in args.only]
    for script, limit, extra in entries:
        path = BENCH / script
        if not path.exists():
            print(f"== {script}: missing, skipped", flush=True)
            continue
        if args.budget is not None and time.time() - start > args.budget:
            print(f"== {script}: skipped (suite budget of {args.budget:.0f}s spent)", flush=True)
            failures.append(script)
            continue
        cmd = [sys.executable, str(path), "--device", args.device, *(["--quick"] if args.quick else []), *extra]
        print(f"== {script}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.time()
        try:
            timeout = limit * (1 if not args.quick else 0.5)
            if args.budget is not None:  # never run past the suite's budget (plus a little grace)
                timeout = max(30.0, min(timeout, args.budget - (time.time() - start) + 30))
            rc = subprocess.run(cmd, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        print(f"== {script}: {'ok' if rc == 0 else f'FAILED ({rc})'} in {time.time() - t0:.0f}s", flush=True)
        if rc != 0:
            failures.append(script)
    print(f"== suite done in {time.time() - start:.0f}s; failures: {failures or 'none'}")
    if not args.quick:  # regenerate the charts and tables from whatever JSON now exists
        subprocess.run([sys.executable, str(BENCH / "report.py")])
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
