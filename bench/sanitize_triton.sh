#!/usr/bin/env bash
# compute-sanitizer memcheck over the Triton attention kernels at awkward shapes
# (lengths not a multiple of the block, head dims not a power of two, GQA, masks,
# causal both ways), forward and backward. Autotuning off: one compile per variant.
# Called from bench/gpu.sh on a lent GPU.   exit status: 0 clean, else 1
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
SAN=${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)}
if [ ! -x "$SAN" ]; then echo "compute-sanitizer not found"; exit 2; fi
SCRIPT=$(mktemp /tmp/ff_sanitize_triton_XXXX.py)
trap 'rm -f "$SCRIPT"' EXIT
cat > "$SCRIPT" <<'PY'
import torch, fastformer
torch.manual_seed(0)
dev, bf = "cuda", torch.bfloat16
def run(B, Hq, Hkv, L, S, E, mask=None, causal=False, br=False, p=0.0):
    q = torch.randn(B, Hq, L, E, device=dev, dtype=bf, requires_grad=True)
    k = torch.randn(B, Hkv, S, E, device=dev, dtype=bf, requires_grad=True)
    v = torch.randn(B, Hkv, S, E, device=dev, dtype=bf, requires_grad=True)
    out = fastformer.attention(q, k, v, attn_mask=mask, is_causal=causal, causal_bottom_right=br,
                               dropout_p=p, enable_gqa=Hq != Hkv, backend="triton")
    out.backward(torch.randn_like(out))
run(1, 2, 1, 1, 1, 40)
run(1, 2, 2, 65, 63, 80, causal=True)
run(1, 4, 2, 63, 130, 96, causal=True, br=True)
run(1, 2, 2, 129, 17, 64, p=0.1)
keep = torch.rand(2, 1, 1, 70, device=dev) > 0.3
run(2, 2, 2, 33, 70, 64, mask=keep.expand(2, 2, 33, 70))
# The variant kernels (window, ALiBi, soft-cap; issue 18), called directly: tile skipping at the
# window's edges and ragged lengths are where an out-of-bounds read would hide.
from fastformer.kernels.attention_bwd import attention_bwd
from fastformer.kernels.attention_fwd import attention_fwd
from fastformer.kernels.decode import decode_attention_fwd
from fastformer.ops.attention.variants import Variant
def run_variant(B, Hq, Hkv, L, S, E, window, alibi, softcap, causal=False, br=False):
    q = torch.randn(B, Hq, L, E, device=dev, dtype=bf)
    k, v = (torch.randn(B, Hkv, S, E, device=dev, dtype=bf) for _ in range(2))
    var = Variant(window[0], window[1], torch.rand(B, Hq, device=dev) if alibi else None, softcap)
    out, lse = torch.empty_like(q), torch.empty(B, Hq, L, device=dev)
    kw = dict(scale=E ** -0.5, dropout_p=0.0, is_causal=causal, causal_bottom_right=br, variant=var)
    attention_fwd(q, k, v, None, out, lse, None, **kw)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    attention_bwd(torch.randn_like(out), q, k, v, out, lse, None, None, dq, dk, dv, torch.empty_like(lse), **kw)
run_variant(1, 2, 1, 300, 300, 64, (37, 0), False, 0.0, causal=True)
run_variant(1, 4, 2, 129, 257, 128, (20, 9), True, 30.0, br=True)
run_variant(2, 2, 2, 65, 40, 96, (-1, -1), True, 5.0)
B, Hq, Hkv, D, bs, nb = 2, 4, 2, 128, 16, 8
pk, pv = (torch.randn(B * nb + 3, bs, Hkv, D, device=dev, dtype=bf) for _ in range(2))
table = torch.randperm(B * nb + 3, device=dev)[: B * nb].view(B, nb).to(torch.int32)
q = torch.randn(B, Hq, 1, D, device=dev, dtype=bf)
out, lse = torch.empty_like(q), torch.empty(B, Hq, 1, device=dev)
o_part, lse_part = torch.empty(B, Hq, 1, 4, D, device=dev), torch.empty(B, Hq, 1, 4, device=dev)
decode_attention_fwd(q, pk, pv, torch.tensor([77, 128], device=dev, dtype=torch.int32), D ** -0.5, True, out, lse,
                     o_part, lse_part, 4, window=(40, 0), alibi_slopes=torch.rand(B, Hq, device=dev), softcap=20.0,
                     block_table=table)
torch.cuda.synchronize()
print("triton sanitize workload done")
PY
if timeout 150 env FASTFORMER_TRITON_AUTOTUNE=off "$SAN" --tool memcheck --error-exitcode 17 "$PYTHON" "$SCRIPT"; then
  exit 0
fi
echo "== memcheck FAILED"; exit 1
