"""MRML side of the module: read the study from volume nodes, write results as nodes, drive the views.

Qt-free: every function takes the MRML scene (and the module logics it needs) as arguments, so the same
code runs inside Slicer and under pytest with ``slicer-core``. Arrays follow docs/ARCHITECTURE.md: volumes
are handled in canonical RAS+ orientation ``(X, Y, Z)`` and axial slice ``k`` is ``volume[..., k]``; Slicer's
``arrayFromVolume`` gives ``(K, J, I)``, which is transposed to ``(I, J, K)`` and reoriented with the node's
IJK-to-RAS matrix through ``fdn_core.data.readers.to_canonical``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import slicer
import vtk

from fdn_core.data.readers import (
    OBLIQUE_TOLERANCE_DEG,
    CaseFiles,
    affine_problem,
    canonical_grid,
    from_canonical,
    load_case,
    obliquity_deg,
    resample_to_grid,
    to_canonical,
)
from fdn_core.errors import DataError
from fdn_core.labels import ABNORMAL_COLORS, ABNORMAL_SEGMENT_IDS, MODALITIES

from .capture import CapturedStudy, CapturedVolume, capture_study, node_ijk_to_ras
from .naming import ROLE_ATTRIBUTE, SEQUENCE_LABELS

__all__ = [
    "ABNORMAL_SEGMENTS",
    "CASE_ATTRIBUTE",
    "QUERY_VIEW",
    "RESULTS_LAYOUT_BASE_ID",
    "RESULTS_TABLE_VIEW",
    "TABLE_COLUMNS",
    "CapturedStudy",
    "CapturedVolume",
    "FieldOfViewLink",
    "ReferenceCase",
    "StudyVolumes",
    "add_abnormal_segmentation",
    "add_reconstruction",
    "add_scalar_volume",
    "assemble_study",
    "assign_view_volumes",
    "axial_index_from_ijk",
    "axial_index_from_ras",
    "capture_study",
    "composite_node",
    "displayed_axial_index",
    "jump_to_axial_slice",
    "jump_to_study_slice",
    "label_color_table",
    "load_reference_case",
    "node_ijk_to_ras",
    "node_voxels",
    "put_in_folder",
    "ras_of_axial_slice",
    "read_study",
    "read_table_row",
    "register_results_layout",
    "result_view_names",
    "results_grid",
    "results_layout_xml",
    "show_only_in_views",
    "show_table_in_view",
    "slice_node_by_layout_name",
    "slice_view_center",
    "slice_view_xml",
    "write_results_table",
]

log = logging.getLogger(__name__)

#: Node attribute naming the reference case a loaded node belongs to.
CASE_ATTRIBUTE = "FDNRetrieval.Case"
#: (segment id, name, colour) of the abnormal classes 1, 2, 3, from the project's vocabulary.
ABNORMAL_SEGMENTS: tuple[tuple[str, str, tuple[float, float, float]], ...] = tuple(
    (*ABNORMAL_SEGMENT_IDS[c], ABNORMAL_COLORS[c]) for c in sorted(ABNORMAL_SEGMENT_IDS)
)
TABLE_COLUMNS: tuple[str, ...] = ("rank", "case", "slice", "distance")
QUERY_VIEW = "FDNQuery"
RESULTS_LAYOUT_BASE_ID = 20560
RESULTS_TABLE_VIEW = "FDNTable"
# Two grids are the same when their IJK-to-RAS matrices agree to this (mm; headers store float32 values).
_GRID_TOL_MM = 1e-3


# ----------------------------------------------------------------------------------------------- reading


def node_voxels(node: Any, label: str = "volume") -> np.ndarray:
    """A float32 copy of a scalar volume's voxels as ``(I, J, K)``; DataError for empty/non-scalar nodes."""
    name = node.GetName()
    if node.GetImageData() is None:
        raise DataError(f"{label} volume '{name}' has no image data; load the series again")
    if node.GetImageData().GetNumberOfScalarComponents() != 1:
        raise DataError(
            f"{label} volume '{name}' has {node.GetImageData().GetNumberOfScalarComponents()} components per "
            "voxel (a colour or vector image); pick the grey-level MR series"
        )
    array = slicer.util.arrayFromVolume(node)
    if array.ndim != 3:
        raise DataError(f"{label} volume '{name}' has shape {array.shape}; a 3D scalar volume is needed")
    return np.ascontiguousarray(array.transpose(2, 1, 0), dtype=np.float32)


