#!/usr/bin/env bash
# Create ./.venv (once) and install distilpose into it, building the C++ extension.
# Safe on a CPU-only machine: torch is pinned to a release first (TORCH_SPEC, default
# torch==2.13.0), so no dependency can pull a multi-GB CUDA build afterwards.
# Usage: bash scripts/setup_env.sh [extras]   (extras e.g. "test")
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=${1:-}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip "setuptools>=64" wheel
if ! python -c "import torch" >/dev/null 2>&1; then
  python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
target="."
[ -n "$extras" ] && target=".[$extras]"
MAX_JOBS=${MAX_JOBS:-2} python -m pip install -q --no-build-isolation -e "$target"
python -m distilpose_kernels.info || true
