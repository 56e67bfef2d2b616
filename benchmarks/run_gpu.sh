#!/usr/bin/env bash
# The GPU benchmark run, as sent to a lent H100/H200 (see benchmarks/RESULTS.md). diffusers travels as wheels
# in .whl/ (pure Python); PyTorch is the machine's own.
set -uo pipefail
OUT=${OUT:-/tmp/bench-out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
PYTHONUNBUFFERED=1 python3 benchmarks/core.py "$@" 2>&1 | tee "$OUT/core.log"
