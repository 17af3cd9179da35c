"""Build script: package metadata comes from pyproject.toml; this file adds the compiled
extension ``distilpose_kernels._C`` (soft-argmax, heatmap decoding and simulated-heatmap loss kernels).

Build switches (environment variables):
  DISTILPOSE_NO_EXTENSION=1  build no extension at all (pure-Python install; the ops use
                             their PyTorch references).
  FORCE_CUDA=1               build the CUDA kernels even without a visible GPU (needs nvcc
                             and a CUDA build of torch). FORCE_CUDA=0 builds the CPU kernels only.
  TORCH_CUDA_ARCH_LIST       CUDA architectures, e.g. "9.0" or "8.0;8.6;9.0+PTX" (default: the
                             visible GPUs, or 8.0;8.6;8.9;9.0+PTX when none is visible).
  MAX_JOBS                   parallel compile jobs (ninja).
  DISTILPOSE_DEBUG=1         -O0 -g builds (and -lineinfo for CUDA).

torch is not a build requirement (an isolated build would download a CUDA torch): install
with ``pip install --no-build-isolation .`` so the extension is built against your torch.
Without an importable torch the package installs without the extension, with a note.
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;8.6;8.9;9.0+PTX"


def _env(name: str) -> str:
    return os.environ.get(name, "").strip().lower()


_ON, _OFF = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def _flag(name: str) -> bool:
    v = _env(name)
    if v in _ON + _OFF:
        return v in _ON
    raise SystemExit(f"distilpose setup: {name}={os.environ[name]!r}: expected 1/true/yes/on or 0/false/no/off")


def _check_max_jobs() -> None:
    v = os.environ.get("MAX_JOBS", "").strip()
    if v and not (v.isdigit() and int(v) >= 1):
        raise SystemExit(f"distilpose setup: MAX_JOBS={os.environ['MAX_JOBS']!r}: expected a positive integer")


def _note(msg: str) -> None:
    print(f"distilpose setup: {msg}", file=sys.stderr)


def _rel(paths: list[str]) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _libstdcxx_link_args() -> list:
    """Link the C++ runtime as the shared libstdc++.so.6 that torch itself uses.

    Where the toolchain's ``libstdc++.so`` symlink is missing (seen on a CUDA image), ``-lstdc++``
    silently falls back to ``libstdc++.a`` and the extension carries a private copy of the
    runtime. Two runtimes in one process break std::locale (an error message that formats a
    number segfaults inside the copy). Naming the shared object explicitly, ahead of the
    implicit ``-lstdc++``, resolves every runtime symbol from it.
    """
    if not sys.platform.startswith("linux"):
        return []
    cxx = os.environ.get("CXX", "c++")
    try:
        out = subprocess.run([cxx, "-print-file-name=libstdc++.so.6"], capture_output=True, text=True, timeout=30)
        path = out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return []
    if os.path.isabs(path) and os.path.exists(path):
        return [path]
    return []


def _extensions():
    _check_max_jobs()
    if _flag("DISTILPOSE_NO_EXTENSION"):
        _note("DISTILPOSE_NO_EXTENSION is set: building no extension (ops use their PyTorch references)")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:  # e.g. an isolated build: torch is deliberately not a build requirement
        _note(
            f"torch is not importable at build time ({exc}): installing WITHOUT the compiled extension "
            "(pure-PyTorch references). Install torch first, then reinstall with "
            "`pip install --no-build-isolation .` to build distilpose_kernels._C."
        )
        return [], {}

    force = _env("FORCE_CUDA")
    if force not in _ON + _OFF:
        raise SystemExit(f"distilpose setup: FORCE_CUDA={os.environ['FORCE_CUDA']!r}: expected 1 (build CUDA), "
                         "0 (CPU only) or unset (auto)")
    torch_cuda = torch.version.cuda is not None
    if force in _ON:
        if not torch_cuda:
            raise SystemExit("distilpose setup: FORCE_CUDA=1 but the installed torch is a CPU build "
                             "(torch.version.cuda is None); install a CUDA build of torch or unset FORCE_CUDA")
        if CUDA_HOME is None:
            raise SystemExit("distilpose setup: FORCE_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME)")
        with_cuda = True
    elif force in _OFF[1:]:
        with_cuda = False
    else:
        with_cuda = torch_cuda and CUDA_HOME is not None and torch.cuda.is_available()

    debug = _flag("DISTILPOSE_DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # Vectorisation of the CPU kernels: `omp simd` reductions (no OpenMP runtime) and
    # if-conversion of the branch-free exp (trapping math off; NaN/inf semantics unchanged).
    cxx = opt + ([] if sys.platform == "win32" else ["-fopenmp-simd", "-fno-trapping-math"])
    sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    macros = [("DISTILPOSE_TORCH_VERSION", torch.__version__.split("+")[0])]
    link = _libstdcxx_link_args()
    include_dirs = [os.path.join(ROOT, "csrc")]
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
            _note(f"no visible GPU: TORCH_CUDA_ARCH_LIST={DEFAULT_ARCHS}")
        sources += _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
        # "8.0;9.0+PTX" -> 8.0_9.0+PTX: no shell metacharacters on the (ninja) command line
        archs = "_".join(os.environ.get("TORCH_CUDA_ARCH_LIST", "visible").replace(";", " ").split())
        macros += [("DISTILPOSE_WITH_CUDA", "1"), ("DISTILPOSE_CUDA_ARCHS", archs)]
        nvcc = opt + (["-lineinfo"] if debug else [])
        ext = CUDAExtension("distilpose_kernels._C", sources, include_dirs=include_dirs, define_macros=macros,
                            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link)
        _note(f"building the CPU + CUDA extension (torch {torch.__version__}, CUDA {torch.version.cuda}, "
              f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '<visible GPUs>')})")
    else:
        ext = CppExtension("distilpose_kernels._C", sources, include_dirs=include_dirs, define_macros=macros,
                           extra_compile_args={"cxx": cxx}, extra_link_args=link)
        why = ("FORCE_CUDA=0" if force in _OFF[1:] else
               "torch is a CPU build" if not torch_cuda else
               "no CUDA toolkit found" if CUDA_HOME is None else "no visible GPU (set FORCE_CUDA=1 to build CUDA anyway)")
        _note(f"building the CPU extension only ({why}; torch {torch.__version__})")
    try:
        import ninja  # noqa: F401
        use_ninja = True
    except ImportError:
        use_ninja = False
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=use_ninja)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
