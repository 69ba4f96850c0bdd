#!/usr/bin/env bash
# A short follow-up GPU call after bench/gpu.sh found a fault: build, probe attention shapes one
# process each, memcheck one shape, then the CUDA tests under pytest-xdist (a faulting test takes
# down only its worker; tests/conftest.py). Writes probe.txt, sanitizer.txt, junit.xml to $OUT.
#   bash bench/gpu_triage.sh [SHAPE_FOR_MEMCHECK]     (device tool: timeout_s ~330)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu-run}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
SHAPE=${1:-2,3,17,17,24,8}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/ff-site .whl/*.whl
  export PYTHONPATH=/tmp/ff-site${PYTHONPATH:+:$PYTHONPATH}
fi
t0=$(date +%s)
MAX_JOBS=16 FASTFORMER_REQUIRE_EXT=1 timeout 150 python3 -m pip install --no-build-isolation --no-deps -q -e . 2>&1 | tail -3
echo "== build done $(( $(date +%s) - t0 ))s"
timeout 100 python3 bench/attention_shape_probe.py --backend triton --timeout 60 2>&1 | tee "$OUT/probe.txt"
echo "== probe done $(( $(date +%s) - t0 ))s"
timeout 60 compute-sanitizer --tool memcheck --print-limit 6 python3 bench/attention_shape_probe.py --one "$SHAPE" \
  >"$OUT/sanitizer.txt" 2>&1
grep -m 12 -E "Invalid|at 0x|by thread|Address|ERROR SUMMARY|kernel|fwd err" "$OUT/sanitizer.txt"
echo "== memcheck done $(( $(date +%s) - t0 ))s"
xdist=(); python3 -c "import xdist" 2>/dev/null && xdist=(-n 8)
FASTFORMER_EXPECT_BACKENDS=cuda,triton FASTFORMER_TRITON_AUTOTUNE=off timeout 170 python3 -m pytest -q -m cuda \
  "${xdist[@]}" -p no:cacheprovider --junitxml="$OUT/junit.xml" tests 2>&1 | grep -vE "^\s*$" | tail -45
echo "== tests done $(( $(date +%s) - t0 ))s"
