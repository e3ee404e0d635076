"""The session's MRML scene on trame-slicer: layouts, slice views, and what each view shows.

trame-slicer renders Slicer's slice views (MRML slice logic, segmentation and label layers) on the server and
streams them to the page. It accepts only slice and 3D views in a layout (no ``vtkMRMLTableViewNode``), so the
Slicer module's results layout XML cannot be used: the layouts are built here from trame-slicer's ``Layout``
objects with the module's own view names and grid (``scene.results_grid``), and the results table is a
table in the page. Everything scene-related goes through ``FDNRetrievalLib.scene``, as in the Slicer panel:

- study layout: the query view (the study with its predicted tumour segmentation, and the normal-appearing
  image as an optional overlay) beside the normal-appearing view (the reconstruction, same slice);
- results layout: the query view, as tall as the result rows, beside the top-K result views (even rows of up
  to five; each result's tumour labels overlaid);
- detail layout: the query view beside one result, large.

Runs on the server's event-loop thread only (MRML and VTK are not thread-safe); the arrays it shows are made
by the worker threads.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fdn_core.labels import MODALITIES
from FDNRetrievalLib import scene as sc
from FDNRetrievalLib import views as lib_views
from FDNRetrievalLib.naming import ROLE_ATTRIBUTE, SEQUENCE_LABELS

from .studies import DisplayVolume, ViewVolume

__all__ = [
    "DETAIL_LAYOUT",
    "DETAIL_VIEW",
    "NORMAL_VIEW",
    "QUERY_VIEW",
    "STUDY_LAYOUT",
    "LoadedStudy",
    "SessionViewer",
    "detail_layout",
    "results_layout",
    "results_layout_id",
    "study_layout",
    "view_definition",
]

log = logging.getLogger(__name__)

QUERY_VIEW = sc.QUERY_VIEW
NORMAL_VIEW = "FDNNormal"
DETAIL_VIEW = lib_views.DETAIL_VIEW
STUDY_LAYOUT = "fdn-study"
DETAIL_LAYOUT = "fdn-detail"
#: Reference cases kept loaded in the scene (for quick re-display); older ones are removed.
MAX_LOADED_REFERENCES = 40
#: Opacity of the tumour labels over a result, as in the Slicer panel.
LABEL_OPACITY = 0.5
_GREY = "vtkMRMLColorTableNodeGrey"

# View colours of the Slicer module (query red, results green) and a neutral one for the reconstruction.
_VIEW_STYLE = {QUERY_VIEW: ("Q", "#F34A33"), NORMAL_VIEW: ("N", "#8E8E8E"), DETAIL_VIEW: ("R", "#6EB04B")}


def view_definition(tag: str) -> Any:
    """trame-slicer's description of the axial slice view ``tag`` (query, normal, detail or a result)."""
    from trame_slicer.views import ViewLayoutDefinition, ViewProps, ViewType

    label, color = _VIEW_STYLE.get(tag, (tag.removeprefix("FDNResult"), "#6EB04B"))
    return ViewLayoutDefinition(
        tag, ViewType.SLICE_VIEW, ViewProps(label=label, orientation="Axial", color=color)
    )


def study_layout() -> Any:
    """The query view beside the normal-appearing view."""
    from trame_slicer.views import Layout, LayoutDirection

    return Layout(LayoutDirection.Horizontal, [view_definition(QUERY_VIEW), view_definition(NORMAL_VIEW)])


def results_layout_id(top_k: int) -> str:
    """Layout id of the results layout for ``top_k`` results."""
    return f"fdn-results-{int(top_k)}"


def results_layout(top_k: int) -> Any:
    """The query view (as wide as one result row is tall times the number of rows, as in the panel) beside the
    top-K result views in even rows of up to five, numbered row by row."""
    from trame_slicer.views import Layout, LayoutDirection

    n_rows, per_row = sc.results_grid(top_k)
    names = sc.result_view_names(top_k)
    rows: list[Any] = [
        Layout(LayoutDirection.Horizontal, [view_definition(n) for n in names[start : start + per_row]])
        for start in range(0, top_k, per_row)
    ]
    grid = Layout(LayoutDirection.Vertical, rows)
    return Layout(
        LayoutDirection.Horizontal,
        [view_definition(QUERY_VIEW), grid],
        flex_sizes=[str(n_rows), str(per_row)],
    )


def detail_layout() -> Any:
    """The query view beside one result, both large."""
    from trame_slicer.views import Layout, LayoutDirection

    return Layout(LayoutDirection.Horizontal, [view_definition(QUERY_VIEW), view_definition(DETAIL_VIEW)])


