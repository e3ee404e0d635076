"""Typed views of the parts of nibabel and SimpleITK that the readers call.

Neither library ships type annotations for these functions, so a strict type check sees every call as an
untyped call. The protocols below state the signatures the readers rely on (as documented by the
libraries), and the accessors return the modules seen through them: one checked cast each instead of an
ignore comment per call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, cast

import nibabel as nib
import numpy as np

__all__ = [
    "Nifti1Image",
    "NiftiHeader",
    "Orientations",
    "SimpleITK",
    "SitkImage",
    "SitkImageFileReader",
    "SitkImageSeriesReader",
    "nifti1_image",
    "nifti_header",
    "orientations",
    "simpleitk",
]


class Orientations(Protocol):
    """``nibabel.orientations``: orientation arrays are (n_axes, 2) float arrays of (axis, flip)."""

    def io_orientation(self, affine: np.ndarray, tol: float | None = None) -> np.ndarray: ...

    def ornt_transform(self, start_ornt: np.ndarray, end_ornt: np.ndarray) -> np.ndarray: ...

    def axcodes2ornt(self, axcodes: Sequence[str]) -> np.ndarray: ...

    def apply_orientation(self, arr: np.ndarray, ornt: np.ndarray) -> np.ndarray: ...

    def inv_ornt_aff(self, ornt: np.ndarray, shape: Sequence[int]) -> np.ndarray: ...


class NiftiHeader(Protocol):
    """The header methods of a NIfTI image used here."""

    def get_data_dtype(self) -> np.dtype[np.generic]: ...

    def set_xyzt_units(self, xyz: str | None = None, t: str | None = None) -> None: ...


class Nifti1Image(Protocol):
    """A ``nibabel.Nifti1Image`` as written by the readers."""

    @property
    def header(self) -> NiftiHeader: ...

    def set_qform(self, affine: np.ndarray | None, code: int | str | None = None) -> None: ...

    def set_sform(self, affine: np.ndarray | None, code: int | str | None = None) -> None: ...

    def to_bytes(self) -> bytes: ...


class _Nifti1ImageType(Protocol):
    def __call__(self, dataobj: np.ndarray, affine: np.ndarray | None) -> Nifti1Image: ...


class SitkImage(Protocol):
    """A ``SimpleITK.Image`` (geometry in ITK's LPS physical space)."""

    def GetOrigin(self) -> tuple[float, ...]: ...

    def GetSpacing(self) -> tuple[float, ...]: ...

    def GetDirection(self) -> tuple[float, ...]: ...

    def GetDimension(self) -> int: ...

    def GetSizeOfPixelComponent(self) -> int: ...


class SitkImageFileReader(Protocol):
    """A ``SimpleITK.ImageFileReader`` (``ReadImageInformation`` reads the header only)."""

    def SetFileName(self, fn: str) -> None: ...

    def ReadImageInformation(self) -> None: ...

    def GetSize(self) -> tuple[int, ...]: ...

    def GetOrigin(self) -> tuple[float, ...]: ...

    def GetSpacing(self) -> tuple[float, ...]: ...

    def GetDirection(self) -> tuple[float, ...]: ...

    def GetNumberOfComponents(self) -> int: ...

    def GetPixelID(self) -> int: ...


class SitkImageSeriesReader(Protocol):
    """A ``SimpleITK.ImageSeriesReader`` instance."""

    def SetFileNames(self, fns: Sequence[str]) -> None: ...

    def Execute(self) -> SitkImage: ...


class _SeriesReaderType(Protocol):
    def __call__(self) -> SitkImageSeriesReader: ...

    def GetGDCMSeriesIDs(self, directory: str) -> tuple[str, ...]: ...

    def GetGDCMSeriesFileNames(self, directory: str, seriesID: str) -> tuple[str, ...]: ...


class SimpleITK(Protocol):
    """The ``SimpleITK`` module functions used by the readers."""

    def ImageFileReader(self) -> SitkImageFileReader: ...

    @property
    def ImageSeriesReader(self) -> _SeriesReaderType: ...

    def Image(self, size: Sequence[int], pixel_id: int) -> SitkImage: ...

    def ReadImage(self, fileName: str) -> SitkImage: ...

    def GetArrayFromImage(self, image: SitkImage) -> np.ndarray: ...


def orientations() -> Orientations:
    """``nibabel.orientations``, typed."""
    return cast(Orientations, nib.orientations)


def nifti1_image(dataobj: np.ndarray, affine: np.ndarray | None) -> Nifti1Image:
    """``nibabel.Nifti1Image(dataobj, affine)``, typed."""
    return cast(_Nifti1ImageType, nib.Nifti1Image)(dataobj, affine)


def nifti_header(header: object) -> NiftiHeader:
    """A loaded NIfTI image's header, typed."""
    return cast(NiftiHeader, header)


def simpleitk() -> SimpleITK:
    """The ``SimpleITK`` module (imported on first use: it is only needed for NRRD, MetaImage, DICOM)."""
    import SimpleITK as sitk

    return cast(SimpleITK, sitk)
