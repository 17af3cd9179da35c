"""Compile Triton kernels for sm_90 on a machine without a GPU (the CPU interpreter is lenient;
lowering to a cubin with ptxas catches real compile errors, and the compiled kernel's shared
memory is checked against the 227 KiB an H100/H200 block may use). Used by the kernel test files."""
from __future__ import annotations

import os
import subprocess
import sys

PRELUDE = r'''
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget

TARGET = GPUTarget("cuda", 90, 32)
SM90_SHARED_MAX = 227 * 1024


def compile_(fn, ptrs, scalars, consts, **opts):
    """ptrs / scalars: argument -> Triton type ("*bf16", "fp32"); others i32; consts: constexprs
    (a kernel's USE_PDL, programmatic dependent launch, is False unless given)."""
    if "USE_PDL" in fn.arg_names:
        consts = {"USE_PDL": False, **consts}
    sig = {n: ("constexpr" if n in consts else ptrs.get(n) or scalars.get(n) or "i32") for n in fn.arg_names}
    # constexprs keyed by argument index (what every Triton 3.x takes; newer ones also take names)
    constexprs = {(fn.arg_names.index(n),): v for n, v in consts.items()}
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=TARGET, options=opts)
    # an H100/H200 block may use at most 227 KiB of shared memory; more fails only at launch
    assert kernel.metadata.shared <= SM90_SHARED_MAX, (fn.__name__, consts, opts, kernel.metadata.shared)
    return kernel
'''


def compile_for_sm90(body: str, timeout: float = 900) -> None:
    """Run PRELUDE + ``body`` (calls of ``compile_``) in a fresh process without TRITON_INTERPRET;
    fails with its stderr unless every compile succeeded."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", PRELUDE + body + '\nprint("AOT-OK")\n'], capture_output=True, text=True,
                       env=env, timeout=timeout)
    assert r.returncode == 0 and "AOT-OK" in r.stdout, r.stderr[-3000:]
