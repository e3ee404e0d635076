"""The README's screenshot renderer (docs/tools/slicer_screenshot.py) on a tiny model and cohort: Slicer's
slice logic blends the views, offscreen VTK (Mesa EGL) draws the layout. Skipped without offscreen OpenGL."""

from __future__ import annotations

import importlib.util
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import vtk

from fdn_core.data.readers import find_cases
from fdn_core.model.bundle import load_bundle
from fdn_core.retrieval import index_cohort
from FDNRetrievalLib import scenario

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "tools" / "slicer_screenshot.py"


def _offscreen_rendering_works() -> bool:
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(8, 8)
    window.AddRenderer(vtk.vtkRenderer())
    try:
        window.Render()
    except Exception:  # pragma: no cover - depends on the machine's OpenGL
        return False
    return bool(window.SupportsOpenGL())


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """One intra-op thread: two OpenMP threads on our shared 2-core machines wait on each other at every layer
    (see test_slicer_gil.py); the picture does not depend on it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tool() -> Iterator[types.ModuleType]:
    if not _offscreen_rendering_works():
        pytest.skip("no offscreen OpenGL here (install libegl1, libegl-mesa0, libgl1-mesa-dri)")
    spec = importlib.util.spec_from_file_location("slicer_screenshot", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_results_layout_is_rendered(
    tool: types.ModuleType, tiny_cohort: Path, tiny_bundle: Path, tmp_path: Path
) -> None:
    db = tmp_path / "db"
    cases = sorted(c.case_id for c in find_cases(tiny_cohort))[:4]
    index_cohort(load_bundle(tiny_bundle, "cpu"), tiny_cohort, db, cases=cases, fit_hamming=False)
    ctx = scenario.make_scene_context()
    query, results, rows = tool.build_scene(ctx, tiny_bundle, db, tiny_cohort, top_k=3, size=(640, 360))
    assert [r.label for r in results] == ["1", "2", "3"] and len(rows) == 4
    out = tool.render_layout(ctx, query, results, rows, tmp_path / "layout.png", width=640, height=360)
    reader = vtk.vtkPNGReader()
    reader.SetFileName(str(out))
    reader.Update()
    image = reader.GetOutput()
    assert image.GetDimensions()[:2] == (640, 360)
    from vtk.util import numpy_support

    pixels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(360, 640, -1)[::-1]
    q_rect, r_rects, _table = tool._layout_rects(640, 360, 3)
    bar = pixels[q_rect.y + 2, q_rect.x + q_rect.w // 2, :3]
    assert np.allclose(bar, np.asarray(tool.QUERY_COLOR) * 255, atol=2), bar  # the query view's red bar
    view = pixels[q_rect.y + tool.BAR_PX : q_rect.y + q_rect.h, q_rect.x : q_rect.x + q_rect.w, :3]
    assert view.std() > 10  # a brain, not an empty view
    for rect in r_rects:
        result_view = pixels[rect.y + tool.BAR_PX : rect.y + rect.h, rect.x : rect.x + rect.w, :3]
        assert result_view.std() > 10
