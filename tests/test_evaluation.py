"""The evaluator itself, on hand-made COCO fixtures with known AP, and the predict/evaluate pipeline."""
import json
import os

import cv2
import numpy as np
import pytest
import torch

from distilpose.data import TopDownCocoDataset
from distilpose.data.transforms import COCO_FLIP_PAIRS, COCO_SIGMAS, flip_permutation
from distilpose.evaluation import (
    coco_keypoint_eval,
    decode_heatmaps,
    draw_pose,
    evaluate,
    flip_heatmaps,
    oks_nms,
    postprocess,
    predict,
    rescore,
)

AREAS = [9000.0, 4000.0, 1500.0]


def _gt_keypoints(i):
    rng = np.random.default_rng(i)
    return np.stack([rng.uniform(40, 200, 17), rng.uniform(30, 220, 17)], 1).round(1)


@pytest.fixture()
def fixture_json(tmp_path):
    """Three images, one fully labelled person each, with different areas."""
    images, anns = [], []
    for i, area in enumerate(AREAS):
        kp = _gt_keypoints(i)
        images.append(dict(id=i + 1, file_name=f"{i}.png", width=256, height=256))
        x0, y0 = kp.min(0)
        x1, y1 = kp.max(0)
        anns.append(dict(id=i + 1, image_id=i + 1, category_id=1, iscrowd=0, area=area, num_keypoints=17,
                         bbox=[x0, y0, x1 - x0, y1 - y0],
                         keypoints=np.concatenate([kp, np.full((17, 1), 2)], 1).reshape(-1).tolist()))
    path = str(tmp_path / "gt.json")
    with open(path, "w") as f:
        json.dump(dict(images=images, annotations=anns, categories=[dict(id=1, name="person")]), f)
    return path


def _results(shift, scores=(0.9, 0.8, 0.7)):
    out = []
    for i in range(3):
        kp = _gt_keypoints(i) + np.array([shift, 0.0])
        out.append(dict(image_id=i + 1, category_id=1, score=scores[i],
                        keypoints=np.concatenate([kp, np.ones((17, 1))], 1).reshape(-1).tolist()))
    return out


def _expected_ap(oks, scores):
    """COCO AP from the OKS formula: one detection per GT and image, so at threshold t the
    detections with OKS >= t are the true positives; 101-point interpolated precision."""
    order = np.argsort(-np.asarray(scores))
    aps = []
    for t in np.linspace(0.5, 0.95, 10):
        tp = (np.asarray(oks)[order] >= t).astype(float)
        rec = np.cumsum(tp) / len(oks)
        prec = np.cumsum(tp) / np.arange(1, len(oks) + 1)
        prec = np.maximum.accumulate(prec[::-1])[::-1]
        q = [prec[np.searchsorted(rec, r, side="left")] if np.searchsorted(rec, r, side="left") < len(rec) else 0.0
             for r in np.linspace(0, 1, 101)]
        aps.append(np.mean(q))
    return float(np.mean(aps))


def test_perfect_predictions_give_ap_one(fixture_json):
    stats = coco_keypoint_eval(fixture_json, _results(0.0))
    assert stats["AP"] == pytest.approx(1.0) and stats["AR"] == pytest.approx(1.0)
    assert stats["AP50"] == pytest.approx(1.0)


@pytest.mark.parametrize("shift, scores", [(3.0, (0.9, 0.8, 0.7)), (3.0, (0.7, 0.8, 0.9)), (5.0, (0.5, 0.9, 0.7))])
def test_known_shift_gives_the_oks_formula_ap(fixture_json, shift, scores):
    # OKS of a prediction moved by `shift` px on every keypoint: mean_k exp(-d^2 / (2 s^2 k_i^2)),
    # s^2 = area, k_i = 2 sigma_i (COCO's definition)
    oks = [float(np.mean(np.exp(-(shift**2) / (2 * area * (2 * COCO_SIGMAS) ** 2)))) for area in AREAS]
    thresholds = np.linspace(0.5, 0.95, 10)
    assert min(abs(o - t) for o in oks for t in thresholds) > 1e-3  # no OKS sits on a threshold
    assert len({int((np.array(o) >= thresholds).sum()) for o in oks}) > 1  # the instances differ
    expected = _expected_ap(oks, scores)
    assert 0.05 < expected < 0.95
    stats = coco_keypoint_eval(fixture_json, _results(shift, scores))
    assert stats["AP"] == pytest.approx(expected, abs=1e-9)


def test_empty_results_and_json_path(fixture_json, tmp_path):
    assert coco_keypoint_eval(fixture_json, [])["AP"] == 0.0
    path = str(tmp_path / "res.json")
    with open(path, "w") as f:
        json.dump(_results(0.0), f)
    assert coco_keypoint_eval(fixture_json, path)["AP"] == pytest.approx(1.0)


