#!/usr/bin/env bash
# Wheels for a GPU machine whose Python lacks what bench/gpu.py imports (pydantic, boto3, ...).
# Run here, where pip reaches the package index; then carry .whl in the device call, and
# bench/gpu.sh installs them there into /tmp/site before it runs (nothing is fetched there).
# The versions are this checkout's venv's; the device image's Python is 3.12 on x86-64.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
PACKAGES="pydantic pydantic-core annotated-types typing-inspection typing-extensions boto3 botocore s3transfer jmespath"
pins=$("$PY" -c "import importlib.metadata as m, sys; print(' '.join(f'{p}=={m.version(p)}' for p in sys.argv[1:]))" $PACKAGES)
rm -rf .whl && mkdir .whl
for platform in 2_28 2_27 2_17; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform "manylinux_${platform}_x86_64" --platform manylinux2014_x86_64 -d .whl $pins && break
done
ls .whl
