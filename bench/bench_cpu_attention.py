"""The "cpu" attention backend against torch's CPU SDPA and naive attention.

For each configuration (dtype, head dim, sequence length, causal or not,
forward or forward+backward; B·H = 8, 4 at L = 4096) it times ours, torch's
SDPA and ``auto`` in interleaved runs (ours, torch, auto, ours, …) and reports
the median per-round ratios to torch (``speedup_vs_torch``,
``auto_speedup_vs_torch``) and ``auto``'s choice, times naive attention, and
gives GFLOP/s, the fraction of the matmul ceiling of the dtype measured in the
same run, and peak memory. The JSON records the CPU flags and which kernel
variant ran (``isa``); ``bench/cpu_policy.py`` derives ``auto``'s table from it.

    python bench/bench_cpu_attention.py                  # the full set (long on 2 cores)
    python bench/bench_cpu_attention.py --quick          # CI smoke: seconds
    python bench/bench_cpu_attention.py --dtype bfloat16 --seqlens 1024 2048 --modes fwd
    python bench/bench_cpu_attention.py --device cuda    # (gpu.sh) the GPU host's CPU, short set

Writes ``bench/results/<cpu-slug>/cpu_attention[-quick].json``.

An AVX2 machine, emulated on a newer one (the policy's ``avx2`` rows when no AVX2
machine is at hand): hold our kernels, torch's and its GEMM libraries to AVX2 alike,

    FASTFORMER_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
        ONEDNN_MAX_CPU_ISA=AVX2 python bench/bench_cpu_attention.py

which writes ``bench/results/cpu-<model>-avx2-emulated/``. Forcing our variant alone is
refused: torch would keep its AVX-512 kernels and the ratios would mean nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import fastformer  # noqa: E402

HEADS = 8  # B·H = 8 (B = 1)

# The settings that hold torch (ATen's kernels, MKL, oneDNN) to the instruction set our
# kernels are forced to with FASTFORMER_CPU_ISA; only AVX2 is known to all three.
EMULATION_ENV = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                          "ONEDNN_MAX_CPU_ISA": "AVX2"}}


def emulated_isa() -> str | None:
    """The variant this run emulates (FASTFORMER_CPU_ISA), or None for the machine's own.
    Raises SystemExit when torch is not held to the same instruction set."""
    forced = os.environ.get("FASTFORMER_CPU_ISA")
    if not forced:
        return None
    need = EMULATION_ENV.get(forced)
    if need is None:
        raise SystemExit(f"FASTFORMER_CPU_ISA={forced}: torch cannot be held to that variant too; "
                         f"emulation supports {sorted(EMULATION_ENV)}")
    wrong = {k: v for k, v in need.items() if os.environ.get(k, "").lower() != v.lower()}
    if wrong or torch.backends.cpu.get_cpu_capability().lower() != forced:
        raise SystemExit(f"FASTFORMER_CPU_ISA={forced} also needs torch held to it: set "
                         + " ".join(f"{k}={v}" for k, v in need.items()))
    return forced


@dataclass(frozen=True)
class Config:
    dtype: str
    head_dim: int
    seqlen: int
    causal: bool
    mode: str  # fwd | fwd_bwd

    def label(self) -> str:
        return f"{self.mode:7s} {self.dtype:8s} d{self.head_dim:<3d} L{self.seqlen:<5d} {'causal' if self.causal else 'full'}"


def configs(args) -> List[Config]:
    return [
        Config(dt, d, L, c, m)
        for m in args.modes
        for dt in args.dtype
        for d in args.head_dims
        for L in args.seqlens
        for c in (False, True)
    ]


def _step(fn, q, k, v, causal: bool, mode: str, dout):
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fn(q, k, v, causal)
    else:
        def run():
            out = fn(q, k, v, causal)
            return torch.autograd.grad(out, (q, k, v), dout)
    return run


def ours(q, k, v, causal):
    return fastformer.scaled_dot_product_attention(q, k, v, is_causal=causal, backend="cpu")


def torch_sdpa(q, k, v, causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def auto(q, k, v, causal):
    return fastformer.scaled_dot_product_attention(q, k, v, is_causal=causal)


def auto_choice(q, k, v, causal: bool, mode: str) -> str:
    """The backend ``auto`` runs for this configuration (fwd: under no_grad, as timed)."""
    from fastformer.ops.attention.problem import validate_attention_inputs
    from fastformer.ops.attention.registry import select_backend

    with torch.set_grad_enabled(mode != "fwd"):
        return select_backend(validate_attention_inputs(q, k, v, is_causal=causal)).name


def interleaved(fns, rounds: int, quick: bool):
    """Time ``fns`` interleaved (f0, f1, f2, f0, f1, f2, ...): median time of each and
    the median per-round ratio of each to ``fns[1]`` (torch) — robust on a loaded machine."""
    times = [[] for _ in fns]
    ratios = [[] for _ in fns]
    for _ in range(max(1, 2 if quick else rounds)):
        t = [common.time_fn(f, "cpu", quick=True) for f in fns]
        for i, x in enumerate(t):
            times[i].append(x)
            ratios[i].append(t[1] / x)
    med = __import__("statistics").median
    return [med(x) for x in times], [med(r) for r in ratios]


def naive(q, k, v, causal):
    return fastformer.scaled_dot_product_attention(q, k, v, is_causal=causal, backend="naive")


def measure(cfg: Config, ceiling_flops: float, fp32_ceiling_flops: float, args) -> dict:
    dtype = getattr(torch, cfg.dtype)
    shape = (1, HEADS if cfg.seqlen < 4096 else HEADS // 2, cfg.seqlen, cfg.head_dim)
    grad = cfg.mode != "fwd"
    q, k, v = (torch.randn(shape, dtype=dtype, requires_grad=grad) for _ in range(3))
    dout = torch.randn(shape, dtype=dtype)
    flops = common.attention_flops(1, shape[1], cfg.seqlen, cfg.seqlen, cfg.head_dim, causal=cfg.causal, mode=cfg.mode)
    a = _step(ours, q, k, v, cfg.causal, cfg.mode, dout)
    b = _step(torch_sdpa, q, k, v, cfg.causal, cfg.mode, dout)
    rounds = args.rounds if cfg.seqlen < 4096 else max(3, args.rounds // 2)
    c = _step(auto, q, k, v, cfg.causal, cfg.mode, dout)
    (t_ours, t_torch, t_auto), (speedup, _, auto_speed) = interleaved((a, b, c), rounds, args.quick)
    row = {**asdict(cfg), "batch": 1, "heads": shape[1], "flops": flops}
    row["ours_ms"], row["torch_ms"], row["auto_ms"] = t_ours * 1e3, t_torch * 1e3, t_auto * 1e3
    row["speedup_vs_torch"] = speedup  # median of per-round torch/ours
    row["auto_choice"] = auto_choice(q, k, v, cfg.causal, cfg.mode)
    row["auto_speedup_vs_torch"] = auto_speed  # median of per-round torch/auto (target >= 0.98)
    row["ours_gflops"], row["torch_gflops"] = flops / t_ours / 1e9, flops / t_torch / 1e9
    row["ours_frac_ceiling"] = flops / t_ours / ceiling_flops
    row["torch_frac_ceiling"] = flops / t_torch / ceiling_flops
    row["ours_frac_fp32_ceiling"] = flops / t_ours / fp32_ceiling_flops
    row["ours_peak_bytes"] = common.peak_memory(a, "cpu")
    row["torch_peak_bytes"] = common.peak_memory(b, "cpu")
    if cfg.seqlen <= args.naive_max_len:
        c = _step(naive, q, k, v, cfg.causal, cfg.mode, dout)
        c()
        row["naive_peak_bytes"] = common.peak_memory(c, "cpu")
        t = common.time_fn(c, "cpu", quick=True)
        row["naive_ms"] = t * 1e3
        row["naive_gflops"] = flops / t / 1e9
        row["speedup_vs_naive"] = t / t_ours
    with torch.no_grad():  # accuracy of the measured kernel, vs float64
        ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=cfg.causal)
        row["ours_max_error"] = (ours(q, k, v, cfg.causal).double() - ref).abs().max().item()
        row["torch_max_error"] = (torch_sdpa(q, k, v, cfg.causal).double() - ref).abs().max().item()
    return row


def matmul_ceilings(quick: bool) -> dict:
    """This run's fp32 and bf16 matmul rates (TFLOP/s). Sizes are kept moderate:
    without avx512_bf16, torch's bf16 matmul runs at well under 1 GFLOP/s."""
    out = {}
    for dt, n in ((torch.float32, 256 if quick else 1024), (torch.bfloat16, 256 if quick else 768)):
        a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
        t = common.time_cpu(lambda: torch.mm(a, b), warmup=1, min_reps=3, min_time_s=0.0)
        out[f"matmul_{str(dt).split('.')[-1]}_TFLOPs"] = 2.0 * n**3 / t / 1e12
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"],
                   help="CPU only; 'cuda' runs nothing (the suite passes it on GPU machines)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--head-dims", nargs="+", type=int, default=[64, 128])
    p.add_argument("--seqlens", nargs="+", type=int, default=[256, 512, 1024, 2048, 4096])
    p.add_argument("--modes", nargs="+", default=["fwd", "fwd_bwd"], choices=["fwd", "fwd_bwd"])
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds per configuration")
    p.add_argument("--naive-max-len", type=int, default=1024, help="skip naive above this length (L² memory)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--tag", default="", help="suffix of the results file name")
    args = p.parse_args(argv)
    if args.device == "cuda":
        # bench/gpu.sh: measure the GPU host's processor (often AVX-512, maybe avx512_bf16,
        # which this project's own machines may lack) on a short set, 2 threads as the issue.
        args.head_dims, args.seqlens, args.rounds, args.threads = [64], [2048], 5, 2
        args.tag = args.tag or "gpu-host"
    common.steady_cpu_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not fastformer.backends()["cpu"]["available"]:
        print(f"cpu backend unavailable: {fastformer.backends()['cpu']['reason']}")
        return 1
    if args.quick:
        args.dtype, args.head_dims, args.seqlens, args.modes, args.rounds = ["float32", "bfloat16"], [64], [256], \
            ["fwd", "fwd_bwd"], 2
    from fastformer.ops.attention.cpu import isa

    emulated = emulated_isa()
    env = common.environment("cpu")
    env["isa"] = isa()
    if emulated:  # results go to cpu-<model>-<isa>-emulated/ (common.device_slug)
        env["emulated_isa"] = emulated
        env["emulation_env"] = {k: os.environ[k] for k in ("FASTFORMER_CPU_ISA", *EMULATION_ENV[emulated])}
        env["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    env["load_average"] = list(os.getloadavg())  # shared machines: say how busy it was
    env["cpu_features_detected"] = list(fastformer._ext.C.cpu_features())
    ceilings = matmul_ceilings(args.quick)
    print(f"{env['device']} flags={env['cpu_flags']} isa={env['isa']} ceilings={ceilings}", flush=True)
    rows = []
    for cfg in configs(args):
        ceiling = ceilings[f"matmul_{cfg.dtype}_TFLOPs"] * 1e12
        row = measure(cfg, ceiling, ceilings["matmul_float32_TFLOPs"] * 1e12, args)
        rows.append(row)
        naive_s = f" naive {row['naive_gflops']:6.1f} (x{row['speedup_vs_naive']:.2f})" if "naive_ms" in row else ""
        print(f"{cfg.label()}: ours {row['ours_gflops']:6.1f} GFLOP/s ({row['ours_frac_ceiling']:.0%} of ceiling) "
              f"torch {row['torch_gflops']:6.1f} -> x{row['speedup_vs_torch']:.2f} "
              f"auto={row['auto_choice']} x{row['auto_speedup_vs_torch']:.2f}{naive_s} "
              f"peak {row['ours_peak_bytes'] or 0:.2e}/{row['torch_peak_bytes'] or 0:.2e} B", flush=True)
    topic = "cpu_attention" + ("-quick" if args.quick else "") + (f"-{args.tag}" if args.tag else "")
    path = common.write_results(topic, {"args": vars(args), "ceilings": ceilings, "results": [
        {"provider": "ff-cpu", "time_ms": r["ours_ms"], "speedup_vs_best_peer": r["speedup_vs_torch"],
         "best_peer": "torch-sdpa", **r} for r in rows]}, env)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
