"""COCO top-down data pipeline: geometry, targets, augmentation, bad data, loaders."""
import json
import os

import cv2
import numpy as np
import pytest
import torch

from distilpose.data import BadSampleError, TopDownCocoDataset, build_dataloader, student_targets
from distilpose.data import transforms as T
from distilpose.data.targets import teacher_targets

MEAN = np.array(T.IMAGENET_MEAN)
STD = np.array(T.IMAGENET_STD)
# one distinct colour (RGB) per keypoint
COLORS = np.array([[(37 * j) % 256, (91 * j + 60) % 256, (53 * j + 150) % 256] for j in range(17)], np.uint8)


def _person(cx, cy, s):
    """17 keypoints of a standing figure centred at (cx, cy), size s, spread so dots do not touch."""
    xy = np.array([
        [0, -1.0], [0.15, -1.1], [-0.15, -1.1], [0.3, -1.0], [-0.3, -1.0], [0.45, -0.7], [-0.45, -0.7],
        [0.7, -0.35], [-0.7, -0.35], [0.85, 0.0], [-0.85, 0.0], [0.3, 0.1], [-0.3, 0.1], [0.35, 0.55],
        [-0.35, 0.55], [0.4, 1.0], [-0.4, 1.0]])  # fmt: skip
    return xy * s + np.array([cx, cy])


def _write_fixture(root, anns_extra=None, n_images=2, corrupt=False, missing=False, unlabelled=()):
    """COCO-format fixture; ``unlabelled``: keypoint indices written with v=0 (still drawn)."""
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    images, anns = [], []
    for i in range(n_images):
        w, h = 320 + 17 * i, 240 + 9 * i
        img = np.full((h, w, 3), 90, np.uint8)
        kp = _person(w / 2 + 10 * i, h / 2, 70)
        for j, (x, y) in enumerate(kp):
            cv2.circle(img, (int(round(x)), int(round(y))), 5, tuple(int(c) for c in COLORS[j][::-1]), -1)
        name = f"{i:03d}.png"
        cv2.imwrite(os.path.join(root, "img", name), img)
        images.append(dict(id=i + 1, file_name=name, width=w, height=h))
        vis = np.full(17, 2)
        vis[3] = 1
        vis[list(unlabelled)] = 0
        kps = np.concatenate([np.round(kp), vis[:, None]], 1).reshape(-1).tolist()
        x0, y0 = kp.min(0) - 8
        x1, y1 = kp.max(0) + 8
        anns.append(dict(id=i + 1, image_id=i + 1, category_id=1, iscrowd=0, num_keypoints=17, keypoints=kps,
                         bbox=[float(x0), float(y0), float(x1 - x0), float(y1 - y0)], area=float((x1 - x0) * (y1 - y0))))
    if corrupt:
        with open(os.path.join(root, "img", "000.png"), "wb") as f:
            f.write(b"not a png at all")
    if missing:
        os.remove(os.path.join(root, "img", "001.png"))
    for a in anns_extra or []:
        anns.append(dict(dict(id=100 + len(anns), image_id=1, category_id=1, iscrowd=0), **a))
    ann_file = os.path.join(root, "ann.json")
    with open(ann_file, "w") as f:
        json.dump(dict(images=images, annotations=anns, categories=[dict(id=1, name="person")]), f)
    return ann_file, os.path.join(root, "img")


def _unnormalise(img_t):
    return np.clip((img_t.numpy().transpose(1, 2, 0) * STD + MEAN) * 255, 0, 255)


def _colour_at(img_t, coords):
    rgb = _unnormalise(img_t)
    x, y = coords[0] * 192, coords[1] * 256
    return rgb[int(round(y)), int(round(x))]


