"""Adversarial checks of InferenceEngine, PoseInferencer and the export API (CPU, tiny presets)."""
import math
import os

import numpy as np
import pytest
import torch

from distilpose.models import build_model
from distilpose.runtime import InferenceEngine

H, W = 256, 192


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    out = {}
    for preset in ("distilpose_tiny", "tokenpose_tiny"):
        m = build_model(preset)
        for mod in m.modules():  # non-trivial BN statistics, so folding is exercised
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
        out[preset] = m.eval()
    return out


def _inputs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, H, W, generator=g)
    c = torch.rand(n, 2, generator=g) * 200 + 50
    s = torch.rand(n, 2, generator=g) * 150 + 30
    r = torch.rand(n, generator=g) * 90 - 45
    return x, c, s, r


_FLAGS = [
    dict(flip_batched=False),
    dict(fold_bn=True),
    dict(fold_bn=True, fuse_epilogues=False, channels_last=True),
    dict(channels_last=True),
    dict(fuse_pos_norm=False, fuse_add_norm=False, fuse_mlp=False, triton_linears=False, mlp_kernel=False),
    dict(fuse_pos_norm=True, fuse_add_norm=False, mlp_kernel=True, attention_backend="reference"),
]


@pytest.mark.parametrize("preset", ["distilpose_tiny", "tokenpose_tiny"])
def test_engine_flag_combinations_agree(models, preset):
    """Every CPU flag combination gives the plain engine's keypoints, and the plain engine
    gives the evaluation path's (predict_crops + crops_to_image), with and without rotation."""
    from distilpose.evaluation.predict import crops_to_image, predict_crops

    model = models[preset]
    x, c, s, r = _inputs(3)
    plain = InferenceEngine(model, flip_test=True)
    ref = plain(x, c, s)
    ref_r = plain(x, c, s, r)
    coords, scores = predict_crops(model, x, flip_test=True)
    want = crops_to_image(coords.double().numpy(), c.double().numpy(), s.double().numpy())
    np.testing.assert_allclose(ref["keypoints"].numpy(), want, atol=1e-3)
    np.testing.assert_allclose(ref["scores"].numpy(), scores.numpy(), atol=1e-5)
    # rotation: the unrotated offsets from the centre, rotated by +rot (image axes, y down)
    th = r * math.pi / 180
    d = ref["keypoints"] - c[:, None]
    rx = c[:, None, 0] + d[..., 0] * th.cos()[:, None] - d[..., 1] * th.sin()[:, None]
    ry = c[:, None, 1] + d[..., 0] * th.sin()[:, None] + d[..., 1] * th.cos()[:, None]
    torch.testing.assert_close(ref_r["keypoints"], torch.stack((rx, ry), -1), atol=1e-3, rtol=0)
    for flags in _FLAGS:
        eng = InferenceEngine(model, flip_test=True, **flags)
        for rot in (None, r):
            out = eng(x, c, s, rot)
            assert out["keypoints"].dtype == torch.float32 and out["scores"].dtype == torch.float32
            assert out["keypoints"].device.type == "cpu"
            base = ref if rot is None else ref_r
            torch.testing.assert_close(out["keypoints"], base["keypoints"], atol=2e-3, rtol=0, msg=str(flags))
            torch.testing.assert_close(out["scores"], base["scores"], atol=1e-4, rtol=0, msg=str(flags))
    for cast in (False, True):  # 16-bit: same keypoints within bf16 rounding (pixels of a ~200 px box)
        out = InferenceEngine(model, flip_test=True, precision="bf16", cast_model=cast)(x, c, s, r)
        assert out["keypoints"].dtype == torch.float32 and out["scores"].dtype == torch.float32
        err = (out["keypoints"] - ref_r["keypoints"]).abs()
        # the random teacher's near-flat heatmaps let a few argmaxes jump; most keypoints stay put
        assert err.median() < 1.0 and (preset == "tokenpose_tiny" or err.max() < 2.0)
        assert (out["scores"] - ref_r["scores"]).abs().max() < 0.02


def test_engine_batches_are_independent_and_no_flip(models):
    model = models["distilpose_tiny"]
    x, c, s, r = _inputs(5, seed=1)
    eng = InferenceEngine(model, flip_test=False)
    full = eng(x, c, s, r)
    for i in (0, 3):
        one = eng(x[i : i + 1], c[i], s[i], r[i])  # (2,) / scalar boxes broadcast
        torch.testing.assert_close(one["keypoints"][0], full["keypoints"][i], atol=1e-4, rtol=0)
    empty = eng(x[:0])
    assert empty["keypoints"].shape == (0, 17, 2) and empty["scores"].shape == (0, 17)
    # without center/scale: crop pixels == normalised coords * (W, H)
    with torch.no_grad():
        coords = model(x)["coords"]
    torch.testing.assert_close(eng(x)["keypoints"], coords * torch.tensor([W, H]), atol=1e-3, rtol=0)


def test_engine_never_mutates_the_callers_model():
    torch.manual_seed(0)
    model = build_model("distilpose_tiny").train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    eng = InferenceEngine(model, flip_test=True, fold_bn=True, channels_last=True, precision="bf16", cast_model=True,
                          attention_backend="reference")
    eng(_inputs(2)[0])
    assert model.training and all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert conv.weight.is_contiguous() and not conv.weight.is_contiguous(memory_format=torch.channels_last)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) > 0


