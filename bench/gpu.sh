#!/usr/bin/env bash
# The one prepared GPU check: build, CUDA tests, sanitizer, benchmarks, ceilings.
#
#   bash bench/gpu.sh            # on a lent GPU (device tool: timeout_s 540); < 8 minutes
#   bash bench/gpu.sh --dry-run  # on a CPU machine: exercises every step's plumbing
#   GPU_TOTAL=300 GPU_TEST_S=110 GPU_WORKERS=16 GPU_BENCH="bench_nn.py bench_models.py" GPU_CHECKS=0 bash bench/gpu.sh
#                                # a short follow-up call: its own time, test time and workers,
#                                # benchmark list, and no sanitizers/fuzzer (GPU_CHECKS=0)
#
# Writes to $OUT when set (the device tool's return folder), else bench/results/gpu-run/:
#   summary.txt       the step table and the key numbers (also printed last)
#   gpu_log.txt       every step's full output
#   results.tgz       bench JSON (<device>/<topic>.json) + junit XML: unpack into bench/results/
# At most a handful of files, because the device tool returns at most 8.
#
# Wheels travel in .whl/ (git-ignored; name ".whl" in the device tool's carry):
#  - fastformer's own GPU wheel, from `bash bench/gpu_rehearsal.sh --no-tests` (cp312, torch
#    2.11.0+cu130, sm_80 + sm_90a): when it loads here with CUDA (bench/carried_wheel.py), its
#    extension is used and nothing is compiled on the loan; otherwise the extension is built;
#  - peers missing from the device image, e.g.
#      pip download --no-deps --only-binary=:all: -d .whl liger-kernel==0.8.5
#    installed for the run (Liger-Kernel is pure Python).
# The summary's first line says whether the extension came from the carried wheel or a source
# build, and whether fastformer._C has its CUDA kernels. Exit status 1 when any step failed.
set -uo pipefail

DRY_RUN=0
[ "${1:-}" = "--dry-run" ] && DRY_RUN=1

cd "$(dirname "$0")/.."
REPO=$(pwd)
OUT_DIR=${OUT:-$REPO/bench/results/gpu-run}
mkdir -p "$OUT_DIR"
WORK=$(mktemp -d)
LOG="$OUT_DIR/gpu_log.txt"
SUMMARY="$OUT_DIR/summary.txt"
: >"$LOG"
: >"$SUMMARY"
PY=${PYTHON:-python3}
[ -z "${PYTHON:-}" ] && [ -x "$REPO/.venv/bin/python" ] && [ "$DRY_RUN" = 1 ] && PY="$REPO/.venv/bin/python"
FAILED_STEPS=0
EXTENSION="not built"
export PYTHONUNBUFFERED=1
export FASTFORMER_RESULTS_DIR="$WORK/results"
T0=$(date +%s)

# step NAME LIMIT_SECONDS COMMAND...: run, log, record ok/FAILED/TIMEOUT with its time.
step() {
  local name=$1 limit=$2
  shift 2
  local t=$(date +%s)
  echo "===== $name (limit ${limit}s): $*" | tee -a "$LOG"
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  local status=ok
  [ $rc -ne 0 ] && status="FAILED (rc $rc)"
  [ $rc -eq 124 ] && status="TIMEOUT"
  [ $rc -ne 0 ] && FAILED_STEPS=$((FAILED_STEPS + 1))
  printf '%-28s %-16s %4ss\n' "$name" "$status" "$(( $(date +%s) - t ))" | tee -a "$SUMMARY"
  tail -n 5 "$LOG" | sed 's/^/    /'
  return 0
}

echo "fastformer GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')" | tee -a "$SUMMARY"

