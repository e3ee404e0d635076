"""Render the FDN Retrieval results layout offscreen, as Slicer shows it, for the README and the Extensions
Index (``docs/images/slicer-results-layout.png``).

Everything on screen comes from Slicer's own MRML and VTK (the ``slicer-core`` package, no Qt): the module's
library loads a phantom study, encodes it with the shipped demo model, searches the demo database, registers
the results layout and fills its views exactly as the panel does; each slice view is then resliced and
blended by ``vtkMRMLSliceLogic`` (background volume + label layer, window/level from the display nodes), and
the views, their controller bars, corner annotations and the results table are drawn in an offscreen VTK
render window (Mesa EGL; no display needed).

    python docs/tools/slicer_screenshot.py --out docs/images/slicer-results-layout.png

builds the demo database first when ``--demo-root`` holds none (about two minutes on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "SlicerFDNRetrieval"))

import slicer  # noqa: E402  (slicer-core, after the path set-up above)
import vtk  # noqa: E402
from vtk.util import numpy_support  # noqa: E402

from fdn_core.labels import ABNORMAL_COLORS, ABNORMAL_SEGMENT_IDS  # noqa: E402
from FDNRetrievalLib import scenario  # noqa: E402
from FDNRetrievalLib import scene as sc  # noqa: E402

QUERY_COLOR = (0xF3 / 255, 0x4A / 255, 0x33 / 255)
RESULT_COLOR = (0x6E / 255, 0xB0 / 255, 0x4B / 255)
BAR_PX = 22
GAP_PX = 2


@dataclass
class ViewContent:
    """What one slice view shows, and the text Slicer would draw around it."""

    layout_name: str
    label: str
    color: tuple[float, float, float]
    caption: str
    corner: list[str]


@dataclass
class Rect:
    x: int
    y: int  # from the top of the picture
    w: int
    h: int


def _layout_rects(width: int, height: int, top_k: int) -> tuple[Rect, list[Rect], Rect]:
    """Pixel rectangles of the query view, the result views and the table, in the proportions of
    ``scene.results_layout_xml`` (top 600 : table 200; query rows*100 : results per_row*100)."""
    rows, per_row = sc.results_grid(top_k)
    top_h = round(height * 600 / 800)
    query_w = round(width * rows / (rows + per_row))
    query = Rect(0, 0, query_w - GAP_PX, top_h - GAP_PX)
    cell_w = (width - query_w) / per_row
    cell_h = top_h / rows
    results = []
    for i in range(top_k):
        r, c = divmod(i, per_row)
        x0, y0 = query_w + round(c * cell_w), round(r * cell_h)
        x1, y1 = query_w + round((c + 1) * cell_w), round((r + 1) * cell_h)
        results.append(Rect(x0, y0, x1 - x0 - GAP_PX, y1 - y0 - GAP_PX))
    return query, results, Rect(0, top_h, width, height - top_h)


def _slice_image(ctx: scenario.SceneContext, layout_name: str, w: int, h: int) -> np.ndarray:
    """The view's blended layers as Slicer's slice logic computes them: RGB uint8 (h, w), top row first."""
    node = sc.slice_node_by_layout_name(ctx.scene, layout_name)
    logic = slicer.vtkMRMLSliceLogic()
    logic.SetMRMLScene(ctx.scene)
    logic.SetSliceNode(node)
    node.SetDimensions(w, h, 1)
    producer = logic.GetImageDataConnection().GetProducer()
    producer.Update()
    image = producer.GetOutputDataObject(0)
    dims = image.GetDimensions()
    rgba = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[1], dims[0], -1)
    ctx.keep.append(logic)
    return np.ascontiguousarray(rgba[::-1, :, :3])


def _fit(ctx: scenario.SceneContext, layout_name: str, volume: Any, w: int, h: int, k: int) -> None:
    """Fit the view's field of view to ``volume`` (as Slicer's fit does) and go to axial slice ``k``."""
    node = sc.slice_node_by_layout_name(ctx.scene, layout_name)
    node.SetDimensions(w, h, 1)
    bounds = [0.0] * 6
    volume.GetRASBounds(bounds)
    size = max(bounds[1] - bounds[0], bounds[3] - bounds[2]) * 0.92
    aspect = w / h
    fov = (size * aspect, size) if aspect >= 1 else (size, size / aspect)
    node.SetFieldOfView(fov[0], fov[1], node.GetFieldOfView()[2])
    sc.jump_to_axial_slice(ctx.scene, layout_name, volume, k)


def _text(
    renderer: Any,
    text: str,
    x: int,
    y_top: int,
    height: int,
    size: int,
    color: tuple[float, float, float],
    bold: bool = False,
) -> None:
    actor = vtk.vtkTextActor()
    actor.SetInput(text)
    prop = actor.GetTextProperty()
    prop.SetFontSize(size)
    prop.SetColor(*color)
    prop.SetBold(bold)
    prop.SetFontFamilyToArial()
    prop.SetVerticalJustificationToTop()
    actor.SetDisplayPosition(x, height - y_top)
    renderer.AddViewProp(actor)


def render_layout(
    ctx: scenario.SceneContext,
    query: ViewContent,
    results: Sequence[ViewContent],
    table_rows: Sequence[Sequence[str]],
    out_png: str | Path,
    width: int = 1600,
    height: int = 900,
    note: str = "",
) -> Path:
    """Draw the results layout (query view, result views, table) into ``out_png`` with offscreen VTK;
    ``note``: one line under the label legend (the search settings)."""
    q_rect, r_rects, t_rect = _layout_rects(width, height, len(results))
    canvas = np.full((height, width, 3), 32, np.uint8)  # the gaps between views, as in Slicer's dark theme
    texts: list[tuple[str, int, int, int, tuple[float, float, float], bool]] = []
    for content, rect in [(query, q_rect), *zip(results, r_rects)]:
        bar = Rect(rect.x, rect.y, rect.w, BAR_PX)
        view = Rect(rect.x, rect.y + BAR_PX, rect.w, rect.h - BAR_PX)
        canvas[bar.y : bar.y + bar.h, bar.x : bar.x + bar.w] = np.asarray(content.color) * 255
        canvas[view.y : view.y + view.h, view.x : view.x + view.w] = _slice_image(
            ctx, content.layout_name, view.w, view.h
        )
        texts.append((content.label, bar.x + 6, bar.y + 3, 14, (1, 1, 1), True))
        texts.append((content.caption, bar.x + 30, bar.y + 4, 12, (1, 1, 1), False))
        for i, line in enumerate(reversed(content.corner)):
            texts.append((line, view.x + 6, view.y + view.h - 18 * (i + 1), 12, (1, 1, 0.55), False))
    # the results table (qMRMLTableView look): header, one row per result
    canvas[t_rect.y : t_rect.y + t_rect.h, t_rect.x : t_rect.x + t_rect.w] = 250
    row_h = min(26, (t_rect.h - 8) // (len(table_rows) + 1))
    columns = [16, 110, 330, 450, 620]
    canvas[t_rect.y : t_rect.y + row_h, :] = 225
    for r, row in enumerate(table_rows):
        y = t_rect.y + r * row_h
        if r > 0 and r % 2 == 0:
            canvas[y : y + row_h, :] = 240
        for c, cell in enumerate(row):
            texts.append((cell, columns[c], y + 5, 13, (0.1, 0.1, 0.1), r == 0))
    # legend of the label colours (the project's vocabulary), right of the table
    x = width // 2
    texts.append(("Tumour labels:", x, t_rect.y + 8, 13, (0.1, 0.1, 0.1), True))
    for i, cls in enumerate(sorted(ABNORMAL_SEGMENT_IDS)):
        name = ABNORMAL_SEGMENT_IDS[cls][1]
        y = t_rect.y + 34 + 24 * i
        canvas[y : y + 16, x : x + 16] = np.asarray(ABNORMAL_COLORS[cls]) * 255
        texts.append((name, x + 24, y, 13, (0.1, 0.1, 0.1), False))
    if note:
        texts.append(
            (note, x, t_rect.y + 34 + 24 * len(ABNORMAL_SEGMENT_IDS) + 10, 12, (0.3, 0.3, 0.3), False)
        )

    image = vtk.vtkImageData()
    image.SetDimensions(width, height, 1)
    flat = np.ascontiguousarray(canvas[::-1]).reshape(-1, 3)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(flat, deep=True))
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(width, height)
    renderer = vtk.vtkRenderer()
    window.AddRenderer(renderer)
    actor = vtk.vtkImageActor()
    actor.GetMapper().SetInputData(image)
    renderer.AddActor(actor)
    camera = renderer.GetActiveCamera()
    camera.ParallelProjectionOn()
    camera.SetFocalPoint((width - 1) / 2, (height - 1) / 2, 0)
    camera.SetPosition((width - 1) / 2, (height - 1) / 2, 1000)
    camera.SetParallelScale(height / 2)
    for text, x, y, size, color, bold in texts:
        _text(renderer, text, x, y, height, size, color, bold)
    window.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.Update()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    writer = vtk.vtkPNGWriter()
    writer.SetFileName(str(out_png))
    writer.SetInputConnection(grab.GetOutputPort())
    writer.Write()
    return out_png


def build_scene(
    ctx: scenario.SceneContext,
    bundle_dir: Path,
    db_dir: Path,
    query_cohort: Path,
    top_k: int,
    sequence: str = "flair",
    size: tuple[int, int] = (1600, 900),
) -> tuple[ViewContent, list[ViewContent], list[list[str]]]:
    """Load, encode and search as the panel does; fill the views. Returns what to draw."""
    from fdn_core.data.readers import CaseFiles, find_cases
    from FDNRetrievalLib import workflow as wf

    resources = wf.open_resources(bundle_dir, db_dir, device="cpu")
    cases = [c for c in find_cases(query_cohort) if c.seg is not None]
    files = cases[0]
    nodes = scenario.load_case_nodes(ctx, files)
    study = sc.read_study(nodes)
    encoded = wf.encode_study(resources.bundle, study.image, study.affine)
    area = (encoded.seg > 0).sum(axis=(0, 1))
    k = int(np.argmax(area)) if area.any() else study.shape[2] // 2
    engine = wf.make_search_engine(resources.database)
    hits = wf.search_study(engine, encoded, wf.SearchSettings(k, mode="both", top_k=top_k))
    # the predicted tumour of the query as a label layer (in Slicer: the segmentation node, same colours)
    predicted = sc.add_scalar_volume(
        ctx.scene,
        study.to_reference_grid(encoded.seg.astype(np.uint8)),
        study.reference_ijk_to_ras,
        f"{study.reference_name} predicted abnormal",
        "abnormal-segmentation",
        labelmap=True,
    )
    predicted.GetDisplayNode().SetAndObserveColorNodeID(sc.label_color_table(ctx.scene, "classes").GetID())
    ctx.layout_node.SetViewArrangement(sc.register_results_layout(ctx.layout_node, len(hits)))
    q_rect, r_rects, _t = _layout_rects(size[0], size[1], len(hits))
    sc.assign_view_volumes(ctx.scene, sc.QUERY_VIEW, nodes[sequence], predicted, label_opacity=0.45)
    _fit(ctx, sc.QUERY_VIEW, nodes[sequence], q_rect.w, q_rect.h - BAR_PX, 0)
    sc.jump_to_study_slice(ctx.scene, sc.QUERY_VIEW, study, k)
    query = ViewContent(
        sc.QUERY_VIEW,
        "Q",
        QUERY_COLOR,
        f"Query: {files.case_id}, axial slice {k} ({sequence.upper()}, predicted tumour overlaid)",
        [f"B: {nodes[sequence].GetName()}", f"L: {predicted.GetName()}"],
    )
    results = []
    rows = [["rank", "case", "slice", "distance"]]
    for hit, view, rect in zip(hits, sc.result_view_names(len(hits)), r_rects):
        files_of_hit = CaseFiles.from_database(resources.database, hit.case_id)
        case = sc.load_reference_case(ctx.scene, ctx.volumes_logic, files_of_hit, sequence)
        sc.assign_view_volumes(ctx.scene, view, case.volume, case.labels, label_opacity=0.45)
        _fit(ctx, view, case.volume, rect.w, rect.h - BAR_PX, hit.slice_index)
        results.append(
            ViewContent(
                view,
                str(hit.rank),
                RESULT_COLOR,
                f"{hit.case_id}, slice {hit.slice_index}, d {hit.distance:.2f}",
                [f"B: {case.volume.GetName()}", f"L: {case.labels.GetName()}" if case.labels else ""],
            )
        )
        rows.append([str(hit.rank), hit.case_id, str(hit.slice_index), f"{hit.distance:.3f}"])
    return query, results, rows


def main(argv: Sequence[str] | None = None) -> int:
    """Build what is missing (demo database, a query study), then render the picture."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "slicer-results-layout.png")
    parser.add_argument("--demo-root", type=Path, default=None, help="folder holding demo/ (built if absent)")
    parser.add_argument("--top", type=int, default=6)
    parser.add_argument("--query-seed", type=int, default=77, help="seed of the phantom used as the query")
    args = parser.parse_args(argv)
    from fdn_core.data.phantom import generate_cohort
    from fdn_core.data.readers import find_cases, load_case, write_brats_case
    from fdn_core.progress import tqdm_progress
    from fdn_core.resources import shipped_model_dir
    from FDNRetrievalLib import demo

    with tempfile.TemporaryDirectory(prefix="fdn-screenshot-") as tmp:
        root = args.demo_root or Path(tmp) / "demo-root"
        status = demo.demo_status(root)
        if not status.ready:
            status = demo.build_demo(root, progress=tqdm_progress())
        assert status.database is not None and status.cohort is not None
        plan = status.record.get("plan", {})
        # a study that is not in the database: another seed, same grid, its own name
        phantoms = Path(tmp) / "phantoms"
        shape = tuple(plan.get("shape", (120, 120, 78)))
        generate_cohort(phantoms, 2, seed=args.query_seed, shape=shape, workers=1)
        source = next(c for c in find_cases(phantoms) if c.seg is not None)
        case = load_case(source)
        query_cohort = Path(tmp) / "query"
        write_brats_case(query_cohort / "study_A", "study_A", case.image, seg=case.seg, affine=case.affine)
        ctx = scenario.make_scene_context()
        query, results, rows = build_scene(
            ctx, shipped_model_dir("demo"), status.database, query_cohort, args.top
        )
        note = (
            "Similar in: both (normal + abnormal), euclidean distance, one result per case.\n"
            f"Shipped demo model; demo database of {status.record.get('n_cases')} phantom cases built on "
            "first use."
        )
        out = render_layout(ctx, query, results, rows, args.out, note=note)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
