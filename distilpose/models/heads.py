"""Heads on the TDE's keypoint tokens: regression (student) and heatmap (TokenPose teacher)."""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import distilpose_kernels as dk
from distilpose_kernels import annotate


def _init_linear_ln(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class RegressionHead(nn.Module):
    """Per keypoint token: LN -> Linear(D, 5) = (x, y, score, sigma_x, sigma_y).

    Returns coords (N, K, 2) sigmoid-normalised to the crop, score (N, K, 1) raw,
    sigma (N, K, 2) softplus, in heatmap pixels.
    """

    def __init__(self, dim: int = 192):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        self.fc = nn.Linear(dim, 5)
        #: run LN -> Linear -> activations as the one-kernel ``distilpose_kernels.regression_head``
        #: (float32 outputs; with autograd it runs its reference). Set by InferenceEngine.
        self.fused = False
        _init_linear_ln(self)

    @annotate("distilpose.head")
    def forward(self, kpt_tokens: torch.Tensor) -> Dict[str, torch.Tensor]:
        if self.fused:
            out = dk.regression_head(kpt_tokens, self.norm.weight, self.norm.bias, self.fc.weight, self.fc.bias,
                                     self.norm.eps)
            return {"coords": out[..., 0:2], "score": out[..., 2:3], "sigma": out[..., 3:5]}
        out = self.fc(self.norm(kpt_tokens))
        return {
            "coords": out[..., 0:2].sigmoid(),
            "score": out[..., 2:3],
            "sigma": F.softplus(out[..., 3:5]),
        }


class HeatmapHead(nn.Module):
    """TokenPose head: LN -> Linear(D, hidden) -> LN -> Linear(hidden, H*W), reshaped (N, K, H, W)."""

    def __init__(self, dim: int = 192, hidden: int = 384, heatmap_size: Tuple[int, int] = (64, 48)):
        super().__init__()
        self.heatmap_size = tuple(heatmap_size)
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.fc1 = nn.Linear(dim, hidden)
        self.norm2 = nn.LayerNorm(hidden, eps=1e-5)
        self.fc2 = nn.Linear(hidden, heatmap_size[0] * heatmap_size[1])
        _init_linear_ln(self)

    @annotate("distilpose.head")
    def forward(self, kpt_tokens: torch.Tensor) -> Dict[str, torch.Tensor]:
        hm = self.fc2(self.norm2(self.fc1(self.norm1(kpt_tokens))))
        return {"heatmaps": hm.unflatten(-1, self.heatmap_size)}
