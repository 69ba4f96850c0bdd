"""Fused softmax, LayerNorm and feed-forward kernels vs their peers, forward + backward.

    python bench/bench_kernels.py --device cuda          # the GPU set (bench/gpu.sh via suite.py)
    python bench/bench_kernels.py --device cpu --quick   # CI smoke

Providers per kernel: ``ff`` (fastformer's op with backend="auto": Triton on
CUDA, the torch path on CPU), ``ff-cuda`` (the C++/CUDA softmax twin, when
built), ``torch-eager`` (the same math in eager torch), ``torch-compile``
(torch.compile of that eager code) and ``liger`` (Liger-Kernel, when
importable). Softmax and LayerNorm report GB/s of compulsory traffic
(forward reads x and writes y, backward reads y or x and dy and writes dx:
5 tensor passes) against the measured copy bandwidth; the feed-forward block
reports TFLOP/s (12·M·d·h for forward + backward of both GEMMs) against the
measured matmul ceiling. Results: bench/results/<device>/kernels[-quick].json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

sys.path.insert(0, str(common.REPO_DIR))
from fastformer import ops  # noqa: E402


# ----------------------------------------------------------------------------- eager peers (also what torch.compile gets)

def eager_softmax(x):
    return torch.softmax(x * 0.125, -1)


def eager_layer_norm(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)


def eager_ffn(x, w1, b1, w2, b2):
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


def eager_swiglu(x, w1, b1, w2, b2):
    a, g = F.linear(x, w1, b1).chunk(2, -1)
    return F.linear(F.silu(a) * g, w2, b2)


def _liger():
    """Liger-Kernel's functions where they exist, else {} (it is optional)."""
    found = {}
    try:
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction

        found["layer_norm"] = lambda x, w, b: LigerLayerNormFunction.apply(x, w, b, 1e-5)
    except Exception:
        pass
    try:
        from liger_kernel.ops.softmax import LigerSoftmaxFunction

        found["softmax"] = lambda x: LigerSoftmaxFunction.apply(x * 0.125)
    except Exception:
        pass
    try:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        def swiglu(x, w1, b1, w2, b2):
            a, g = F.linear(x, w1, b1).chunk(2, -1)
            return F.linear(LigerSiLUMulFunction.apply(a, g), w2, b2)

        found["swiglu"] = swiglu
    except Exception:
        pass
    return found


_COMPILED: Dict[str, Callable] = {}


def providers(kernel: str, device: str, quick: bool) -> Dict[str, Callable]:
    eager = {"softmax": eager_softmax, "layer_norm": eager_layer_norm, "ffn": eager_ffn, "swiglu": eager_swiglu}[kernel]
    # "ff" is the Triton kernel itself on CUDA ("auto" may hand a shape to torch: ops.kernel_backend)
    be = "triton" if device == "cuda" else "auto"
    ours = {
        "softmax": lambda x: ops.softmax(x, scale=0.125, backend=be),
        "layer_norm": lambda x, w, b: ops.layer_norm(x, (x.shape[-1],), w, b, 1e-5, backend=be),
        "ffn": lambda x, w1, b1, w2, b2: ops.feed_forward(x, w1, b1, w2, b2, "gelu", backend=be),
        "swiglu": lambda x, w1, b1, w2, b2: ops.feed_forward(x, w1, b1, w2, b2, "silu", gated=True, backend=be),
    }[kernel]
    out = {"ff": ours, "torch-eager": eager}
    if kernel == "softmax" and device == "cuda":
        try:
            from fastformer.ops.softmax import _cuda_twin_unavailable

            if _cuda_twin_unavailable() is None:
                out["ff-cuda"] = lambda x: ops.softmax(x, scale=0.125, backend="cuda")
        except Exception:
            pass
    if not (quick and device == "cpu"):  # Inductor's C++ build costs minutes in a CI smoke run
        # One compiled function per kernel for the whole run: after the second shape
        # dynamo switches to dynamic shapes instead of recompiling for every config.
        out["torch-compile"] = _COMPILED.setdefault(kernel, torch.compile(eager))
    liger = _liger().get(kernel)
    if liger is not None and device == "cuda":
        out["liger"] = liger
    return out


# ----------------------------------------------------------------------------- configurations

