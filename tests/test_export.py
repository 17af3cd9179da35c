"""Deployment: conv+BN folding, the inference engine, ONNX (onnxruntime) and torch.export."""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from distilpose.fuse import find_conv_bn_pairs, fold_conv_bn, fuse_conv_bn_model
from distilpose.models import build_model
from distilpose.runtime import (
    COCO_FLIP_PAIRS,
    InferenceEngine,
    crop_to_image,
    flip_back_heatmaps,
    flip_index,
)


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters (fresh BNs fold to almost identity)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(c, generator=g) * 0.4 - 0.2)
    return model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# ----------------------------------------------------------------------------- folding


@pytest.mark.parametrize("bias,affine,groups", [(False, True, 1), (True, True, 2), (False, False, 1)])
def test_fold_conv_bn_matches_float64(bias, affine, groups):
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=bias, groups=groups).double()
    bn = _randomise_bn(nn.BatchNorm2d(6, affine=affine)).double().eval() if affine else nn.BatchNorm2d(6, affine=False).double()
    if not affine:
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.eval()
    x = torch.randn(3, 4, 9, 7, dtype=torch.float64)
    fused = fold_conv_bn(conv, bn)
    assert fused is not conv and fused.bias is not None
    torch.testing.assert_close(fused(x), bn(conv(x)), rtol=1e-12, atol=1e-12)
    # the original conv is untouched
    assert (conv.bias is None) == (not bias)


def test_fold_conv_bn_errors():
    with pytest.raises(TypeError, match="conv"):
        fold_conv_bn(nn.Linear(2, 2), nn.BatchNorm2d(2))
    with pytest.raises(ValueError, match="output channels"):
        fold_conv_bn(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="running statistics"):
        fold_conv_bn(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3, track_running_stats=False))


