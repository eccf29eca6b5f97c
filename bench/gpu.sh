#!/usr/bin/env bash
# The GPU benchmark in one command (one device call of at most 8 minutes); --smoke runs anywhere.
#
# On a GPU machine whose Python lacks pydantic or boto3: run bench/gpu_wheels.sh here first and
# carry .whl in the device call; they are installed into /tmp/site below. On a device machine
# ($OUT set) the figures also go to $OUT/gpu.json as they are measured, unless --out is given.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
importable() { PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} "$PY" -c "import torch, torchvision, pydantic, boto3" 2>/dev/null; }
if ! importable && compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! importable; then
  echo "error: $PY cannot import torch, torchvision, pydantic and boto3. Fix: run" \
       "bench/gpu_wheels.sh where pip reaches the index and carry .whl, or set PYTHON" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
out=()
if [ -n "${OUT:-}" ] && [[ " $* " != *" --out "* ]]; then out=(--out "$OUT/gpu.json"); fi
PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} exec "$PY" bench/gpu.py "$@" "${out[@]}"
