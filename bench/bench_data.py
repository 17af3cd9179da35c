"""Teacher-training data benchmarks: what a data worker spends per sample, and the per-batch
targets on the training device.

A teacher run used to build each sample's 17 Gaussian heatmaps in the workers (mmpose's way, there
with a numpy loop per keypoint) and copy them to the GPU: 13 MB per batch of 64. With
``data.heatmap_targets="device"`` (the trainer's default) the workers send keypoints and the step
makes the batch's maps in one ``gaussian_heatmap_targets`` call.

- ``test_teacher_sample_cpu``: one augmented 256 x 192 sample of the embedded demo set (JPEG read,
  affine warp, normalisation, targets) per mode: "keypoints" (device targets: no maps in the
  worker) and "heatmaps" (the maps built in the worker: the op's CPU path).
- ``test_batch_targets``: one batch's targets (N = 64) where the trainer makes them: CPU (the
  vectorised PyTorch path) and CUDA (the extension's kernel; ``bench_heatmap.py`` has the
  kernel-vs-numpy-loop goal).

    pytest bench/bench_data.py --benchmark-only
"""
from __future__ import annotations

import pytest
import torch

import distilpose_kernels as dk
from distilpose.data import TopDownCocoDataset, generate_demo_dataset

from benchutils import run_benchmark

SAMPLES = 16  # per timed round (the demo images differ in size and people)
MODES = ("keypoints", "heatmaps")


@pytest.fixture(scope="module")
def demo_paths(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("demo"))
    return generate_demo_dataset(root, num_train=SAMPLES, num_val=1, seed=0, num_workers=1)


@pytest.mark.parametrize("mode", MODES)
def test_teacher_sample_cpu(benchmark, demo_paths, mode):
    ds = TopDownCocoDataset(demo_paths["train_ann"], demo_paths["train_images"], train=True, aug="teacher",
                            with_heatmaps=mode != "keypoints", heatmap_keypoints=mode == "keypoints", seed=0)
    n = min(SAMPLES, len(ds))

    def samples():
        return [ds[i] for i in range(n)]

    out = run_benchmark(benchmark, samples, device="cpu", rounds=15, op="teacher sample", impl=mode, samples=n)
    assert ("heatmaps" in out[0]) == (mode != "keypoints")
    median = getattr(getattr(benchmark, "stats", None), "stats", None)
    if median is not None:
        benchmark.extra_info["ms_per_sample"] = median.median / n * 1e3


DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
def test_batch_targets(benchmark, device, n=64):
    g = torch.Generator().manual_seed(0)
    kp = (torch.rand(n, 17, 2, generator=g) * torch.tensor([192.0, 256.0])).to(device)
    vis = (torch.rand(n, 17, generator=g) > 0.2).float().to(device)
    targets = dk.GaussianHeatmapTargets((256, 192), (64, 48), 2.0, "unbiased")
    hm, _ = run_benchmark(benchmark, lambda: targets(kp, vis), device=device, bytes_moved=n * 17 * 64 * 48 * 4,
                          op="teacher targets per batch", impl="auto", n=n)
    assert hm.shape == (n, 17, 64, 48) and float(hm.sum()) > 0
