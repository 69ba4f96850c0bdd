# Sourced by bench/run.sh and tests/run.sh: prepares a local virtual environment
# (.venv, or $FASTFORMER_VENV) and builds fastformer into it.
#  - torch is installed only if missing (the venv sees the system's packages, so
#    an existing torch, e.g. on a GPU image, is reused); without a GPU the CPU
#    build is taken (from download.pytorch.org/whl/cpu when reachable, else the
#    configured index), never the multi-GB CUDA one by accident;
#  - triton==3.6.0; numpy<2.4 where Triton's CPU interpreter will be used;
#  - the extension is built against that torch without build isolation, and only
#    when something it is built from changed (bench/setup_state.py keeps a stamp of
#    the C++/CUDA sources, setup.py, the torch and Python versions); its object
#    files persist in $VENV/fastformer-build, so ninja recompiles only what changed.
# Every step prints a line with the time elapsed since set-up started; the
# compiler's progress shows as ninja's [n/m] lines (the full log stays in
# $VENV/fastformer-build/build.log).
set -e
FASTFORMER_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${FASTFORMER_VENV:-$FASTFORMER_REPO/.venv}
PYTHON_BIN=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1

_ff_t0=${EPOCHREALTIME:-$SECONDS}
_ff_say() {  # [setup  12.3s] message
  local now=${EPOCHREALTIME:-$SECONDS}
  LC_ALL=C printf '[setup %5.1fs] %s\n' "$(awk "BEGIN{print ${now/,/.} - ${_ff_t0/,/.}}")" "$*"
}

if [ ! -x "$VENV/bin/python" ]; then
  _ff_say "creating $VENV"
  "$PYTHON_BIN" -m venv --system-site-packages "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

_ff_has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
_ff_reachable() { python - "$1" <<'PY' 2>/dev/null
import socket, sys
socket.create_connection((sys.argv[1], 443), timeout=3).close()
PY
}
FASTFORMER_HAS_GPU=0
_ff_has_gpu && FASTFORMER_HAS_GPU=1
export FASTFORMER_HAS_GPU

if ! python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is None)"; then
  if [ "$FASTFORMER_HAS_GPU" = 1 ]; then
    _ff_say "installing torch (CUDA build: a GPU is present)"
    python -m pip install torch
  elif _ff_reachable download.pytorch.org; then
    _ff_say "installing torch==2.13.0 (CPU build)"
    python -m pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
  else
    _ff_say "installing torch==2.13.0 from the configured index"
    python -m pip install torch==2.13.0
  fi
fi

# One Python start decides what is missing and whether the extension is up to date.
_ff_need=()
_ff_build=""
while IFS= read -r _ff_line; do
  case $_ff_line in
    "need "*) _ff_need+=("${_ff_line#need }") ;;
    "build "*) _ff_build=${_ff_line#build } ;;
  esac
done < <(python "$FASTFORMER_REPO/bench/setup_state.py" check "$VENV")
if [ ${#_ff_need[@]} -gt 0 ]; then
  _ff_say "installing ${_ff_need[*]}"
  python -m pip install "${_ff_need[@]}"
fi

_ff_build_dir="$VENV/fastformer-build"
if [ "$_ff_build" = fresh ]; then
  _ff_say "fastformer is up to date (no C++/CUDA source, setup.py, torch or Python change since its build)"
else
  _ff_say "building fastformer: ${_ff_build#stale } (extension fastformer._C, ${MAX_JOBS:-$(nproc)} jobs, log in $_ff_build_dir/build.log)"
  mkdir -p "$_ff_build_dir"
  # pip -v streams the build's output; show ninja's [n/m] lines (one per compiled file),
  # the link, any compiler error and a heartbeat, and keep everything in the log.
  # shellcheck disable=SC1091
  . "$FASTFORMER_REPO/bench/build_progress.sh"
  set +e
  FASTFORMER_BUILD_DIR="$_ff_build_dir" FASTFORMER_REQUIRE_EXT=${FASTFORMER_REQUIRE_EXT:-1} \
    MAX_JOBS=${MAX_JOBS:-$(nproc)} PYTHONUNBUFFERED=1 \
    python -m pip install -v --no-build-isolation --no-deps -e "$FASTFORMER_REPO" 2>&1 \
    | tee "$_ff_build_dir/build.log" | ff_build_progress
  _ff_status=${PIPESTATUS[0]}
  set -e
  if [ "$_ff_status" != 0 ]; then
    echo "[setup] building fastformer failed (pip exit $_ff_status); the last lines of $_ff_build_dir/build.log:" >&2
    tail -n 40 "$_ff_build_dir/build.log" >&2
    return "$_ff_status" 2>/dev/null || exit "$_ff_status"
  fi
  python "$FASTFORMER_REPO/bench/setup_state.py" stamp "$VENV"
fi
_ff_say "ready"
unset _ff_line _ff_need _ff_build _ff_status _ff_build_dir
set +e
