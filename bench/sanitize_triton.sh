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
torch.cuda.synchronize()
print("triton sanitize workload done")
PY
if timeout 150 env FASTFORMER_TRITON_AUTOTUNE=off "$SAN" --tool memcheck --error-exitcode 17 "$PYTHON" "$SCRIPT"; then
  exit 0
fi
echo "== memcheck FAILED"; exit 1
