"""Simulated-heatmap benchmarks: Reg2HM + score loss (forward + backward) and teacher targets.

Loss, shapes of the spec (K = 17, 64 x 48 heatmaps), N in {32, 256}:
  fused (the default path: the CUDA extension's kernels with C++ autograd when built, else Triton;
  extra_info "path" says which), fused_triton (the Triton kernels) vs eager reference vs
  torch.compile of the reference;
  "*_cudagraph" variants replay forward + backward from a CUDA graph (kernel time without the
  Python and launch overhead, which is of the order of the fused kernels' ~20 us at N = 256);
  "*_opgrad_*" variants take the op's own forward + backward with the upstream gradients given
  (no caller-side add / multiply / ones-fill kernels in the graph); "fused_pdl_opgrad_cudagraph"
  is that graph captured with programmatic dependent launch (``capture_cuda_graph(pdl=True)``:
  the extension's finalize and backward kernels scheduled before their predecessor ends).
  Bytes = the unavoidable traffic: the teacher heatmaps read once, plus coords, sigma, score and
  weights read and their gradients written; "gbps" in extra_info is that over the median time.
Targets, N = 64: Triton kernel (GPU) vs the vectorised PyTorch path vs a per-sample numpy loop
  (mmpose style). Bytes = the heatmaps written.

GPU cases carry @pytest.mark.gpu and skip without CUDA; the CPU cases (eager vs compile for the
loss at N = 32, torch vs numpy for the targets) always run.

    pytest bench/bench_heatmap.py --benchmark-only --benchmark-json bench/results/heatmap-<gpu>.json
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import distilpose_kernels as dk
from distilpose_kernels import heatmap as hm
from distilpose_kernels import targets as dk_targets
from benchutils import cuda_graph, input_copies, rotate, run_benchmark

K, H, W = 17, 64, 48
INPUT = (256, 192)
TEACHER_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def loss_bytes(n: int, k: int, h: int, w: int, teacher_elt: int) -> float:
    """Teacher read once + (coords 2, sigma 2, score 1, weight 1) fp32 read + 5 fp32 gradients written."""
    return n * k * h * w * teacher_elt + n * k * (6 + 5) * 4


def _loss_inputs(n: int, device, teacher_dtype=torch.float32):
    g = torch.Generator(device="cpu").manual_seed(0)
    coords = (torch.rand(n, K, 2, generator=g) * 1.2 - 0.1).to(device).requires_grad_()
    sigma = (torch.rand(n, K, 2, generator=g) * 3 + 0.5).to(device).requires_grad_()
    score = torch.rand(n, K, 1, generator=g).to(device).requires_grad_()
    teacher = torch.rand(n, K, H, W, generator=g).to(device=device, dtype=teacher_dtype)
    weight = (torch.rand(n, K, 1, generator=g) > 0.2).float().to(device)
    return coords, sigma, score, teacher, weight


@functools.lru_cache(maxsize=None)
def _compiled_reference():
    return torch.compile(dk.simulated_heatmap_loss_reference, dynamic=False)


def _fused_path() -> str:
    """What backend=None (the library's default) runs on CUDA: the extension's kernels with their
    C++ autograd when the extension is built with CUDA, else the Triton kernels."""
    return "extension" if hm.extension_loss_available("cuda") else "triton"


def _loss_fn(impl: str):
    if impl == "fused":
        return lambda *a: dk.simulated_heatmap_loss(*a)
    if impl == "fused_triton":
        return lambda *a: dk.simulated_heatmap_loss(*a, backend="triton")
    if impl == "eager":
        return dk.simulated_heatmap_loss_reference
    if impl == "compile":
        return lambda *a: _compiled_reference()(*a)
    raise ValueError(impl)


def _fwd_bwd(fn, coords, sigma, score, teacher, weight, given: bool = False):
    """One forward + backward. The caller's form: the gradient of reg2hm + 0.01 * score (an add,
    a multiply and a ones-fill of PyTorch's around the op). ``given`` (the "_opgrad" rows): the
    op's own forward and backward only, with the upstream gradients (1 and 0.01, the spec's
    weights) preallocated, as attention benchmarks pass a fixed dout."""
    g = (torch.ones((), device=coords.device, dtype=coords.dtype),
         torch.full((), 0.01, device=coords.device, dtype=score.dtype)) if given else None

    def step():
        reg, sl = fn(coords, sigma, score, teacher, weight)
        if given:
            return torch.autograd.grad((reg, sl), (coords, sigma, score), g)
        return torch.autograd.grad(reg + 0.01 * sl, (coords, sigma, score))

    return step


def _bench_loss(benchmark, impl, n, device, teacher_dtype="fp32", label=None):
    elt = torch.empty((), dtype=TEACHER_DTYPES[teacher_dtype]).element_size()
    nbytes = loss_bytes(n, K, H, W, elt)
    copies = input_copies(nbytes, device)  # fresh teacher maps each call: HBM, not L2
    graphed = impl.endswith("_cudagraph")
    base = impl.removesuffix("_cudagraph")
    given = base.endswith("_opgrad")
    base = base.removesuffix("_opgrad")
    pdl = base.endswith("_pdl")  # the graph captured with programmatic dependent launch
    steps = []
    for _ in range(copies):
        step = _fwd_bwd(_loss_fn(base.removesuffix("_pdl")), *_loss_inputs(n, device, TEACHER_DTYPES[teacher_dtype]),
                        given=given)
        steps.append(cuda_graph(step, pdl=pdl) if graphed else step)
    run_benchmark(
        benchmark, rotate(steps), device=device, bytes_moved=nbytes,
        op="simulated_heatmap_loss fwd+bwd", impl=label or impl, n=n, teacher_dtype=teacher_dtype,
        input_copies=copies, upstream_grads="given" if given else "reg2hm + 0.01 * score", pdl=pdl,
    )
    if impl.startswith("fused") and device == "cuda":
        from distilpose_kernels import heatmap_triton as hmt

        path = "triton" if impl.startswith("fused_triton") else _fused_path()
        benchmark.extra_info["path"] = path
        if path != "triton":  # the extension's forward kernel for this shape (the tuned Triton tile does not apply)
            teacher = _loss_inputs(n, device, TEACHER_DTYPES[teacher_dtype])[3]
            benchmark.extra_info["fwd_kernel"] = hm.chosen_fwd_kernel(teacher) or "undecided"
            return

        key = (H, W, TEACHER_DTYPES[teacher_dtype], hmt.next_pow2(n * K), torch.cuda.current_device())
        tile = hmt._TUNED_TILES.get(key)
        benchmark.extra_info["fwd_tile"] = list(tile) if tile else "heuristic"


@pytest.mark.gpu
@pytest.mark.parametrize("teacher_dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("impl", ["fused", "fused_triton", "eager", "compile", "fused_cudagraph",
                                  "fused_triton_cudagraph", "compile_cudagraph", "fused_blocks_cudagraph",
                                  "fused_persistent_cudagraph", "fused_pipelined_cudagraph",
                                  "fused_opgrad_cudagraph", "fused_pdl_opgrad_cudagraph", "compile_opgrad_cudagraph"])
@pytest.mark.parametrize("n", [32, 256])
def test_loss_fwd_bwd_gpu(benchmark, impl, n, teacher_dtype, monkeypatch):
    """``fused`` runs the default: the extension's forward kernel chosen by "auto" (timed once
    per shape; extra_info "fwd_kernel" says which). ``fused_<kernel>_*``: the extension with that
    forward forced (DISTILPOSE_SIMHM_FWD=blocks: one block per map; persistent: blocks walk the
    maps, the next map in registers; pipelined: blocks stream ranges of maps through shared
    memory with cp.async), captured with it."""
    if teacher_dtype != "fp32" and not impl.startswith("fused"):
        pytest.skip("the references run with an fp32 teacher only")
    forced = next((k for k in hm.SIMHM_FWD_KERNELS if impl.startswith(f"fused_{k}_")), None)
    if forced:
        if not hm.extension_loss_available("cuda"):
            pytest.skip("the extension is not built with CUDA")
        monkeypatch.setenv("DISTILPOSE_SIMHM_FWD", forced)
        impl_run = impl.replace(f"_{forced}", "")
    else:
        monkeypatch.delenv("DISTILPOSE_SIMHM_FWD", raising=False)
        impl_run = impl
    _bench_loss(benchmark, impl_run, n, "cuda", teacher_dtype, label=impl)


@pytest.mark.parametrize("impl", ["eager", "compile", "eager_opgrad"])
def test_loss_fwd_bwd_cpu(benchmark, impl):
    _bench_loss(benchmark, impl, 32, "cpu")


# ----------------------------------------------------------------------------- targets


def numpy_loop_targets(kp: np.ndarray, vis: np.ndarray, input_size, heatmap_size, sigma: float, encoding: str):
    """mmpose-style per-sample, per-keypoint numpy loop (the baseline the kernel replaces)."""
    n, k, _ = kp.shape
    (ih, iw), (h, w) = input_size, heatmap_size
    target = np.zeros((n, k, h, w), dtype=np.float32)
    weight = np.zeros((n, k, 1), dtype=np.float32)
    tmp = 3 * sigma
    size = 2 * tmp + 1
    gx = np.arange(0, size, 1, np.float32)
    gy = gx[:, None]
    xs = np.arange(0, w, 1, np.float32)
    ys = np.arange(0, h, 1, np.float32)[:, None]
    stride = np.array([(iw - 1) / (w - 1), (ih - 1) / (h - 1)]) if encoding == "udp" else np.array([iw / w, ih / h])
    for i in range(n):
        for j in range(k):
            weight[i, j] = vis[i, j]
            f = kp[i, j] / stride
            if encoding == "unbiased":
                if f[0] - tmp >= w or f[1] - tmp >= h or f[0] + tmp + 1 < 0 or f[1] + tmp + 1 < 0:
                    weight[i, j] = 0
                if weight[i, j] > 0.5:
                    target[i, j] = np.exp(-((xs - f[0]) ** 2 + (ys - f[1]) ** 2) / (2 * sigma**2))
                continue
            mx, my = int(f[0] + 0.5), int(f[1] + 0.5)
            ul = [int(mx - tmp), int(my - tmp)]
            br = [int(mx + tmp + 1), int(my + tmp + 1)]
            if ul[0] >= w or ul[1] >= h or br[0] < 0 or br[1] < 0:
                weight[i, j] = 0
                continue
            x0 = y0 = size // 2
            if encoding == "udp":
                x0, y0 = x0 + f[0] - mx, y0 + f[1] - my
            g = np.exp(-((gx - x0) ** 2 + (gy - y0) ** 2) / (2 * sigma**2))
            if weight[i, j] > 0.5:
                target[i, j, max(0, ul[1]) : min(br[1], h), max(0, ul[0]) : min(br[0], w)] = g[
                    max(0, -ul[1]) : min(br[1], h) - ul[1], max(0, -ul[0]) : min(br[0], w) - ul[0]
                ]
    return target, weight


def _target_inputs(n: int, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    kp = torch.rand(n, K, 2, generator=g) * torch.tensor([INPUT[1] * 1.2, INPUT[0] * 1.2]) - 10
    vis = (torch.rand(n, K, generator=g) > 0.2).float()
    return kp.to(device), vis.to(device)


def _bench_targets(benchmark, impl, encoding, device, n=64):
    kp, vis = _target_inputs(n, device)
    if impl == "numpy_loop":
        kpn, visn = kp.cpu().numpy(), vis.cpu().numpy()
        fn = lambda: numpy_loop_targets(kpn, visn, INPUT, (H, W), 2.0, encoding)  # noqa: E731
        ours = dk.gaussian_heatmap_targets(kp.cpu(), vis.cpu(), INPUT, (H, W), 2.0, encoding, backend="reference")[0]
        np.testing.assert_allclose(fn()[0], ours.numpy(), atol=2e-5)  # the baseline computes the same thing
    else:
        backend = {"triton": "triton", "cuda": "cuda"}.get(impl, "reference")
        fn = lambda: dk.gaussian_heatmap_targets(kp, vis, INPUT, (H, W), 2.0, encoding, backend=backend)  # noqa: E731
    run_benchmark(
        benchmark, fn, device=device, bytes_moved=n * K * H * W * 4,
        op="gaussian_heatmap_targets", impl=impl, n=n, encoding=encoding,
    )


@pytest.mark.gpu
@pytest.mark.parametrize("encoding", ["unbiased", "msra", "udp"])
@pytest.mark.parametrize("impl", ["cuda", "triton", "torch"])
def test_targets_gpu(benchmark, impl, encoding):
    """impl "cuda": the compiled extension's kernel (the default on CUDA when built), "triton":
    the Triton kernel, "torch": the vectorised reference on the GPU."""
    if impl == "cuda" and not dk_targets.extension_targets_available("cuda"):
        pytest.skip("the extension is not built with CUDA")
    _bench_targets(benchmark, impl, encoding, "cuda")


@pytest.mark.parametrize("encoding", ["unbiased", "msra", "udp"])
@pytest.mark.parametrize("impl", ["torch", "numpy_loop"])
def test_targets_cpu(benchmark, impl, encoding):
    _bench_targets(benchmark, impl, encoding, "cpu")
