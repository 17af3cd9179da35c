"""Heatmap decoding benchmarks: soft-argmax forward, forward+backward, and argmax/DARK decode.

Shapes of the spec (K = 17 keypoints, 64 x 48 heatmaps), N in {1, 32, 256}, fp32:
  extension (C++ on CPU, CUDA on GPU: distilpose_kernels._C) vs the eager PyTorch reference vs
  torch.compile of the reference; decode also vs an mmpose-style numpy/cv2 loop (the library
  peer: mmpose 0.x keypoints_from_heatmaps, CPU only).
Bytes (for "gbps" in extra_info) = the unavoidable traffic: heatmaps read once (forward,
decode); forward+backward adds one more read and the gradient write (3x the heatmap bytes).
GPU goal (issue 5): soft-argmax forward at >= 70% of HBM bandwidth at N = 256.

GPU cases carry @pytest.mark.gpu and skip without CUDA; extension cases skip when _C is not
built (or lacks CUDA).

    pytest bench/bench_decode.py --benchmark-only --benchmark-json bench/results/decode-<device>.json
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import distilpose_kernels as dk
from distilpose_kernels import _ext

from benchutils import cuda_graph, input_copies, rotate, run_benchmark

K, H, W = 17, 64, 48
N_VALUES = (1, 32, 256)
IMPLS = ("extension", "reference", "compile")
BETA = 1.0
VEC_ENV = "DISTILPOSE_SOFTARGMAX_VEC"
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]


def _maps(n: int, device: str, positive: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, K, H, W, generator=g)
    return (x.abs() if positive else x * 3).to(device)


def _skip_unless(impl: str, device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if impl.startswith("extension") and not _ext.available(device):
        pytest.skip(f"extension not built for {device}: {_ext.load().error or 'built without CUDA'}")


def _backend(impl: str, device: str) -> str:
    return ("cpp" if device == "cpu" else "cuda") if impl.startswith("extension") else "reference"


@functools.lru_cache(maxsize=None)
def _compiled(name: str):
    fn = {"soft_argmax": dk.soft_argmax_reference, "decode": dk.decode_heatmaps_reference}[name]
    return torch.compile(fn, dynamic=False)


def _soft_argmax_fn(impl: str, device: str):
    if impl == "compile":
        return lambda x: _compiled("soft_argmax")(x, BETA)
    backend = _backend(impl, device)
    return lambda x: dk.soft_argmax(x, BETA, backend=backend)


def _bench(benchmark, fn, device, nbytes, **extra):
    return run_benchmark(benchmark, fn, device=device, bytes_moved=nbytes, **extra)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS + ("extension_scalar",))
@pytest.mark.parametrize("n", N_VALUES)
def test_soft_argmax_forward(benchmark, monkeypatch, device, impl, n):
    """``extension``: the default CUDA forward (the vectorised kernel); ``extension_scalar``:
    the scalar kernels (DISTILPOSE_SOFTARGMAX_VEC=0)."""
    if impl == "extension_scalar":
        if device != "cuda":
            pytest.skip("the vectorised / scalar choice is CUDA only")
        monkeypatch.setenv(VEC_ENV, "0")
    elif impl == "extension":
        monkeypatch.delenv(VEC_ENV, raising=False)
    _skip_unless(impl, device)
    benchmark.group = f"soft_argmax fwd {device} N={n}"
    x = _maps(n, device)
    nbytes = x.numel() * x.element_size() + n * K * 3 * 4
    # several copies of the input, used in turn: repeated calls must read HBM, not the L2 cache
    xs = [x] + [x.clone() for _ in range(input_copies(nbytes, device) - 1)]
    f = _soft_argmax_fn(impl, device)
    out = _bench(benchmark, rotate([functools.partial(f, xi) for xi in xs]), device, nbytes,
                 op="soft_argmax_fwd", impl=impl, n=n, shape=[n, K, H, W], input_copies=len(xs))
    assert torch.isfinite(out[0]).all()


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["scalar", "vec"])
@pytest.mark.parametrize("n", N_VALUES)
def test_soft_argmax_forward_cudagraph(benchmark, monkeypatch, n, kernel):
    """The extension's forward captured in CUDA graphs (one per rotated input copy): device time
    without the per-call Python and launch overhead, the number the bandwidth goal is about.
    ``vec``: the vectorised kernel (the default), ``scalar``: DISTILPOSE_SOFTARGMAX_VEC=0."""
    impl, device = "extension", "cuda"
    _skip_unless(impl, device)
    monkeypatch.setenv(VEC_ENV, "1" if kernel == "vec" else "0")
    benchmark.group = f"soft_argmax fwd {device} N={n}"
    x = _maps(n, device)
    nbytes = x.numel() * x.element_size() + n * K * 3 * 4
    f = _soft_argmax_fn(impl, device)
    xs = [x] + [x.clone() for _ in range(input_copies(nbytes, device) - 1)]
    replays = [cuda_graph(functools.partial(f, xi)) for xi in xs]
    name = "extension_scalar_cudagraph" if kernel == "scalar" else "extension_cudagraph"
    out = _bench(benchmark, rotate(replays), device, nbytes, op="soft_argmax_fwd", impl=name, n=n,
                 shape=[n, K, H, W], input_copies=len(replays), cuda_graph=True)
    assert torch.isfinite(out[0]).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n", N_VALUES)
def test_soft_argmax_forward_backward(benchmark, device, impl, n):
    _skip_unless(impl, device)
    benchmark.group = f"soft_argmax fwd+bwd {device} N={n}"
    x = _maps(n, device).requires_grad_(True)
    gout = torch.randn(n, K, 2, device=device)
    f = _soft_argmax_fn(impl, device)

    def step():
        x.grad = None
        coords, _ = f(x)
        coords.backward(gout)
        return x.grad

    grad = _bench(benchmark, step, device, 3 * x.numel() * x.element_size() + n * K * 5 * 4,
                  op="soft_argmax_fwd_bwd", impl=impl, n=n, shape=[n, K, H, W])
    assert torch.isfinite(grad).all()


def mmpose_numpy_decode(heatmaps: np.ndarray, method: str, kernel: int = 11) -> np.ndarray:
    """mmpose 0.x keypoints_from_heatmaps (heatmap pixels): per-heatmap Python/numpy/cv2 loops."""
    import cv2

    n, k, h, w = heatmaps.shape
    flat = heatmaps.reshape(n, k, -1)
    idx = flat.argmax(-1)
    maxvals = flat.max(-1)
    preds = np.stack([idx % w, idx // w], -1).astype(np.float32)
    preds[maxvals <= 0] = -1
    if method == "dark":
        border = (kernel - 1) // 2
        hm = heatmaps.copy()
        for i in range(n):
            for j in range(k):
                dr = np.zeros((h + 2 * border, w + 2 * border), dtype=np.float32)
                dr[border:-border, border:-border] = hm[i, j]
                dr = cv2.GaussianBlur(dr, (kernel, kernel), 0)[border:-border, border:-border]
                hm[i, j] = dr * (maxvals[i, j] / dr.max())
        hm = np.log(np.maximum(hm, 1e-10))
        for i in range(n):
            for j in range(k):
                px, py = int(preds[i, j, 0]), int(preds[i, j, 1])
                if 1 < px < w - 2 and 1 < py < h - 2:
                    m = hm[i, j]
                    d = np.array([0.5 * (m[py, px + 1] - m[py, px - 1]), 0.5 * (m[py + 1, px] - m[py - 1, px])])
                    dxx = 0.25 * (m[py, px + 2] - 2 * m[py, px] + m[py, px - 2])
                    dxy = 0.25 * (m[py + 1, px + 1] - m[py - 1, px + 1] - m[py + 1, px - 1] + m[py - 1, px - 1])
                    dyy = 0.25 * (m[py + 2, px] - 2 * m[py, px] + m[py - 2, px])
                    if dxx * dyy - dxy**2 != 0:
                        preds[i, j] -= np.linalg.inv(np.array([[dxx, dxy], [dxy, dyy]])) @ d
    else:
        for i in range(n):
            for j in range(k):
                px, py = int(preds[i, j, 0]), int(preds[i, j, 1])
                if 1 < px < w - 1 and 1 < py < h - 1:
                    m = heatmaps[i, j]
                    preds[i, j] += np.sign([m[py, px + 1] - m[py, px - 1], m[py + 1, px] - m[py - 1, px]]) * 0.25
    return preds


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS + ("mmpose_numpy",))
@pytest.mark.parametrize("method", ("argmax", "dark"))
@pytest.mark.parametrize("n", N_VALUES)
def test_decode(benchmark, device, impl, method, n):
    _skip_unless(impl, device)
    if impl == "mmpose_numpy" and device != "cpu":
        pytest.skip("numpy peer runs on the CPU")
    benchmark.group = f"decode {method} {device} N={n}"
    x = _maps(n, device, positive=True)
    if impl == "mmpose_numpy":
        xn = x.numpy()
        fn = lambda: mmpose_numpy_decode(xn, method)  # noqa: E731
    elif impl == "compile":
        fn = lambda: _compiled("decode")(x, method, 11)  # noqa: E731
    else:
        backend = _backend(impl, device)
        fn = lambda: dk.decode_heatmaps(x, method, 11, backend=backend)  # noqa: E731
    out = _bench(benchmark, fn, device, x.numel() * x.element_size() + n * K * 3 * 4,
                 op=f"decode_{method}", impl=impl, n=n, shape=[n, K, H, W])
    coords = out if isinstance(out, np.ndarray) else out[0]
    assert coords.shape[:2] == (n, K)
