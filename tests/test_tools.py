"""The measurement tools run and report plausible numbers (they back claims in the README)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _run_tool(args, **kw):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, **kw)


def _skip_without_nvcc_and_cuda_headers() -> None:
    """The CUDA sources' static checks compile with nvcc against a CUDA torch wheel's headers
    (tools/check_cuda_compile.sh fetches them into .cuda_headers)."""
    headers = ROOT / ".cuda_headers" / "torch" / "include" / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    if not headers.exists():
        pytest.skip("CUDA torch headers not fetched (tools/check_cuda_compile.sh fetches them)")
    from test_native_host import _nvcc

    if _nvcc() is None:
        pytest.skip("nvcc not found")


def _skip_without_sm90_compiler() -> None:
    """The static-resource tools compile for sm_90 on the CPU machine (on a GPU machine the
    candidates are timed instead); they need Triton's NVIDIA backend."""
    if torch.cuda.is_available():
        pytest.skip("the GPU machine times the candidates instead")
    try:
        from triton.backends import backends
    except ImportError:
        pytest.skip("Triton is not installed")
    if "nvidia" not in backends:
        pytest.skip("Triton's NVIDIA backend is not installed")


def test_host_overhead_tool(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "host.json"
    proc = _run_tool(["tools/host_overhead.py", "--repeat", "50", "--json", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert {r["case"].split(" ")[0] for r in rows} == {"simulated_heatmap_loss", "gaussian_heatmap_targets",
                                                        "token_attention", "add_pos_layernorm"}
    for r in rows:
        assert r["op_us"] > 0 and r["floor_us"] > 0 and r["op_us"] >= r["overhead_us"]


def test_count_kernels_tool_tde_fusions_cut_the_kernels_per_layer(tmp_path):
    """Each TDE inference fusion setting launches fewer kernels per layer than the one before
    (counted with the Triton kernels run in the interpreter), with the plain encoder's outputs."""
    pytest.importorskip("triton")
    out = tmp_path / "kernels.json"
    proc = _run_tool(["tools/count_kernels.py", "--json", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    dec = res["student_decode"]
    assert dec["regression_to_image kernel, flip"]["decoding"] == dec["regression_to_image kernel, no flip"]["decoding"] == 1
    assert dec["pytorch ops, flip"]["decoding"] > 15 and dec["pytorch ops, no flip"]["decoding"] > 10
    res = res["tde"]
    per_layer = [r["per_layer"] for r in res.values()]
    assert per_layer == [12, 7, 5, 4], res
    assert all(r["max_abs_diff"] < 1e-5 for r in res.values())
    bf16 = res["bf16 engine: + fuse_add_norm + mlp_kernel"]["depth4"]
    assert bf16["triton:_mlp_kernel"] == 4 and bf16["triton:_linear_add_norm_kernel"] == 4


def test_kernel_resources_tool_loss_candidates(tmp_path):
    _skip_without_sm90_compiler()
    out = tmp_path / "res.json"
    proc = _run_tool(["tools/kernel_resources.py", "--hw", "16", "32", "--json", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    from distilpose_kernels import heatmap_triton as hmt

    assert len(data["candidates"]) == len(hmt.tile_candidates(16, 32))
    kinds = {c["tile"]["maps"] for c in data["candidates"]}
    assert 0 in kinds and kinds & {1, 2}
    for c in data["candidates"]:
        assert 0 < c["regs"] <= 255 and c["local"] == 0 and c["programs_per_sm"] >= 1
        vector = c["ldg_by_width"].get("128", 0) + c["ldg_by_width"].get("64", 0)
        # the in-flight model counts vector tile loads; tiles with one pixel per thread have none
        assert (c["inflight_kb_per_sm"] is None) == (vector == 0), c
    assert max(c["inflight_kb_per_sm"] or 0 for c in data["candidates"]) > 0
    # W = 24: scalar tile loads, which the in-flight model does not tell apart: reported as n/a
    proc = _run_tool(["tools/kernel_resources.py", "--hw", "8", "24"])
    assert proc.returncode == 0 and "n/a" in proc.stdout, proc.stderr[-3000:]


def test_kernel_resources_tool_soft_argmax(tmp_path):
    _skip_without_nvcc_and_cuda_headers()
    out = tmp_path / "sa.json"
    proc = _run_tool(["tools/kernel_resources.py", "--soft-argmax", "--json", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["kernels"]
    slope = {(r["kernel"], r["dtype"], r["items"]): r.get("sass_per_pixel") for r in rows}
    # the vectorised kernel's straight-line code per pixel is well under the default kernel's
    assert slope[("vec", "fp32", 4)] < 0.5 * slope[("reg", "fp32", 16)]


def test_kernel_resources_tool_simhm_loss_issues_the_map_loads_first(tmp_path):
    """The CUDA loss forward requests its teacher map before reading the prediction: in every
    16-byte-load instance the first map load precedes the first reciprocal (1 / sigma^2, which
    needs the prediction), so a map costs one memory round trip, not two in a row."""
    _skip_without_nvcc_and_cuda_headers()
    out = tmp_path / "loss.json"
    proc = _run_tool(["tools/kernel_resources.py", "--simhm-loss", "--json", str(out)])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    all_rows = json.loads(out.read_text())["kernels"]
    rows = [r for r in all_rows if r["kernel"] == "simhm_loss_fwd"]
    assert {r["dtype"] for r in rows} == {"fp32", "fp16", "bf16"}
    for r in rows:
        assert r["map_loads_first"] and r["first_map_load"] < r["first_rcp"], r
    fp32 = next(r for r in rows if r["dtype"] == "fp32")
    assert fp32["stack"] == 0 and fp32["regs"] <= 64, fp32
    # the opt-in persistent form (two maps' pixels per thread) without spills
    pers = [r for r in all_rows if r["kernel"] == "simhm_loss_fwd_persistent"]
    assert {r["dtype"] for r in pers} == {"fp32", "fp16", "bf16"} and all(r["stack"] == 0 for r in pers), pers
    # the pipelined form: asynchronous copies (LDGSTS), no spills, and at 64 x 48 at least 3 blocks
    # per SM (2 maps each in flight: over 64 KB requested per SM in fp32)
    pipe = [r for r in all_rows if r["kernel"] == "simhm_loss_fwd_pipelined"]
    assert {r["dtype"] for r in pipe} == {"fp32", "fp16", "bf16"}, pipe
    for r in pipe:
        assert r["stack"] == 0 and r["async_copies"] > 0 and r["blocks_per_sm_64x48"] >= 3, r


def test_profile_ops_distill_cases_and_host_profile_run_on_cpu(monkeypatch):
    """The profiler's distillation-step cases (tiny presets here) and its cProfile helper."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import profile_ops
    finally:
        sys.path.pop(0)
    g = torch.Generator().manual_seed(0)
    cases = profile_ops.distill_cases(torch.device("cpu"), g, "distilpose_tiny", "tokenpose_tiny", 2)
    assert [c[0] for c in cases] == ["e2e distill step b2 bf16 fused", "e2e distill step b2 bf16 fastteacher",
                                     "e2e distill step b2 bf16 fastteacher noepi",
                                     "e2e distill step b2 bf16 fastteacher cl graph"]
    only = profile_ops.distill_cases(torch.device("cpu"), g, "distilpose_tiny", "tokenpose_tiny", 2,
                                     want=lambda name: name.endswith("noepi"))
    assert [c[0] for c in only] == ["e2e distill step b2 bf16 fastteacher noepi"]
    for _, step, _ in cases:
        assert torch.isfinite(step())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    rows = profile_ops.host_profile(cases[0][1], calls=3, top=5)
    assert 0 < len(rows) <= 5 and all(r["own_us"] >= 0 and r["calls_per_call"] > 0 for r in rows)


def test_gemm_resources_tool_add_norm_tiles(tmp_path):
    """The GEMM + add + LayerNorm tiles compile for sm_90 with 3xTF32 dots and at least one
    program fits an SM (Triton's dynamic shared memory counted); the split tiles (the batch-1
    candidates) use no stack frame, i.e. do not spill registers."""
    _skip_without_sm90_compiler()
    out = tmp_path / "gemm.json"
    proc = _run_tool(["tools/gemm_resources.py", "--only", "linear_add_norm", "--precision", "tf32x3",
                      "--json", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    from distilpose_kernels import mlp_triton

    tiles = json.loads(out.read_text())["tiles"]
    split = [t for t in tiles if "split" in t["kernel"]]
    assert len(tiles) - len(split) == len(mlp_triton.ADD_NORM_TUNE_TILES)
    assert len(split) == 2 * len(mlp_triton.ADD_NORM_SPLIT_TILES)  # K = 192 and K = 576
    for t in tiles:
        assert 0 < t["regs"] <= 255 and t["spill_bytes"] == 0 and t["programs_per_sm"] >= 1, t
        assert t["shared"] > 0, t  # the operand stages live in dynamic shared memory
        launched = t["programs_launched_per_sm"]
        assert launched["69888 rows (b256)"] > launched["546 rows (b1 flip)"] > 0
    for t in split:
        assert t["stack"] == 0, t
        assert t["programs_launched_per_sm"]["546 rows (b1 flip)"] > 0.5, t  # vs 0.07-0.27 for whole rows
