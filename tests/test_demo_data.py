"""The embedded procedural dataset: annotations agree with the pictures, COCO tools accept it."""
import json
import os

import cv2
import numpy as np
import pytest

from distilpose.data import demo
from distilpose.data.demo import generate_demo_dataset, render_demo_image, sample_pose
from distilpose.evaluation import coco_keypoint_eval

EYE_BGR = np.array([30, 20, 20])


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("demo"))
    return generate_demo_dataset(root, num_train=20, num_val=8, seed=3, num_workers=2)


def test_render_is_deterministic_and_varied():
    a = render_demo_image(0, "train", 5)
    b = render_demo_image(0, "train", 5)
    c = render_demo_image(0, "train", 6)
    d = render_demo_image(0, "val", 5)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert [p["keypoints"].tolist() for p in a[2]] == [p["keypoints"].tolist() for p in b[2]]
    assert a[0].shape != c[0].shape or not np.array_equal(a[0], c[0])
    assert a[0].shape != d[0].shape or not np.array_equal(a[0], d[0])


def test_annotations_match_rendered_pixels():
    """v=2 keypoints lie on their own figure, v=1 on something drawn over it, v=0 unlabelled;
    bbox/area/segmentation are the figure's visible pixels; visible eyes are drawn at the eye points."""
    from pycocotools import mask as mask_utils

    counts = {0: 0, 1: 0, 2: 0}
    eyes_checked = 0
    people_n = []
    for i in range(24):
        img, mask, people = render_demo_image(1, "train", i)
        h, w = mask.shape
        assert 256 <= h <= 384 and 256 <= w <= 384
        people_n.append(len(people))
        for pid, p in enumerate(people, start=1):
            kp = p["keypoints"]
            own = mask == pid
            for j, (x, y, v) in enumerate(kp):
                counts[int(v)] += 1
                if v == 0:
                    assert x == 0 and y == 0
                    continue
                xi, yi = int(round(x)), int(round(y))
                assert 0 <= xi < w and 0 <= yi < h
                if v == 2:
                    assert mask[yi, xi] == pid, (i, pid, j)
                    if j in (1, 2):
                        assert np.abs(img[yi, xi].astype(int) - EYE_BGR).max() <= 25, (i, j, img[yi, xi])
                        eyes_checked += 1
                else:
                    assert mask[yi, xi] != pid
            ys, xs = np.nonzero(own)
            assert p["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert p["area"] == own.sum() > 0
            assert np.array_equal(mask_utils.decode(p["segmentation"]).astype(bool), own)
            if not p["front"]:
                assert (kp[:3] == 0).all()  # a figure seen from the back has no labelled face
    assert counts[2] > 200 and counts[1] > 0 and counts[0] > 0
    assert eyes_checked > 10
    assert set(people_n) == {1, 2, 3}


def test_pose_sampler_proportions_and_limits():
    rng = np.random.default_rng(0)
    for _ in range(200):
        h = rng.uniform(100, 300)
        pose = sample_pose(rng, h, (200.0, 200.0))
        kp = pose["kp"]
        d = lambda a, b: np.linalg.norm(kp[a] - kp[b]) / h  # noqa: E731
        for a, b, nominal in ((5, 7, 0.18), (6, 8, 0.18), (7, 9, 0.16), (8, 10, 0.16),
                              (11, 13, 0.245), (12, 14, 0.245), (13, 15, 0.245), (14, 16, 0.245)):
            assert 0.64 * nominal <= d(a, b) <= 1.001 * nominal
        assert 0.13 <= d(5, 6) <= 0.27 and 0.08 <= d(11, 12) <= 0.18
        # shoulders above hips in the figure's own frame: the torso is about 0.3 h long
        mid_s, mid_h = (kp[5] + kp[6]) / 2, (kp[11] + kp[12]) / 2
        assert 0.28 <= np.linalg.norm(mid_s - mid_h) / h <= 0.31


def test_written_dataset_is_valid_coco_and_matches_renders(small_demo):
    from pycocotools.coco import COCO

    coco = COCO(small_demo["train_ann"])
    assert len(coco.getImgIds()) == 20 and coco.loadCats(1)[0]["name"] == "person"
    assert len(coco.loadCats(1)[0]["keypoints"]) == 17
    for img_info in coco.loadImgs(coco.getImgIds()[:5]):
        path = os.path.join(small_demo["train_images"], img_info["file_name"])
        jpg = cv2.imread(path)
        index = int(os.path.splitext(img_info["file_name"])[0])
        img, _, people = render_demo_image(3, "train", index)
        assert jpg.shape == img.shape == (img_info["height"], img_info["width"], 3)
        assert np.abs(jpg.astype(int) - img.astype(int)).mean() < 6.0  # JPEG + noise; another picture is ~50
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img_info["id"]))
        assert len(anns) == len(people)
        for a, p in zip(anns, people):
            assert np.allclose(np.reshape(a["keypoints"], (17, 3)), p["keypoints"])
            assert a["num_keypoints"] == int((p["keypoints"][:, 2] > 0).sum())
            assert a["iscrowd"] == 0 and a["category_id"] == 1


def test_ground_truth_as_predictions_scores_ap_one(small_demo):
    with open(small_demo["val_ann"]) as f:
        gt = json.load(f)
    results = [dict(image_id=a["image_id"], category_id=1, keypoints=a["keypoints"], score=1.0)
               for a in gt["annotations"] if a["num_keypoints"] > 0]
    stats = coco_keypoint_eval(small_demo["val_ann"], results)
    assert stats["AP"] == pytest.approx(1.0) and stats["AR"] == pytest.approx(1.0)
    # dropping half the people halves recall
    half = results[::2]
    assert coco_keypoint_eval(small_demo["val_ann"], half)["AR"] < 0.75


def test_generation_independent_of_workers_and_reused(tmp_path, small_demo):
    paths = generate_demo_dataset(str(tmp_path / "one"), num_train=20, num_val=8, seed=3, num_workers=1)
    for k in ("train_ann", "val_ann"):
        with open(paths[k]) as f1, open(small_demo[k]) as f2:
            assert json.load(f1)["annotations"] == json.load(f2)["annotations"]
    mtime = os.path.getmtime(paths["train_ann"])
    again = generate_demo_dataset(str(tmp_path / "one"), num_train=20, num_val=8, seed=3)
    assert os.path.getmtime(again["train_ann"]) == mtime  # same parameters: reused, not rewritten


def test_make_data_cli(tmp_path, capsys):
    from distilpose.cli import main

    assert main(["make-data", "--root", str(tmp_path), "--num-train", "3", "--num-val", "2", "--workers", "1"]) == 0
    with open(tmp_path / "annotations" / "person_keypoints_val.json") as f:
        assert len(json.load(f)["images"]) == 2
    assert "train: 3 images" in capsys.readouterr().out


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_train"):
        generate_demo_dataset("/nonexistent/x", num_train=-1)
    with pytest.raises(ValueError, match="image_size"):
        generate_demo_dataset("/nonexistent/x", image_size=(300, 200))


def test_default_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("DISTILPOSE_DEMO_DATA", str(tmp_path))
    assert demo.default_demo_root() == str(tmp_path)