@dataclass
class StudyVolumes:
    """The four input sequences on one grid, in canonical orientation, plus where that grid lies.

    image: float32 (4, X, Y, Z), channels ``MODALITIES``. affine: canonical voxel-to-RAS (4, 4).
    reference_ijk_to_ras / reference_shape: the T1ce node's own grid (outputs are written on it).
    warnings: messages for the user (e.g. which sequence was resampled). resampled: sequence keys.
    """

    image: np.ndarray
    affine: np.ndarray
    reference_ijk_to_ras: np.ndarray
    reference_shape: tuple[int, int, int]
    reference_name: str
    names: dict[str, str]
    warnings: list[str] = field(default_factory=list)
    resampled: tuple[str, ...] = ()

    @property
    def shape(self) -> tuple[int, int, int]:
        """Canonical (X, Y, Z)."""
        return tuple(int(s) for s in self.image.shape[1:])  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along canonical X, Y, Z."""
        sp = np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))
        return (float(sp[0]), float(sp[1]), float(sp[2]))

    def to_reference_grid(self, canonical: np.ndarray, channels_first: bool = False) -> np.ndarray:
        """Put a canonical array back on the T1ce node's voxel axes (I, J, K)."""
        return np.ascontiguousarray(
            from_canonical(canonical, self.reference_ijk_to_ras, channels_first=channels_first)
        )


def assemble_study(captured: CapturedStudy) -> StudyVolumes:
    """Worker thread: check the captured sequences and put them on the T1ce grid in canonical orientation.

    Sequences on another grid than T1ce are resampled onto the T1ce grid (a warning says so). DataError for
    a 2D image, an empty (all-zero) or non-finite volume, a singular IJK-to-RAS matrix, or a sequence that
    does not overlap the T1ce one. An oblique T1ce is read in its nearest axis-aligned orientation (outputs
    go back onto its own grid) with a warning that its axial slices are tilted.
    """
    ref = captured.volumes["t1ce"]
    arrays: dict[str, np.ndarray] = {}
    for key in MODALITIES:
        vol = captured.volumes[key]
        problem = affine_problem(vol.ijk_to_ras)
        if problem is not None:
            raise DataError(
                f"{vol.label} volume '{vol.name}': {problem}, so its voxels have no place in space; fix its "
                "spacing and orientation (Volumes module, Volume Information) or load the series again."
            )
        array = np.ascontiguousarray(vol.voxels_kji.transpose(2, 1, 0), dtype=np.float32)
        if min(array.shape) < 2:
            raise DataError(
                f"{vol.label} volume '{vol.name}' is a 2D image (size {array.shape[0]} x {array.shape[1]} x "
                f"{array.shape[2]} voxels); FDN retrieval needs the whole 3D series with its axial slices."
            )
        if not np.isfinite(array).all():
            raise DataError(f"{vol.label} volume '{vol.name}' contains NaN or infinite values; re-export it.")
        if not (array > 0).any():
            raise DataError(
                f"{vol.label} volume '{vol.name}' is empty (no voxel above 0); check that the right series "
                "is selected and that it loaded completely."
            )
        arrays[key] = array
    ref_shape = arrays["t1ce"].shape
    warnings: list[str] = []
    resampled: list[str] = []
    tilt = obliquity_deg(ref.ijk_to_ras)
    if tilt > OBLIQUE_TOLERANCE_DEG:
        warnings.append(
            f"T1ce ('{ref.name}') is {tilt:.1f} degrees oblique: its slices are read as axial slices in its "
            "nearest axis-aligned orientation, tilted by that much. For exact axial slices, resample the "
            "study onto an axis-aligned grid (Resample Scalar Volume) and select the resampled volumes."
        )
    for key in MODALITIES:
        vol = captured.volumes[key]
        if key == "t1ce" or (
            arrays[key].shape == ref_shape
            and np.allclose(vol.ijk_to_ras, ref.ijk_to_ras, rtol=0, atol=_GRID_TOL_MM)
        ):
            continue
        arrays[key] = resample_to_grid(arrays[key], vol.ijk_to_ras, ref.ijk_to_ras, ref_shape)
        if not (arrays[key] > 0).any():
            raise DataError(
                f"{vol.label} volume '{vol.name}' does not overlap the T1ce volume '{ref.name}' in space; "
                "are they from the same study? Pick the four series of one examination."
            )
        resampled.append(key)
        warnings.append(
            f"{vol.label} ('{vol.name}') is on a different voxel grid from T1ce ('{ref.name}'); it was "
            "resampled onto the T1ce grid (linear interpolation) before encoding."
        )
    for warning in warnings:
        log.warning(warning)
    image_ijk = np.stack([arrays[key] for key in MODALITIES])
    image, affine = to_canonical(image_ijk, ref.ijk_to_ras, channels_first=True)
    return StudyVolumes(
        image=np.ascontiguousarray(image, dtype=np.float32),
        affine=affine,
        reference_ijk_to_ras=ref.ijk_to_ras,
        reference_shape=(int(ref_shape[0]), int(ref_shape[1]), int(ref_shape[2])),
        reference_name=ref.name,
        names={key: captured.volumes[key].name for key in MODALITIES},
        warnings=warnings,
        resampled=tuple(resampled),
    )


