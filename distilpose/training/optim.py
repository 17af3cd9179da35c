"""Optimiser and learning-rate schedule of the released recipe (mmcv-style, stepped every iteration).

lr(it) = base_lr * warmup(it) * gamma ** #(milestones <= epoch(it)), epoch(it) = it // iters_per_epoch,
warmup(it) = 1 - (1 - it / warmup_iters) * (1 - warmup_ratio) for it < warmup_iters (mmcv "linear").
"""
from __future__ import annotations

import bisect
from typing import Iterable, Sequence

import torch
from torch import nn

from .config import OptimConfig


def build_optimizer(params: Iterable[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("optimizer: no trainable parameters")
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}.get(cfg.name)
    if cls is None:
        raise ValueError(f"optim.name: expected 'adam' or 'adamw', got {cfg.name!r}")
    return cls(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


class WarmupStepLR:
    """The lr factor as a picklable callable (so LambdaLR's state_dict round-trips it)."""

    def __init__(self, iters_per_epoch: int, warmup_iters: int, warmup_ratio: float, milestones: Sequence[int], gamma: float):
        if iters_per_epoch < 1:
            raise ValueError(f"iters_per_epoch: expected >= 1, got {iters_per_epoch}")
        self.iters_per_epoch = int(iters_per_epoch)
        self.warmup_iters = int(warmup_iters)
        self.warmup_ratio = float(warmup_ratio)
        self.milestones = sorted(int(m) for m in milestones)
        self.gamma = float(gamma)

    def __call__(self, it: int) -> float:
        epoch = it // self.iters_per_epoch
        factor = self.gamma ** bisect.bisect_right(self.milestones, epoch)
        if self.warmup_iters > 0 and it < self.warmup_iters:
            factor *= 1.0 - (1.0 - it / self.warmup_iters) * (1.0 - self.warmup_ratio)
        return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, iters_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration LambdaLR: call ``scheduler.step()`` after every optimizer step."""
    fn = WarmupStepLR(iters_per_epoch, cfg.warmup_iters, cfg.warmup_ratio, cfg.milestones, cfg.gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
