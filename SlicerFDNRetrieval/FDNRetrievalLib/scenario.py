"""The end-to-end scenario shared by ``Testing/test_slicer_logic.py`` (pytest, slicer-core) and the module's
self-test inside Slicer (``SlicerFDNRetrievalTest.runTest``): the same body, the scene passed in.

``build_fixture`` makes a tiny real model bundle (a freshly initialised, seeded FDN saved with
``save_bundle``), indexes a small cohort into a code database with ``index_cohort``, and builds a second
model + database for the fingerprint-mismatch check. ``run_scenario`` loads one case's four volumes through
the Volumes logic, encodes, searches and shows results, checking every created node; ``run_bad_input_checks``
feeds it what a radiologist can get wrong. Failures raise ``AssertionError`` with what was expected.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import vtk

from fdn_core.codes.search import Query
from fdn_core.data.readers import (
    CaseFiles,
    find_cases,
    load_case,
    resample_to_grid,
    to_canonical,
    write_brats_case,
)
from fdn_core.errors import DataError, ModelMismatchError
from fdn_core.labels import MIN_LESION_ML, MODALITIES, context_slices
from fdn_core.model.bundle import save_untrained_bundle
from fdn_core.model.lesions import remove_small_lesions

from . import scene as sc
from . import workflow as wf
from .naming import match_sequence_nodes

__all__ = [
    "Fixture",
    "SceneContext",
    "build_fixture",
    "load_case_nodes",
    "make_scene_context",
    "run_bad_input_checks",
    "run_scenario",
    "write_synthetic_cohort",
]


def _check(condition: Any, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def _expect_error(kind: type[BaseException], words: tuple[str, ...], fn: Callable[[], Any]) -> str:
    """Run ``fn``; it must raise ``kind`` with every one of ``words`` in its message (case-insensitive)."""
    try:
        fn()
    except kind as exc:
        text = str(exc)
        for word in words:
            _check(word.lower() in text.lower(), f"error message {text!r} should mention {word!r}")
        return text
    raise AssertionError(f"expected {kind.__name__} mentioning {words}, but nothing was raised")


# ------------------------------------------------------------------------------------------------ scene


@dataclass
class SceneContext:
    """The scene and the module logics the library needs (Slicer's own, or slicer-core's)."""

    scene: Any
    volumes_logic: Any
    segmentations_logic: Any
    layout_node: Any
    keep: list[Any] = field(default_factory=list)


def make_scene_context() -> SceneContext:
    """A scene with Slicer's real MRML logics but no Qt (slicer-core): for tests outside the application.

    Follows the recipe that loads without errors: application logic; its colour logic with the default
    colour nodes; Volumes, Segmentations and Subject hierarchy logics registered with it; a layout logic.
    """
    import slicer

    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    colors = app.GetColorLogic()
    colors.SetMRMLScene(scene)
    colors.AddDefaultColorNodes()
    app.SetModuleLogic("Colors", colors)
    logics = {}
    for name, cls in (
        ("Volumes", slicer.vtkSlicerVolumesLogic),
        ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
        ("SubjectHierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic),
    ):
        logic = cls()
        logic.SetMRMLScene(scene)
        logic.SetMRMLApplicationLogic(app)
        app.SetModuleLogic(name, logic)
        logics[name] = logic
    layout_logic = slicer.vtkMRMLLayoutLogic()
    layout_logic.SetMRMLScene(scene)
    slicer.mrmlScene = scene  # slicer.util helpers look for it
    return SceneContext(
        scene=scene,
        volumes_logic=logics["Volumes"],
        segmentations_logic=logics["Segmentations"],
        layout_node=layout_logic.GetLayoutNode(),
        keep=[app, colors, layout_logic, *logics.values()],
    )


def load_case_nodes(ctx: SceneContext, files: CaseFiles, suffix: str = "") -> dict[str, Any]:
    """Load a BraTS-layout case's four volumes through the Volumes logic; node names ``<case>_<mod>``."""
    images = files.images
    if files.layout != "brats" or images is None:
        raise AssertionError(f"case {files.case_id} is not in BraTS layout")
    nodes = {}
    for key in MODALITIES:
        node = ctx.volumes_logic.AddArchetypeVolume(str(images[key]), f"{files.case_id}_{key}{suffix}", 0)
        _check(node is not None, f"the Volumes logic could not load {images[key]}")
        nodes[key] = node
    return nodes


