"""Inference on real photographs and arrays of any kind; the `distilpose infer` command."""
import json
import os

import cv2
import numpy as np
import pytest
import torch

from distilpose.inference import PoseInferencer


def _photo_path():
    cbook = pytest.importorskip("matplotlib.cbook")
    return str(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


class _Const(torch.nn.Module):
    """A student that always answers the same normalised crop coordinates."""

    kind = "student"
    input_size = (256, 192)
    name = "const"

    def __init__(self, xy):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))
        self.xy = torch.tensor(xy, dtype=torch.float32)

    def forward(self, img):
        n = img.shape[0]
        return dict(coords=self.xy.expand(n, 17, 2).clone(), score=torch.full((n, 17, 1), 0.7))


@pytest.fixture(scope="module")
def tiny():
    from distilpose.models import build_model

    torch.manual_seed(0)
    return PoseInferencer(build_model("distilpose_tiny"), device="cpu", flip_test=False)


def test_real_photo_rgb_gray_odd_sizes(tiny):
    path = _photo_path()
    people = tiny.predict(path)
    assert len(people) == 1 and people[0].shape == (17, 3) and np.isfinite(people[0]).all()
    rgb = cv2.imread(path)[..., ::-1]
    h, w = rgb.shape[:2]
    from_array = tiny.predict(np.ascontiguousarray(rgb))
    assert np.allclose(from_array[0], people[0], atol=1e-4)
    bgr = tiny.predict(cv2.imread(path), channel_order="bgr")
    assert np.allclose(bgr[0], people[0], atol=1e-4)
    gray = cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2GRAY)
    for arr in (gray, gray[..., None], np.dstack([rgb, np.full((h, w), 255, np.uint8)]),
                gray.astype(np.uint16) * 257, rgb.astype(np.float32) / 255.0):
        out = tiny.predict(arr)
        assert len(out) == 1 and np.isfinite(out[0]).all()
    for shape in ((37, 301), (301, 37), (1, 1), (999, 17)):
        img = cv2.resize(rgb, (shape[1], shape[0]))
        out = tiny.predict(img, boxes=[[0, 0, shape[1], shape[0]], [0.2, 0.1, 5.5, 3.3]])
        assert len(out) == 2 and all(o.shape == (17, 3) and np.isfinite(o).all() for o in out)
    assert tiny.predict(path, boxes=[]) == []
    flip = PoseInferencer(tiny.model, flip_test=True).predict(path)
    assert flip[0].shape == (17, 3) and not np.allclose(flip[0], people[0])


def test_boxes_map_to_image_pixels():
    """Crop centre -> box centre, crop corner -> padded box corner, in both box formats."""
    img = np.zeros((300, 500, 3), np.uint8)
    centre = PoseInferencer(_Const([0.5, 0.5]), device="cpu", flip_test=False)
    out = centre.predict(img, boxes=[[100, 50, 60, 160], [10, 20, 200, 40]])
    assert np.allclose(out[0][:, :2], [130, 130]) and np.allclose(out[1][:, :2], [110, 40])
    assert np.allclose(out[0][:, 2], 0.7)
    corner = PoseInferencer(_Const([0.0, 0.0]), device="cpu", flip_test=False)
    (kp,) = corner.predict(img, boxes=[[100, 50, 60, 160]])
    assert np.allclose(kp[:, :2], [130 - 0.5 * 160 * 0.75 * 1.25, 130 - 0.5 * 160 * 1.25])
    (kp2,) = corner.predict(img, boxes=[[100, 50, 160, 210]], box_format="xyxy")
    assert np.allclose(kp, kp2)
    (whole,) = centre.predict(img)  # no box: the whole image
    assert np.allclose(whole[:, :2], [250, 150])


def test_bad_inputs(tiny):
    with pytest.raises(ValueError, match="boxes"):
        tiny.predict(np.zeros((50, 50, 3), np.uint8), boxes=[[0, 0, 0, 10]])
    with pytest.raises(ValueError, match="boxes"):
        tiny.predict(np.zeros((50, 50, 3), np.uint8), boxes=[[0, 0, 10]])
    with pytest.raises(ValueError, match="image"):
        tiny.predict(np.zeros((50, 50, 2), np.uint8))
    with pytest.raises(ValueError, match="NaN"):
        tiny.predict(np.full((50, 50), np.nan, np.float32))
    from distilpose.data import BadSampleError

    with pytest.raises(BadSampleError, match="not found"):
        tiny.predict("/nonexistent/photo.jpg")