def test_box_to_center_scale_and_affine_geometry():
    c, s = T.box_to_center_scale([10, 20, 30, 80], 0.75, 1.25)
    assert np.allclose(c, [25, 60]) and np.allclose(s, [60 * 1.25, 80 * 1.25])
    c, s = T.box_to_center_scale([0, 0, 120, 40], 0.75, 1.0)
    assert np.allclose(s, [120, 160])
    m = T.get_affine_matrix(np.array([100.0, 50.0]), np.array([96.0, 128.0]), 0.0, (256, 192))
    pts = T.affine_points(np.array([[100, 50], [52, -14], [148, 114]]), m)
    assert np.allclose(pts, [[96, 128], [0, 0], [192, 256]])
    # rotation keeps the centre and lengths; inverse of crop_to_image at rotation 0
    m = T.get_affine_matrix(np.array([100.0, 50.0]), np.array([96.0, 128.0]), 30.0, (256, 192))
    p = T.affine_points(np.array([[100.0, 50.0], [100.0, 10.0]]), m)
    assert np.allclose(p[0], [96, 128]) and np.isclose(np.linalg.norm(p[1] - p[0]), 80.0)
    assert np.allclose(T.crop_to_image(np.array([[0.0, 0.0]]), np.array([100, 50]), np.array([96, 128]), (256, 192)),
                       [[52, -14]])


def test_flip_folded_into_affine_equals_mirrored_image():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (61, 83, 3), dtype=np.uint8)
    c, s = np.array([30.3, 28.1]), np.array([45.0, 60.0])
    m = T.get_affine_matrix(c, s, 17.0, (64, 48), flip_width=83)
    a = T.warp_crop(img, m, (64, 48))
    b = T.warp_crop(np.ascontiguousarray(img[:, ::-1]), T.get_affine_matrix(c, s, 17.0, (64, 48)), (64, 48))
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_student_targets_boundaries():
    kp = np.array([[0, 0], [191, 255], [191.01, 10], [-0.01, 10], [10, 255.5], [96, 128], [50, 50]], float)
    vis = np.array([2, 2, 2, 2, 2, 0, 1])
    coords, w = student_targets(kp, vis)
    assert coords.dtype == np.float32 and w.shape == (7, 1)
    assert np.allclose(coords[1], [191 / 192, 255 / 256])
    assert w[:, 0].tolist() == [1, 1, 0, 0, 0, 0, 1]


def test_teacher_targets_per_sample_match_the_batched_op():
    """The dataset's per-sample helper: labelled means v > 0 (mmpose: min(1, v)), rows of the op."""
    import distilpose_kernels

    rng = np.random.default_rng(1)
    kp = rng.uniform(-20, 210, (3, 17, 2)).astype(np.float32)
    v = rng.integers(0, 3, (3, 17))
    for enc in ("msra", "unbiased", "udp"):
        hm, w = distilpose_kernels.gaussian_heatmap_targets(
            torch.from_numpy(kp), torch.from_numpy((v > 0).astype(np.float32)), (256, 192), (64, 48), 2.0, enc)
        assert float(hm.sum()) > 0
        for i in range(3):
            hi, wi = teacher_targets(kp[i], v[i], (256, 192), (64, 48), 2.0, enc)
            assert hi.shape == (17, 64, 48) and wi.shape == (17, 1) and hi.dtype == np.float32
            np.testing.assert_array_equal(hi, hm[i].numpy(), err_msg=enc)
            np.testing.assert_array_equal(wi, w[i].numpy(), err_msg=enc)


