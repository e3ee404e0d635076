"""What the radiologist sees: which view the query slice comes from, and the large view of one result.

Qt-free, like ``scene``: everything takes the MRML scene. The query slice follows the view the user scrolled
last, the results layout's query view (Q) or the standard layout's red view (``QueryFollower``); a row of
the results table opens that case and slice in a large view beside the query (``show_result_detail``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import vtk

from fdn_core.errors import DataError

from . import scene as sc
from .naming import SEQUENCE_LABELS

__all__ = [
    "DETAIL_LAYOUT_ID",
    "DETAIL_VIEW",
    "QueryFollower",
    "detail_layout_xml",
    "hit_caption",
    "hit_for_table_row",
    "register_detail_layout",
    "show_result_detail",
]

#: The large view showing one result beside the query view.
DETAIL_VIEW = "FDNDetail"
DETAIL_LAYOUT_ID = sc.RESULTS_LAYOUT_BASE_ID + 100
#: Views the query slice can come from, the results layout's first.
QUERY_SOURCE_VIEWS: tuple[str, ...] = (sc.QUERY_VIEW, "Red")


def hit_caption(hit: Any, sequence: str | None = None) -> str:
    """``"Result 3: case X, axial slice 41, distance 0.832 (FLAIR)"``: the text shown with a result."""
    text = (
        f"Result {hit.rank}: case {hit.case_id}, axial slice {hit.slice_index}, distance {hit.distance:.3g}"
    )
    return text if sequence is None else f"{text} ({SEQUENCE_LABELS.get(sequence, sequence)})"


# ------------------------------------------------------------------------------------------ query slice


class QueryFollower:
    """The query slice is the one shown in the view the user scrolled last: the query view (Q) of the results
    layout, or the red view of the standard layout (``QUERY_SOURCE_VIEWS``).

    It watches those slice nodes (also ones created later, when the results layout first appears). When the
    study's axial slice at the centre of one of them changes, that view becomes the query's source and
    ``on_change(index)`` is called (the panel's spin box follows it). A position outside the study is ignored.
    """

    def __init__(
        self,
        scene: Any,
        on_change: Callable[[int], None] | None = None,
        view_names: Sequence[str] = QUERY_SOURCE_VIEWS,
    ) -> None:
        self._scene = scene
        self._on_change = on_change
        self._names = tuple(view_names)
        self._affine: np.ndarray | None = None
        self._shape: tuple[int, int, int] | None = None
        self._indices: dict[str, int | None] = {}
        self._tags: list[tuple[Any, int]] = []
        self._nodes: dict[str, Any] = {}
        self._muted = False
        self.last_view: str | None = None
        self._tags.append((scene, scene.AddObserver(scene.NodeAddedEvent, self._scan)))
        self._scan()

    # -- the study whose slices are counted
    def set_study(self, affine: np.ndarray, shape: Sequence[int]) -> None:
        """Count slices on this study's canonical grid (``StudyVolumes.affine`` / ``.shape``)."""
        self._affine = np.asarray(affine, dtype=np.float64)
        self._shape = (int(shape[0]), int(shape[1]), int(shape[2]))
        self._indices = {name: self._index_in(node) for name, node in self._nodes.items()}

    def clear_study(self) -> None:
        """Forget the study (scene closed, new study): nothing is reported until ``set_study``."""
        self._affine, self._shape = None, None
        self._indices = {}

    @property
    def num_slices(self) -> int:
        """The study's number of axial slices (0 without a study)."""
        return 0 if self._shape is None else self._shape[2]

    # -- observation
    def _scan(self, *_args: Any) -> None:
        for name in self._names:
            node = sc.slice_node_by_layout_name(self._scene, name)
            if node is None or self._nodes.get(name) is node:
                continue
            self._nodes[name] = node
            self._indices[name] = self._index_in(node)
            tag = node.AddObserver(vtk.vtkCommand.ModifiedEvent, self._on_modified)
            self._tags.append((node, tag))

    def _index_in(self, node: Any) -> int | None:
        if self._affine is None or self._shape is None:
            return None
        centre = np.asarray([node.GetSliceToRAS().GetElement(i, 3) for i in range(3)])
        try:
            return sc.axial_index_from_ras(self._affine, self._shape, centre)
        except DataError:
            return None

    def _on_modified(self, caller: Any, _event: str) -> None:
        name = caller.GetLayoutName()
        index = self._index_in(caller)
        if index is None or index == self._indices.get(name):
            return
        self._indices[name] = index
        self.last_view = name
        if self._on_change is not None and not self._muted:
            self._on_change(index)

    # -- reading and driving
    def source_view(self) -> str | None:
        """The view the query comes from: the one scrolled last, else the first that exists."""
        if self.last_view is not None and self.last_view in self._nodes:
            return self.last_view
        return next((name for name in self._names if name in self._nodes), None)

    def current_index(self) -> int:
        """The query slice: the study's axial slice at the centre of ``source_view()``.

        DataError (with what to do) without a study, without a view, or when the view is outside the study.
        """
        if self._affine is None or self._shape is None:
            raise DataError("Encode a study first: the query slice is counted on the encoded study.")
        view = self.source_view()
        if view is None:
            raise DataError("There is no query view or red view in this layout; type the query slice number.")
        centre = np.asarray([self._nodes[view].GetSliceToRAS().GetElement(i, 3) for i in range(3)])
        return sc.axial_index_from_ras(self._affine, self._shape, centre)

    def show_slice(self, index: int) -> str | None:
        """Scroll the source view to axial slice ``index`` of the study (the spin box drives the view).

        Returns the view's name (None without a study or view); ``on_change`` is not called for this move.
        """
        view = self.source_view()
        if view is None or self._affine is None or self._shape is None:
            return None
        node = self._nodes[view]
        self._muted = True
        try:  # along the view's normal only: the user's panning and zoom stay
            node.JumpSliceByOffsetting(*sc.ras_of_axial_slice(self._affine, self._shape, int(index)))
        finally:
            self._muted = False
        return view

    def remove(self) -> None:
        """Stop watching (remove every observer)."""
        for obj, tag in self._tags:
            obj.RemoveObserver(tag)
        self._tags, self._nodes = [], {}


# ------------------------------------------------------------------------------------------ one result


def detail_layout_xml() -> str:
    """Layout: the query view (left) and one large result view (right), equal size, the table below."""
    views = (
        '<layout type="horizontal" split="true">'
        + sc.slice_view_xml(sc.QUERY_VIEW, "Q", "#F34A33")
        + sc.slice_view_xml(DETAIL_VIEW, "R", "#6EB04B")
        + "</layout>"
    )
    table = (
        f'<item splitSize="200"><view class="vtkMRMLTableViewNode" singletontag="{sc.RESULTS_TABLE_VIEW}">'
        '<property name="viewlabel" action="default">T</property></view></item>'
    )
    return f'<layout type="vertical" split="true"><item splitSize="600">{views}</item>{table}</layout>'


def register_detail_layout(layout_node: Any) -> int:
    """Register (or update) the one-result layout with the layout node; returns its id."""
    xml = detail_layout_xml()
    if layout_node.IsLayoutDescription(DETAIL_LAYOUT_ID):
        layout_node.SetLayoutDescription(DETAIL_LAYOUT_ID, xml)
    else:
        layout_node.AddLayoutDescription(DETAIL_LAYOUT_ID, xml)
    return DETAIL_LAYOUT_ID


def hit_for_table_row(hits: Sequence[Any], table: Any, row: int) -> Any:
    """The hit shown in row ``row`` of the results table node (the table's own row, after any sorting in the
    view was mapped back): matched by case and slice, never by position in ``hits``."""
    case, index = sc.read_table_row(table, row)
    for hit in hits:
        if str(hit.case_id) == case and int(hit.slice_index) == index:
            return hit
    raise DataError(
        f"row {row} of the results table (case {case}, slice {index}) is not one of the current results; "
        "search again"
    )


def show_result_detail(
    scene: Any, volumes_logic: Any, hit: Any, files: Any, sequence: str = "flair"
) -> sc.ReferenceCase:
    """Show one result large: its case (``files``: ``CaseFiles``) in ``DETAIL_VIEW`` at the hit's slice, with
    its tumour labels overlaid, the view labelled with the result's rank. Switch to the layout of
    ``register_detail_layout`` first (the view must exist)."""
    case = sc.load_reference_case(scene, volumes_logic, files, sequence)
    sc.assign_view_volumes(scene, DETAIL_VIEW, case.volume, case.labels)
    sc.jump_to_axial_slice(scene, DETAIL_VIEW, case.volume, int(hit.slice_index))
    node = sc.slice_node_by_layout_name(scene, DETAIL_VIEW)
    if node is not None:
        node.SetLayoutLabel(str(hit.rank))
    return case
