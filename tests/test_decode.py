"""soft_argmax / decode_heatmaps / flip_heatmaps: compiled kernels vs references vs mmpose (numpy)."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings
from typing import Optional

import numpy as np
import pytest
import torch

import distilpose_kernels as dk
from distilpose_kernels import _ext
from distilpose_kernels import decode as D

EXT = _ext.load()
needs_ext = pytest.mark.skipif(not EXT.loaded, reason=f"extension not built: {EXT.error}")
CPU_BACKENDS = ["reference"] + (["cpp"] if EXT.loaded else [])
FLOATS = [torch.float32, torch.float16, torch.bfloat16]


def gaussian_maps(n, k, h, w, sigma=2.0, noise=0.02, seed=0, dtype=torch.float32):
    """MSRA-style Gaussian heatmaps with sub-pixel centres inside the map, plus noise (max ~1)."""
    g = torch.Generator().manual_seed(seed)
    cx = torch.rand(n, k, 1, 1, generator=g, dtype=torch.float64) * (w - 5) + 2.5
    cy = torch.rand(n, k, 1, 1, generator=g, dtype=torch.float64) * (h - 5) + 2.5
    xs = torch.arange(w, dtype=torch.float64).view(1, 1, 1, w)
    ys = torch.arange(h, dtype=torch.float64).view(1, 1, h, 1)
    hm = torch.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * sigma**2))
    hm = hm + noise * torch.rand(n, k, h, w, generator=g, dtype=torch.float64)
    return hm.to(dtype), torch.cat([cx, cy], -1).view(n, k, 2)


def logits(n, k, h, w, scale=3.0, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, h, w, generator=g) * scale).to(dtype)


# ----------------------------------------------------------------------------- build expectation


def test_extension_present_when_expected():
    """CI sets DISTILPOSE_EXPECT_EXTENSION=1: a missing build must fail, not skip."""
    if os.environ.get("DISTILPOSE_EXPECT_EXTENSION", "") != "1":
        pytest.skip("DISTILPOSE_EXPECT_EXTENSION is not 1")
    assert EXT.loaded, f"distilpose_kernels._C expected but not loaded: {EXT.error}"
    assert D.KERNEL_SOURCES["CPU"] == "compiled"
    assert torch._C._dispatch_has_kernel_for_dispatch_key("distilpose::soft_argmax_fwd", "CPU")


def test_auto_backend_uses_extension_on_cpu():
    x = logits(1, 2, 5, 6)
    expected = "extension" if EXT.loaded else "reference"
    assert D._resolve_backend("soft_argmax", x, None) == expected
    os.environ["DISTILPOSE_FORCE_REFERENCE"] = "1"
    try:
        assert D._resolve_backend("soft_argmax", x, None) == "reference"
    finally:
        del os.environ["DISTILPOSE_FORCE_REFERENCE"]


# ----------------------------------------------------------------------------- soft-argmax forward


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(2, 17, 64, 48), (1, 133, 17, 13), (3, 2, 1, 7), (1, 1, 9, 1)])
@pytest.mark.parametrize("beta", [1.0, 7.5])
def test_soft_argmax_matches_float64(backend, shape, beta):
    x = logits(*shape)
    coords, conf = dk.soft_argmax(x, beta, backend=backend)
    want_c, want_f = D.soft_argmax_reference(x.double(), beta)
    assert coords.dtype == torch.float32 and conf.dtype == torch.float32
    assert coords.shape == (shape[0], shape[1], 2) and conf.shape == shape[:2]
    torch.testing.assert_close(coords, want_c.float(), atol=2e-4 * max(shape[2:]), rtol=0)
    torch.testing.assert_close(conf, want_f.float(), atol=1e-6, rtol=1e-4)
    # confidence is the largest softmax probability
    p = torch.softmax(beta * x.double().flatten(2), -1)
    torch.testing.assert_close(conf.double(), p.amax(-1), atol=1e-6, rtol=1e-4)


@needs_ext
@pytest.mark.parametrize("dtype", FLOATS + [torch.float64])
def test_soft_argmax_dtypes_ext_vs_reference(dtype):
    x = logits(2, 17, 16, 12, dtype=dtype)
    c1, f1 = dk.soft_argmax(x, 2.0, backend="cpp")
    c2, f2 = dk.soft_argmax_reference(x, 2.0)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert c1.dtype == acc and f1.dtype == acc
    tol = 1e-9 if dtype == torch.float64 else 3e-4
    torch.testing.assert_close(c1, c2, atol=tol * 16, rtol=0)
    torch.testing.assert_close(f1, f2, atol=tol, rtol=tol)
    # fp32 accumulation: half inputs match the float64 result on the same (rounded) values
    c64, _ = D.soft_argmax_reference(x.double(), 2.0)
    torch.testing.assert_close(c1.double(), c64, atol=5e-3 if dtype != torch.float64 else 1e-9, rtol=0)


@needs_ext
def test_soft_argmax_large_map_accuracy():
    """256 x 192 maps with a wide distribution: fp32 accumulation still within 5e-5 px."""
    x = logits(1, 3, 256, 192, scale=0.5)
    c, f = dk.soft_argmax(x, 0.3, backend="cpp")
    rc, rf = D.soft_argmax_reference(x.double(), 0.3)
    torch.testing.assert_close(c.double(), rc, atol=5e-5, rtol=0)
    torch.testing.assert_close(f.double(), rf, atol=0, rtol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_soft_argmax_peaks_at_borders_and_corners(backend):
    h, w = 11, 8
    spots = [(0, 0), (w - 1, 0), (0, h - 1), (w - 1, h - 1), (3, 0), (0, 5), (w - 1, 4), (2, h - 1)]
    x = torch.full((1, len(spots), h, w), -5.0)
    for i, (px, py) in enumerate(spots):
        x[0, i, py, px] = 30.0
    coords, conf = dk.soft_argmax(x, 1.0, backend=backend)
    torch.testing.assert_close(coords[0], torch.tensor(spots, dtype=torch.float32), atol=1e-6, rtol=0)
    assert torch.all(conf > 0.999)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_soft_argmax_flat_heatmap(backend):
    h, w = 7, 10
    x = torch.full((2, 3, h, w), 0.37)
    coords, conf = dk.soft_argmax(x, 5.0, backend=backend)
    torch.testing.assert_close(coords, torch.tensor([(w - 1) / 2, (h - 1) / 2]).expand(2, 3, 2), atol=1e-5, rtol=0)
    torch.testing.assert_close(conf, torch.full((2, 3), 1.0 / (h * w)), atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_soft_argmax_nonfinite_policy(backend):
    h, w = 6, 5
    x = logits(1, 6, h, w)
    x[0, 0, 2, 3] = float("nan")  # NaN -> NaN outputs
    x[0, 1] = float("-inf")  # all -inf -> NaN
    x[0, 2, 1, 1] = float("inf")  # +inf -> NaN
    x[0, 3, :, :2] = float("-inf")  # masked columns: probability exactly 0
    x[0, 4] = -1e30  # very negative finite logits: fine
    x[0, 4, 4, 2] = -1e29
    coords, conf = dk.soft_argmax(x, 3.0, backend=backend)
    for i in (0, 1, 2):
        assert torch.isnan(coords[0, i]).all() and torch.isnan(conf[0, i])
    # masked map = softmax over the remaining columns, shifted by 2
    sub_c, sub_f = D.soft_argmax_reference(x[:, 3:4, :, 2:].double(), 3.0)
    torch.testing.assert_close(coords[0, 3].double(), sub_c[0, 0] + torch.tensor([2.0, 0.0], dtype=torch.float64),
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(conf[0, 3].double(), sub_f[0, 0], atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(coords[0, 4], torch.tensor([2.0, 4.0]), atol=1e-6, rtol=0)
    # other heatmaps are unaffected
    c5, f5 = D.soft_argmax_reference(x[:, 5:6].double(), 3.0)
    torch.testing.assert_close(coords[0, 5].double(), c5[0, 0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_soft_argmax_large_beta_is_hard_argmax(backend):
    x = logits(2, 5, 13, 9)
    coords, conf = dk.soft_argmax(x, 1e6, backend=backend)
    idx = x.flatten(2).argmax(-1)
    want = torch.stack([idx % 9, idx // 9], -1).float()
    assert torch.isfinite(coords).all() and torch.isfinite(conf).all()
    torch.testing.assert_close(coords, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(conf, torch.ones_like(conf), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_soft_argmax_non_contiguous(backend):
    base = logits(3, 17, 12, 40)
    views = [base.transpose(2, 3), base[:, ::2, :, 5:35:3], base.permute(1, 0, 2, 3)]
    for v in views:
        assert not v.is_contiguous()
        c1, f1 = dk.soft_argmax(v, 2.0, backend=backend)
        c2, f2 = dk.soft_argmax(v.contiguous(), 2.0, backend=backend)
        torch.testing.assert_close(c1, c2, atol=0, rtol=0)
        torch.testing.assert_close(f1, f2, atol=0, rtol=0)


@needs_ext
def test_random_shapes_ext_vs_reference_outputs_fully_written():
    """Odd random shapes: every output element written (finite for finite input) and correct."""
    g = torch.Generator().manual_seed(123)
    for _ in range(6):
        n, k, h, w = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((1, 4), (1, 20), (1, 40), (1, 40)))
        x = torch.randn(n, k, h, w, generator=g) * 4
        c, f = dk.soft_argmax(x, 1.5, backend="cpp")
        rc, rf = D.soft_argmax_reference(x.double(), 1.5)
        assert torch.isfinite(c).all() and torch.isfinite(f).all()
        torch.testing.assert_close(c.double(), rc, atol=1e-4 * max(h, w), rtol=0)
        torch.testing.assert_close(f.double(), rf, atol=1e-6, rtol=1e-4)
        for method in ("argmax", "dark"):
            dc, dv = dk.decode_heatmaps(x.abs() + 0.01, method, 5, backend="cpp")
            rdc, rdv = D.decode_heatmaps_reference(x.abs() + 0.01, method, 5)
            assert torch.isfinite(dc).all() and torch.isfinite(dv).all()
            torch.testing.assert_close(dv, rdv, atol=0, rtol=0)
            if method == "argmax":
                torch.testing.assert_close(dc, rdc, atol=0, rtol=0)
            else:  # noise maps: the Taylor step is ill-conditioned, only the integer part must agree
                assert ((dc - rdc).abs() <= 1.5).all()


# ----------------------------------------------------------------------------- soft-argmax backward


@needs_ext
def test_soft_argmax_gradcheck_float64():
    x = logits(2, 3, 5, 7, dtype=torch.float64).requires_grad_(True)
    fn = lambda t: dk.soft_argmax(t, 1.3, backend="cpp")[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7)
    # -inf entries: finite gradients, exactly zero there
    y = x.detach().clone()
    y[0, 0, :, :3] = float("-inf")
    y.requires_grad_(True)
    c, _ = dk.soft_argmax(y, 1.3, backend="cpp")
    c.sum().backward()
    assert torch.isfinite(y.grad).all() and (y.grad[0, 0, :, :3] == 0).all()


@pytest.mark.parametrize("dtype", FLOATS)
@needs_ext
def test_soft_argmax_backward_ext_vs_reference(dtype):
    x = logits(2, 17, 9, 11, dtype=dtype)
    g = torch.randn(2, 17, 2)
    grads = []
    for backend in ("cpp", "reference"):
        xi = x.clone().requires_grad_(True)
        c, f = dk.soft_argmax(xi, 1.7, backend=backend)
        assert not f.requires_grad  # confidence is a score, not differentiable
        (c * g).sum().backward()
        assert xi.grad.dtype == dtype
        grads.append(xi.grad.float())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(grads[0], grads[1], atol=tol * grads[1].abs().max().item(), rtol=0)


@needs_ext
def test_soft_argmax_opcheck():
    x = logits(2, 3, 6, 5).requires_grad_(True)
    torch.library.opcheck(torch.ops.distilpose.soft_argmax_fwd.default, (x, 2.0))
    c, f, m = torch.ops.distilpose.soft_argmax_fwd(x.detach(), 2.0)
    torch.library.opcheck(torch.ops.distilpose.soft_argmax_bwd.default, (torch.randn(2, 3, 2), x.detach(), c, f, m, 2.0))


@needs_ext
@pytest.mark.parametrize("method", ["argmax", "dark"])
def test_decode_opcheck(method):
    hm, _ = gaussian_maps(2, 3, 16, 12)
    torch.library.opcheck(torch.ops.distilpose.decode_heatmaps.default, (hm, method, 11))


def test_soft_argmax_compile_fullgraph():
    x = logits(2, 3, 8, 6).requires_grad_(True)
    fn = torch.compile(lambda t: dk.soft_argmax(t, 2.0)[0].sum(), fullgraph=True, backend="aot_eager")
    out = fn(x)
    out.backward()
    ref_x = x.detach().clone().requires_grad_(True)
    dk.soft_argmax_reference(ref_x, 2.0)[0].sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad, atol=1e-5, rtol=1e-4)


def test_python_fallback_kernels_match():
    """The PyTorch kernels registered where _C has none (e.g. CUDA in a CPU build) are correct."""
    x = logits(2, 4, 7, 9)
    c, f, m = D._py_soft_argmax_fwd(x, 2.0)
    rc, rf = D.soft_argmax_reference(x, 2.0)
    torch.testing.assert_close(c, rc)
    torch.testing.assert_close(f, rf)
    g = torch.randn(2, 4, 2)
    xr = x.clone().requires_grad_(True)
    (D.soft_argmax_reference(xr, 2.0)[0] * g).sum().backward()
    torch.testing.assert_close(D._py_soft_argmax_bwd(g, x, c, f, m, 2.0), xr.grad, atol=1e-5, rtol=1e-4)


def test_ops_work_without_extension():
    """With the extension disabled, schemas, fake kernels and autograd still exist (defined once)."""
    code = (
        "import torch, distilpose_kernels as dk\n"
        "from distilpose_kernels import decode as D\n"
        "assert not D._EXT.loaded and D.KERNEL_SOURCES == {'CPU': 'python', 'CUDA': 'python'}\n"
        "x = torch.randn(2, 3, 6, 5, requires_grad=True)\n"
        "c, f, m = torch.ops.distilpose.soft_argmax_fwd(x, 2.0)\n"
        "c.sum().backward()\n"
        "assert x.grad is not None and torch.isfinite(x.grad).all()\n"
        "assert dk.decode_heatmaps(x.detach().abs())[0].shape == (2, 3, 2)\n"
        "torch.library.opcheck(torch.ops.distilpose.soft_argmax_fwd.default, (x, 2.0))\n"
        "print('ok')\n"
    )
    env = dict(os.environ, DISTILPOSE_DISABLE_EXTENSION="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


# ----------------------------------------------------------------------------- errors


def test_errors_are_clear():
    x = logits(1, 2, 4, 4)
    with pytest.raises(ValueError, match=r"heatmaps: expected a 4-D tensor"):
        dk.soft_argmax(x[0])
    with pytest.raises(TypeError, match=r"heatmaps: expected dtype"):
        dk.soft_argmax(x.long())
    with pytest.raises(TypeError, match=r"heatmaps: expected dtype"):
        dk.decode_heatmaps(x.int())
    with pytest.raises(ValueError, match=r"H and W must be > 0"):
        dk.soft_argmax(x[:, :, :0])
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"beta: expected a finite value > 0"):
            dk.soft_argmax(x, bad)
    with pytest.raises(ValueError, match=r"heatmaps: backend='cuda' needs a cuda tensor"):
        dk.soft_argmax(x, backend="cuda")
    with pytest.raises(ValueError, match=r"backend must be"):
        dk.soft_argmax(x, backend="triton")
    with pytest.raises(ValueError, match=r"method: expected one of"):
        dk.decode_heatmaps(x, method="udp")
    for k in (0, 4, 65, 3.0):
        with pytest.raises(ValueError, match=r"kernel: expected an odd int"):
            dk.decode_heatmaps(x, method="dark", kernel=k)
    with pytest.raises(ValueError, match=r"flip_pairs: index out of range"):
        dk.flip_heatmaps(x, [(0, 5)])


@needs_ext
def test_compiled_op_errors_are_clear():
    x = logits(1, 2, 4, 4)
    with pytest.raises(RuntimeError, match=r"heatmaps: expected a 4-D tensor"):
        torch.ops.distilpose.soft_argmax_fwd(x[0], 1.0)
    with pytest.raises(RuntimeError, match=r"heatmaps: expected dtype"):
        torch.ops.distilpose.decode_heatmaps(x.long(), "argmax", 11)
    with pytest.raises(RuntimeError, match=r"beta: expected a finite value > 0"):
        torch.ops.distilpose.soft_argmax_fwd(x, -2.0)
    with pytest.raises(RuntimeError, match=r"method: expected 'argmax' or 'dark'"):
        torch.ops.distilpose.decode_heatmaps(x, "udp", 11)
    with pytest.raises(RuntimeError, match=r"kernel: expected an odd size"):
        torch.ops.distilpose.decode_heatmaps(x, "dark", 10)
    c, f, m = torch.ops.distilpose.soft_argmax_fwd(x, 1.0)
    with pytest.raises(RuntimeError, match=r"grad_coords: shape"):
        torch.ops.distilpose.soft_argmax_bwd(torch.zeros(1, 3, 2), x, c, f, m, 1.0)


# ----------------------------------------------------------------------------- decode vs mmpose (numpy)


def mmpose_get_max_preds(heatmaps):
    """mmpose 0.x _get_max_preds (verbatim logic)."""
    n, k, _, w = heatmaps.shape
    hr = heatmaps.reshape((n, k, -1))
    idx = np.argmax(hr, 2).reshape((n, k, 1))
    maxvals = np.amax(hr, 2).reshape((n, k, 1))
    preds = np.tile(idx, (1, 1, 2)).astype(np.float32)
    preds[:, :, 0] = preds[:, :, 0] % w
    preds[:, :, 1] = preds[:, :, 1] // w
    preds = np.where(np.tile(maxvals, (1, 1, 2)) > 0.0, preds, -1)
    return preds, maxvals


def mmpose_gaussian_blur(heatmaps, kernel=11):
    import cv2

    border = (kernel - 1) // 2
    n, k, h, w = heatmaps.shape
    for i in range(n):
        for j in range(k):
            origin_max = np.max(heatmaps[i, j])
            dr = np.zeros((h + 2 * border, w + 2 * border), dtype=np.float32)
            dr[border:-border, border:-border] = heatmaps[i, j].copy()
            dr = cv2.GaussianBlur(dr, (kernel, kernel), 0)
            heatmaps[i, j] = dr[border:-border, border:-border].copy()
            heatmaps[i, j] *= origin_max / np.max(heatmaps[i, j])
    return heatmaps


def mmpose_taylor(heatmap, coord):
    h, w = heatmap.shape[:2]
    px, py = int(coord[0]), int(coord[1])
    if 1 < px < w - 2 and 1 < py < h - 2:
        dx = 0.5 * (heatmap[py][px + 1] - heatmap[py][px - 1])
        dy = 0.5 * (heatmap[py + 1][px] - heatmap[py - 1][px])
        dxx = 0.25 * (heatmap[py][px + 2] - 2 * heatmap[py][px] + heatmap[py][px - 2])
        dxy = 0.25 * (heatmap[py + 1][px + 1] - heatmap[py - 1][px + 1] - heatmap[py + 1][px - 1]
                      + heatmap[py - 1][px - 1])
        dyy = 0.25 * (heatmap[py + 2][px] - 2 * heatmap[py][px] + heatmap[py - 2][px])
        derivative = np.array([[dx], [dy]])
        hessian = np.array([[dxx, dxy], [dxy, dyy]])
        if dxx * dyy - dxy**2 != 0:
            offset = -np.linalg.inv(hessian) @ derivative
            coord += np.squeeze(np.array(offset.T), axis=0)
    return coord


def mmpose_decode(heatmaps, method, kernel=11):
    """keypoints_from_heatmaps of mmpose 0.x in heatmap pixels (post_process default/unbiased)."""
    heatmaps = heatmaps.copy()
    n, k, h, w = heatmaps.shape
    preds, maxvals = mmpose_get_max_preds(heatmaps)
    if method == "dark":
        heatmaps = np.log(np.maximum(mmpose_gaussian_blur(heatmaps, kernel), 1e-10))
        for i in range(n):
            for j in range(k):
                preds[i][j] = mmpose_taylor(heatmaps[i][j], preds[i][j])
    else:
        for i in range(n):
            for j in range(k):
                hm = heatmaps[i][j]
                px, py = int(preds[i][j][0]), int(preds[i][j][1])
                if 1 < px < w - 1 and 1 < py < h - 1:
                    diff = np.array([hm[py][px + 1] - hm[py][px - 1], hm[py + 1][px] - hm[py - 1][px]])
                    preds[i][j] += np.sign(diff) * 0.25
    return preds, maxvals[..., 0]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("method,kernel,shape", [
    ("argmax", 11, (2, 17, 64, 48)),
    ("dark", 11, (2, 17, 64, 48)),
    ("dark", 11, (1, 133, 17, 13)),
    ("dark", 7, (1, 5, 32, 24)),
    ("dark", 17, (1, 5, 33, 25)),
])
def test_decode_matches_mmpose_numpy(backend, method, kernel, shape):
    hm, _ = gaussian_maps(*shape, seed=3)
    want_c, want_v = mmpose_decode(hm.numpy(), method, kernel)
    coords, maxvals = dk.decode_heatmaps(hm, method, kernel, backend=backend)
    assert coords.shape == shape[:2] + (2,) and maxvals.shape == shape[:2]
    np.testing.assert_allclose(maxvals.numpy(), want_v, rtol=0, atol=0)
    np.testing.assert_allclose(coords.numpy(), want_c, rtol=0, atol=1e-4 if method == "dark" else 0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dark_recovers_subpixel_centre(backend):
    hm, centre = gaussian_maps(2, 17, 64, 48, noise=0.0, seed=5)
    c_arg, _ = dk.decode_heatmaps(hm, "argmax", backend=backend)
    c_dark, _ = dk.decode_heatmaps(hm, "dark", backend=backend)
    err_arg = (c_arg.double() - centre).norm(dim=-1).mean()
    err_dark = (c_dark.double() - centre).norm(dim=-1).mean()
    assert err_dark < 0.05 < err_arg, (err_dark, err_arg)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("method", ["argmax", "dark"])
def test_decode_edge_cases(backend, method):
    h, w = 9, 8
    hm = torch.rand(1, 8, h, w) * 0.5
    hm[0, 0, 0, 0] = 2.0  # corner peak: no refinement at the border
    hm[0, 1, h - 1, w - 1] = 2.0
    hm[0, 2] = 0.3  # flat positive: first index (0, 0)
    hm[0, 3] = 0.0  # flat zero: no detection
    hm[0, 4] = -hm[0, 4]  # all negative: no detection
    hm[0, 5, 4, 4] = float("nan")  # NaN: no detection, maxval NaN
    hm[0, 6, 4, 3] = float("inf")  # +inf: a valid maximum, refinement skipped if not finite
    hm[0, 7, 4, 5] = 3.0
    hm[0, 7, 6, 2] = 3.0  # tie: first occurrence
    coords, maxvals = dk.decode_heatmaps(hm, method, 3, backend=backend)
    c = coords[0].tolist()
    assert c[0] == [0.0, 0.0] and c[1] == [w - 1.0, h - 1.0] and c[2] == [0.0, 0.0]
    assert c[3] == [-1.0, -1.0] and c[4] == [-1.0, -1.0] and c[5] == [-1.0, -1.0]
    assert math.isnan(maxvals[0, 5].item()) and maxvals[0, 6].item() == math.inf
    assert torch.isfinite(coords[0, 6]).all() and abs(c[6][0] - 3) <= 0.5 and abs(c[6][1] - 4) <= 0.5
    assert abs(c[7][0] - 5) <= 0.5 and abs(c[7][1] - 4) <= 0.5
    assert maxvals[0, 2].item() == pytest.approx(0.3) and maxvals[0, 3].item() == 0.0


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("method", ["argmax", "dark"])
def test_decode_dtypes_ext_vs_reference(dtype, method):
    hm, _ = gaussian_maps(2, 17, 32, 24, dtype=dtype, seed=7)
    c1, v1 = dk.decode_heatmaps(hm, method, backend="cpp")
    c2, v2 = dk.decode_heatmaps_reference(hm, method)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert c1.dtype == acc and v1.dtype == acc
    torch.testing.assert_close(v1, v2, atol=0, rtol=0)
    torch.testing.assert_close(c1, c2, atol=2e-3 if method == "dark" else 0, rtol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_decode_non_contiguous_and_no_grad(backend):
    hm, _ = gaussian_maps(2, 17, 24, 20)
    v = hm.transpose(0, 1).requires_grad_(True)
    c1, m1 = dk.decode_heatmaps(v, "dark", backend=backend)
    c2, m2 = dk.decode_heatmaps(v.detach().contiguous(), "dark", backend=backend)
    assert not c1.requires_grad
    torch.testing.assert_close(c1, c2, atol=0, rtol=0)
    torch.testing.assert_close(m1, m2, atol=0, rtol=0)


# ----------------------------------------------------------------------------- flip


def test_flip_heatmaps_matches_mmpose():
    x = torch.randn(2, 5, 6, 7)
    pairs = [(1, 2), (3, 4)]
    out = dk.flip_heatmaps(x, pairs, shift=True)
    # mmpose flip_back + shift_heatmap
    a = x.numpy().copy()
    flipped = a.copy()
    for l, r in pairs:
        flipped[:, l] = a[:, r]
        flipped[:, r] = a[:, l]
    flipped = flipped[..., ::-1].copy()
    flipped[:, :, :, 1:] = flipped[:, :, :, :-1]
    np.testing.assert_array_equal(out.numpy(), flipped)
    # without the shift it is an involution; tensor pairs work too
    y = dk.flip_heatmaps(dk.flip_heatmaps(x, torch.tensor(pairs), shift=False), pairs, shift=False)
    torch.testing.assert_close(y, x, atol=0, rtol=0)


def test_soft_argmax_of_flipped_map_mirrors_x():
    x = logits(1, 3, 8, 9)
    c, _ = dk.soft_argmax(x, 2.0)
    cf, _ = dk.soft_argmax(dk.flip_heatmaps(x, None, shift=False), 2.0)
    torch.testing.assert_close(cf[..., 0], 8 - c[..., 0], atol=1e-4, rtol=0)
    torch.testing.assert_close(cf[..., 1], c[..., 1], atol=1e-4, rtol=0)


def test_soft_argmax_module():
    m = dk.SoftArgmax(beta=2.0, normalize=True)
    x = logits(2, 3, 8, 6)
    c, f = m(x)
    rc, rf = D.soft_argmax_reference(x, 2.0)
    torch.testing.assert_close(c, (rc + 0.5) / torch.tensor([6.0, 8.0]), atol=1e-5, rtol=0)
    assert "beta=2.0" in repr(m)


# ----------------------------------------------------------------------------- GPU (CUDA vs CPU)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOATS + [torch.float64])
# one shape per CUDA forward path: a block per map with its values held in registers (4, 8, 16
# and 32 per thread: 35, 825, 3072 and 4800 px), the streaming two-pass block loop (12288 px)
@pytest.mark.parametrize("shape", [(4, 17, 64, 48), (3, 5, 7, 5), (2, 7, 33, 25), (2, 3, 80, 60), (2, 3, 128, 96)],
                         ids=str)
def test_cuda_soft_argmax_matches_cpu(dtype, shape, monkeypatch):
    monkeypatch.setenv("DISTILPOSE_SOFTARGMAX_VEC", "0")  # the scalar kernels (the vector one: below)
    n, k, h, w = shape
    x = logits(n, k, h, w, dtype=dtype)
    x[0, 0, 3, 3] = float("nan")
    x[0, 1] = float("-inf")
    backend = "cuda" if _ext.available("cuda") else None
    g = torch.randn(n, k, 2)
    xc = x.cuda().requires_grad_(True)
    c, f = dk.soft_argmax(xc, 2.0, backend=backend)
    (c * g.cuda()).nan_to_num().sum().backward()
    xr = x.clone().requires_grad_(True)
    rc, rf = D.soft_argmax_reference(xr, 2.0)
    (rc * g).nan_to_num().sum().backward()
    tol = 1e-9 if dtype == torch.float64 else 3e-4
    torch.testing.assert_close(c.cpu(), rc, atol=tol * max(h, w), rtol=0, equal_nan=True)
    torch.testing.assert_close(f.cpu(), rf, atol=tol, rtol=tol, equal_nan=True)
    gtol = 1e-9 if dtype == torch.float64 else (1e-5 if dtype == torch.float32 else 2e-2)
    torch.testing.assert_close(xc.grad.cpu().float().nan_to_num(), xr.grad.float().nan_to_num(),
                               atol=gtol * xr.grad.float().nan_to_num().abs().max().item(), rtol=0)


def _cuda_kernel_names(fn) -> Optional[str]:
    """Names of the CUDA kernels ``fn`` launches; None where the profiler records nothing
    (CUPTI held by another tool: under compute-sanitizer, which then checks the launches)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = " ".join(e.name for e in prof.events())
    if not names:
        warnings.warn("torch.profiler recorded no CUDA kernels (CUPTI unavailable): kernel names not checked")
        return None
    return names


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOATS)
# fp32: 1, 2, 4 and 8 vectors per thread (24, 1632, 3072, 7680 px); fp16/bf16: 1, 1, 2, 4
@pytest.mark.parametrize("shape", [(2, 3, 1, 24), (2, 5, 17, 96), (4, 17, 64, 48), (2, 3, 96, 80)], ids=str)
@pytest.mark.parametrize("switch", [None, "1", " On "], ids=["default", "1", "on"])
def test_cuda_soft_argmax_vec_kernel_matches_cpu(dtype, shape, switch, monkeypatch):
    """The vectorised forward (the default; DISTILPOSE_SOFTARGMAX_VEC unset or on) runs and
    agrees with the CPU path, NaN and all -inf maps included; its saved maximum drives a
    correct backward."""
    if switch is None:
        monkeypatch.delenv("DISTILPOSE_SOFTARGMAX_VEC", raising=False)
    else:
        monkeypatch.setenv("DISTILPOSE_SOFTARGMAX_VEC", switch)
    n, k, h, w = shape
    x = logits(n, k, h, w, dtype=dtype)
    x[0, 0, 0, min(3, w - 1)] = float("nan")
    x[0, 1] = float("-inf")
    g = torch.randn(n, k, 2)
    xc = x.cuda().requires_grad_(True)
    out = {}
    names = _cuda_kernel_names(lambda: out.update(r=dk.soft_argmax(xc, 2.0, backend="cuda")))
    assert names is None or "soft_argmax_fwd_vec_kernel" in names, names
    c, f = out["r"]
    (c * g.cuda()).nan_to_num().sum().backward()
    xr = x.clone().requires_grad_(True)
    rc, rf = D.soft_argmax_reference(xr, 2.0)
    (rc * g).nan_to_num().sum().backward()
    torch.testing.assert_close(c.cpu(), rc, atol=3e-4 * max(h, w), rtol=0, equal_nan=True)
    torch.testing.assert_close(f.cpu(), rf, atol=3e-4, rtol=3e-4, equal_nan=True)
    gtol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(xc.grad.cpu().float().nan_to_num(), xr.grad.float().nan_to_num(),
                               atol=gtol * xr.grad.float().nan_to_num().abs().max().item(), rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("switch", ["0", "off", " FALSE "])
def test_cuda_soft_argmax_vec_kernel_switched_off(switch, monkeypatch):
    """DISTILPOSE_SOFTARGMAX_VEC=0/off/false runs the scalar kernel on an input the vector
    kernel would take, with the same result."""
    x = logits(4, 17, 64, 48).cuda()
    monkeypatch.delenv("DISTILPOSE_SOFTARGMAX_VEC", raising=False)
    want = dk.soft_argmax(x, 2.0, backend="cuda")
    monkeypatch.setenv("DISTILPOSE_SOFTARGMAX_VEC", switch)
    names = _cuda_kernel_names(lambda: dk.soft_argmax(x, 2.0, backend="cuda"))
    assert names is None or ("soft_argmax_fwd_vec_kernel" not in names and "soft_argmax_fwd" in names), names
    got = dk.soft_argmax(x, 2.0, backend="cuda")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=3e-4 * 64, rtol=3e-4)


