"""Device code checked on the CPU: the vectorised soft-argmax forward's per-thread routines
(csrc/cuda/soft_argmax_vec.cuh, __host__ __device__) built by nvcc as host code and run for
every thread of a block against a float64 reference (tests/native/soft_argmax_vec_host_test.cu).
CI has nvcc (it compiles the CUDA sources); machines without it skip."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _nvcc():
    for cand in (os.environ.get("NVCC"), os.path.join(os.environ.get("CUDA_HOME", "/nonexistent"), "bin", "nvcc"),
                 shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def test_soft_argmax_vec_per_thread_code_on_host(tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (set NVCC or CUDA_HOME)")
    exe = tmp_path / "soft_argmax_vec_host_test"
    build = subprocess.run(
        [nvcc, "-std=c++20", "-O2", "-I", str(ROOT / "csrc"), "-o", str(exe),
         str(ROOT / "tests" / "native" / "soft_argmax_vec_host_test.cu")],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().startswith("ok:"), run.stdout[-3000:]
    passed, total = (int(v) for v in run.stdout.split(":")[1].split("cases")[0].split(" of "))
    assert passed == total >= 288
