"""Run fastformer.attention on a list of shapes, each in its own process, and report
which ones raise, fault (a sticky CUDA error such as an illegal address) or disagree
with torch's SDPA. A fault kills the CUDA context, so one process per shape keeps one
bad shape from hiding the rest.

    python bench/attention_shape_probe.py --backend triton --dtype bfloat16
    python bench/attention_shape_probe.py --one 2,3,17,17,24,8 --backend triton   # one shape, in-process

Shapes are ``B,H,L,S,E,Ev`` (plus ``,causal``). Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

DEFAULT_SHAPES = [
    "2,3,17,17,16,16", "2,3,17,17,24,8", "2,3,17,17,16,8", "2,3,17,17,24,24", "2,3,17,17,24,16",
    "2,3,17,17,32,8", "2,3,20,20,40,40", "2,3,9,12,5,7", "2,3,64,64,80,80", "2,3,17,17,8,8",
    "2,3,17,17,24,8,causal", "1,2,256,256,24,8",
]


def run_one(spec: str, backend: str, dtype_name: str) -> int:
    import torch

    import fastformer

    parts = spec.split(",")
    b, h, l, s, e, ev = map(int, parts[:6])
    causal = "causal" in parts[6:]
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    q = torch.randn(b, h, l, e, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(b, h, s, e, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(b, h, s, ev, device="cuda", dtype=dtype, requires_grad=True)
    out = fastformer.attention(q, k, v, is_causal=causal, backend=backend)
    torch.cuda.synchronize()
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)
    fwd_err = (out.float() - ref).abs().max().item()
    out.sum().backward()
    torch.cuda.synchronize()
    grads_finite = all(bool(t.grad.isfinite().all()) for t in (q, k, v))
    print(f"fwd max err {fwd_err:.3g}; grads finite {grads_finite}")
    return 0 if fwd_err < 0.1 and grads_finite else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="triton")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--one", help="run one shape in this process")
    p.add_argument("--timeout", type=float, default=60)
    p.add_argument("--jobs", type=int, default=4, help="shapes probed at once (one process each)")
    p.add_argument("shapes", nargs="*", default=DEFAULT_SHAPES)
    args = p.parse_args(argv)
    if args.one:
        return run_one(args.one, args.backend, args.dtype)
    def probe(spec):
        cmd = [sys.executable, __file__, "--one", spec, "--backend", args.backend, "--dtype", args.dtype]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            return spec, "TIMEOUT", ""
        lines = proc.stdout.strip().splitlines() or [l for l in proc.stderr.splitlines() if "Error" in l] or ["?"]
        return spec, "ok" if proc.returncode == 0 else f"FAILED rc {proc.returncode}", lines[-1]

    bad = 0
    with ThreadPoolExecutor(args.jobs) as pool:
        for spec, status, last in pool.map(probe, args.shapes):
            bad += status != "ok"
            print(f"{args.backend:<7} {args.dtype:<9} {spec:<24} {status:<14} {last[:200]}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
