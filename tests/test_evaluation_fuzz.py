"""Evaluation protocol vs independent re-implementations of mmpose 0.x (random inputs).

References written from mmpose 0.x: ``core/post_processing/nms.py`` (oks_iou, oks_nms),
``TopDownCocoDataset.evaluate`` (rescoring then OKS-NMS per image, boxes in bbox_id order),
``_xywh2cs`` / ``transform_preds`` (box -> center/scale in 200-px units and back).
"""
import json

import numpy as np
import pytest

from distilpose.data import transforms as T
from distilpose.evaluation import coco_keypoint_eval, oks_nms, postprocess, rescore
from distilpose.evaluation.predict import crops_to_image

SIGMAS = np.array([.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62, 1.07, 1.07, .87, .87, .89, .89]) / 10.0


# ----------------------------------------------------------------------------- mmpose references
def _mm_oks_iou(g, d, a_g, a_d, sigmas):
    vars_ = (sigmas * 2) ** 2
    xg, yg = g[0::3], g[1::3]
    ious = np.zeros(len(d), dtype=np.float32)
    for n_d in range(len(d)):
        dx = d[n_d, 0::3] - xg
        dy = d[n_d, 1::3] - yg
        e = (dx**2 + dy**2) / vars_ / ((a_g + a_d[n_d]) / 2 + np.spacing(1)) / 2
        ious[n_d] = np.sum(np.exp(-e)) / len(e) if len(e) != 0 else 0.0
    return ious


def _mm_oks_nms(kpts_db, thr, sigmas):
    if len(kpts_db) == 0:
        return []
    scores = np.array([k["score"] for k in kpts_db])
    kpts = np.array([k["keypoints"].flatten() for k in kpts_db])
    areas = np.array([k["area"] for k in kpts_db])
    order = scores.argsort()[::-1]
    keep = []
    while len(order) > 0:
        i = order[0]
        keep.append(int(i))
        ovr = _mm_oks_iou(kpts[i], kpts[order[1:]], areas[i], areas[order[1:]], sigmas)
        inds = np.where(ovr <= thr)[0]
        order = order[inds + 1]
    return keep


def _mm_rescore(kpts, box_score, vis_thr):
    kpt_score, valid_num = 0, 0
    for j in range(len(kpts)):
        t_s = kpts[j][2]
        if t_s > vis_thr:
            kpt_score += t_s
            valid_num += 1
    if valid_num != 0:
        kpt_score = kpt_score / valid_num
    return kpt_score * box_score


def _random_image_instances(rng, n):
    """n instances of one image with the awkward cases: tied scores, duplicates, zero areas."""
    base = rng.uniform(0, 300, (17, 2))
    kp = np.empty((n, 17, 3))
    for i in range(n):
        jitter = rng.choice([0.0, 0.3, 2.0, 8.0, 40.0])
        kp[i, :, :2] = base + rng.normal(0, 1, (17, 2)) * jitter
        kp[i, :, 2] = rng.choice([0.0, 0.1, 0.2, 0.5, 0.9], 17) if rng.random() < 0.5 else rng.uniform(0, 1, 17)
    for i in range(1, n):
        if rng.random() < 0.25:  # exact duplicate of an earlier instance
            kp[i] = kp[rng.integers(0, i)]
    areas = rng.choice([0.0, 50.0, 4000.0, 20000.0], n) if rng.random() < 0.3 else rng.uniform(100, 30000, n)
    if rng.random() < 0.5:
        scores = rng.choice([0.3, 0.5, 0.9], n)  # many ties
    else:
        scores = rng.uniform(0, 1, n)
    return kp, areas, scores


def test_oks_nms_matches_mmpose_reference():
    rng = np.random.default_rng(0)
    n_diff_from_all = 0
    for trial in range(400):
        n = int(rng.integers(1, 12))
        kp, areas, scores = _random_image_instances(rng, n)
        inst = [dict(keypoints=kp[i], score=float(scores[i]), area=float(areas[i])) for i in range(n)]
        for thr in (0.9, 0.5):
            ref = _mm_oks_nms(inst, thr, SIGMAS)
            assert [int(i) for i in oks_nms(inst, thr, SIGMAS)] == ref, (trial, thr)
            n_diff_from_all += len(ref) < n
    assert n_diff_from_all > 100  # the suppression path is exercised
    assert oks_nms([], 0.9) == []


def test_rescore_matches_mmpose_reference():
    rng = np.random.default_rng(1)
    for _ in range(300):
        kp = np.zeros((17, 3))
        kp[:, 2] = rng.choice([0.0, 0.1, 0.2, 0.2000001, 0.7, 1.3, -0.5], 17) if rng.random() < 0.5 else rng.normal(0.3, 0.4, 17)
        box = float(rng.uniform(0, 1))
        assert rescore(kp, box, 0.2) == pytest.approx(_mm_rescore(kp, box, 0.2), rel=1e-12, abs=1e-15)


