"""Top-down COCO person-keypoint dataset over pycocotools.

One sample = one person box (ground truth, or a detection from a COCO results JSON), cropped
to 256 x 192 with the spec's augmentation, with the student's regression targets and, on
request, the teacher's Gaussian heatmaps.

Bad data policy (``bad_sample``): "raise" stops with a :class:`BadSampleError` naming the
file / annotation id and what is wrong; "skip" logs a warning and leaves the sample out
(annotations: at construction; images that exist but cannot be decoded: the next readable
sample is returned instead and the skip is logged). Never a silent wrong sample.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from typing import Any, Dict, List, Optional, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from . import transforms as T
from .targets import HEATMAP_ENCODINGS, student_targets, teacher_targets

logger = logging.getLogger(__name__)

BAD_SAMPLE_POLICIES = ("raise", "skip")


class BadSampleError(ValueError):
    """A missing/unreadable image or a malformed annotation, with what and where."""


def read_image_rgb(path: str, apply_exif: bool = False) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB (grayscale/alpha converted). Raises BadSampleError."""
    if not os.path.isfile(path):
        raise BadSampleError(f"image file not found: {path}")
    flags = cv2.IMREAD_COLOR if apply_exif else (cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    data = np.fromfile(path, dtype=np.uint8)
    img = cv2.imdecode(data, flags) if data.size else None
    if img is None:
        raise BadSampleError(f"image file cannot be decoded (corrupt or not an image): {path}")
    return np.ascontiguousarray(img[..., ::-1])


def load_coco(ann_file: str):
    """pycocotools COCO object for a JSON file, with a clear error for a missing/invalid file."""
    from pycocotools.coco import COCO

    if not os.path.isfile(ann_file):
        raise FileNotFoundError(f"ann_file: COCO annotation file not found: {ann_file}")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(ann_file)
    except (json.JSONDecodeError, KeyError, TypeError, AssertionError) as e:
        raise BadSampleError(f"ann_file: {ann_file} is not a valid COCO annotation file ({type(e).__name__}: {e})") from e


class TopDownCocoDataset(Dataset):
    """Top-down COCO person keypoints.

    Args:
        ann_file: COCO keypoint annotation JSON (person_keypoints_*.json).
        img_prefix: folder holding the images named by ``file_name``.
        train: training mode (augmentation when ``aug`` is set; GT boxes always).
        aug: "student" (scale 0.35, rotation 45), "teacher" (0.5, 40) or None (no augmentation).
        with_heatmaps: also return teacher targets "heatmaps" (K, 64, 48) and "heatmap_weight" (K, 1).
        heatmap_keypoints: also return the targets' inputs, "heatmap_keypoints" (K, 2) float32 crop
            px and "heatmap_visibility" (K,) float32 (1 where labelled): the trainer then builds a
            batch's heatmaps on its device in one call (``data.heatmap_targets="device"``).
        heatmap_encoding: "msra", "unbiased" or "udp". heatmap_sigma: Gaussian sigma (heatmap px).
        det_file: COCO results JSON of person detections (image_id, bbox xywh, score) used
            instead of GT boxes (evaluation); ``det_score_thr`` drops lower-scored boxes.
        bad_sample: "raise" or "skip" (see the module docstring).
        input_size: crop (H, W), default (256, 192); heatmap_size: default input_size / 4.
        padding: box padding factor (1.25).
        center_shift_prob: augmented training GT boxes only (``aug`` set): with this probability
            a box's center moves by up to +-0.2 of its width / height, drawn once when the dataset is built (seeded by
            ``seed``), as mmpose 0.x's ``_xywh2cs`` does for the released training (0.3); 0 turns it off.
    """

    def __init__(
        self,
        ann_file: str,
        img_prefix: str,
        train: bool = False,
        aug: Optional[str] = None,
        with_heatmaps: bool = False,
        heatmap_encoding: str = "unbiased",
        heatmap_keypoints: bool = False,
        det_file: Optional[str] = None,
        det_score_thr: float = 0.0,
        bad_sample: str = "raise",
        input_size=(256, 192),
        heatmap_size=None,
        heatmap_sigma: float = 2.0,
        padding: float = 1.25,
        center_shift_prob: float = 0.3,
        num_keypoints: int = 17,
        flip_pairs: Sequence = T.COCO_FLIP_PAIRS,
        seed: int = 0,
    ):
        if bad_sample not in BAD_SAMPLE_POLICIES:
            raise ValueError(f"bad_sample: expected one of {BAD_SAMPLE_POLICIES}, got {bad_sample!r}")
        if aug is not None and aug not in T.AUG_PRESETS:
            raise ValueError(f"aug: expected one of {sorted(T.AUG_PRESETS)} or None, got {aug!r}")
        if heatmap_encoding not in HEATMAP_ENCODINGS:
            raise ValueError(f"heatmap_encoding: expected one of {HEATMAP_ENCODINGS}, got {heatmap_encoding!r}")
        if not os.path.isdir(img_prefix):
            raise FileNotFoundError(f"img_prefix: image folder not found: {img_prefix}")
        self.ann_file, self.img_prefix = ann_file, img_prefix
        self.train = bool(train)
        self.aug = aug if train else None
        self.aug_cfg = T.AUG_PRESETS[self.aug] if self.aug else None
        self.with_heatmaps = with_heatmaps
        self.heatmap_keypoints = bool(heatmap_keypoints)
        self.heatmap_encoding = heatmap_encoding
        self.heatmap_sigma = heatmap_sigma
        self.bad_sample = bad_sample
        self.input_size = tuple(int(v) for v in input_size)
        hs = heatmap_size if heatmap_size is not None else (self.input_size[0] // 4, self.input_size[1] // 4)
        self.heatmap_size = tuple(int(v) for v in hs)
        self.aspect_ratio = self.input_size[1] / self.input_size[0]
        self.padding = padding
        if not 0.0 <= float(center_shift_prob) <= 1.0:
            raise ValueError(f"center_shift_prob: expected a probability in [0, 1], got {center_shift_prob!r}")
        self.center_shift_prob = float(center_shift_prob) if self.aug else 0.0  # an augmentation
        self.num_keypoints = num_keypoints
        self.flip_pairs = tuple(tuple(p) for p in flip_pairs)
        self.flip_perm = T.flip_permutation(num_keypoints, self.flip_pairs)
        self.det_file = det_file
        self.skipped: List[str] = []  # human-readable reasons of every skipped sample
        self._seed = int(seed)
        self._rng: Optional[np.random.Generator] = None
        self._rng_pid: Optional[int] = None

        self.coco = load_coco(ann_file)
        self._image_ok: Dict[str, bool] = {}
        if det_file is not None:
            self.samples = self._load_detections(det_file, det_score_thr)
        else:
            self.samples = self._load_gt()
        if not self.samples:
            raise BadSampleError(f"no usable person samples in {ann_file}" + (f" with {det_file}" if det_file else ""))

    # ------------------------------------------------------------------ loading
    def _bad(self, msg: str) -> None:
        if self.bad_sample == "raise":
            raise BadSampleError(msg + " (pass bad_sample='skip' to leave such samples out)")
        logger.warning("skipping: %s", msg)
        self.skipped.append(msg)

    def _image_path(self, img_info: Dict[str, Any]) -> str:
        return os.path.join(self.img_prefix, img_info["file_name"])

    def _check_image_file(self, path: str) -> bool:
        ok = self._image_ok.get(path)
        if ok is None:
            ok = os.path.isfile(path)
            if not ok:
                self._bad(f"image file not found: {path}")
            self._image_ok[path] = ok
        return ok

    def _load_gt(self) -> List[Dict[str, Any]]:
        samples = []
        shift_rng = np.random.default_rng([self._seed, 0x5EED])  # the build-time center shifts
        k = self.num_keypoints
        cat_ids = self.coco.getCatIds(catNms=["person"]) or [1]
        for img_id in sorted(self.coco.getImgIds()):
            info = self.coco.loadImgs(img_id)[0]
            width, height = info.get("width"), info.get("height")
            if not isinstance(width, (int, float)) or not isinstance(height, (int, float)) or width <= 0 or height <= 0:
                self._bad(f"image {img_id}: missing or invalid width/height {width!r}x{height!r} in {self.ann_file}")
                continue
            ann_ids = self.coco.getAnnIds(imgIds=img_id, iscrowd=False)
            valid = []
            for ann in self.coco.loadAnns(ann_ids):
                if ann.get("category_id") not in cat_ids:
                    continue
                kpts = ann.get("keypoints")
                if kpts is None:
                    continue
                where = f"annotation {ann.get('id')} (image {img_id}) in {self.ann_file}"
                kp = np.asarray(kpts, dtype=np.float64) if isinstance(kpts, list) else None
                if kp is None or kp.shape != (3 * k,) or not np.isfinite(kp).all():
                    self._bad(f"{where}: keypoints must be a list of {3 * k} finite numbers")
                    continue
                kp = kp.reshape(k, 3)
                if not np.isin(kp[:, 2], (0, 1, 2)).all():
                    self._bad(f"{where}: keypoint visibility flags must be 0, 1 or 2, got {sorted(set(kp[:, 2]))}")
                    continue
                if kp[:, 2].max() == 0 or ann.get("num_keypoints", 1) == 0:
                    continue  # no labelled keypoint: not a training/eval sample (as mmpose)
                box = ann.get("bbox")
                if not isinstance(box, list) or len(box) != 4 or not np.isfinite(np.asarray(box, dtype=np.float64)).all():
                    self._bad(f"{where}: bbox must be [x, y, w, h] of finite numbers, got {box!r}")
                    continue
                x, y, w, h = (float(v) for v in box)
                x1, y1 = max(0.0, x), max(0.0, y)
                x2, y2 = min(width - 1.0, x1 + max(0.0, w - 1.0)), min(height - 1.0, y1 + max(0.0, h - 1.0))
                if w <= 0 or h <= 0 or x2 <= x1 or y2 <= y1 or ann.get("area", 1) <= 0:  # mmpose's sanitising
                    self._bad(f"{where}: box of zero area {box!r} (area {ann.get('area')!r})")
                    continue
                valid.append((ann, kp, [x1, y1, x2 - x1, y2 - y1]))
            if not valid:
                continue
            path = self._image_path(info)
            if not self._check_image_file(path):
                continue
            for ann, kp, box in valid:
                center, scale = T.box_to_center_scale(box, self.aspect_ratio, self.padding)
                if self.center_shift_prob and shift_rng.random() < self.center_shift_prob:
                    center = center + 0.4 * (shift_rng.random(2) - 0.5) * np.array(box[2:], dtype=np.float64)
                samples.append(
                    dict(image_file=path, image_id=int(img_id), ann_id=int(ann["id"]), bbox=box, center=center,
                         scale=scale, keypoints=kp.astype(np.float32), bbox_score=1.0, area=float(ann.get("area", 0)))
                )
        return samples

    def _load_detections(self, det_file: str, score_thr: float) -> List[Dict[str, Any]]:
        if not os.path.isfile(det_file):
            raise FileNotFoundError(f"det_file: detection results file not found: {det_file}")
        with open(det_file) as f:
            try:
                dets = json.load(f)
            except json.JSONDecodeError as e:
                raise BadSampleError(f"det_file: {det_file} is not valid JSON ({e})") from e
        if not isinstance(dets, list):
            raise BadSampleError(f"det_file: expected a JSON list of COCO detection results, got {type(dets).__name__}")
        img_ids = set(self.coco.getImgIds())
        samples = []
        for i, det in enumerate(dets):
            where = f"detection #{i} in {det_file}"
            if not isinstance(det, dict) or "image_id" not in det or "bbox" not in det:
                self._bad(f"{where}: needs 'image_id' and 'bbox'")
                continue
            if det.get("category_id", 1) != 1:
                continue
            score = float(det.get("score", 1.0))
            if score < score_thr:
                continue
            if det["image_id"] not in img_ids:
                self._bad(f"{where}: image_id {det['image_id']} is not in {self.ann_file}")
                continue
            box = det["bbox"]
            if not isinstance(box, list) or len(box) != 4 or not np.isfinite(np.asarray(box, dtype=np.float64)).all():
                self._bad(f"{where}: bbox must be [x, y, w, h] of finite numbers, got {box!r}")
                continue
            if box[2] <= 0 or box[3] <= 0:
                self._bad(f"{where}: box of zero area {box!r}")
                continue
            info = self.coco.loadImgs(det["image_id"])[0]
            path = self._image_path(info)
            if not self._check_image_file(path):
                continue
            center, scale = T.box_to_center_scale(box, self.aspect_ratio, self.padding)
            samples.append(
                dict(image_file=path, image_id=int(det["image_id"]), ann_id=-1, bbox=[float(v) for v in box],
                     center=center, scale=scale, keypoints=np.zeros((self.num_keypoints, 3), np.float32),
                     bbox_score=score, area=float(box[2] * box[3]))
            )
        return samples

    # ------------------------------------------------------------------ sampling
    def __len__(self) -> int:
        return len(self.samples)

    def reseed(self, seed: int) -> None:
        """Reset the augmentation RNG (the loader calls it in each worker)."""
        self._rng = np.random.default_rng(int(seed) % (2**63))
        self._rng_pid = os.getpid()

    @property
    def rng(self) -> np.random.Generator:
        # a forked worker that was not reseeded gets its own stream from torch's per-worker seed
        if self._rng is None or self._rng_pid != os.getpid():
            info = torch.utils.data.get_worker_info()
            self.reseed(torch.initial_seed() if info is not None else self._seed)
        return self._rng

    def __getitem__(self, idx: int) -> Dict[str, Any]:
        if not -len(self) <= idx < len(self):
            raise IndexError(f"index {idx} out of range for {len(self)} samples")
        idx %= len(self)
        for attempt in range(len(self)):
            j = (idx + attempt) % len(self)
            try:
                return self.prepare(j)
            except BadSampleError as e:
                if self.bad_sample == "raise":
                    raise BadSampleError(f"sample {j}: {e} (pass bad_sample='skip' to skip such samples)") from e
                logger.warning("skipping sample %d: %s", j, e)
                self.skipped.append(str(e))
        raise BadSampleError(f"no readable sample left in {self.ann_file}")

    def prepare(self, idx: int) -> Dict[str, Any]:
        s = self.samples[idx]
        image = read_image_rgb(s["image_file"])
        kp = s["keypoints"].astype(np.float64).copy()
        center, scale, rot, flipped = s["center"].copy(), s["scale"].copy(), 0.0, False
        if self.aug_cfg is not None:
            cfg, rng = self.aug_cfg, self.rng
            if (kp[:, 2] > 0).sum() > T.HALF_BODY_MIN_JOINTS and rng.random() < cfg["half_body_prob"]:
                hb = T.half_body_center_scale(kp, rng, self.aspect_ratio)
                if hb is not None:
                    center, scale = hb
            scale, rot = T.random_scale_rotation(scale, rng, cfg["scale_factor"], cfg["rot_factor"], cfg["rot_prob"])
            flipped = bool(rng.random() < cfg["flip_prob"])
        img_w = image.shape[1]
        if flipped:  # mirror the image (folded into the affine matrix), the box centre and the joints
            center = np.array([img_w - 1 - center[0], center[1]])
            matrix = T.get_affine_matrix(center, scale, rot, self.input_size, flip_width=img_w)
        else:
            matrix = T.get_affine_matrix(center, scale, rot, self.input_size)
        crop = T.warp_crop(image, matrix, self.input_size)
        kp_crop = T.affine_points(kp[:, :2], matrix)
        vis = kp[:, 2].copy()
        if flipped:
            kp_crop, vis = kp_crop[self.flip_perm], vis[self.flip_perm]
        coords, weight = student_targets(kp_crop, vis, self.input_size)
        out: Dict[str, Any] = {
            "img": torch.from_numpy(T.normalize_image(crop)),
            "target_coords": torch.from_numpy(coords),
            "target_weight": torch.from_numpy(weight),
        }
        if self.with_heatmaps:
            hm, hw = teacher_targets(
                kp_crop, vis, self.input_size, self.heatmap_size, self.heatmap_sigma, self.heatmap_encoding
            )
            out["heatmaps"] = torch.from_numpy(np.ascontiguousarray(hm, dtype=np.float32))
            out["heatmap_weight"] = torch.from_numpy(np.ascontiguousarray(hw, dtype=np.float32))
        if self.heatmap_keypoints:  # what teacher_targets takes, for targets built per batch
            out["heatmap_keypoints"] = torch.from_numpy(np.ascontiguousarray(kp_crop, dtype=np.float32))
            out["heatmap_visibility"] = torch.from_numpy((vis > 0).astype(np.float32))
        out["meta"] = {
            "center": torch.tensor(center, dtype=torch.float64),
            "scale": torch.tensor(scale, dtype=torch.float64),
            "rotation": torch.tensor(float(rot), dtype=torch.float32),
            "image_id": torch.tensor(s["image_id"], dtype=torch.int64),
            "bbox_score": torch.tensor(float(s["bbox_score"]), dtype=torch.float32),
            # mmpose's box area for OKS-NMS: the padded scale box
            "area": torch.tensor(float(scale[0] * scale[1]), dtype=torch.float32),
            "flipped": torch.tensor(flipped),
            "index": torch.tensor(idx, dtype=torch.int64),
        }
        return out

    def __repr__(self) -> str:
        src = f"det_file={self.det_file!r}" if self.det_file else "gt boxes"
        return (
            f"TopDownCocoDataset({len(self)} samples, {self.ann_file!r}, {src}, train={self.train}, "
            f"aug={self.aug!r}, with_heatmaps={self.with_heatmaps}, heatmap_keypoints={self.heatmap_keypoints})"
        )


__all__ = ["TopDownCocoDataset", "BadSampleError", "read_image_rgb", "load_coco"]