def test_dataset_test_mode_targets_hit_the_drawn_keypoints(tmp_path):
    ann, img = _write_fixture(str(tmp_path))
    ds = TopDownCocoDataset(ann, img, train=False, with_heatmaps=True)
    assert len(ds) == 2
    s = ds[1]
    assert s["img"].shape == (3, 256, 192) and s["img"].dtype == torch.float32
    assert s["target_weight"].shape == (17, 1) and s["heatmaps"].shape == (17, 64, 48)
    for j in range(17):
        assert np.abs(_colour_at(s["img"], s["target_coords"][j].numpy()) - COLORS[j]).max() < 12, j
    assert s["target_weight"][:, 0].tolist() == [1.0] * 17  # v=1 counts as labelled
    # teacher heatmap peaks at target / 4
    hm = s["heatmaps"].reshape(17, -1)
    peak = torch.stack([hm.argmax(1) % 48, hm.argmax(1) // 48], 1).float()
    assert (peak - s["target_coords"] * torch.tensor([48.0, 64.0])).abs().max() <= 1.0
    meta = s["meta"]
    assert meta["center"].dtype == torch.float64 and meta["image_id"] == 2 and not meta["flipped"]
    assert meta["scale"][0] / meta["scale"][1] == pytest.approx(0.75)


@pytest.mark.parametrize("aug", ["student", "teacher"])
def test_augmented_samples_keep_labels_on_the_pixels(tmp_path, aug):
    """Under flip, rotation, scale and half-body, each target still points at its keypoint's colour
    (after a flip, the left keypoint's target shows the right keypoint's original colour)."""
    ann, img = _write_fixture(str(tmp_path))
    ds = TopDownCocoDataset(ann, img, train=True, aug=aug, with_heatmaps=True, seed=3)
    perm = T.flip_permutation()
    seen_flip = seen_rot = checked = 0
    for i in range(24):
        s = ds[i % 2]
        flipped = bool(s["meta"]["flipped"])
        seen_flip += flipped
        seen_rot += float(s["meta"]["rotation"]) != 0
        for j in range(17):
            if s["target_weight"][j, 0] == 0:
                continue
            c = s["target_coords"][j].numpy()
            if not (0.03 < c[0] < 0.97 and 0.03 < c[1] < 0.97):
                continue
            src = perm[j] if flipped else j
            assert np.abs(_colour_at(s["img"], c) - COLORS[src]).max() < 25, (i, j, flipped)
            checked += 1
        # teacher weight: visible and the Gaussian touches the grid, so never set where the student's is 0
        # unless the keypoint is just outside the crop (the 3-sigma window still reaches the grid)
        px = s["target_coords"].double() * torch.tensor([192.0, 256.0], dtype=torch.float64)
        lim = torch.tensor([191.0, 255.0], dtype=torch.float64)
        inside = ((px >= 0) & (px <= lim)).all(-1, keepdim=True)
        clear = ((px.abs() > 1e-3) & ((px - lim).abs() > 1e-3)).all(-1, keepdim=True)  # float32 rounding at the edge
        assert torch.equal((s["heatmap_weight"] * inside)[clear], s["target_weight"][clear])
    assert seen_flip > 0 and seen_rot > 0 and checked > 100


def test_other_input_size(tmp_path):
    """The CPU demo trains at 128 x 96 (heatmaps 32 x 24): targets follow the crop size."""
    ann, img = _write_fixture(str(tmp_path))
    ds = TopDownCocoDataset(ann, img, input_size=(128, 96), with_heatmaps=True)
    s = ds[0]
    assert s["img"].shape == (3, 128, 96) and s["heatmaps"].shape == (17, 32, 24)
    rgb = _unnormalise(s["img"])
    for j in range(17):
        x, y = s["target_coords"][j].numpy() * np.array([96, 128])
        assert np.abs(rgb[int(round(y)), int(round(x))] - COLORS[j]).max() < 30, j


def test_random_scale_rotation_ranges():
    rng = np.random.default_rng(0)
    for name, sf, rf in (("student", 0.35, 45.0), ("teacher", 0.5, 40.0)):
        cfg = T.AUG_PRESETS[name]
        assert (cfg["scale_factor"], cfg["rot_factor"]) == (sf, rf)
        draws = [T.random_scale_rotation(np.array([1.0, 1.0]), rng, sf, rf, cfg["rot_prob"]) for _ in range(2000)]
        s = np.array([d[0][0] for d in draws])
        r = np.array([d[1] for d in draws])
        assert s.min() >= 1 - sf - 1e-9 and s.max() <= 1 + sf + 1e-9 and s.std() > sf / 2
        assert np.abs(r).max() <= 2 * rf and 0.3 < (r == 0).mean() < 0.5


def test_half_body_box():
    kp = np.zeros((17, 3))
    kp[:, :2] = _person(100, 100, 50)
    kp[:, 2] = 2
    rng = np.random.default_rng(0)
    c, s = T.half_body_center_scale(kp, rng)
    assert s[0] / s[1] == pytest.approx(0.75)
    upper = kp[:11, :2].mean(0)
    lower = kp[11:, :2].mean(0)
    assert np.allclose(c, upper) or np.allclose(c, lower)


def test_detections_file(tmp_path):
    ann, img = _write_fixture(str(tmp_path))
    dets = [dict(image_id=1, category_id=1, bbox=[50, 40, 100, 150], score=0.9),
            dict(image_id=2, category_id=1, bbox=[60, 40, 100, 150], score=0.1),
            dict(image_id=2, category_id=2, bbox=[60, 40, 100, 150], score=0.9)]
    det_file = str(tmp_path / "dets.json")
    with open(det_file, "w") as f:
        json.dump(dets, f)
    ds = TopDownCocoDataset(ann, img, det_file=det_file, det_score_thr=0.2)
    assert len(ds) == 1
    s = ds[0]
    assert float(s["meta"]["bbox_score"]) == pytest.approx(0.9)
    assert torch.allclose(s["meta"]["center"], torch.tensor([100.0, 115.0], dtype=torch.float64))
    assert len(TopDownCocoDataset(ann, img, det_file=det_file, det_score_thr=0.0)) == 2


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(keypoints=[1, 2, 2] * 16, bbox=[10, 10, 50, 50], num_keypoints=16), "keypoints must be a list"),
        (dict(keypoints=[1, 2, 3] * 17, bbox=[10, 10, 50, 50], num_keypoints=17), "visibility flags"),
        (dict(keypoints=[20, 20, 2] * 17, bbox=[10, 10, 0, 50], num_keypoints=17), "zero area"),
        (dict(keypoints=[20, 20, 2] * 17, bbox=[10, 10, float("nan"), 50], num_keypoints=17), "bbox must be"),
    ],
)
def test_malformed_annotations_raise_or_skip(tmp_path, bad, match):
    ann, img = _write_fixture(str(tmp_path), anns_extra=[bad])
    with pytest.raises(BadSampleError, match=match):
        TopDownCocoDataset(ann, img, bad_sample="raise")
    ds = TopDownCocoDataset(ann, img, bad_sample="skip")
    assert len(ds) == 2 and len(ds.skipped) == 1 and match in ds.skipped[0]


