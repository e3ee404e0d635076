"""Regional maximum activation of convolutions (R-MAC; Tolias et al. 2016), as Y-Net aggregates its core
features (seed 004, section III-C).

Regions: for scales ``s = 0 .. S-1``, squares of side ``R_s = 2 min(H, W) / (s + 2)`` (seed 004, eq. 1),
placed on a regular grid so that neighbouring squares overlap by as close to 40 % as possible (1 square when
it covers the shorter side). On an 8x8 map with S = 3 that is 1 + 4 + 9 = 14 regions, as in seed 004.
Descriptor: each region is max-pooled to a C-vector and L2-normalised, the region vectors are summed and the
sum is L2-normalised (Tolias et al.; seed 004: "sum-aggregated and L2-normalized").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fdn_core.errors import ConfigError

__all__ = ["rmac", "rmac_regions"]

_OVERLAP = 0.4


def _positions(length: int, side: int) -> list[int]:
    """Start offsets of squares of ``side`` along an axis of ``length`` with overlap closest to 40 %."""
    if side >= length:
        return [0]
    best: tuple[float, int] | None = None
    for n in range(2, length - side + 2):
        step = (length - side) / (n - 1)
        overlap = (side - step) / side
        if best is None or abs(overlap - _OVERLAP) < best[0] - 1e-12:
            best = (abs(overlap - _OVERLAP), n)
    assert best is not None
    n = best[1]
    step = (length - side) / (n - 1)
    return sorted({round(i * step) for i in range(n)})


def rmac_regions(height: int, width: int, scales: int = 3) -> list[tuple[int, int, int, int]]:
    """R-MAC regions of an ``height`` x ``width`` map as (row0, row1, col0, col1) half-open boxes."""
    if height < 1 or width < 1 or scales < 1:
        raise ConfigError(f"rmac_regions: map {height}x{width} and scales {scales} must be positive")
    regions: list[tuple[int, int, int, int]] = []
    short = min(height, width)
    for s in range(scales):
        side = max(1, round(2 * short / (s + 2)))
        side = min(side, short)
        for r in _positions(height, side):
            for c in _positions(width, side):
                regions.append((r, r + side, c, c + side))
    return list(dict.fromkeys(regions))


def rmac(features: torch.Tensor, scales: int = 3, eps: float = 1e-6) -> torch.Tensor:
    """R-MAC descriptor (B, C) of feature maps (B, C, H, W) (module docstring)."""
    if features.ndim != 4:
        raise ConfigError(f"rmac: expected (B, C, H, W) features, got {tuple(features.shape)}")
    _, _, h, w = features.shape
    total = torch.zeros(features.shape[:2], dtype=features.dtype, device=features.device)
    for r0, r1, c0, c1 in rmac_regions(h, w, scales):
        region = features[:, :, r0:r1, c0:c1].amax(dim=(2, 3))
        total = total + F.normalize(region, dim=1, eps=eps)
    return F.normalize(total, dim=1, eps=eps)
