"""Build switches of setup.py, the lazy loading of _C, and `python -m distilpose_kernels.info`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distilpose_kernels import _ext

ROOT = Path(__file__).resolve().parents[1]


def _run(args, env=None, timeout=240):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run(args, cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)


def test_import_does_not_load_extension_or_triton():
    code = (
        "import sys, distilpose_kernels\n"
        "assert 'distilpose_kernels._C' not in sys.modules\n"
        "assert 'triton' not in sys.modules\n"
        "distilpose_kernels.soft_argmax\n"  # resolving the op loads _C (when built)
        "print('_C' if 'distilpose_kernels._C' in sys.modules else 'no _C')\n"
    )
    r = _run([sys.executable, "-c", code])
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == ("_C" if _ext.load().loaded else "no _C")


def test_extension_module_attributes():
    st = _ext.load()
    if not st.loaded:
        if os.environ.get("DISTILPOSE_EXPECT_EXTENSION", "") == "1":
            pytest.fail(f"distilpose_kernels._C expected but not loaded: {st.error}")
        pytest.skip(f"extension not built: {st.error}")
    assert st.ops == ["soft_argmax_fwd", "soft_argmax_bwd", "decode_heatmaps",
                      "simhm_loss_ext_fwd", "simhm_loss_ext_bwd", "simhm_loss_ext", "simhm_targets_ext"]
    assert st.built_with_torch == torch.__version__.split("+")[0]
    if torch.version.cuda is None:
        assert not st.cuda_built and st.dispatch_keys == ("CPU",)
    assert "CPU" in st.dispatch_keys
    import distilpose_kernels.decode  # noqa: F401  (defines the schemas)
    import distilpose_kernels.heatmap  # noqa: F401

    for op in st.ops:
        if op == "simhm_loss_ext":  # autograd in C++; its forward-only kernel is the composite one
            for key in ("Autograd", "CompositeExplicitAutograd"):
                assert torch._C._dispatch_has_kernel_for_dispatch_key(f"distilpose::{op}", key), key
        else:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"distilpose::{op}", "CPU")


def test_info_cli_reports_every_op():
    r = _run([sys.executable, "-m", "distilpose_kernels.info", "--json"])
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(r.stdout)
    cpu = rep["dispatch"]["cpu"]
    for op in ("soft_argmax", "decode_heatmaps", "flip_heatmaps", "token_attention", "add_pos_layernorm",
               "simulated_heatmap_loss", "render_gaussian_heatmaps", "gaussian_heatmap_targets"):
        assert op in cpu and cpu[op]["why"], op
    # every public op with a dispatch is reported (a new op missing from info.py fails here)
    import distilpose_kernels as dk

    helpers = {"agrees_at_dtype", "annotate", "auto_choices", "capture_cuda_graph", "fp32_dot_precision", "info",
               "split_counters", "timed_choice", "timing_for_cuda_graphs", "tuned_configs",
               "programmatic_launch", "pdl_supported",
               "joint_mse_loss", "teacher_value_at_prediction"}  # utilities; plain PyTorch losses
    ops = {n for n in dk._LAZY if n[0].islower() and not n.endswith("_reference")} - helpers
    assert ops <= set(cpu), sorted(ops - set(cpu))
    assert {"qkv_attention", "regression_head"} <= set(cpu)
    assert cpu["soft_argmax"]["backend"] == ("cpp" if rep["extension"]["loaded"] else "reference")
    assert cpu["token_attention"]["backend"] == "reference"  # Triton needs CUDA tensors
    assert rep["pdl"]["cpu"] is False
    r = _run([sys.executable, "-c", "import sys, importlib, distilpose_kernels as dk; dk.info(); "
                                    "importlib.import_module('distilpose_kernels.info').info(); dk.info(); "
                                    "assert 'triton' not in sys.modules, 'info() imported triton'"])
    assert r.returncode == 0, r.stderr[-2000:]
    text = _run([sys.executable, "-m", "distilpose_kernels.info"],
                env={"DISTILPOSE_FORCE_REFERENCE": "1"}).stdout
    assert "soft_argmax" in text and "DISTILPOSE_FORCE_REFERENCE=1" in text
    # the kernels' environment switches are reported with their current values
    assert rep["switches"]["DISTILPOSE_SOFTARGMAX_VEC"]["default"] == "1"
    text = _run([sys.executable, "-m", "distilpose_kernels.info"], env={"DISTILPOSE_SOFTARGMAX_VEC": "0"}).stdout
    assert "DISTILPOSE_SOFTARGMAX_VEC=0" in text and "DISTILPOSE_HEATMAP_AUTOTUNE=" in text


def test_info_without_extension():
    r = _run([sys.executable, "-m", "distilpose_kernels.info", "--json"], env={"DISTILPOSE_DISABLE_EXTENSION": "1"})
    rep = json.loads(r.stdout)
    assert rep["extension"]["loaded"] is False and "DISTILPOSE_DISABLE_EXTENSION" in rep["extension"]["error"]
    assert rep["dispatch"]["cpu"]["soft_argmax"]["backend"] == "reference"


def test_setup_opt_out_builds_no_extension():
    r = _run([sys.executable, "setup.py", "--version"], env={"DISTILPOSE_NO_EXTENSION": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "building no extension" in r.stderr


def test_setup_without_torch_is_pure_python():
    code = ("import sys, runpy; sys.modules['torch'] = None; sys.argv = ['setup.py', '--version']; "
            "runpy.run_path('setup.py', run_name='__main__')")
    r = _run([sys.executable, "-c", code])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "torch is not importable at build time" in r.stderr and "WITHOUT the compiled extension" in r.stderr


def test_setup_selects_cpu_or_cuda():
    r = _run([sys.executable, "setup.py", "--version"], env={"FORCE_CUDA": ""})
    assert r.returncode == 0, r.stderr[-2000:]
    if torch.version.cuda is None:
        assert "CPU extension only (torch is a CPU build" in r.stderr
        r = _run([sys.executable, "setup.py", "--version"], env={"FORCE_CUDA": "1"})
        assert r.returncode != 0 and "FORCE_CUDA=1 but the installed torch is a CPU build" in r.stderr
    r = _run([sys.executable, "setup.py", "--version"], env={"FORCE_CUDA": "0"})
    assert r.returncode == 0 and "CPU extension only (FORCE_CUDA=0" in r.stderr


def test_extension_loaded_before_schemas_is_consistent():
    """_C may be imported (e.g. by info()) before decode.py defines the schemas: kernels
    registered first are checked against the schema when it is defined."""
    code = (
        "import torch\n"
        "from distilpose_kernels import _ext\n"
        "st = _ext.load()\n"
        "import distilpose_kernels as dk\n"
        "x = torch.randn(2, 3, 8, 6, requires_grad=True)\n"
        "c, f = dk.soft_argmax(x, 2.0)\n"
        "c.sum().backward()\n"
        "torch.library.opcheck(torch.ops.distilpose.soft_argmax_fwd.default, (x, 2.0))\n"
        "print('compiled' if st.loaded else 'python')\n"
    )
    r = _run([sys.executable, "-c", code])
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == ("compiled" if _ext.load().loaded else "python")


def test_extension_uses_the_shared_cxx_runtime():
    """_C must not carry a private copy of libstdc++ (a static fallback link): two C++ runtimes
    in one process break std::locale, and the first error message that formats a number
    segfaults. Seen with a CUDA image whose toolchain lacked the libstdc++.so symlink."""
    import shutil

    st = _ext.load()
    if not st.loaded:
        pytest.skip(f"extension not built: {st.error}")
    nm = shutil.which("nm")
    if nm is None or not sys.platform.startswith("linux"):
        pytest.skip("needs binutils' nm on Linux")
    so = st.path
    out = subprocess.run([nm, "-C", so], capture_output=True, text=True, timeout=60).stdout
    defined = [ln for ln in out.splitlines() if "std::ostream::_M_insert<long>" in ln and " U " not in ln]
    assert not defined, f"{so} defines libstdc++ internals (statically linked runtime): {defined[:3]}"
    # ... and the error path that crashed formats its message
    import distilpose_kernels.decode  # noqa: F401  (defines the op schemas)

    with pytest.raises(RuntimeError, match=r"got shape \[2, 4, 4\]"):
        torch.ops.distilpose.soft_argmax_fwd(torch.randn(2, 4, 4), 1.0)
