"""regression_to_image (flip-test merge + crop pixels + inverse affine in one kernel): the Triton
kernel (CPU interpreter, or the GPU) against the PyTorch reference and an independent float64
formula, dtypes and strides, errors, registration, and the engine using it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import distilpose_kernels as dk
from distilpose_kernels import keypoints as kp_mod
from sm90 import compile_for_sm90

triton = pytest.importorskip("triton")

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(n, k, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = dict(coords=torch.rand(n, k, 2, generator=g) * 1.2 - 0.1, scores=torch.randn(n, k, generator=g),
             center=torch.rand(n, 2, generator=g) * 400, scale=torch.rand(n, 2, generator=g) * 300 + 20,
             rotation=torch.randn(n, generator=g) * 40, flipped_coords=torch.rand(n, k, 2, generator=g),
             flipped_scores=torch.randn(n, k, generator=g))
    t = {name: v.to(DEV, dtype if name in ("coords", "scores", "flipped_coords", "flipped_scores") else torch.float32)
         for name, v in t.items()}
    t["flip_perm"] = torch.randperm(k, generator=g).to(DEV)
    return t


def _float64(t, crop, flip, rot):
    """Independent formula, per keypoint, in float64."""
    c = t["coords"].double().cpu().numpy()
    s = t["scores"].double().cpu().numpy()
    if flip:
        perm = t["flip_perm"].cpu().numpy()
        fc = t["flipped_coords"].double().cpu().numpy()[:, perm]
        c = (c + np.stack((1.0 - fc[..., 0], fc[..., 1]), -1)) / 2
        s = (s + t["flipped_scores"].double().cpu().numpy()[:, perm]) / 2
    h, w = crop
    v = (c - 0.5) * t["scale"].double().cpu().numpy()[:, None, :]  # crop px -> offset from the centre
    if rot:
        a = np.deg2rad(t["rotation"].double().cpu().numpy())[:, None]
        v = np.stack((np.cos(a) * v[..., 0] - np.sin(a) * v[..., 1], np.sin(a) * v[..., 0] + np.cos(a) * v[..., 1]), -1)
    return v + t["center"].double().cpu().numpy()[:, None, :], s


@pytest.mark.parametrize("flip", [True, False])
@pytest.mark.parametrize("rot", [True, False])
@pytest.mark.parametrize("n,k", [(1, 17), (5, 133), (3, 7)])
def test_regression_to_image_matches_float64_and_reference(n, k, flip, rot, monkeypatch):
    from distilpose_kernels import keypoints_triton

    monkeypatch.setattr(keypoints_triton, "_new_output", lambda shape, device, dtype: torch.full(
        shape, float("nan"), device=device, dtype=dtype))
    t = _inputs(n, k, seed=n + k)
    args = dict(rotation=t["rotation"] if rot else None)
    if flip:
        args.update(flipped_coords=t["flipped_coords"], flipped_scores=t["flipped_scores"], flip_perm=t["flip_perm"])
    kp, sc = dk.regression_to_image(t["coords"], t["scores"], t["center"], t["scale"], (256, 192), backend="triton",
                                    **args)
    want_kp, want_sc = _float64(t, (256, 192), flip, rot)
    assert kp.shape == (n, k, 2) and sc.shape == (n, k) and kp.dtype == sc.dtype == torch.float32
    np.testing.assert_allclose(kp.cpu().numpy(), want_kp, rtol=0, atol=1e-3)  # image px
    np.testing.assert_allclose(sc.cpu().numpy(), want_sc, rtol=1e-6, atol=1e-6)
    ref = dk.regression_to_image_reference(t["coords"], t["scores"], t["center"], t["scale"], (256, 192), **args)
    torch.testing.assert_close(kp, ref[0], rtol=0, atol=1e-3)
    torch.testing.assert_close(sc, ref[1], rtol=0, atol=0)


def test_regression_to_image_low_precision_and_strided_inputs():
    """bf16 predictions, scores a strided view of the head's (N, K, 1) output, coords a slice of
    the batched (2N, K, 2) output: read through their strides, computed in fp32."""
    t = _inputs(4, 17, seed=3)
    both = torch.cat((t["coords"], t["flipped_coords"])).bfloat16()
    raw_scores = torch.cat((t["scores"], t["flipped_scores"]))[..., None].bfloat16()  # (2N, K, 1)
    args = (both[:4], raw_scores[:4, :, 0], t["center"], t["scale"], (256, 192), t["rotation"], both[4:],
            raw_scores[4:, :, 0], t["flip_perm"])
    got = dk.regression_to_image(*args, backend="triton")
    want = dk.regression_to_image_reference(*args)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-3)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)


def test_regression_to_image_errors_registration_and_compile():
    t = _inputs(2, 5, seed=1)
    base = dict(coords=t["coords"], scores=t["scores"], center=t["center"], scale=t["scale"], crop_size=(256, 192))
    cases = [
        (dict(coords=t["coords"][..., :1]), ValueError, r"coords: expected shape \(N, K, 2\)"),
        (dict(scores=t["scores"][:, :3]), ValueError, "scores: expected shape"),
        (dict(center=t["center"][:1]), ValueError, "center: expected shape"),
        (dict(rotation=t["rotation"][:1]), ValueError, "rotation: expected shape"),
        (dict(crop_size=(256,)), ValueError, "crop_size: expected"),
        (dict(flipped_coords=t["flipped_coords"]), ValueError, "give all three"),
        (dict(flipped_coords=t["flipped_coords"], flipped_scores=t["flipped_scores"],
              flip_perm=t["flip_perm"].float()), TypeError, "flip_perm: expected dtype"),
        (dict(backend="cuda"), ValueError, "backend must be"),
    ]
    for change, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            dk.regression_to_image(**{**base, **change})
    op = torch.ops.distilpose.regression_to_image.default
    torch.library.opcheck(op, (t["coords"], t["scores"], t["center"], t["scale"], 256, 192, t["rotation"],
                               t["flipped_coords"], t["flipped_scores"], t["flip_perm"], "triton"))
    torch.library.opcheck(op, (t["coords"], t["scores"], t["center"], t["scale"], 256, 192, None, None, None, None,
                               "reference"))
    f = torch.compile(lambda c: dk.regression_to_image(c, t["scores"], t["center"], t["scale"], (256, 192),
                                                       backend="triton"), backend="aot_eager", fullgraph=True)
    want = dk.regression_to_image_reference(t["coords"], t["scores"], t["center"], t["scale"], (256, 192))
    for a, b in zip(f(t["coords"]), want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-3)


def test_engine_decodes_students_through_the_op(monkeypatch):
    """InferenceEngine's student step: one regression_to_image call (with the flip-test twins), the
    same keypoints as the step's previous PyTorch ops (flip_back_regression + crop_to_image)."""
    from distilpose.models import build_model
    from distilpose.runtime import InferenceEngine, crop_to_image, flip_back_regression

    calls = []
    real = kp_mod.regression_to_image
    monkeypatch.setattr(dk, "regression_to_image", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    model = build_model("distilpose_tiny").eval()
    x = torch.randn(2, 3, *model.input_size)
    center, scale = torch.tensor([[100.0, 80.0], [50.0, 60.0]]), torch.tensor([[120.0, 160.0], [90.0, 120.0]])
    eng = InferenceEngine(model, flip_test=True)
    got = eng(x, center, scale)
    assert len(calls) == 1 and "flip_perm" in calls[0]
    with torch.no_grad():
        out = eng.model(torch.cat((x, x.flip(-1))))
    c = (out["coords"][:2] + flip_back_regression(out["coords"][2:], eng.perm)) * 0.5
    h, w = model.input_size
    want = crop_to_image(c * torch.tensor([float(w), float(h)]), center, scale, None, (h, w))
    torch.testing.assert_close(got["keypoints"], want, rtol=0, atol=1e-4)


def test_eager_outputs_are_adjacent_and_reach_the_host_in_one_copy(monkeypatch):
    """The eager Triton path returns keypoints and scores as views of one buffer (scores right
    after keypoints), so the engine's ``device="cpu"`` copies them in one transfer, no packing
    kernel; the custom op (torch.compile's path) returns separate tensors, as custom ops must."""
    from distilpose.runtime import _to_device_together

    t = _inputs(3, 17, seed=5)
    args = dict(flipped_coords=t["flipped_coords"], flipped_scores=t["flipped_scores"], flip_perm=t["flip_perm"])
    kp, sc = dk.regression_to_image(t["coords"], t["scores"], t["center"], t["scale"], (256, 192), backend="triton",
                                    **args)
    assert kp.untyped_storage().data_ptr() == sc.untyped_storage().data_ptr()
    assert sc.storage_offset() == kp.storage_offset() + kp.numel() and kp.is_contiguous() and sc.is_contiguous()
    kp2, sc2 = kp_mod._op(t["coords"], t["scores"], t["center"], t["scale"], 256, 192, None, args["flipped_coords"],
                          args["flipped_scores"], args["flip_perm"], "triton")
    assert kp2.untyped_storage().data_ptr() != sc2.untyped_storage().data_ptr()
    torch.testing.assert_close(kp2, kp, rtol=0, atol=0)
    torch.testing.assert_close(sc2, sc, rtol=0, atol=0)

    cats = []
    real_cat = torch.cat
    monkeypatch.setattr(torch, "cat", lambda *a, **kw: cats.append(1) or real_cat(*a, **kw))
    meta = torch.device("meta")  # any other device takes the copy path; meta keeps the test on CPU
    hk, hs = _to_device_together(kp, sc, meta)
    assert not cats and hk.shape == (3, 17, 2) and hs.shape == (3, 17) and hk.device == meta
    hk, hs = _to_device_together(kp2, sc2, meta)  # apart: packed first (one cat), still one copy
    assert len(cats) == 1 and hk.shape == (3, 17, 2) and hs.shape == (3, 17)


def test_to_device_together_values_and_fresh_tensors():
    from distilpose.runtime import _to_device_together

    buf = torch.randn(2 * 5 * 3)
    kp, sc = buf[:20].view(2, 5, 2), buf[20:].view(2, 5)
    for a, b in ((kp, sc), (torch.randn(2, 5, 2), torch.randn(2, 5).double())):
        hk, hs = _to_device_together(a, b, torch.device("cpu"))  # same device: clones
        torch.testing.assert_close(hk, a, rtol=0, atol=0)
        torch.testing.assert_close(hs, b, rtol=0, atol=0)
        assert hk.data_ptr() != a.data_ptr() and hs.data_ptr() != b.data_ptr() and hs.dtype == b.dtype


def test_engine_results_on_a_device_match(monkeypatch):
    from distilpose.models import build_model
    from distilpose.runtime import InferenceEngine

    model = build_model("distilpose_tiny").eval()
    x = torch.randn(1, 3, *model.input_size)
    center, scale = torch.tensor([[100.0, 80.0]]), torch.tensor([[120.0, 160.0]])
    eng = InferenceEngine(model, flip_test=True)
    a = eng(x, center, scale)
    b = eng(x, center, scale, device="cpu")
    torch.testing.assert_close(b["keypoints"], a["keypoints"], rtol=0, atol=0)
    torch.testing.assert_close(b["scores"], a["scores"], rtol=0, atol=0)
    p = eng.predict(x, center, scale, device="cpu")
    assert p.shape == (1, eng.num_keypoints, 3)
    torch.testing.assert_close(p[..., :2], a["keypoints"], rtol=0, atol=0)


@pytest.mark.slow
def test_regression_to_image_kernel_compiles_for_sm90_without_a_gpu():
    compile_for_sm90(r"""
import distilpose_kernels.keypoints_triton as kt

for p in ("*fp32", "*bf16"):
    for flip in (False, True):
        compile_(kt._regression_to_image_kernel, dict(C=p, S=p, FC=p, FS=p, PERM="*i64", CEN="*fp32", SCA="*fp32",
                 ROT="*fp32", KP="*fp32", SC="*fp32"), {}, dict(FLIP=flip, HAS_ROT=flip, BLOCK=kt.BLOCK))
""")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_graphed_engine_results_on_the_host_in_one_copy():
    """CUDA-graph engine: the inputs copied in one foreach launch, the results straight from the
    graph's buffers to the host (no clone), equal to the cloned device results; a second call
    with other inputs does not change the first call's host results."""
    from distilpose.models import build_model
    from distilpose.runtime import InferenceEngine

    model = build_model("distilpose_tiny").eval()
    eng = InferenceEngine(model, device="cuda", flip_test=True, fold_bn=True, cuda_graph=True)
    x = torch.randn(1, 3, *model.input_size, device="cuda")
    center, scale = torch.tensor([[100.0, 80.0]], device="cuda"), torch.tensor([[120.0, 160.0]], device="cuda")
    a = eng(x, center, scale)
    b = eng(x, center, scale, device="cpu")
    assert b["keypoints"].device.type == "cpu"
    torch.testing.assert_close(b["keypoints"], a["keypoints"].cpu(), rtol=0, atol=0)
    torch.testing.assert_close(b["scores"], a["scores"].cpu(), rtol=0, atol=0)
    keep = b["keypoints"].clone()
    eng(torch.randn_like(x), center * 2, scale, device="cpu")
    torch.testing.assert_close(b["keypoints"], keep, rtol=0, atol=0)
