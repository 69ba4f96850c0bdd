"""Compile the issue-7 Triton kernels (softmax, LayerNorm, FFN, RoPE, sinusoidal) for a
GPU target without a GPU and report ptxas registers / spills / shared memory.

    python bench/kernels_triton_ptxas.py           # table for sm_90a, bf16
    python bench/kernels_triton_ptxas.py --check   # every kernel variant compiles; the chosen
                                                   # configs do not spill (exit 1 otherwise)
    python bench/kernels_triton_ptxas.py --check --quick   # CI: one FFN tile

Launch-time specialisation is mimicked (unit strides as constexpr 1, other pointers,
strides and sizes 16-divisible). This is how the FFN tile list and the LayerNorm
warp counts were chosen (numbers in bench/NOTES.md, "Softmax, LayerNorm, FFN").
Run without TRITON_INTERPRET.
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

from fastformer.kernels import ffn as FF  # noqa: E402
from fastformer.kernels import layernorm as LN  # noqa: E402
from fastformer.kernels import rope as RO  # noqa: E402
from fastformer.kernels import sinusoidal as SN  # noqa: E402
from fastformer.kernels import softmax as SM  # noqa: E402

_FLOATS = ("scale", "eps", "dropout_p")


def compile_report(fn, types: dict, const: dict, ones=(), warps: int = 4, stages: int = 3, arch: int = 90) -> dict:
    const = dict(const, **{k: 1 for k in ones})
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in const:
            sig[name] = "constexpr"
        else:
            sig[name] = types.get(name, "fp32" if name in _FLOATS else "i32")
            if sig[name].startswith("*") or (sig[name] == "i32" and name.startswith("stride_")):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps, num_stages=stages))
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(kernel.asm["ptx"])
    log = subprocess.run([ptxas, f"-arch=sm_{arch}{'a' if arch == 90 else ''}", "-v", f.name, "-o", os.devnull],
                         capture_output=True, text=True).stderr
    os.unlink(f.name)
    regs = re.findall(r"Used (\d+) registers", log)
    spill = re.findall(r"(\d+) bytes spill stores", log)
    return {"registers": int(regs[-1]) if regs else None, "spill_bytes": int(spill[-1]) if spill else None,
            "shared_bytes": kernel.metadata.shared}


def cases(dt: str = "bf16", quick: bool = False):
    """(name, fn, types, const, unit-stride args, warps, stages, max spill bytes or None = compile only)."""
    out = []
    # softmax: every mask kind, one- and two-pass
    for one, block, warps in ((True, 1024, 4), (True, 16384, 16), (False, 16384, 32)):
        for mask_kind in ("none", "bool", "float"):
            t = {"X": f"*{dt}", "Y": f"*{dt}", "MASK": "*u8" if mask_kind != "float" else "*fp32"}
            c = dict(HAS_MASK=mask_kind != "none", MASK_IS_BOOL=mask_kind == "bool", CAUSAL=True, ONE_BLOCK=one, BLOCK=block)
            out.append((f"softmax_fwd {block} one={one} mask={mask_kind}", SM._softmax_fwd, t, c, ["stride_mn"], warps, 1, 0))
        out.append((f"softmax_bwd {block} one={one}", SM._softmax_bwd, {"DY": f"*{dt}", "Y": f"*{dt}", "DX": f"*{dt}"},
                    dict(ONE_BLOCK=one, BLOCK=block), [], warps, 1, 0))
    # norms at the widths the launcher pairs with its warp counts
    tf = {"X": f"*{dt}", "RES": f"*{dt}", "W": f"*{dt}", "B": f"*{dt}", "Y": f"*{dt}", "H": f"*{dt}", "MEAN": "*fp32",
          "RSTD": "*fp32", "SEED": "*i64"}
    tb = {"DY": f"*{dt}", "DSUM": f"*{dt}", "H": f"*{dt}", "W": f"*{dt}", "MEAN": "*fp32", "RSTD": "*fp32",
          "SEED": "*i64", "DX": f"*{dt}", "DRES": f"*{dt}", "DW_PART": "*fp32", "DB_PART": "*fp32"}
    for rms in (False, True):
        for block in (1024, 4096, 8192):
            c = dict(HAS_RES=True, HAS_W=True, HAS_B=not rms, DROPOUT=True, RMS=rms, BLOCK=block)
            out.append((f"norm_fwd {block} rms={rms}", LN._norm_fwd, tf, c, [], LN._warps(block), 1, 0))
            c = dict(HAS_DSUM=True, HAS_RES=True, HAS_W=True, HAS_B=not rms, DROPOUT=True, RMS=rms, BLOCK=block)
            limit = 256 if block == 8192 else 0  # ~220 B at 8192 even with 16 warps (NOTES)
            out.append((f"norm_bwd {block} rms={rms}", LN._norm_bwd, tb, c, [], LN._warps(block, True), 1, limit))
    # FFN: forward, dx and dW GEMMs for every activation at the first 128x128 tile; the whole tile list for GELU
    tm = {n: f"*{dt}" for n in ("A", "B", "C", "BIAS", "PRE", "AUX")}
    tm["ROWSUM"] = "*fp32"
    modes = {  # (flags, unit strides as the launches pass them)
        "fwd": (dict(HAS_BIAS=True, STORE_PRE=True, PROLOGUE_GRAD=False, DO_ROWSUM=False),
                ["stride_ak", "stride_bk", "stride_cn", "stride_pn", "stride_xk"]),
        "dx": (dict(HAS_BIAS=False, STORE_PRE=False, PROLOGUE_GRAD=True, DO_ROWSUM=False),
               ["stride_ak", "stride_xk", "stride_bn", "stride_cn", "stride_pn"]),
        "dW": (dict(HAS_BIAS=False, STORE_PRE=False, PROLOGUE_GRAD=True, DO_ROWSUM=True),
               ["stride_am", "stride_xm", "stride_bn", "stride_cn", "stride_pn"]),
    }
    for cfg in FF._configs():
        if quick and (cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]) != (128, 128, 64):
            continue
        bm, bn, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
        acts = range(5) if (bm, bn, bk) == (128, 128, 64) else (2,)
        for act in acts:
            for mode, (flags, ones) in modes.items():
                c = dict(flags, ACT=act, DOT_PRECISION="tf32", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8)
                limit = 512 if bn == 256 else 0  # 128x256 kept for autotune despite spilling ~360 B (NOTES)
                out.append((f"matmul {mode} act={act} {bm}x{bn}x{bk} w{cfg.num_warps} s{cfg.num_stages}",
                             FF._matmul_act, tm, c, ones, cfg.num_warps, cfg.num_stages, limit))
    tg = {n: f"*{dt}" for n in ("X", "W", "BIAS", "OUT", "PRE")}
    for cfg in FF._configs(gated=True)[: 1 if quick else None]:
        c = dict(ACT=4, HAS_BIAS=True, STORE_PRE=True, DOT_PRECISION="tf32", **cfg.kwargs)
        out.append((f"gated_fwd {cfg.kwargs['BLOCK_M']}x{cfg.kwargs['BLOCK_N']} w{cfg.num_warps} s{cfg.num_stages}",
                    FF._gated_fwd, tg, c, ["stride_xk", "stride_wk", "stride_on", "stride_pn"], cfg.num_warps,
                    cfg.num_stages, 128))
    out.append(("gated_bwd", FF._gated_bwd, {"DOUT": f"*{dt}", "PRE": f"*{dt}", "DPRE": f"*{dt}"},
                dict(ACT=3, BLOCK_M=32, BLOCK_N=64), ["stride_dn", "stride_pn", "stride_qn"], 4, 1, 0))
    # positional
    for il in (False, True):
        out.append((f"rope interleaved={il}", RO._rope_kernel,
                    {"Q": f"*{dt}", "K": f"*{dt}", "QO": f"*{dt}", "KO": f"*{dt}", "POS": "*fp32", "INV_FREQ": "*fp32"},
                    dict(INTERLEAVED=il, INVERSE=il, BLOCK_L=64, BLOCK_I=64), ["stride_qd", "stride_kd"], 8, 1, 0))
    out.append(("sinusoidal", SN._add_sinusoidal, {"X": f"*{dt}", "OUT": f"*{dt}", "INV_FREQ": "*fp32"},
                dict(BLOCK_R=16, BLOCK_D=256), [], 4, 1, 0))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--check", action="store_true", help="exit 1 if a kernel fails to compile or spills past its limit")
    p.add_argument("--quick", action="store_true", help="FFN: only the 128x128x64 tile (all activations); for CI")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        p.error("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
    ok = True
    print("| kernel | warps | stages | regs | spill B | smem B | |")
    print("|---|---|---|---|---|---|---|")
    for name, fn, types, const, ones, warps, stages, limit in cases(args.dtype, args.quick):
        try:
            r = compile_report(fn, types, const, ones, warps, stages, args.arch)
            good = limit is None or (r["spill_bytes"] or 0) <= limit
            print(f"| {name} | {warps} | {stages} | {r['registers']} | {r['spill_bytes']} | {r['shared_bytes']} | "
                  f"{'ok' if good else 'SPILLS'} |", flush=True)
        except Exception as exc:
            good = False
            print(f"| {name} | {warps} | {stages} | | | | FAILED: {type(exc).__name__}: {str(exc)[:300]} |", flush=True)
        ok &= good
    return 0 if (ok or not args.check) else 1


if __name__ == "__main__":
    sys.exit(main())