def test_postprocess_matches_mmpose_evaluate():
    """Rescoring, then OKS-NMS at 0.9 per image with the rescored scores, boxes kept in loader order."""
    rng = np.random.default_rng(2)
    raw = []
    for img_id in (7, 3, 11):
        kp, areas, _ = _random_image_instances(rng, int(rng.integers(1, 9)))
        box_scores = rng.choice([0.2, 0.6, 1.0], len(kp))
        raw += [dict(image_id=img_id, keypoints=kp[i], box_score=float(box_scores[i]), area=float(areas[i]))
                for i in range(len(kp))]
    out = postprocess(raw, oks_thr=0.9, vis_thr=0.2)
    expected = []
    for img_id in sorted({r["image_id"] for r in raw}):
        inst = [dict(keypoints=r["keypoints"], area=r["area"], score=_mm_rescore(r["keypoints"], r["box_score"], 0.2))
                for r in raw if r["image_id"] == img_id]
        expected += [(img_id, inst[k]) for k in _mm_oks_nms(inst, 0.9, SIGMAS)]
    assert len(out) == len(expected) and len(out) < len(raw)
    for o, (img_id, e) in zip(out, expected):
        assert set(o) == {"image_id", "category_id", "keypoints", "score"}
        assert o["image_id"] == img_id and o["category_id"] == 1 and isinstance(o["score"], float)
        assert o["score"] == pytest.approx(e["score"], rel=1e-12, abs=1e-15)
        assert np.allclose(np.array(o["keypoints"]).reshape(17, 3), e["keypoints"], atol=5e-4)
    json.dumps(out)  # plain JSON types only


def test_box_to_crop_and_back_matches_mmpose_xywh2cs_and_transform_preds():
    """Dataset box -> (center, scale) in px equals mmpose's _xywh2cs * 200 (aspect 192/256, padding
    1.25), and the decode-time inverse (crops_to_image) equals mmpose transform_preds."""
    rng = np.random.default_rng(3)
    ar = 192 / 256
    for _ in range(200):
        x, y = rng.uniform(-50, 500, 2)
        w, h = rng.uniform(1, 400, 2) if rng.random() < 0.8 else (rng.choice([10.0, 30.0]), 40.0)
        c, s = T.box_to_center_scale([x, y, w, h], ar, 1.25)
        # mmpose _xywh2cs (test mode)
        c_ref = np.array([x + w * 0.5, y + h * 0.5])
        ww, hh = w, h
        if ww > ar * hh:
            hh = ww * 1.0 / ar
        elif ww < ar * hh:
            ww = hh * ar
        s_ref = np.array([ww / 200.0, hh / 200.0]) * 1.25
        assert np.allclose(c, c_ref) and np.allclose(s, s_ref * 200.0)
        # mmpose keypoints_from_regression: preds * img_size, then transform_preds(output_size=img_size)
        coords = rng.uniform(-0.2, 1.2, (1, 17, 2))
        px = coords[0] * np.array([192.0, 256.0])
        sc = s_ref * 200.0
        ref = np.stack([px[:, 0] * sc[0] / 192 + c_ref[0] - sc[0] * 0.5,
                        px[:, 1] * sc[1] / 256 + c_ref[1] - sc[1] * 0.5], 1)
        got = crops_to_image(coords, c[None], s[None])[0]
        assert np.allclose(got, ref, atol=1e-6)
        # and it inverts the crop's affine map (rotation 0)
        m = T.get_affine_matrix(c, s, 0.0, (256, 192))
        assert np.allclose(T.affine_points(got, m), px, atol=1e-6)


def _gt_file(tmp_path, n_images=2):
    rng = np.random.default_rng(4)
    images, anns, kps = [], [], []
    for i in range(n_images):
        kp = np.concatenate([rng.uniform(100, 300, (17, 2)).round(1), np.full((17, 1), 2.0)], 1)
        kps.append(kp)
        images.append(dict(id=10 + i, file_name=f"{i}.jpg", width=640, height=480))
        anns.append(dict(id=i + 1, image_id=10 + i, category_id=1, iscrowd=0, num_keypoints=17,
                         keypoints=kp.reshape(-1).tolist(), bbox=[100, 100, 200, 200], area=30000.0))
    path = str(tmp_path / "gt.json")
    with open(path, "w") as f:
        json.dump(dict(images=images, annotations=anns, categories=[dict(id=1, name="person")]), f)
    return path, kps


def test_cocoeval_counts_every_gt_image_and_uses_oks(tmp_path):
    """The evaluator runs over all GT images (an image without prediction lowers recall) and with
    iouType 'keypoints' (a keypoint result with a perfect box but wrong joints scores 0)."""
    path, kps = _gt_file(tmp_path)
    res = [dict(image_id=10, category_id=1, keypoints=kps[0].reshape(-1).tolist(), score=0.9)]
    stats = coco_keypoint_eval(path, res)
    assert stats["AR"] == pytest.approx(0.5) and stats["AP"] == pytest.approx(0.5, abs=0.02)
    wrong = kps[1].copy()
    wrong[:, :2] = wrong[::-1, :2]  # joints permuted: same extent/box, large keypoint error
    res.append(dict(image_id=11, category_id=1, keypoints=wrong.reshape(-1).tolist(), score=0.95))
    stats = coco_keypoint_eval(path, res)
    assert stats["AR"] == pytest.approx(0.5)
