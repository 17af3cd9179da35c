"""Top-down transforms: box -> (center, scale), affine crop, flip, half-body, random scale/rotation.

Conventions (mmpose's, without its legacy /200 scale unit):
- ``center`` (2,) image pixels; ``scale`` (2,) box width/height in pixels, aspect 192:256,
  including the 1.25 padding.
- The crop maps ``center`` to the middle of the output and ``scale`` to its full size:
  ``x_crop = s * R(-rot) (x_img - center) + (W/2, H/2)``, ``s = W / scale_w``.
- Keypoints are (K, 3) arrays (x, y, visibility) in image pixels.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import cv2
import numpy as np

#: COCO-17 keypoint names, in annotation order.
COCO_KEYPOINTS = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear",
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow",
    "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle",
)  # fmt: skip
#: Left/right pairs swapped by a horizontal flip.
COCO_FLIP_PAIRS = ((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16))
#: Keypoints of the upper body (half-body transform); the rest is the lower body.
COCO_UPPER_BODY = tuple(range(11))
COCO_LOWER_BODY = tuple(range(11, 17))
#: COCO skeleton (0-based keypoint index pairs), as in the COCO person category.
COCO_SKELETON = (
    (15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7),
    (6, 8), (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6),
)  # fmt: skip
#: Per-keypoint OKS sigmas of the COCO evaluator.
COCO_SIGMAS = np.array(
    [0.26, 0.25, 0.25, 0.35, 0.35, 0.79, 0.79, 0.72, 0.72, 0.62, 0.62, 1.07, 1.07, 0.87, 0.87, 0.89, 0.89]
) / 10.0

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Augmentation settings of the spec (students vs the teacher); probabilities as in mmpose.
AUG_PRESETS = {
    "student": dict(scale_factor=0.35, rot_factor=45.0, rot_prob=0.6, flip_prob=0.5, half_body_prob=0.3),
    "teacher": dict(scale_factor=0.5, rot_factor=40.0, rot_prob=0.6, flip_prob=0.5, half_body_prob=0.3),
}
HALF_BODY_MIN_JOINTS = 8  # mmpose: more than 8 visible joints are needed


def flip_permutation(num_keypoints: int = 17, flip_pairs: Sequence[Tuple[int, int]] = COCO_FLIP_PAIRS) -> np.ndarray:
    """Index array ``perm`` so that ``kpts[perm]`` swaps every left/right pair."""
    perm = np.arange(num_keypoints)
    for a, b in flip_pairs:
        if a >= num_keypoints or b >= num_keypoints:
            raise ValueError(f"flip_pairs: pair {(a, b)} out of range for {num_keypoints} keypoints")
        perm[a], perm[b] = b, a
    return perm


def box_to_center_scale(
    box_xywh: Sequence[float], aspect_ratio: float = 192 / 256, padding: float = 1.25
) -> Tuple[np.ndarray, np.ndarray]:
    """COCO box (x, y, w, h) -> center (2,), scale (2,) in pixels with the crop's aspect and padding."""
    x, y, w, h = (float(v) for v in box_xywh)
    center = np.array([x + w * 0.5, y + h * 0.5], dtype=np.float64)
    if w > aspect_ratio * h:
        h = w / aspect_ratio
    else:
        w = h * aspect_ratio
    return center, np.array([w, h], dtype=np.float64) * padding


