#!/usr/bin/env bash
# The GPU benchmark in one command (one device call of at most 8 minutes); --smoke runs anywhere.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} exec "$PY" bench/gpu.py "$@"