def test_oks_nms_and_rescoring():
    kp = np.concatenate([_gt_keypoints(0), np.full((17, 1), 0.9)], 1)
    near = kp.copy()
    near[:, 0] += 0.5
    far = kp.copy()
    far[:, 0] += 60
    inst = [dict(keypoints=kp, score=0.8, area=5000.0), dict(keypoints=near, score=0.9, area=5000.0),
            dict(keypoints=far, score=0.5, area=5000.0)]
    assert oks_nms(inst, 0.9) == [1, 2]  # the near-duplicate of the best one goes
    assert sorted(oks_nms(inst, 1.0)) == [0, 1, 2]
    s = np.array([0.1, 0.5, 0.7] + [0.0] * 14)
    kps = np.concatenate([np.zeros((17, 2)), s[:, None]], 1)
    assert rescore(kps, 0.8, 0.2) == pytest.approx(0.8 * 0.6)
    assert rescore(np.zeros((17, 3)), 0.8) == 0.0
    raw = [dict(image_id=1, keypoints=kp, box_score=1.0, area=5000.0),
           dict(image_id=1, keypoints=near, box_score=0.5, area=5000.0)]
    out = postprocess(raw)
    assert len(out) == 1 and out[0]["score"] == pytest.approx(0.9) and len(out[0]["keypoints"]) == 51


def test_evaluation_decode_and_flip_helpers():
    """decode_heatmaps: DARK recovers a Gaussian's sub-pixel centre, maxvals (N, K); flip_heatmaps:
    mirror x, swap the left/right channels, then mmpose's one-pixel shift to the right."""
    g = torch.Generator().manual_seed(0)
    n, k, h, w = 2, 17, 64, 48
    mu = torch.rand(n, k, 2, generator=g) * torch.tensor([w - 1.0, h - 1.0])
    ys, xs = torch.arange(h).view(1, 1, h, 1), torch.arange(w).view(1, 1, 1, w)
    hm = torch.exp(-((xs - mu[..., 0, None, None]) ** 2 + (ys - mu[..., 1, None, None]) ** 2) / 8.0)
    hm = hm + 0.01 * torch.rand(hm.shape, generator=g)
    c, m = decode_heatmaps(hm, "dark", 11)
    assert c.shape == (n, k, 2) and m.shape == (n, k)
    assert torch.equal(m, hm.flatten(2).max(-1).values)
    inner = ((mu > 3) & (mu < torch.tensor([w - 4.0, h - 4.0]))).all(-1)
    assert inner.sum() > 10 and (c - mu).abs()[inner].max() < 0.15
    perm = list(range(k))
    for a, b in COCO_FLIP_PAIRS:
        perm[a], perm[b] = b, a
    mirrored = hm.flip(-1)[:, perm]
    expected = torch.cat([mirrored[..., :1], mirrored[..., :-1]], dim=-1)
    assert torch.equal(flip_heatmaps(hm, COCO_FLIP_PAIRS, True), expected)
    assert torch.equal(flip_heatmaps(hm, COCO_FLIP_PAIRS, False), mirrored)


# ----------------------------------------------------------------------------- predict / evaluate pipeline


