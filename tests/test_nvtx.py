"""NVTX ranges: every public fused op and model stage is wrapped when DISTILPOSE_NVTX=1,
and nothing is wrapped (no extra Python call) when it is off.

The flag is read once, at decoration (import) time, so each mode runs in a fresh subprocess.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

#: model stages: "module:qualname" of the function that must carry a range
STAGES = [
    "distilpose.models.backbones.stemnet:StemNet.forward",
    "distilpose.models.backbones.hrnet:HRNet.forward",
    "distilpose.models.tde:TokenDistillingEncoder.forward",
    "distilpose.models.tde:TransformerLayer.forward",
    "distilpose.models.heads:RegressionHead.forward",
    "distilpose.models.heads:HeatmapHead.forward",
    "distilpose.models.distiller:Distiller.forward",
    "distilpose.losses:teacher_loss",
    "distilpose.runtime:flip_back_regression",
    "distilpose.runtime:flip_back_heatmaps",
    "distilpose.runtime:crop_to_image",
]
#: public fused ops of distilpose_kernels
OPS = [
    "token_attention",
    "simulated_heatmap_loss",
    "render_gaussian_heatmaps",
    "gaussian_heatmap_targets",
    "joint_mse_loss",
    "soft_argmax",
    "decode_heatmaps",
    "upsample_sum",
    "linear_gelu",
    # conv2d_relu and ConvReLU2d both run through this one (the range covers both)
    "distilpose_kernels.conv_epilogue:_conv2d_relu",
]

_PROBE = textwrap.dedent(
    r"""
    import importlib, json, sys, types

    fake = sys.argv[1] == "fake"
    ranges = []
    if fake:  # record the ranges instead of emitting them
        class _Range:
            def __init__(self, message=None, color=None, domain=None, **kw):
                self.message = message
            def __enter__(self):
                ranges.append(self.message)
                return self
            def __exit__(self, *exc):
                return False
        mod = types.ModuleType("nvtx")
        mod.annotate = _Range
        sys.modules["nvtx"] = mod

    import distilpose_kernels as dk
    from distilpose_kernels import _utils

    def target(spec):
        if ":" in spec:
            mod, qual = spec.split(":")
            obj = importlib.import_module(mod)
            for part in qual.split("."):
                obj = getattr(obj, part)
            return obj
        return getattr(dk, spec)

    report = {}
    for spec in json.loads(sys.argv[2]):
        try:
            fn = target(spec)
        except Exception as e:  # report, do not hide: the test names the missing piece
            report[spec] = {"error": f"{type(e).__name__}: {e}"}
            continue
        code = getattr(fn, "__code__", None)
        report[spec] = {
            "nvtx": getattr(fn, "__nvtx_name__", None),
            "file": code.co_filename if code is not None else None,
            "utils_file": _utils.__file__,
        }

    def plain(x):
        return x
    report["_annotate_identity"] = _utils.annotate("probe")(plain) is plain

    # run real forwards: student, teacher, distiller
    import torch
    from distilpose.models import build_model
    from distilpose.models.distiller import Distiller
    torch.manual_seed(0)
    s = build_model("distilpose_tiny")
    t = build_model("tokenpose_tiny")
    x = torch.randn(2, 3, 256, 192)
    batch = {"img": x, "target_coords": torch.rand(2, 17, 2), "target_weight": torch.ones(2, 17, 1)}
    del ranges[:]
    with torch.no_grad():
        s(x)
    report["_ranges_student"] = list(ranges)
    del ranges[:]
    with torch.no_grad():
        t(x)
    report["_ranges_teacher"] = list(ranges)
    del ranges[:]
    Distiller(s, t)(batch)["loss"].backward()
    report["_ranges_distill"] = list(ranges)
    print("REPORT" + json.dumps(report))
    """
)


def _probe(nvtx_on: bool, fake: bool) -> dict:
    env = dict(os.environ)
    env.pop("DISTILPOSE_NVTX", None)
    env.pop("DISTILPOSE_FORCE_REFERENCE", None)
    if nvtx_on:
        env["DISTILPOSE_NVTX"] = "1"
    env.setdefault("TRITON_INTERPRET", "1")
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, "fake" if fake else "real", json.dumps(STAGES + OPS)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT")][-1]
    return json.loads(line[len("REPORT"):])


@pytest.fixture(scope="module")
def report_on():
    return _probe(nvtx_on=True, fake=True)


@pytest.fixture(scope="module")
def report_off():
    return _probe(nvtx_on=False, fake=True)


@pytest.mark.parametrize("spec", STAGES + OPS)
def test_wrapped_when_on(report_on, spec):
    r = report_on[spec]
    assert "error" not in r, f"{spec}: {r.get('error')}"
    assert r["nvtx"] and r["nvtx"].startswith("distilpose"), f"{spec}: no NVTX range with DISTILPOSE_NVTX=1"


@pytest.mark.parametrize("spec", STAGES + OPS)
def test_plain_function_when_off(report_off, spec):
    r = report_off[spec]
    assert "error" not in r, f"{spec}: {r.get('error')}"
    assert r["nvtx"] is None
    # the function object is the one defined in its own module, not a wrapper from _utils
    assert r["file"] is not None and os.path.exists(r["file"])
    assert not os.path.samefile(r["file"], r["utils_file"]), f"{spec} is wrapped although NVTX is off"


def test_annotate_is_identity_when_off(report_off, report_on):
    assert report_off["_annotate_identity"] is True
    assert report_on["_annotate_identity"] is False


def test_ranges_emitted_in_forward(report_on):
    names = {spec: report_on[spec].get("nvtx") for spec in STAGES + OPS}
    student = report_on["_ranges_student"]
    teacher = report_on["_ranges_teacher"]
    layer = names["distilpose.models.tde:TransformerLayer.forward"]
    for spec in (
        "distilpose.models.backbones.stemnet:StemNet.forward",
        "distilpose.models.tde:TokenDistillingEncoder.forward",
        "distilpose.models.heads:RegressionHead.forward",
        "token_attention",
    ):
        assert names[spec] in student, (spec, student)
    assert student.count(layer) == 2  # distilpose_tiny has 2 TDE layers
    assert names["distilpose.models.backbones.hrnet:HRNet.forward"] in teacher
    assert names["distilpose.models.heads:HeatmapHead.forward"] in teacher


def test_ranges_emitted_in_distillation_step(report_on):
    names = {spec: report_on[spec].get("nvtx") for spec in STAGES + OPS}
    distill = report_on["_ranges_distill"]
    assert names["distilpose.models.distiller:Distiller.forward"] in distill
    assert names["simulated_heatmap_loss"] in distill


def test_no_ranges_when_off(report_off):
    assert report_off["_ranges_student"] == []
    assert report_off["_ranges_distill"] == []


def test_real_nvtx_module_runs():
    pytest.importorskip("nvtx")
    r = _probe(nvtx_on=True, fake=False)
    assert r["distilpose.models.tde:TokenDistillingEncoder.forward"]["nvtx"]
