#!/usr/bin/env bash
# The GPU benchmark run, as sent to a lent H100/H200 (benchmarks/RESULTS.md, "Core (GPU)"). The machine has PyTorch
# but no Ray or MLflow, so everything runs through the Ray-free core and deploy/engine.py; what it lacks (pydantic,
# for deploy.schemas) travels as wheels in .whl/ (see RESULTS.md for the pip download line). Each part runs under
# its own time limit and writes its tables to $OUT/*.md as rows come in; the whole run stays under 8 minutes.
#
#   bash benchmarks/run_gpu.sh            # on the GPU machine
#   PYTHON=.venv/bin/python bash benchmarks/run_gpu.sh --smoke     # tiny sizes, on a CPU
set -uo pipefail
OUT=${OUT:-/tmp/bench-out}; export OUT; mkdir -p "$OUT"
PY=${PYTHON:-python3}
SMOKE=(); [[ "${1:-}" == "--smoke" ]] && SMOKE=(--smoke)
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || echo "wheels in .whl/ not installed; carrying on"
fi

part() {  # part LIMIT_S ARGS...: one python process under a time limit (SIGINT first, so it prints where it was)
  local limit=$1; shift
  echo "=== [${SECONDS}s] $* (limit ${limit}s)"
  timeout --signal=INT --kill-after=10 "$limit" env PYTHONUNBUFFERED=1 "$PY" "$@"
  echo "=== [${SECONDS}s] exit $?"
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "no nvidia-smi"
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda',
torch.version.cuda, '| cudnn', torch.backends.cudnn.version(), '| device',
torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
} 2>&1 | tee "$OUT/device.txt"

{
  part 25 -m pytest -q -p no:cacheprovider tests/ddpm/test_graphs.py tests/deploy/test_engine_graphs.py
  part 75 benchmarks/gpu.py "${SMOKE[@]}" --sections correctness,sample
  part 105 benchmarks/engine_gpu.py "${SMOKE[@]}"
  part 265 benchmarks/gpu.py "${SMOKE[@]}" --sections train
  echo "=== total ${SECONDS}s"
} 2>&1 | tee "$OUT/run.log"
