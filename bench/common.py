"""Shared benchmark helpers: environment record, timing, FLOP counting, peak
memory, machine ceilings and JSON results.

Every result file carries the environment it was measured in (device, driver,
torch/triton/CUDA versions, commit, date, CPU flags), so a number in the
README can always be traced to the run that produced it.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

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
    """A folder name for results: the GPU name, 'cpu-<model>-<isa>', or for a run that held
    every library to an older instruction set (bench_cpu_attention's emulation),
    'cpu-<model>-<that isa>-emulated'."""
    if str(env["device"]).startswith("CPU"):
        isa = "avx512" if "avx512f" in env["cpu_flags"] else ("avx2" if "avx2" in env["cpu_flags"] else "base")
        name = f"cpu-{env['cpu']}-{env['emulated_isa']}-emulated" if env.get("emulated_isa") else f"cpu-{env['cpu']}-{isa}"
    else:
        name = str(env["device"])
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# ----------------------------------------------------------------------------- timing

def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@dataclass(frozen=True)
class Timing:
    """Repeated measurements of one callable: the median and how much the repeats disagree."""

    median_s: float
    spread: float  # (q3 - q1) / median of the repeats: 0.1 = the middle half lies within 10 % of the median
    reps: int


def _timing(times: List[float]) -> Timing:
    med = statistics.median(times)
    if len(times) >= 4:
        q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    else:
        q1, q3 = min(times), max(times)
    return Timing(med, (q3 - q1) / med if med > 0 else 0.0, len(times))


def _cpu_samples(fn: Callable[[], object], warmup: int, min_reps: int, min_time_s: float) -> List[float]:
    for _ in range(warmup):
        fn()
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < min_time_s and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def time_cpu(fn: Callable[[], object], warmup: int = 2, min_reps: int = 5, min_time_s: float = 0.3) -> float:
    """Median wall time of ``fn`` in seconds, after warm-up (CPU)."""
    return statistics.median(_cpu_samples(fn, warmup, min_reps, min_time_s))


def time_gpu(fn: Callable[[], object], warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median time of ``fn`` in seconds on the GPU (``triton.testing.do_bench``, L2 flushed)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median") / 1e3


def time_stats(fn: Callable[[], object], device: str, quick: bool = False) -> Timing:
    """Median and spread of ``fn``'s repeats (GPU: do_bench's samples; CPU: at least
    5 repeats, and 0.3 s of them in full runs, 0.05 s in quick ones)."""
    if device == "cuda":
        import triton.testing

        times = triton.testing.do_bench(fn, warmup=25, rep=30 if quick else 100, return_mode="all")
        return _timing([t / 1e3 for t in times])
    return _timing(_cpu_samples(fn, warmup=1 if quick else 2, min_reps=5, min_time_s=0.05 if quick else 0.3))


def time_fn(fn: Callable[[], object], device: str, quick: bool = False) -> float:
    """Median time of ``fn`` in seconds (quick: as few repeats as possible; see
    :func:`time_stats` for the spread as well)."""
    if device == "cuda":
        return time_gpu(fn, rep_ms=30 if quick else 100)
    return time_cpu(fn, warmup=1 if quick else 2, min_reps=2 if quick else 5, min_time_s=0.0 if quick else 0.3)


def machine_noise(device: str, quick: bool = False) -> float:
    """How much repeats of a fixed small workload disagree on this machine right now
    (relative interquartile range, as :attr:`Timing.spread`): the yardstick for
    :func:`is_noisy`. A loaded machine shows 0.1-0.5; a quiet one under 0.05."""
    a = torch.randn(256, 256, device=device)
    b = torch.randn(256, 256, device=device)
    if device == "cuda":
        return time_stats(lambda: torch.mm(a, b), device, quick).spread
    return _timing(_cpu_samples(lambda: torch.mm(a, b), warmup=3, min_reps=20,
                                min_time_s=0.1 if quick else 0.3)).spread


def is_noisy(spread: float, noise: float) -> bool:
    """A measurement whose repeats disagree clearly more than the machine's noise
    (more than twice it, and more than 10 %): its median is not to be trusted."""
    return spread > max(2.0 * noise, 0.10)


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

    GPU: torch's allocator statistics. CPU (Linux, glibc): the process's resident-set
    high-water mark, reset through /proc/self/clear_refs, with large allocations
    mmap'ed while ``fn`` runs (see the body); None elsewhere.
    """
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    libc = _libc()
    if libc is None:
        return None
    # Every allocation above 64 KiB mapped afresh and returned to the OS when freed, and
    # the heap's free pages released (malloc_trim), so reused memory faults in again: the
    # resident-set high-water mark then counts what fn really allocates.
    libc.mallopt(_M_MMAP_THRESHOLD, 64 << 10)
    libc.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _proc_status_bytes("VmRSS")
        fn()
        peak = _proc_status_bytes("VmHWM")
    except OSError:
        return None
    finally:
        steady_cpu_allocator()
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

CEILING_ROUNDS = 3


def _roof(fn: Callable[[], object], work: float, device: str) -> Tuple[float, float]:
    """(best rate, spread) of ``fn`` over CEILING_ROUNDS full-length rounds: a roof is what the
    machine can do, so the best round counts; spread = (best - worst) / best tells how stable it was."""
    fn()
    rates = [work / time_stats(fn, device).median_s for _ in range(CEILING_ROUNDS)]
    best = max(rates)
    return best, (best - min(rates)) / best


