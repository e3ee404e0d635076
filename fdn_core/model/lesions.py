"""Post-processing of the model's segmentation: remove predicted lesions smaller than a volume.

The FDN segments each axial slice on its own and leaves scattered specks of false tumour in healthy brains
(``labels.MIN_LESION_ML`` gives the figures). A lesion here is a 3D connected component (26-connectivity,
``scipy.ndimage.label``) of voxels of any abnormal class; a component below the size is removed with all its
classes, so a tumour's necrosis, oedema and enhancing rim stay or go together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from fdn_core.errors import DataError
from fdn_core.labels import MIN_LESION_ML

__all__ = ["LesionCleanup", "check_min_lesion_ml", "remove_small_lesions"]

_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)


@dataclass(frozen=True)
class LesionCleanup:
    """What ``remove_small_lesions`` did: the size rule, the lesions kept and removed, and their volumes."""

    min_ml: float
    kept: int
    removed: int
    kept_ml: float
    removed_ml: float

    def describe(self) -> str:
        """One line for a status bar or a report."""
        if self.min_ml <= 0:
            return f"{self.kept} predicted lesion(s), {self.kept_ml:.1f} mL (no size filter)"
        return (
            f"{self.kept} predicted lesion(s) of at least {self.min_ml:g} mL ({self.kept_ml:.1f} mL); "
            f"{self.removed} smaller one(s) removed ({self.removed_ml:.2f} mL)"
        )


def check_min_lesion_ml(min_ml: float) -> None:
    """Refuse a minimum lesion size that is not a finite number of mL >= 0 (a ``DataError`` naming it)."""
    if not (isinstance(min_ml, (int, float)) and math.isfinite(min_ml) and min_ml >= 0):
        raise DataError(
            f"the minimum lesion size must be a finite number of mL >= 0 (0 keeps all), got {min_ml}"
        )


def remove_small_lesions(
    labels: np.ndarray, voxel_ml: float, min_ml: float = MIN_LESION_ML
) -> tuple[np.ndarray, LesionCleanup]:
    """``labels`` (any 3D label array, 0 = background) without the lesions smaller than ``min_ml`` mL, and
    what was removed. ``voxel_ml`` is one voxel's volume in mL; ``min_ml`` = 0 keeps everything."""
    arr = np.asarray(labels)
    if arr.ndim != 3:
        raise DataError(f"remove_small_lesions: expected a 3D label array, got shape {arr.shape}")
    check_min_lesion_ml(min_ml)
    if not (math.isfinite(voxel_ml) and voxel_ml > 0):
        raise DataError(f"the voxel volume must be a positive number of mL, got {voxel_ml}")
    components, n = ndimage.label(arr > 0, structure=_CONNECTIVITY)
    sizes = np.bincount(components.ravel(), minlength=n + 1)[1:] * float(voxel_ml)
    small = sizes < min_ml
    cleanup = LesionCleanup(
        float(min_ml),
        int(np.count_nonzero(~small)),
        int(np.count_nonzero(small)),
        float(sizes[~small].sum()),
        float(sizes[small].sum()),
    )
    if not small.any():
        return arr, cleanup
    drop = np.concatenate([[False], small])[components]
    out = arr.copy()
    out[drop] = 0
    return out, cleanup