def read_study(selection: Mapping[str, Any | None]) -> StudyVolumes:
    """``capture_study`` then ``assemble_study`` in one call (scripts, tests; the panel splits them)."""
    return assemble_study(capture_study(selection))


# ---------------------------------------------------------------------------------------- slice indices


def axial_index_from_ras(affine: np.ndarray, shape: Sequence[int], ras: npt.ArrayLike) -> int:
    """Canonical axial slice index (0..Z-1) of the voxel nearest to RAS point ``ras``.

    ``affine``/``shape``: canonical voxel-to-RAS matrix and (X, Y, Z). DataError when outside the volume.
    """
    point = np.append(np.asarray(ras, dtype=np.float64)[:3], 1.0)
    k = int(np.rint((np.linalg.inv(np.asarray(affine, np.float64)) @ point)[2]))
    depth = int(shape[2])
    if not 0 <= k < depth:
        raise DataError(
            f"the position S={point[2]:.1f} mm is outside the study (it would be axial slice {k}, the "
            "study has "
            f"slices 0..{depth - 1}); scroll the red view into the brain or type a slice number."
        )
    return k


def axial_index_from_ijk(ijk_to_ras: np.ndarray, shape_ijk: Sequence[int], ijk: Sequence[float]) -> int:
    """Canonical axial slice index of voxel ``ijk`` of a node's own grid (IJK-to-RAS and (I, J, K) shape)."""
    ras = np.asarray(ijk_to_ras, np.float64) @ np.append(np.asarray(ijk, np.float64)[:3], 1.0)
    return axial_index_from_ras(*canonical_grid(ijk_to_ras, shape_ijk), ras[:3])


def ras_of_axial_slice(affine: np.ndarray, shape: Sequence[int], k: int) -> np.ndarray:
    """RAS position (3,) of the centre of canonical axial slice ``k``."""
    centre = np.array([(shape[0] - 1) / 2.0, (shape[1] - 1) / 2.0, float(k), 1.0])
    ras: np.ndarray = (np.asarray(affine, np.float64) @ centre)[:3]
    return ras


