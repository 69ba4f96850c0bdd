#!/usr/bin/env bash
# The test suite, with its own set-up: bash tests/run.sh [pytest args]
# (.ci/run calls exactly this.) GPU tests are skipped without a GPU; Triton
# kernels run on CPU tensors through the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/setup_env.sh
# The log opens with `python -m fastformer.info`'s report, printed by tests/conftest.py
# (no separate Python start, so no second torch import).
export FASTFORMER_INFO_HEADER=1
# Backends that must be present here: their tests fail instead of skipping if missing.
export FASTFORMER_EXPECT_BACKENDS=${FASTFORMER_EXPECT_BACKENDS-cpu,triton}
python -m pytest tests -q -p no:cacheprovider --durations=15 "$@"