def test_missing_and_corrupt_images(tmp_path):
    ann, img = _write_fixture(str(tmp_path / "a"), missing=True)
    with pytest.raises(BadSampleError, match="image file not found"):
        TopDownCocoDataset(ann, img)
    ds = TopDownCocoDataset(ann, img, bad_sample="skip")
    assert len(ds) == 1 and "001.png" in ds.skipped[0]

    ann, img = _write_fixture(str(tmp_path / "b"), corrupt=True)
    ds = TopDownCocoDataset(ann, img)  # exists: found only when read
    with pytest.raises(BadSampleError, match="cannot be decoded.*000.png"):
        ds[0]
    # in a worker process the same clear error reaches the caller
    loader = build_dataloader(ds, batch_size=2, shuffle=False, num_workers=1)
    with pytest.raises(BadSampleError, match="cannot be decoded"):
        next(iter(loader))
    ds = TopDownCocoDataset(ann, img, bad_sample="skip")
    s = ds[0]  # the next readable sample, logged
    assert int(s["meta"]["image_id"]) == 2 and "000.png" in ds.skipped[-1]


def test_bad_arguments(tmp_path):
    ann, img = _write_fixture(str(tmp_path))
    with pytest.raises(ValueError, match="bad_sample"):
        TopDownCocoDataset(ann, img, bad_sample="ignore")
    with pytest.raises(ValueError, match="aug"):
        TopDownCocoDataset(ann, img, train=True, aug="strong")
    with pytest.raises(FileNotFoundError, match="ann_file"):
        TopDownCocoDataset(str(tmp_path / "nope.json"), img)
    with pytest.raises(FileNotFoundError, match="img_prefix"):
        TopDownCocoDataset(ann, str(tmp_path / "nope"))
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(BadSampleError, match="not a valid COCO"):
        TopDownCocoDataset(str(tmp_path / "broken.json"), img)


def _batches(loader):
    return [(b["img"].clone(), b["target_coords"].clone(), b["meta"]["index"].clone()) for b in loader]