def slice_node_by_layout_name(scene: Any, layout_name: str) -> Any | None:
    """The slice node of the view named ``layout_name`` ("Red", "FDNQuery", ...), or None."""
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLSliceNode")
        if node.GetLayoutName() == layout_name:
            return node
    return None


def slice_view_center(scene: Any, layout_name: str = "Red") -> np.ndarray:
    """RAS position (3,) of the centre of a slice view's plane (the red view by default)."""
    node = slice_node_by_layout_name(scene, layout_name)
    if node is None:
        raise DataError(
            f"there is no '{layout_name}' slice view in this layout; type the query slice number instead"
        )
    return np.array(slicer.util.arrayFromVTKMatrix(node.GetSliceToRAS())[:3, 3], dtype=np.float64)


# ------------------------------------------------------------------------------------------------ writing


def _mark(node: Any, role: str, case_id: str | None = None) -> None:
    node.SetAttribute(ROLE_ATTRIBUTE, role)
    if case_id is not None:
        node.SetAttribute(CASE_ATTRIBUTE, case_id)


def add_scalar_volume(
    scene: Any, array_ijk: np.ndarray, ijk_to_ras: np.ndarray, name: str, role: str, labelmap: bool = False
) -> Any:
    """Add a volume node holding ``array_ijk`` (I, J, K) on the grid ``ijk_to_ras``; marked with ``role``."""
    cls = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    node = scene.AddNewNodeByClass(cls, name)
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(np.asarray(ijk_to_ras, dtype=np.float64)))
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(np.asarray(array_ijk).transpose(2, 1, 0)))
    node.CreateDefaultDisplayNodes()
    _mark(node, role)
    return node


def add_abnormal_segmentation(
    scene: Any, segmentations_logic: Any, seg: np.ndarray, study: StudyVolumes, name: str
) -> Any:
    """Segmentation node with the three abnormal classes (NCR/NET, Oedema, Enhancing) on the T1ce grid.

    ``seg``: canonical (X, Y, Z) classes 0..3. All three segments exist even when a class is absent.
    """
    seg = np.asarray(seg)
    if seg.shape != study.shape:
        raise DataError(f"segmentation shape {seg.shape} does not match the study {study.shape}")
    labels_ijk = study.to_reference_grid(seg.astype(np.uint8))
    labelmap = add_scalar_volume(
        scene, labels_ijk, study.reference_ijk_to_ras, f"{name} labels", "temporary", True
    )
    try:
        node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        node.CreateDefaultDisplayNodes()
        node.SetReferenceImageGeometryParameterFromVolumeNode(labelmap)
        ids = vtk.vtkStringArray()
        for segment_id, segment_name, colour in ABNORMAL_SEGMENTS:
            node.GetSegmentation().AddEmptySegment(segment_id, segment_name, colour)
            ids.InsertNextValue(segment_id)
        if not segmentations_logic.ImportLabelmapToSegmentationNode(labelmap, node, ids):
            raise DataError(f"could not turn the predicted labels into segmentation '{name}'")
    finally:
        scene.RemoveNode(labelmap)
    _mark(node, "abnormal-segmentation")
    return node


def add_reconstruction(scene: Any, recon: np.ndarray, study: StudyVolumes, base_name: str) -> list[Any]:
    """One scalar volume per channel (T1, T1ce, T2, FLAIR) of the normal-appearing reconstruction.

    ``recon``: canonical (4, X, Y, Z). Written on the T1ce node's grid (same IJK-to-RAS as the input).
    """
    recon = np.asarray(recon, dtype=np.float32)
    if recon.shape != (len(MODALITIES), *study.shape):
        raise DataError(f"reconstruction shape {recon.shape} does not match the study {study.shape}")
    nodes = []
    for c, key in enumerate(MODALITIES):
        array = study.to_reference_grid(recon[c])
        name = f"{base_name} normal-appearing {SEQUENCE_LABELS[key]}"
        nodes.append(add_scalar_volume(scene, array, study.reference_ijk_to_ras, name, "reconstruction"))
    return nodes


