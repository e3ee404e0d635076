"""Slices for the baselines' training, read from the FDN's slice cache (``fdn_core.data.cache.SliceCache``),
so
the baselines see exactly the FDN's preprocessed slices (z-scored, padded, resized to ``image_size``).

Per cache row we keep the case, the relative axial level (slice index / (depth - 1)) and the lesion-class
set (bit c-1 set when abnormal class c occurs; 0 = no lesion). Training rows are the training cases' slices
with at least ``min_brain_fraction`` of brain pixels; validation rows the validation cases' slices (same
filter), subsampled evenly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fdn_core.data.cache import SliceCache
from fdn_core.data.dataset import split_cases
from fdn_core.data.preprocess import PreprocessConfig
from fdn_core.errors import DataError
from fdn_core.progress import Progress

__all__ = ["BaselineSlices", "augment_with_labels", "class_set_of_labels", "open_slices"]


def class_set_of_labels(seg: np.ndarray) -> np.ndarray:
    """(N,) int64 lesion-class-set codes of label slices (N, H, W) with classes 0..3."""
    flat = seg.reshape(seg.shape[0], -1)
    out = np.zeros(seg.shape[0], dtype=np.int64)
    for c in (1, 2, 3):
        out |= (flat == c).any(axis=1).astype(np.int64) << (c - 1)
    return out


@dataclass
class BaselineSlices:
    """Training / validation rows of a slice cache with their level and lesion-class set."""

    cache: SliceCache
    train_cases: list[str]
    val_cases: list[str]
    train_rows: np.ndarray
    val_rows: np.ndarray
    level: np.ndarray
    class_set: np.ndarray
    row_case: np.ndarray

    def images(self, rows: np.ndarray) -> torch.Tensor:
        """(B, 4, S, S) float32 slices of cache ``rows``."""
        order = np.argsort(rows)
        out = np.empty((len(rows), *self.cache.images.shape[1:]), dtype=np.float32)
        out[order] = np.asarray(self.cache.images[np.asarray(rows)[order]], dtype=np.float32)
        return torch.from_numpy(out)

    def labels(self, rows: np.ndarray) -> torch.Tensor:
        """(B, S, S) int64 abnormal labels of cache ``rows``."""
        return torch.from_numpy(np.asarray(self.cache.seg[np.asarray(rows)], dtype=np.int64))

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` training rows drawn uniformly with replacement."""
        return self.train_rows[rng.integers(0, self.train_rows.size, n)]

    def partners(self, rng: np.random.Generator, rows: np.ndarray, tolerance: float) -> np.ndarray:
        """For each row, a random training row of another case with the same lesion-class set and a level at
        most ``tolerance`` away (itself when none exists)."""
        out = rows.copy()
        tr = self.train_rows
        for i, r in enumerate(rows):
            ok = (
                (self.class_set[tr] == self.class_set[r])
                & (np.abs(self.level[tr] - self.level[r]) <= tolerance)
                & (self.row_case[tr] != self.row_case[r])
            )
            candidates = tr[ok]
            if candidates.size:
                out[i] = candidates[rng.integers(0, candidates.size)]
        return out


def open_slices(
    data_dir: Path,
    cache_dir: Path,
    image_size: int,
    val_fraction: float,
    split_seed: int,
    min_brain_fraction: float,
    val_slices: int,
    progress: Progress | None = None,
) -> BaselineSlices:
    """Build or open the slice cache of ``data_dir`` and select training and validation rows."""
    cache = SliceCache.build_or_open(data_dir, cache_dir, PreprocessConfig(image_size), progress=progress)
    ids = list(cache.case_ids)
    if len(ids) < 2:
        raise DataError(f"{data_dir}: {len(ids)} case(s); training needs at least 2 (one for validation)")
    train_ids, val_ids = split_cases(ids, (1.0 - val_fraction, val_fraction), split_seed)
    n = len(cache)
    level = np.zeros(n, dtype=np.float64)
    row_case = np.asarray(cache.slice_case, dtype=np.int64)
    for cid in ids:
        c = cache.case(cid)
        depth = max(c.stop - c.start, 2)
        level[c.start : c.stop] = np.asarray(cache.slice_index[c.start : c.stop], dtype=np.float64) / (
            depth - 1
        )
    class_set = np.zeros(n, dtype=np.int64)
    brain = np.zeros(n, dtype=np.float64)
    chunk = 2048
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        class_set[start:stop] = class_set_of_labels(np.asarray(cache.seg[start:stop]))
        img = np.asarray(cache.images[start:stop])
        brain[start:stop] = (img != 0).any(axis=1).reshape(stop - start, -1).mean(axis=1)
    keep = brain >= min_brain_fraction

    def rows_of(case_ids: list[str]) -> np.ndarray:
        parts = [np.arange(cache.case(c).start, cache.case(c).stop) for c in case_ids]
        rows = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        return rows[keep[rows]]

    train_rows, val_rows = rows_of(list(train_ids)), rows_of(list(val_ids))
    if train_rows.size == 0 or val_rows.size == 0:
        raise DataError(f"{data_dir}: no training or validation slice shows brain; check the cohort")
    if val_rows.size > val_slices:
        val_rows = val_rows[np.unique(np.linspace(0, val_rows.size - 1, val_slices).round().astype(int))]
    return BaselineSlices(
        cache, list(train_ids), list(val_ids), train_rows, val_rows, level, class_set, row_case
    )


def augment_with_labels(
    images: torch.Tensor,
    labels: torch.Tensor,
    gen: torch.Generator,
    flip_prob: float,
    max_rotation_deg: float,
    scale_range: tuple[float, float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-right flip, rotation and isotropic scaling of a batch (bilinear images, nearest labels, zero
    fill): the FDN's training augmentation, batched. Rows of the slice are the left-right axis."""
    b = images.shape[0]
    angle = (torch.rand(b, generator=gen) * 2 - 1) * math.radians(max_rotation_deg)
    scale = scale_range[0] + (scale_range[1] - scale_range[0]) * torch.rand(b, generator=gen)
    flip = torch.where(torch.rand(b, generator=gen) < flip_prob, -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.zeros((b, 2, 3))
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin * flip
    theta[:, 1, 0], theta[:, 1, 1] = sin, cos * flip
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    lab = F.grid_sample(
        labels[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False
    )
    return out, lab[:, 0].round().long()
