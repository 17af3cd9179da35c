#!/usr/bin/env bash
# The one GPU check (see scripts/gpu_check.py): build with CUDA, GPU tests, compute-sanitizer,
# the speed-goal benchmarks, goal-vs-measured table printed last. Under 8 minutes on an H100.
#
#   bash scripts/gpu_check.sh                 # on the GPU machine
#   bash scripts/gpu_check.sh --fetch-wheels  # HERE, before: downloads pycocotools + nvtx wheels
#                                             # (cp312, manylinux) into .whl/ (git-ignored) so the
#                                             # GPU machine, which has no network, can install them
# Other arguments go to gpu_check.py (--dry-run, --skip build-start,build, --budget 520, --only ...).
# Nothing here changes GPU settings.
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=(pycocotools==2.0.11 nvtx==0.2.17)

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    mkdir -p .whl
    python3 -m pip download --no-deps --only-binary=:all: --python-version "${GPU_PYTHON_VERSION:-3.12}" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        -d .whl "${WHEELS[@]}"
    ls -la .whl
    exit $?
fi

PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# Carried wheels (`carry: [".whl"]`): packages the GPU image lacks (pycocotools, nvtx).
if compgen -G ".whl/*.whl" > /dev/null; then
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/distilpose-site .whl/*.whl; then
        export PYTHONPATH=/tmp/distilpose-site${PYTHONPATH:+:$PYTHONPATH}
    else
        echo "gpu_check.sh: installing the carried wheels failed; continuing without them" >&2
    fi
fi
exec "$PY" scripts/gpu_check.py "$@"
