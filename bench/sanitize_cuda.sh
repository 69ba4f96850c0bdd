#!/usr/bin/env bash
# compute-sanitizer memcheck and racecheck over the CUDA kernels at tiny, awkward
# shapes (lengths around the 64-wide tiles, GQA, masks, causal both ways, softmax
# rows cached and online). Called from bench/gpu.sh on a lent GPU; < 60 s on an H100.
#   bash bench/sanitize_cuda.sh            # exit status: 0 clean, else the failing tool's
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
SAN=${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)}
if [ ! -x "$SAN" ]; then echo "compute-sanitizer not found"; exit 2; fi

SCRIPT=$(mktemp /tmp/ff_sanitize_XXXX.py)
trap 'rm -f "$SCRIPT"' EXIT
cat > "$SCRIPT" <<'PY'
import torch, fastformer
torch.manual_seed(0)
dev, bf = "cuda", torch.bfloat16
def run(B, Hq, Hkv, L, S, E, dtype=bf, mask=None, causal=False, br=False):
    q = torch.randn(B, Hq, L, E, device=dev, dtype=dtype, requires_grad=True)
    k = torch.randn(B, Hkv, S, E, device=dev, dtype=dtype, requires_grad=True)
    v = torch.randn(B, Hkv, S, E, device=dev, dtype=dtype, requires_grad=True)
    out = fastformer.attention(q, k, v, attn_mask=mask, is_causal=causal, causal_bottom_right=br,
                               enable_gqa=Hq != Hkv, backend="cuda")
    out.backward(torch.randn_like(out))
for E in (64, 128):
    run(1, 2, 1, 1, 1, E)
    run(1, 2, 2, 65, 63, E, causal=True)
    run(1, 4, 2, 63, 130, E, causal=True, br=True)
    run(1, 2, 2, 129, 17, E, dtype=torch.float16)
keep = torch.rand(2, 1, 1, 70, device=dev) > 0.3
run(2, 2, 2, 33, 70, 64, mask=keep.expand(2, 2, 33, 70))
run(1, 2, 2, 40, 70, 64, mask=torch.randn(40, 70, device=dev, dtype=bf).expand(1, 2, 40, 70))
for N in (1, 7, 1000, 40000):
    x = torch.randn(3, N, device=dev, dtype=bf, requires_grad=True)
    fastformer.softmax(x, scale=0.5, backend="cuda").backward(torch.randn(3, N, device=dev, dtype=bf))
x = torch.randn(2, 5, 9, device=dev, dtype=torch.float32, requires_grad=True)
fastformer.softmax(x, is_causal=True, backend="cuda").sum().backward()
torch.cuda.synchronize()
print("sanitize workload done")
PY

status=0
for tool in memcheck racecheck; do
  echo "== compute-sanitizer --tool $tool"
  if ! timeout 120 "$SAN" --tool "$tool" --error-exitcode 17 \
      "$PYTHON" "$SCRIPT"; then
    echo "== $tool FAILED"; status=1
  fi
done
exit $status
