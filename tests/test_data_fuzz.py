"""Data pipeline vs independent re-implementations of mmpose 0.x's TopDown pipeline (random inputs).

References written from mmpose 0.x: ``core/post_processing/post_transforms.py``
(get_affine_transform, affine_transform, fliplr_joints), ``datasets/pipelines/top_down_transform.py``
(TopDownRandomFlip, TopDownHalfBodyTransform, TopDownGetRandomScaleRotation, TopDownAffine,
TopDownGenerateTargetRegression), ``TopDownCocoDataset`` (bbox sanitising, _xywh2cs), and
LoadImageFromFile (RGB) + ToTensor + NormalizeTensor.
"""
import json
import os

import cv2
import numpy as np
import pytest

from distilpose.data import TopDownCocoDataset
from distilpose.data import transforms as T

FLIP_PAIRS = [[1, 2], [3, 4], [5, 6], [7, 8], [9, 10], [11, 12], [13, 14], [15, 16]]
UPPER = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10)
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


# ----------------------------------------------------------------------------- mmpose references
def _rotate_point(pt, angle_rad):
    sn, cs = np.sin(angle_rad), np.cos(angle_rad)
    return [pt[0] * cs - pt[1] * sn, pt[0] * sn + pt[1] * cs]


def _get_3rd_point(a, b):
    direction = a - b
    return b + np.array([-direction[1], direction[0]], dtype=np.float32)


def _mm_get_affine_transform(center, scale, rot, output_size):
    """scale in 200-px units, output_size (w, h); non-UDP."""
    scale_tmp = np.asarray(scale) * 200.0
    src_w = scale_tmp[0]
    dst_w, dst_h = output_size
    rot_rad = np.pi * rot / 180
    src_dir = _rotate_point([0.0, src_w * -0.5], rot_rad)
    dst_dir = np.array([0.0, dst_w * -0.5])
    src = np.zeros((3, 2), dtype=np.float32)
    src[0, :] = center
    src[1, :] = center + src_dir
    src[2, :] = _get_3rd_point(src[0, :], src[1, :])
    dst = np.zeros((3, 2), dtype=np.float32)
    dst[0, :] = [dst_w * 0.5, dst_h * 0.5]
    dst[1, :] = np.array([dst_w * 0.5, dst_h * 0.5]) + dst_dir
    dst[2, :] = _get_3rd_point(dst[0, :], dst[1, :])
    return cv2.getAffineTransform(np.float32(src), np.float32(dst))


def _mm_affine_transform(pt, trans):
    return (trans @ np.array([pt[0], pt[1], 1.0]))[:2]


def _mm_fliplr_joints(joints_3d, joints_3d_visible, img_width, flip_pairs):
    jf, vf = joints_3d.copy(), joints_3d_visible.copy()
    for left, right in flip_pairs:
        jf[left, :], jf[right, :] = joints_3d[right, :], joints_3d[left, :]
        vf[left, :], vf[right, :] = joints_3d_visible[right, :], joints_3d_visible[left, :]
    jf[:, 0] = img_width - 1 - jf[:, 0]
    return jf * vf, vf


def _mm_half_body(joints_3d, joints_3d_visible, coin_upper, aspect_ratio=0.75):
    """mmpose half_body_transform with its coin (``np.random.randn() < 0.5``) given."""
    upper, lower = [], []
    for j in range(17):
        if joints_3d_visible[j][0] > 0:
            (upper if j in UPPER else lower).append(joints_3d[j])
    if coin_upper and len(upper) > 2:
        sel = upper
    elif len(lower) > 2:
        sel = lower
    else:
        sel = upper
    if len(sel) < 2:
        return None, None
    sel = np.array(sel, dtype=np.float64)
    center = sel.mean(axis=0)[:2]
    lt, rb = np.amin(sel, axis=0), np.amax(sel, axis=0)
    w, h = rb[0] - lt[0], rb[1] - lt[1]
    if w > aspect_ratio * h:
        h = w * 1.0 / aspect_ratio
    elif w < aspect_ratio * h:
        w = h * aspect_ratio
    return center, np.array([w / 200.0, h / 200.0]) * 1.5


def _mm_regression_target(joints_3d, joints_3d_visible, image_size=(192, 256)):
    mask = ((joints_3d[:, 0] >= 0) * (joints_3d[:, 0] <= image_size[0] - 1) * (joints_3d[:, 1] >= 0)
            * (joints_3d[:, 1] <= image_size[1] - 1))
    return (joints_3d[:, :2] / image_size).astype(np.float32), joints_3d_visible[:, :2] * mask[:, None]


