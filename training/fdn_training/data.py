"""The data of a training run: slice cache, case-wise train/validation split, resumable batch order.

The slice order of an epoch is a DistributedSampler permutation seeded by (run.seed, epoch) (``sampling.mode``
uniform) or a weighted draw with replacement seeded by (run.seed, epoch) (``weighted``: fixed shares of
empty, brain and tumour slices, see ``SamplingConfig``); the augmentation of one slice is seeded by
(run.seed, epoch, slice) inside SliceDataset, whatever worker loads it. So a run resumed mid-epoch sees
exactly the batches it would have seen.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from fdn_core.data.dataset import SliceDataset
from fdn_core.errors import ConfigError, DataError
from fdn_core.progress import Progress
from fdn_training.distributed import DistInfo, barrier
from fdn_training.rng import derive_seed, worker_init
from fdn_training.trainconfig import SamplingConfig, TrainConfig

__all__ = [
    "ResumableBatchSampler",
    "TrainData",
    "local_batch_size",
    "prepare_data",
    "sampling_weights",
    "slice_groups",
    "val_indices",
]

log = logging.getLogger("fdn_training.train")

#: Salt of the weighted epoch draws' seeds (keeps them apart from every other stream derived from run.seed).
_DRAW_SALT = 0x5A3D


def slice_groups(
    images: np.ndarray, abnormal: np.ndarray, rows: np.ndarray, min_brain_fraction: float, chunk: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """(empty, tumour) bool arrays over cache ``rows``: a slice is empty when fewer than
    ``min_brain_fraction`` of its pixels are non-zero in any channel (the z-scored background is exactly 0);
    tumour = it has an abnormal label. ``images`` (N, C, S, S) may be a memory map: read in chunks."""
    rows = np.asarray(rows, dtype=np.int64)
    empty = np.zeros(len(rows), dtype=bool)
    for start in range(0, len(rows), chunk):
        part = np.asarray(images[rows[start : start + chunk]])
        brain = (part != 0).any(axis=1).reshape(len(part), -1).mean(axis=1)
        empty[start : start + chunk] = brain < min_brain_fraction
    return empty, np.asarray(abnormal, dtype=bool)[rows] & ~empty


def sampling_weights(empty: np.ndarray, tumour: np.ndarray, cfg: SamplingConfig) -> np.ndarray:
    """Per-slice draw probabilities giving the groups empty / tumour / brain-without-tumour the shares of
    ``cfg`` (a group that has no slice gives its share to the others, proportionally). Sums to 1."""
    groups = {"empty": empty, "tumour": tumour & ~empty, "brain": ~empty & ~tumour}
    shares = {
        "empty": cfg.empty_share,
        "tumour": cfg.tumour_share,
        "brain": max(0.0, 1.0 - cfg.empty_share - cfg.tumour_share),
    }
    present = {g: int(m.sum()) for g, m in groups.items()}
    total = sum(shares[g] for g in groups if present[g])
    if total <= 0:  # every present group has share 0: nothing else to go by
        return np.full(len(empty), 1.0 / len(empty))
    weights = np.zeros(len(empty), dtype=np.float64)
    for g, mask in groups.items():
        if present[g]:
            weights[mask] = shares[g] / total / present[g]
    normalised: np.ndarray = weights / weights.sum()
    return normalised


class ResumableBatchSampler(Sampler[list[int]]):
    """Batches of one epoch, able to start mid-epoch.

    Without ``weights``: a DistributedSampler permutation (every item once per epoch). With ``weights``
    (per-item probabilities): as many items as the permutation would give, drawn with replacement from
    a numpy generator seeded by (seed, epoch), the global draw split over the processes rank by rank.
    Either way the order depends on (seed, epoch) only, so a resumed run sees the same batches. Incomplete
    last batches are dropped (the image decoder's batch norm and distribution matching need
    several slices). ``set_epoch(epoch, skip_batches)`` selects the epoch and how many batches to skip.
    """

    def __init__(
        self, n_items: int, batch_size: int, dist: DistInfo, seed: int, weights: np.ndarray | None = None
    ) -> None:
        self.batch_size = batch_size
        self.n_items, self.seed, self.dist = n_items, seed, dist
        self.weights = None
        if weights is not None:
            w = np.asarray(weights, dtype=np.float64)
            if w.shape != (n_items,) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
                raise ValueError(
                    f"weights: expected {n_items} finite non-negative numbers with a positive sum"
                )
            self.weights = w / w.sum()
        self.sampler: DistributedSampler[int] = DistributedSampler(
            range(n_items),  # type: ignore[arg-type]  # a Sized is all the sampler uses
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

    def epoch_order(self) -> list[int]:
        """This process's items of the current epoch, in order (batches are consecutive runs of it)."""
        if self.weights is None:
            return list(self.sampler)
        per_rank = self.batches_per_epoch * self.batch_size
        rng = np.random.default_rng(derive_seed(self.seed, self.epoch, _DRAW_SALT))
        draws = rng.choice(self.n_items, size=per_rank * self.dist.world_size, p=self.weights)
        return [int(i) for i in draws[self.dist.rank :: self.dist.world_size]]

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select the epoch (its permutation) and how many of its first batches to skip."""
        self.epoch, self.skip = epoch, skip_batches
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        order = self.epoch_order()
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
    loader: DataLoader[Any]
    val_indices: list[int]
    local_batch: int
    sampling: dict[str, Any] = field(default_factory=dict)

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
        chosen: list[int] = np.unique(np.linspace(0, n - 1, max_slices).round().astype(int)).tolist()
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
    workers = min(8, os.cpu_count() or 1)  # threads reading cases: a large cohort on a many-core machine
    if dist.is_main:
        cache = SliceCache.build_or_open(
            data_dir, cache_dir, cfg.preprocess, progress=progress, workers=workers
        )
    barrier(dist)
    if not dist.is_main:
        cache = SliceCache.build_or_open(data_dir, cache_dir, cfg.preprocess)
    train_ids, val_ids = _split(cfg, data_dir, list(cache.case_ids))
    train_set = SliceDataset(cache, train_ids, augment=cfg.dataset.augment, seed=cfg.run.seed)
    val_set = SliceDataset(cache, val_ids, augment=False)
    sc = cfg.sampling
    empty, tumour = slice_groups(cache.images, cache.abnormal, train_set.rows, sc.min_brain_fraction)
    weights = sampling_weights(empty, tumour, sc) if sc.mode == "weighted" else None
    sampler = ResumableBatchSampler(len(train_set), local_batch, dist, seed=cfg.run.seed, weights=weights)
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
    summary = _sampling_summary(empty, tumour, weights)
    return TrainData(train_ids, val_ids, train_set, val_set, sampler, loader, val_idx, local_batch, summary)


def _sampling_summary(empty: np.ndarray, tumour: np.ndarray, weights: np.ndarray | None) -> dict[str, Any]:
    """The groups' counts and their expected shares of the draws under uniform and the run's sampling."""
    n = len(empty)
    groups = {"empty": empty, "tumour": tumour, "brain": ~empty & ~tumour}
    uniform = {g: float(m.sum()) / n for g, m in groups.items()}
    drawn = uniform if weights is None else {g: float(weights[m].sum()) for g, m in groups.items()}
    return {
        "slices": n,
        "counts": {g: int(m.sum()) for g, m in groups.items()},
        "uniform_shares": uniform,
        "expected_shares": drawn,
        "mode": "uniform" if weights is None else "weighted",
    }
