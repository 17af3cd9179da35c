"""Top-down pose models: backbone -> TDE -> head."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn

from .heads import HeatmapHead, RegressionHead
from .tde import TokenDistillingEncoder


def _tracing() -> bool:
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or getattr(torch.compiler, "is_exporting", bool)():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class TokenPoseModel(nn.Module):
    """Backbone + Token-distilling Encoder + head.

    forward(img (N, 3, H, W)) -> dict with the head's outputs plus ``kpt_tokens``
    (N, K, D) and ``vis_tokens`` (N, P, D) taken after the last TDE layer.
    ``kind`` is "student" (regression head) or "teacher" (heatmap head).
    """

    def __init__(
        self,
        backbone: nn.Module,
        tde: TokenDistillingEncoder,
        head: nn.Module,
        input_size: Tuple[int, int] = (256, 192),
        heatmap_size: Tuple[int, int] = (64, 48),
        name: str = "custom",
    ):
        super().__init__()
        self.backbone = backbone
        self.tde = tde
        self.head = head
        self.input_size = tuple(input_size)
        self.heatmap_size = tuple(heatmap_size)
        self.num_keypoints = tde.num_keypoints
        self.name = name
        self.kind = "teacher" if isinstance(head, HeatmapHead) else "student"
        #: Reject NaN/inf inputs with a clear error (one reduction per forward; skipped while
        #: compiling, exporting or capturing a CUDA graph). Speed-critical callers may turn it off.
        self.check_finite = True

    def check_input(self, img: torch.Tensor) -> None:
        if not isinstance(img, torch.Tensor):
            raise TypeError(f"img: expected a torch.Tensor, got {type(img).__name__}")
        c = getattr(self.backbone, "in_channels", 3)
        if img.dim() != 4 or img.shape[1] != c or tuple(img.shape[2:]) != self.input_size:
            raise ValueError(
                f"img: expected (N, {c}, {self.input_size[0]}, {self.input_size[1]}) crops, got {tuple(img.shape)}"
            )
        if not img.is_floating_point():
            raise TypeError(f"img: expected a floating-point tensor (normalised crops), got {img.dtype}")
        if self.check_finite and not _tracing() and not bool(torch.isfinite(img).all()):
            raise ValueError("img: contains NaN or inf (set model.check_finite = False to skip this check)")

    def forward(self, img: torch.Tensor) -> Dict[str, torch.Tensor]:
        self.check_input(img)
        feat = self.backbone(img)
        kpt, vis = self.tde(feat)
        out = dict(self.head(kpt))
        out["kpt_tokens"] = kpt
        out["vis_tokens"] = vis
        return out