def matmul_ceiling(device: str, dtype: torch.dtype) -> Tuple[float, float]:
    """Measured matmul FLOP/s of this machine in ``dtype`` (the roofline's compute roof), and its spread."""
    if device == "cuda":
        n = 8192
    else:  # bf16 matmul without avx512_bf16 runs at ~1 GFLOP/s: keep its probe small
        n = 1024 if dtype == torch.float32 else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return _roof(lambda: torch.mm(a, b), 2.0 * n**3, device)


def copy_bandwidth(device: str) -> Tuple[float, float]:
    """Measured copy bandwidth in bytes/s (read + write counted), the memory roof, and its spread."""
    numel = 1 << 28 if device == "cuda" else 1 << 25
    src = torch.empty(numel, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    return _roof(lambda: dst.copy_(src), 2.0 * src.numel() * src.element_size(), device)


def measure_ceilings(device: str, quick: bool = False) -> Tuple[Dict[str, float], Dict[str, float]]:
    """(ceilings, spreads): the machine roofs the README and reports compare against, measured
    in this run, each the best of CEILING_ROUNDS rounds of at least 0.3 s, with how far the
    rounds disagreed. Quick runs measure none (empty dicts): a probe short enough for a quick
    run is noise on a shared machine (two quick runs once gave 101 and 2.5 GFLOP/s)."""
    if quick:
        return {}, {}
    values, spreads = {}, {}
    values["copy_GBps"], spreads["copy_GBps"] = copy_bandwidth(device)
    values["copy_GBps"] /= 1e9
    dtypes = [torch.bfloat16, torch.float16] if device == "cuda" else [torch.float32, torch.bfloat16]
    for dt in dtypes:
        key = f"matmul_{str(dt).split('.')[-1]}_TFLOPs"
        values[key], spreads[key] = matmul_ceiling(device, dt)
        values[key] /= 1e12
    return values, spreads


def ceilings(device: str, quick: bool = False) -> Dict[str, float]:
    """The measured ceilings (see :func:`measure_ceilings`); empty in quick runs."""
    return measure_ceilings(device, quick)[0]


def describe_ceilings(values: Dict[str, float], spreads: Dict[str, float], noise: float) -> str:
    """One line for a benchmark's header."""
    if not values:
        return "# ceilings: measured in full runs only (a quick probe is too short to be stable)"
    parts = []
    for k, v in values.items():
        sp = spreads.get(k, 0.0)
        parts.append(f"{k} {v:.4g} (rounds within {sp:.0%}{', UNSTABLE' if is_noisy(sp, noise) else ''})")
    return "# measured ceilings (best of %d rounds): %s" % (CEILING_ROUNDS, ", ".join(parts))


def describe_noise(noise: float) -> str:
    return (f"# machine noise: repeats of a fixed 256x256 matmul spread {noise:.0%} (interquartile range / median); "
            f"rows marked NOISY spread more than {max(2 * noise, 0.10):.0%}")


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


def where_results_went(path: Path) -> str:
    """The closing line of a benchmark run: where its JSON went, and what git thinks of it."""
    path = Path(path).resolve()
    try:
        shown = path.relative_to(REPO_DIR)
    except ValueError:
        return f"results in {path}"
    ignored = subprocess.run(["git", "check-ignore", "-q", str(shown)], cwd=REPO_DIR, capture_output=True)
    if ignored.returncode == 0:
        return f"results in {shown} (a quick run's file, ignored by git)"
    if not _run(["git", "ls-files", str(shown.parent)]):
        return (f"results in {shown} (a device with no committed results yet: `git add {shown.parent}` "
                f"to publish them with the README's others)")
    return f"results in {shown}"


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_STEADY_MMAP_THRESHOLD = 32 << 20  # the ceiling of glibc's dynamic mmap threshold (64-bit)


@functools.lru_cache(maxsize=None)
def _libc():
    """glibc through ctypes (None elsewhere): loaded once."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def steady_cpu_allocator() -> None:
    """Time CPU code as a long-running program sees glibc's allocator: with the mmap
    threshold where its dynamic adjustment ends up after the first large frees (32 MiB),
    freed buffers below it are reused from the heap instead of being mapped and faulted
    in afresh on every call. :func:`peak_memory` lowers the threshold only while it
    measures. (Running a whole benchmark with ``MALLOC_MMAP_THRESHOLD_=65536``, as this
    harness once did, slowed a 1 ms attention call by 60 % and torch's by 30 %.)"""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, _STEADY_MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, 2 * _STEADY_MMAP_THRESHOLD)


def cpu_benchmark_args(script: str, doc: str, rounds: int, argv=None):
    """The command line of a CPU-only benchmark (``bench_cpu_linear.py``, ``bench_cpu_activation.py``):
    ``--device`` (what ``bench/suite.py`` passes: anything but the CPU runs nothing), ``--quick``,
    ``--rounds`` (default ``rounds``). Returns the parsed arguments, or None, after saying so,
    when ``--device`` is not the CPU."""
    import argparse

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"],
                   help="CPU only: other devices are skipped (for bench/suite.py)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, default=rounds)
    args = p.parse_args(argv)
    if pick_device(args.device) != "cpu":
        print(f"{script}: a CPU benchmark; nothing to run for --device", args.device)
        return None
    return args


def pick_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but no CUDA GPU is available")
    return requested
