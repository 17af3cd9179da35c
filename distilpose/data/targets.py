"""Training targets: the student's normalised coordinates and the teacher's Gaussian heatmaps.

Teacher heatmaps come from ``distilpose_kernels.gaussian_heatmap_targets``. Until that op is
available in the installed kernels package, a local vectorised PyTorch implementation
(``_gaussian_heatmap_targets_shim`` below, mmpose's three encodings) is used instead;
``heatmap_targets_backend()`` says which one runs.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional, Tuple

import numpy as np
import torch

logger = logging.getLogger(__name__)

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


def _gaussian_heatmap_targets_shim(
    keypoints: torch.Tensor,
    visibility: torch.Tensor,
    input_size: Tuple[int, int],
    heatmap_size: Tuple[int, int],
    sigma: float = 2.0,
    encoding: str = "unbiased",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """SHIM (temporary, until ``distilpose_kernels.gaussian_heatmap_targets`` exists).

    Vectorised mmpose TopDownGenerateTarget: keypoints (N, K, 2) in input-crop pixels,
    visibility (N, K) or (N, K, 1); input_size/heatmap_size (H, W).
    Returns heatmaps (N, K, Hh, Wh) float32 and weights (N, K, 1) float32 (0 for invisible
    keypoints and for Gaussians whose 3-sigma window lies wholly outside the grid).
    """
    if encoding not in HEATMAP_ENCODINGS:
        raise ValueError(f"encoding: expected one of {HEATMAP_ENCODINGS}, got {encoding!r}")
    kp = keypoints.to(torch.float64)
    vis = visibility.reshape(kp.shape[0], kp.shape[1]).to(torch.float64)
    (ih, iw), (hh, hw) = input_size, heatmap_size
    if encoding == "udp":
        stride = torch.tensor([(iw - 1.0) / (hw - 1.0), (ih - 1.0) / (hh - 1.0)], dtype=torch.float64)
    else:
        stride = torch.tensor([iw / hw, ih / hh], dtype=torch.float64)
    mu_f = kp / stride  # sub-pixel centre on the heatmap
    mu_i = torch.trunc(mu_f + 0.5)  # mmpose: int(x / stride + 0.5)
    tmp = sigma * 3.0
    if encoding == "unbiased":  # mmpose checks the float window here
        ul, br = mu_f - tmp, mu_f + tmp + 1
    else:
        ul, br = torch.trunc(mu_i - tmp), torch.trunc(mu_i + tmp + 1)
    off = (ul[..., 0] >= hw) | (ul[..., 1] >= hh) | (br[..., 0] < 0) | (br[..., 1] < 0)
    weight = ((vis > 0) & ~off).to(torch.float64)
    xs = torch.arange(hw, dtype=torch.float64).view(1, 1, 1, hw)
    ys = torch.arange(hh, dtype=torch.float64).view(1, 1, hh, 1)
    centre = mu_i if encoding == "msra" else mu_f
    g = torch.exp(
        -((xs - centre[..., 0, None, None]) ** 2 + (ys - centre[..., 1, None, None]) ** 2) / (2 * sigma**2)
    )
    if encoding in ("msra", "udp"):  # limited to the window [ul, br) around the integer centre
        in_x = (xs >= ul[..., 0, None, None]) & (xs < br[..., 0, None, None])
        in_y = (ys >= ul[..., 1, None, None]) & (ys < br[..., 1, None, None])
        g = g * (in_x & in_y)
    g = g * weight[..., None, None]
    return g.to(torch.float32), weight.to(torch.float32).unsqueeze(-1)


def _resolve_targets_op() -> Tuple[Callable, str]:
    try:
        import distilpose_kernels

        return distilpose_kernels.gaussian_heatmap_targets, "distilpose_kernels"
    except (ImportError, AttributeError):
        return _gaussian_heatmap_targets_shim, "local-shim"


def heatmap_targets_backend() -> str:
    """"distilpose_kernels" when the kernels op is importable, else "local-shim"."""
    return _resolve_targets_op()[1]


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
    fn = op if op is not None else _resolve_targets_op()[0]
    kp = torch.as_tensor(np.asarray(keypoints_crop, dtype=np.float32))[None]
    vis = torch.as_tensor((np.asarray(visibility) > 0).astype(np.float32))[None]
    hm, w = fn(kp, vis, tuple(input_size), tuple(heatmap_size), sigma=sigma, encoding=encoding)
    return hm[0].numpy(), w[0].reshape(-1, 1).numpy()