def test_infer_cli_writes_json_and_overlays(tmp_path, capsys):
    from distilpose.checkpoint import save_checkpoint
    from distilpose.cli import main
    from distilpose.models import build_model

    ckpt = str(tmp_path / "tiny.pth")
    save_checkpoint(ckpt, build_model("distilpose_tiny"))
    folder = tmp_path / "photos"
    folder.mkdir()
    photo = cv2.imread(_photo_path())
    cv2.imwrite(str(folder / "hopper.jpg"), photo)
    cv2.imwrite(str(folder / "gray_odd.png"), cv2.resize(cv2.cvtColor(photo, cv2.COLOR_BGR2GRAY), (123, 77)))
    (folder / "notes.txt").write_text("not an image")
    boxes = str(tmp_path / "boxes.json")
    with open(boxes, "w") as f:
        json.dump({"hopper.jpg": [[100, 50, 300, 500], [10, 10, 80, 120]]}, f)
    out = tmp_path / "out"
    rc = main(["infer", str(folder), "--checkpoint", ckpt, "--out", str(out), "--boxes", boxes, "--no-flip"])
    assert rc == 0
    rec = json.loads((out / "hopper.json").read_text())
    assert rec["width"] == 512 and rec["height"] == 600 and len(rec["people"]) == 2
    assert np.asarray(rec["people"][0]["keypoints"]).shape == (17, 3) and rec["model"] == "distilpose_tiny"
    gray = json.loads((out / "gray_odd.json").read_text())
    assert len(gray["people"]) == 1 and gray["people"][0]["bbox"] == [0.0, 0.0, 123.0, 77.0]
    overlay = cv2.imread(str(out / "hopper_pose.png"))
    assert overlay.shape == photo.shape and np.abs(overlay.astype(int) - photo.astype(int)).max() > 50
    assert cv2.imread(str(out / "gray_odd_pose.png")).shape == (77, 123, 3)
    assert len(json.loads((out / "predictions.json").read_text())) == 2
    assert "hopper" in capsys.readouterr().out
    # a broken file is reported and skipped, with a non-zero exit status
    (folder / "broken.jpg").write_bytes(b"garbage")
    assert main(["infer", str(folder / "broken.jpg"), str(folder / "hopper.jpg"), "--checkpoint", ckpt,
                 "--out", str(out), "--no-flip"]) == 1
    assert "cannot be decoded" in capsys.readouterr().err


def test_preset_from_checkpoint_and_mismatch(tmp_path):
    from distilpose.checkpoint import save_checkpoint
    from distilpose.models import build_model

    ckpt = str(tmp_path / "t.pth")
    save_checkpoint(ckpt, build_model("tokenpose_tiny"))
    inf = PoseInferencer(checkpoint=ckpt, device="cpu")
    assert inf.model.kind == "teacher" and inf.model.name == "tokenpose_tiny"
    out = inf.predict(np.zeros((64, 48, 3), np.uint8))
    assert out[0].shape == (17, 3)
    with pytest.raises(Exception, match="does not fit|size mismatch|missing"):
        PoseInferencer(preset="distilpose_tiny", checkpoint=ckpt, device="cpu")
    assert os.path.isfile(ckpt)


def test_checkpoint_input_size_is_respected(tmp_path):
    """A checkpoint trained at the CPU demo's 128 x 96 crops is rebuilt at that size."""
    from distilpose.checkpoint import save_checkpoint
    from distilpose.models import build_model

    ckpt = str(tmp_path / "small.pth")
    save_checkpoint(ckpt, build_model("distilpose_tiny", input_size=(128, 96)), meta={"input_size": [128, 96]})
    inf = PoseInferencer(checkpoint=ckpt, device="cpu", flip_test=False)
    assert inf.model.input_size == (128, 96) and inf.input_size == (128, 96)
    (kp,) = inf.predict(np.zeros((80, 60, 3), np.uint8))
    assert kp.shape == (17, 3) and np.isfinite(kp).all()