# ---------------------------------------------------------------------------------------------- fixture


def write_synthetic_cohort(
    out_dir: str | Path, n_cases: int = 3, seed: int = 0, shape: tuple[int, int, int] = (48, 56, 24)
) -> Path:
    """A small cohort of ellipsoid 'brains' (three tissue intensities per sequence), tumours in all but the
    first case, in BraTS layout with a left-handed (LPS-like) affine. Used where nilearn's template (and so
    the realistic phantom) is not installed, e.g. inside Slicer's self-test."""
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, s) for s in shape), indexing="ij")
    affine = np.array([[-1.5, 0, 0, 40.0], [0, -1.2, 0, 35.0], [0, 0, 2.5, -30.0], [0, 0, 0, 1]])
    contrasts = {"t1": (300, 500, 700, 900), "t1ce": (320, 520, 720, 1400), "t2": (900, 600, 400, 1100),
                 "flair": (200, 600, 450, 1000)}  # fmt: skip
    for i in range(n_cases):
        r = 0.85 + 0.1 * rng.random(3)
        brain = (x / r[0]) ** 2 + (y / r[1]) ** 2 + (z / r[2]) ** 2 < 1
        white = (x / (0.6 * r[0])) ** 2 + (y / (0.6 * r[1])) ** 2 + (z / (0.7 * r[2])) ** 2 < 1
        seg = np.zeros(shape, np.uint8)
        if i > 0:
            c = rng.uniform(-0.35, 0.35, 3)
            d = np.sqrt(((x - c[0]) / 0.3) ** 2 + ((y - c[1]) / 0.3) ** 2 + ((z - c[2]) / 0.45) ** 2)
            seg[(d < 1.0) & brain] = 2
            seg[(d < 0.6) & brain] = 3
            seg[(d < 0.3) & brain] = 1
        image = np.zeros((len(MODALITIES), *shape), np.float32)
        for ch, key in enumerate(MODALITIES):
            grey, wm, csf, tumour = contrasts[key]
            vol = np.where(white, wm, grey).astype(np.float32)
            vol[(np.abs(x) < 0.08) & brain] = csf
            vol[seg > 0] = tumour
            vol += rng.normal(0, 15, shape).astype(np.float32)
            image[ch] = np.where(brain, np.maximum(vol, 1.0), 0.0)
        case_id = f"Synth_{i:03d}"
        write_brats_case(out_dir / case_id, case_id, image, seg=seg, affine=affine)
    return out_dir


@dataclass
class Fixture:
    """Paths of the tiny cohort, model, database, and the second model + database (another fingerprint)."""

    cohort_dir: Path
    bundle_dir: Path
    db_dir: Path
    other_bundle_dir: Path
    other_db_dir: Path
    query_case: str


def build_fixture(work_dir: str | Path, cohort_dir: str | Path | None = None, seed: int = 0) -> Fixture:
    """Tiny model bundle + database of ``cohort_dir`` (synthetic when None), all under ``work_dir``."""
    from fdn_core.model.bundle import load_bundle
    from fdn_core.retrieval import index_cohort

    work_dir = Path(work_dir)
    cohort = (
        Path(cohort_dir) if cohort_dir is not None else write_synthetic_cohort(work_dir / "cohort", seed=seed)
    )
    cases = sorted(c.case_id for c in find_cases(cohort))
    bundle_dir = save_untrained_bundle(work_dir / "model", seed)
    index_cohort(load_bundle(bundle_dir, device="cpu"), cohort, work_dir / "db")
    other_dir = save_untrained_bundle(work_dir / "other_model", seed + 1)
    index_cohort(
        load_bundle(other_dir, "cpu"), cohort, work_dir / "other_db", cases=cases[:1], fit_hamming=False
    )
    return Fixture(cohort, bundle_dir, work_dir / "db", other_dir, work_dir / "other_db", cases[-1])


# --------------------------------------------------------------------------------------------- scenario