def test_loader_is_deterministic(tmp_path):
    ann, img = _write_fixture(str(tmp_path), n_images=4)
    ds = TopDownCocoDataset(ann, img, train=True, aug="student")
    a = _batches(build_dataloader(ds, 2, shuffle=True, num_workers=0, seed=5))
    b = _batches(build_dataloader(ds, 2, shuffle=True, num_workers=0, seed=5))
    c = _batches(build_dataloader(ds, 2, shuffle=True, num_workers=0, seed=6))
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[2], y[2]) for x, y in zip(a, b))
    assert not all(torch.equal(x[0], y[0]) for x, y in zip(a, c))
    d = _batches(build_dataloader(ds, 2, shuffle=True, num_workers=2, seed=5))
    e = _batches(build_dataloader(ds, 2, shuffle=True, num_workers=2, seed=5))
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(d, e))
    loader = build_dataloader(ds, 3, shuffle=True, num_workers=0, seed=0)
    assert loader.drop_last and len(loader) == 1
    assert not build_dataloader(ds, 3, shuffle=False).drop_last
    with pytest.raises(RuntimeError, match="torch.distributed"):
        build_dataloader(ds, 2, shuffle=True, distributed=True)


def test_teacher_targets_helper_shapes():
    hm, w = teacher_targets(np.array([[10.0, 20.0]] * 17), np.array([2] * 16 + [0]))
    assert hm.shape == (17, 64, 48) and w.shape == (17, 1) and w[-1, 0] == 0 and hm[-1].max() == 0
    assert hm[0].max() == pytest.approx(np.exp(-((2.5 - 2) ** 2) / 8), rel=1e-5)


# ----------------------------------------------------------------------------- teacher targets per batch


def test_heatmap_keypoints_rebuild_the_worker_targets_exactly(tmp_path):
    """``heatmap_keypoints``: the samples carry the targets' inputs; one batched call on them gives
    the per-sample worker targets bit for bit, through flips (the visibility follows the swapped
    joints: the left shoulder and elbow are unlabelled), rotations and half-body crops."""
    import distilpose_kernels as dk

    ann, img = _write_fixture(str(tmp_path), unlabelled=(5, 7))
    ds = TopDownCocoDataset(ann, img, train=True, aug="teacher", with_heatmaps=True, heatmap_keypoints=True,
                            heatmap_encoding="udp", seed=5)
    samples = [ds[i % 2] for i in range(12)]
    flipped = torch.tensor([bool(s["meta"]["flipped"]) for s in samples])
    assert flipped.any() and not flipped.all()
    batch = torch.utils.data.default_collate(samples)
    assert batch["heatmap_keypoints"].shape == (12, 17, 2) and batch["heatmap_keypoints"].dtype == torch.float32
    vis = batch["heatmap_visibility"]
    assert vis.shape == (12, 17) and vis.dtype == torch.float32
    # unflipped samples: joints 5 and 7 unlabelled; flipped ones: their mirrored partners 6 and 8
    unl = torch.tensor([5, 7]), torch.tensor([6, 8])
    assert (vis[~flipped][:, unl[0]] == 0).all() and (vis[~flipped][:, unl[1]] == 1).all()
    assert (vis[flipped][:, unl[1]] == 0).all() and (vis[flipped][:, unl[0]] == 1).all()
    hm, w = dk.gaussian_heatmap_targets(batch["heatmap_keypoints"], vis, (256, 192), (64, 48), 2.0, "udp")
    assert float(hm.sum()) > 0
    assert torch.equal(hm, batch["heatmaps"]) and torch.equal(w, batch["heatmap_weight"])
    plain = TopDownCocoDataset(ann, img, train=False, with_heatmaps=True)[0]
    assert "heatmap_keypoints" not in plain and "heatmap_visibility" not in plain


