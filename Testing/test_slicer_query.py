"""What the radiologist sees, on Slicer's real MRML (slicer-core): the query slice follows the view scrolled
last (query view Q or red view), the results table is read-only and its rows name results by case and slice,
and one result opens large beside the query."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from fdn_core.data.readers import find_cases
from fdn_core.errors import DataError
from FDNRetrievalLib import scenario, views
from FDNRetrievalLib import scene as sc


@pytest.fixture
def ctx() -> scenario.SceneContext:
    return scenario.make_scene_context()


@pytest.fixture
def study(ctx: scenario.SceneContext, tiny_cohort: Path) -> sc.StudyVolumes:
    nodes = scenario.load_case_nodes(ctx, find_cases(tiny_cohort)[0])
    return sc.read_study(nodes)


def _scroll(ctx: scenario.SceneContext, view: str, study: sc.StudyVolumes, k: int) -> None:
    node = sc.slice_node_by_layout_name(ctx.scene, view)
    node.SetOrientation("Axial")
    node.JumpSliceByCentering(*sc.ras_of_axial_slice(study.affine, study.shape, k))


def _centre(ctx: scenario.SceneContext, view: str) -> np.ndarray:
    return sc.slice_view_center(ctx.scene, view)


def test_query_follows_the_view_scrolled_last(ctx: scenario.SceneContext, study: sc.StudyVolumes) -> None:
    seen: list[int] = []
    follower = views.QueryFollower(ctx.scene, seen.append)
    assert follower.source_view() == "Red"  # standard layout: no query view yet
    with pytest.raises(DataError, match="Encode a study first"):
        follower.current_index()
    follower.set_study(study.affine, study.shape)
    assert follower.num_slices == study.shape[2]

    _scroll(ctx, "Red", study, 10)
    assert seen == [10] and follower.last_view == "Red" and follower.current_index() == 10

    # the results layout appears after the follower was made: its query view is picked up
    ctx.layout_node.SetViewArrangement(sc.register_results_layout(ctx.layout_node, 3))
    _scroll(ctx, sc.QUERY_VIEW, study, 25)
    assert seen[-1] == 25 and follower.last_view == sc.QUERY_VIEW
    # the red view is hidden in this layout and still at slice 10: the query is what Q shows
    assert follower.current_index() == 25

    # moving within the plane is not scrolling; a position outside the study is ignored
    q = sc.slice_node_by_layout_name(ctx.scene, sc.QUERY_VIEW)
    centre = _centre(ctx, sc.QUERY_VIEW)
    q.JumpSliceByCentering(centre[0] + 7.0, centre[1] - 5.0, centre[2])
    above = sc.ras_of_axial_slice(study.affine, study.shape, study.shape[2] + 30)
    q.JumpSliceByOffsetting(*above)
    assert seen[-1] == 25 and len(seen) == 2
    _scroll(ctx, sc.QUERY_VIEW, study, 25)

    # typing a number scrolls the followed view along its normal only (panning is kept), silently
    q.JumpSliceByCentering(centre[0] + 7.0, centre[1] - 5.0, centre[2])
    before = _centre(ctx, sc.QUERY_VIEW)
    assert follower.show_slice(5) == sc.QUERY_VIEW
    after = _centre(ctx, sc.QUERY_VIEW)
    assert follower.current_index() == 5 and np.allclose(after[:2], before[:2]) and seen[-1] == 25

    # back in a standard layout, scrolling the red view makes it the source again
    ctx.layout_node.SetViewArrangement(ctx.layout_node.SlicerLayoutFourUpView)
    _scroll(ctx, "Red", study, 7)
    assert follower.last_view == "Red" and follower.current_index() == 7 and seen[-1] == 7

    # a new study (different grid) re-counts; after remove() nothing is reported
    follower.clear_study()
    with pytest.raises(DataError):
        follower.current_index()
    follower.set_study(study.affine, study.shape)
    follower.remove()
    _scroll(ctx, "Red", study, 12)
    assert seen[-1] == 7


def _hits(n: int) -> list[SimpleNamespace]:
    return [
        SimpleNamespace(rank=i + 1, case_id=f"case{i}", slice_index=10 + i, distance=0.1 * (i + 1))
        for i in range(n)
    ]


def test_results_table_is_read_only_and_rows_name_hits(ctx: scenario.SceneContext) -> None:
    hits = _hits(3)
    table = sc.write_results_table(ctx.scene, hits, "FDN retrieval results")
    assert table.GetLocked()
    again = sc.write_results_table(ctx.scene, hits, "FDN retrieval results", table)  # a new search
    assert again is table and table.GetLocked() and table.GetTable().GetNumberOfRows() == 3
    # rows are matched by what they show (case and slice), not by position in a list
    assert views.hit_for_table_row(list(reversed(hits)), table, 2) is hits[2]
    assert views.hit_for_table_row(hits, table, 0) is hits[0]
    with pytest.raises(DataError, match="search again"):
        views.hit_for_table_row(hits[:1], table, 2)
    with pytest.raises(DataError, match="not in the results table"):
        views.hit_for_table_row(hits, table, 3)


def test_one_result_large_beside_the_query(ctx: scenario.SceneContext, tiny_cohort: Path) -> None:
    root = ET.fromstring(views.detail_layout_xml())
    assert [v.get("singletontag") for v in root.iter("view")] == [
        sc.QUERY_VIEW,
        views.DETAIL_VIEW,
        "FDNTable",
    ]
    layout_id = views.register_detail_layout(ctx.layout_node)
    assert views.register_detail_layout(ctx.layout_node) == layout_id  # registering twice updates
    ctx.layout_node.SetViewArrangement(layout_id)

    files = next(c for c in find_cases(tiny_cohort) if c.seg is not None and c.case_id.endswith("1"))
    hit = SimpleNamespace(rank=2, case_id=files.case_id, slice_index=20, distance=0.5)
    case = views.show_result_detail(ctx.scene, ctx.volumes_logic, hit, files, "flair")
    composite = sc.composite_node(ctx.scene, views.DETAIL_VIEW)
    assert composite.GetBackgroundVolumeID() == case.volume.GetID()
    assert case.labels is not None and composite.GetLabelVolumeID() == case.labels.GetID()
    assert sc.displayed_axial_index(ctx.scene, views.DETAIL_VIEW, case.volume) == 20
    assert sc.slice_node_by_layout_name(ctx.scene, views.DETAIL_VIEW).GetLayoutLabel() == "2"
    caption = views.hit_caption(hit, "flair")
    assert caption.startswith("Result 2:") and files.case_id in caption
    assert "axial slice 20" in caption and "(FLAIR)" in caption
    # the same case again (another row of it) reuses the loaded nodes
    count = ctx.scene.GetNumberOfNodes()
    views.show_result_detail(
        ctx.scene, ctx.volumes_logic, SimpleNamespace(**{**vars(hit), "slice_index": 5}), files
    )
    assert ctx.scene.GetNumberOfNodes() == count
    assert sc.displayed_axial_index(ctx.scene, views.DETAIL_VIEW, case.volume) == 5
