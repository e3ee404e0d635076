"""Per-volume normalisation and axial slicing (notes/fdn-method.md, "Input")."""

from __future__ import annotations

from dataclasses import dataclass

from fdn_core.errors import ConfigError

__all__ = ["PreprocessConfig"]


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
