"""The CPU GELU-tanh kernel (``fastformer.ops.gelu(approximate="tanh")``, forward and backward)
against torch's ``F.gelu`` / ``aten::gelu_backward``.

Grid: element counts from the smallest ``auto`` takes (``CPU_AUTO_MIN_NUMEL``) to an MLP
activation of GPT-2 small at B 8, T 1024 (25 M), × float32 / bfloat16, × forward / backward.
Each row is a paired, interleaved ratio (``common.paired_ratio``); ``speedup_vs_best_peer`` =
torch time ÷ ours. Inputs are fresh ``randn`` × 3 (both branches of the kernel's formula).

    python bench/bench_cpu_activation.py            # ~1 min on 2 cores
    python bench/bench_cpu_activation.py --quick    # seconds

Writes ``bench/results/<device-slug>/cpu_activation[-quick].json``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Dict, List

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from fastformer.ops.activation import CPU_AUTO_MIN_NUMEL  # noqa: E402

SIZES = [CPU_AUTO_MIN_NUMEL, 65_536, 1024 * 1536, 8 * 1024 * 3072]  # last two: nanoGPT B4 T256, GPT-2 small B8 T1024


def rows_for(n: int, dtype: torch.dtype, rounds: int) -> List[Dict]:
    from fastformer import _ext

    C = _ext.C
    x = (torch.randn(n) * 3).to(dtype)
    g = torch.randn(n).to(dtype)
    out = []
    dt = str(dtype).replace("torch.", "")
    for mode, ours, theirs in (
        ("fwd", lambda: C.gelu_tanh_cpu(x), lambda: F.gelu(x, approximate="tanh")),
        ("bwd", lambda: C.gelu_tanh_backward_cpu(g, x), lambda: torch.ops.aten.gelu_backward(g, x, approximate="tanh")),
    ):
        r = common.paired_ratio(ours, theirs, "cpu", rounds=rounds)
        moved = x.numel() * x.element_size() * (2 if mode == "fwd" else 3)  # bytes read + written
        base = {"config": f"gelu_tanh {mode} n{n} {dt}", "op": "gelu_tanh", "mode": mode, "numel": n, "dtype": dt}
        out.append({"provider": "fastformer-cpu", **base, "time_ms": r["a_s"] * 1e3, "gbps": moved / r["a_s"] / 1e9,
                    "speedup_vs_best_peer": 1.0 / r["ratio_a_over_b"], "best_peer": "torch"})
        out.append({"provider": "torch", **base, "time_ms": r["b_s"] * 1e3, "gbps": moved / r["b_s"] / 1e9})
    return out


def main(argv=None) -> int:
    args = common.cpu_benchmark_args("bench_cpu_activation.py", __doc__, 7, argv)
    if args is None:
        return 0
    common.steady_cpu_allocator()
    env = common.environment("cpu")
    load0 = os.getloadavg()[0]
    from fastformer import _ext

    if _ext.C is None or not hasattr(_ext.C, "gelu_tanh_cpu"):
        path = common.write_results("cpu_activation" + ("-quick" if args.quick else ""),
                                    {"results": [], "skipped": f"extension unavailable: {_ext.LOAD_ERROR}"}, env)
        print(f"extension unavailable; wrote {path}")
        return 0
    rows: List[Dict] = []
    for n in SIZES[:2] if args.quick else SIZES:
        for dtype in (torch.float32, torch.bfloat16):
            new = rows_for(n, dtype, 2 if args.quick else args.rounds)
            for r in new[::2]:
                print(f"{r['config']:<36} ours {r['time_ms']:8.3f} ms {r['gbps']:5.1f} GB/s  "
                      f"torch/ours {r['speedup_vs_best_peer']:.2f}", flush=True)
            rows += new
    payload = {"results": rows, "isa": _ext.C.activation_cpu_isa(), "auto_min_numel": CPU_AUTO_MIN_NUMEL,
               "load_avg": [load0, os.getloadavg()[0]]}
    path = common.write_results("cpu_activation" + ("-quick" if args.quick else ""), payload, env)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
