#!/usr/bin/env bash
# Create .venv with diffcore, its plugins and (with --test) the test dependencies (--bench: also the benchmark
# peers). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
# The CPU wheel of torch 2.13 (a range pip would otherwise satisfy with a multi-GB CUDA build).
.venv/bin/python -c "import torch" 2>/dev/null || $PIP install torch==2.13.0
plugins=()
for p in plugins/diffcore-*; do [ -f "$p/pyproject.toml" ] && plugins+=(-e "$p"); done
if [ "${1:-}" = "--test" ]; then
  $PIP install -e ".[test,serve,video,ray]" "${plugins[@]}"
elif [ "${1:-}" = "--bench" ]; then  # the test extras plus the benchmark-only peers (cache-dit, matplotlib)
  $PIP install -e ".[test,serve,video,bench]" "${plugins[@]}"
else
  $PIP install -e ".[video,serve]" "${plugins[@]}"
fi
