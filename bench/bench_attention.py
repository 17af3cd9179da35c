"""Token attention benchmarks: fused Triton op vs eager einsum vs SDPA backends vs torch.compile.

The TDE's shape: L = 273 tokens (17 keypoint + 256 visual), H = 8 heads, D = 24.
Every implementation takes the packed qkv (N, L, 3C) and returns (N, L, C) heads merged,
i.e. the rearranges a drop-in user would need are inside the timed region.

FLOPs follow FlashAttention's convention: forward 4*N*H*L^2*D, forward+backward 3.5x that.
Bytes are the unavoidable HBM traffic: forward reads qkv and writes out; the backward reads
qkv, out and dout and writes dqkv.

    pytest bench/bench_attention.py --benchmark-only --benchmark-json bench/results/attention-<gpu>.json
"""
from __future__ import annotations

import functools
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

import distilpose_kernels as dk
from benchutils import cuda_graph, run_benchmark, synchronize

L, H, D = 273, 8, 24
C = H * D
BATCHES = [1, 32, 64, 256]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODES = ["fwd", "fwdbwd"]
SDPA = ["flash", "efficient", "math", "cudnn"]


def attention_flops(n: int, L: int, h: int, d: int, mode: str) -> float:
    f = 4.0 * n * h * L * L * d
    return f if mode == "fwd" else 3.5 * f


def attention_bytes(n: int, L: int, c: int, elt: int, mode: str) -> float:
    fwd = n * L * (3 * c + c) * elt
    return fwd if mode == "fwd" else fwd + n * L * (3 * c + c + c + 3 * c) * elt


# ----------------------------------------------------------------------------- implementations