def test_teacher_training_builds_heatmap_targets_on_the_device(tmp_path):
    """data.heatmap_targets="device" (the default): the workers send keypoints and the objective
    builds the batch's heatmaps in one call, with the run's input size, sigma and encoding (not
    the defaults here): the same maps and loss as the "worker" mode's per-sample targets."""
    from distilpose.training import Trainer, apply_overrides, get_preset
    from distilpose.training.trainer import TeacherObjective

    ann, img = _write_fixture(str(tmp_path), unlabelled=(2,))
    sets = {
        "data.kind": "coco", "data.root": str(tmp_path), "data.train_ann": ann, "data.train_img": img,
        "data.val_ann": ann, "data.val_img": img, "data.batch_size": 2, "data.num_workers": 0, "data.aug": "none",
        "data.heatmap_encoding": "msra", "data.heatmap_sigma": 1.5, "model.input_size": [128, 96],
        "optim.epochs": 1, "work_dir": str(tmp_path / "run"), "progress": False, "final_eval": False,
        "device": "cpu",
    }
    tr = Trainer(apply_overrides(get_preset("tiny_teacher"), sets))
    assert tr.train_dataset.heatmap_keypoints and not tr.train_dataset.with_heatmaps
    assert isinstance(tr.objective, TeacherObjective) and tr.objective.targets is not None
    t = tr.objective.targets
    assert (t.input_size, t.heatmap_size, t.sigma, t.encoding) == ((128, 96), (32, 24), 1.5, "msra")
    worker = Trainer(apply_overrides(get_preset("tiny_teacher"), {
        **sets, "data.heatmap_targets": "worker", "work_dir": str(tmp_path / "run2")}))
    assert worker.train_dataset.with_heatmaps and not worker.train_dataset.heatmap_keypoints
    assert worker.objective.targets is None
    batch = torch.utils.data.default_collate([tr.train_dataset[i] for i in range(2)])
    wbatch = torch.utils.data.default_collate([worker.train_dataset[i] for i in range(2)])
    assert "heatmaps" not in batch and torch.equal(batch["img"], wbatch["img"])
    hm, w = t(batch["heatmap_keypoints"], batch["heatmap_visibility"])
    assert float(hm.sum()) > 0 and (w == 0).any()
    assert torch.equal(hm, wbatch["heatmaps"]) and torch.equal(w, wbatch["heatmap_weight"])
    worker.model.load_state_dict(tr.model.state_dict())
    with torch.no_grad():
        loss = tr.objective(batch)["loss"]
        assert float(loss) > 0 and torch.equal(loss, worker.objective(wbatch)["loss"])
        with pytest.raises(KeyError, match="heatmap_keypoints"):
            TeacherObjective(tr.model)(batch)
    assert np.isfinite(tr.train_step(batch)["loss"])
    for bad, match in ((("data.heatmap_targets", "gpu"), "data.heatmap_targets"),
                       (("data.heatmap_encoding", "dark"), "data.heatmap_encoding"),
                       (("data.heatmap_sigma", 0.0), "data.heatmap_sigma")):
        with pytest.raises(ValueError, match=match):
            Trainer(apply_overrides(get_preset("tiny_teacher"), {**sets, bad[0]: bad[1]}))


def test_teacher_training_takes_a_keypoint_datasets_own_target_settings(tmp_path):
    """A train dataset given to the Trainer that sends keypoints: its heatmaps follow its own
    sizes, sigma and encoding; heatmaps of another size than the model's are refused."""
    from distilpose.training import Trainer, apply_overrides, get_preset

    ann, img = _write_fixture(str(tmp_path))
    cfg = apply_overrides(get_preset("tiny_teacher"), {
        "data.kind": "synthetic", "data.batch_size": 2, "data.num_workers": 0, "optim.epochs": 1,
        "work_dir": str(tmp_path / "run"), "progress": False, "final_eval": False, "device": "cpu"})
    ds = TopDownCocoDataset(ann, img, train=False, heatmap_keypoints=True, heatmap_encoding="udp", heatmap_sigma=0.75,
                            input_size=(64, 48))
    tr = Trainer(cfg, train_dataset=ds)
    t = tr.objective.targets
    assert (t.input_size, t.heatmap_size, t.sigma, t.encoding) == ((64, 48), (16, 12), 0.75, "udp")
    wrong = TopDownCocoDataset(ann, img, train=False, heatmap_keypoints=True, input_size=(128, 96))
    with pytest.raises(ValueError, match="heatmap_size \\(32, 24\\) does not match"):
        Trainer(apply_overrides(cfg, {"work_dir": str(tmp_path / "run2")}), train_dataset=wrong)
    neither = TopDownCocoDataset(ann, img, train=False, input_size=(64, 48))
    with pytest.raises(ValueError, match="a teacher run needs heatmap targets"):
        Trainer(apply_overrides(cfg, {"work_dir": str(tmp_path / "run3")}), train_dataset=neither)