@pytest.mark.gpu
def test_cuda_soft_argmax_vec_kernel_falls_back(monkeypatch):
    """Inputs outside the vector kernel's rules (W not a multiple of the vector, misaligned
    maps) run the scalar kernels, correctly."""
    monkeypatch.setenv("DISTILPOSE_SOFTARGMAX_VEC", "1")
    odd = logits(2, 3, 9, 6, dtype=torch.float16).cuda()  # 6 % 8 != 0
    base = logits(1, 1, 1, 3 * 8 * 8 + 1).cuda()  # a view starting 4 bytes in: not 16-byte aligned
    shifted = base.view(-1)[1:].view(3, 1, 8, 8)
    for x in (odd, shifted):
        names = _cuda_kernel_names(lambda: dk.soft_argmax(x, 1.0, backend="cuda"))
        assert names is None or ("soft_argmax_fwd_vec_kernel" not in names and "soft_argmax_fwd" in names), names
        c, f = dk.soft_argmax(x, 1.0, backend="cuda")
        rc, rf = D.soft_argmax_reference(x.cpu(), 1.0)
        torch.testing.assert_close(c.cpu(), rc, atol=3e-3, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("method", ["argmax", "dark"])
def test_cuda_decode_matches_cpu(dtype, method):
    hm, _ = gaussian_maps(4, 133, 33, 25, dtype=dtype, seed=11)
    hm[0, 0] = -1.0
    hm[0, 1, 3, 4] = float("nan")
    backend = "cuda" if _ext.available("cuda") else None
    c, v = dk.decode_heatmaps(hm.cuda(), method, backend=backend)
    rc, rv = dk.decode_heatmaps(hm, method)
    torch.testing.assert_close(v.cpu(), rv, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(c.cpu(), rc, atol=2e-3 if method == "dark" else 0, rtol=0)


@pytest.mark.gpu
def test_cuda_extension_built_when_expected():
    if os.environ.get("DISTILPOSE_EXPECT_EXTENSION", "") != "1":
        pytest.skip("DISTILPOSE_EXPECT_EXTENSION is not 1")
    assert _ext.available("cuda"), "CUDA kernels expected on a GPU machine (build with FORCE_CUDA=1)"
    torch.library.opcheck(torch.ops.distilpose.soft_argmax_fwd.default,
                          (logits(2, 3, 8, 6).cuda().requires_grad_(True), 2.0))


def test_soft_argmax_inference_path_skips_autograd_and_matches():
    """Without anything to differentiate the op runs below the autograd key; same values, and
    with grad enabled the autograd kernel still gives gradients."""
    x = torch.randn(3, 5, 7, 6) * 2
    with torch.no_grad():
        c0, k0 = dk.soft_argmax(x.clone().requires_grad_())
    c1, k1 = dk.soft_argmax(x)  # no requires_grad: the same below-autograd path
    xg = x.clone().requires_grad_()
    c2, k2 = dk.soft_argmax(xg)
    assert c0.grad_fn is None and c1.grad_fn is None and c2.grad_fn is not None
    for a, b in ((c0, c2), (c1, c2), (k0, k2), (k1, k2)):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)
    c2.sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0