def _slice_node(scene: Any, name: str) -> Any:
    node = sc.slice_node_by_layout_name(scene, name)
    if node is None:
        raise AssertionError(f"the scene has no {name} slice view")
    return node


def _canonical_voxels(node: Any) -> np.ndarray:
    return to_canonical(sc.node_voxels(node), sc.node_ijk_to_ras(node))[0]


def _matrix(node: Any) -> np.ndarray:
    return sc.node_ijk_to_ras(node)


def _same_grid(node: Any, reference: Any, what: str) -> None:
    _check(
        np.allclose(_matrix(node), _matrix(reference), atol=1e-6),
        f"{what}: IJK-to-RAS {_matrix(node).tolist()} differs from the input's {_matrix(reference).tolist()}",
    )
    dims, ref_dims = node.GetImageData().GetDimensions(), reference.GetImageData().GetDimensions()
    _check(dims == ref_dims, f"{what}: dimensions {dims} differ from the input's {ref_dims}")


def _encode(
    resources: wf.Resources, study: sc.StudyVolumes
) -> tuple[wf.EncodedStudy, wf.TaskStatus, list[tuple[int, int, str]]]:
    """Encode in a worker thread exactly as the GUI does, recording the progress reports."""
    reports: list[tuple[int, int, str]] = []
    batch = wf.choose_batch_size(resources.bundle)

    def work(progress: Any) -> wf.EncodedStudy:
        inner = progress.callback

        def record(done: int, total: int, message: str) -> None:
            reports.append((done, total, message))
            inner(done, total, message)

        progress.callback = record
        return wf.encode_study(
            resources.bundle, study.image, study.affine, batch_size=batch, progress=progress
        )

    task = wf.BackgroundTask(work, name="scenario encode").start()
    status = task.wait(timeout=600)
    return task.result(), status, reports