def _sdpa_fn(backend: str) -> Callable[[torch.Tensor], torch.Tensor]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    which = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
    }[backend]

    def fn(qkv: torch.Tensor) -> torch.Tensor:
        n, l, _ = qkv.shape
        q, k, v = qkv.view(n, l, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        with sdpa_kernel([which]):
            out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(n, l, C)

    return fn


@functools.lru_cache(maxsize=None)
def _compiled_reference():
    return torch.compile(dk.token_attention_reference, dynamic=False)


def _impl(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name == "fused":
        return lambda qkv: dk.token_attention(qkv, H, backend="triton")
    if name == "eager":
        return lambda qkv: dk.token_attention_reference(qkv, H)
    if name == "compile":
        return lambda qkv: _compiled_reference()(qkv, H)
    if name.startswith("sdpa_"):
        return _sdpa_fn(name[5:])
    raise ValueError(name)


def _timed(impl: Callable, qkv: torch.Tensor, mode: str) -> Callable[[], object]:
    if mode == "fwd":
        return lambda: impl(qkv)
    x = qkv.detach().requires_grad_()
    dout = torch.randn(qkv.shape[0], qkv.shape[1], C, device=qkv.device, dtype=qkv.dtype)

    def step():
        out = impl(x)
        return torch.autograd.grad(out, x, dout)[0]

    return step


def _check_or_skip(fn: Callable[[], object], name: str) -> None:
    """Run once: skip (not fail) when an SDPA backend rejects the shape/dtype."""
    try:
        fn()
    except RuntimeError as e:
        if name.startswith("sdpa_"):
            pytest.skip(f"{name} does not accept this shape/dtype: {str(e).splitlines()[0][:200]}")
        raise


# ----------------------------------------------------------------------------- GPU suite


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize(
    "impl",
    ["fused", "eager", "compile"] + [f"sdpa_{b}" for b in SDPA]
    + [f"{i}_cudagraph" for i in ("fused", "eager", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn")],
)
def test_token_attention_gpu(benchmark, impl, batch, dtype, mode):
    """``*_cudagraph``: the same call captured in a CUDA graph (device time, no per-call overhead)."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    qkv = torch.randn(batch, L, 3 * C, device=dev, dtype=DTYPES[dtype])
    base = impl.removesuffix("_cudagraph")
    fn = _timed(_impl(base), qkv, mode)
    _check_or_skip(fn, base)
    if impl.endswith("_cudagraph"):
        fn = cuda_graph(fn)
    synchronize(dev)
    benchmark.group = f"attention {mode} {dtype} B={batch}"
    run_benchmark(
        benchmark, fn, device=dev,
        flops=attention_flops(batch, L, H, D, mode),
        bytes_moved=attention_bytes(batch, L, C, qkv.element_size(), mode),
        impl=impl, batch=batch, L=L, heads=H, head_dim=D, dtype=dtype, mode=mode,
        cuda_graph=impl.endswith("_cudagraph"), tf32=torch.backends.cuda.matmul.allow_tf32,
    )


def _pos_ln_eager(x, pos, w, b):
    k = x.shape[1] - pos.shape[-2]
    xo = torch.cat((x[:, :k], x[:, k:] + pos), dim=1)
    return xo, F.layer_norm(xo, (x.shape[-1],), w, b, 1e-5)


@functools.lru_cache(maxsize=None)
def _pos_ln_compiled():
    return torch.compile(_pos_ln_eager, dynamic=False)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("batch", [64, 256])
@pytest.mark.parametrize("impl", ["fused", "eager", "compile"])
def test_add_pos_layernorm_gpu(benchmark, impl, batch, dtype, mode):
    """The TDE's sine-full step: visual tokens += table, then LayerNorm (pending: does fusing pay?)."""
    dev = torch.device("cuda")
    dt = DTYPES[dtype]
    x = torch.randn(batch, L, C, device=dev, dtype=dt, requires_grad=mode == "fwdbwd")
    pos = torch.randn(1, L - 17, C, device=dev, dtype=dt)
    w = torch.randn(C, device=dev, dtype=dt, requires_grad=mode == "fwdbwd")
    b = torch.randn(C, device=dev, dtype=dt, requires_grad=mode == "fwdbwd")
    f = {
        "fused": lambda *a: dk.add_pos_layernorm(*a, backend="triton"),
        "eager": _pos_ln_eager,
        "compile": lambda *a: _pos_ln_compiled()(*a),
    }[impl]
    if mode == "fwd":
        fn = lambda: f(x, pos, w, b)  # noqa: E731
    else:
        gxo, gy = torch.randn_like(x), torch.randn_like(x)

        def fn():
            xo, y = f(x, pos, w, b)
            return torch.autograd.grad((xo, y), (x, w, b), (gxo, gy))

    benchmark.group = f"add_pos_layernorm {mode} {dtype} B={batch}"
    elt = x.element_size()
    nbytes = batch * L * C * elt * (3 if mode == "fwd" else 3 + 4)
    run_benchmark(benchmark, fn, device=dev, bytes_moved=nbytes, impl=impl, batch=batch, dtype=dtype, mode=mode)


def _linear_gelu_eager(x, w, b):
    return F.gelu(F.linear(x, w, b))


@functools.lru_cache(maxsize=None)
def _linear_gelu_compiled():
    return torch.compile(_linear_gelu_eager, dynamic=False)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 256])
@pytest.mark.parametrize("impl", ["fused", "auto", "eager", "compile"])
def test_linear_gelu_gpu(benchmark, impl, batch):
    """The TDE MLP's fc1 + GELU (192 -> 576), forward: the Triton kernel (``fused``), what the
    model runs (``auto``: the timed choice), cuBLAS + GELU (``eager``) and torch.compile of it.
    Batch 256 bf16 (throughput) and batch 1 with the flip test (2 crops) fp32. Bytes: x and the
    weights read once, the output written once."""
    dev = torch.device("cuda")
    n, dt = (256, torch.bfloat16) if batch == 256 else (2, torch.float32)
    x = torch.randn(n, L, C, device=dev, dtype=dt)
    w = torch.randn(3 * C, C, device=dev, dtype=dt) / C ** 0.5
    b = torch.randn(3 * C, device=dev, dtype=dt)
    f = {"fused": lambda: dk.linear_gelu(x, w, b, backend="triton"), "auto": lambda: dk.linear_gelu(x, w, b),
         "eager": lambda: _linear_gelu_eager(x, w, b), "compile": lambda: _linear_gelu_compiled()(x, w, b)}[impl]
    benchmark.group = f"linear_gelu fwd {str(dt).replace('torch.', '')} B={n}"
    elt = x.element_size()
    nbytes = (x.numel() + w.numel() + b.numel() + n * L * 3 * C) * elt
    with torch.inference_mode():
        run_benchmark(benchmark, f, device=dev, bytes_moved=nbytes, flops=2.0 * n * L * C * 3 * C, impl=impl,
                      batch=n, dtype=str(dt).replace("torch.", ""), op="linear_gelu")


@functools.lru_cache(maxsize=None)
def _mlp_compiled():
    return torch.compile(dk.fused_mlp_reference, dynamic=False)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [2, 256])
@pytest.mark.parametrize("impl", ["fused", "auto", "eager", "linear_gelu", "compile"])
def test_fused_mlp_gpu(benchmark, impl, batch):
    """The TDE's whole MLP (192 -> 576 -> GELU -> 192), forward: one kernel (``fused``; ``auto``:
    the timed choice the engine runs) vs cuBLAS + GELU + cuBLAS (``eager``), our fc1+GELU kernel +
    Linear (``linear_gelu``, each on its own timed choice) and torch.compile. Batch 256 bf16
    and batch 1 with the flip test (2 crops) fp32. Bytes: x, the weights and the output once
    (the hidden activation is what the fused kernel never writes)."""
    dev = torch.device("cuda")
    n, dt = (256, torch.bfloat16) if batch == 256 else (2, torch.float32)
    x = torch.randn(n, L, C, device=dev, dtype=dt)
    w1, b1 = torch.randn(3 * C, C, device=dev, dtype=dt) / C ** 0.5, torch.randn(3 * C, device=dev, dtype=dt)
    w2, b2 = torch.randn(C, 3 * C, device=dev, dtype=dt) / (3 * C) ** 0.5, torch.randn(C, device=dev, dtype=dt)
    args = (x, w1, b1, w2, b2)
    f = {"fused": lambda: dk.fused_mlp(*args, backend="triton"), "auto": lambda: dk.fused_mlp(*args),
         "eager": lambda: dk.fused_mlp_reference(*args), "compile": lambda: _mlp_compiled()(*args),
         "linear_gelu": lambda: dk.linear(dk.linear_gelu(x, w1, b1), w2, b2)}[impl]
    benchmark.group = f"fused_mlp fwd {str(dt).replace('torch.', '')} B={n}"
    nbytes = (2 * x.numel() + w1.numel() + w2.numel() + b1.numel() + b2.numel()) * x.element_size()
    with torch.inference_mode():
        run_benchmark(benchmark, f, device=dev, bytes_moved=nbytes, flops=2.0 * 2 * n * L * C * 3 * C, impl=impl,
                      batch=n, dtype=str(dt).replace("torch.", ""), op="fused_mlp")


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [2, 256])
@pytest.mark.parametrize("impl", ["fused", "auto", "eager", "split", "gemms"])
@pytest.mark.parametrize("op", ["proj", "mlp"])
def test_add_norm_gpu(benchmark, op, impl, batch):
    """The TDE's GEMM + residual add + position re-add + LayerNorm step, forward, no grad:
    ``proj`` (attention projection 192 -> 192, then norm2) and ``mlp`` (192 -> 576 -> GELU -> 192,
    then the next layer's norm1 with the position table on the 256 visual tokens). ``fused``: one
    kernel (``linear_add_norm`` / ``fused_mlp_add_norm``); ``auto``: the timed choice the engine
    runs; ``eager``: the PyTorch ops; ``split``: our previous two kernels (``linear`` /
    ``fused_mlp``, then ``add_pos_layernorm``); ``gemms`` (mlp only): what the fp32 engine runs,
    ``linear_gelu`` then ``linear_add_norm`` (the hidden activation written once, two GEMMs that
    spread over more SMs than the one-kernel MLP). Batch 256 bf16 and batch 1 with flip (2) fp32."""
    if impl == "gemms" and op != "mlp":
        pytest.skip("the two-GEMM form is the MLP's")
    dev = torch.device("cuda")
    n, dt = (256, torch.bfloat16) if batch == 256 else (2, torch.float32)
    g = torch.Generator(device="cpu").manual_seed(0)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dev, dt)

    hid = 3 * C if op == "mlp" else None
    x = r(n, L, C)
    weights = (r(hid, C, scale=C ** -0.5), r(hid), r(C, hid, scale=hid ** -0.5), r(C)) if hid else (r(C, C, scale=C ** -0.5), r(C))
    res, lw, lb = r(n, L, C), r(C).abs() + 0.5, r(C)
    pos = r(1, 256, C) if op == "mlp" else None
    fused_op = dk.fused_mlp_add_norm if hid else dk.linear_add_norm
    ref_op = dk.fused_mlp_add_norm_reference if hid else dk.linear_add_norm_reference
    out_op = (lambda: dk.fused_mlp(x, *weights)) if hid else (lambda: dk.linear(x, *weights))
    f = {"fused": lambda: fused_op(x, *weights, res, lw, lb, 1e-5, pos, backend="triton"),
         "auto": lambda: fused_op(x, *weights, res, lw, lb, 1e-5, pos),
         "eager": lambda: ref_op(x, *weights, res, lw, lb, 1e-5, pos),
         "split": lambda: dk.add_pos_layernorm(res, pos, lw, lb, 1e-5, residual=out_op()),
         "gemms": lambda: dk.linear_add_norm(dk.linear_gelu(x, *weights[:2]), *weights[2:], res, lw, lb, 1e-5, pos)}[impl]
    benchmark.group = f"{op} + add + LayerNorm fwd {str(dt).replace('torch.', '')} B={n}"
    nbytes = (x.numel() + sum(w.numel() for w in weights) + 3 * res.numel()) * x.element_size()
    flops = 2.0 * n * L * C * (2 * hid if hid else C)
    with torch.inference_mode():
        run_benchmark(benchmark, f, device=dev, bytes_moved=nbytes, flops=flops, impl=impl, batch=n,
                      dtype=str(dt).replace("torch.", ""), op=f"{op}_add_norm")


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["eager", "plain", "tuned"])
def test_attention_fp32_b1_graph_gpu(benchmark, monkeypatch, impl):
    """Token attention forward at the TDE's batch-1 flip shape (2 x 8 heads x 273 tokens, head
    dim 24), fp32 with TF32 off, in a CUDA graph (device time): the einsum reference (``eager``),
    the fused kernel without the split-key configs (``plain``) and with them (``tuned``: what
    inference runs; the config picked is in extra_info)."""
    from benchutils import cuda_graph
    from distilpose_kernels import attention_triton as at

    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False  # restored by bench/conftest.py
    if impl == "plain":
        monkeypatch.setattr(at, "SPLIT_MAX_ROWS", 0)
    qkv = torch.randn(2, L, 3 * C, device=dev, generator=torch.Generator(device=dev).manual_seed(0))
    f = (lambda: dk.token_attention_reference(qkv, H)) if impl == "eager" else (
        lambda: dk.token_attention(qkv, H, backend="triton"))
    with torch.inference_mode():
        f()  # autotune outside the capture
        extra = {}
        if impl != "eager":
            which = "fwd_small" if impl == "tuned" else "fwd"
            extra["config"] = str(next((v for k, v in at._BUCKET_CONFIGS.items() if k[0] == which), None))
        graph = cuda_graph(f)
        benchmark.group = "attention fwd fp32 B=2 (CUDA graph)"
        run_benchmark(benchmark, graph, device=dev, flops=attention_flops(2, L, H, D, "fwd"),
                      bytes_moved=attention_bytes(2, L, C, 4, "fwd"), impl=impl, batch=2, dtype="fp32",
                      op="attention_b1", cuda_graph=True, **extra)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("impl", ["two_ops", "fused", "auto"])
