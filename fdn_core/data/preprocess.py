"""Per-volume normalisation and axial slicing (notes/fdn-method.md, "Input").

A volume becomes model input in three steps, all invertible for labels:

1. ``zscore_volume``: each channel is z-scored over its brain voxels, defined as the voxels > 0 *in that
   channel* (skull-stripped BraTS / Decathlon images are exactly 0 outside the brain; per channel because
   the four co-registered masks differ by a voxel here and there). Background is set to exactly 0 (the FDN
   authors' code left it at -mean/std; zero is also what the padding and the augmentation fill with).
2. Every axial slice ``volume[..., k]`` (all of them, empty ones included) is zero-padded, centred, from
   (X, Y) to a square (side = max(X, Y)).
3. The square is resized to ``image_size`` (bilinear with antialiasing for images, nearest for labels).

``SliceGeometry`` records the padding and sizes, and maps model-sized slices back (``to_volume``);
``slices_to_volume`` re-stacks label slices onto the original (X, Y, Z) grid, which 3D Dice and the Slicer
module rely on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from fdn_core.errors import ConfigError, DataError

if TYPE_CHECKING:
    from fdn_core.data.readers import CaseVolume

__all__ = [
    "PreprocessConfig",
    "SliceGeometry",
    "SliceStack",
    "class_fractions",
    "slices_to_volume",
    "volume_to_slices",
    "zscore_volume",
]

Mode = Literal["bilinear", "nearest"]


@dataclass(frozen=True)
class PreprocessConfig:
    """Settings that turn a volume into model-ready slices; stored in every bundle and cache.

    image_size: side of the square model input (paper: 256). Slices are padded to square, then resized.
    """

    image_size: int = 128

    def __post_init__(self) -> None:
        if not 64 <= self.image_size <= 256 or self.image_size % 16:
            raise ConfigError(
                f"preprocess.image_size={self.image_size}: must be a multiple of 16 between 64 and 256"
            )


def zscore_volume(image: np.ndarray) -> np.ndarray:
    """Z-score each channel of ``image`` (C,X,Y,Z) over its voxels > 0; every other voxel becomes exactly 0.

    A channel with no voxel > 0 stays all zero; one whose brain voxels are constant becomes 0 there as well.
    Returns a new float32 array.
    """
    image = np.asarray(image)
    if image.ndim != 4:
        raise DataError(f"zscore_volume: expected a (channels, X, Y, Z) array, got shape {image.shape}")
    out = np.zeros_like(image, dtype=np.float32)  # keeps the input's memory layout (see CaseVolume)
    for c in range(image.shape[0]):
        channel = image[c]
        mask = channel > 0
        n = np.count_nonzero(mask)
        if n == 0:
            continue
        mean = channel.sum(where=mask, dtype=np.float64) / n
        dev = np.subtract(channel, mean, dtype=np.float32)
        std = np.sqrt(np.square(dev).sum(where=mask, dtype=np.float64) / n)
        if std > 1e-12:
            np.divide(dev, std, out=out[c], where=mask, dtype=np.float32)
    return out


def _resize(t: torch.Tensor, size: tuple[int, int], mode: Mode) -> torch.Tensor:
    """Resize (N, C, H, W) float tensors; "nearest" uses torch's half-pixel-correct "nearest-exact"
    (legacy "nearest" shifts the grid by half a pixel, which would break the label round trip)."""
    if tuple(t.shape[-2:]) == size:
        return t
    if mode == "nearest":
        return F.interpolate(t, size=size, mode="nearest-exact")
    if mode == "bilinear":
        antialias = size[0] < t.shape[-2] or size[1] < t.shape[-1]
        return F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=antialias)
    raise ValueError(f"unknown resize mode {mode!r}; use 'bilinear' or 'nearest'")


def _as_4d(slices: np.ndarray | torch.Tensor, what: str) -> tuple[torch.Tensor, bool, bool, Any]:
    """(N,H,W) or (N,C,H,W) -> float (N,C,H,W) tensor, plus how to undo it."""
    is_numpy = not isinstance(slices, torch.Tensor)
    t = slices if isinstance(slices, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(slices))
    if t.ndim not in (3, 4):
        raise DataError(f"{what}: expected (N, H, W) or (N, C, H, W) slices, got shape {tuple(t.shape)}")
    squeeze = t.ndim == 3
    dtype = t.dtype
    if squeeze:
        t = t[:, None]
    if not t.is_floating_point():
        t = t.float()  # label values 0..255 are exact in float32
    return t, squeeze, is_numpy, dtype


def _restore(
    t: torch.Tensor, squeeze: bool, is_numpy: bool, dtype: Any, mode: Mode
) -> np.ndarray | torch.Tensor:
    if squeeze:
        t = t[:, 0]
    if mode == "nearest" and t.dtype != dtype:
        t = t.round().to(dtype)
    return t.contiguous().numpy() if is_numpy else t


@dataclass(frozen=True)
class SliceGeometry:
    """How the (X, Y) axial slices of one volume map onto the model's S x S input, and back.

    ``pad_x`` / ``pad_y`` are the zeros added before/after each axis to make the slice square.
    """

    size_x: int
    size_y: int
    pad_x: tuple[int, int]
    pad_y: tuple[int, int]
    image_size: int

    @classmethod
    def for_shape(cls, size_x: int, size_y: int, image_size: int) -> SliceGeometry:
        """Centred padding of an (X, Y) slice to a square, then resizing to ``image_size``."""
        if size_x < 1 or size_y < 1:
            raise DataError(f"slice shape ({size_x}, {size_y}) is empty")
        side = max(size_x, size_y)
        px, py = side - size_x, side - size_y
        return cls(
            int(size_x), int(size_y), (px // 2, px - px // 2), (py // 2, py - py // 2), int(image_size)
        )

    @property
    def side(self) -> int:
        """Side of the padded square (before resizing)."""
        return self.size_x + sum(self.pad_x)

    def to_model(
        self, slices: np.ndarray | torch.Tensor, mode: Mode = "bilinear"
    ) -> np.ndarray | torch.Tensor:
        """(N,[C,]X,Y) slices -> (N,[C,]S,S): pad (zeros), then resize. Labels keep their dtype with
        "nearest"; images come back float. numpy in, numpy out; a torch tensor stays on its device."""
        t, squeeze, is_numpy, dtype = _as_4d(slices, "SliceGeometry.to_model")
        if tuple(t.shape[-2:]) != (self.size_x, self.size_y):
            raise DataError(
                f"SliceGeometry.to_model: slices are {tuple(t.shape[-2:])}, this geometry is for "
                f"({self.size_x}, {self.size_y})"
            )
        t = F.pad(t, (self.pad_y[0], self.pad_y[1], self.pad_x[0], self.pad_x[1]))
        t = _resize(t, (self.image_size, self.image_size), mode)
        return _restore(t, squeeze, is_numpy, dtype, mode)

    def to_volume(
        self, slices: np.ndarray | torch.Tensor, mode: Mode = "nearest"
    ) -> np.ndarray | torch.Tensor:
        """(N,[C,]S,S) model-sized slices -> (N,[C,]X,Y) on the original slice grid (resize, then crop)."""
        t, squeeze, is_numpy, dtype = _as_4d(slices, "SliceGeometry.to_volume")
        if tuple(t.shape[-2:]) != (self.image_size, self.image_size):
            raise DataError(
                f"SliceGeometry.to_volume: slices are {tuple(t.shape[-2:])}, expected "
                f"({self.image_size}, {self.image_size})"
            )
        t = _resize(t, (self.side, self.side), mode)
        t = t[..., self.pad_x[0] : self.pad_x[0] + self.size_x, self.pad_y[0] : self.pad_y[0] + self.size_y]
        return _restore(t, squeeze, is_numpy, dtype, mode)

    def voxel_ml(self, spacing: tuple[float, float, float]) -> float:
        """Volume in mL of one voxel of the model-sized slices of a volume with voxel ``spacing`` (mm)."""
        scale = self.side / self.image_size
        return float(spacing[0] * scale * spacing[1] * scale * spacing[2] / 1000.0)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (stored in cache indexes)."""
        return {
            "size_x": self.size_x,
            "size_y": self.size_y,
            "pad_x": list(self.pad_x),
            "pad_y": list(self.pad_y),
            "image_size": self.image_size,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SliceGeometry:
        """Inverse of ``to_dict``."""
        return cls(
            int(d["size_x"]),
            int(d["size_y"]),
            (int(d["pad_x"][0]), int(d["pad_x"][1])),
            (int(d["pad_y"][0]), int(d["pad_y"][1])),
            int(d["image_size"]),
        )


@dataclass
class SliceStack:
    """All axial slices of one case at model size: images float32 (Z,4,S,S), seg/anat uint8 (Z,S,S);
    ``voxel_ml``: one model-sized voxel's volume in mL (None where the spacing is not known)."""

    images: np.ndarray
    seg: np.ndarray | None
    anat: np.ndarray | None
    geometry: SliceGeometry
    voxel_ml: float | None = None


def volume_to_slices(case: CaseVolume, cfg: PreprocessConfig) -> SliceStack:
    """Z-score the case's image, then pad and resize every axial slice (labels with nearest)."""
    image = zscore_volume(case.image)
    _, size_x, size_y, _ = image.shape
    geometry = SliceGeometry.for_shape(size_x, size_y, cfg.image_size)
    images = geometry.to_model(torch.from_numpy(image).permute(3, 0, 1, 2), "bilinear")
    labels: list[np.ndarray | None] = []
    for vol in (case.seg, case.anat):
        if vol is None:
            labels.append(None)
            continue
        t = torch.from_numpy(np.ascontiguousarray(vol)).permute(2, 0, 1)
        labels.append(geometry.to_model(t, "nearest").numpy())  # type: ignore[union-attr]
    return SliceStack(
        images.contiguous().numpy(),  # type: ignore[union-attr]
        labels[0],
        labels[1],
        geometry,
        geometry.voxel_ml(case.spacing),
    )


def slices_to_volume(
    label_slices: np.ndarray | torch.Tensor, geometry: SliceGeometry, mode: Mode = "nearest"
) -> np.ndarray:
    """Re-stack model-sized slices onto the original grid: (Z,S,S) -> (X,Y,Z), or (Z,C,S,S) -> (C,X,Y,Z).

    Labels use nearest (the inverse of ``volume_to_slices``'s pad and resize); pass ``mode="bilinear"`` for
    images such as reconstructions.
    """
    if isinstance(label_slices, torch.Tensor):
        label_slices = label_slices.detach().cpu().numpy()
    back = geometry.to_volume(np.asarray(label_slices), mode)
    if back.ndim == 3:
        return np.ascontiguousarray(np.transpose(back, (1, 2, 0)))
    return np.ascontiguousarray(np.transpose(back, (1, 2, 3, 0)))


def class_fractions(labels: np.ndarray, classes: Sequence[int], grid: tuple[int, int]) -> np.ndarray:
    """(n, C*h*w) float64: per class of ``classes``, the fraction of each cell of the ``grid`` that label
    slices ``labels`` (n, S, S) give that class (average pooling of the one-hot maps)."""
    lab = torch.from_numpy(np.ascontiguousarray(labels))
    out = np.empty((lab.shape[0], len(classes) * grid[0] * grid[1]), dtype=np.float64)
    for lo in range(0, lab.shape[0], 256):
        chunk = lab[lo : lo + 256]
        onehot = torch.stack([(chunk == c) for c in classes], dim=1).double()
        out[lo : lo + chunk.shape[0]] = (
            F.adaptive_avg_pool2d(onehot, grid).reshape(chunk.shape[0], -1).numpy()
        )
    return out
