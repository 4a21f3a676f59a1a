#!/usr/bin/env bash
# The parallel benchmark on GPUs (one per rank, NCCL): run on a machine with CUDA GPUs, from the repository root.
# Skips (exit 0) when no GPU is visible. Layouts needing more ranks than GPUs are left out.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "no CUDA GPU visible: skipping benchmarks/parallel_gpu.sh"
  exit 0
fi
"$PY" -c "import torch; print('GPUs:', [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])"
exec "$PY" -m benchmarks.parallel --device cuda --flux-steps 28 --wan-steps 10 --wan-frames 33 \
  --layouts "1 proc x 1 thread,sp2 (2 procs x 1 thread),cfg (2 procs x 1 thread),sp2+cfg (4 procs x 1 thread)" \
  --output benchmarks/results/parallel-gpu.json "$@"
