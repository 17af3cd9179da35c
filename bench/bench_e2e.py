"""End-to-end benchmarks: inference (crop tensor -> keypoints in image pixels) and the distillation step.

Inference is timed the way the paper timed it: batch 1, fp32, flip test (the crop and its
mirror) and decoding included, data loading excluded; here from a preprocessed crop tensor
on the device to decoded keypoints in image coordinates copied to the host (so each call
ends in a sync). Paths compared (``path`` in the test id and ``extra_info["path"]``):

- ``reference``: eager, every op on its pure-PyTorch reference (DISTILPOSE_FORCE_REFERENCE=1),
  BatchNorm kept (the paper's setting: no conv-BN fusion);
- ``fused``: eager with the fused ops (Triton attention, CUDA decode) and conv+BN folded;
- ``compile``: ``fused`` under ``torch.compile``;
- ``cudagraph``: ``fused`` captured as one CUDA graph per shape and replayed;
- ``cudagraph_nofold``: the same without BN folding (the paper's model, launch-free);
- ``compile_cudagraph``: compiled, then captured;
- ``cudagraph_cl`` / ``cudagraph_tf32`` (DistilPose-S, batch 1 fp32): channels-last, or
  TF32 matmuls; TF32 cases are reported but not counted for the fp32 goal;
- fp32 paths run the TDE's Linears through ``distilpose_kernels.linear`` where it is timed
  faster than cuBLAS, and every fp32 Triton dot as 3xTF32 (fp32 accuracy on the tensor cores,
  ``distilpose_kernels.fp32_dot_precision``); ``cudagraph_ieee`` is the same path with FMA dots
  (``DISTILPOSE_FP32_DOT=ieee``) and cuBLAS Linears, to show what that buys; ``cudagraph_nomlpk``
  runs each MLP as fc1 + GELU and fc2 + add + LayerNorm (``mlp_kernel=False``) instead of
  through ``fused_mlp_add_norm``, whose "auto" chooses among one kernel, those two and the
  reference ops (the default);
- every folded path also fuses each conv's bias, residual add and ReLU into the conv
  (``InferenceEngine(fuse_epilogues=...)``, on by default with folding, off under compile);
  ``*_noepi`` is the same path without that, to show what it buys; ``*_plain`` also without
  the TDE fusions (``fuse_pos_norm``, ``fuse_mlp``, ``triton_linears``, ``mlp_kernel``,
  ``fuse_add_norm``) and without PDL (below); ``compile_cudagraph_ops``
  (DistilPose-S, batch 1 fp32) keeps our fused epilogue / norm / HRNet-sum ops under
  ``torch.compile`` (opaque custom ops) instead of leaving those fusions to Inductor;
- CUDA-graph paths capture each graph with and without programmatic dependent launch of the
  Triton kernels (sm_90+) and keep the faster if both agree bit for bit
  (``InferenceEngine(pdl=None)``; the decision is in ``extra_info["auto_choices"]``);
  ``cudagraph_nopdl`` never uses it;
- ``fused_cast`` / ``cudagraph_cast`` (bf16 only): the model stored in bf16 and run without
  autocast (``InferenceEngine(cast_model=True)``): no per-op casts, bf16 LayerNorm storage;
  ``cudagraph_cast_cl`` also channels-last (cuDNN's preferred layout for bf16 convolutions);
  ``cudagraph_cast_cl_nomlpk`` the same with each MLP as fc1+GELU and fc2 + add + LayerNorm
  (``mlp_kernel=False``) instead of one kernel (the batch-256 graph's largest kernel, H200).

Throughput: batch 256, bf16 autocast (``precision`` in the id). Training: student + frozen
teacher (distilpose_s + tokenpose_teacher), batch 64, bf16 autocast, Adam step, fused ops vs
the pure-reference path, images/s and peak memory; ``fused_fastteacher`` also folds the
frozen teacher's BNs, fuses its conv epilogues and stores it in bf16 (``Distiller(fold_teacher_bn=True,
teacher_dtype=torch.bfloat16)``); ``_noepi`` without the epilogue fusion, ``_cl`` with the
teacher in channels-last (``teacher_channels_last=True``), ``_graph`` with the teacher's forward
replayed as a CUDA graph (``teacher_cuda_graph=True``), ``_fpn`` with the student's residual
adds fused into its LayerNorms (``tde.fuse_pos_norm = True``, forward and backward), ``_scl``
with the student and its input channels-last (the trainer's ``channels_last``).

Test ids carry ``<preset>-<withflip|noflip>-<path>`` (and ``b<batch>``/``<precision>`` in the
function name), so ``-k`` selects e.g. ``"e2e and distilpose_s and withflip and cudagraph"``.
Every case stores fps / images_per_s, peak memory, the device, versions and the git commit
in ``extra_info``. On a CPU-only machine the GPU cases skip and small CPU cases run.

    pytest bench/bench_e2e.py --benchmark-only --benchmark-json bench/results/e2e-<device>.json
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import pytest
import torch

from benchutils import env_metadata, run_benchmark, synchronize

import distilpose_kernels as dk
from distilpose.models import build_model
from distilpose.runtime import InferenceEngine

FORCE_REF = "DISTILPOSE_FORCE_REFERENCE"
#: opt-in for the slow CPU torch.compile case of the paper-size student (minutes on 2 cores)
CPU_COMPILE_ENV = "DISTILPOSE_BENCH_CPU_COMPILE"

GPU_PRESETS = ["distilpose_s", "distilpose_l", "tokenpose_teacher"]
GPU_PATHS = ["reference", "fused", "compile", "cudagraph", "compile_cudagraph"]


def _paths_for(preset: str):
    return GPU_PATHS + (["cudagraph_nofold"] if preset == "distilpose_s" else [])


def _cases(presets, flips=("withflip", "noflip")):
    return [(p, f, path) for p in presets for f in flips for path in _paths_for(p)]


def _crops(n: int, device: torch.device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(n, 3, 256, 192, generator=g).to(device)
    center = (torch.rand(n, 2, generator=g) * 400 + 50).to(device)
    scale = (torch.rand(n, 2, generator=g) * 200 + 100).to(device)
    return x, center, scale


def _engine(model, device, path: str, flip: str, precision: str) -> InferenceEngine:
    return InferenceEngine(
        model,
        device=device,
        precision=precision,
        flip_test=flip == "withflip",
        fold_bn=path not in ("reference", "cudagraph_nofold"),
        fuse_epilogues=False if path.endswith(("_noepi", "_plain")) else (True if path.endswith("_ops") else None),
        fuse_pos_norm=False if path.endswith("_plain") else (True if path.endswith("_ops") else None),
        fuse_mlp=False if path.endswith("_plain") else (True if path.endswith("_ops") else None),
        triton_linears=False if path.endswith(("_plain", "_ieee")) else None,
        mlp_kernel=False if path.endswith(("_plain", "_nomlpk")) else (True if path.endswith("_mlpk") else None),
        fuse_add_norm=False if path.endswith("_plain") else None,
        fuse_qkv=False if path.endswith(("_plain", "_noqkv")) else None,
        pdl=False if path.endswith(("_plain", "_nopdl")) else None,
        cast_model="_cast" in path,
        channels_last="_cl" in path,
        compile="compile" in path,
        cuda_graph="cudagraph" in path,
        attention_backend="reference" if path == "reference" else None,
        clone_outputs=False,
    )


def _tf32_flags() -> Dict[str, bool]:
    """PyTorch's defaults, recorded: "fp32" convolutions may run in TF32 (cuDNN allows it by default)."""
    return {"cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
            "matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32)}


def _median_or_none(benchmark) -> Optional[float]:
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    return getattr(stats, "median", None)


def _model_gmacs(model) -> Optional[Dict[str, float]]:
    try:
        from distilpose.models.complexity import measure_complexity

        c = measure_complexity(model)
        return {"gmacs_paper": c.gmacs_paper, "gmacs_full": c.gmacs_full, "params": c.params,
                "act_melems": c.act_melems}
    except Exception:  # noqa: BLE001 - complexity is informative only
        return None


def _bench_infer(benchmark, monkeypatch, device, preset, flip, path, batch, precision):
    if path.endswith("_tf32"):  # TF32 matmuls (convolutions already default to TF32 in PyTorch)
        torch.backends.cuda.matmul.allow_tf32 = True  # restored by bench/conftest.py
    if path.endswith("_ieee"):  # FMA dots for fp32 in the Triton kernels (the default is 3xTF32)
        monkeypatch.setenv("DISTILPOSE_FP32_DOT", "ieee")
    if path == "reference":
        monkeypatch.setenv(FORCE_REF, "1")
    else:
        monkeypatch.delenv(FORCE_REF, raising=False)
    torch.manual_seed(0)
    model = build_model(preset).eval()
    cx = _model_gmacs(model) or {}
    engine = _engine(model, device, path, flip, precision)
    del model
    x, center, scale = _crops(batch, device)

    def step():
        # the result a user gets, on the host: keypoints and scores in one device-to-host copy
        out = engine(x, center, scale, device="cpu")
        return out["keypoints"], out["scores"]

    n_choices = len(dk.auto_choices())
    step()  # compile / capture / autotune outside the timed region
    synchronize(device)
    # the fused-vs-reference decisions this case made (earlier cases' decisions for the same
    # shapes are cached and apply too)
    benchmark.extra_info["auto_choices"] = dk.auto_choices()[n_choices:]
    benchmark.extra_info["tuned_configs"] = dk.tuned_configs()  # the autotuners' tiles so far in this process
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    passes = 2 if flip == "withflip" else 1
    # two-numbers floor inputs: conv/linear/attention FLOPs of every pass; bytes: weights read
    # once, crops read once, keypoints written once, and every conv / linear / attention output
    # written once and read once in the activation dtype (a layer-wise floor: only fusing
    # whole layers together could go below it)
    flops = 2e9 * cx["gmacs_full"] * batch * passes if "gmacs_full" in cx else None
    n_weights = sum(p.numel() for p in engine.model.parameters())
    act_size = 4.0 if precision == "fp32" else 2.0
    act_bytes = 2 * act_size * 1e6 * cx.get("act_melems", 0.0) * batch * passes
    nbytes = 4.0 * (n_weights + x.numel() + batch * engine.num_keypoints * 3) + act_bytes
    benchmark.group = f"e2e infer {preset} b{batch} {precision} {flip}"
    run_benchmark(
        benchmark, step, device=device, flops=flops, bytes_moved=nbytes,
        preset=preset, batch=batch, precision=precision, dtype=precision, flip_test=flip == "withflip",
        path=path, impl=path, fold_bn=engine.fold_bn, cuda_graph=engine.cuda_graph, compiled=engine.compiled,
        cudnn_benchmark=torch.backends.cudnn.benchmark, **_tf32_flags(), **cx,
    )
    median = _median_or_none(benchmark)
    if median is None:  # --benchmark-disable: the function ran once, untimed
        return
    benchmark.extra_info["fps"] = batch / median  # images (person crops) per second
    benchmark.extra_info["images_per_s"] = batch / median
    benchmark.extra_info["latency_ms"] = median * 1e3
    if device.type == "cuda":
        step()
        synchronize(device)
        benchmark.extra_info["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20


# ----------------------------------------------------------------------------- GPU suites


@pytest.fixture
def cuda_device():
    dev = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    yield dev
    torch.cuda.empty_cache()


@pytest.mark.gpu
@pytest.mark.parametrize(
    "preset,flip,path",
    _cases(GPU_PRESETS) + [("distilpose_s", f, p) for f in ("withflip", "noflip") for p in ("cudagraph_cl", "cudagraph_tf32", "cudagraph_ieee", "cudagraph_nomlpk", "cudagraph_noqkv",
                                                                    "cudagraph_nopdl",
                                                                    "cudagraph_noepi", "cudagraph_plain",
                                                                    "compile_cudagraph_ops")],
)
def test_e2e_infer_b1_fp32(benchmark, monkeypatch, cuda_device, preset, flip, path):
    """The paper's setting: batch 1, fp32, flip test on/off."""
    _bench_infer(benchmark, monkeypatch, cuda_device, preset, flip, path, batch=1, precision="fp32")


@pytest.mark.gpu
@pytest.mark.parametrize("preset,flip,path", _cases(GPU_PRESETS, flips=("withflip",)))
def test_e2e_infer_b1_bf16(benchmark, monkeypatch, cuda_device, preset, flip, path):
    _bench_infer(benchmark, monkeypatch, cuda_device, preset, flip, path, batch=1, precision="bf16")


@pytest.mark.gpu
@pytest.mark.parametrize(
    "preset,flip,path",
    [(p, f, path) for p in GPU_PRESETS for f in ("noflip", "withflip")
     for path in ("reference", "fused", "compile", "cudagraph", "fused_cast", "cudagraph_cast", "cudagraph_cast_cl",
                  "cudagraph_cast_cl_noepi", "cudagraph_cast_cl_nomlpk", "cudagraph_cast_cl_plain")],
)
def test_e2e_infer_b256_bf16(benchmark, monkeypatch, cuda_device, preset, flip, path):
    """Throughput: batch 256, bf16 autocast (``*_cast``: bf16 weights, no autocast)."""
    _bench_infer(benchmark, monkeypatch, cuda_device, preset, flip, path, batch=256, precision="bf16")


def _train_batch(n: int, device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return {
        "img": torch.randn(n, 3, 256, 192, generator=g).to(device),
        "target_coords": torch.rand(n, 17, 2, generator=g).to(device),
        "target_weight": (torch.rand(n, 17, 1, generator=g) > 0.2).float().to(device),
    }


def _bench_train(benchmark, monkeypatch, device, student_preset, teacher_preset, batch, precision, path):
    from distilpose.models.distiller import Distiller

    if path == "reference":
        monkeypatch.setenv(FORCE_REF, "1")
    else:
        monkeypatch.delenv(FORCE_REF, raising=False)
    torch.manual_seed(0)
    flags = set(path.split("_"))
    student = build_model(student_preset).to(device).train()
    if "fpn" in flags:  # the student's residual adds fused into its LayerNorms (fwd + bwd)
        student.tde.fuse_pos_norm = True
    if "scl" in flags:  # the student (and its input) channels-last, as the trainer's channels_last
        student.to(memory_format=torch.channels_last)
    teacher = build_model(teacher_preset).to(device)
    cs, ct = _model_gmacs(student), _model_gmacs(teacher)
    # student forward + backward (~3x forward) and teacher forward, per image
    flops = 2e9 * (3 * cs["gmacs_full"] + ct["gmacs_full"]) * batch if cs and ct else None
    fast_teacher = "fastteacher" in flags
    distiller = Distiller(
        student, teacher, fold_teacher_bn=fast_teacher,
        teacher_dtype=torch.bfloat16 if fast_teacher and precision == "bf16" else None,
        fuse_teacher_epilogues="noepi" not in flags,
        teacher_channels_last="cl" in flags,
        teacher_cuda_graph="graph" in flags,
    ).to(device)
    del teacher  # the distiller may hold a folded / cast copy
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    data = _train_batch(batch, device)
    if "scl" in flags:
        data["img"] = data["img"].contiguous(memory_format=torch.channels_last)
    dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]

    def step():
        if dtype is None:
            losses = distiller(data)
        else:
            with torch.autocast(device.type, dtype=dtype):
                losses = distiller(data)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        opt.step()
        return losses["loss"].detach()

    loss0 = float(step())  # warm-up (autotuning, optimizer state)
    if not torch.isfinite(torch.tensor(loss0)):
        raise AssertionError(f"training step gave a non-finite loss: {loss0}")
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    benchmark.group = f"e2e train {student_preset}+{teacher_preset} b{batch} {precision}"
    run_benchmark(
        benchmark, step, device=device, flops=flops,
        student=student_preset, teacher=teacher_preset, preset=student_preset, batch=batch,
        precision=precision, dtype=precision, path=path, impl=path,
        cudnn_benchmark=torch.backends.cudnn.benchmark, **_tf32_flags(),
    )
    median = _median_or_none(benchmark)
    if median is None:
        return
    benchmark.extra_info["images_per_s"] = batch / median
    benchmark.extra_info["step_ms"] = median * 1e3
    if device.type == "cuda":
        benchmark.extra_info["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["reference", "fused", "fused_fastteacher", "fused_fastteacher_noepi",
                                  "fused_fastteacher_cl", "fused_fastteacher_cl_noepi", "fused_fastteacher_cl_graph", "fused_fastteacher_cl_graph_fpn",
                                  "fused_fastteacher_cl_graph_fpn_scl"])
def test_e2e_train_distill_b64_bf16(benchmark, monkeypatch, cuda_device, path):
    """Distillation step: DistilPose-S + frozen TokenPose teacher, batch 64, bf16."""
    _bench_train(benchmark, monkeypatch, cuda_device, "distilpose_s", "tokenpose_teacher", 64, "bf16", path)


# ----------------------------------------------------------------------------- CPU suites


def _cpu_paths():
    paths = ["eager", "fold"]
    if os.environ.get(CPU_COMPILE_ENV, "").strip() in ("1", "true", "yes", "on"):
        paths.append("compile")
    return paths


_CPU_PATH_TO_ENGINE = {"eager": "reference", "fold": "fused", "compile": "compile"}


@pytest.mark.parametrize(
    "preset,flip,path",
    [("distilpose_s", f, p) for f in ("noflip", "withflip") for p in _cpu_paths()]
    + [("distilpose_tiny", "withflip", p) for p in ("eager", "compile")]
    + [("tokenpose_tiny", "withflip", "eager")],
)
def test_e2e_infer_cpu_b1_fp32(benchmark, monkeypatch, preset, flip, path):
    """CPU: batch 1 fp32. ``eager`` = the reference model as built (no folding); ``fold`` =
    conv+BN folded; ``compile`` = folded + torch.compile (the paper-size one needs
    DISTILPOSE_BENCH_CPU_COMPILE=1: compiling takes minutes on 2 cores)."""
    if torch.cuda.is_available():
        pytest.skip("CPU case: runs on CPU-only machines")
    if preset == "tokenpose_tiny":
        try:
            import distilpose_kernels.decode  # noqa: F401
        except ImportError as e:
            pytest.skip(f"heatmap decoding not available: {e}")
    _bench_infer(benchmark, monkeypatch, torch.device("cpu"), preset, flip, _CPU_PATH_TO_ENGINE[path], 1, "fp32")
    benchmark.extra_info["path"] = benchmark.extra_info["impl"] = path


@pytest.mark.parametrize("path", ["reference", "auto"])
def test_e2e_train_cpu_tiny(benchmark, monkeypatch, path):
    """CPU: distillation step of the tiny presets, batch 4 fp32 (``auto`` = the default dispatch,
    which on CPU is the reference for the Triton ops)."""
    if torch.cuda.is_available():
        pytest.skip("CPU case: runs on CPU-only machines")
    _bench_train(benchmark, monkeypatch, torch.device("cpu"), "distilpose_tiny", "tokenpose_tiny", 4, "fp32",
                 "reference" if path == "reference" else "fused")
    benchmark.extra_info["path"] = benchmark.extra_info["impl"] = path


def test_e2e_metadata_recorded():
    """Not a benchmark: the metadata every stored result carries is complete."""
    meta = env_metadata(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    for key in ("device", "torch", "git_commit", "python"):
        assert meta.get(key), key