def test_qkv_attention_b1_graph_gpu(benchmark, impl, dtype):
    """The TDE's qkv projection + attention at the batch-1 flip shape (2 x 273 tokens, C = 192, 8
    heads of 24; fp32 with TF32 off, or bf16) in a CUDA graph (device time): ``two_ops``: the
    ``linear`` op (its own Triton / cuBLAS choice) then ``token_attention`` (what the engine ran
    before ``fuse_qkv``); ``fused``: ``qkv_attention``'s kernel (autotuned; its config in
    extra_info); ``auto``: the op's timed choice between them (what the engine runs)."""
    from benchutils import cuda_graph
    from distilpose_kernels import attention_triton as at

    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False  # restored by bench/conftest.py
    dt = torch.float32 if dtype == "fp32" else torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(2, L, C, device=dev, generator=g).to(dt)
    w = (torch.randn(3 * C, C, device=dev, generator=g) * C ** -0.5).to(dt)
    f = {"two_ops": lambda: dk.token_attention(dk.linear(x, w), H),
         "fused": lambda: dk.qkv_attention(x, w, H, backend="triton"),
         "auto": lambda: dk.qkv_attention(x, w, H)}[impl]
    with torch.inference_mode():
        n0 = len(dk.auto_choices())
        graph = cuda_graph(f)  # warm-up (autotune, "auto" on device time) outside the capture
        extra = {"auto_choices": dk.auto_choices()[n0:]}
        if impl == "fused" and at._QKV_ATTN_TUNED is not None:
            extra["config"] = str(getattr(at._QKV_ATTN_TUNED, "best_config", None))
        benchmark.group = f"qkv + attention fwd {dtype} B=2 (CUDA graph)"
        flops = 2.0 * 2 * L * C * 3 * C + attention_flops(2, L, H, D, "fwd")
        run_benchmark(benchmark, graph, device=dev, flops=flops, impl=impl, batch=2, dtype=dtype,
                      op="qkv_attention_b1", cuda_graph=True, **extra)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["proj", "fc2", "mlp"])
