"""Usage: python bench/triton_ffn_resources.py  (no GPU needed; run without TRITON_INTERPRET).

ptxas register/spill report for the FFN kernels as a real launch would specialise them
(unit strides -> constexpr 1, pointers and other strides/sizes divisible by 16)."""
import os, subprocess, tempfile, sys
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
import triton.backends.nvidia as nv
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from fastformer.kernels import ffn as FF
ptxas = os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas")
target = GPUTarget("cuda", 90, 32)

def report(fn, types, consts, ones, name, warps, stages):
    consts = dict(consts, **{k: 1 for k in ones})
    sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n not in consts}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs), target=target,
                       options={"num_warps": warps, "num_stages": stages})
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(k.asm["ptx"])
    out = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", f.name, "-o", "/dev/null"], capture_output=True, text=True).stderr
    spill = [l.strip() for l in out.splitlines() if "spill" in l]
    regs = [l.split("Used")[1].split(",")[0].strip() for l in out.splitlines() if "Used" in l]
    print(f"{name:45s} smem {k.metadata.shared:6d} regs {regs} {spill}")

T = {"A": "*bf16", "B": "*bf16", "C": "*bf16", "BIAS": "*bf16", "PRE": "*bf16", "AUX": "*bf16", "ROWSUM": "*fp32"}
for (bm, bn, bk, s, w) in [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages, c.num_warps) for c in FF._configs()]:
    base = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "DOT_PRECISION": "tf32"}
    # forward: A = x (row-major, stride_ak 1), B = W^T (stride_bk 1), C/PRE row-major
    report(FF._matmul_act, T, dict(base, ACT=2, HAS_BIAS=True, STORE_PRE=True, PROLOGUE_GRAD=False, DO_ROWSUM=False),
           ["stride_ak", "stride_bk", "stride_cn", "stride_pn", "stride_xk"], f"fwd gelu {bm}x{bn}x{bk} s{s} w{w}", w, s)
    # dx: A = dy (stride_ak 1), AUX = h (stride_xk 1), B = W (stride_bn 1)
    report(FF._matmul_act, T, dict(base, ACT=2, HAS_BIAS=False, STORE_PRE=False, PROLOGUE_GRAD=True, DO_ROWSUM=False),
           ["stride_ak", "stride_xk", "stride_bn", "stride_cn", "stride_pn"], f"dx gelu {bm}x{bn}x{bk} s{s} w{w}", w, s)
    # dW: A = dy^T (stride_am 1), AUX = h^T (stride_xm 1), B = x (stride_bn 1)
    report(FF._matmul_act, T, dict(base, ACT=2, HAS_BIAS=False, STORE_PRE=False, PROLOGUE_GRAD=True, DO_ROWSUM=True),
           ["stride_am", "stride_xm", "stride_bn", "stride_cn", "stride_pn"], f"dW gelu {bm}x{bn}x{bk} s{s} w{w}", w, s)
TG = {"X": "*bf16", "W": "*bf16", "BIAS": "*bf16", "OUT": "*bf16", "PRE": "*bf16"}
for (bm, bn, bk, s, w) in [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages, c.num_warps) for c in FF._configs(True)]:
    report(FF._gated_fwd, TG, {"ACT": 4, "HAS_BIAS": True, "STORE_PRE": True, "DOT_PRECISION": "tf32", "BLOCK_M": bm,
           "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, ["stride_xk", "stride_wk", "stride_on", "stride_pn"],
           f"gated silu {bm}x{bn}x{bk} s{s} w{w}", w, s)
