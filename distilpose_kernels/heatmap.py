"""Gaussian simulated heatmaps: Reg2HM and score losses, rendering, teacher targets.

(Foundation: pure-PyTorch references; the fused Triton kernels land with the heatmap issue.)
Shapes: N batch, K keypoints, H x W heatmap.
"""
from __future__ import annotations

from typing import Tuple

import torch

from ._utils import check_same_device, check_tensor

REG2HM_MODES = ("released", "per_sample")


def _check_loss_inputs(coords, sigma, score, teacher_heatmaps, keypoint_weight):
    check_tensor("teacher_heatmaps", teacher_heatmaps, ndim=4, floating=True)
    n, k = teacher_heatmaps.shape[:2]
    check_tensor("coords", coords, shape=(n, k, 2), floating=True)
    check_tensor("sigma", sigma, shape=(n, k, 2), floating=True)
    if score is not None:
        check_tensor("score", score, shape=(n, k, 1), floating=True)
    check_tensor("keypoint_weight", keypoint_weight, shape=(n, k, 1))
    check_same_device(coords=coords, sigma=sigma, teacher_heatmaps=teacher_heatmaps, keypoint_weight=keypoint_weight)


def simulated_gaussians_reference(
    coords: torch.Tensor, sigma: torch.Tensor, height: int, width: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Simulated heatmaps of the spec, with the 3-sigma off-grid rule.

    coords: (N, K, 2) normalised (x, y); sigma: (N, K, 2) in heatmap pixels.
    Returns (maps (N, K, H, W), in_grid (N, K, 1) float mask). Maps of keypoints whose
    box [mu - 3 sigma, mu + 3 sigma + 1] lies wholly outside the grid are zero.
    """
    mu_x = coords[..., 0] * width
    mu_y = coords[..., 1] * height
    sx, sy = sigma[..., 0], sigma[..., 1]
    with torch.no_grad():
        ul_x, ul_y = mu_x - 3 * sx, mu_y - 3 * sy
        br_x, br_y = mu_x + 3 * sx + 1, mu_y + 3 * sy + 1
        off = (ul_x >= width) | (ul_y >= height) | (br_x < 0) | (br_y < 0)
        in_grid = (~off).to(coords.dtype).unsqueeze(-1)
    xs = torch.arange(width, device=coords.device, dtype=coords.dtype)
    ys = torch.arange(height, device=coords.device, dtype=coords.dtype)
    dx2 = (xs.view(1, 1, 1, width) - mu_x[..., None, None]) ** 2 / (sx[..., None, None] ** 2 + 1e-9)
    dy2 = (ys.view(1, 1, height, 1) - mu_y[..., None, None]) ** 2 / (sy[..., None, None] ** 2 + 1e-9)
    maps = torch.exp(-(dx2 + dy2) / 2) * in_grid[..., None]
    return maps, in_grid


def reg2hm_loss_reference(
    coords: torch.Tensor,
    sigma: torch.Tensor,
    teacher_heatmaps: torch.Tensor,
    keypoint_weight: torch.Tensor,
    mode: str = "released",
) -> torch.Tensor:
    """Simulated-heatmap (Reg2HM) loss, pure PyTorch.

    mode="released": (1/K) sum_k mean_i(w_ik^2) * mean_{j,pixels}(g_jk - T_jk)^2, the
    broadcast the authors' code computes (and that produced the paper's numbers).
    mode="per_sample": (1/K) sum_k mean_{i,pixels}(w_ik (g_ik - T_ik))^2.
    w = keypoint_weight * in_grid. No gradient reaches the teacher heatmaps.
    """
    if mode not in REG2HM_MODES:
        raise ValueError(f"mode: expected one of {REG2HM_MODES}, got {mode!r}")
    _check_loss_inputs(coords, sigma, None, teacher_heatmaps, keypoint_weight)
    h, w_ = teacher_heatmaps.shape[-2:]
    g, in_grid = simulated_gaussians_reference(coords, sigma, h, w_)
    t = teacher_heatmaps.detach().to(g.dtype)
    w = keypoint_weight.to(g.dtype) * in_grid  # (N, K, 1)
    if mode == "released":
        per_joint_map = ((g - t) ** 2).mean(dim=(0, 2, 3))  # (K,)
        per_joint_w = (w[..., 0] ** 2).mean(dim=0)  # (K,)
        return (per_joint_w * per_joint_map).mean()
    return ((w[..., None] * (g - t)) ** 2).mean()


def teacher_value_at_prediction(coords: torch.Tensor, teacher_heatmaps: torch.Tensor) -> torch.Tensor:
    """Teacher heatmap value at the nearest pixel of the prediction, 0 outside [0, 1]. -> (N, K, 1)."""
    n, k, h, w = teacher_heatmaps.shape
    c = coords.detach()
    px = torch.round(c[..., 0].clamp(0, 1) * (w - 1)).long()
    py = torch.round(c[..., 1].clamp(0, 1) * (h - 1)).long()
    inside = (c >= 0).all(-1) & (c <= 1).all(-1)
    flat = teacher_heatmaps.detach().reshape(n, k, h * w)
    val = flat.gather(2, (py * w + px).unsqueeze(-1)).squeeze(-1)
    return torch.where(inside, val, torch.zeros_like(val)).unsqueeze(-1)


def score_loss_reference(
    coords: torch.Tensor, score: torch.Tensor, teacher_heatmaps: torch.Tensor, keypoint_weight: torch.Tensor
) -> torch.Tensor:
    """Score loss: L1 (mean) between score*w and the teacher value at the predicted pixel *w."""
    _check_loss_inputs(coords, coords, score, teacher_heatmaps, keypoint_weight)
    target = teacher_value_at_prediction(coords, teacher_heatmaps).to(score.dtype)
    w = keypoint_weight.to(score.dtype)
    return (score * w - target * w).abs().mean()


def simulated_heatmap_loss_reference(
    coords: torch.Tensor,
    sigma: torch.Tensor,
    score: torch.Tensor,
    teacher_heatmaps: torch.Tensor,
    keypoint_weight: torch.Tensor,
    mode: str = "released",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(Reg2HM loss, score loss), both unweighted scalars. See the two functions above."""
    _check_loss_inputs(coords, sigma, score, teacher_heatmaps, keypoint_weight)
    return (
        reg2hm_loss_reference(coords, sigma, teacher_heatmaps, keypoint_weight, mode),
        score_loss_reference(coords, score, teacher_heatmaps, keypoint_weight),
    )


def simulated_heatmap_loss(
    coords: torch.Tensor,
    sigma: torch.Tensor,
    score: torch.Tensor,
    teacher_heatmaps: torch.Tensor,
    keypoint_weight: torch.Tensor,
    mode: str = "released",
    backend=None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Public entry (reference for now)."""
    return simulated_heatmap_loss_reference(coords, sigma, score, teacher_heatmaps, keypoint_weight, mode)


def joint_mse_loss(pred: torch.Tensor, target: torch.Tensor, target_weight: torch.Tensor) -> torch.Tensor:
    """Per-joint weighted heatmap MSE (the teacher's loss, mmpose JointsMSELoss with target weight).

    pred, target: (N, K, H, W); target_weight: (N, K, 1).
    L = (1/K) sum_k mean_{i, pixels} (w_ik (pred_ik - target_ik))^2.
    """
    check_tensor("pred", pred, ndim=4, floating=True)
    check_tensor("target", target, shape=tuple(pred.shape))
    check_tensor("target_weight", target_weight, shape=(pred.shape[0], pred.shape[1], 1))
    w = target_weight.to(pred.dtype)[..., None]
    return ((w * (pred - target.to(pred.dtype))) ** 2).mean()
