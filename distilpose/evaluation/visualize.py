"""Pose overlays: COCO skeleton with per-keypoint confidence colours."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import cv2
import numpy as np

from ..data.transforms import COCO_SKELETON

# limb colours (BGR) by body side: left, right, centre
_LEFT, _RIGHT, _CENTRE = (0, 165, 255), (255, 128, 0), (80, 220, 80)
_LEFT_KPTS = {1, 3, 5, 7, 9, 11, 13, 15}
_RIGHT_KPTS = {2, 4, 6, 8, 10, 12, 14, 16}


def confidence_color(score: float) -> Tuple[int, int, int]:
    """BGR colour on a red (0) -> yellow (0.5) -> green (1) ramp."""
    s = float(np.clip(score, 0.0, 1.0))
    r = 255 if s < 0.5 else int(round(255 * (1 - s) * 2))
    g = int(round(255 * s * 2)) if s < 0.5 else 255
    return (0, g, r)


def draw_pose(
    image_bgr: np.ndarray,
    keypoints: np.ndarray,
    skeleton: Sequence[Tuple[int, int]] = COCO_SKELETON,
    kpt_thr: float = 0.3,
    radius: Optional[int] = None,
    thickness: Optional[int] = None,
    bbox: Optional[Sequence[float]] = None,
) -> np.ndarray:
    """Return a copy of ``image_bgr`` (H, W, 3) uint8 with one person's pose drawn on it.

    keypoints (K, 3): x, y in image px and a confidence. Limbs (coloured by side) are drawn
    when both ends score >= ``kpt_thr``; every keypoint is drawn as a disc coloured by its
    confidence (red -> yellow -> green), hollow when below ``kpt_thr``. ``bbox``: optional xywh box.
    Several people: call it repeatedly on its own output.
    """
    if not isinstance(image_bgr, np.ndarray) or image_bgr.ndim != 3 or image_bgr.shape[2] != 3:
        raise ValueError(f"image_bgr: expected an (H, W, 3) array, got {getattr(image_bgr, 'shape', type(image_bgr))}")
    kp = np.asarray(keypoints, dtype=np.float64)
    if kp.ndim != 2 or kp.shape[1] != 3:
        raise ValueError(f"keypoints: expected shape (K, 3), got {kp.shape}")
    img = np.ascontiguousarray(image_bgr.astype(np.uint8, copy=True))
    size = max(img.shape[:2])
    radius = radius or max(2, int(round(size / 150)))
    thickness = thickness or max(1, int(round(size / 250)))
    sh = 4
    one = 1 << sh

    def pt(j):
        return int(round(kp[j, 0] * one)), int(round(kp[j, 1] * one))

    if bbox is not None:
        x, y, w, h = (float(v) for v in bbox)
        cv2.rectangle(img, (int(x), int(y)), (int(x + w), int(y + h)), (255, 255, 255), thickness)
    finite = np.isfinite(kp).all(axis=1)
    for a, b in skeleton:
        if a >= len(kp) or b >= len(kp) or not (finite[a] and finite[b]):
            continue
        if kp[a, 2] < kpt_thr or kp[b, 2] < kpt_thr:
            continue
        col = _LEFT if (a in _LEFT_KPTS and b in _LEFT_KPTS) else _RIGHT if (a in _RIGHT_KPTS and b in _RIGHT_KPTS) else _CENTRE
        cv2.line(img, pt(a), pt(b), col, thickness + 1, cv2.LINE_AA, sh)
    for j in range(len(kp)):
        if not finite[j]:
            continue
        col = confidence_color(kp[j, 2])
        if kp[j, 2] >= kpt_thr:
            cv2.circle(img, pt(j), radius * one, (0, 0, 0), -1, cv2.LINE_AA, sh)
            cv2.circle(img, pt(j), max(1, radius - 1) * one, col, -1, cv2.LINE_AA, sh)
        else:
            cv2.circle(img, pt(j), radius * one, col, 1, cv2.LINE_AA, sh)
    return img