def test_engine_input_arrives_in_the_models_dtype_and_layout(models):
    """A cast model gets its input in its own dtype and layout from the one copy of _prepare (no
    cast inside the step); outputs equal those of the same engine fed the pre-cast input. An
    autocast engine keeps float32 input."""
    x, c, s, r = _inputs(2)
    eng = InferenceEngine(models["distilpose_tiny"], precision="bf16", cast_model=True, channels_last=True,
                          attention_backend="reference")
    img = eng._prepare(x, c, s, r)[0]
    assert img.dtype == torch.bfloat16 and img.is_contiguous(memory_format=torch.channels_last)
    pre = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    assert eng._prepare(pre, c, s, r)[0] is pre  # already in that form: no copy
    a, b = eng(x, c, s, r), eng(pre, c, s, r)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    auto = InferenceEngine(models["distilpose_tiny"], precision="bf16", attention_backend="reference")
    assert auto._prepare(x, c, s, r)[0].dtype == torch.float32


def test_engine_input_validation_names_the_argument(models):
    eng = InferenceEngine(models["distilpose_tiny"], flip_test=False)
    x, c, s, r = _inputs(2)
    with pytest.raises(TypeError, match="crops"):
        eng(x.to(torch.uint8))
    with pytest.raises(ValueError, match="crops"):
        eng(x[:, :2])
    with pytest.raises(ValueError, match="center"):
        eng(x, torch.zeros(3, 2), s)
    with pytest.raises(ValueError, match="scale"):
        eng(x, c, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="rotation"):
        eng(x, c, s, torch.zeros(2, 1))
    nan = torch.tensor(float("nan"))
    with pytest.raises(ValueError, match="center"):
        eng(x, torch.where(torch.arange(2)[:, None] == 1, nan, c), s)
    with pytest.raises(ValueError, match="scale"):
        eng(x, c, s.clone().index_fill_(0, torch.tensor([0]), float("inf")))
    with pytest.raises(ValueError, match="scale"):
        eng(x, c, -s)
    with pytest.raises(ValueError, match="rotation"):
        eng(x, c, s, torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match="center"):
        eng(x, np.array([np.nan, 1.0]), s)  # numpy boxes too
    out = eng(x.double(), c.numpy(), s.tolist(), r)  # float64 crops, array / list boxes are fine
    assert out["keypoints"].dtype == torch.float32 and torch.isfinite(out["keypoints"]).all()


def test_pose_inferencer_keeps_the_callers_train_mode():
    from distilpose.inference import PoseInferencer

    torch.manual_seed(0)
    model = build_model("distilpose_tiny").train()
    inf = PoseInferencer(model, device="cpu", flip_test=False)
    assert model.training, "PoseInferencer switched the caller's model to eval mode"
    img = np.random.default_rng(0).integers(0, 255, (60, 40, 3), dtype=np.uint8)
    a = inf.predict(img)[0]
    assert model.training and all(m.training for m in model.modules())
    b = PoseInferencer(build_model("distilpose_tiny").eval(), device="cpu", flip_test=False)
    b.model.load_state_dict(model.state_dict())
    np.testing.assert_allclose(a, b.predict(img)[0], atol=1e-4)  # predicted in eval mode all the same


def test_pose_inferencer_bad_arguments():
    from distilpose.inference import PoseInferencer

    model = build_model("distilpose_tiny")
    for kw, name in ((dict(batch_size=0), "batch_size"), (dict(padding=0.0), "padding"),
                     (dict(padding=float("nan")), "padding")):
        with pytest.raises(ValueError, match=name):
            PoseInferencer(model, device="cpu", **kw)


def test_export_bad_batch_and_failed_export_leaves_nothing(tmp_path, models):
    from distilpose.export import export_onnx, export_program

    model = models["distilpose_tiny"]
    with pytest.raises(ValueError, match="batch"):
        export_program(model, None, batch=0, dynamic_batch=False)
    with pytest.raises(ValueError, match="batch"):
        export_onnx(model, str(tmp_path / "b0.onnx"), batch=0)
    # a failing export (the forward raises) leaves neither the target nor a temporary file,
    # and does not touch an existing file at the target
    target = tmp_path / "keep.pt2"
    target.write_bytes(b"old")

    class Broken(torch.nn.Module):
        kind = "student"
        num_keypoints = 17
        input_size = (H, W)

        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, img):
            raise RuntimeError("boom")

    with pytest.raises(Exception, match="boom"):
        export_program(Broken(), str(target))
    with pytest.raises(Exception, match="boom"):
        export_onnx(Broken(), str(tmp_path / "new.onnx"))
    assert target.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["keep.pt2"]


def test_engine_constructor_arguments_are_checked_up_front():
    from distilpose.models import build_model
    from distilpose.runtime import InferenceEngine

    m = build_model("distilpose_tiny")
    with pytest.raises(ValueError, match="attention_backend"):
        InferenceEngine(m, device="cpu", attention_backend="flash")
    with pytest.raises(ValueError, match="compile_mode"):
        InferenceEngine(m, device="cpu", compile_mode="max-autotune")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="device: 'cuda' requested but CUDA is not available"):
            InferenceEngine(m, device="cuda")
