# Sourced by bench/run.sh and tests/run.sh: prepares a local virtual environment
# (.venv, or $FASTFORMER_VENV) and builds fastformer into it.
#  - torch is installed only if missing (the venv sees the system's packages, so
#    an existing torch, e.g. on a GPU image, is reused); without a GPU the CPU
#    build is taken (from download.pytorch.org/whl/cpu when reachable, else the
#    configured index), never the multi-GB CUDA one by accident;
#  - triton==3.6.0; numpy<2.4 where Triton's CPU interpreter will be used;
#  - the extension is built against that torch without build isolation.
set -e
FASTFORMER_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${FASTFORMER_VENV:-$FASTFORMER_REPO/.venv}
PYTHON_BIN=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON_BIN" -m venv --system-site-packages "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
reachable() { python - "$1" <<'PY' 2>/dev/null
import socket, sys
socket.create_connection((sys.argv[1], 443), timeout=3).close()
PY
}

if ! python -c "import torch" >/dev/null 2>&1; then
  if has_gpu; then
    echo "[setup] installing torch (CUDA build: a GPU is present)"
    pip install -q torch
  elif reachable download.pytorch.org; then
    echo "[setup] installing torch==2.13.0 (CPU build)"
    pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
  else
    echo "[setup] installing torch==2.13.0 from the configured index"
    pip install -q torch==2.13.0
  fi
fi

need=()
python -c "import triton" >/dev/null 2>&1 || need+=("triton==3.6.0")
for mod in pytest pytest_benchmark hypothesis ninja pybind11 transformers sklearn matplotlib safetensors; do
  pkg=${mod//_/-}; [ "$mod" = sklearn ] && pkg=scikit-learn
  python -c "import $mod" >/dev/null 2>&1 || need+=("$pkg")
done
if ! has_gpu && ! python -c "import numpy, sys; sys.exit(tuple(map(int, numpy.__version__.split('.')[:2])) >= (2, 4))" >/dev/null 2>&1; then
  need+=("numpy<2.4")  # triton 3.6's CPU interpreter breaks on numpy 2.4
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "[setup] installing ${need[*]}"
  pip install -q "${need[@]}"
fi

echo "[setup] building fastformer (extension fastformer._C, no build isolation)"
FASTFORMER_REQUIRE_EXT=${FASTFORMER_REQUIRE_EXT:-1} MAX_JOBS=${MAX_JOBS:-$(nproc)} \
  pip install -q --no-build-isolation --no-deps -e "$FASTFORMER_REPO"
set +e