def _mm_clean_xywh2cs(box, width, height, ar=0.75):
    x, y, w, h = box
    x1, y1 = max(0, x), max(0, y)
    x2, y2 = min(width - 1, x1 + max(0, w - 1)), min(height - 1, y1 + max(0, h - 1))
    x, y, w, h = x1, y1, x2 - x1, y2 - y1
    center = np.array([x + w * 0.5, y + h * 0.5])
    if w > ar * h:
        h = w * 1.0 / ar
    elif w < ar * h:
        w = h * ar
    return center, np.array([w / 200.0, h / 200.0]) * 1.25


# ----------------------------------------------------------------------------- fixture
def _fixture(root, vis_counts=(17, 13, 10), seed=0):
    """Smooth random images (so that bilinear sampling differences stay tiny), one person each."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    images, anns = [], []
    for i, nvis in enumerate(vis_counts):
        w, h = int(rng.integers(200, 360)), int(rng.integers(180, 300))
        img = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3)).astype(np.uint8), (0, 0), 4)
        img = cv2.normalize(img, None, 0, 255, cv2.NORM_MINMAX)
        name = f"{i:03d}.png"
        cv2.imwrite(os.path.join(root, "img", name), img)  # BGR on disk
        images.append(dict(id=i + 1, file_name=name, width=w, height=h))
        kp = np.zeros((17, 3))
        kp[:, 0] = rng.uniform(0.15 * w, 0.85 * w, 17).round(1)
        kp[:, 1] = rng.uniform(0.1 * h, 0.9 * h, 17).round(1)
        vis_idx = rng.permutation(17)[:nvis]
        kp[vis_idx, 2] = rng.choice([1, 2], nvis)
        kp[kp[:, 2] == 0, :2] = 0
        x0, y0 = kp[vis_idx, :2].min(0) - 10
        x1, y1 = kp[vis_idx, :2].max(0) + 10
        box = [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]
        if i == 0:
            box = [-5.0, -7.0, w + 10.0, float(y1) + 7.0]  # sticks out of the image: sanitised
        anns.append(dict(id=i + 1, image_id=i + 1, category_id=1, iscrowd=0, num_keypoints=nvis,
                         keypoints=kp.reshape(-1).tolist(), bbox=box, area=float(box[2] * box[3])))
    ann = os.path.join(root, "ann.json")
    with open(ann, "w") as f:
        json.dump(dict(images=images, annotations=anns, categories=[dict(id=1, name="person")]), f)
    return ann, os.path.join(root, "img"), images, anns


def _mm_sample(img_path, kp_ann, center, scale_px, rot, flipped):
    """mmpose: LoadImageFromFile (rgb), [flip], TopDownAffine, ToTensor+Normalize, regression target.
    center is the final centre (in the flipped image when flipped), as the dataset reports it."""
    img = cv2.cvtColor(cv2.imread(img_path, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION), cv2.COLOR_BGR2RGB)
    joints = np.zeros((17, 3))
    joints[:, :2] = kp_ann[:, :2]
    vis = np.zeros((17, 3))
    vis[:, :2] = np.minimum(1, kp_ann[:, 2:3])
    if flipped:
        img = img[:, ::-1, :]
        joints, vis = _mm_fliplr_joints(joints, vis, img.shape[1], FLIP_PAIRS)
    trans = _mm_get_affine_transform(center, scale_px / 200.0, rot, (192, 256))
    crop = cv2.warpAffine(np.ascontiguousarray(img), trans, (192, 256), flags=cv2.INTER_LINEAR)
    for j in range(17):
        if vis[j, 0] > 0:
            joints[j, :2] = _mm_affine_transform(joints[j, :2], trans)
    target, weight = _mm_regression_target(joints, vis)
    norm = ((crop / 255.0 - MEAN) / STD).transpose(2, 0, 1)
    return norm, target, weight


def _grey_levels(diff_normalised):
    return np.abs(diff_normalised) * STD[:, None, None] * 255.0


# ----------------------------------------------------------------------------- tests
def test_affine_matrix_matches_mmpose_get_affine_transform():
    rng = np.random.default_rng(0)
    for _ in range(300):
        c = rng.uniform(-100, 700, 2)
        s = rng.uniform(5, 600) * np.array([0.75, 1.0]) * rng.uniform(0.65, 1.35)
        rot = float(rng.choice([0.0, rng.uniform(-90, 90)]))
        out = (256, 192) if rng.random() < 0.8 else (128, 96)
        m = T.get_affine_matrix(c, s, rot, out)
        ref = _mm_get_affine_transform(c.astype(np.float32), s / 200.0, rot, (out[1], out[0]))
        pts = np.concatenate([rng.uniform(-50, 750, (8, 2)), c[None]])
        got = T.affine_points(pts, m)
        want = pts @ ref[:, :2].T + ref[:, 2]
        tol = 1e-3 * max(1.0, out[1] / s[0] * 800)  # mmpose builds its points in float32
        assert np.abs(got - want).max() < tol, (c, s, rot)


def test_half_body_box_matches_mmpose():
    rng = np.random.default_rng(1)
    for _ in range(300):
        kp = np.zeros((17, 3))
        kp[:, :2] = rng.uniform(0, 400, (17, 2))
        kp[:, 2] = (rng.random(17) < rng.uniform(0.1, 1.0)) * rng.choice([1, 2], 17)
        vis = np.repeat(np.minimum(1, kp[:, 2:3]), 3, axis=1)
        refs = [_mm_half_body(kp, vis, coin) for coin in (True, False)]
        got = T.half_body_center_scale(kp, np.random.default_rng(int(rng.integers(1 << 30))))
        if refs[0][0] is None and refs[1][0] is None:
            assert got is None
            continue
        assert got is not None
        ok = [r[0] is not None and np.allclose(got[0], r[0]) and np.allclose(got[1], r[1] * 200.0) for r in refs]
        assert any(ok)


def test_half_body_upper_lower_choice_follows_mmpose_randn_coin():
    """mmpose (and HRNet before it) picks the upper body when ``np.random.randn() < 0.5`` (P = 0.691),
    not with probability 0.5."""
    kp = np.zeros((17, 3))
    kp[:, :2] = np.random.default_rng(2).uniform(0, 300, (17, 2))
    kp[:, 2] = 2
    upper_c = kp[:11, :2].mean(0)
    rng = np.random.default_rng(3)
    n = 4000
    n_upper = sum(np.allclose(T.half_body_center_scale(kp, rng)[0], upper_c) for _ in range(n))
    assert abs(n_upper / n - 0.6915) < 0.03, n_upper / n


def test_random_scale_rotation_distribution_matches_mmpose():
    """s = clip(N(1, sf), 1 - sf, 1 + sf) (clipped with P = 0.317); r = clip(N(0, rf), +-2 rf), applied
    with P = 0.6 (rotation else 0)."""
    rng = np.random.default_rng(4)
    n = 6000
    d = [T.random_scale_rotation(np.array([1.0, 1.0]), rng, 0.35, 45.0, 0.6) for _ in range(n)]
    s = np.array([x[0][0] for x in d])
    r = np.array([x[1] for x in d])
    assert abs(np.isclose(np.abs(s - 1), 0.35).mean() - 0.3173) < 0.03
    assert abs((r != 0).mean() - 0.6) < 0.03
    assert abs(np.isclose(np.abs(r), 90.0).mean() / 0.6 - 0.0455) < 0.015  # |N(0, 45)| > 90


def test_test_mode_sample_matches_mmpose_pipeline(tmp_path):
    """GT box sanitising + _xywh2cs, RGB loading, normalisation, affine crop and regression targets."""
    ann, img_dir, images, anns = _fixture(str(tmp_path))
    ds = TopDownCocoDataset(ann, img_dir, train=False)
    assert len(ds) == len(anns)
    for i, a in enumerate(anns):
        s = ds[i]
        info = images[i]
        c_ref, s_ref = _mm_clean_xywh2cs(a["bbox"], info["width"], info["height"])
        assert np.allclose(s["meta"]["center"].numpy(), c_ref) and np.allclose(s["meta"]["scale"].numpy(), s_ref * 200)
        assert float(s["meta"]["area"]) == pytest.approx(float(np.prod(s_ref * 200.0)), rel=1e-6)
        kp = np.array(a["keypoints"], float).reshape(17, 3)
        img_ref, tgt, w = _mm_sample(os.path.join(img_dir, info["file_name"]), kp, c_ref, s_ref * 200, 0.0, False)
        assert _grey_levels(s["img"].numpy() - img_ref).max() < 1.01  # float32 vs float64 matrix: <= 1 level
        wt = s["target_weight"].numpy()
        assert np.array_equal(np.repeat(wt, 2, 1), w)
        assert np.allclose(s["target_coords"].numpy()[wt[:, 0] > 0], tgt[w[:, 0] > 0], atol=1e-5)


def test_augmented_samples_match_mmpose_pipeline(tmp_path):
    """Each augmented sample (flip, half-body, scale, rotation) equals mmpose's pipeline run with the
    same final (center, scale, rotation, flip): mirrored image, W-1-x joints, swapped pairs."""
    ann, img_dir, images, anns = _fixture(str(tmp_path), seed=5)
    # the build-time center shift (mmpose's _xywh2cs) has its own test below
    ds = TopDownCocoDataset(ann, img_dir, train=True, aug="student", seed=11, center_shift_prob=0.0)
    n_flip = n_rot = 0
    n = 90
    for k in range(n):
        i = k % len(anns)
        s = ds[i]
        meta = s["meta"]
        flipped, rot = bool(meta["flipped"]), float(meta["rotation"])
        n_flip += flipped
        n_rot += rot != 0
        kp = np.array(anns[i]["keypoints"], float).reshape(17, 3)
        # the final (center, scale): the box's or a half-body box's, mirrored (x -> W-1-x) when flipped,
        # scale times a factor in [0.65, 1.35]
        width = images[i]["width"]
        vis3 = np.repeat(np.minimum(1, kp[:, 2:3]), 3, axis=1)
        cands = [_mm_clean_xywh2cs(anns[i]["bbox"], width, images[i]["height"])]
        cands += [_mm_half_body(kp, vis3, coin) for coin in (True, False)]
        found = False
        for c, sc in cands:
            c = np.array([width - 1 - c[0], c[1]]) if flipped else c
            f = meta["scale"].numpy() / (sc * 200.0)
            if np.allclose(meta["center"].numpy(), c, atol=1e-4) and np.isclose(f[0], f[1]) and 0.65 - 1e-6 < f[0] < 1.35 + 1e-6:
                found = True
        assert found, (k, flipped)
        img_ref, tgt, w = _mm_sample(os.path.join(img_dir, images[i]["file_name"]), kp, meta["center"].numpy(),
                                     meta["scale"].numpy(), rot, flipped)
        diff = _grey_levels(s["img"].numpy() - img_ref)
        assert (diff > 2.01).mean() < 2e-3 and np.median(diff) < 0.01, (k, flipped, rot)
        wt = s["target_weight"].numpy()
        assert np.array_equal(np.repeat(wt, 2, 1), w), (k, flipped)
        assert np.allclose(s["target_coords"].numpy()[wt[:, 0] > 0], tgt[w[:, 0] > 0], atol=1e-4), (k, flipped)
    assert 0.3 < n_flip / n < 0.7 and 0.4 < n_rot / n < 0.8


def test_half_body_needs_more_than_8_visible_joints(tmp_path, monkeypatch):
    """mmpose: ``np.sum(joints_3d_visible[:, 0]) > num_joints_half_body`` (8), then p = 0.3."""
    ann, img_dir, _, _ = _fixture(str(tmp_path), vis_counts=(8, 9))
    calls = []
    real = T.half_body_center_scale
    monkeypatch.setattr(T, "half_body_center_scale", lambda kp, rng, *a, **k: calls.append(int((kp[:, 2] > 0).sum())) or real(kp, rng, *a, **k))
    ds = TopDownCocoDataset(ann, img_dir, train=True, aug="student", seed=0)
    n = 100
    for _ in range(n):
        ds.prepare(0)
        ds.prepare(1)
    assert 8 not in calls
    assert abs(calls.count(9) / n - 0.3) < 0.15


def test_training_boxes_center_shift_as_mmpose_xywh2cs(tmp_path):
    """mmpose 0.x's _xywh2cs (training only): with p = 0.3 a GT box's center moves by
    0.4 * (U(0, 1) - 0.5) * (w, h) of the cleaned box, drawn once at build time; the scale is
    that of the unshifted box. Evaluation datasets, aug=None and center_shift_prob=0 keep the box center."""
    ann, img_dir, images, anns = _fixture(str(tmp_path), seed=5)
    plain = TopDownCocoDataset(ann, img_dir, train=False)
    again = None
    shifted = 0
    total = 0
    for seed in range(40):
        ds = TopDownCocoDataset(ann, img_dir, train=True, aug="student", seed=seed)
        if seed == 0:
            again = TopDownCocoDataset(ann, img_dir, train=True, aug="student", seed=0)
            for a, b in zip(ds.samples, again.samples):
                assert np.array_equal(a["center"], b["center"])  # deterministic per seed
        for s, p in zip(ds.samples, plain.samples):
            assert np.array_equal(s["scale"], p["scale"])
            d = (s["center"] - p["center"]) / np.asarray(p["bbox"][2:])
            assert (np.abs(d) <= 0.2 + 1e-12).all(), d
            shifted += bool(np.any(d != 0))
            total += 1
    assert 0.2 < shifted / total < 0.4, shifted / total
    for off in (TopDownCocoDataset(ann, img_dir, train=True, aug="student", seed=0, center_shift_prob=0.0),
                TopDownCocoDataset(ann, img_dir, train=True, aug=None, seed=0)):
        assert all(np.array_equal(s["center"], p["center"]) for s, p in zip(off.samples, plain.samples))
    with pytest.raises(ValueError, match="center_shift_prob"):
        TopDownCocoDataset(ann, img_dir, train=True, center_shift_prob=1.5)
