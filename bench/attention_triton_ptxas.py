"""Compile the Triton attention kernels for a GPU target without a GPU and report
ptxas registers, spills, shared memory and whether K/V loads are pipelined.

    python bench/attention_triton_ptxas.py                 # sm_90a, bf16, the preferred configs
    python bench/attention_triton_ptxas.py --arch 80 --head-dims 64 128

This is how the autotune pruning rules in kernels/attention_{fwd,bwd}.py were
calibrated (numbers in bench/NOTES.md, "Triton attention"). Launch-time
specialisation is mimicked: unit strides on the head dim, 16-divisible
pointers and strides, head dims as constexprs. GROUP (GQA) stays a run-time
value, as in a GQA launch.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastformer.kernels import attention_bwd as bwd  # noqa: E402
from fastformer.kernels import attention_fwd as fwd  # noqa: E402

_POINTER_TYPES = {"MASK": "*u8", "LSE": "*fp32", "DELTA": "*fp32", "RNG": "*i64", "CU_Q": "*i32", "CU_K": "*i32",
                  "SLOPES": "*fp32"}
_FLOATS = ("scale", "scale_log2", "dropout_p", "dropout_scale", "softcap_in", "softcap_out")


def _signature(fn, dtype: str, const: dict):
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in const:
            sig[name] = "constexpr"
        elif name in _POINTER_TYPES or (name.isupper() and name in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")):
            sig[name] = _POINTER_TYPES.get(name, "*" + dtype)
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in _FLOATS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name.startswith("stride_") and not name.startswith("stride_m"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def compile_report(fn, const: dict, num_warps: int, num_stages: int, arch: int, dtype: str) -> dict:
    const = dict(const)
    for name in fn.arg_names:  # a contiguous head dim: the launcher's stride 1 is specialised
        if name.startswith("stride_") and name.endswith("d"):
            const[name] = 1
    sig, attrs = _signature(fn, dtype, const)
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in const.items()},
                    attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options=dict(num_warps=num_warps, num_stages=num_stages))
    ptx = kernel.asm["ptx"]
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    log = subprocess.run([ptxas, f"-arch=sm_{arch}{'a' if arch == 90 else ''}", "-v", f.name, "-o", os.devnull],
                         capture_output=True, text=True).stderr
    os.unlink(f.name)
    regs = re.findall(r"Used (\d+) registers", log)
    spill = re.findall(r"(\d+) bytes spill stores", log)
    return {
        "registers": int(regs[-1]) if regs else None,
        "spill_bytes": int(spill[-1]) if spill else None,
        "shared_bytes": kernel.metadata.shared,
        "pipelined": "cp.async" in ptx,
        "mma": "wgmma" if "wgmma" in ptx else ("mma" if "mma.sync" in ptx else "none"),
    }


def _check(arch: int) -> int:
    """Plain causal variant: no spills. Every feature on (float mask, dropout, varlen, head
    dim 80, window, ALiBi, soft-cap): compiles, and spills at most a few registers (measured: 16 B fwd, 8 B dK/dV)."""
    plain = dict(LIMIT_LEFT=False, LIMIT_RIGHT=True, SOFTCAP=False, ALIBI=False, HAS_MASK=False, MASK_BOOL=True,
                 DROPOUT=False, VARLEN=False, DOT_PRECISION="tf32", HEAD_DIM=128, HEAD_DIM_V=128, BLOCK_D=128,
                 BLOCK_DV=128)
    full = dict(plain, HAS_MASK=True, MASK_BOOL=False, DROPOUT=True, VARLEN=True, HEAD_DIM=80, HEAD_DIM_V=80,
                LIMIT_LEFT=True, SOFTCAP=True, ALIBI=True)
    ok = True
    for fn, (bm, bn, w, s) in ((fwd._attn_fwd.fn, (128, 64, 8, 3)), (bwd._attn_bwd_dkdv.fn, (32, 64, 8, 2)),
                               (bwd._attn_bwd_dq.fn, (128, 32, 8, 2))):
        for name, const, max_spill in (("plain", plain, 0), ("all features", full, 64)):
            r = compile_report(fn, dict(const, BLOCK_M=bm, BLOCK_N=bn), w, s, arch, "bf16")
            good = r["spill_bytes"] <= max_spill and r["pipelined"] and (arch < 90 or r["mma"] == "wgmma")
            ok &= good
            print(f"{fn.__name__} ({name}): {r} {'ok' if good else 'FAILED'}", flush=True)
    return 0 if ok else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--head-dims", type=int, nargs="*", default=[64, 128, 256])
    p.add_argument("--causal", action="store_true", default=True)
    p.add_argument("--check", action="store_true",
                   help="compile each kernel plain and with every feature on; exit 1 unless all use wgmma, "
                        "pipeline K/V loads and (nearly) never spill")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        p.error("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
    if args.check:
        return _check(args.arch)
    print(f"| kernel | D | BLOCK_M x BLOCK_N | warps | stages | regs | spill B | smem B | pipelined | mma |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for d in args.head_dims:
        base = dict(LIMIT_LEFT=False, LIMIT_RIGHT=args.causal, SOFTCAP=False, ALIBI=False, HAS_MASK=False, MASK_BOOL=True, DROPOUT=False, VARLEN=False,
                    DOT_PRECISION="tf32", HEAD_DIM=d, HEAD_DIM_V=d, BLOCK_D=d, BLOCK_DV=d)
        shape_args = {"BLOCK_D": d, "BLOCK_DV": d}
        for fn, preferred in ((fwd._attn_fwd.fn, fwd._fwd_preferred), (bwd._attn_bwd_dkdv.fn, bwd._dkdv_preferred),
                              (bwd._attn_bwd_dq.fn, bwd._dq_preferred)):
            for bm, bn, w, s in preferred(shape_args):
                r = compile_report(fn, dict(base, BLOCK_M=bm, BLOCK_N=bn), w, s, args.arch, args.dtype)
                print(f"| {fn.__name__} | {d} | {bm}x{bn} | {w} | {s} | {r['registers']} | {r['spill_bytes']} | "
                      f"{r['shared_bytes']} | {r['pipelined']} | {r['mma']} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
