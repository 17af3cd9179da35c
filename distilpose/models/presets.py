"""Named model presets: the paper's models and small ones for tests and the CPU demo."""
from __future__ import annotations

import copy
from typing import Any, Dict, Optional

from torch import nn

from .backbones import HRNet, StemNet
from .backbones.hrnet import hrnet_stages
from .heads import HeatmapHead, RegressionHead
from .pose import TokenPoseModel
from .tde import TokenDistillingEncoder

_TDE_PAPER = dict(dim=192, depth=12, num_heads=8, mlp_dim=576, pos_mode="sine-full")

PRESETS: Dict[str, Dict[str, Any]] = {
    # The paper's models.
    "distilpose_s": dict(kind="student", backbone=dict(type="stemnet"), tde=_TDE_PAPER),
    "distilpose_l": dict(kind="student", backbone=dict(type="hrnet", width=48, num_stages=2), tde=_TDE_PAPER),
    "tokenpose_teacher": dict(
        kind="teacher", backbone=dict(type="hrnet", width=48, num_stages=3), tde=_TDE_PAPER, head_hidden=384
    ),
    # Small models: unit tests and the CPU demo (same code paths, fewer channels/layers).
    "distilpose_tiny": dict(
        kind="student",
        backbone=dict(type="stemnet", stem_channels=16, num_blocks=1),
        tde=dict(dim=48, depth=2, num_heads=2, mlp_dim=96, pos_mode="sine-full"),
    ),
    "tokenpose_tiny": dict(
        kind="teacher",
        backbone=dict(type="hrnet", width=8, num_stages=1, stem_channels=16, stage1_blocks=1),
        tde=dict(dim=48, depth=2, num_heads=2, mlp_dim=96, pos_mode="sine-full"),
        head_hidden=96,
    ),
    "distilpose_demo": dict(
        kind="student",
        backbone=dict(type="stemnet", stem_channels=32, num_blocks=2),
        tde=dict(dim=96, depth=4, num_heads=4, mlp_dim=288, pos_mode="sine-full"),
    ),
    "tokenpose_demo": dict(
        kind="teacher",
        backbone=dict(type="hrnet", width=16, num_stages=2, stem_channels=32, stage1_blocks=2),
        tde=dict(dim=96, depth=4, num_heads=4, mlp_dim=288, pos_mode="sine-full"),
        head_hidden=192,
    ),
}


def _build_backbone(cfg: Dict[str, Any]) -> nn.Module:
    cfg = dict(cfg)
    kind = cfg.pop("type")
    if kind == "stemnet":
        return StemNet(**cfg)
    if kind == "hrnet":
        width = cfg.pop("width")
        num_stages = cfg.pop("num_stages")
        return HRNet(hrnet_stages(width, num_stages), **cfg)
    raise ValueError(f"backbone.type: expected 'stemnet' or 'hrnet', got {kind!r}")


def build_model(
    preset: str = "distilpose_s",
    num_keypoints: int = 17,
    attention_backend: Optional[str] = None,
    **overrides: Any,
) -> TokenPoseModel:
    """Build a model from a preset name (see ``PRESETS``); ``overrides`` update the preset dict."""
    if preset not in PRESETS:
        raise ValueError(f"preset: unknown {preset!r}; choose from {sorted(PRESETS)}")
    cfg = copy.deepcopy(PRESETS[preset])
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k].update(v)
        else:
            cfg[k] = v
    input_size = tuple(cfg.get("input_size", (256, 192)))
    heatmap_size = (input_size[0] // 4, input_size[1] // 4)
    backbone = _build_backbone(cfg["backbone"])
    tde = TokenDistillingEncoder(
        backbone.out_channels,
        feature_size=heatmap_size,
        num_keypoints=num_keypoints,
        attention_backend=attention_backend,
        **cfg["tde"],
    )
    dim = cfg["tde"]["dim"]
    if cfg["kind"] == "student":
        head: nn.Module = RegressionHead(dim)
    elif cfg["kind"] == "teacher":
        head = HeatmapHead(dim, cfg.get("head_hidden", 2 * dim), heatmap_size)
    else:
        raise ValueError(f"kind: expected 'student' or 'teacher', got {cfg['kind']!r}")
    return TokenPoseModel(backbone, tde, head, input_size, heatmap_size, name=preset)


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