@pytest.mark.parametrize("impl", ["eager", "rows", "tuned", "auto", "gemms"])
def test_add_norm_fp32_b1_graph_gpu(benchmark, monkeypatch, impl, case):
    """The TDE's GEMM + add + LayerNorm steps at the batch-1 flip shape (546 rows), fp32 with TF32
    off, in a CUDA graph (device time). ``proj``: ``linear_add_norm`` K = 192 (attention
    projection + norm2); ``fc2``: ``linear_add_norm`` K = 576 (+ the next norm1 with the position
    table); ``mlp``: the whole MLP, ``fused_mlp_add_norm``. ``eager``: cuBLAS (+ GELU + cuBLAS) +
    add + LayerNorm; ``rows``: the whole-row tiles only; ``tuned``: every tile, the split ones
    included (the tile the autotuner picked is in extra_info); ``auto``: the engine's timed
    choice; ``gemms`` (mlp only): ``linear_gelu`` then ``linear_add_norm``, what fp32 engines run."""
    from benchutils import cuda_graph
    from distilpose_kernels import mlp_triton as mt

    if impl == "gemms" and case != "mlp":
        pytest.skip("the two-GEMM form is the MLP's")
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False  # restored by bench/conftest.py
    if impl == "rows":
        monkeypatch.setattr(mt, "SPLIT_MAX_ROWS", 0)
    g = torch.Generator(device="cpu").manual_seed(len(case))

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dev)

    hid = 3 * C
    k = hid if case == "fc2" else C
    x, res, lw, lb = r(2, L, k), r(2, L, C), r(C).abs() + 0.5, r(C)
    pos = r(1, 256, C) if case != "proj" else None
    if case == "mlp":
        weights = (r(hid, C, scale=C ** -0.5), r(hid), r(C, hid, scale=hid ** -0.5), r(C))
        op, ref = dk.fused_mlp_add_norm, dk.fused_mlp_add_norm_reference
    else:
        weights = (r(C, k, scale=k ** -0.5), r(C))
        op, ref = dk.linear_add_norm, dk.linear_add_norm_reference
    f = {"eager": lambda: ref(x, *weights, res, lw, lb, 1e-5, pos),
         "auto": lambda: op(x, *weights, res, lw, lb, 1e-5, pos),
         "gemms": lambda: dk.linear_add_norm(dk.linear_gelu(x, *weights[:2]), *weights[2:], res, lw, lb, 1e-5, pos)}.get(
        impl, lambda: op(x, *weights, res, lw, lb, 1e-5, pos, backend="triton"))
    with torch.inference_mode():
        f()  # autotune / timed choice outside the capture
        extra = {}
        if impl in ("rows", "tuned"):
            small = impl == "tuned"
            tuner = ((mt._MLP_TUNED_SMALL if small else mt._MLP_TUNED) if case == "mlp"
                     else (mt._ADD_NORM_TUNED_SMALL if small else mt._ADD_NORM_TUNED))
            extra["tile"] = str(getattr(tuner, "best_config", None))
        graph = cuda_graph(f)
        benchmark.group = f"{case} + add + LayerNorm fp32 B=2 (CUDA graph)"
        nbytes = (x.numel() + sum(w.numel() for w in weights) + 3 * res.numel()) * 4
        run_benchmark(benchmark, graph, device=dev, bytes_moved=nbytes,
                      flops=2.0 * 2 * L * C * (2 * hid if case == "mlp" else k), impl=impl, batch=2, dtype="fp32",
                      op=f"{case}_add_norm_b1", cuda_graph=True, **extra)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", ["192x576", "192x192", "576x192"])