def test_fold_skips_shared_conv_output():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.conv2 = nn.Conv2d(4, 4, 1)
            self.bn2 = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)  # used by the BN and by the residual: must not be folded
            z = self.bn2(self.conv2(self.bn(y)))
            return y + z

    m = _randomise_bn(Branchy()).eval()
    assert find_conv_bn_pairs(m) == [("conv2", "bn2")]
    x = torch.randn(2, 3, 8, 8)
    f = fuse_conv_bn_model(m)
    assert isinstance(f.bn, nn.BatchNorm2d) and isinstance(f.bn2, nn.Identity)
    torch.testing.assert_close(f(x), m(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", ["distilpose_tiny", "tokenpose_tiny"])
def test_fuse_model_same_outputs(preset):
    model = _randomise_bn(build_model(preset)).eval()
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    fused = fuse_conv_bn_model(model)
    assert fused._distilpose_folded_bn == n_bn > 0
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == n_bn  # original kept
    x = torch.randn(2, 3, 256, 192)
    with torch.no_grad():
        a, b = model(x), fused(x)
    for k in a:
        assert _rel(b[k], a[k]) < 1e-5, k


def test_fuse_paper_student_all_pairs():
    model = build_model("distilpose_s").eval()
    # StemNet: 2 stem convs + 4 bottlenecks x 3 + 1 downsample = 15 conv+BN pairs
    assert len(find_conv_bn_pairs(model)) == 15


def test_fuse_needs_eval():
    with pytest.raises(RuntimeError, match="eval"):
        fuse_conv_bn_model(build_model("distilpose_tiny").train())


# ----------------------------------------------------------------------------- engine


def test_crop_to_image_inverts_data_affine():
    from distilpose.data.transforms import affine_points, get_affine_matrix

    rng = np.random.default_rng(0)
    n, k = 3, 5
    center = rng.uniform(50, 400, size=(n, 2))
    scale = rng.uniform(40, 300, size=(n, 2))
    rot = rng.uniform(-45, 45, size=n)
    img_pts = rng.uniform(0, 500, size=(n, k, 2))
    crop = np.stack([affine_points(img_pts[i], get_affine_matrix(center[i], scale[i], rot[i], (256, 192))) for i in range(n)])
    back = crop_to_image(
        torch.from_numpy(crop), torch.from_numpy(center), torch.from_numpy(scale), torch.from_numpy(rot), (256, 192)
    )
    np.testing.assert_allclose(back.numpy(), img_pts, rtol=0, atol=1e-8)


def test_flip_back_heatmaps_shift_and_swap():
    hm = torch.rand(2, 17, 8, 6)
    perm = flip_index(17, COCO_FLIP_PAIRS)
    out = flip_back_heatmaps(hm, perm, shift=True)
    mirrored = hm.flip(-1)[:, perm]
    torch.testing.assert_close(out[..., 1:], mirrored[..., :-1])
    torch.testing.assert_close(out[..., 0], mirrored[..., 0])
    assert perm[1] == 2 and perm[2] == 1 and perm[0] == 0


@pytest.mark.parametrize("flip_batched", [True, False])
def test_engine_student_flip_matches_manual(flip_batched):
    model = _randomise_bn(build_model("distilpose_tiny")).eval()
    x = torch.randn(2, 3, 256, 192)
    center = torch.tensor([[300.0, 200.0], [120.0, 90.0]])
    scale = torch.tensor([[150.0, 200.0], [96.0, 128.0]])
    rot = torch.tensor([0.0, 30.0])
    engine = InferenceEngine(model, flip_test=True, flip_batched=flip_batched, fold_bn=True)
    out = engine(x, center, scale, rot)
    assert out["keypoints"].shape == (2, 17, 2) and out["scores"].shape == (2, 17)
    with torch.no_grad():
        o, of = model(x), model(x.flip(-1))
    perm = flip_index(17)
    c_f = of["coords"][:, perm]
    coords = (o["coords"] + torch.stack((1 - c_f[..., 0], c_f[..., 1]), -1)) / 2
    want = crop_to_image(coords * torch.tensor([192.0, 256.0]), center, scale, rot, (256, 192))
    torch.testing.assert_close(out["keypoints"], want, rtol=1e-4, atol=1e-3)
    want_s = (o["score"][..., 0] + of["score"][..., 0][:, perm]) / 2
    torch.testing.assert_close(out["scores"], want_s, rtol=1e-4, atol=1e-5)
    # the caller's model is untouched (still has its BNs, same outputs)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_engine_no_flip_crop_pixels_and_predict():
    model = build_model("distilpose_tiny").eval()
    x = torch.randn(3, 3, 256, 192)
    engine = InferenceEngine(model, flip_test=False)
    out = engine(x)  # no center/scale: crop pixels
    with torch.no_grad():
        o = model(x)
    torch.testing.assert_close(out["keypoints"], o["coords"] * torch.tensor([192.0, 256.0]))
    pred = engine.predict(x)
    assert pred.shape == (3, 17, 3)
    torch.testing.assert_close(pred[..., 2], o["score"][..., 0])


@pytest.mark.parametrize("preset", ["distilpose_tiny", "tokenpose_tiny"])
def test_engine_cast_model_bf16(preset):
    """cast_model: bf16 weights and activations without autocast; close to fp32, inputs untouched."""
    model = _randomise_bn(build_model(preset)).eval()
    x = torch.randn(2, 3, 256, 192)
    x0 = x.clone()
    center, scale = torch.tensor([[200.0, 150.0], [90.0, 60.0]]), torch.tensor([[120.0, 160.0], [64.0, 96.0]])
    fp32 = InferenceEngine(model, flip_test=True, fold_bn=True)(x, center, scale)
    eng = InferenceEngine(model, precision="bf16", cast_model=True, flip_test=True, fold_bn=True)
    assert {p.dtype for p in eng.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the caller's model is not cast
    out = eng(x, center, scale)
    assert out["keypoints"].dtype == torch.float32 and out["scores"].dtype == torch.float32
    torch.testing.assert_close(x, x0, rtol=0, atol=0)
    # the model's raw outputs deviate from fp32 about as much as under autocast (both bf16)
    key = "coords" if preset.startswith("distilpose") else "heatmaps"
    ac = InferenceEngine(model, precision="bf16", flip_test=True, fold_bn=True)
    with torch.no_grad():
        want = InferenceEngine(model, flip_test=True, fold_bn=True)._model_out(x)[key]
        err_cast = (eng._model_out(x)[key].float() - want).abs().max().item()
        err_ac = (ac._model_out(x)[key].float() - want).abs().max().item()
    scale_out = want.abs().max().item()
    assert err_cast <= 4 * err_ac + 1e-3 * scale_out, (err_cast, err_ac)
    assert err_cast < 0.05 * scale_out
    if key == "coords":  # decoded keypoints: within 2% of the box size
        assert (out["keypoints"] - fp32["keypoints"]).abs().max() < 0.02 * scale.max().item()
    # without a reduced precision the flag changes nothing
    same = InferenceEngine(model, precision="fp32", cast_model=True, flip_test=True, fold_bn=True)
    assert not same.cast_model
    torch.testing.assert_close(same(x, center, scale)["keypoints"], fp32["keypoints"])


def test_engine_teacher_decodes_heatmaps():
    import distilpose_kernels as dk

    model = build_model("tokenpose_tiny").eval()
    x = torch.randn(2, 3, 256, 192)
    center, scale = torch.tensor([200.0, 150.0]), torch.tensor([120.0, 160.0])
    engine = InferenceEngine(model, flip_test=True)  # DARK decoding, shifted flip
    out = engine(x, center, scale)
    with torch.no_grad():
        hm = model(x)["heatmaps"]
        hm_f = model(x.flip(-1))["heatmaps"]
    # flip back with the op library's own helper (an independent implementation)
    avg = (hm + dk.flip_heatmaps(hm_f, COCO_FLIP_PAIRS, shift=True)) / 2
    coords, maxvals = dk.decode_heatmaps(avg, method="dark", kernel=11)
    want = (coords.double() * 4.0 / torch.tensor([192.0, 256.0]) - 0.5) * scale.double() + center.double()
    torch.testing.assert_close(out["keypoints"].double(), want, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(out["scores"], maxvals.float().reshape(2, 17))


def test_engine_bad_input():
    engine = InferenceEngine(build_model("distilpose_tiny"), flip_test=False)
    with pytest.raises(ValueError, match="crops"):
        engine(torch.randn(1, 3, 128, 96))
    with pytest.raises(TypeError, match="crops"):
        engine(torch.zeros(1, 3, 256, 192, dtype=torch.uint8))
    with pytest.raises(ValueError, match="center"):
        engine(torch.randn(2, 3, 256, 192), center=torch.zeros(3, 2), scale=torch.ones(2))
    with pytest.raises(ValueError, match="precision"):
        InferenceEngine(build_model("distilpose_tiny"), precision="int8")
    with pytest.raises(ValueError, match="cuda_graph"):
        InferenceEngine(build_model("distilpose_tiny"), device="cpu", cuda_graph=True)


# ----------------------------------------------------------------------------- export


@pytest.mark.parametrize("flip_test", [False, True])
def test_onnx_export_matches_pytorch(tmp_path, flip_test):
    pytest.importorskip("onnxruntime")
    import onnx

    from distilpose.export import check_onnx, export_onnx

    model = _randomise_bn(build_model("distilpose_tiny")).eval()
    path = str(tmp_path / "student.onnx")
    export_onnx(model, path, opset=17, flip_test=flip_test)
    proto = onnx.load(path)
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert [o.name for o in proto.graph.output] == ["coords", "score", "sigma"]
    errs = check_onnx(path, model, batches=(1, 3), flip_test=flip_test)  # raises outside tolerance
    assert set(errs) == {"coords", "score", "sigma"} and all(math.isfinite(v) for v in errs.values())
    assert not any(f.startswith(".tmp-") for f in os.listdir(tmp_path))
    if not flip_test:  # the check can fail: other weights give other outputs
        other = build_model("distilpose_tiny").eval()
        with pytest.raises(AssertionError, match="max abs error"):
            check_onnx(path, other, batches=(2,))


def test_torch_export_program(tmp_path):
    from distilpose.export import export_program

    model = _randomise_bn(build_model("distilpose_tiny")).eval()
    path = str(tmp_path / "student.pt2")
    prog = export_program(model, path)
    loaded = torch.export.load(path).module()
    for n in (1, 4):  # dynamic batch
        x = torch.randn(n, 3, 256, 192)
        with torch.no_grad():
            want = model(x)
            got = loaded(x)
            got2 = prog.module()(x)
        for name, g, g2 in zip(("coords", "score", "sigma"), got, got2):
            assert _rel(g, want[name]) < 1e-5, name
            torch.testing.assert_close(g, g2)


def test_export_cli_from_checkpoint(tmp_path, capsys):
    from distilpose.checkpoint import save_checkpoint
    from distilpose.cli import main

    model = _randomise_bn(build_model("distilpose_tiny")).eval()
    ckpt = str(tmp_path / "tiny.pth")
    save_checkpoint(ckpt, model)
    out = str(tmp_path / "tiny.pt2")
    assert main(["export", "--checkpoint", ckpt, "--out", out]) == 0  # preset read from meta
    assert "torch.export program" in capsys.readouterr().out
    x = torch.randn(2, 3, 256, 192)
    with torch.no_grad():
        got = torch.export.load(out).module()(x)[0]
        assert _rel(got, model(x)["coords"]) < 1e-5
    with pytest.raises(SystemExit):
        main(["export", "--preset", "distilpose_tiny", "--out", str(tmp_path / "x.onnx")])  # no weights


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["distilpose_tiny", "tokenpose_tiny"])
def test_engine_cuda_graph_matches_eager(preset):
    model = _randomise_bn(build_model(preset)).eval()
    eager = InferenceEngine(model, device="cuda", flip_test=True, fold_bn=True)
    graphed = InferenceEngine(model, device="cuda", flip_test=True, fold_bn=True, cuda_graph=True)
    for seed in range(3):  # later calls replay the captured graph on new inputs
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(2, 3, 256, 192, generator=g).cuda()
        center = (torch.rand(2, 2, generator=g) * 300 + 50).cuda()
        scale = (torch.rand(2, 2, generator=g) * 200 + 50).cuda()
        a, b = eager(x, center, scale), graphed(x, center, scale)
        torch.testing.assert_close(b["keypoints"], a["keypoints"], rtol=1e-4, atol=1e-2)
        torch.testing.assert_close(b["scores"], a["scores"], rtol=1e-4, atol=1e-4)
    assert len(graphed._graphs) == 1
    graphed(torch.randn(1, 3, 256, 192, device="cuda"))  # a new shape: a second graph
    assert len(graphed._graphs) == 2


# ----------------------------------------------------------------------------- GPU check + perf table logic


def _load_script(name: str, folder: str = "scripts"):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / folder / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_distilpose_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the file executes
    spec.loader.exec_module(mod)
    return mod


def _fake_bench(name, median, **extra):
    extra.setdefault("device", "NVIDIA H100 80GB HBM3")
    extra["median_s"] = median
    return {"name": name, "fullname": name, "stats": {"median": median}, "extra_info": extra}


def test_gpu_check_goal_table_from_results():
    gc = _load_script("gpu_check")
    benches = [
        _fake_bench("a[fused-64-bf16-fwdbwd]", 1.0e-3, impl="fused", batch=64, dtype="bf16", mode="fwdbwd"),
        _fake_bench("a[sdpa_flash-64-bf16-fwdbwd]", 1.2e-3, impl="sdpa_flash", batch=64, dtype="bf16", mode="fwdbwd"),
        _fake_bench("a[sdpa_cudnn-64-bf16-fwdbwd]", 3.0e-3, impl="sdpa_cudnn", batch=64, dtype="bf16", mode="fwdbwd"),
        _fake_bench("e[s-withflip-cudagraph]", 0.5e-3, preset="distilpose_s", batch=1, precision="fp32",
                    flip_test=True, path="cudagraph", flops=1e10,
                    auto_choices=[{"op": "capture_cuda_graph: programmatic dependent launch", "use": "fused",
                                   "why": "faster", "fused_ms": 0.48, "reference_ms": 0.52}]),
        _fake_bench("e[s-withflip-reference]", 20e-3, preset="distilpose_s", batch=1, precision="fp32",
                    flip_test=True, path="reference"),
        # faster, but TF32 matmuls: listed, not counted for the fp32 goal
        _fake_bench("e[s-withflip-cudagraph_tf32]", 0.25e-3, preset="distilpose_s", batch=1, precision="fp32",
                    flip_test=True, path="cudagraph_tf32"),
    ]
    benches += [
        _fake_bench("a[fused_cudagraph-64-bf16-fwdbwd]", 0.2e-3, impl="fused_cudagraph", batch=64, dtype="bf16", mode="fwdbwd"),
        _fake_bench("a[sdpa_flash_cudagraph-64-bf16-fwdbwd]", 0.4e-3, impl="sdpa_flash_cudagraph", batch=64, dtype="bf16",
                    mode="fwdbwd"),
        # another suite in the same file with the same fields must not be taken for attention
        _fake_bench("p[fused-64-bf16-fwdbwd]", 1e-5, impl="fused", batch=64, dtype="bf16", mode="fwdbwd"),
        # the fused conv epilogue (info rows)
        _fake_bench("c[b1x1res-b256_bf16_cl-unfused]", 2.0e-3, impl="unfused", case="b1x1res", setting="b256_bf16_cl",
                    bytes=4e9),
        _fake_bench("c[b1x1res-b256_bf16_cl-cudnn]", 1.0e-3, impl="cudnn", case="b1x1res", setting="b256_bf16_cl",
                    bytes=4e9),
        _fake_bench("c[b1x1res-b256_bf16_cl-auto]", 1.1e-3, impl="auto", case="b1x1res", setting="b256_bf16_cl",
                    bytes=4e9),
        _fake_bench("u[cl-eager]", 3.0e-4, impl="eager", layout="cl", bytes=1e9),
        _fake_bench("u[cl-fused]", 1.0e-4, impl="fused", layout="cl", bytes=1e9),
        _fake_bench("g[eager-256]", 2.0e-4, impl="eager", batch=256, dtype="bfloat16"),
        _fake_bench("g[auto-256]", 1.0e-4, impl="auto", batch=256, dtype="bfloat16"),
        _fake_bench("m[eager-256]", 3.0e-4, impl="eager", batch=256, dtype="bfloat16"),
        _fake_bench("m[fused-256]", 2.0e-4, impl="fused", batch=256, dtype="bfloat16"),
        _fake_bench("n[eager-256]", 4.0e-4, impl="eager", batch=256, op="proj_add_norm"),
        _fake_bench("n[fused-256]", 1.0e-4, impl="fused", batch=256, op="proj_add_norm"),
        _fake_bench("l[cublas-192x576]", 9.0e-6, impl="cublas", shape="192x576"),
        _fake_bench("l[triton_tf32x3-192x576]", 4.5e-6, impl="triton_tf32x3", shape="192x576"),
        _fake_bench("l[triton_tf32x3-192x192]", 1.0e-6, impl="triton_tf32x3", shape="192x192"),  # no cuBLAS case
        _fake_bench("s[eager-fc2]", 27e-6, impl="eager", op="fc2_add_norm_b1"),
        _fake_bench("s[tuned-fc2]", 9e-6, impl="tuned", op="fc2_add_norm_b1", tile="BLOCK_M: 32, TILE_N: 64"),
        _fake_bench("s[rows-fc2]", 54e-6, impl="rows", op="fc2_add_norm_b1"),
        _fake_bench("q[two_ops-fp32]", 24e-6, impl="two_ops", dtype="fp32", op="qkv_attention_b1"),
        _fake_bench("q[fused-fp32]", 12e-6, impl="fused", dtype="fp32", op="qkv_attention_b1"),
        # the loss: the default path (its "auto" forward kernel) counts, the forced kernels are listed
        _fake_bench("h[fused_cudagraph-256-fp32]", 27e-6, impl="fused_cudagraph", n=256, teacher_dtype="fp32",
                    gbps=2000.0, fwd_kernel="pipelined"),
        _fake_bench("h[fused_persistent_cudagraph-256-fp32]", 36e-6, impl="fused_persistent_cudagraph", n=256,
                    teacher_dtype="fp32", gbps=1500.0),
        _fake_bench("h[fused_blocks_cudagraph-256-fp32]", 38e-6, impl="fused_blocks_cudagraph", n=256,
                    teacher_dtype="fp32", gbps=1420.0),
    ]
    for b in benches:
        suite = {"a": "attention-x.json bench/bench_attention.py::test_token_attention_gpu",
                 "p": "attention-x.json bench/bench_attention.py::test_add_pos_layernorm_gpu",
                 "c": "conv-x.json bench/bench_conv.py::test_conv2d_relu_gpu",
                 "u": "conv-x.json bench/bench_conv.py::test_upsample_sum_gpu",
                 "g": "attention-x.json bench/bench_attention.py::test_linear_gelu_gpu",
                 "l": "attention-x.json bench/bench_attention.py::test_linear_fp32_gpu",
                 "m": "attention-x.json bench/bench_attention.py::test_fused_mlp_gpu",
                 "n": "attention-x.json bench/bench_attention.py::test_add_norm_gpu",
                 "s": "attention-x.json bench/bench_attention.py::test_add_norm_fp32_b1_graph_gpu",
                 "h": "heatmap-x.json bench/bench_heatmap.py::test_loss_fwd_bwd_gpu",
                 "q": "attention-x.json bench/bench_attention.py::test_qkv_attention_b1_graph_gpu"}
        b["_file"] = suite.get(b["name"][0], "e2e-x.json")
    rows = {r["goal"]: r for r in gc.evaluate_goals(benches, {"fp32_tflops": 50.0, "copy_gbps": 3000.0})}
    att = rows["attention B=64 bf16 fwd+bwd vs best SDPA (per call)"]
    assert att["status"] == "MISS" and att["measured"].startswith("1.20x")  # vs the FASTEST SDPA backend
    att_g = rows["attention B=64 bf16 fwd+bwd vs best SDPA (CUDA graph)"]
    assert att_g["status"] == "PASS" and att_g["measured"].startswith("2.00x")  # graph vs graph only
    e2e = rows["DistilPose-S b1 fp32 flip test FPS"]
    assert e2e["status"] == "PASS" and e2e["measured"].startswith("2000 FPS via cudagraph")
    assert ", PDL kept (faster, graph 0.480 vs 0.520 ms)" in e2e["measured"]  # the graph-level decision
    from distilpose_kernels._utils import PDL_DECISION

    assert gc.PDL_DECISION == PDL_DECISION
    assert "reference 50" in e2e["measured"] and "floor" not in e2e["measured"] and e2e["floor"]
    assert "cudagraph_tf32 4000" in e2e["measured"]
    assert rows["distillation step b64 bf16 vs reference"]["status"] == "NOT RUN"
    assert rows["soft-argmax N=256 fwd bandwidth (per call)"]["status"] == "NOT RUN"
    conv = rows["conv epilogue b1x1res b256_bf16_cl vs unfused"]
    assert conv["status"] == "info" and "cudnn 2.00x (1.000 ms, 4000 GB/s)" in conv["measured"]
    assert "auto 1.82x" in conv["measured"] and "conv epilogue b3x3 b256_bf16_cl vs unfused" not in rows
    lg = rows["TDE fc1+GELU B=256 bfloat16 vs cuBLAS+GELU"]
    assert lg["status"] == "info" and "auto 2.00x" in lg["measured"]
    fm = rows["TDE MLP B=256 bfloat16 one kernel vs cuBLAS+GELU+cuBLAS"]
    assert fm["status"] == "info" and "fused 1.50x (0.200 ms" in fm["measured"]
    an = rows["TDE proj + add + LayerNorm B=256 bfloat16 one kernel vs eager"]
    assert an["status"] == "info" and "fused 4.00x" in an["measured"]
    assert "TDE mlp + add + LayerNorm B=256 bfloat16 one kernel vs eager" not in rows
    lin = rows["TDE Linear 192x576 B=2 fp32 graph vs cuBLAS"]
    assert lin["status"] == "info" and "cublas 9.0 us; triton_tf32x3 2.00x (4.5 us" in lin["measured"]
    assert "TDE Linear 192x192 B=2 fp32 graph vs cuBLAS" not in rows  # nothing to compare with
    split = rows["TDE fc2 + add + LayerNorm B=2 fp32 graph vs eager"]
    assert split["status"] == "info" and "tuned 3.00x (9.0 us" in split["measured"] and "rows 0.50x" in split["measured"]
    assert "TDE proj + add + LayerNorm B=2 fp32 graph vs eager" not in rows
    qa = rows["TDE qkv + attention B=2 fp32 graph: one kernel vs linear + attention"]
    assert qa["status"] == "info" and qa["measured"] == "two_ops 24.0 us; fused 2.00x (12.0 us)", qa
    assert "TDE qkv + attention B=2 bf16 graph: one kernel vs linear + attention" not in rows
    bw = rows["sim. heatmap loss N=256 bandwidth"]
    assert bw["status"] == "PASS" and bw["measured"].startswith("2000 GB/s = 67% of 3000 GB/s copy (fused_cudagraph, "
                                                                "27.0 us, forward: pipelined)"), bw
    assert "forced forwards: blocks 47% (38.0 us), persistent 50% (36.0 us)" in bw["measured"], bw
    ups = rows["HRNet fusion sum b64 bf16 cl vs eager"]
    assert ups["status"] == "info" and "fused 3.00x (0.100 ms, 10000 GB/s)" in ups["measured"]


def test_gpu_check_reads_ncu_csv_and_the_ncu_cases_exist():
    """The ncu stage's parser: the summary metrics per kernel, in launch order, from
    ``ncu --csv --page details`` output (other lines ignored); every case it runs exists."""
    gc = _load_script("gpu_check")
    head = '"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size",' \
           '"Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"'
    rows = [
        '"0","1","python3","h","simhm_loss_fwd_kernel","1","7","(256, 1, 1)","(4352, 1, 1)","0","9.0",'
        '"GPU Speed Of Light Throughput","Duration","us","24.19"',
        '"0","1","python3","h","simhm_loss_fwd_kernel","1","7","(256, 1, 1)","(4352, 1, 1)","0","9.0",'
        '"GPU Speed Of Light Throughput","DRAM Throughput","%","51.3"',
        '"0","1","python3","h","simhm_loss_fwd_kernel","1","7","(256, 1, 1)","(4352, 1, 1)","0","9.0",'
        '"GPU Speed Of Light Throughput","L1/TEX Hit Rate","%","3.1"',
        '"1","1","python3","h","simhm_loss_finalize_kernel","1","7","(1024, 1, 1)","(1, 1, 1)","0","9.0",'
        '"Occupancy","Achieved Occupancy","%","49.8"',
    ]
    text = "==PROF== Connected to process 1\n" + head + "\n" + "\n".join(rows) + "\nncu_cases: loss done\n"
    got = gc.parse_ncu_csv(text)
    assert [k["kernel"] for k in got] == ["simhm_loss_fwd_kernel", "simhm_loss_finalize_kernel"]
    assert got[0]["metrics"] == {"Duration": "24.19 us", "DRAM Throughput": "51.3 %"}
    assert got[1]["metrics"] == {"Achieved Occupancy": "49.8 %"}
    assert gc.parse_ncu_csv("no csv here") == []
    nc = _load_script("ncu_cases", "tools")
    assert set(gc.NCU_CASES) <= set(nc.CASES)


def test_gpu_check_dry_run_and_selections(capsys):
    gc = _load_script("gpu_check")
    assert gc.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    for stage in ("build", "tests-triton", "tests-ext", "sanitizer", "bench-e2e", "bench-conv", "tests-rest"):
        assert stage in out
    assert gc.parse_pytest_summary("== 3 passed, 1 failed, 2 skipped in 4.5s ==") == {"passed": 3, "failed": 1, "skipped": 2}


def test_gpu_check_bench_selections_pick_the_goal_cases():
    """Every benchmark stage's -k expression selects cases (matched the way -k does: a keyword
    is a case-insensitive substring of the test id), and bench-e2e holds the goal paths."""
    import subprocess

    from _pytest.mark.expression import Expression

    gc = _load_script("gpu_check")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "pytest", "bench", "--collect-only", "-q", "-p", "no:cacheprovider"],
                          cwd=root, capture_output=True, text=True, timeout=300)
    ids = [ln.strip() for ln in proc.stdout.splitlines() if "::" in ln]
    assert len(ids) > 100, proc.stdout[-2000:]
    picked = {}
    for stage, (files, expr) in gc.BENCH_SELECTIONS.items():
        files = (files,) if isinstance(files, str) else files
        e = Expression.compile(expr)
        picked[stage] = [i for i in ids if i.split("::")[0] in files and e.evaluate(lambda kw, i=i: kw.lower() in i.lower())]
        assert picked[stage], f"{stage}: -k {expr!r} selects nothing"
    e2e = picked["bench-e2e"]
    for case in ("b1_fp32[distilpose_s-withflip-cudagraph]", "b1_fp32[distilpose_s-noflip-cudagraph]",
                 "b256_bf16[distilpose_s-noflip-cudagraph_cast_cl]"):
        assert any(i.endswith(case) for i in e2e), case
    assert not set(e2e) & set(picked["bench-e2e-variants"])


def test_perf_table_says_when_there_are_no_gpu_results(tmp_path):
    import json

    pt = _load_script("make_perf_table")
    assert "No GPU results yet" in pt.build_markdown(tmp_path)
    cpu = _fake_bench("test_e2e_infer_cpu_b1_fp32[distilpose_s-noflip-eager]", 0.2, device="CPU: Test CPU (2 logical cores)",
                      preset="distilpose_s", batch=1, precision="fp32", flip_test=False, path="eager")
    (tmp_path / "e2e-cpu.json").write_text(json.dumps({"benchmarks": [cpu], "datetime": "2026-01-01"}))
    md = pt.build_markdown(tmp_path)
    assert "No GPU results yet" in md and "CPU: Test CPU" in md and "| distilpose_s | 1 | fp32 | no | eager | 200 |" in md
    gpu = _fake_bench("test_e2e_infer_b1_fp32[distilpose_s-withflip-cudagraph]", 1e-3, preset="distilpose_s",
                      batch=1, precision="fp32", flip_test=True, path="cudagraph")
    (tmp_path / "e2e-gpu.json").write_text(json.dumps({"benchmarks": [gpu], "datetime": "2026-01-02"}))
    md = pt.build_markdown(tmp_path)
    assert "No GPU results yet" not in md and "NVIDIA H100 80GB HBM3" in md and "1,000" in md


def test_gpu_check_loss_bandwidth_counts_the_ops_own_fwd_bwd():
    """The bandwidth goal counts the op's own forward + backward in a CUDA graph (upstream
    gradients given: "fused_opgrad_cudagraph") and shows the caller's form (the gradient of
    reg2hm + 0.01 * score, three more PyTorch kernels) beside it."""
    gc = _load_script("gpu_check")
    suite = "heatmap-x.json bench/bench_heatmap.py::test_loss_fwd_bwd_gpu"
    benches = [
        _fake_bench("h[fused_cudagraph]", 38e-6, impl="fused_cudagraph", n=256, teacher_dtype="fp32", gbps=1412.0,
                    fwd_kernel="blocks"),
        _fake_bench("h[fused_opgrad_cudagraph]", 20e-6, impl="fused_opgrad_cudagraph", n=256, teacher_dtype="fp32",
                    gbps=2683.0, fwd_kernel="pipelined"),
        _fake_bench("h[fused_opgrad_cudagraph-n32]", 5e-6, impl="fused_opgrad_cudagraph", n=32, teacher_dtype="fp32",
                    gbps=9999.0),  # another N: not this goal's
    ]
    for b in benches:
        b["_file"] = suite
    rows = {r["goal"]: r for r in gc.evaluate_goals(benches, {"fp32_tflops": 50.0, "copy_gbps": 4176.0})}
    bw = rows["sim. heatmap loss N=256 bandwidth"]
    assert bw["status"] == "PASS", bw
    assert bw["measured"].startswith("2683 GB/s = 64% of 4176 GB/s copy (fused_opgrad_cudagraph, 20.0 us, "
                                     "forward: pipelined)"), bw
    assert "with the caller's reg2hm + 0.01 * score: 34% (38.0 us)" in bw["measured"], bw
    only_caller = [b for b in benches if b["extra_info"]["impl"] == "fused_cudagraph"]
    bw_old = {r["goal"]: r for r in gc.evaluate_goals(only_caller, {"fp32_tflops": 50.0, "copy_gbps": 4176.0})}
    assert bw_old["sim. heatmap loss N=256 bandwidth"]["status"] == "MISS"  # older results: the caller's form
    # the same graph captured with programmatic dependent launch counts when it is the faster
    pdl = _fake_bench("h[fused_pdl_opgrad_cudagraph]", 19e-6, impl="fused_pdl_opgrad_cudagraph", n=256,
                      teacher_dtype="fp32", gbps=2824.0, fwd_kernel="pipelined", pdl=True)
    pdl["_file"] = suite
    bw_pdl = {r["goal"]: r for r in gc.evaluate_goals(benches + [pdl], {"fp32_tflops": 50.0, "copy_gbps": 4176.0})}
    assert bw_pdl["sim. heatmap loss N=256 bandwidth"]["measured"].startswith(
        "2824 GB/s = 68% of 4176 GB/s copy (fused_pdl_opgrad_cudagraph, 19.0 us"), bw_pdl