if [ "$DRY_RUN" = 1 ]; then
  echo "dry run: CPU stand-ins for each step" | tee -a "$SUMMARY"
  if "$PY" bench/carried_wheel.py find >/dev/null 2>&1; then
    # Check only: the dry run keeps the installed build.
    step "carried wheel (check)" 120 "$PY" bench/carried_wheel.py check
    EXTENSION="installed build (dry run; carried wheel $(grep -q '^carried wheel (check) *ok' "$SUMMARY" && echo loads || echo 'does NOT load'))"
  else
    EXTENSION="installed build (dry run; no carried wheel)"
  fi
  step "environment" 60 "$PY" -m fastformer.info
  step "cuda tests (collect only)" 120 "$PY" -m pytest -q -m cuda --collect-only -p no:cacheprovider tests
  step "benchmarks (cpu, quick)" 300 "$PY" bench/suite.py --device cpu --quick
else
  # One device call: ~500 s in all. Later steps get what is left (left N = min(N, time remaining)).
  TOTAL=${GPU_TOTAL:-500}
  BENCH_LIST=${GPU_BENCH:-bench_kernels.py bench_nn.py bench_models.py attention.py bench_cuda_kernels.py bench_pytest.py bench_variants.py}
  CHECKS=${GPU_CHECKS:-1}
  RESERVE=$(( CHECKS == 1 ? 90 : 0 ))
  left() { local r=$(( TOTAL - ($(date +%s) - T0) )); [ "$r" -lt "$1" ] && echo $(( r > 10 ? r : 10 )) || echo "$1"; }
  peers=$(ls .whl/*.whl 2>/dev/null | grep -v '/fastformer-' || true)
  if [ -n "$peers" ]; then
    # shellcheck disable=SC2086
    step "carried peer wheels" 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/ff-site $peers
    export PYTHONPATH=/tmp/ff-site${PYTHONPATH:+:$PYTHONPATH}
  fi
  step "environment" 60 bash -c "nvidia-smi; $PY -c 'import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name())'"
  EXTENSION="built from source"
  if ls .whl/fastformer-*.whl >/dev/null 2>&1; then
    step "carried wheel" 120 "$PY" bench/carried_wheel.py install
    if grep -q '^carried wheel  *ok' "$SUMMARY"; then
      step "install (prebuilt extension)" 120 env FASTFORMER_PREBUILT_EXT=1 "$PY" -m pip install --no-build-isolation --no-deps -q -e .
      grep -q '^install (prebuilt extension)  *ok' "$SUMMARY" && EXTENSION="from the carried wheel $(cd .whl && ls fastformer-*.whl | head -n 1)"
    fi
    [ "$EXTENSION" = "built from source" ] && EXTENSION="built from source (the carried wheel did not fit: see gpu_log.txt)"
  fi
  if [ "${EXTENSION#built from source}" != "$EXTENSION" ]; then
    step "build extension" 240 env MAX_JOBS=16 FASTFORMER_REQUIRE_EXT=1 FASTFORMER_REQUIRE_CUDA=1 "$PY" -m pip install --no-build-isolation --no-deps -q -e .
  fi
  step "info" 30 "$PY" -m fastformer.info
  # Backends that must be present on a GPU: their tests fail instead of skipping if the build lost them.
  # Under pytest-xdist a test that leaves a sticky CUDA fault ends only its worker (tests/conftest.py);
  # in one process it turned 297 later tests into errors (GPU run 1). 8 workers: 142 s for 359 tests.
  xdist=(); "$PY" -c "import xdist" 2>/dev/null && xdist=(-n "${GPU_WORKERS:-8}")
  step "cuda tests" "$(left "${GPU_TEST_S:-160}")" env FASTFORMER_EXPECT_BACKENDS=cuda,triton FASTFORMER_TRITON_AUTOTUNE=off "$PY" -m pytest -q -m cuda "${xdist[@]}" -p no:cacheprovider --junitxml="$WORK/junit.xml" tests
  # Benchmarks get what is left after reserving ~90 s for the Triton sanitizer and the fuzzer.
  # Order = priority (suite.py --only keeps it): what has never run on a GPU first (kernels, nn,
  # models: GPU run 1's budget ended inside attention.py), then the attention sets again.
  bench_s=$(( TOTAL - ($(date +%s) - T0) - RESERVE ))
  [ $bench_s -lt 60 ] && bench_s=60
  step "benchmarks" "$bench_s" "$PY" bench/suite.py --device cuda --budget $(( bench_s - 20 )) --only $BENCH_LIST
  if [ "$CHECKS" != 1 ]; then
    printf '%-28s %-16s\n' "sanitizers, fuzz" "skipped (GPU_CHECKS=0)" | tee -a "$SUMMARY"
  else
  step "compute-sanitizer (triton)" "$(left 60)" env PYTHON="$PY" bash bench/sanitize_triton.sh
  step "fuzz (gpu profile)" "$(left 30)" env FASTFORMER_FUZZ_PROFILE=gpu "$PY" -m pytest -q -x -p no:cacheprovider tests/test_fuzz.py
  # The CUDA kernels' sanitizer was clean in GPU run 1 and their sources have not changed since:
  # it runs only when time is left.
  if [ "$(left 80)" -ge 45 ]; then
    step "compute-sanitizer (cuda)" "$(left 80)" env PYTHON="$PY" bash bench/sanitize_cuda.sh
  else
    printf '%-28s %-16s\n' "compute-sanitizer (cuda)" "skipped (no time)" | tee -a "$SUMMARY"
  fi
  fi
fi

# Key numbers last, where the device tool's reply shows them.
"$PY" - "$WORK/results" >>"$SUMMARY" 2>&1 <<'EOF'
import json, pathlib, sys
root = pathlib.Path(sys.argv[1])
for path in sorted(root.glob("*/*.json")):
    data = json.loads(path.read_text())
    env = data.get("environment", {})
    print(f"{path.parent.name}/{path.name}: {env.get('device')} torch {env.get('torch')} triton {env.get('triton')}")
    if "ceilings" in data:
        print("  ceilings: " + ", ".join(f"{k} {v:.4g}" for k, v in data["ceilings"].items()))
    for r in data.get("results", []):
        keys = ("mode", "dtype", "seqlen", "head_dim", "causal", "tflops", "best_peer")  # attention rows only
        if "speedup_vs_best_peer" in r and r.get("provider", "").startswith("ff-") and r["provider"] != "ff-naive" \
                and all(k in r for k in keys):
            print(f"  {r['provider']:<12} {r['mode']:<7} {r['dtype']:<8} L{r['seqlen']:<6} d{r['head_dim']:<4}"
                  f" {'causal' if r['causal'] else 'full  '} {r['tflops']:8.3f} TFLOP/s"
                  f" x{r['speedup_vs_best_peer']:.2f} vs {r['best_peer']}")
EOF

tar czf "$OUT_DIR/results.tgz" -C "$WORK" . 2>>"$LOG"
rm -rf "$WORK"
echo "total $(( $(date +%s) - T0 ))s; $FAILED_STEPS step(s) failed; files in $OUT_DIR" | tee -a "$SUMMARY"
# First line of the summary: where the extension came from and whether it has the CUDA kernels.
CUDA_C=$("$PY" -c 'import fastformer._ext as e
C = e.C
print("no (fastformer._C does not load: %s)" % e.LOAD_ERROR if C is None else
      "yes (%s; %s)" % (", ".join(getattr(C, "build_info", {}).get("cuda_archs", [])), getattr(C, "build_info", {}).get("cuda_toolkit")) if C.with_cuda
      else "no (built without CUDA)")' 2>&1 | tail -n 1)
{ echo "extension: $EXTENSION; fastformer._C with CUDA: $CUDA_C"; cat "$SUMMARY"; } >"$SUMMARY.new" && mv "$SUMMARY.new" "$SUMMARY"
echo
cat "$SUMMARY"
[ "$FAILED_STEPS" -eq 0 ]