def configs(device: str, quick: bool) -> List[dict]:
    if device == "cuda":
        rows_n = [(16384, 768), (65536, 1024), (16384, 4096), (16384, 8192)]
        ffn = [(8192, 768), (32768, 768), (32768, 1024)]
        if quick:
            rows_n, ffn = rows_n[:1], ffn[:1]
        dtype = torch.bfloat16
    else:
        rows_n = [(256, 768)] if quick else [(2048, 768), (1024, 4096)]
        ffn = [(128, 256)] if quick else [(1024, 768)]
        dtype = torch.float32
    out = [{"kernel": k, "rows": r, "n": n, "dtype": dtype} for k in ("softmax", "layer_norm") for r, n in rows_n]
    out += [{"kernel": "ffn", "rows": m, "n": d, "hidden": 4 * d, "dtype": dtype} for m, d in ffn]
    if not quick or device == "cuda":
        m, d = ffn[-1]
        out.append({"kernel": "swiglu", "rows": m, "n": d, "hidden": (8 * d // 3 + 63) // 64 * 64, "dtype": dtype})
    return out


def make_inputs(cfg: dict, device: str):
    dt, R, N = cfg["dtype"], cfg["rows"], cfg["n"]
    x = torch.randn(R, N, device=device, dtype=dt, requires_grad=True)
    if cfg["kernel"] == "softmax":
        return [x]
    if cfg["kernel"] == "layer_norm":
        return [x, torch.randn(N, device=device, dtype=dt, requires_grad=True),
                torch.randn(N, device=device, dtype=dt, requires_grad=True)]
    H = cfg["hidden"]
    H1 = 2 * H if cfg["kernel"] == "swiglu" else H
    mk = lambda *s: (torch.randn(*s, device=device, dtype=dt) / s[-1] ** 0.5).requires_grad_()  # noqa: E731
    return [x, mk(H1, N), mk(H1), mk(N, H), mk(N)]


def work(cfg: dict) -> Dict[str, float]:
    R, N = cfg["rows"], cfg["n"]
    if cfg["kernel"] in ("softmax", "layer_norm"):
        return {"bytes": 5.0 * R * N * torch.finfo(cfg["dtype"]).bits / 8}
    H = cfg["hidden"]
    gemm = 2.0 * R * N * H
    first = 2 * gemm if cfg["kernel"] == "swiglu" else gemm
    return {"flops": 3.0 * (first + gemm)}  # forward + backward (2x) of both GEMMs


# ----------------------------------------------------------------------------- measurement

def measure(cfg: dict, name: str, fn: Callable, inputs, device: str, quick: bool, ref) -> dict:
    row = {"provider": name, "kernel": cfg["kernel"], "rows": cfg["rows"], "n": cfg["n"],
           "hidden": cfg.get("hidden"), "dtype": str(cfg["dtype"]).split(".")[-1], "mode": "fwd_bwd"}
    try:
        out = fn(*inputs)
        g = torch.randn_like(out)
        row["max_error"] = (out.detach().double() - ref).abs().max().item() if ref is not None else None

        def step():
            y = fn(*inputs)
            torch.autograd.grad(y, inputs, g)

        t = common.time_fn(step, device, quick=quick)
        row["time_ms"] = t * 1e3
        w = work(cfg)
        if "bytes" in w:
            row["gbps"] = w["bytes"] / t / 1e9
        else:
            row["tflops"] = w["flops"] / t / 1e12
    except Exception as exc:  # one provider failing must not sink the rest
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return row


def add_ratios(group: List[dict], ceil: Dict[str, float], dtype_name: str) -> None:
    ok = [r for r in group if "time_ms" in r]
    peers = [r for r in ok if r["provider"] in ("torch-eager", "torch-compile", "liger")]
    best = min(peers, key=lambda r: r["time_ms"]) if peers else None
    for r in ok:
        if best is not None:
            r["best_peer"] = best["provider"]
            r["speedup_vs_best_peer"] = best["time_ms"] / r["time_ms"]
        for peer in peers:
            r[f"speedup_vs_{peer['provider']}"] = peer["time_ms"] / r["time_ms"]
        if "gbps" in r and ceil.get("copy_GBps"):  # no ceilings in quick runs
            r["fraction_of_copy_bw"] = r["gbps"] / ceil["copy_GBps"]
        mm = ceil.get(f"matmul_{dtype_name}_TFLOPs")
        if "tflops" in r and mm:
            r["fraction_of_matmul"] = r["tflops"] / mm


def format_row(r: dict) -> str:
    if "error" in r:
        return f"  {r['provider']:<14} {r['error']}"
    if "gbps" in r:
        rate = f"{r['gbps']:8.1f} GB/s" + (f" ({r['fraction_of_copy_bw']:.0%} of copy)" if "fraction_of_copy_bw" in r else "")
    else:
        rate = f"{r['tflops']:8.2f} TFLOP/s" + (f" ({r['fraction_of_matmul']:.0%} of matmul)" if "fraction_of_matmul" in r else "")
    vs = "  ".join(f"x{r[k]:.2f} vs {k[len('speedup_vs_'):]}" for k in r
                   if k.startswith("speedup_vs_") and k != "speedup_vs_best_peer")
    err = f"err {r['max_error']:.1e}" if r.get("max_error") is not None else ""
    return f"  {r['provider']:<14} {r['time_ms']:9.3f} ms {rate}  {vs} {err}"


def run(device: str, quick: bool) -> dict:
    env = common.environment(device)
    print(f"# kernels benchmark on {env['device']} (torch {env['torch']}, triton {env['triton']}, "
          f"flags {','.join(env['cpu_flags'])})", flush=True)
    noise = common.machine_noise(device, quick)
    ceil, spreads = common.measure_ceilings(device, quick=quick)
    print(common.describe_ceilings(ceil, spreads, noise), flush=True)
    rows: List[dict] = []
    cfgs = configs(device, quick)
    for i, cfg in enumerate(cfgs):
        print(f"[{i + 1}/{len(cfgs)}] {cfg['kernel']} rows={cfg['rows']} n={cfg['n']} hidden={cfg.get('hidden')} "
              f"{cfg['dtype']} fwd+bwd", flush=True)
        inputs = make_inputs(cfg, device)
        eager = providers(cfg["kernel"], device, quick)["torch-eager"]
        with torch.no_grad():
            ref = eager(*[t.detach().double() for t in inputs]) if cfg["kernel"] in ("softmax", "layer_norm") else None
        group = [measure(cfg, name, fn, inputs, device, quick, ref)
                 for name, fn in providers(cfg["kernel"], device, quick).items()]
        add_ratios(group, ceil, str(cfg["dtype"]).split(".")[-1])
        for r in group:
            print(format_row(r), flush=True)
        rows.extend(group)
        del inputs, ref
        if device == "cuda":
            torch.cuda.empty_cache()
    payload = {"ceilings": ceil, "ceilings_spread": spreads, "results": rows}
    path = common.write_results("kernels-quick" if quick else "kernels", payload, env)
    print(f"# wrote {path}")
    return payload


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="tiny set for CI smoke")
    args = p.parse_args(argv)
    run(common.pick_device(args.device), args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