def get_affine_matrix(
    center: np.ndarray, scale: np.ndarray, rotation: float, output_size: Tuple[int, int], flip_width: Optional[int] = None
) -> np.ndarray:
    """2x3 matrix from image pixels to crop pixels.

    output_size: (H, W) of the crop. rotation in degrees (counter-clockwise in the image, as
    mmpose). ``flip_width``: when given, the image is mirrored first (x -> flip_width - 1 - x),
    and ``center`` is taken in the mirrored image.
    """
    out_h, out_w = output_size
    sx, sy = out_w / float(scale[0]), out_h / float(scale[1])
    r = math.radians(rotation)
    cos, sin = math.cos(r), math.sin(r)
    # x_crop = S * R(-rot) * (x - c) + out_c ; R(-rot) = [[cos, sin], [-sin, cos]]
    a = np.array([[sx * cos, sx * sin], [-sy * sin, sy * cos]], dtype=np.float64)
    t = np.array([out_w * 0.5, out_h * 0.5]) - a @ np.asarray(center, dtype=np.float64)
    m = np.concatenate([a, t[:, None]], axis=1)
    if flip_width is not None:
        f = np.array([[-1.0, 0.0, flip_width - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
        m = m @ f
    return m


def affine_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply a 2x3 affine matrix to (..., 2) points."""
    pts = np.asarray(points, dtype=np.float64)
    return pts @ matrix[:, :2].T + matrix[:, 2]


def crop_to_image(coords_crop: np.ndarray, center: np.ndarray, scale: np.ndarray, crop_size: Tuple[int, int]) -> np.ndarray:
    """Crop pixels (..., 2) -> image pixels for an unrotated crop (test time). crop_size (H, W).

    Equivalent to mmpose's ``transform_preds`` (non-UDP).
    """
    h, w = crop_size
    c = np.asarray(coords_crop, dtype=np.float64)
    return (c / np.array([w, h]) - 0.5) * np.asarray(scale, dtype=np.float64) + np.asarray(center, dtype=np.float64)


def warp_crop(image: np.ndarray, matrix: np.ndarray, output_size: Tuple[int, int]) -> np.ndarray:
    """Affine crop with cv2.warpAffine (bilinear, constant 0 border). output_size (H, W)."""
    out_h, out_w = output_size
    return cv2.warpAffine(image, matrix, (int(out_w), int(out_h)), flags=cv2.INTER_LINEAR)


def half_body_center_scale(
    keypoints: np.ndarray,
    rng: np.random.Generator,
    aspect_ratio: float = 192 / 256,
    padding: float = 1.5,
) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """mmpose's half-body transform: a box around the upper or lower visible joints.

    Returns (center, scale) or None when fewer than 2 joints of the chosen half are visible.
    """
    vis = keypoints[:, 2] > 0
    upper = [i for i in COCO_UPPER_BODY if i < len(keypoints) and vis[i]]
    lower = [i for i in COCO_LOWER_BODY if i < len(keypoints) and vis[i]]
    # mmpose (after HRNet) draws ``np.random.randn() < 0.5``: the upper body with P = 0.691, not 0.5
    if rng.standard_normal() < 0.5 and len(upper) > 2:
        sel = upper
    else:
        sel = lower if len(lower) > 2 else upper
    if len(sel) < 2:
        return None
    pts = keypoints[sel, :2].astype(np.float64)
    center = pts.mean(axis=0)
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    w, h = hi[0] - lo[0], hi[1] - lo[1]
    if w > aspect_ratio * h:
        h = w / aspect_ratio
    else:
        w = h * aspect_ratio
    return center, np.array([w, h], dtype=np.float64) * padding


def random_scale_rotation(
    scale: np.ndarray, rng: np.random.Generator, scale_factor: float, rot_factor: float, rot_prob: float
) -> Tuple[np.ndarray, float]:
    """mmpose TopDownGetRandomScaleRotation: scale x clip(N(1, sf), 1-sf, 1+sf), rotation clip(N(0, rf), -2rf, 2rf)."""
    s = float(np.clip(rng.standard_normal() * scale_factor + 1.0, 1.0 - scale_factor, 1.0 + scale_factor))
    r = float(np.clip(rng.standard_normal() * rot_factor, -2 * rot_factor, 2 * rot_factor))
    if rng.random() > rot_prob:
        r = 0.0
    return scale * s, r


def normalize_image(image_rgb: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """uint8 (H, W, 3) RGB -> float32 (3, H, W) normalised."""
    img = image_rgb.astype(np.float32) * (1.0 / 255.0)
    img = (img - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(img.transpose(2, 0, 1))


def to_rgb_uint8(image: np.ndarray, channel_order: str = "rgb") -> np.ndarray:
    """Any photo array -> (H, W, 3) uint8 RGB.

    Accepts (H, W) / (H, W, 1) grayscale, (H, W, 3) and (H, W, 4) (alpha dropped); uint8,
    uint16 (scaled by 1/257) or floats (in [0, 1] when max <= 1, else 0..255).
    ``channel_order``: "rgb" or "bgr" (OpenCV) for 3/4-channel input.
    """
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image: expected a numpy array, got {type(image).__name__}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
        raise ValueError(f"image: expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got shape {image.shape}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image: empty image of shape {image.shape}")
    if image.dtype == np.uint8:
        img = image
    elif image.dtype == np.uint16:
        img = (image.astype(np.float32) / 257.0 + 0.5).astype(np.uint8)
    elif np.issubdtype(image.dtype, np.floating):
        if not np.isfinite(image).all():
            raise ValueError("image: contains NaN or inf values")
        f = image.astype(np.float32)
        if f.max() <= 1.0:
            f = f * 255.0
        img = np.clip(f + 0.5, 0, 255).astype(np.uint8)
    else:
        raise TypeError(f"image: expected uint8, uint16 or float dtype, got {image.dtype}")
    if img.ndim == 2:
        return np.ascontiguousarray(np.stack([img] * 3, axis=-1))
    img = img[..., :3]
    if channel_order == "bgr":
        img = img[..., ::-1]
    elif channel_order != "rgb":
        raise ValueError(f"channel_order: expected 'rgb' or 'bgr', got {channel_order!r}")
    return np.ascontiguousarray(img)
