"""The embedded demo dataset: procedural COCO-format person images (JPEG + COCO keypoint JSON).

Each image has one to three articulated figures with COCO-17 skeleton proportions (head with
face and ears, torso, limbs of varying thickness and colour, joint discs), in poses sampled
within human joint limits, at varying scales and rotations, on a textured/cluttered
background, sometimes partly hidden by occluders. Figures mostly face the camera (the
person's left on the image's right, face drawn) and sometimes turn their back (no face; nose
and eyes unlabelled), so left/right is decidable from the picture and consistent with
horizontal-flip augmentation.

Labels follow COCO: v=2 labelled and visible, v=1 labelled but hidden (by an occluder or
another person drawn in front), v=0 not labelled (outside the image, or a face point of a
figure seen from the back) with (x, y) = (0, 0). A keypoint is "visible" when the pixel under
it belongs to the figure itself (its rendered owner mask). bbox, area and the RLE
segmentation are those of the figure's visible pixels, as in COCO.

Everything is a pure function of (seed, split, index): the same files on any machine and with
any number of worker processes.
"""
from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import shutil
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from ..fileio import atomic_write
from .transforms import COCO_KEYPOINTS, COCO_SKELETON

DEMO_VERSION = 1
_SHIFT = 4  # cv2 fixed-point bits: sub-pixel drawing
_ONE = 1 << _SHIFT
_SPLIT_IDS = {"train": 0, "val": 1}
EYE_BGR = (30, 20, 20)

# skin tones (BGR)
_SKIN = np.array([[189, 224, 255], [150, 195, 241], [110, 160, 224], [80, 130, 198], [60, 100, 160], [45, 70, 110]], float)


def default_demo_root() -> str:
    """Where the embedded dataset lives: $DISTILPOSE_DEMO_DATA, else ~/.cache/distilpose/demo-v{N}."""
    env = os.environ.get("DISTILPOSE_DEMO_DATA")
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "distilpose", f"demo-v{DEMO_VERSION}")


def demo_paths(root: str) -> Dict[str, str]:
    return {
        "root": root,
        "train_images": os.path.join(root, "images", "train"),
        "val_images": os.path.join(root, "images", "val"),
        "train_ann": os.path.join(root, "annotations", "person_keypoints_train.json"),
        "val_ann": os.path.join(root, "annotations", "person_keypoints_val.json"),
        "manifest": os.path.join(root, "demo_manifest.json"),
    }


# ----------------------------------------------------------------------------- geometry


def _dir(theta_deg: float) -> np.ndarray:
    """Unit vector at angle theta (degrees): 0 points down (+y), 90 points right (+x)."""
    t = math.radians(theta_deg)
    return np.array([math.sin(t), math.cos(t)])


