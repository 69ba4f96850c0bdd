"""The hand-written CUDA kernels (csrc/cuda) against torch on a GPU.

* Flash attention, bf16, head dims 64 and 128, L = 1k…16k (batch · L = 16k
  tokens, 2048 model width), causal and not: forward and backward time and
  TFLOP/s of ``backend="cuda"`` vs torch's SDPA with the flash backend forced,
  as paired, interleaved ratios (goal: ≥ 1.0× forward, ≥ 0.8× backward).
* Fused softmax forward and backward, bf16, rows 1k…32k wide: achieved GB/s
  against the copy bandwidth measured in the same run (goal: ≥ 80%), and torch's
  softmax for reference.

    python bench/bench_cuda_kernels.py --device cuda [--quick]

On a machine without a GPU (or without the CUDA build of fastformer._C) it
writes a results file saying why and exits 0, so the suite's CPU dry run passes.
Results: bench/results/<device>/cuda_kernels[-quick].json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import fastformer  # noqa: E402


def _unavailable(device: str) -> str:
    if device != "cuda":
        return "the CUDA kernels need a CUDA device (run with --device cuda on a GPU machine)"
    from fastformer.ops.cuda_device import cuda_extension_unavailable

    return cuda_extension_unavailable() or ""


def _torch_flash(q, k, v, causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def bench_attention(quick: bool) -> List[Dict[str, object]]:
    rows = []
    lengths = (1024, 4096) if quick else (1024, 2048, 4096, 8192, 16384)
    for E in (64, 128):
        for L in lengths:
            for causal in (False, True):
                B, H = max(1, 16384 // L), 2048 // E
                q, k, v = (torch.randn(B, H, L, E, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                           for _ in range(3))
                dout = torch.randn(B, H, L, E, device="cuda", dtype=torch.bfloat16)
                ours = lambda: fastformer.attention(q, k, v, is_causal=causal, backend="cuda")  # noqa: E731
                theirs = lambda: _torch_flash(q, k, v, causal)  # noqa: E731
                out_ours, out_theirs = ours(), theirs()

                def bwd(out):
                    return lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)

                fwd = common.paired_ratio(ours, theirs, "cuda", quick=quick)
                back = common.paired_ratio(bwd(out_ours), bwd(out_theirs), "cuda", quick=quick)
                f_fwd = common.attention_flops(B, H, L, L, E, causal=causal, mode="fwd")
                f_bwd = common.attention_flops(B, H, L, L, E, causal=causal, mode="bwd")
                row = {
                    "batch": B, "heads": H, "seqlen": L, "head_dim": E, "causal": causal, "dtype": "bfloat16",
                    "fwd_ms": fwd["a_s"] * 1e3, "fwd_torch_flash_ms": fwd["b_s"] * 1e3,
                    "fwd_TFLOPs": f_fwd / fwd["a_s"] / 1e12, "fwd_speedup_vs_torch_flash": 1.0 / fwd["ratio_a_over_b"],
                    "bwd_ms": back["a_s"] * 1e3, "bwd_torch_flash_ms": back["b_s"] * 1e3,
                    "bwd_TFLOPs": f_bwd / back["a_s"] / 1e12,
                    "bwd_speedup_vs_torch_flash": 1.0 / back["ratio_a_over_b"],
                }
                rows.append(row)
                print(f"attn d{E} L{L:>5} {'causal' if causal else 'full  '}  fwd {row['fwd_TFLOPs']:6.1f} TFLOP/s "
                      f"x{row['fwd_speedup_vs_torch_flash']:.2f}  bwd {row['bwd_TFLOPs']:6.1f} TFLOP/s "
                      f"x{row['bwd_speedup_vs_torch_flash']:.2f} (vs torch flash)", flush=True)
                del q, k, v, dout, out_ours, out_theirs
    return rows


def bench_softmax(quick: bool, copy_GBps: float) -> List[Dict[str, object]]:
    rows = []
    widths = (1024, 8192) if quick else (1024, 4096, 8192, 32768)
    for N in widths:
        R = (1 << 24 if quick else 1 << 26) // N
        x = torch.randn(R, N, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(R, N, device="cuda", dtype=torch.bfloat16)
        nbytes = x.numel() * x.element_size()
        ours = lambda: fastformer.softmax(x, backend="cuda")  # noqa: E731
        theirs = lambda: torch.softmax(x, -1)  # noqa: E731
        y_ours, y_theirs = ours(), theirs()
        fwd = common.paired_ratio(ours, theirs, "cuda", quick=quick)
        back = common.paired_ratio(lambda: torch.autograd.grad(y_ours, x, dy, retain_graph=True),
                                   lambda: torch.autograd.grad(y_theirs, x, dy, retain_graph=True), "cuda",
                                   quick=quick)
        row = {
            "rows": R, "cols": N, "dtype": "bfloat16",
            "fwd_us": fwd["a_s"] * 1e6, "fwd_GBps": 2 * nbytes / fwd["a_s"] / 1e9,  # read x, write y
            "fwd_torch_us": fwd["b_s"] * 1e6,
            "bwd_us": back["a_s"] * 1e6, "bwd_GBps": 3 * nbytes / back["a_s"] / 1e9,  # read y, dy, write dx
            "bwd_torch_us": back["b_s"] * 1e6,
        }
        row["fwd_fraction_of_copy"] = row["fwd_GBps"] / copy_GBps
        row["bwd_fraction_of_copy"] = row["bwd_GBps"] / copy_GBps
        rows.append(row)
        print(f"softmax N{N:>6} x {R:>6} rows  fwd {row['fwd_GBps']:7.0f} GB/s ({row['fwd_fraction_of_copy']:.0%} of copy)"
              f"  bwd {row['bwd_GBps']:7.0f} GB/s ({row['bwd_fraction_of_copy']:.0%})", flush=True)
        del x, dy, y_ours, y_theirs
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    device = common.pick_device(args.device)
    env = common.environment(device)
    topic = "cuda_kernels" + ("-quick" if args.quick else "")
    reason = _unavailable(device)
    if reason:
        print(f"cuda kernels: skipped ({reason})")
        path = common.write_results(topic, {"skipped": reason, "results": []}, env)
        print(f"wrote {path}")
        return 0
    copy = common.copy_bandwidth("cuda")[0] / 1e9  # three ~0.1 s rounds: cheap on a GPU, quick run or not
    print(f"copy bandwidth: {copy:.0f} GB/s", flush=True)
    results = [{"provider": "ff-cuda", "kernel": "attention", **r} for r in bench_attention(args.quick)]
    results += [{"provider": "ff-cuda", "kernel": "softmax", **r} for r in bench_softmax(args.quick, copy)]
    payload = {"copy_GBps": copy, "results": results}
    path = common.write_results(topic, payload, env)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
