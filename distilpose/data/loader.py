"""DataLoader construction: workers, pinned memory, deterministic seeding, DistributedSampler."""
from __future__ import annotations

import random
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler


def seed_worker(worker_id: int) -> None:
    """worker_init_fn: seed numpy/random and the dataset's augmentation RNG from torch's worker seed.

    torch derives each worker's seed from the loader's generator, so a fixed ``seed`` gives the
    same augmentation every run (for a given number of workers).
    """
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    info = torch.utils.data.get_worker_info()
    ds = info.dataset if info is not None else None
    if ds is not None and hasattr(ds, "reseed"):
        ds.reseed(torch.initial_seed())


def build_dataloader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int = 0,
    seed: int = 0,
    distributed: bool = False,
    drop_last: Optional[bool] = None,
    pin_memory: Optional[bool] = None,
    persistent_workers: Optional[bool] = None,
    prefetch_factor: Optional[int] = None,
) -> DataLoader:
    """A DataLoader for the top-down datasets.

    drop_last defaults to ``shuffle`` (training). pin_memory defaults to CUDA availability.
    distributed=True uses a DistributedSampler (rank/world size from torch.distributed); call
    ``loader.sampler.set_epoch(epoch)`` (or :func:`set_epoch`) every epoch.
    With ``num_workers=0`` the dataset's augmentation RNG is reseeded from ``seed`` here.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers: expected >= 0, got {num_workers}")
    drop_last = bool(shuffle) if drop_last is None else drop_last
    pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    sampler = None
    if distributed:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise RuntimeError("distributed=True needs torch.distributed to be initialised (torchrun + init_process_group)")
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=int(seed), drop_last=drop_last)
        rank = torch.distributed.get_rank()
    else:
        rank = 0
    if num_workers == 0 and hasattr(dataset, "reseed"):
        dataset.reseed(int(seed) * 1000003 + rank)
    kwargs = {}
    if num_workers > 0:
        kwargs["persistent_workers"] = True if persistent_workers is None else persistent_workers
        if prefetch_factor is not None:
            kwargs["prefetch_factor"] = prefetch_factor
    if distributed:  # different augmentation streams per rank
        generator.manual_seed(int(seed) + 7919 * rank)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=(shuffle and sampler is None),
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        worker_init_fn=seed_worker,
        generator=generator,
        **kwargs,
    )


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Forward the epoch to a DistributedSampler (no-op otherwise)."""
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
