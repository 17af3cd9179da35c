"""Losses of DistilPose, composed from the op library's references and fused ops.

Batch keys (see distilpose.data): target_coords (N, K, 2), target_weight (N, K, 1),
heatmaps (N, K, H, W), heatmap_weight (N, K, 1).
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F

import distilpose_kernels as dk
from distilpose_kernels import annotate


def keypoint_regression_loss(coords: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """SmoothL1 (beta 1, mean) between pred*w and target*w; weight (N, K, 1) or (N, K, 2)."""
    if coords.shape != target.shape:
        raise ValueError(f"target_coords: expected shape {tuple(coords.shape)}, got {tuple(target.shape)}")
    w = weight.to(coords.dtype).expand_as(coords)
    return F.smooth_l1_loss(coords * w, target.to(coords.dtype) * w, beta=1.0, reduction="mean")


def token_mse_loss(student_tokens: torch.Tensor, teacher_tokens: torch.Tensor) -> torch.Tensor:
    """MSE (mean) between student and (detached) teacher tokens of the same shape."""
    if student_tokens.shape != teacher_tokens.shape:
        raise ValueError(
            f"teacher tokens: shape {tuple(teacher_tokens.shape)} does not match the student's "
            f"{tuple(student_tokens.shape)} (token width and count must agree for distillation)"
        )
    return F.mse_loss(student_tokens, teacher_tokens.detach().to(student_tokens.dtype))


@annotate("distilpose.teacher_loss")
def teacher_loss(out: Dict[str, torch.Tensor], batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Heatmap teacher loss: per-joint weighted MSE on the Gaussian targets."""
    loss = dk.joint_mse_loss(out["heatmaps"], batch["heatmaps"], batch["heatmap_weight"])
    return {"loss_heatmap": loss, "loss": loss}
