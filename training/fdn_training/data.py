"""The data of a training run: slice cache, case-wise train/validation split, resumable batch order.

The slice order of an epoch is a DistributedSampler permutation seeded by (run.seed, epoch); the
augmentation of one slice is seeded by (run.seed, epoch, slice) inside SliceDataset, whatever worker loads
it. So a run resumed mid-epoch sees exactly the batches it would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from fdn_core.data.dataset import SliceDataset
from fdn_core.errors import ConfigError, DataError
from fdn_core.progress import Progress
from fdn_training.distributed import DistInfo, barrier
from fdn_training.rng import worker_init
from fdn_training.trainconfig import TrainConfig

__all__ = ["ResumableBatchSampler", "TrainData", "local_batch_size", "prepare_data", "val_indices"]


class ResumableBatchSampler(Sampler[list[int]]):
    """Batches of one epoch from a DistributedSampler permutation, able to start mid-epoch.

    The permutation depends on (seed, epoch) only, so a resumed run sees the same batches. Incomplete last
    batches are dropped (the image decoder's batch norm and distribution matching need
    several slices). ``set_epoch(epoch, skip_batches)`` selects the epoch and how many batches to skip.
    """

    def __init__(self, n_items: int, batch_size: int, dist: DistInfo, seed: int) -> None:
        self.batch_size = batch_size
        self.sampler = DistributedSampler(
            range(n_items),
            num_replicas=dist.world_size,
            rank=dist.rank,
            shuffle=True,
            seed=seed,
            drop_last=True,
        )
        self.epoch = 0
        self.skip = 0

    @property
    def batches_per_epoch(self) -> int:
        """Full batches of one epoch on this process."""
        return len(self.sampler) // self.batch_size

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select the epoch (its permutation) and how many of its first batches to skip."""
        self.epoch, self.skip = epoch, skip_batches
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        order = list(self.sampler)
        for b in range(self.skip, self.batches_per_epoch):
            yield order[b * self.batch_size : (b + 1) * self.batch_size]

    def __len__(self) -> int:
        return max(self.batches_per_epoch - self.skip, 0)


@dataclass
class TrainData:
    """Datasets and loaders of one process. ``local_batch``: this process's share of the global batch."""

    train_cases: list[str]
    val_cases: list[str]
    train_set: SliceDataset
    val_set: SliceDataset
    sampler: ResumableBatchSampler
    loader: DataLoader
    val_indices: list[int]
    local_batch: int

    @property
    def steps_per_epoch(self) -> int:
        """Generator steps of one epoch."""
        return self.sampler.batches_per_epoch

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Prepare the loader for ``epoch`` (batch order, augmentation draws), skipping its first batches."""
        self.sampler.set_epoch(epoch, skip_batches)
        self.train_set.set_epoch(epoch)


def val_indices(n: int, max_slices: int, dist: DistInfo) -> list[int]:
    """Evenly spread validation indices (at most ``max_slices``), sharded over the processes."""
    if max_slices and n > max_slices:
        chosen = np.unique(np.linspace(0, n - 1, max_slices).round().astype(int)).tolist()
    else:
        chosen = list(range(n))
    return chosen[dist.rank :: dist.world_size]


def _split(cfg: TrainConfig, data_dir: Path, case_ids: list[str]) -> tuple[list[str], list[str]]:
    from fdn_core.data.dataset import split_cases

    if len(case_ids) < 2:
        raise DataError(
            f"{data_dir}: {len(case_ids)} case(s) found; training needs at least 2 (one for validation). "
            "Point --data at a cohort folder (fdn phantom makes one)"
        )
    train_ids, val_ids = split_cases(
        case_ids, (1.0 - cfg.dataset.val_fraction, cfg.dataset.val_fraction), cfg.dataset.split_seed
    )
    if not train_ids or not val_ids:
        raise DataError(
            f"{data_dir}: the case-wise split of {len(case_ids)} cases with dataset.val_fraction="
            f"{cfg.dataset.val_fraction} left an empty side; use more cases or another val_fraction"
        )
    return list(train_ids), list(val_ids)


def local_batch_size(cfg: TrainConfig, dist: DistInfo) -> int:
    """This process's share of ``dataset.batch_size`` (ConfigError unless it divides evenly)."""
    if cfg.dataset.batch_size % dist.world_size:
        raise ConfigError(
            f"dataset.batch_size={cfg.dataset.batch_size} is not divisible by the {dist.world_size} "
            "processes; choose a batch size that is a multiple of --nproc_per_node"
        )
    return cfg.dataset.batch_size // dist.world_size


def prepare_data(
    cfg: TrainConfig,
    data_dir: Path,
    cache_dir: Path,
    dist: DistInfo,
    device: torch.device,
    progress: Progress | None = None,
) -> TrainData:
    """Open (building if needed) the slice cache, split its cases and make this process's loaders.

    Rank 0 builds the cache while the others wait.
    """
    from fdn_core.data.cache import SliceCache

    local_batch = local_batch_size(cfg, dist)
    if dist.is_main:
        cache = SliceCache.build_or_open(data_dir, cache_dir, cfg.preprocess, progress=progress)
    barrier(dist)
    if not dist.is_main:
        cache = SliceCache.build_or_open(data_dir, cache_dir, cfg.preprocess)
    train_ids, val_ids = _split(cfg, data_dir, list(cache.case_ids))
    train_set = SliceDataset(cache, train_ids, augment=cfg.dataset.augment, seed=cfg.run.seed)
    val_set = SliceDataset(cache, val_ids, augment=False)
    sampler = ResumableBatchSampler(len(train_set), local_batch, dist, seed=cfg.run.seed)
    if sampler.batches_per_epoch == 0:
        raise DataError(
            f"{data_dir}: {len(train_set)} training slices make no full batch of {cfg.dataset.batch_size}; "
            "lower dataset.batch_size or add cases"
        )
    loader = DataLoader(
        train_set,
        batch_sampler=sampler,
        num_workers=cfg.run.num_workers,
        worker_init_fn=worker_init,
        generator=torch.Generator().manual_seed(cfg.run.seed),
        pin_memory=device.type == "cuda",
    )
    val_idx = val_indices(len(val_set), cfg.dataset.val_max_slices, dist)
    return TrainData(train_ids, val_ids, train_set, val_set, sampler, loader, val_idx, local_batch)