def sample_pose(rng: np.random.Generator, height: float, pelvis: Sequence[float]) -> Dict[str, Any]:
    """Keypoints (17, 2) of one figure plus what is needed to draw it.

    ``height``: figure height in pixels (ankle to top of head, upright); ``pelvis``: its centre.
    Joint angles (2-D projection) stay within human limits: shoulder abduction -25..170 deg,
    elbow flexion 0..150, hip -20..80, knee 0..130, torso lean +-20, head tilt +-25; one figure in
    ten is also rotated as a whole by up to +-50 deg (bending, falling).
    """
    h = float(height)
    front = bool(rng.random() < 0.8)
    s_left = 1.0 if front else -1.0  # image side (+p) of the person's left
    lean = rng.uniform(-20, 20)
    yaw = rng.uniform(0.65, 1.0)  # body turned away from the camera narrows shoulders/hips
    P = np.asarray(pelvis, dtype=float)
    up = _dir(180 + lean)
    p = _dir(lean + 90)
    neck = P + 0.30 * h * up
    kp = np.zeros((17, 2))
    sw, hw = rng.uniform(0.10, 0.13) * h * yaw, rng.uniform(0.065, 0.085) * h * yaw
    kp[5], kp[6] = neck + s_left * sw * p, neck - s_left * sw * p
    kp[11], kp[12] = P + s_left * hw * p, P - s_left * hw * p
    tilt = rng.uniform(-25, 25)
    uh, ph = _dir(180 + lean + tilt), _dir(lean + tilt + 90)
    rh = rng.uniform(0.06, 0.075) * h
    head = neck + 0.11 * h * uh + 0.3 * rh * uh
    turn = rng.uniform(-0.3, 0.3) * rh  # head yaw shifts the face sideways
    kp[0] = head - 0.2 * rh * uh + turn * ph
    kp[1], kp[2] = (head + 0.25 * rh * uh + (s_left * 0.38 * rh + turn) * ph,
                    head + 0.25 * rh * uh + (-s_left * 0.38 * rh + turn) * ph)
    kp[3], kp[4] = head + 0.1 * rh * uh + s_left * 0.97 * rh * ph, head + 0.1 * rh * uh - s_left * 0.97 * rh * ph
    limbs = {}
    for side, (sh, el, wr, hp, kn, an) in (("l", (5, 7, 9, 11, 13, 15)), ("r", (6, 8, 10, 12, 14, 16))):
        sgn = s_left if side == "l" else -s_left
        abd = rng.uniform(-25, 100) if rng.random() < 0.6 else rng.uniform(-25, 170)
        th_u = lean + sgn * abd
        kp[el] = kp[sh] + 0.18 * h * rng.uniform(0.65, 1.0) * _dir(th_u)
        th_f = th_u + rng.choice([-1.0, 1.0]) * rng.uniform(0, 150)
        kp[wr] = kp[el] + 0.16 * h * rng.uniform(0.65, 1.0) * _dir(th_f)
        th_t = 0.3 * lean + sgn * (rng.uniform(-20, 35) if rng.random() < 0.8 else rng.uniform(35, 80))
        kp[kn] = kp[hp] + 0.245 * h * rng.uniform(0.7, 1.0) * _dir(th_t)
        th_s = th_t + rng.choice([-1.0, 1.0]) * (rng.uniform(0, 30) if rng.random() < 0.6 else rng.uniform(30, 130))
        kp[an] = kp[kn] + 0.245 * h * rng.uniform(0.7, 1.0) * _dir(th_s)
        limbs[side] = dict(th_f=th_f, th_s=th_s, sgn=sgn)
    # occasionally the whole figure is rotated (bending, lying, falling)
    rot = rng.normal(0, 5) if rng.random() < 0.9 else rng.uniform(-50, 50)
    c, s = math.cos(math.radians(rot)), math.sin(math.radians(rot))
    R = np.array([[c, -s], [s, c]])
    kp = (kp - P) @ R.T + P
    head = (head - P) @ R.T + P
    neck = (neck - P) @ R.T + P
    for v in limbs.values():
        v["th_f"] -= rot
        v["th_s"] -= rot
    return dict(kp=kp, head=head, neck=neck, rh=rh, front=front, h=h, limbs=limbs, head_up=R @ uh)


def _pt(x: np.ndarray) -> Tuple[int, int]:
    return int(round(float(x[0]) * _ONE)), int(round(float(x[1]) * _ONE))


def _seg(img, mask, pid, a, b, color, thick, outline):
    t = max(1, int(round(thick)))
    cv2.line(img, _pt(a), _pt(b), outline, t + 2, cv2.LINE_AA, _SHIFT)
    cv2.line(img, _pt(a), _pt(b), color, t, cv2.LINE_AA, _SHIFT)
    cv2.line(mask, _pt(a), _pt(b), pid, t + 2, cv2.LINE_8, _SHIFT)


def _disc(img, mask, pid, c, r, color, outline=None):
    r16 = max(_ONE, int(round(r * _ONE)))
    if outline is not None:
        cv2.circle(img, _pt(c), r16 + _ONE, outline, -1, cv2.LINE_AA, _SHIFT)
        cv2.circle(mask, _pt(c), r16 + _ONE, pid, -1, cv2.LINE_8, _SHIFT)
    cv2.circle(img, _pt(c), r16, color, -1, cv2.LINE_AA, _SHIFT)
    cv2.circle(mask, _pt(c), r16, pid, -1, cv2.LINE_8, _SHIFT)


def _rand_color(rng, lo=30, hi=255):
    return tuple(float(v) for v in rng.uniform(lo, hi, 3))


def _shade(color, f):
    return tuple(min(255.0, max(0.0, v * f)) for v in color)


