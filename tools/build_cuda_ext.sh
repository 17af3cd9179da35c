#!/usr/bin/env bash
# Build distilpose_kernels._C with its CUDA kernels on a GPU machine, then verify the build.
#
#   tools/build_cuda_ext.sh            # editable install (pip install --no-build-isolation -e .)
#   tools/build_cuda_ext.sh --inplace  # only python setup.py build_ext --inplace (no pip)
#
# Env: TORCH_CUDA_ARCH_LIST (default: the visible GPU's capability, else 9.0), MAX_JOBS
# (default: nproc), PYTHON (default python3). Exits non-zero unless _C loads with CUDA kernels.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
export FORCE_CUDA=1
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
  TORCH_CUDA_ARCH_LIST="$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability() if torch.cuda.is_available() else "9.0")')"
  export TORCH_CUDA_ARCH_LIST
fi
echo "build_cuda_ext: FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
t0=$(date +%s)
if [[ "${1:-}" == "--inplace" ]]; then
  "$PY" setup.py build_ext --inplace
else
  "$PY" -m pip install --no-build-isolation --no-deps -e .
fi
echo "build_cuda_ext: built in $(( $(date +%s) - t0 )) s"
"$PY" - <<'PYEOF'
from distilpose_kernels import _ext
st = _ext.load()
assert st.loaded, f"distilpose_kernels._C did not load: {st.error}"
assert st.cuda_built, "distilpose_kernels._C was built without CUDA kernels"
print(f"build_cuda_ext: OK {st.path} (archs {st.cuda_archs})")
PYEOF
"$PY" -m distilpose_kernels.info