@dataclass
class LoadedStudy:
    """The study on screen: its canonical four-channel image and where it lies (``scene.StudyVolumes``), the
    display range per sequence, and its nodes (input, reconstruction, predicted segmentation)."""

    name: str
    volumes: sc.StudyVolumes
    windows: dict[str, tuple[float, float]]
    inputs: dict[str, Any]
    reconstruction: dict[str, Any]
    segmentation: Any | None = None

    @property
    def num_slices(self) -> int:
        """Number of axial slices (canonical Z)."""
        return self.volumes.shape[2]


class SessionViewer:
    """What the views of one session show. ``slicer_app``: trame-slicer's ``SlicerApp``; ``view_manager``
    and ``layout_manager``: its managers; ``on_query_slice(k)``: called when the query view shows another
    axial slice of the study (the query slice is the one on screen, as in the panel)."""

    def __init__(
        self, slicer_app: Any, layout_manager: Any, on_query_slice: Callable[[int | None], None] | None = None
    ) -> None:
        self.app = slicer_app
        self.scene = slicer_app.scene
        self.layouts = layout_manager
        self.on_query_slice = on_query_slice
        self.study: LoadedStudy | None = None
        self.sequence = "flair"
        self.normal_opacity = 0.0
        self._references: OrderedDict[tuple[str, str], tuple[Any, Any | None]] = OrderedDict()
        self._arrays: dict[str, np.ndarray] = {}
        self._following = False
        self._watched: set[str] = set()
        self.layouts.register_layout(STUDY_LAYOUT, study_layout())
        self.layouts.register_layout(DETAIL_LAYOUT, detail_layout(), lazy_initialization=True)
        self.layouts.set_layout(STUDY_LAYOUT)
        self._prepare_views()

    # ------------------------------------------------------------------------------------------ views

    def view(self, tag: str) -> Any | None:
        """The trame-slicer slice view ``tag`` (None when it was not created yet)."""
        return self.app.view_manager.get_view(tag)

    def ensure_view(self, tag: str) -> Any:
        """The slice view ``tag``, created when missing (about 0.1 s each: done ahead of need)."""
        view = self.view(tag)
        if view is None:
            view = self.app.view_manager.create_view(view_definition(tag))
        self._prepare_views()
        return view

    def _prepare_views(self) -> None:
        """Hook up views made since the last call: the query view reports its slice; every view keeps its
        image fitted, on the slice it shows, when the browser resizes it."""
        for view in self.app.view_manager.get_slice_views():
            tag = view.get_singleton_tag()
            if tag in self._watched:
                continue
            self._watched.add(tag)
            if hasattr(view, "resized_hook"):
                view.resized_hook = lambda _view, tag=tag: self.refit(tag)
            if tag == QUERY_VIEW:
                view.modified.connect(lambda _view: self._query_view_changed())

    def refit(self, tag: str) -> None:
        """Fit view ``tag`` to its image, staying on the axial slice it shows."""
        view = self.view(tag)
        background_id = (
            sc.composite_node(self.scene, tag).GetBackgroundVolumeID() if view is not None else None
        )
        volume = self.scene.GetNodeByID(background_id) if background_id else None
        if volume is None:
            return
        try:
            k: int | None = sc.displayed_axial_index(self.scene, tag, volume)
        except Exception:  # off the volume: fitting recentres it
            k = None
        view.fit_view_to_content()
        if k is not None:
            sc.jump_to_axial_slice(self.scene, tag, volume, k)

    def set_layout(self, layout_id: str) -> None:
        """Show layout ``layout_id`` (its views are created when missing)."""
        self.layouts.set_layout(layout_id)
        self._prepare_views()

    def show_results_layout(self, top_k: int) -> None:
        """Register (once) and show the results layout for ``top_k``."""
        layout_id = results_layout_id(top_k)
        if not self.layouts.has_layout(layout_id):
            self.layouts.register_layout(layout_id, results_layout(top_k), lazy_initialization=True)
        self.set_layout(layout_id)

    # ---------------------------------------------------------------------------------------- the study

    def query_slice(self) -> int | None:
        """The study's axial slice at the centre of the query view (None without a study or off the study)."""
        if self.study is None:
            return None
        try:
            return sc.displayed_axial_index(self.scene, QUERY_VIEW, self.study.inputs["t1ce"])
        except Exception:  # the view is outside the study (scrolled past it): no query slice
            return None

    def _query_view_changed(self) -> None:
        if self._following or self.study is None:
            return
        k = self.query_slice()
        if k is not None and self.view(NORMAL_VIEW) is not None:
            self._following = True
            try:
                sc.jump_to_study_slice(self.scene, NORMAL_VIEW, self.study.volumes, k)
            finally:
                self._following = False
        if self.on_query_slice is not None:
            self.on_query_slice(k)

    def clear_study(self) -> None:
        """Remove the study's nodes (a new study replaces it); reference cases stay loaded."""
        if self.study is None:
            return
        study, self.study = self.study, None
        for node in (*study.inputs.values(), *study.reconstruction.values(), study.segmentation):
            self._remove(node)
        self._set_view(QUERY_VIEW, None)
        self._set_view(NORMAL_VIEW, None)
        if self.on_query_slice is not None:
            self.on_query_slice(None)

    def show_study(
        self,
        name: str,
        volumes: sc.StudyVolumes,
        inputs: dict[str, ViewVolume],
        start_slice: int | None = None,
    ) -> LoadedStudy:
        """Add the study's four sequences (``inputs``, prepared from ``volumes`` by the worker) as volume
        nodes and show it in the query view at ``start_slice`` (default: the middle slice), in the study
        layout."""
        self.clear_study()
        nodes = {
            key: self._add_volume(inputs[key], f"{name} {SEQUENCE_LABELS[key]}", "web-input")
            for key in MODALITIES
        }
        windows = {key: inputs[key].window or (0.0, 1.0) for key in MODALITIES}
        self.study = LoadedStudy(name, volumes, windows, nodes, {})
        self.set_layout(STUDY_LAYOUT)
        self._show_query()
        self._set_view(NORMAL_VIEW, None)
        self.fit(QUERY_VIEW)
        k = volumes.shape[2] // 2 if start_slice is None else int(start_slice)
        self.go_to_slice(k)
        return self.study

    def show_encoded(self, seg: np.ndarray, recon: dict[str, ViewVolume] | None) -> None:
        """The predicted segmentation (three BraTS-coloured segments, drawn in the query and normal-appearing
        views only) and the normal-appearing image (one volume per sequence, prepared by the worker with the
        study's display range)."""
        study = self._require_study()
        for node in (*study.reconstruction.values(), study.segmentation):
            self._remove(node)
        study.segmentation = sc.add_abnormal_segmentation(
            self.scene, self.app.segmentations_logic, seg, study.volumes, f"{study.name} predicted abnormal"
        )
        study.reconstruction = {
            key: self._add_volume(
                volume, f"{study.name} normal-appearing {SEQUENCE_LABELS[key]}", "reconstruction"
            )
            for key, volume in (recon or {}).items()
        }
        self._restrict_segmentation()
        self._show_query()
        k = self.query_slice()
        self._set_view(NORMAL_VIEW, study.reconstruction.get(self.sequence))
        self.fit(NORMAL_VIEW)
        if k is not None:
            sc.jump_to_study_slice(self.scene, NORMAL_VIEW, study.volumes, k)

    def go_to_slice(self, k: int) -> None:
        """Scroll the query view (and the normal-appearing view) to the study's axial slice ``k``."""
        study = self._require_study()
        sc.jump_to_study_slice(self.scene, QUERY_VIEW, study.volumes, int(k))
        self._query_view_changed()

    def set_sequence(self, sequence: str) -> None:
        """Show ``sequence`` of the study and its reconstruction (result views are set by the caller)."""
        if sequence not in MODALITIES:
            raise ValueError(f"unknown sequence {sequence!r}")
        self.sequence = sequence
        if self.study is None:
            return
        self._show_query()
        if self.study.reconstruction:
            self._set_view(NORMAL_VIEW, self.study.reconstruction.get(sequence))

    def set_normal_opacity(self, opacity: float) -> None:
        """Blend the normal-appearing image over the study in the query view (0: the study only)."""
        self.normal_opacity = float(min(1.0, max(0.0, opacity)))
        if self.study is not None:
            self._show_query()

    def _show_query(self) -> None:
        study = self._require_study()
        composite = sc.assign_view_volumes(self.scene, QUERY_VIEW, study.inputs[self.sequence])
        recon = study.reconstruction.get(self.sequence)
        composite.SetForegroundVolumeID(recon.GetID() if recon is not None else None)
        composite.SetForegroundOpacity(self.normal_opacity if recon is not None else 0.0)
        self._render(QUERY_VIEW)

    def _restrict_segmentation(self) -> None:
        """Draw the predicted segmentation only over the study: never over other patients' slices."""
        study = self.study
        if study is None or study.segmentation is None:
            return
        for tag in (QUERY_VIEW, NORMAL_VIEW):
            self.ensure_view(tag)
        sc.show_only_in_views(self.scene, study.segmentation, [QUERY_VIEW, NORMAL_VIEW])

    def _require_study(self) -> LoadedStudy:
        if self.study is None:
            raise RuntimeError("no study is loaded")
        return self.study

    # -------------------------------------------------------------------------------------- references

    def reference_nodes(self, volume: DisplayVolume) -> tuple[Any, Any | None]:
        """Volume and label nodes of a reference case's sequence (made once, then reused)."""
        key = (volume.case_id, volume.sequence)
        if key in self._references:
            self._references.move_to_end(key)
            return self._references[key]
        label = SEQUENCE_LABELS[volume.sequence]
        image = self._add_volume(volume.image, f"{volume.case_id} {label}", f"reference:{volume.sequence}")
        image.SetAttribute(sc.CASE_ATTRIBUTE, volume.case_id)
        labels = None
        if volume.labels is not None:
            labels = self._add_volume(
                volume.labels, f"{volume.case_id} labels", "reference:labels", labelmap=True
            )
            labels.SetAttribute(sc.CASE_ATTRIBUTE, volume.case_id)
        self._references[key] = (image, labels)
        return image, labels

    def has_reference(self, case_id: str, sequence: str) -> bool:
        """Whether that case's sequence is already loaded."""
        return (case_id, sequence) in self._references

    def forget_references(self, keep: Sequence[tuple[str, str]]) -> None:
        """Remove the oldest loaded reference cases beyond ``MAX_LOADED_REFERENCES`` (never ``keep``)."""
        keep_set = set(keep)
        for key in list(self._references):
            if len(self._references) <= MAX_LOADED_REFERENCES:
                break
            if key in keep_set:
                continue
            for node in self._references.pop(key):
                self._remove(node)

    def show_reference(self, tag: str, volume: DisplayVolume, slice_index: int) -> None:
        """Show a reference case's sequence with its tumour labels in view ``tag``, at axial slice
        ``slice_index`` (canonical, as the database indexed it)."""
        image, labels = self.reference_nodes(volume)
        self.ensure_view(tag)
        sc.assign_view_volumes(self.scene, tag, image, labels, LABEL_OPACITY)
        self.fit(tag)
        sc.jump_to_axial_slice(self.scene, tag, image, int(slice_index))
        self._render(tag)

    # ------------------------------------------------------------------------------------------ helpers

    def fit(self, tag: str) -> None:
        """Fit the view's field of view to its background volume."""
        view = self.view(tag)
        if view is not None:
            view.fit_view_to_content()

    def _render(self, tag: str) -> None:
        view = self.view(tag)
        if view is not None:
            view.schedule_render()

    def _set_view(self, tag: str, background: Any | None) -> None:
        if self.view(tag) is None:
            return
        composite = sc.composite_node(self.scene, tag)
        composite.SetBackgroundVolumeID(background.GetID() if background is not None else None)
        composite.SetForegroundVolumeID(None)
        composite.SetLabelVolumeID(None)
        self._render(tag)

    def _add_volume(self, volume: ViewVolume, name: str, role: str, labelmap: bool = False) -> Any:
        """A volume node showing ``volume``'s voxels without copying them, with its display node.

        ``scene.add_scalar_volume`` copies the array twice and lets Slicer compute a histogram for the
        window (about 0.3 s per 240 x 240 x 155 volume, on the event loop); here the worker already laid the
        voxels out and chose the window, so adding ten result volumes keeps the page responsive. The array is
        kept referenced as long as the node lives (VTK only borrows it).
        """
        import slicer
        import vtk
        from vtkmodules.util import numpy_support

        kji = volume.kji
        cls = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
        node = self.scene.AddNewNodeByClass(cls, name)
        node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(volume.ijk_to_ras))
        image = vtk.vtkImageData()
        image.SetDimensions(int(kji.shape[2]), int(kji.shape[1]), int(kji.shape[0]))
        image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(kji.reshape(-1), deep=False))
        node.SetAndObserveImageData(image)
        if labelmap:
            display = self.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeDisplayNode")
            display.SetAndObserveColorNodeID(sc.label_color_table(self.scene, "classes").GetID())
        else:
            display = self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeDisplayNode")
            display.SetAndObserveColorNodeID(_GREY)
            display.AutoWindowLevelOff()
            low, high = volume.window or (float(kji.min()), float(kji.max()) + 1e-3)
            display.SetWindowLevelMinMax(low, high)
        node.SetAndObserveDisplayNodeID(display.GetID())
        node.SetAttribute(ROLE_ATTRIBUTE, role)
        self._arrays[node.GetID()] = kji
        return node

    def _remove(self, node: Any | None) -> None:
        """Remove a node this viewer made, with its display nodes (and release its voxels)."""
        if node is None or not self.scene.IsNodePresent(node):
            return
        displays = [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
        self._arrays.pop(node.GetID(), None)
        self.scene.RemoveNode(node)
        for display in displays:
            if display is not None and self.scene.IsNodePresent(display):
                self.scene.RemoveNode(display)