def draw_person(img: np.ndarray, mask: np.ndarray, pid: int, pose: Dict[str, Any], rng: np.random.Generator) -> None:
    """Draw one figure into ``img`` (BGR uint8) and its id into ``mask`` (uint8 owner mask)."""
    kp, h = pose["kp"], pose["h"]
    skin = tuple(float(v) for v in _SKIN[rng.integers(len(_SKIN))] * rng.uniform(0.9, 1.1))
    shirt, pants = _rand_color(rng), _rand_color(rng, 20, 200)
    shoes, hair = _rand_color(rng, 0, 90), _rand_color(rng, 0, 110)
    outline = _shade(shirt, 0.35)
    arm_t, leg_t = rng.uniform(0.055, 0.075) * h, rng.uniform(0.07, 0.095) * h
    sleeve_long = rng.random() < 0.5
    for side, (hp, kn, an) in (("l", (11, 13, 15)), ("r", (12, 14, 16))):
        lb = pose["limbs"][side]
        foot = kp[an] + 0.06 * h * _dir(lb["th_s"] + lb["sgn"] * 75)
        _seg(img, mask, pid, kp[an], foot, shoes, leg_t * 0.7, _shade(shoes, 0.5))
        _seg(img, mask, pid, kp[kn], kp[an], _shade(pants, 0.85), leg_t * 0.85, _shade(pants, 0.4))
        _seg(img, mask, pid, kp[hp], kp[kn], pants, leg_t, _shade(pants, 0.4))
    torso = np.array([kp[5], kp[6], kp[12], kp[11]])
    ctr = torso.mean(0)
    torso = ctr + (torso - ctr) * 1.12
    poly = np.array([_pt(v) for v in torso], np.int32)
    cv2.fillPoly(img, [poly], _shade(shirt, 0.35), cv2.LINE_AA, _SHIFT)
    cv2.fillPoly(mask, [poly], pid, cv2.LINE_8, _SHIFT)
    inner = np.array([_pt(v) for v in ctr + (torso - ctr) * 0.93], np.int32)
    cv2.fillPoly(img, [inner], shirt, cv2.LINE_AA, _SHIFT)
    _seg(img, mask, pid, pose["neck"], pose["head"], skin, 0.05 * h, _shade(skin, 0.6))
    for j in (5, 6, 11, 12):  # shoulder / hip joints
        _disc(img, mask, pid, kp[j], 0.022 * h, _shade(shirt if j < 11 else pants, 0.6))
    for side, (sh, el, wr) in (("l", (5, 7, 9)), ("r", (6, 8, 10))):
        lb = pose["limbs"][side]
        _seg(img, mask, pid, kp[sh], kp[el], shirt, arm_t, outline)
        _seg(img, mask, pid, kp[el], kp[wr], shirt if sleeve_long else skin, arm_t * 0.85, _shade(skin, 0.55))
        _disc(img, mask, pid, kp[wr] + 0.03 * h * _dir(lb["th_f"]), arm_t * 0.6, skin, _shade(skin, 0.55))
        _disc(img, mask, pid, kp[el], arm_t * 0.32, _shade(shirt, 0.55))
        _disc(img, mask, pid, kp[wr], arm_t * 0.3, _shade(skin, 0.7))
    for j in (13, 14):
        _disc(img, mask, pid, kp[j], leg_t * 0.3, _shade(pants, 0.55))
    for j in (15, 16):
        _disc(img, mask, pid, kp[j], leg_t * 0.28, _shade(shoes, 1.6))
    rh, head = pose["rh"], pose["head"]
    _disc(img, mask, pid, head, rh, skin if pose["front"] else hair, _shade(skin if pose["front"] else hair, 0.5))
    for j in (3, 4):  # ears, then the face over them
        _disc(img, mask, pid, kp[j], 0.2 * rh, _shade(skin, 0.8))
    if pose["front"]:
        up = pose["head_up"]
        cv2.ellipse(img, _pt(head + 0.35 * rh * up), (int(rh * 0.95 * _ONE), int(rh * 0.6 * _ONE)),
                    math.degrees(math.atan2(up[0], -up[1])), 180, 360, hair, -1, cv2.LINE_AA, _SHIFT)
        _disc(img, mask, pid, kp[0], 0.14 * rh, _shade(skin, 0.6))
        for j in (1, 2):
            _disc(img, mask, pid, kp[j], max(0.14 * rh, 1.6), EYE_BGR)  # >= 1.6 px: the keypoint's pixel is fully inked


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    kind = rng.integers(3)
    if kind == 0:  # gradient
        a, b = np.array(_rand_color(rng, 0, 255)), np.array(_rand_color(rng, 0, 255))
        t = np.linspace(0, 1, h)[:, None, None] if rng.random() < 0.5 else np.linspace(0, 1, w)[None, :, None]
        img = np.broadcast_to(a * (1 - t) + b * t, (h, w, 3)).astype(np.float32)
    elif kind == 1:  # smooth colour noise
        small = rng.uniform(0, 255, (int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3)).astype(np.float32)
        img = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    else:  # stripes / checker (floors, walls)
        a, b = np.array(_rand_color(rng)), np.array(_rand_color(rng))
        period = rng.uniform(12, 60)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        ang = rng.uniform(0, np.pi)
        u = (xx * np.cos(ang) + yy * np.sin(ang)) / period
        pat = (np.floor(u) % 2) if rng.random() < 0.5 else ((np.floor(u) + np.floor((yy * np.cos(ang) - xx * np.sin(ang)) / period)) % 2)
        img = (a * (1 - pat[..., None]) + b * pat[..., None]).astype(np.float32)
    img = np.ascontiguousarray(np.clip(img, 0, 255).astype(np.uint8))
    for _ in range(int(rng.integers(6, 20))):  # clutter
        c = _rand_color(rng, 0, 255)
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        s = int(rng.integers(6, max(8, min(h, w) // 4)))
        k = rng.integers(4)
        if k == 0:
            cv2.rectangle(img, (x, y), (x + s, y + int(rng.integers(4, s + 5))), c, -1)
        elif k == 1:
            cv2.circle(img, (x, y), s // 2, c, -1, cv2.LINE_AA)
        elif k == 2:
            cv2.ellipse(img, (x, y), (s // 2, max(2, s // 4)), float(rng.uniform(0, 180)), 0, 360, c, -1, cv2.LINE_AA)
        else:
            cv2.line(img, (x, y), (int(rng.integers(0, w)), int(rng.integers(0, h))), c, int(rng.integers(1, 4)), cv2.LINE_AA)
    return cv2.GaussianBlur(img, (3, 3), 0)


def _occluder(img: np.ndarray, mask: np.ndarray, rng: np.random.Generator, center: np.ndarray, size: float) -> None:
    c = _rand_color(rng, 0, 255)
    w, h = size * rng.uniform(0.5, 1.5), size * rng.uniform(0.5, 1.5)
    if rng.random() < 0.5:
        x0, y0 = center[0] - w / 2, center[1] - h / 2
        p1, p2 = (int(round(x0 * _ONE)), int(round(y0 * _ONE))), (int(round((x0 + w) * _ONE)), int(round((y0 + h) * _ONE)))
        cv2.rectangle(img, p1, p2, c, -1, cv2.LINE_8, _SHIFT)
        cv2.rectangle(mask, p1, p2, 255, -1, cv2.LINE_8, _SHIFT)
        c2 = _shade(c, 0.6)
        for t in np.arange(y0, y0 + h, max(3.0, h / 6)):  # texture
            cv2.line(img, (int(x0), int(t)), (int(x0 + w), int(t)), c2, 1)
    else:
        axes = (max(1, int(w / 2 * _ONE)), max(1, int(h / 2 * _ONE)))
        ang = float(rng.uniform(0, 180))
        cv2.ellipse(img, _pt(center), axes, ang, 0, 360, c, -1, cv2.LINE_8, _SHIFT)
        cv2.ellipse(mask, _pt(center), axes, ang, 0, 360, 255, -1, cv2.LINE_8, _SHIFT)


def _box_of(kp: np.ndarray, h: float) -> np.ndarray:
    lo, hi = kp.min(0) - 0.08 * h, kp.max(0) + 0.08 * h
    return np.concatenate([lo, hi])


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    ua = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / max(ua, 1e-9)


def render_demo_image(seed: int, split: str, index: int, image_size: Tuple[int, int] = (256, 384)):
    """Render one demo image deterministically.

    Returns (image BGR uint8 (H, W, 3), owner mask uint8 (H, W): 0 background, i+1 person i,
    255 occluder, list of person annotations dicts with keypoints (17, 3), bbox, area, rle).
    """
    rng = np.random.default_rng([int(seed), _SPLIT_IDS[split], int(index), DEMO_VERSION])
    lo, hi = image_size
    ih, iw = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
    img = _background(rng, ih, iw)
    mask = np.zeros((ih, iw), np.uint8)
    n = int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))
    poses: List[Dict[str, Any]] = []
    boxes: List[np.ndarray] = []
    for _ in range(n):
        for _attempt in range(30):
            height = rng.uniform(0.45, 0.95) * ih if n == 1 else rng.uniform(0.35, 0.8) * ih
            pelvis = (rng.uniform(0.15, 0.85) * iw, rng.uniform(0.35, 0.75) * ih)
            pose = sample_pose(rng, height, pelvis)
            box = _box_of(pose["kp"], height)
            inside = (np.clip(box[2], 0, iw) - np.clip(box[0], 0, iw)) * (np.clip(box[3], 0, ih) - np.clip(box[1], 0, ih))
            if inside < 0.7 * (box[2] - box[0]) * (box[3] - box[1]):
                continue
            if any(_iou(box, b) > 0.25 for b in boxes):
                continue
            poses.append(pose)
            boxes.append(box)
            break
    for pid, pose in enumerate(poses, start=1):
        draw_person(img, mask, pid, pose, rng)
    if rng.random() < 0.45 and poses:
        for _ in range(int(rng.integers(1, 3))):
            pose = poses[int(rng.integers(len(poses)))]
            j = int(rng.integers(5, 17))
            centre = pose["kp"][j] + rng.normal(0, 0.05 * pose["h"], 2)
            _occluder(img, mask, rng, centre, rng.uniform(0.1, 0.28) * pose["h"])
    noise = rng.standard_normal(img.shape, dtype=np.float32) * 3.0
    img = np.clip(img.astype(np.float32) + noise, 0, 255).astype(np.uint8)

    from pycocotools import mask as mask_utils

    people = []
    for pid, pose in enumerate(poses, start=1):
        own = mask == pid
        area = int(own.sum())
        if area == 0:
            continue
        kps = np.zeros((17, 3))
        for j, (x, y) in enumerate(pose["kp"]):
            if j <= 2 and not pose["front"]:
                continue  # face not seen from the back: not labelled
            xi, yi = int(round(x)), int(round(y))
            if not (0 <= xi < iw and 0 <= yi < ih):
                continue  # outside the image: not labelled
            kps[j] = (round(float(x), 2), round(float(y), 2), 2 if mask[yi, xi] == pid else 1)
        ys, xs = np.nonzero(own)
        x0, y0 = float(xs.min()), float(ys.min())
        bbox = [x0, y0, float(xs.max()) - x0 + 1.0, float(ys.max()) - y0 + 1.0]
        rle = mask_utils.encode(np.asfortranarray(own.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        people.append(dict(keypoints=kps, bbox=bbox, area=float(area), segmentation=rle, front=pose["front"]))
    return img, mask, people


# ----------------------------------------------------------------------------- dataset writer


def _render_chunk(args) -> List[Tuple[int, int, int, List[Dict[str, Any]]]]:
    seed, split, indices, out_dir, image_size, quality = args
    out = []
    for i in indices:
        img, _, people = render_demo_image(seed, split, i, image_size)
        path = os.path.join(out_dir, f"{i:06d}.jpg")
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
        if not ok:
            raise RuntimeError(f"JPEG encoding failed for {path}")
        atomic_write(path, buf.tobytes())
        out.append((i, img.shape[0], img.shape[1], people))
    return out


def _coco_categories() -> List[Dict[str, Any]]:
    return [
        dict(supercategory="person", id=1, name="person", keypoints=list(COCO_KEYPOINTS),
             skeleton=[[a + 1, b + 1] for a, b in COCO_SKELETON])
    ]


def generate_split(
    root: str, split: str, num_images: int, seed: int = 0, image_size=(256, 384), num_workers: Optional[int] = None,
    quality: int = 92, progress: bool = False,
) -> str:
    """Write ``num_images`` images of one split and its COCO JSON; returns the JSON path."""
    paths = demo_paths(root)
    img_dir = paths[f"{split}_images"]
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(os.path.dirname(paths[f"{split}_ann"]), exist_ok=True)
    chunk = 16
    workers = max(1, min(num_workers or os.cpu_count() or 1, -(-num_images // chunk)))
    jobs = [(seed, split, list(range(s, min(num_images, s + chunk))), img_dir, tuple(image_size), quality)
            for s in range(0, num_images, chunk)]
    results = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=num_images, desc=f"demo {split}", unit="img")
    if workers == 1:
        it = map(_render_chunk, jobs)
        pool = None
    else:
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        pool = ctx.Pool(workers)
        it = pool.imap_unordered(_render_chunk, jobs)
    try:
        for res in it:
            results.extend(res)
            if bar is not None:
                bar.update(len(res))
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        if bar is not None:
            bar.close()
    results.sort(key=lambda r: r[0])
    images, anns = [], []
    for i, h, w, people in results:
        image_id = i + 1
        images.append(dict(id=image_id, file_name=f"{i:06d}.jpg", width=int(w), height=int(h)))
        for p in people:
            kps = p["keypoints"]
            anns.append(dict(
                id=len(anns) + 1, image_id=image_id, category_id=1, iscrowd=0,
                bbox=[round(v, 2) for v in p["bbox"]], area=p["area"], segmentation=p["segmentation"],
                num_keypoints=int((kps[:, 2] > 0).sum()),
                keypoints=[float(v) if j % 3 < 2 else int(v) for j, v in enumerate(kps.reshape(-1))],
            ))
    coco = dict(
        info=dict(description=f"distilpose embedded demo dataset v{DEMO_VERSION} ({split}, seed {seed})", version=DEMO_VERSION),
        images=images, annotations=anns, categories=_coco_categories(),
    )
    atomic_write(paths[f"{split}_ann"], json.dumps(coco))
    return paths[f"{split}_ann"]


def generate_demo_dataset(
    root: Optional[str] = None, num_train: int = 2000, num_val: int = 200, seed: int = 0,
    image_size: Tuple[int, int] = (256, 384), num_workers: Optional[int] = None, overwrite: bool = False,
    progress: bool = False,
) -> Dict[str, str]:
    """Write the demo dataset under ``root`` (default :func:`default_demo_root`) and return its paths.

    Layout: root/images/{train,val}/NNNNNN.jpg, root/annotations/person_keypoints_{train,val}.json,
    root/demo_manifest.json (the parameters; written last, so a killed run is redone).
    An existing dataset with the same parameters is reused unless ``overwrite``.
    """
    root = root or default_demo_root()
    if num_train < 0 or num_val < 0:
        raise ValueError(f"num_train/num_val: expected >= 0, got {num_train}/{num_val}")
    lo, hi = image_size
    if not (64 <= lo <= hi):
        raise ValueError(f"image_size: expected (min, max) side with 64 <= min <= max, got {image_size}")
    paths = demo_paths(root)
    params = dict(version=DEMO_VERSION, num_train=int(num_train), num_val=int(num_val), seed=int(seed), image_size=[lo, hi])
    if not overwrite and os.path.isfile(paths["manifest"]):
        try:
            with open(paths["manifest"]) as f:
                if json.load(f).get("params") == params and all(
                    os.path.isfile(paths[k]) for k in ("train_ann", "val_ann")
                ):
                    return paths
        except (OSError, json.JSONDecodeError):
            pass
    if os.path.isfile(paths["manifest"]):
        os.remove(paths["manifest"])
    for split in ("train", "val"):
        d = paths[f"{split}_images"]
        if os.path.isdir(d):
            shutil.rmtree(d)
    t0 = time.time()
    generate_split(root, "train", num_train, seed, image_size, num_workers, progress=progress)
    generate_split(root, "val", num_val, seed, image_size, num_workers, progress=progress)
    atomic_write(paths["manifest"], json.dumps(dict(params=params, seconds=round(time.time() - t0, 2))))
    return paths


def ensure_demo_dataset(root: Optional[str] = None, **kwargs) -> Dict[str, str]:
    """The demo dataset's paths, generating it first if it is missing or was made with other parameters."""
    return generate_demo_dataset(root, overwrite=False, **kwargs)