def _write_images(tmp_path, n=3):
    """Images with people in boxes away from the borders; return (ann_file, img_dir)."""
    os.makedirs(tmp_path / "img", exist_ok=True)
    images, anns = [], []
    rng = np.random.default_rng(5)
    for i in range(n):
        w, h = 300 + 13 * i, 260 + 7 * i
        cv2.imwrite(str(tmp_path / "img" / f"{i}.jpg"), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        for p in range(2):
            kp = np.stack([rng.uniform(30, 130) + 140 * p + rng.uniform(0, 60, 17), rng.uniform(40, 220, 17)], 1)
            vis = rng.integers(1, 3, 17)
            vis[int(rng.integers(17))] = 0
            kp[vis == 0] = 0
            lab = kp[vis > 0]
            x0, y0 = lab.min(0) - 5
            x1, y1 = lab.max(0) + 5
            anns.append(dict(id=len(anns) + 1, image_id=i + 1, category_id=1, iscrowd=0,
                             area=float((x1 - x0) * (y1 - y0) * 0.6), num_keypoints=int((vis > 0).sum()),
                             bbox=[float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                             keypoints=np.concatenate([kp, vis[:, None]], 1).reshape(-1).tolist()))
        images.append(dict(id=i + 1, file_name=f"{i}.jpg", width=w, height=h))
    ann = str(tmp_path / "ann.json")
    with open(ann, "w") as f:
        json.dump(dict(images=images, annotations=anns, categories=[dict(id=1, name="person")]), f)
    return ann, str(tmp_path / "img")


class _Oracle(torch.nn.Module):
    """Returns the ground truth of the samples fed in loader order; knows mirrored crops.

    Student: normalised coords. Teacher: Gaussian heatmaps at the targets (sigma 2).
    """

    def __init__(self, dataset, kind):
        super().__init__()
        self.kind = kind
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.samples = [dataset[i] for i in range(len(dataset))]
        self.pos = 0
        self.last = None
        self.perm = flip_permutation()

    def forward(self, img):
        n = img.shape[0]
        if self.last is not None and self.last.shape == img.shape and torch.equal(img, self.last.flip(3)):
            coords = self.cur[:, self.perm].clone()
            coords[..., 0] = (191.0 - coords[..., 0] * 192.0) / 192.0  # where the mirrored crop shows it
        else:
            coords = torch.stack([s["target_coords"] for s in self.samples[self.pos : self.pos + n]])
            self.pos += n
            self.cur = coords
        self.last = img
        if self.kind == "student":
            return dict(coords=coords, score=torch.ones(n, 17, 1))
        mu = coords * torch.tensor([48.0, 64.0])
        ys, xs = torch.arange(64.0).view(1, 1, 64, 1), torch.arange(48.0).view(1, 1, 1, 48)
        hm = torch.exp(-((xs - mu[..., 0, None, None]) ** 2 + (ys - mu[..., 1, None, None]) ** 2) / 8.0)
        return dict(heatmaps=hm)


@pytest.mark.parametrize("kind", ["student", "teacher"])
@pytest.mark.parametrize("flip", [False, True])
def test_predict_maps_back_to_image_pixels(tmp_path, kind, flip):
    ann, img = _write_images(tmp_path)
    ds = TopDownCocoDataset(ann, img)
    model = _Oracle(ds, kind)
    raw = predict(model, torch.utils.data.DataLoader(ds, batch_size=4), flip_test=flip, postprocess_results=False)
    assert len(raw) == len(ds)
    for r, s in zip(raw, ds.samples):
        vis = s["keypoints"][:, 2] > 0
        err = np.abs(r["keypoints"][vis, :2] - s["keypoints"][vis, :2]).max()
        # student: exact up to the spec's x' = 1 - x flip convention (half a crop pixel);
        # teacher: DARK decoding of Gaussians, plus the flip's one-pixel shift
        tol = {("student", False): 1e-3, ("student", True): 0.51, ("teacher", False): 0.3, ("teacher", True): 2.5}
        px = s["scale"][0] / 192.0
        assert err <= tol[(kind, flip)] * px + 1e-6, (err, px)
    stats = evaluate(_Oracle(ds, kind), ds, flip_test=flip, batch_size=4)
    assert stats["AP"] > (0.99 if kind == "student" else 0.9)


def test_predict_refuses_augmented_loader(tmp_path):
    ann, img = _write_images(tmp_path, n=1)
    ds = TopDownCocoDataset(ann, img, train=True, aug="student")
    model = _Oracle(TopDownCocoDataset(ann, img), "student")
    ds.reseed(0)
    loader = torch.utils.data.DataLoader([ds[0] for _ in range(8)], batch_size=8)
    with pytest.raises(ValueError, match="augments"):
        predict(model, loader)


def test_eval_cli(tmp_path, capsys):
    from distilpose.checkpoint import save_checkpoint
    from distilpose.cli import main
    from distilpose.models import build_model

    ann, img = _write_images(tmp_path, n=1)
    ckpt = str(tmp_path / "m.pth")
    save_checkpoint(ckpt, build_model("distilpose_tiny"))
    out = str(tmp_path / "res.json")
    metrics = str(tmp_path / "metrics.json")
    rc = main(["eval", "--checkpoint", ckpt, "--ann-file", ann, "--img-prefix", img, "--num-workers", "0",
               "--out", out, "--metrics-json", metrics, "--no-flip"])
    assert rc == 0
    with open(out) as f:
        res = json.load(f)
    assert len(res) >= 1 and len(res[0]["keypoints"]) == 51
    with open(metrics) as f:
        m = json.load(f)
    assert m["preset"] == "distilpose_tiny" and 0.0 <= m["AP"] <= 1.0
    assert "AP" in capsys.readouterr().out


def test_draw_pose():
    img = np.full((400, 400, 3), 50, np.uint8)
    ang = np.linspace(0, 2 * np.pi, 17, endpoint=False)
    kp = np.stack([200 + 150 * np.cos(ang), 200 + 150 * np.sin(ang), np.full(17, 0.95)], 1).round()
    kp[3, 2] = 0.05
    out = draw_pose(img, kp, kpt_thr=0.3)
    assert out.shape == img.shape and out.dtype == np.uint8 and (img == 50).all()  # input untouched
    b, g, r = out[int(kp[0, 1]), int(kp[0, 0])]
    assert g > 200 and r < 100  # confident keypoint: green
    assert (out[int(kp[3, 1]), int(kp[3, 0])] == 50).all()  # low confidence: hollow ring, no limb to it
    ring = out[int(kp[3, 1]) - 4 : int(kp[3, 1]) + 5, int(kp[3, 0]) - 4 : int(kp[3, 0]) + 5]
    assert (ring[..., 2] > 200).any()  # drawn in red
    with pytest.raises(ValueError, match="keypoints"):
        draw_pose(img, kp[:, :2])
    with pytest.raises(ValueError, match="image_bgr"):
        draw_pose(img[..., 0], kp)
