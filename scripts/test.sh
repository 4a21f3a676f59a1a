#!/usr/bin/env bash
# Set up with the test extras, then run the whole suite (core + every plugin + template + docs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
.venv/bin/python -m pytest "$@"