def _subject_hierarchy(scene: Any) -> Any | None:
    cls = getattr(slicer, "vtkMRMLSubjectHierarchyNode", None)
    if cls is None:
        return None
    return cls.GetSubjectHierarchyNode(scene)


def put_in_folder(scene: Any, folder_name: str, nodes: Iterable[Any]) -> int:
    """Place ``nodes`` in a subject-hierarchy folder (created when missing); returns its item id (0: none).

    Inside Slicer every node already has a hierarchy item; with slicer-core alone (no Qt plugins) items
    are created here. Without a subject hierarchy the nodes simply stay at the top of the scene.
    """
    sh = _subject_hierarchy(scene)
    if sh is None:
        return 0
    scene_item = sh.GetSceneItemID()
    folder = sh.GetItemChildWithName(scene_item, folder_name)
    if not folder:
        folder = sh.CreateFolderItem(scene_item, folder_name)
    for node in nodes:
        item = sh.GetItemByDataNode(node)
        if item:
            sh.SetItemParent(item, folder)
        else:
            sh.CreateItem(folder, node)
    return int(folder)


def write_results_table(scene: Any, hits: Sequence[Any], name: str, table: Any | None = None) -> Any:
    """A locked (read-only) table node with one row per hit: rank (1..), case, slice (canonical axial
    index), distance.

    ``hits``: objects with ``rank``, ``case_id``, ``slice_index`` and ``distance``. ``table``: reuse a node.
    """
    if table is None:
        table = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
        _mark(table, "results")
    table.SetLocked(False)
    table.RemoveAllColumns()
    columns = (vtk.vtkIntArray(), vtk.vtkStringArray(), vtk.vtkIntArray(), vtk.vtkDoubleArray())
    for array, column in zip(columns, TABLE_COLUMNS):
        array.SetName(column)
    for hit in hits:
        columns[0].InsertNextValue(int(hit.rank))
        columns[1].InsertNextValue(str(hit.case_id))
        columns[2].InsertNextValue(int(hit.slice_index))
        columns[3].InsertNextValue(float(hit.distance))
    for array in columns:
        table.AddColumn(array)
    table.SetLocked(True)  # read-only: rows name results, they are not for editing
    table.Modified()
    return table


def show_table_in_view(scene: Any, table: Any, layout_name: str = RESULTS_TABLE_VIEW) -> Any | None:
    """Show ``table`` in the results layout's table view; returns that view node (None without one)."""
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLTableViewNode")):
        view = scene.GetNthNodeByClass(i, "vtkMRMLTableViewNode")
        if view.GetLayoutName() == layout_name:
            view.SetTableNodeID(table.GetID())
            return view
    return None


def read_table_row(table: Any, row: int) -> tuple[str, int]:
    """(case, slice) of a row of the results table (row 0 is the first hit)."""
    data = table.GetTable()
    if not 0 <= row < data.GetNumberOfRows():
        raise DataError(f"row {row} is not in the results table ({data.GetNumberOfRows()} rows)")
    case = data.GetColumnByName("case").GetValue(row)
    index = int(data.GetColumnByName("slice").GetValue(row))
    return str(case), index


# ---------------------------------------------------------------------------------------- reference cases


@dataclass
class ReferenceCase:
    """A reference case loaded for display: its image node (one sequence), optional label node."""

    case_id: str
    volume: Any
    labels: Any | None
    sequence: str


def _find_loaded(scene: Any, case_id: str, role: str) -> Any | None:
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
        if node.GetAttribute(ROLE_ATTRIBUTE) == role and node.GetAttribute(CASE_ATTRIBUTE) == case_id:
            return node
    return None


