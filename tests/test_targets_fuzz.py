"""Adversarial checks of gaussian_heatmap_targets: random odd sizes and non-integer strides against
the mmpose numpy loops of tests/test_targets.py, strided / transposed / 16- and 64-bit inputs, and
extreme (but accepted: positive, finite) sigmas on every backend (the reference, the Triton kernel
and the compiled extension's CPU kernel, the mirror of its CUDA kernel).

On CPU the Triton kernel runs under TRITON_INTERPRET=1 (tests/conftest.py), reached with
backend="triton"."""
from __future__ import annotations

import random

import pytest
import torch

import distilpose_kernels as dk
from distilpose_kernels import heatmap_triton as hmt  # noqa: F401  (kernels defined under the interpreter)
from distilpose_kernels import targets as tg

from test_targets import numpy_targets

pytestmark = pytest.mark.interpreter

#: the compiled extension's CPU kernel ("cpp") too, where it is built (CI builds it)
_HAS_EXT = tg.extension_targets_available("cpu")
_needs_ext = pytest.mark.skipif(not _HAS_EXT, reason="the compiled extension (targets op) is not built")
BACKENDS = ("reference", "triton") + (("cpp",) if _HAS_EXT else ())
KERNELS = ("triton", pytest.param("cpp", marks=_needs_ext))
ENCODINGS = ("msra", "unbiased", "udp")


def _case(seed):
    rnd = random.Random(seed)
    n, k = rnd.choice([1, 2]), rnd.choice([1, 3])
    hh, hw = rnd.randint(2, 9), rnd.randint(2, 9)
    ih, iw = hh * rnd.choice([1, 2, 3, 4]) + rnd.randint(0, 3), hw * rnd.choice([1, 2, 4]) + rnd.randint(0, 3)
    sigma = rnd.choice([0.2, 0.5, 1.0, 1.5, 2.7, 3.3])
    g = torch.Generator().manual_seed(seed)
    kp = torch.rand(n, k, 2, generator=g) * torch.tensor([iw * 1.6, ih * 1.6]) - torch.tensor([iw * 0.3, ih * 0.3])
    if seed % 3 == 0:
        kp = kp.round()  # on-pixel centres: ties of int(x / stride + 0.5)
    vis = torch.rand(n, k, generator=g).round(decimals=1)  # soft weights, 0 and 1 included
    return kp, vis, (ih, iw), (hh, hw), sigma


@pytest.mark.parametrize("backend", ("reference",) + KERNELS)
@pytest.mark.parametrize("seed", range(6))
def test_targets_random_sizes_strided_inputs_match_numpy(seed, backend):
    kp, vis, ins, hms, sigma = _case(seed)
    kp_t = kp.transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous keypoints
    vis_t = torch.stack([vis, vis], -1)[..., 1:]  # (N, K, 1) column view
    for enc in ENCODINGS:
        want_m, want_w = numpy_targets(kp, vis, ins, hms, sigma, enc)
        m, w = dk.gaussian_heatmap_targets(kp_t, vis_t, ins, hms, sigma, enc, backend=backend)
        torch.testing.assert_close(w, want_w, rtol=0, atol=0)
        torch.testing.assert_close(m, want_m, rtol=0, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_targets_other_keypoint_dtypes(dtype):
    kp, vis, ins, hms, sigma = _case(7)
    kp, vis = kp.to(dtype), vis.to(dtype)
    for enc in ENCODINGS:
        want_m, want_w = numpy_targets(kp.float(), vis.float(), ins, hms, sigma, enc)
        for backend in BACKENDS:
            m, w = dk.gaussian_heatmap_targets(kp, vis, ins, hms, sigma, enc, backend=backend)
            assert m.dtype == w.dtype == torch.float32
            torch.testing.assert_close(w, want_w, rtol=0, atol=0)
            torch.testing.assert_close(m, want_m, rtol=0, atol=2e-5)


@pytest.mark.parametrize("sigma", [1e-21, 1e-30])
@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("backend", KERNELS)
def test_targets_tiny_sigma_no_nan(encoding, sigma, backend):
    """1 / (2 sigma^2) overflowed float32 (sigma < 4e-20): 0 * inf = NaN at the centre pixel. The
    reference (float64) and mmpose give a single 1 at the centre (a centre on a pixel)."""
    kp = torch.tensor([[[8.0, 12.0], [4.0, 4.0]]])  # stride 4 -> heatmap pixels (2, 3) and (1, 1)
    vis = torch.ones(1, 2)
    ins = (29, 21) if encoding == "udp" else (32, 24)  # udp stride (in - 1) / (hm - 1) = 4
    want_m, want_w = dk.gaussian_heatmap_targets(kp, vis, ins, (8, 6), sigma, encoding, backend="reference")
    assert float(want_m.sum()) == 2.0
    m, w = dk.gaussian_heatmap_targets(kp, vis, ins, (8, 6), sigma, encoding, backend=backend)
    torch.testing.assert_close(w, want_w, rtol=0, atol=0)
    torch.testing.assert_close(m, want_m, rtol=0, atol=0)


@pytest.mark.parametrize("sigma", [1e9, 1e12])
@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("backend", KERNELS)
def test_targets_huge_sigma(encoding, sigma, backend):
    """A huge sigma: the Gaussian is flat (1 everywhere) and the weight is the visibility. The
    kernel converted mu -/+ 3 sigma to int32 (overflow past sigma ~ 7e8): weight 0, empty maps."""
    kp = torch.tensor([[[10.0, 12.0], [30.0, -3.0]]])
    vis = torch.tensor([[1.0, 0.7]])
    want_m, want_w = dk.gaussian_heatmap_targets(kp, vis, (32, 24), (8, 6), sigma, encoding, backend="reference")
    torch.testing.assert_close(want_w.flatten(), vis.flatten())
    assert float(want_m[0, 0].min()) == 1.0
    m, w = dk.gaussian_heatmap_targets(kp, vis, (32, 24), (8, 6), sigma, encoding, backend=backend)
    torch.testing.assert_close(w, want_w, rtol=0, atol=0)
    torch.testing.assert_close(m, want_m, rtol=0, atol=1e-6)
