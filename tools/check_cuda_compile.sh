#!/usr/bin/env bash
# CI compile-only check of the CUDA sources of distilpose_kernels._C (no GPU needed).
#
# - every csrc/**/*.cu is compiled with nvcc (-std=c++20, sm_90 by default, torch's nvcc flags);
# - every csrc/cuda/*.cpp (the CUDA glue that includes c10/cuda headers) is compiled with the
#   host compiler against a complete torch include tree (-fsyntax-only).
# The CPU torch wheel lacks c10/cuda/impl/cuda_cmake_macros.h, so a complete include tree is
# taken once from a CUDA torch wheel (pip download --no-deps, only torch/include/* unpacked)
# and cached in $DISTILPOSE_CUDA_HEADERS (default .cuda_headers/, git-ignored).
#
# Env: NVCC (default: $CUDA_HOME/bin/nvcc or nvcc on PATH), CUDA_ARCH (default 90),
#      TORCH_HEADERS_VERSION (default 2.14.1), DISTILPOSE_CUDA_HEADERS, CXX (default g++).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
HDR="${DISTILPOSE_CUDA_HEADERS:-$ROOT/.cuda_headers}"
TV="${TORCH_HEADERS_VERSION:-2.14.1}"
ARCH="${CUDA_ARCH:-90}"
CXX="${CXX:-g++}"
if [[ -z "${NVCC:-}" ]]; then
  if [[ -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]]; then NVCC="$CUDA_HOME/bin/nvcc"
  elif command -v nvcc >/dev/null; then NVCC="$(command -v nvcc)"
  elif [[ -x /usr/local/cuda/bin/nvcc ]]; then NVCC=/usr/local/cuda/bin/nvcc
  else echo "check_cuda_compile: nvcc not found (set NVCC or CUDA_HOME)" >&2; exit 2; fi
fi
CUDA_INC=""
for d in "${CUDA_HOME:-/nonexistent}/include" "$(dirname "$(readlink -f "$NVCC")")/../include" \
         /usr/local/cuda/include /usr/local/cuda-*/include; do
  if [[ -f "$d/cuda_runtime.h" ]]; then CUDA_INC="$(cd "$d" && pwd)"; break; fi
done
[[ -n "$CUDA_INC" ]] || { echo "check_cuda_compile: cuda_runtime.h not found (set CUDA_HOME)" >&2; exit 2; }
PY="${PYTHON:-python3}"

t0=$(date +%s)
MARK="$HDR/torch/include/c10/cuda/impl/cuda_cmake_macros.h"
if [[ ! -f "$MARK" ]]; then
  echo "check_cuda_compile: fetching torch/include from torch==$TV (CUDA wheel) into $HDR"
  dl="$(mktemp -d)"
  trap 'rm -rf "$dl"' EXIT
  "$PY" -m pip download --no-deps --quiet "torch==$TV" -d "$dl"
  whl="$(ls "$dl"/torch-*.whl | head -n1)"
  rm -rf "$HDR.tmp" && mkdir -p "$HDR.tmp"
  "$PY" - "$whl" "$HDR.tmp" <<'PYEOF'
import sys, zipfile
whl, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(whl) as z:
    names = [n for n in z.namelist() if n.startswith("torch/include/")]
    z.extractall(dest, members=names)
print(f"  unpacked {len(names)} header files")
PYEOF
  [[ -f "$HDR.tmp/torch/include/c10/cuda/impl/cuda_cmake_macros.h" ]] || {
    echo "check_cuda_compile: torch==$TV wheel has no cuda_cmake_macros.h (not a CUDA build?)" >&2; exit 2; }
  rm -rf "$HDR" && mv "$HDR.tmp" "$HDR"
  rm -rf "$dl"; trap - EXIT
fi
TI="$HDR/torch/include"
INCS=(-I "$ROOT/csrc" -I "$TI" -I "$TI/torch/csrc/api/include" -I "$CUDA_INC")
# The flags torch.utils.cpp_extension passes to nvcc (half conversions off, etc.).
TORCH_NVCC=(-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
            -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr -Xcompiler -fPIC)
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
fail=0
n=0
while IFS= read -r -d '' f; do
  n=$((n + 1)); s=$(date +%s)
  if "$NVCC" -std=c++20 -O3 "-gencode=arch=compute_${ARCH},code=sm_${ARCH}" "${TORCH_NVCC[@]}" "${INCS[@]}" \
      -DDISTILPOSE_WITH_CUDA=1 -c "$f" -o "$OUT/$(basename "$f").o"; then
    echo "ok   nvcc $f ($(( $(date +%s) - s )) s)"
  else
    echo "FAIL nvcc $f"; fail=1
  fi
done < <(find csrc -name '*.cu' -print0 | sort -z)
while IFS= read -r -d '' f; do
  n=$((n + 1)); s=$(date +%s)
  if "$CXX" -std=c++20 -fsyntax-only -Wall -DDISTILPOSE_WITH_CUDA=1 "${INCS[@]}" "$f"; then
    echo "ok   $CXX -fsyntax-only $f ($(( $(date +%s) - s )) s)"
  else
    echo "FAIL $CXX $f"; fail=1
  fi
done < <(find csrc/cuda -name '*.cpp' -print0 | sort -z)
[[ $n -gt 0 ]] || { echo "check_cuda_compile: no CUDA sources found under csrc/" >&2; exit 2; }
echo "check_cuda_compile: $n files, $(( $(date +%s) - t0 )) s, $([[ $fail == 0 ]] && echo PASS || echo FAIL)"
exit $fail
