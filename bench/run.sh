#!/usr/bin/env bash
# The main job, with its own set-up: fastformer's attention backends vs naive
# attention and torch, on this machine (GPU if present, else CPU).
#   bash bench/run.sh            # default set, writes bench/results/<device>/attention.json
#   bash bench/run.sh --quick    # seconds once set up (the first run builds the extension)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/setup_env.sh
python bench/attention.py "$@"
