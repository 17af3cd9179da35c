"""Training targets: the student's normalised coordinates and the teacher's Gaussian heatmaps
(``distilpose_kernels.gaussian_heatmap_targets``: mmpose's three encodings)."""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import numpy as np
import torch

import distilpose_kernels as dk

HEATMAP_ENCODINGS = ("msra", "unbiased", "udp")


def student_targets(keypoints_crop: np.ndarray, visibility: np.ndarray, input_size=(256, 192)) -> Tuple[np.ndarray, np.ndarray]:
    """Regression targets of the spec.

    keypoints_crop (K, 2) in crop pixels; visibility (K,). input_size (H, W).
    Returns target_coords (K, 2) = (x / W, y / H) float32 and target_weight (K, 1) float32 =
    visible > 0 AND 0 <= x <= W - 1 AND 0 <= y <= H - 1.
    """
    h, w = input_size
    kp = np.asarray(keypoints_crop, dtype=np.float64)
    coords = (kp / np.array([w, h], dtype=np.float64)).astype(np.float32)
    inside = (kp[:, 0] >= 0) & (kp[:, 0] <= w - 1) & (kp[:, 1] >= 0) & (kp[:, 1] <= h - 1)
    weight = ((np.asarray(visibility) > 0) & inside).astype(np.float32)[:, None]
    return coords, weight


# ----------------------------------------------------------------------------- teacher targets


def teacher_targets(
    keypoints_crop: np.ndarray,
    visibility: np.ndarray,
    input_size=(256, 192),
    heatmap_size=(64, 48),
    sigma: float = 2.0,
    encoding: str = "unbiased",
    op: Optional[Callable] = None,
) -> Tuple[np.ndarray, np.ndarray]:
    """Gaussian heatmap targets for one sample: keypoints (K, 2) crop px, visibility (K,).

    Returns heatmaps (K, Hh, Wh) float32 and weights (K, 1) float32.
    """
    fn = op if op is not None else dk.gaussian_heatmap_targets
    kp = torch.as_tensor(np.asarray(keypoints_crop, dtype=np.float32))[None]
    vis = torch.as_tensor((np.asarray(visibility) > 0).astype(np.float32))[None]
    hm, w = fn(kp, vis, tuple(input_size), tuple(heatmap_size), sigma=sigma, encoding=encoding)
    return hm[0].numpy(), w[0].reshape(-1, 1).numpy()
