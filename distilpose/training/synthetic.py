"""A tiny synthetic top-down dataset with the batch layout of distilpose.data (tests and smoke runs).

Each sample is a dark crop with one coloured disc per keypoint; keypoints come from the sample
index (fixed), and training samples get a random shift drawn from the global torch RNG, so the
trainer's per-sample seeding and resume logic are exercised exactly as with real augmentation.
"""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset


class SyntheticPoseDataset(Dataset):
    def __init__(
        self,
        num_samples: int,
        input_size: Tuple[int, int] = (64, 48),
        num_keypoints: int = 17,
        train: bool = True,
        with_heatmaps: bool = True,
        seed: int = 0,
        sigma: float = 2.0,
    ):
        self.num_samples = int(num_samples)
        self.input_size = tuple(input_size)
        self.heatmap_size = (self.input_size[0] // 4, self.input_size[1] // 4)
        self.num_keypoints = num_keypoints
        self.train = train
        self.with_heatmaps = with_heatmaps
        self.seed = seed
        self.sigma = sigma
        rng = np.random.default_rng(seed)
        self.colors = rng.uniform(-1.5, 2.0, size=(num_keypoints, 3)).astype(np.float32)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> Dict[str, object]:
        h, w = self.input_size
        k = self.num_keypoints
        rng = np.random.default_rng([self.seed, int(idx)])
        xy = rng.uniform(0.15, 0.85, size=(k, 2)) * np.array([w - 1, h - 1])
        vis = (rng.random(k) > 0.1).astype(np.float32)
        if self.train:  # augmentation from the global RNG (made reproducible by the trainer's seeding)
            shift = (torch.rand(2) * 2 - 1).numpy() * np.array([w, h]) * 0.08
            xy = xy + shift
        img = np.full((3, h, w), -1.8, np.float32)
        yy, xx = np.mgrid[0:h, 0:w]
        for j in range(k):
            if vis[j] > 0:
                disc = (xx - xy[j, 0]) ** 2 + (yy - xy[j, 1]) ** 2 <= 4.0
                img[:, disc] = self.colors[j][:, None]
        inside = (xy[:, 0] >= 0) & (xy[:, 0] <= w - 1) & (xy[:, 1] >= 0) & (xy[:, 1] <= h - 1)
        weight = (vis * inside).astype(np.float32)[:, None]
        sample: Dict[str, object] = {
            "img": torch.from_numpy(img),
            "target_coords": torch.from_numpy((xy / np.array([w, h])).astype(np.float32)),
            "target_weight": torch.from_numpy(weight),
            "meta": {
                "center": torch.tensor([w / 2, h / 2], dtype=torch.float64),
                "scale": torch.tensor([w, h], dtype=torch.float64),
                "rotation": torch.tensor(0.0),
                "image_id": torch.tensor(int(idx), dtype=torch.int64),
                "bbox_score": torch.tensor(1.0),
                "area": torch.tensor(float(w * h)),
                "flipped": torch.tensor(False),
            },
        }
        if self.with_heatmaps:
            hh, hw = self.heatmap_size
            mu = xy / 4.0
            gy, gx = np.mgrid[0:hh, 0:hw]
            hm = np.exp(-((gx[None] - mu[:, 0, None, None]) ** 2 + (gy[None] - mu[:, 1, None, None]) ** 2) / (2 * self.sigma**2))
            sample["heatmaps"] = torch.from_numpy(hm.astype(np.float32))
            sample["heatmap_weight"] = torch.from_numpy(weight.copy())
        return sample