@pytest.mark.parametrize("impl", ["cublas", "triton_ieee", "triton_tf32x3", "auto"])
def test_linear_fp32_gpu(benchmark, monkeypatch, impl, shape):
    """The TDE's Linears at batch 1 with the flip test (2 x 273 tokens), fp32 with TF32 off (the
    paper's setting), captured in a CUDA graph (device time: at batch 1 the graph replays them):
    cuBLAS (FMA kernels) vs the Triton GEMM with FMA dots (``ieee``) or 3xTF32 tensor-core dots,
    and ``auto`` (what the engine runs: the timed choice, 3xTF32)."""
    from benchutils import cuda_graph

    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False  # restored by bench/conftest.py
    k, n = (int(v) for v in shape.split("x"))
    if impl.startswith("triton_"):
        monkeypatch.setenv("DISTILPOSE_FP32_DOT", impl.split("_")[1])
    x = torch.randn(2, L, k, device=dev)
    w = torch.randn(n, k, device=dev) / k ** 0.5
    b = torch.randn(n, device=dev)
    f = {"cublas": lambda: F.linear(x, w, b), "auto": lambda: dk.linear(x, w, b)}.get(
        impl, lambda: dk.linear(x, w, b, backend="triton"))
    with torch.inference_mode():
        f()  # autotune / timed choice outside the capture
        g = cuda_graph(f)
        benchmark.group = f"linear fp32 B=2 {shape}"
        run_benchmark(benchmark, g, device=dev, bytes_moved=(x.numel() + w.numel() + b.numel() + 2 * L * n) * 4,
                      flops=2.0 * 2 * L * k * n, impl=impl, batch=2, dtype="fp32", op="linear", shape=shape,
                      cuda_graph=True)


# ----------------------------------------------------------------------------- CPU case


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", ["eager", "compile"])
def test_token_attention_cpu(benchmark, impl, mode):
    """Small CPU case (reference vs torch.compile of it) so the suite measures something anywhere.

    The fused op runs on CPU only under the Triton interpreter, which is not a speed path.
    """
    torch.manual_seed(0)
    batch = 2
    qkv = torch.randn(batch, L, 3 * C)
    fn = _timed(_impl(impl), qkv, mode)
    fn()  # compile / warm up outside the timed region
    benchmark.group = f"attention cpu {mode} fp32 B={batch}"
    run_benchmark(
        benchmark, fn, device="cpu",
        flops=attention_flops(batch, L, H, D, mode),
        bytes_moved=attention_bytes(batch, L, C, 4, mode),
        impl=impl, batch=batch, L=L, heads=H, head_dim=D, dtype="fp32", mode=mode,
    )
