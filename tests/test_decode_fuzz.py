"""Adversarial checks of soft_argmax / decode_heatmaps / flip_heatmaps against an independent
float64 numpy implementation of the mmpose 0.x conventions (not the package's references)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import distilpose_kernels as dk
from distilpose_kernels import _ext
from distilpose_kernels import decode as D

EXT = _ext.load()
CPU_BACKENDS = ["reference"] + (["cpp"] if EXT.loaded else [])
needs_ext = pytest.mark.skipif(not EXT.loaded, reason=f"extension not built: {EXT.error}")


# ----------------------------------------------------------------------------- numpy float64 model


def np_argmax_decode(hm: np.ndarray) -> np.ndarray:
    """mmpose _get_max_preds + quarter shift (1 < x < W-1, 1 < y < H-1), all in float64."""
    hm = np.asarray(hm, np.float64)
    n, k, h, w = hm.shape
    out = np.empty((n, k, 2))
    for i in range(n):
        for j in range(k):
            a = hm[i, j]
            idx = int(np.argmax(a.reshape(-1)))
            px, py = idx % w, idx // w
            if not a.reshape(-1)[idx] > 0:
                out[i, j] = -1
                continue
            x, y = float(px), float(py)
            if 1 < px < w - 1 and 1 < py < h - 1:
                x += 0.25 * np.sign(a[py, px + 1] - a[py, px - 1])
                y += 0.25 * np.sign(a[py + 1, px] - a[py - 1, px])
            out[i, j] = (x, y)
    return out


def np_gauss_kernel(kernel: int) -> np.ndarray:
    small = {1: [1.0], 3: [0.25, 0.5, 0.25], 5: [0.0625, 0.25, 0.375, 0.25, 0.0625]}
    if kernel in small:
        return np.array(small[kernel])
    sigma = ((kernel - 1) * 0.5 - 1) * 0.3 + 0.8
    x = np.arange(kernel) - (kernel - 1) * 0.5
    g = np.exp(-0.5 * x * x / sigma**2)
    return g / g.sum()


def np_dark_decode(hm: np.ndarray, kernel: int) -> np.ndarray:
    """mmpose 0.x DARK: zero-padded Gaussian blur, rescale to the original max, log(max(., 1e-10)),
    one Taylor step where 1 < x < W-2, 1 < y < H-2 and the Hessian is invertible. float64."""
    hm = np.asarray(hm, np.float64)
    n, k, h, w = hm.shape
    g, r = np_gauss_kernel(kernel), kernel // 2
    out = np.empty((n, k, 2))
    for i in range(n):
        for j in range(k):
            a = hm[i, j]
            idx = int(np.argmax(a.reshape(-1)))
            px, py, mv = idx % w, idx // w, a.reshape(-1)[idx]
            if not mv > 0:
                out[i, j] = -1
                continue
            x, y = float(px), float(py)
            if 1 < px < w - 2 and 1 < py < h - 2:
                pad = np.zeros((h + 2 * r, w + 2 * r))
                pad[r:r + h, r:r + w] = a
                rows = np.stack([np.convolve(p, g, "valid") for p in pad])  # (h + 2r, w)
                b = np.stack([np.convolve(c, g, "valid") for c in rows.T]).T  # (h, w)
                L = np.log(np.maximum(b * (mv / b.max()), 1e-10))
                dx = 0.5 * (L[py, px + 1] - L[py, px - 1])
                dy = 0.5 * (L[py + 1, px] - L[py - 1, px])
                dxx = 0.25 * (L[py, px + 2] - 2 * L[py, px] + L[py, px - 2])
                dyy = 0.25 * (L[py + 2, px] - 2 * L[py, px] + L[py - 2, px])
                dxy = 0.25 * (L[py + 1, px + 1] - L[py - 1, px + 1] - L[py + 1, px - 1] + L[py - 1, px - 1])
                det = dxx * dyy - dxy * dxy
                if det != 0:
                    x += -(dyy * dx - dxy * dy) / det
                    y += -(-dxy * dx + dxx * dy) / det
            out[i, j] = (x, y)
    return out


def np_soft_argmax(hm: np.ndarray, beta: float) -> tuple[np.ndarray, np.ndarray]:
    z = np.asarray(hm, np.float64)
    n, k, h, w = z.shape
    z = z.reshape(n, k, h * w)
    e = np.exp(beta * (z - z.max(-1, keepdims=True)))
    p = e / e.sum(-1, keepdims=True)
    xs, ys = np.tile(np.arange(w), h), np.repeat(np.arange(h), w)
    return np.stack([(p * xs).sum(-1), (p * ys).sum(-1)], -1), p.max(-1)


def weak_noisy_peaks(n, k, h, w, seed):
    """Low-confidence keypoints: a faint Gaussian (max ~0.05) in zero-mean noise, so the blurred
    map can be <= 0 within 2 px of the maximum (what an MSE-trained head gives for occluded joints)."""
    g = torch.Generator().manual_seed(seed)
    cx = torch.rand(n, k, 1, 1, generator=g, dtype=torch.float64) * (w - 9) + 4.5
    cy = torch.rand(n, k, 1, 1, generator=g, dtype=torch.float64) * (h - 9) + 4.5
    xs = torch.arange(w, dtype=torch.float64)
    ys = torch.arange(h, dtype=torch.float64)[:, None]
    peak = 0.05 * torch.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / 8)
    return (peak + 0.03 * torch.randn(n, k, h, w, generator=g, dtype=torch.float64)).float()


# ----------------------------------------------------------------------------- DARK where the clamp bites


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dark_sparse_blob_matches_mmpose_when_log_clamp_bites(backend):
    """kernel 3 on a 2-pixel blob: the blurred taps 2 px away are exactly 0, so mmpose's
    log(max(rescaled blur, 1e-10)) clamps there; the rescale no longer cancels."""
    hm = torch.zeros(1, 2, 7, 8)
    hm[0, 0, 3, 3] = hm[0, 0, 3, 4] = 1.0  # tie: the first (x=3) wins
    hm[0, 1, 3, 4] = 0.8
    hm[0, 1, 4, 4] = 0.6
    want = np_dark_decode(hm.numpy(), 3)
    got, _ = dk.decode_heatmaps(hm, "dark", 3, backend=backend)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dark_weak_noisy_peaks_match_mmpose(backend):
    hm = weak_noisy_peaks(2, 48, 24, 20, seed=0)
    want = np_dark_decode(hm.numpy(), 11)
    got, _ = dk.decode_heatmaps(hm, "dark", 11, backend=backend)
    got = got.double().numpy()
    idx = hm.flatten(2).argmax(-1)
    step = np.abs(want - torch.stack([idx % 20, idx // 20], -1).numpy()).max(-1)
    # float32 vs float64 math: tight where the Taylor step is well conditioned, relative elsewhere
    tol = np.where(step < 1.0, 1e-4, 1e-3 * (1 + step))
    err = np.abs(got - want).max(-1)
    assert (err <= tol).all(), (err.max(), np.argwhere(err > tol)[:5].tolist())


# ----------------------------------------------------------------------------- argmax on float64 maps


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_argmax_quarter_shift_uses_float64_for_float64_maps(backend):
    """float64 maps: neighbour differences below float32 resolution, or beyond its range,
    still decide the quarter shift (outputs are float64 for float64 input)."""
    hm = torch.zeros(1, 3, 7, 7, dtype=torch.float64)
    hm[0, 0, 3, 3] = 1.0
    hm[0, 0, 3, 4] = 0.5 + 1e-12  # right neighbour higher by 1e-12: +0.25 in x
    hm[0, 0, 3, 2] = 0.5
    hm[0, 1, 3, 3] = 1e301  # beyond float32: the lower neighbour 1e300 must not become inf
    hm[0, 1, 4, 3] = 1e300
    hm[0, 1, 2, 3] = 1e299
    hm[0, 2, 3, 3] = 1.0
    hm[0, 2, 2, 3] = 1 - 1e-13  # upper neighbour higher: -0.25 in y
    hm[0, 2, 4, 3] = 1 - 2e-13
    want = np_argmax_decode(hm.numpy())
    assert want[0].tolist() == [[3.25, 3.0], [3.0, 3.25], [3.0, 2.75]]
    got, vals = dk.decode_heatmaps(hm, "argmax", backend=backend)
    assert got.dtype == torch.float64
    np.testing.assert_array_equal(got.numpy(), want)
    np.testing.assert_array_equal(vals.numpy(), hm.flatten(2).amax(-1).numpy())


# ----------------------------------------------------------------------------- shapes, dtypes, strides


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_decode_odd_shapes_ties_and_strides_vs_numpy(dtype):
    g = torch.Generator().manual_seed(5)
    for n, k, h, w in [(1, 133, 5, 7), (2, 3, 1, 9), (2, 3, 9, 1), (1, 2, 4, 4), (3, 5, 6, 5)]:
        base = torch.rand(n, k, w, h, generator=g).to(dtype).transpose(2, 3)  # non-contiguous
        base = torch.where(base > 0.9, torch.ones((), dtype=dtype), base)  # many tied maxima
        base[0, 0] = 0.0  # flat zero: no detection
        for backend in ("cpp", "reference"):
            got, vals = dk.decode_heatmaps(base, "argmax", backend=backend)
            np.testing.assert_array_equal(got.double().numpy(), np_argmax_decode(base.double().numpy()))
            np.testing.assert_array_equal(vals.double().numpy(), base.double().flatten(2).amax(-1).numpy())


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_soft_argmax_strided_dtypes_and_large_beta_vs_numpy(dtype):
    g = torch.Generator().manual_seed(6)
    for beta in (1.0, 1e4):
        x = (torch.randn(2, 133, 9, 6, generator=g) * 3).to(dtype).transpose(2, 3)[:, ::2]
        want_c, want_f = np_soft_argmax(x.double().numpy(), beta)
        for backend in ("cpp", "reference"):
            c, f = dk.soft_argmax(x, beta, backend=backend)
            tol = 1e-9 if dtype == torch.float64 else 2e-3
            np.testing.assert_allclose(c.double().numpy(), want_c, rtol=0, atol=tol * 9)
            np.testing.assert_allclose(f.double().numpy(), want_f, rtol=tol, atol=1e-7)


# ----------------------------------------------------------------------------- double backward


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_soft_argmax_double_backward(backend):
    """create_graph=True: the gradient is itself differentiable (gradgradcheck), on every backend."""
    x = (torch.randn(2, 3, 4, 5, dtype=torch.float64) * 2).requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "autograd kernel was not registered" must not happen
        assert torch.autograd.gradgradcheck(lambda t: dk.soft_argmax(t, 1.7, backend=backend)[0], (x,))


# ----------------------------------------------------------------------------- flip_heatmaps


@pytest.mark.parametrize("pairs", [torch.tensor([0, 1]), [0, 1], [(0.5, 1)], [("a", 1)], [(0, 1.0)]],
                         ids=["1d-tensor", "flat-list", "float", "str", "float-int"])
def test_flip_heatmaps_bad_pairs_name_the_argument(pairs):
    x = torch.randn(1, 3, 4, 5)
    with pytest.raises(ValueError, match=r"flip_pairs: expected"):
        dk.flip_heatmaps(x, pairs)


def test_flip_heatmaps_int_like_pairs_accepted():
    x = torch.randn(2, 4, 3, 5)
    want = dk.flip_heatmaps(x, [(0, 3), (1, 2)])
    for pairs in (np.array([[0, 3], [1, 2]]), torch.tensor([[0, 3], [1, 2]]), ((np.int64(0), 3), (1, 2))):
        torch.testing.assert_close(dk.flip_heatmaps(x, pairs), want, rtol=0, atol=0)


# ----------------------------------------------------------------------------- GPU: the same cases on the CUDA kernel


@pytest.mark.gpu
def test_cuda_dark_rescale_and_float64_quarter_shift_match_mmpose():
    """The CUDA decoder follows the same two rules as the C++ one: DARK's rescale where the log
    clamp bites (sparse blob, weak peaks in noise) and float64 neighbour differences for the
    quarter shift of float64 maps."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    hm = torch.zeros(1, 2, 7, 8)
    hm[0, 0, 3, 3] = hm[0, 0, 3, 4] = 1.0
    hm[0, 1, 3, 4] = 0.8
    hm[0, 1, 4, 4] = 0.6
    got, _ = dk.decode_heatmaps(hm.cuda(), "dark", 3, backend="cuda")
    np.testing.assert_allclose(got.double().cpu().numpy(), np_dark_decode(hm.numpy(), 3), rtol=0, atol=1e-4)
    hm = weak_noisy_peaks(2, 48, 24, 20, seed=0)
    want = np_dark_decode(hm.numpy(), 11)
    got = dk.decode_heatmaps(hm.cuda(), "dark", 11, backend="cuda")[0].double().cpu().numpy()
    idx = hm.flatten(2).argmax(-1)
    step = np.abs(want - torch.stack([idx % 20, idx // 20], -1).numpy()).max(-1)
    tol = np.where(step < 1.0, 1e-4, 1e-3 * (1 + step))
    err = np.abs(got - want).max(-1)
    assert (err <= tol).all(), (err.max(), np.argwhere(err > tol)[:5].tolist())
    h64 = torch.zeros(1, 2, 7, 7, dtype=torch.float64)
    h64[0, 0, 3, 3], h64[0, 0, 3, 4], h64[0, 0, 3, 2] = 1.0, 0.5 + 1e-12, 0.5
    h64[0, 1, 3, 3], h64[0, 1, 4, 3], h64[0, 1, 2, 3] = 1e301, 1e300, 1e299
    got, _ = dk.decode_heatmaps(h64.cuda(), "argmax", backend="cuda")
    np.testing.assert_array_equal(got.cpu().numpy(), np_argmax_decode(h64.numpy()))
