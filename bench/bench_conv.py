"""Backbone fusion benchmarks: ``conv2d_relu`` (conv + bias [+ residual] + ReLU) at the
DistilPose-S backbone's shapes, and ``upsample_sum`` (HRNet's multi-resolution sum + ReLU) at
the teacher's highest-resolution fusion.

Cases (``case`` in the id): ``b1x1res`` the Bottleneck's last conv (64 -> 256, 1x1, 64 x 48,
with the residual add), ``b3x3`` its middle conv (64 -> 64, 3x3); batch 256 bf16 channels-last
(the throughput setting) and batch 2 fp32 NCHW (the batch-1 flip-test setting).
Impls: ``unfused`` (eager F.conv2d + add + ReLU, what the model runs without the fusion),
``cudnn`` (the fused cuDNN op), ``auto`` (what the model runs: the timed choice), ``compile``
(torch.compile of the unfused ops: Inductor's own epilogue kernel), and on CPU ``unfused`` vs
``op`` (the public op, which runs the reference there).
Bytes (for "gbps") = the unavoidable traffic: input, weight and residual read once, output
written once.

    pytest bench/bench_conv.py --benchmark-only --benchmark-json bench/results/conv-<device>.json
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import distilpose_kernels as dk

from benchutils import cuda_graph, run_benchmark

# name -> (Cin, Cout, k, residual)
CASES = {"b1x1res": (64, 256, 1, True), "b3x3": (64, 64, 3, False)}
# b64_bf16_nchw: the distillation step's folded teacher without channels-last, where the fused
# epilogues made the step slower on the H100 (bench/results/nvidia-h100-2026-11-26/NOTES.md)
SETTINGS = {"b256_bf16_cl": (256, torch.bfloat16, True), "b64_bf16_nchw": (64, torch.bfloat16, False),
            "b2_fp32": (2, torch.float32, False)}


def _inputs(case: str, n: int, dtype: torch.dtype, channels_last: bool, device: str):
    cin, cout, k, residual = CASES[case]
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(n, cin, 64, 48, generator=g, device=device).to(dtype)
    w = (torch.randn(cout, cin, k, k, generator=g, device=device) / (cin * k * k) ** 0.5).to(dtype)
    b = torch.randn(cout, generator=g, device=device).to(dtype)
    r = torch.randn(n, cout, 64, 48, generator=g, device=device).to(dtype) if residual else None
    if channels_last:
        x, w = (t.contiguous(memory_format=torch.channels_last) for t in (x, w))
        r = r.contiguous(memory_format=torch.channels_last) if r is not None else None
    nbytes = sum(t.numel() * t.element_size() for t in (x, w, b, r) if t is not None)
    nbytes += n * cout * 64 * 48 * x.element_size()
    flops = 2.0 * n * cout * 64 * 48 * cin * k * k
    return (x, w, b, r, k // 2), nbytes, flops


def _unfused(x, w, b, r, pad):
    out = F.conv2d(x, w, b, 1, pad)
    if r is not None:
        out = out + r
    return torch.relu(out)


@functools.lru_cache(maxsize=None)
def _compiled():
    return torch.compile(_unfused, dynamic=False)


def _fn(impl: str, args):
    if impl.endswith("_graph"):  # device time: replayed in a CUDA graph (batch-1 engines run so)
        return cuda_graph(_fn(impl[: -len("_graph")], args))
    x, w, b, r, pad = args
    if impl == "unfused":
        return lambda: _unfused(x, w, b, r, pad)
    if impl == "compile":
        return lambda: _compiled()(x, w, b, r, pad)
    backend = {"cudnn": "cudnn", "triton": "triton", "auto": None, "op": None}[impl]
    return lambda: dk.conv2d_relu(x, w, b, r, padding=pad, backend=backend)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["unfused", "cudnn", "triton", "auto", "compile",
                                  "unfused_graph", "cudnn_graph", "triton_graph"])
@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("case", list(CASES))
def test_conv2d_relu_gpu(benchmark, case, setting, impl):
    """The Bottleneck's convs with their epilogues: unfused eager ops, cuDNN's fused op, the
    Triton implicit GEMM (bias + residual + ReLU epilogue), "auto" (the timed choice), compile;
    ``*_graph``: the same replayed in a CUDA graph (device time, batch 2 only: the batch-1 flip
    engine's Bottleneck convs, where per-call host time would hide the kernels)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if impl.endswith("_graph") and setting != "b2_fp32":
        pytest.skip("graph replays: the batch-2 setting only")
    torch.backends.cudnn.benchmark = True
    n, dtype, cl = SETTINGS[setting]
    args, nbytes, flops = _inputs(case, n, dtype, cl, "cuda")
    benchmark.group = f"conv2d_relu {case} {setting}"
    with torch.inference_mode():
        fn = _fn(impl, args)
        out = run_benchmark(benchmark, fn, device="cuda", flops=flops, bytes_moved=nbytes, op="conv2d_relu",
                            impl=impl, case=case, setting=setting, batch=n, dtype=str(dtype).replace("torch.", ""),
                            channels_last=cl)
    assert torch.isfinite(out).all() and (out >= 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["unfused", "cudnn", "triton", "auto"])
@pytest.mark.parametrize("setting", ["b256_bf16_cl", "b64_bf16_cl"])
def test_stem_conv_gpu(benchmark, setting, impl):
    """The backbones' first conv: RGB 3 -> 64, 3x3, stride 2, on the 256 x 192 crop (folded BN:
    bias, then ReLU). cuDNN has no tensor-core kernel for 3 input channels; ``triton`` is the
    implicit-GEMM kernel for short reductions (27 here), ``auto`` the timed choice among all.
    Batch 256 (DistilPose-S throughput) and 64 (the distillation step's teacher), bf16, channels-last."""
    torch.backends.cudnn.benchmark = True
    n = int(setting[1:].split("_")[0])
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(n, 3, 256, 192, generator=g, device="cuda").to(torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.randn(64, 3, 3, 3, generator=g, device="cuda") / 27 ** 0.5).to(torch.bfloat16)
    b = torch.randn(64, generator=g, device="cuda").to(torch.bfloat16)
    nbytes = (x.numel() + w.numel() + b.numel() + n * 64 * 128 * 96) * 2
    fn = (lambda: torch.relu(F.conv2d(x, w, b, 2, 1))) if impl == "unfused" else (
        lambda: dk.conv2d_relu(x, w, b, stride=2, padding=1, backend=None if impl == "auto" else impl))
    benchmark.group = f"stem conv 3->64 s2 {setting}"
    with torch.inference_mode():
        out = run_benchmark(benchmark, fn, device="cuda", flops=2.0 * n * 64 * 128 * 96 * 27, bytes_moved=nbytes,
                            op="stem_conv", impl=impl, setting=setting, batch=n, dtype="bfloat16", channels_last=True)
    assert torch.isfinite(out).all() and (out >= 0).all()


@pytest.mark.parametrize("impl", ["unfused", "op"])
@pytest.mark.parametrize("case", list(CASES))
def test_conv2d_relu_cpu(benchmark, case, impl):
    args, nbytes, flops = _inputs(case, 2, torch.float32, False, "cpu")
    benchmark.group = f"conv2d_relu {case} cpu b2 fp32"
    with torch.inference_mode():
        out = run_benchmark(benchmark, _fn(impl, args), device="cpu", flops=flops, bytes_moved=nbytes,
                            op="conv2d_relu", impl=impl, case=case, batch=2, dtype="float32")
    assert torch.isfinite(out).all() and (out >= 0).all()


# HRNet-W48's highest-resolution fusion (stage 4): base 48 x 64 x 48 plus three terms already
# brought to 48 channels by their 1x1 convs, at 1/2, 1/4 and 1/8 resolution; teacher batch 64
UPSAMPLE_SCALES = [2, 4, 8]


def _upsample_inputs(n, dtype, channels_last, device):
    g = torch.Generator(device).manual_seed(0)
    base = torch.randn(n, 48, 64, 48, generator=g, device=device).to(dtype)
    terms = [torch.randn(n, 48, 64 // s, 48 // s, generator=g, device=device).to(dtype) for s in UPSAMPLE_SCALES]
    if channels_last:
        base = base.contiguous(memory_format=torch.channels_last)
        terms = [t.contiguous(memory_format=torch.channels_last) for t in terms]
    nbytes = sum(t.numel() * t.element_size() for t in (base, *terms)) + base.numel() * base.element_size()
    return base, terms, nbytes


def _eager_hr_sum(base, terms):
    y = base
    for t, s in zip(terms, UPSAMPLE_SCALES):
        y = y + F.interpolate(t, scale_factor=s, mode="nearest")
    return torch.relu(y)


@functools.lru_cache(maxsize=None)
def _compiled_hr_sum():
    return torch.compile(_eager_hr_sum, dynamic=False)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["fused", "eager", "compile"])
@pytest.mark.parametrize("layout", ["cl", "nchw"])
def test_upsample_sum_gpu(benchmark, layout, impl):
    """HRNet fusion sum + ReLU, b64 bf16: the Triton op vs eager (upsample, add, add, add, relu)
    vs torch.compile of it. Bytes: base and terms read once, output written once."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    base, terms, nbytes = _upsample_inputs(64, torch.bfloat16, layout == "cl", "cuda")
    fn = {"fused": lambda: dk.upsample_sum(base, terms, UPSAMPLE_SCALES),
          "eager": lambda: _eager_hr_sum(base, terms),
          "compile": lambda: _compiled_hr_sum()(base, terms)}[impl]
    benchmark.group = f"upsample_sum hrnet-w48 row0 b64 bf16 {layout}"
    with torch.inference_mode():
        out = run_benchmark(benchmark, fn, device="cuda", bytes_moved=nbytes, op="upsample_sum", impl=impl,
                            layout=layout, batch=64, dtype="bfloat16")
    assert torch.isfinite(out).all() and (out >= 0).all()


@pytest.mark.parametrize("impl", ["eager", "op"])
def test_upsample_sum_cpu(benchmark, impl):
    base, terms, nbytes = _upsample_inputs(2, torch.float32, False, "cpu")
    fn = _eager_hr_sum if impl == "eager" else (lambda b, t: dk.upsample_sum(b, t, UPSAMPLE_SCALES))
    benchmark.group = "upsample_sum hrnet-w48 row0 cpu b2 fp32"
    with torch.inference_mode():
        out = run_benchmark(benchmark, lambda: fn(base, terms), device="cpu", bytes_moved=nbytes,
                            op="upsample_sum", impl=impl, batch=2, dtype="float32")
    assert torch.isfinite(out).all()
