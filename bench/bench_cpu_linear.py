"""The CPU decoding GEMM (``fastformer.ops.linear``, backend ``"cpu"``) against ``F.linear``.

Grid: the four projections of a transformer layer at model width d (qkv 3d×d, out d×d,
fc1 4d×d, fc2 d×4d) for d = 384, 768, 2048, × rows M = 1…32 (batch × new tokens of a
decoding step), × float32 / bfloat16, × where the weight lives:

* ``memory``: each call reads another copy of the weight, cycling through more than
  the last-level cache holds (a decoding step reads every layer's weights once, and a
  model's weights exceed the cache, so this is the generation case);
* ``cache``: the same weight every call (a small model, or a loop over one layer).

Each row is a paired, interleaved ratio (``common.paired_ratio``): one block of calls of
ours, one of ``F.linear``, per round; ``speedup_vs_best_peer`` = torch time ÷ ours.
The summary prints, per dtype and row count, the worst ratio over every shape and cache
state: ``ops.linear.CPU_AUTO_MAX_ROWS[dtype]`` is the largest M at which every row up to it
is above 1.05.

    python bench/bench_cpu_linear.py            # ~2-3 min on 2 cores
    python bench/bench_cpu_linear.py --quick    # seconds

Writes ``bench/results/<device-slug>/cpu_linear[-quick].json``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from fastformer.ops.linear import CPU_AUTO_MAX_ROWS, CPU_AUTO_MIN_WEIGHT_BYTES, linear  # noqa: E402

COLD_BYTES = 96 << 20  # more than any L3 we run on (32 MiB here)


def _block(fn: Callable[[], object], target_s: float = 0.004) -> Tuple[Callable[[], None], int]:
    """``fn`` repeated enough times that one call of the result takes about ``target_s``, and that count."""
    fn()
    t0 = time.perf_counter()
    fn()
    reps = max(1, int(target_s / max(time.perf_counter() - t0, 1e-7)))

    def run() -> None:
        for _ in range(reps):
            fn()
    return run, reps


def rows_for(d: int, M: int, dtype: torch.dtype, where: str, rounds: int) -> List[Dict]:
    out = []
    for name, (N, K) in (("qkv", (3 * d, d)), ("out", (d, d)), ("fc1", (4 * d, d)), ("fc2", (d, 4 * d))):
        nbytes = N * K * torch.finfo(dtype).bits // 8
        copies = max(2, -(-COLD_BYTES // nbytes)) if where == "memory" else 1
        ws = [torch.randn(N, K).to(dtype) for _ in range(copies)]
        b = torch.randn(N).to(dtype)
        x = torch.randn(M, K).to(dtype)
        it = [0]

        def nxt():
            it[0] = (it[0] + 1) % copies
            return ws[it[0]]

        with torch.inference_mode():
            ours, n_a = _block(lambda: linear(x, nxt(), b, backend="cpu"))
            theirs, n_b = _block(lambda: F.linear(x, nxt(), b))
            r = common.paired_ratio(ours, theirs, "cpu", rounds=rounds)
        t_a, t_b = r["a_s"] / n_a, r["b_s"] / n_b
        ratio = t_b / t_a  # per-call medians; the blocks differ in length, so not the per-round ratio
        dt = str(dtype).replace("torch.", "")
        cfg = f"{name} N{N} K{K} M{M} {dt} {where}"
        base = {"config": cfg, "d": d, "proj": name, "N": N, "K": K, "M": M, "dtype": dt, "weights": where,
                "weight_mb": nbytes / 1e6}
        out.append({"provider": "fastformer-cpu", **base, "time_ms": t_a * 1e3, "gbps": nbytes / t_a / 1e9,
                    "speedup_vs_best_peer": ratio, "best_peer": "torch-F.linear"})
        out.append({"provider": "torch-F.linear", **base, "time_ms": t_b * 1e3, "gbps": nbytes / t_b / 1e9})
        del ws
    return out


def main(argv=None) -> int:
    args = common.cpu_benchmark_args("bench_cpu_linear.py", __doc__, 5, argv)
    if args is None:
        return 0
    common.steady_cpu_allocator()
    env = common.environment("cpu")
    load0 = os.getloadavg()[0]
    from fastformer import _ext

    if _ext.C is None:
        path = common.write_results("cpu_linear" + ("-quick" if args.quick else ""),
                                    {"results": [], "skipped": f"extension unavailable: {_ext.LOAD_ERROR}"}, env)
        print(f"extension unavailable; wrote {path}")
        return 0
    dims = [384] if args.quick else [384, 768, 2048]
    ms = [1, 8] if args.quick else [1, 2, 4, 8, 16, 32]
    rows: List[Dict] = []
    for d in dims:
        for M in ms:
            for dtype in (torch.float32, torch.bfloat16):
                for where in ("memory", "cache"):
                    new = rows_for(d, M, dtype, where, 2 if args.quick else args.rounds)
                    for r in new[::2]:
                        print(f"{r['config']:<40} ours {r['gbps']:5.1f} GB/s  torch/ours {r['speedup_vs_best_peer']:.2f}",
                              flush=True)
                    rows += new
    worst = {dt: {M: min(r["speedup_vs_best_peer"] for r in rows
                         if r["M"] == M and r["dtype"] == dt and "speedup_vs_best_peer" in r) for M in ms}
             for dt in ("float32", "bfloat16")}
    limits = {str(k).replace("torch.", ""): v for k, v in CPU_AUTO_MAX_ROWS.items()}
    for dt, by_m in worst.items():
        print(f"worst torch/ours, {dt}, per row count:", {M: round(v, 2) for M, v in by_m.items()},
              f"(auto takes the kernel up to {limits[dt]} rows)")
    payload = {"results": rows, "isa": _ext.C.linear_cpu_isa(), "worst_by_rows": worst,
               "auto_max_rows": limits, "auto_min_weight_bytes": CPU_AUTO_MIN_WEIGHT_BYTES,
               "load_avg": [load0, os.getloadavg()[0]]}
    path = common.write_results("cpu_linear" + ("-quick" if args.quick else ""), payload, env)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
