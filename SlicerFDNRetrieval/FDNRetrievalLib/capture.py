"""Main-thread step of reading a study: copy the four selected volume nodes out of the scene.

Kept apart from ``scene`` so that the panel can do it before anything heavy is imported: this module loads
only numpy, VTK, Slicer and fdn_core's vocabulary; checking every voxel and resampling happen later in
``scene.assemble_study``, in the worker thread.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import slicer
import vtk

from fdn_core.errors import DataError
from fdn_core.labels import MODALITIES

from .naming import SEQUENCE_LABELS, describe_missing

__all__ = ["CapturedStudy", "CapturedVolume", "capture_study", "node_ijk_to_ras"]


def node_ijk_to_ras(node: Any) -> np.ndarray:
    """The node's voxel-to-world matrix (4, 4), including a linear parent transform."""
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    ijk_to_ras = slicer.util.arrayFromVTKMatrix(matrix)
    transform = node.GetParentTransformNode()
    if transform is not None:
        if not transform.IsTransformToWorldLinear():
            raise DataError(
                f"volume '{node.GetName()}' is under a non-linear transform '{transform.GetName()}'; "
                "harden the "
                "transform (Data module, right-click > Harden transform) and try again"
            )
        to_world = vtk.vtkMatrix4x4()
        transform.GetMatrixTransformToWorld(to_world)
        ijk_to_ras = slicer.util.arrayFromVTKMatrix(to_world) @ ijk_to_ras
    return np.asarray(ijk_to_ras, dtype=np.float64)


@dataclass
class CapturedVolume:
    """One sequence copied out of its node (main thread): raw voxels ``(K, J, I)`` as stored, grid, name."""

    key: str
    name: str
    voxels_kji: np.ndarray
    ijk_to_ras: np.ndarray

    @property
    def label(self) -> str:
        """Human-readable sequence name ("T1ce", ...)."""
        return SEQUENCE_LABELS[self.key]


@dataclass
class CapturedStudy:
    """The four selected sequences copied out of the scene, not yet checked or resampled."""

    volumes: dict[str, CapturedVolume]


def capture_study(selection: Mapping[str, Any | None]) -> CapturedStudy:
    """Main thread: copy the four selected volume nodes (keys ``MODALITIES``) out of the scene.

    Only what needs MRML happens here (a memory copy per sequence); the checks that read every voxel and
    the resampling run in ``assemble_study``, in the worker thread. DataError for a missing sequence, the
    same node picked twice, an empty node or a colour image.
    """
    missing = describe_missing(selection)
    if missing:
        raise DataError(
            f"No {', '.join(missing)} volume selected. FDN retrieval needs all four sequences of one study "
            "(T1, T1ce, T2, FLAIR): load the missing series and pick it in the Inputs section."
        )
    seen: dict[str, str] = {}
    volumes: dict[str, CapturedVolume] = {}
    for key in MODALITIES:
        node = selection[key]
        assert node is not None  # describe_missing found none missing
        node_id = node.GetID()
        if node_id in seen:
            raise DataError(
                f"The same volume '{node.GetName()}' is selected for {SEQUENCE_LABELS[seen[node_id]]} "
                f"and {SEQUENCE_LABELS[key]}; pick a different series for each sequence."
            )
        seen[node_id] = key
        label, name = SEQUENCE_LABELS[key], node.GetName()
        image = node.GetImageData()
        if image is None:
            raise DataError(f"{label} volume '{name}' has no image data; load the series again")
        if image.GetNumberOfScalarComponents() != 1:
            raise DataError(
                f"{label} volume '{name}' has {image.GetNumberOfScalarComponents()} components per voxel "
                "(a colour or vector image); pick the grey-level MR series"
            )
        voxels = np.array(slicer.util.arrayFromVolume(node), copy=True)
        if voxels.ndim != 3:
            raise DataError(f"{label} volume '{name}' has shape {voxels.shape}; a 3D scalar volume is needed")
        volumes[key] = CapturedVolume(key, name, voxels, node_ijk_to_ras(node))
    return CapturedStudy(volumes)