def run_scenario(ctx: SceneContext, fixture: Fixture, top_k: int = 3) -> dict[str, Any]:
    """Load, encode, publish, search and display one study; check every result. Returns measurements."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    scene = ctx.scene
    files = {c.case_id: c for c in find_cases(fixture.cohort_dir)}
    query_files = files[fixture.query_case]
    nodes = load_case_nodes(ctx, query_files)

    # 1. the panel pre-fills the four selectors from the node names
    volumes = [
        scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
        for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"))
    ]
    found = match_sequence_nodes(volumes)
    for key in MODALITIES:
        _check(
            found[key] is nodes[key],
            f"{key} selector pre-filled with {getattr(found[key], 'GetName', str)()}",
        )

    # 2. the study: four channels on one grid, canonical orientation equal to fdn_core's reader
    study = sc.read_study(nodes)
    _check(not study.warnings and not study.resampled, f"unexpected warnings {study.warnings}")
    reference = load_case(query_files)
    _check(
        np.allclose(study.image, reference.image, atol=1e-4)
        and np.allclose(study.affine, reference.affine, atol=1e-4),
        "the study read from the scene differs from the same files read by fdn_core.data.readers",
    )

    # 3. model and database (hash-verified, same fingerprint), encoding in a worker thread
    resources = wf.open_resources(fixture.bundle_dir, fixture.db_dir, device="cpu")
    t1 = time.perf_counter()
    encoded, status, reports = _encode(resources, study)
    timings["encode_s"] = time.perf_counter() - t1
    z = study.shape[2]
    _check(status.finished and status.error is None, f"encoding did not finish cleanly: {status}")
    _check(reports and reports[-1][0] == reports[-1][1], f"progress never reached its total: {reports[-3:]}")
    _check(
        encoded.num_slices == z and encoded.seg.shape == study.shape, "encoded shapes do not match the study"
    )
    _check(
        encoded.recon_normal is not None and encoded.recon_normal.shape == study.image.shape,
        "no reconstruction",
    )
    # the segmentation shows no speck: nothing below the size rule (80 % of it, for the resampling to the
    # study's grid) is left, and the abnormal-slice flags are those of the shown segmentation
    voxel_ml = float(np.prod(np.sqrt((study.affine[:3, :3] ** 2).sum(axis=0)))) / 1000.0
    specks = remove_small_lesions(encoded.seg, voxel_ml, 0.8 * MIN_LESION_ML)[1]
    _check(
        encoded.lesions.min_ml == MIN_LESION_ML and specks.removed == 0,
        f"the segmentation keeps {specks.removed} lesion(s) under the size rule ({encoded.lesions})",
    )
    _check(
        np.array_equal(encoded.has_abnormal, encoded.seg.reshape(-1, z).any(axis=0)),
        "the abnormal-slice flags differ from the segmentation shown",
    )
    indexed = wf.find_indexed_case(resources.database, encoded)
    _check(
        indexed == fixture.query_case,
        f"the study is case {fixture.query_case} of the database, found {indexed}",
    )

    # 4. results as nodes on the input grid, in a subject-hierarchy folder
    segmentation = sc.add_abnormal_segmentation(
        scene, ctx.segmentations_logic, encoded.seg, study, "query abnormal"
    )
    recon_normal = encoded.recon_normal
    if recon_normal is None:
        raise AssertionError("the encoding made no reconstruction")
    recon = sc.add_reconstruction(scene, recon_normal, study, "query")
    folder = sc.put_in_folder(scene, "FDN results - query", [segmentation, *recon])
    seg_model = segmentation.GetSegmentation()
    names = [seg_model.GetSegment(sid).GetName() for sid, _n, _c in sc.ABNORMAL_SEGMENTS]
    _check(
        seg_model.GetNumberOfSegments() == 3 and names == ["NCR/NET", "Oedema", "Enhancing"],
        f"segments {names}",
    )
    for value, (segment_id, name, colour) in enumerate(sc.ABNORMAL_SEGMENTS, 1):
        _check(np.allclose(seg_model.GetSegment(segment_id).GetColor(), colour), f"segment {name} colour")
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", f"export {name}")
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segment_id)
        ctx.segmentations_logic.ExportSegmentsToLabelmapNode(segmentation, ids, labelmap, nodes["t1ce"])
        _same_grid(labelmap, nodes["t1ce"], f"segment {name}")
        exported = _canonical_voxels(labelmap) > 0
        _check(
            np.array_equal(exported, encoded.seg == value),
            f"segment {name} differs from the predicted labels",
        )
        scene.RemoveNode(labelmap)
    for c, node in enumerate(recon):
        _same_grid(node, nodes["t1ce"], node.GetName())
        _check(
            np.allclose(_canonical_voxels(node), recon_normal[c], atol=1e-4),
            f"{node.GetName()} content",
        )
    sh = sc._subject_hierarchy(scene)
    if sh is not None:
        _check(folder != 0, "no subject-hierarchy folder was made")
        for node in (segmentation, *recon):
            _check(
                sh.GetItemParent(sh.GetItemByDataNode(node)) == folder,
                f"{node.GetName()} is not in the folder",
            )

    # 5. query slice from the red view (RAS -> canonical axial index), and from a voxel index
    red = _slice_node(scene, "Red")
    for k in sorted({0, z // 2, z - 1}):
        red.SetOrientation("Axial")
        red.JumpSliceByCentering(*sc.ras_of_axial_slice(study.affine, study.shape, k))
        got = sc.axial_index_from_ras(study.affine, study.shape, sc.slice_view_center(scene, "Red"))
        _check(got == k, f"red view on slice {k} was read as slice {got}")
    shape_ijk = study.reference_shape
    ids_volume = np.arange(int(np.prod(shape_ijk))).reshape(shape_ijk)
    canonical_ids = to_canonical(ids_volume, study.reference_ijk_to_ras)[0]
    for ijk in ((0, 0, 0), tuple(s - 1 for s in shape_ijk), tuple(s // 3 for s in shape_ijk)):
        expected = int(np.argwhere(canonical_ids == ids_volume[ijk])[0][2])
        got = sc.axial_index_from_ijk(study.reference_ijk_to_ras, shape_ijk, ijk)
        _check(got == expected, f"voxel {ijk} is canonical axial slice {expected}, got {got}")

    # 6. search: volume-wise, slice-wise, composite, every distance
    engine = wf.make_search_engine(resources.database, resources.bundle)
    area = (encoded.seg > 0).sum(axis=(0, 1))
    q = int(np.argmax(area)) if area.any() else z // 2
    n_other = len(files) - 1
    results = {}
    for distance in engine.offered_distances:
        for volume_wise in (True, False):
            settings = wf.SearchSettings(
                query_slice=q,
                mode="both",
                distance=distance,
                top_k=top_k,
                volume_wise=volume_wise,
                exclude_case=indexed,
            )
            hits = wf.search_study(engine, encoded, settings)
            expected_n = min(top_k, n_other) if volume_wise else top_k
            _check(len(hits) == expected_n, f"{distance}: {len(hits)} hits, expected {expected_n}")
            _check([h.rank for h in hits] == list(range(1, len(hits) + 1)), "ranks are not 1..K")
            _check(all(a.distance <= b.distance for a, b in itertools.pairwise(hits)), "hits are not sorted")
            _check(all(h.case_id != indexed for h in hits), "the query's own case was returned")
            if volume_wise:
                _check(len({h.case_id for h in hits}) == len(hits), "volume-wise search repeated a case")
            results[(distance, volume_wise)] = hits
    for mode in ("normal", "abnormal"):
        hits = wf.search_study(
            engine, encoded, wf.SearchSettings(q, mode=mode, top_k=top_k, exclude_case=indexed)
        )
        _check(len(hits) == min(top_k, n_other), f"mode {mode}: {len(hits)} hits")
    # axial context: the engine's search with the study's neighbouring slices (the abnormal term unchanged)
    around = wf.SearchSettings(q, mode="normal", top_k=top_k, exclude_case=indexed, axial_context=True)
    hits = wf.search_study(engine, encoded, around)
    neighbours = encoded.normal[context_slices(q, z)]
    direct = engine.search(
        Query(encoded.normal[q], exclude_cases=(indexed,) if indexed else (), normal_context=neighbours),
        mode="normal",
        top=top_k,
        context=True,
    )
    _check(hits == direct, "a search with axial context must compare the study's neighbouring slices")
    _check(len(hits) == min(top_k, n_other), f"axial context: {len(hits)} hits")
    # the lesion filter (the panel's "References"): only slices whose lesion flag is False, or True; with the
    # axial context too, and each search the engine's own
    db = resources.database
    flagged = {
        (c, int(k)): bool(f)
        for c in db.cases
        for k, f in zip(db.slice_indices[db.case_rows(c)], db.has_abnormal[db.case_rows(c)], strict=True)
    }
    for lesion, keep in (("without", False), ("with", True)):
        for context in (False, True):
            settings = wf.SearchSettings(
                q, mode="normal", top_k=top_k, exclude_case=indexed, axial_context=context, lesion=lesion
            )
            hits = wf.search_study(engine, encoded, settings)
            direct = engine.search(
                Query(
                    encoded.normal[q], exclude_cases=(indexed,) if indexed else (), normal_context=neighbours
                ),
                mode="normal",
                top=top_k,
                context=context,
                lesion=lesion,
            )
            _check(hits == direct, f"references {lesion} lesion: not the engine's filtered search")
            _check(hits != [], f"references {lesion} lesion: no hits")
            _check(
                all(flagged[(h.case_id, h.slice_index)] is keep for h in hits),
                f"references {lesion} lesion returned {[(h.case_id, h.slice_index) for h in hits]}",
            )
    other = (q + z // 3) % z
    composite = wf.search_study(
        engine,
        encoded,
        wf.SearchSettings(q, mode="abnormal", top_k=top_k, abnormal_slice=other, exclude_case=indexed),
    )
    plain_other = wf.search_study(
        engine, encoded, wf.SearchSettings(other, mode="abnormal", top_k=top_k, exclude_case=indexed)
    )
    _check(
        composite == plain_other, "an abnormal-mode composite query must use the other slice's abnormal code"
    )
    hits = results[("euclidean", True)]

    # 7. the results table
    table = sc.write_results_table(scene, hits, "FDN retrieval results")
    data = table.GetTable()
    columns = [data.GetColumn(i).GetName() for i in range(data.GetNumberOfColumns())]
    _check(columns == list(sc.TABLE_COLUMNS), f"table columns {columns}")
    _check(
        data.GetNumberOfRows() == len(hits), f"table has {data.GetNumberOfRows()} rows for {len(hits)} hits"
    )
    for row, hit in enumerate(hits):
        _check(sc.read_table_row(table, row) == (hit.case_id, hit.slice_index), f"table row {row}")
        _check(int(data.GetValue(row, 0).ToInt()) == hit.rank, f"table row {row} rank")
        _check(abs(data.GetValue(row, 3).ToDouble() - hit.distance) < 1e-9, f"table row {row} distance")

    # 8. the results layout: query view + one view per hit, reference volumes loaded where the database says
    layout_id = sc.register_results_layout(ctx.layout_node, len(hits))
    ctx.layout_node.SetViewArrangement(layout_id)
    table_view = sc.show_table_in_view(scene, table)
    _check(table_view is not None and table_view.GetTableNodeID() == table.GetID(), "table not in the layout")
    sc.assign_view_volumes(scene, sc.QUERY_VIEW, nodes["flair"])
    sc.jump_to_study_slice(scene, sc.QUERY_VIEW, study, q)
    sc.show_only_in_views(scene, segmentation, ["Red", "Green", "Yellow", sc.QUERY_VIEW])
    display = segmentation.GetDisplayNode()
    for name, expected in (("Red", True), (sc.QUERY_VIEW, True), (sc.result_view_names(1)[0], False)):
        view_id = _slice_node(scene, name).GetID()
        _check(
            bool(display.IsDisplayableInView(view_id)) == expected,
            f"segmentation shown in {name}: {not expected}",
        )
    shown = sc.axial_index_from_ras(study.affine, study.shape, sc.slice_view_center(scene, sc.QUERY_VIEW))
    _check(shown == q, f"the query view shows slice {shown}, not {q}")
    flair = MODALITIES.index("flair")
    for hit, view in zip(hits, sc.result_view_names(len(hits))):
        source = CaseFiles.from_database(resources.database, hit.case_id)
        case = sc.load_reference_case(scene, ctx.volumes_logic, source, "flair")
        count = scene.GetNumberOfNodes()
        again = sc.load_reference_case(scene, ctx.volumes_logic, source, "flair")
        _check(
            again.volume is case.volume and scene.GetNumberOfNodes() == count,
            "a loaded case was loaded again",
        )
        sc.assign_view_volumes(scene, view, case.volume, case.labels)
        sc.jump_to_axial_slice(scene, view, case.volume, hit.slice_index)
        shown = sc.displayed_axial_index(scene, view, case.volume)
        _check(shown == hit.slice_index, f"view {view} shows slice {shown}, not {hit.slice_index}")
        truth = load_case(source)
        displayed = _canonical_voxels(case.volume)[..., hit.slice_index]
        _check(
            np.allclose(displayed, truth.image[flair][..., hit.slice_index], atol=1e-5),
            f"case {hit.case_id} slice {hit.slice_index}: the loaded volume differs from the database's "
            "source file",
        )
        if truth.seg is not None:
            _check(case.labels is not None, f"case {hit.case_id} has labels but none were overlaid")
            labels = _canonical_voxels(case.labels)[..., hit.slice_index].astype(np.int64)
            classes = np.select([labels == 1, labels == 2, labels == 4], [1, 2, 3], 0)
            _check(
                np.array_equal(classes, truth.seg[..., hit.slice_index]), f"case {hit.case_id} labels differ"
            )

    # 9. zooming one view zooms the others
    views = [sc.QUERY_VIEW, *sc.result_view_names(len(hits))]
    link = sc.FieldOfViewLink(scene, views)
    query_node = _slice_node(scene, sc.QUERY_VIEW)
    query_node.SetFieldOfView(123.0, 123.0, query_node.GetFieldOfView()[2])
    spacing = 123.0 / query_node.GetDimensions()[0]
    for name in views[1:]:
        node = _slice_node(scene, name)
        fov, dims = node.GetFieldOfView(), node.GetDimensions()
        want = (spacing * dims[0], spacing * dims[1])
        _check(
            np.allclose(fov[:2], want), f"view {name} did not follow the zoom: {fov[:2]} instead of {want}"
        )
    link.remove()
    timings["total_s"] = time.perf_counter() - t0
    return {"num_hits": len(hits), "num_slices": z, "query_slice": q, "hits": hits, **timings}


def run_bad_input_checks(ctx: SceneContext, fixture: Fixture) -> dict[str, str]:
    """What a radiologist can get wrong must give a clear message (or a warning and a resample)."""
    scene = ctx.scene
    files = {c.case_id: c for c in find_cases(fixture.cohort_dir)}
    nodes = load_case_nodes(ctx, files[fixture.query_case], suffix=" (bad-input check)")
    messages: dict[str, str] = {}

    # missing sequence; the same series twice
    messages["missing"] = _expect_error(
        DataError, ("FLAIR", "load"), lambda: sc.read_study({**nodes, "flair": None})
    )
    messages["duplicate"] = _expect_error(
        DataError, ("same volume",), lambda: sc.read_study({**nodes, "t2": nodes["t1"]})
    )

    # a sequence on another grid (half the in-plane resolution): resampled onto the T1ce grid, with a warning
    t2 = sc.node_voxels(nodes["t2"])
    coarse_matrix = sc.node_ijk_to_ras(nodes["t2"]) @ np.diag([2.0, 2.0, 1.0, 1.0])
    coarse = sc.add_scalar_volume(scene, t2[::2, ::2, :], coarse_matrix, "coarse T2", "test-input")
    study = sc.read_study({**nodes, "t2": coarse})
    _check(study.resampled == ("t2",), f"resampled {study.resampled}")
    _check(any("T2" in w and "resampled" in w for w in study.warnings), f"warnings {study.warnings}")
    messages["resampled"] = study.warnings[0]
    # linear resampling is exact where the grids coincide (every second in-plane voxel of the T1ce grid)
    t1ce_matrix = sc.node_ijk_to_ras(nodes["t1ce"])
    on_grid = resample_to_grid(t2[::2, ::2, :], coarse_matrix, t1ce_matrix, t2.shape)
    _check(
        np.allclose(on_grid[::2, ::2, :], t2[::2, ::2, :], atol=1e-3), "resampling is not exact on the grid"
    )
    expected = to_canonical(on_grid, t1ce_matrix)[0]
    _check(np.allclose(study.image[MODALITIES.index("t2")], expected, atol=1e-4), "resampled T2 channel")

    # a 2D image and an empty (all-zero) volume
    flat = sc.add_scalar_volume(scene, t2[:, :, :1], sc.node_ijk_to_ras(nodes["t2"]), "flat T2", "test-input")
    messages["2d"] = _expect_error(DataError, ("T2", "2D"), lambda: sc.read_study({**nodes, "t2": flat}))
    empty = sc.add_scalar_volume(
        scene, np.zeros_like(t2), sc.node_ijk_to_ras(nodes["t2"]), "zero T2", "test-input"
    )
    messages["empty"] = _expect_error(
        DataError, ("T2", "empty"), lambda: sc.read_study({**nodes, "t2": empty})
    )

    # a volume that does not overlap the study at all
    far = sc.node_ijk_to_ras(nodes["t2"]).copy()
    far[:3, 3] += 5000.0
    away = sc.add_scalar_volume(scene, t2, far, "distant T2", "test-input")
    messages["no_overlap"] = _expect_error(
        DataError, ("overlap",), lambda: sc.read_study({**nodes, "t2": away})
    )

    # a position outside the study; an impossible search setting
    study = sc.read_study(nodes)
    top = sc.ras_of_axial_slice(study.affine, study.shape, study.shape[2] + 20)
    messages["outside"] = _expect_error(
        DataError, ("outside",), lambda: sc.axial_index_from_ras(study.affine, study.shape, top)
    )
    messages["top_k"] = _expect_error(DataError, ("top-K",), lambda: wf.SearchSettings(0, top_k=0))

    # a database built with another model is refused; no model chosen
    messages["fingerprint"] = _expect_error(
        ModelMismatchError,
        ("different model",),
        lambda: wf.open_resources(fixture.bundle_dir, fixture.other_db_dir, device="cpu"),
    )
    messages["no_model"] = _expect_error(DataError, ("model",), lambda: wf.open_resources("", fixture.db_dir))
    return messages