def label_color_table(scene: Any, layout: str) -> Any:
    """A colour table for label files: BraTS values 1/2/4 or our classes 1/2/3, in the segment colours."""
    name = f"FDN abnormal labels ({layout})"
    existing = scene.GetFirstNodeByName(name)
    if existing is not None:
        return existing
    values = (1, 2, 4) if layout == "brats" else (1, 2, 3)
    table = scene.AddNewNodeByClass("vtkMRMLColorTableNode", name)
    table.SetTypeToUser()
    table.SetNumberOfColors(max(values) + 1)
    table.SetColor(0, "background", 0.0, 0.0, 0.0, 0.0)
    for i in range(1, max(values) + 1):
        table.SetColor(i, f"unused {i}", 0.0, 0.0, 0.0, 0.0)
    for value, (_sid, segment_name, colour) in zip(values, ABNORMAL_SEGMENTS):
        table.SetColor(value, segment_name, *colour, 1.0)
    table.SetAttribute(ROLE_ATTRIBUTE, "colors")
    return table


def load_reference_case(
    scene: Any, volumes_logic: Any, files: CaseFiles, sequence: str = "flair"
) -> ReferenceCase:
    """Load (once; later calls reuse the nodes) one reference case where the database says it lives.

    BraTS layout: the ``sequence`` file and the label file through the Volumes logic
    (``AddArchetypeVolume``). Decathlon layout (one 4D file): read with ``fdn_core`` readers and shown in
    canonical orientation, as the Volumes logic would load a 4D file as a sequence rather than a volume.
    """
    case_id = files.case_id
    volume = _find_loaded(scene, case_id, f"reference:{sequence}")
    labels = None
    if volume is not None:
        for i in range(scene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeNode")):
            node = scene.GetNthNodeByClass(i, "vtkMRMLLabelMapVolumeNode")
            if (
                node.GetAttribute(ROLE_ATTRIBUTE) == "reference:labels"
                and node.GetAttribute(CASE_ATTRIBUTE) == case_id
            ):
                labels = node
        return ReferenceCase(case_id, volume, labels, sequence)
    for path in files.all_paths():
        if not Path(path).is_file():
            raise DataError(
                f"The database says reference case {case_id} lives at {path}, but that file is missing. "
                "Put the "
                "reference cohort back where it was indexed, or rebuild the database with 'fdn index'."
            )
    if files.layout == "brats":
        assert files.images is not None
        path = files.images[sequence]
        volume = volumes_logic.AddArchetypeVolume(str(path), f"{case_id} {SEQUENCE_LABELS[sequence]}", 0)
        if volume is None:
            raise DataError(f"reference case {case_id}: Slicer could not read {path}; check the file")
        if files.seg is not None:
            labels = volumes_logic.AddArchetypeVolume(str(files.seg), f"{case_id} labels", 1)
            if labels is None:
                raise DataError(
                    f"reference case {case_id}: Slicer could not read {files.seg}; check the file"
                )
            labels.CreateDefaultDisplayNodes()
            labels.GetDisplayNode().SetAndObserveColorNodeID(label_color_table(scene, "brats").GetID())
    else:
        case = load_case(files)
        channel = MODALITIES.index(sequence)
        volume = add_scalar_volume(
            scene, case.image[channel], case.affine, f"{case_id} {SEQUENCE_LABELS[sequence]}", "reference"
        )
        if case.seg is not None:
            labels = add_scalar_volume(scene, case.seg, case.affine, f"{case_id} labels", "reference", True)
            labels.GetDisplayNode().SetAndObserveColorNodeID(label_color_table(scene, "classes").GetID())
    _mark(volume, f"reference:{sequence}", case_id)
    if labels is not None:
        _mark(labels, "reference:labels", case_id)
    return ReferenceCase(case_id, volume, labels, sequence)


# ------------------------------------------------------------------------------------------- layout, views


def result_view_names(top_k: int) -> list[str]:
    """Layout names of the result views: FDNResult1 .. FDNResult<top_k>."""
    return [f"FDNResult{i}" for i in range(1, top_k + 1)]


def slice_view_xml(name: str, label: str, color: str) -> str:
    """Layout XML of one axial slice view named ``name`` with view label ``label`` and colour ``color``."""
    return (
        f'<item><view class="vtkMRMLSliceNode" singletontag="{name}">'
        '<property name="orientation" action="default">Axial</property>'
        f'<property name="viewlabel" action="default">{label}</property>'
        f'<property name="viewcolor" action="default">{color}</property>'
        '<property name="viewgroup" action="default">1</property>'
        "</view></item>"
    )


def results_grid(top_k: int) -> tuple[int, int]:
    """(rows, views per row) of the result views: at most five per row, rows as even as possible."""
    rows = -(-top_k // 5)
    return rows, -(-top_k // rows)


def results_layout_xml(top_k: int) -> str:
    """Layout: the query view (left, as tall as the result rows and about as wide), the top-K result views
    in even rows of up to five (row-major, 1..K), the table below."""
    if not 1 <= top_k <= 20:
        raise DataError(f"top-K must be between 1 and 20, got {top_k}")
    names = result_view_names(top_k)
    n_rows, per_row = results_grid(top_k)
    rows = []
    for start in range(0, top_k, per_row):
        views = "".join(
            slice_view_xml(name, str(start + i + 1), "#6EB04B")
            for i, name in enumerate(names[start : start + per_row])
        )
        rows.append(f'<item><layout type="horizontal">{views}</layout></item>')
    results = f'<layout type="vertical">{"".join(rows)}</layout>'
    top = (
        '<layout type="horizontal" split="true">'
        + f'<item splitSize="{n_rows * 100}">'
        + slice_view_xml(QUERY_VIEW, "Q", "#F34A33")[len("<item>") :]
        + f'<item splitSize="{per_row * 100}">{results}</item>'
        + "</layout>"
    )
    table = (
        f'<item splitSize="200"><view class="vtkMRMLTableViewNode" singletontag="{RESULTS_TABLE_VIEW}">'
        '<property name="viewlabel" action="default">T</property></view></item>'
    )
    return f'<layout type="vertical" split="true"><item splitSize="600">{top}</item>{table}</layout>'


def register_results_layout(layout_node: Any, top_k: int) -> int:
    """Register (or update) the results layout for ``top_k`` with the layout node; returns its id."""
    layout_id = RESULTS_LAYOUT_BASE_ID + int(top_k)
    xml = results_layout_xml(top_k)
    if layout_node.IsLayoutDescription(layout_id):
        layout_node.SetLayoutDescription(layout_id, xml)
    else:
        layout_node.AddLayoutDescription(layout_id, xml)
    return layout_id


def composite_node(scene: Any, layout_name: str) -> Any:
    """The slice composite node (layers) of the view ``layout_name``, created when missing."""
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
        if node.GetLayoutName() == layout_name:
            return node
    node = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    node.SetLayoutName(layout_name)
    node.SetSingletonTag(layout_name)
    return node


def assign_view_volumes(
    scene: Any, layout_name: str, background: Any, labels: Any | None = None, label_opacity: float = 0.5
) -> Any:
    """Show ``background`` (and ``labels`` as the label layer) in the view ``layout_name``."""
    composite = composite_node(scene, layout_name)
    composite.SetBackgroundVolumeID(background.GetID())
    composite.SetForegroundVolumeID(None)
    composite.SetLabelVolumeID(labels.GetID() if labels is not None else None)
    composite.SetLabelOpacity(label_opacity)
    composite.SetLinkedControl(False)
    return composite


def show_only_in_views(scene: Any, node: Any, layout_names: Sequence[str]) -> list[str]:
    """Display ``node`` only in the named slice views (that exist) and the 3D views; returns the view ids.

    The query's predicted segmentation must not be drawn over other patients in the result views.
    """
    display = node.GetDisplayNode()
    ids = [
        n.GetID() for n in (slice_node_by_layout_name(scene, name) for name in layout_names) if n is not None
    ]
    ids += [
        scene.GetNthNodeByClass(i, "vtkMRMLViewNode").GetID()
        for i in range(scene.GetNumberOfNodesByClass("vtkMRMLViewNode"))
    ]
    display.RemoveAllViewNodeIDs()
    for view_id in ids:
        display.AddViewNodeID(view_id)
    return ids


def _node_shape_ijk(node: Any) -> tuple[int, int, int]:
    dims = node.GetImageData().GetDimensions()
    return (int(dims[0]), int(dims[1]), int(dims[2]))


def jump_to_axial_slice(scene: Any, layout_name: str, volume: Any, k: int) -> None:
    """Make the view ``layout_name`` axial, centred on canonical axial slice ``k`` of ``volume``."""
    slice_node = slice_node_by_layout_name(scene, layout_name)
    if slice_node is None:
        raise DataError(f"there is no '{layout_name}' view; switch to the FDN results layout first")
    ijk_to_ras = node_ijk_to_ras(volume)
    shape_ijk = _node_shape_ijk(volume)
    affine, shape = canonical_grid(ijk_to_ras, shape_ijk)
    if not 0 <= k < shape[2]:
        raise DataError(f"slice {k} is outside volume '{volume.GetName()}' (slices 0..{shape[2] - 1})")
    centre = ras_of_axial_slice(affine, shape, k)
    slice_node.SetOrientation("Axial")
    slice_node.JumpSliceByCentering(*centre)


def jump_to_study_slice(scene: Any, layout_name: str, study: StudyVolumes, k: int) -> None:
    """Centre the view ``layout_name`` (made axial) on canonical axial slice ``k`` of the encoded study."""
    slice_node = slice_node_by_layout_name(scene, layout_name)
    if slice_node is None:
        raise DataError(f"there is no '{layout_name}' view; switch to the FDN results layout first")
    if not 0 <= k < study.shape[2]:
        raise DataError(f"slice {k} is outside the study (slices 0..{study.shape[2] - 1})")
    slice_node.SetOrientation("Axial")
    slice_node.JumpSliceByCentering(*ras_of_axial_slice(study.affine, study.shape, k))


def displayed_axial_index(scene: Any, layout_name: str, volume: Any) -> int:
    """Canonical axial index of ``volume`` at the centre of the view ``layout_name``."""
    ijk_to_ras = node_ijk_to_ras(volume)
    shape_ijk = _node_shape_ijk(volume)
    return axial_index_from_ras(*canonical_grid(ijk_to_ras, shape_ijk), slice_view_center(scene, layout_name))


class FieldOfViewLink:
    """Keeps the zoom (millimetres per screen pixel) of a set of slice views equal: zooming one zooms all.

    Each view keeps its own aspect ratio (its field of view is its own pixel size times the shared
    spacing). Slicer's own view linking would also force every view onto the same physical slice
    position, which is meaningless across different patients, so only the zoom is linked here.
    """

    def __init__(self, scene: Any, layout_names: Sequence[str]) -> None:
        self._nodes = [
            n for n in (slice_node_by_layout_name(scene, name) for name in layout_names) if n is not None
        ]
        self._tags: list[tuple[Any, int]] = []
        self._busy = False
        for node in self._nodes:
            self._tags.append((node, node.AddObserver(vtk.vtkCommand.ModifiedEvent, self._on_modified)))

    def _on_modified(self, caller: Any, _event: str) -> None:
        if self._busy:
            return
        self._busy = True
        try:
            dims = caller.GetDimensions()
            if dims[0] < 1:
                return
            spacing = caller.GetFieldOfView()[0] / dims[0]
            for node in self._nodes:
                if node is caller:
                    continue
                own, fov = node.GetDimensions(), node.GetFieldOfView()
                want = (spacing * own[0], spacing * own[1])
                if not np.allclose(fov[:2], want):
                    node.SetFieldOfView(want[0], want[1], fov[2])
        finally:
            self._busy = False

    def remove(self) -> None:
        """Stop linking (remove the observers)."""
        for node, tag in self._tags:
            node.RemoveObserver(tag)
        self._tags = []
