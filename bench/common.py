"""Shared benchmark helpers: environment record, timing, FLOP counting, peak
memory, machine ceilings and JSON results.

Every result file carries the environment it was measured in (device, driver,
torch/triton/CUDA versions, commit, date, CPU flags), so a number in the
README can always be traced to the run that produced it.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent

# The x86 features that decide which CPU kernels run; recorded with every CPU result.
CPU_FLAGS_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "amx_bf16", "amx_tile")


# ----------------------------------------------------------------------------- environment

def _run(cmd: List[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=REPO_DIR).stdout.strip()
    except Exception:
        return ""


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> List[str]:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                present = set(line.split(":", 1)[1].split())
                return [f for f in CPU_FLAGS_OF_INTEREST if f in present]
    except OSError:
        pass
    return []


def environment(device: str) -> Dict[str, object]:
    """Where and with what a benchmark ran."""
    env: Dict[str, object] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _run(["git", "rev-parse", "HEAD"]) or "unknown",
        "dirty": bool(_run(["git", "status", "--porcelain", "--untracked-files=no"])),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "threads": torch.get_num_threads(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    if device == "cuda":
        env["device"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
        env["driver"] = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]).splitlines()[:1]
        env["driver"] = env["driver"][0] if env["driver"] else None
    else:
        env["device"] = f"CPU: {env['cpu']} ({torch.get_num_threads()} threads)"
    return env


def device_slug(env: Dict[str, object]) -> str:
    """A folder name for results: the GPU name, or 'cpu-<model>-<isa>'."""
    if str(env["device"]).startswith("CPU"):
        isa = "avx512" if "avx512f" in env["cpu_flags"] else ("avx2" if "avx2" in env["cpu_flags"] else "base")
        name = f"cpu-{env['cpu']}-{isa}"
    else:
        name = str(env["device"])
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# ----------------------------------------------------------------------------- timing

def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_cpu(fn: Callable[[], object], warmup: int = 2, min_reps: int = 5, min_time_s: float = 0.3) -> float:
    """Median wall time of ``fn`` in seconds, after warm-up (CPU)."""
    for _ in range(warmup):
        fn()
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < min_time_s and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_gpu(fn: Callable[[], object], warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median time of ``fn`` in seconds on the GPU (``triton.testing.do_bench``, L2 flushed)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median") / 1e3


def time_fn(fn: Callable[[], object], device: str, quick: bool = False) -> float:
    if device == "cuda":
        return time_gpu(fn, rep_ms=30 if quick else 100)
    return time_cpu(fn, warmup=1 if quick else 2, min_reps=2 if quick else 5, min_time_s=0.0 if quick else 0.3)


def paired_ratio(fn_a: Callable[[], object], fn_b: Callable[[], object], device: str, rounds: int = 7,
                 quick: bool = False) -> Dict[str, float]:
    """Time ``a`` and ``b`` interleaved (a, b, a, b, …) and report medians and the
    median of the per-round ratios ``a / b`` — robust to a noisy machine."""
    ta, tb, ratios = [], [], []
    for _ in range(max(1, 2 if quick else rounds)):
        a = time_fn(fn_a, device, quick=True)
        b = time_fn(fn_b, device, quick=True)
        ta.append(a)
        tb.append(b)
        ratios.append(a / b)
    return {"a_s": statistics.median(ta), "b_s": statistics.median(tb), "ratio_a_over_b": statistics.median(ratios)}


# ----------------------------------------------------------------------------- memory

def _proc_status_bytes(key: str) -> Optional[int]:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_memory(fn: Callable[[], object], device: str) -> Optional[int]:
    """Peak bytes allocated while ``fn`` runs, above what was allocated before.

    GPU: torch's allocator statistics. CPU: the process's resident-set high-water
    mark (Linux: reset through /proc/self/clear_refs), which tracks real allocations
    because large CPU tensors are mmap'ed and returned to the OS when freed.
    """
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    base = _proc_status_bytes("VmRSS")
    fn()
    peak = _proc_status_bytes("VmHWM")
    return None if base is None or peak is None else max(0, peak - base)


# ----------------------------------------------------------------------------- work counting

def attention_pairs(L: int, S: int, causal: bool, bottom_right: bool = False) -> int:
    """Number of (query, key) pairs actually attended: L*S, or the causal triangle."""
    if not causal:
        return L * S
    offset = S - L if bottom_right else 0
    # query i sees keys 0 .. min(S-1, i + offset)
    return sum(max(0, min(S, i + offset + 1)) for i in range(L))


def attention_flops(B: int, H: int, L: int, S: int, E: int, Ev: Optional[int] = None, causal: bool = False,
                    mode: str = "fwd") -> float:
    """FLOPs of attention: forward 2·B·H·pairs·(E + Ev) (= 4·B·H·L·S·E, halved when
    causal); backward 2.5× forward; ``mode`` in fwd / bwd / fwd_bwd."""
    Ev = E if Ev is None else Ev
    fwd = 2.0 * B * H * attention_pairs(L, S, causal) * (E + Ev)
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd_bwd": 3.5 * fwd}[mode]


# ----------------------------------------------------------------------------- ceilings

def matmul_ceiling(device: str, dtype: torch.dtype, quick: bool = False) -> float:
    """Measured matmul FLOP/s of this machine in ``dtype`` (the roofline's compute roof)."""
    if device == "cuda":
        n = 8192 if not quick else 4096
    else:  # bf16 matmul without avx512_bf16 runs at ~1 GFLOP/s: keep its probe small
        n = (1024 if dtype == torch.float32 else 512) if not quick else 256
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = time_fn(lambda: torch.mm(a, b), device, quick=quick)
    return 2.0 * n**3 / t


def copy_bandwidth(device: str, quick: bool = False) -> float:
    """Measured copy bandwidth in bytes/s (read + write counted), the memory roof."""
    numel = (1 << 28 if not quick else 1 << 24) if device == "cuda" else (1 << 25 if not quick else 1 << 22)
    src = torch.empty(numel, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, quick=quick)
    return 2.0 * src.numel() * src.element_size() / t


def ceilings(device: str, quick: bool = False) -> Dict[str, float]:
    """The ceilings the README and reports compare against, measured in this run."""
    out = {"copy_GBps": copy_bandwidth(device, quick) / 1e9}
    dtypes = [torch.bfloat16, torch.float16] if device == "cuda" else [torch.float32, torch.bfloat16]
    for dt in dtypes:
        out[f"matmul_{str(dt).split('.')[-1]}_TFLOPs"] = matmul_ceiling(device, dt, quick) / 1e12
    return out


# ----------------------------------------------------------------------------- results

def results_dir(env: Dict[str, object]) -> Path:
    root = os.environ.get("FASTFORMER_RESULTS_DIR")
    base = Path(root) if root else BENCH_DIR / "results"
    path = base / device_slug(env)
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_results(topic: str, payload: Dict[str, object], env: Dict[str, object]) -> Path:
    """Write ``{"environment": env, **payload}`` to ``<results>/<device-slug>/<topic>.json``.

    ``payload["results"]`` must be a list of flat row dicts, each with a ``"provider"``
    (who ran it) and metrics such as ``time_ms``, ``tflops``/``gbps``,
    ``speedup_vs_best_peer`` + ``best_peer``; bench/report.py and bench/gpu.sh's
    summary read that shape (a skipped run writes ``"results": []`` and ``"skipped"``).
    """
    rows = payload.get("results")
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "provider" in r for r in rows):
        raise ValueError(
            f"write_results({topic!r}): payload['results'] must be a list of row dicts with a 'provider' key "
            f"(got keys {sorted(payload)}); see bench/common.py:write_results"
        )
    path = results_dir(env) / f"{topic}.json"
    with open(path, "w") as f:
        json.dump({"topic": topic, "environment": env, **payload}, f, indent=1, default=str)
        f.write("\n")
    return path


def exact_cpu_memory_accounting() -> None:
    """Re-exec the process with glibc's mmap threshold pinned at 64 KiB, so every
    tensor larger than that is mmap'ed and returned to the OS when freed: then the
    resident-set high-water mark that :func:`peak_memory` reads tracks the real peak
    (glibc otherwise raises the threshold up to 32 MiB and reuses its heap)."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None and sys.platform.startswith("linux"):
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        os.execv(sys.executable, [sys.executable] + sys.argv)


def pick_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but no CUDA GPU is available")
    return requested
