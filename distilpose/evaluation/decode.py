"""Heatmap decoding and flip helpers of the evaluation pipeline (mmpose's argmax / DARK decode
and flip_back with the one-pixel shift come from ``distilpose_kernels``)."""
from __future__ import annotations

from typing import Sequence, Tuple

import torch

import distilpose_kernels as dk


def decode_heatmaps(heatmaps: torch.Tensor, method: str = "dark", kernel: int = 11) -> Tuple[torch.Tensor, torch.Tensor]:
    """(N, K, H, W) -> coords (N, K, 2) heatmap px, maxvals (N, K) (``dk.decode_heatmaps``)."""
    coords, maxvals = dk.decode_heatmaps(heatmaps, method=method, kernel=kernel)
    return coords, maxvals.reshape(coords.shape[0], coords.shape[1])


def flip_heatmaps(heatmaps: torch.Tensor, flip_pairs: Sequence[Tuple[int, int]], shift: bool = True) -> torch.Tensor:
    """Heatmaps predicted on the mirrored crop, mapped back (``dk.flip_heatmaps``)."""
    return dk.flip_heatmaps(heatmaps, flip_pairs, shift=shift)


def flip_regression(coords: torch.Tensor, flip_pairs: Sequence[Tuple[int, int]]) -> torch.Tensor:
    """Normalised coords (N, K, 2) predicted on the mirrored crop -> original crop: x' = 1 - x, swap pairs."""
    perm = list(range(coords.shape[1]))
    for a, b in flip_pairs:
        perm[a], perm[b] = b, a
    out = coords[:, perm].clone()
    out[..., 0] = 1.0 - out[..., 0]
    return out


def swap_pairs(t: torch.Tensor, flip_pairs: Sequence[Tuple[int, int]]) -> torch.Tensor:
    perm = list(range(t.shape[1]))
    for a, b in flip_pairs:
        perm[a], perm[b] = b, a
    return t[:, perm]


__all__ = ["decode_heatmaps", "flip_heatmaps", "flip_regression", "swap_pairs"]
