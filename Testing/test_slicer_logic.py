"""The Slicer module's Qt-free library against Slicer's real MRML (slicer-core), headless.

The end-to-end body lives in ``FDNRetrievalLib.scenario`` so that the module's self-test inside Slicer runs
the very same scenario; this file adds checks that only make sense outside Slicer (install plan, name
matching, cancelling a background task, orientation of re-oriented files, the module file itself).
"""

from __future__ import annotations

import ast
import importlib.util
import py_compile
import sys
import threading
import types
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fdn_core.data.readers import find_cases, load_case, write_brats_case
from fdn_core.labels import DISTANCES, LESION_FILTER_LABELS, LESION_FILTERS, MIN_LESION_ML, MODALITIES
from fdn_core.progress import Cancelled
from FDNRetrievalLib import deps, naming, scenario, tasks, views
from FDNRetrievalLib import scene as sc
from FDNRetrievalLib import workflow as wf

MODULE_DIR = Path(__file__).resolve().parents[1] / "SlicerFDNRetrieval"


@pytest.fixture(scope="module")
def fixture(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> scenario.Fixture:
    """Tiny real model bundle + code database of the 64x64x40 phantom cohort (and a second model's)."""
    return scenario.build_fixture(tmp_path_factory.mktemp("slicer_fixture"), cohort_dir=tiny_cohort)


@pytest.fixture
def ctx() -> scenario.SceneContext:
    return scenario.make_scene_context()


def test_scenario_end_to_end(ctx: scenario.SceneContext, fixture: scenario.Fixture) -> None:
    report = scenario.run_scenario(ctx, fixture, top_k=3)
    assert report["num_hits"] == 3
    assert report["num_slices"] == 40


def test_bad_input(ctx: scenario.SceneContext, fixture: scenario.Fixture) -> None:
    messages = scenario.run_bad_input_checks(ctx, fixture)
    assert "FLAIR" in messages["missing"]
    assert "resampled" in messages["resampled"]
    assert "codes cannot be compared" in messages["fingerprint"]


def test_synthetic_cohort_scenario(ctx: scenario.SceneContext, tmp_path: Path) -> None:
    """The self-test's own fixture (no nilearn needed inside Slicer), with a left-handed affine."""
    fixture = scenario.build_fixture(tmp_path)
    report = scenario.run_scenario(ctx, fixture, top_k=2)
    assert report["num_hits"] == 2


def test_reoriented_files_give_the_same_study(
    ctx: scenario.SceneContext, tiny_cohort: Path, tmp_path: Path
) -> None:
    """The same anatomy stored with flipped/permuted voxel axes reads to the identical canonical study."""
    files = find_cases(tiny_cohort)[0]
    case = load_case(files)
    # voxel axes (S, P, L) instead of (R, A, S): permute and flip, and give the matching affine
    perm = np.transpose(case.image[:, ::-1, ::-1, :], (0, 3, 2, 1))
    x, y = case.image.shape[1:3]
    to_old = np.zeros((4, 4))
    to_old[0, 2], to_old[0, 3] = -1.0, x - 1  # new k -> old i (flipped)
    to_old[1, 1], to_old[1, 3] = -1.0, y - 1  # new j -> old j (flipped)
    to_old[2, 0] = 1.0  # new i -> old k
    to_old[3, 3] = 1.0
    write_brats_case(tmp_path / "turned", "turned", perm, affine=case.affine @ to_old)
    turned = find_cases(tmp_path / "turned")[0]
    nodes = scenario.load_case_nodes(ctx, turned)
    study = sc.read_study(nodes)
    np.testing.assert_allclose(study.image, case.image, atol=1e-4)
    np.testing.assert_allclose(study.affine, case.affine, atol=1e-4)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("BraTS19_2013_2_1_t1", "t1"),
        ("BraTS19_2013_2_1_t1ce", "t1ce"),
        ("case7_T1Gd", "t1ce"),
        ("T1C post", "t1ce"),
        ("T1w_MPRAGE", "t1"),
        ("t1-post-contrast", "t1ce"),
        ("AX T2 FSE", "t2"),
        ("T2-FLAIR", "flair"),
        ("t2flair", "flair"),
        ("T2*", None),
        ("DWI b1000", None),
    ],
)
def test_guess_sequence(name: str, expected: str | None) -> None:
    assert naming.guess_sequence(name) == expected


def test_match_sequence_nodes_most_specific_and_skips_outputs(ctx: scenario.SceneContext) -> None:
    scene = ctx.scene
    nodes = {}
    for name in ("pat_T1", "pat_T1ce", "pat_T2", "pat_FLAIR", "normal-appearing T1"):
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        nodes[name] = node
    nodes["normal-appearing T1"].SetAttribute(naming.ROLE_ATTRIBUTE, "reconstruction")
    label = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "t2 labels")
    order = [
        nodes["normal-appearing T1"],
        label,
        *(nodes[n] for n in ("pat_T1ce", "pat_T1", "pat_T2", "pat_FLAIR")),
    ]
    found = naming.match_sequence_nodes(order)
    assert found == {
        "t1": nodes["pat_T1"],
        "t1ce": nodes["pat_T1ce"],
        "t2": nodes["pat_T2"],
        "flair": nodes["pat_FLAIR"],
    }
    assert naming.describe_missing({**found, "t2": None}) == ["T2"]


def test_background_task_cancel_and_errors() -> None:
    started = threading.Event()

    def slow(progress):  # reports progress until cancelled
        for i in range(10_000):
            started.set()
            progress.update(i, 10_000, "working")
            threading.Event().wait(0.001)
        return "finished"

    task = wf.BackgroundTask(slow).start()
    assert started.wait(5)
    task.cancel()
    status = task.wait(timeout=10)
    assert status.finished and status.cancelled
    with pytest.raises(Cancelled):
        task.result()

    def broken(progress):
        raise ValueError("bad volume")

    failed = wf.BackgroundTask(broken).start().wait(timeout=10)
    assert failed.finished and isinstance(failed.error, ValueError) and not failed.cancelled
    done = wf.BackgroundTask(lambda progress: 42).start()
    assert done.wait(timeout=10).error is None and done.result() == 42


def test_batch_size_follows_free_memory(fixture: scenario.Fixture) -> None:
    from fdn_core.model.bundle import load_bundle

    bundle = load_bundle(fixture.bundle_dir, device="cpu")
    per_slice = 1500 * bundle.preprocess.image_size**2
    assert wf.choose_batch_size(bundle, free_bytes=0) == 1
    assert wf.choose_batch_size(bundle, free_bytes=2 * 5 * per_slice) == 5
    assert wf.choose_batch_size(bundle, free_bytes=1 << 50) == bundle.default_batch_size()
    assert wf.device_warning(bundle, 40) is not None and "CPU" in wf.device_warning(bundle, 40)


def test_install_plan_reads_the_bundled_source(tmp_path: Path) -> None:
    plan = deps.make_plan(MODULE_DIR)
    assert plan.source_dir == MODULE_DIR.parent
    assert plan.torch_requirement.startswith(">=")
    names = [r.split(">")[0].split("<")[0].split("=")[0].strip().lower() for r in plan.requirements]
    assert "torch" not in names and "simpleitk" not in names and "numpy" in names
    assert plan.package_pip_args()[:2] == ["--no-deps", "--no-build-isolation"]
    wheelhouse = tmp_path / "wheels"
    wheelhouse.mkdir()
    (wheelhouse / f"fdn_retrieval-{plan.version}-py3-none-any.whl").write_bytes(b"")
    offline = deps.make_plan(MODULE_DIR, wheelhouse)
    assert offline.dependency_pip_args(["monai>=1.4"])[:3] == ["--no-index", "--find-links", str(wheelhouse)]
    assert offline.package_pip_args()[-1] == f"fdn-retrieval=={plan.version}"
    with pytest.raises(deps.DependencyError, match="does not exist"):
        deps.make_plan(MODULE_DIR, tmp_path / "nowhere")


def test_ensure_installed_asks_once_and_skips_what_is_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple] = []
    plan = deps.make_plan(MODULE_DIR)
    # everything (torch in range, numpy, monai, ... and fdn-retrieval itself) is installed here: no prompt,
    # and PyTorch Utils is not even asked (its torchInstalled() would import torch on the GUI thread)
    assert deps.check_environment(plan).ready
    assert (
        deps.ensure_installed(
            plan,
            install_torch=lambda spec: calls.append(("torch", spec)) or True,
            confirm=lambda title, text: calls.append(("confirm",)) or True,
            pip_install=lambda args: calls.append(("pip", args)),
        )
        == []
    )
    assert calls == []
    missing = deps.InstallPlan(
        version="0.0.0-not-installed", torch_requirement="", requirements=("surely-absent-pkg>=1",),
        source_dir=MODULE_DIR.parent, wheelhouse=None,
    )  # fmt: skip
    with pytest.raises(deps.DependencyError, match="declined"):
        deps.ensure_installed(
            missing, install_torch=lambda s: True, confirm=lambda t, x: False, pip_install=print
        )
    with pytest.raises(deps.DependencyError, match=r"testing mode.*FDNRETRIEVAL_TEST_INSTALL"):
        deps.ensure_installed(
            missing, install_torch=lambda s: True, confirm=lambda t, x: True, pip_install=print, allowed=False
        )
    recorded: list[list[str]] = []
    with pytest.raises(deps.DependencyError, match="still missing"):
        deps.ensure_installed(
            missing, install_torch=lambda s: True, confirm=lambda t, x: True, pip_install=recorded.append
        )
    assert recorded == [["surely-absent-pkg>=1"]]
    # torch absent: PyTorch Utils is asked for the required range; declined -> the fix is explained
    real_version = deps.installed_version
    monkeypatch.setattr(
        deps, "installed_version", lambda d=deps.DISTRIBUTION: None if d == "torch" else real_version(d)
    )
    asked: list[str] = []
    with pytest.raises(deps.DependencyError, match="PyTorch Utils"):
        deps.ensure_installed(
            plan,
            install_torch=lambda s: asked.append(s) or False,
            confirm=lambda t, x: True,
            pip_install=print,
        )
    assert asked == [plan.torch_requirement]


def test_torch_outside_the_required_range_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    plan = deps.make_plan(MODULE_DIR)
    real_version = deps.installed_version
    monkeypatch.setattr(
        deps, "installed_version", lambda d=deps.DISTRIBUTION: "2.1.0" if d == "torch" else real_version(d)
    )
    report = deps.check_environment(plan)
    assert report.torch_version == "2.1.0" and not report.torch_ok and not report.ready
    message = deps.torch_problem(report.torch_version, plan.torch_requirement)
    assert message is not None
    assert "2.1.0" in message and plan.torch_requirement in message and "PyTorch Utils" in message
    installs: list[str] = []
    with pytest.raises(deps.DependencyError, match="Uninstall PyTorch"):
        deps.ensure_installed(
            plan,
            install_torch=lambda s: installs.append(s) or True,
            confirm=lambda t, x: True,
            pip_install=print,
        )
    assert installs == []  # a loaded torch is never replaced behind the user's back
    assert deps.torch_problem("2.13.0", ">=2.4,<2.15") is None


def test_install_allowed_only_outside_testing_unless_asked() -> None:
    assert deps.install_allowed(testing=False, environ={})
    assert not deps.install_allowed(testing=True, environ={})
    assert deps.install_allowed(testing=True, environ={deps.TEST_INSTALL_ENV: "1"})
    assert not deps.install_allowed(testing=True, environ={deps.TEST_INSTALL_ENV: "0"})


def test_version_guard() -> None:
    from FDNRetrievalLib import compat

    assert compat.version_problem((5, 10), (3, 12)) is None
    old = compat.version_problem((5, 8), (3, 9))
    assert old is not None and "5.10" in old and "5.8" in old and "3.9" in old
    assert compat.version_problem((5, 10), (3, 9)) is not None
    # the guard and the module file must load on Slicer 5.8's Python 3.9 to show the message
    for path in (MODULE_DIR / "FDNRetrievalLib" / "compat.py", MODULE_DIR / "SlicerFDNRetrieval.py"):
        ast.parse(path.read_text(encoding="utf-8"), feature_version=(3, 9))


def test_wheelhouse_pins_skip_slicer_provided_packages() -> None:
    report = {
        "install": [
            {"metadata": {"name": "monai", "version": "1.6.1"}},
            {"metadata": {"name": "torch", "version": "2.13.0"}},
            {"metadata": {"name": "nvidia-cudnn-cu12", "version": "9.1"}},
            {"metadata": {"name": "SimpleITK", "version": "2.5.7"}},
            {"metadata": {"name": "Nibabel", "version": "5.4.0"}},
        ]
    }
    assert deps.pins_from_report(report) == ["monai==1.6.1", "Nibabel==5.4.0"]
    with pytest.raises(deps.DependencyError):
        deps.pins_from_report({"install": [{"metadata": {"name": "x"}}]})


def test_default_resource_paths(tmp_path: Path) -> None:
    module = tmp_path / "SlicerFDNRetrieval"
    (module / "Resources" / "models" / "demo" / "db").mkdir(parents=True)
    shipped = MODULE_DIR.parent / "fdn_core" / "resources" / "models" / "demo"
    assert deps.default_resource_paths(module)[0] in (None, shipped)
    demo = module / "Resources" / "models" / "demo"
    (demo / "bundle.json").write_text("{}")
    (demo / "db" / "manifest.json").write_text("{}")
    assert deps.default_resource_paths(module) == (demo, demo / "db")


def test_default_database_is_the_demo_built_here(tmp_path: Path) -> None:
    module = tmp_path / "SlicerFDNRetrieval"
    demo = module / "Resources" / "models" / "demo"
    demo.mkdir(parents=True)
    (demo / "bundle.json").write_text("{}")
    assert deps.default_resource_paths(module) == (demo, None)
    (tmp_path / "demo_out" / "db").mkdir(parents=True)
    (tmp_path / "demo_out" / "db" / "manifest.json").write_text("{}")
    assert deps.default_resource_paths(module) == (demo, tmp_path / "demo_out" / "db")
    built = tmp_path / "cache" / "demo" / "db"
    built.mkdir(parents=True)
    (built / "manifest.json").write_text("{}")
    assert deps.default_resource_paths(module, tmp_path / "cache") == (demo, built)


def test_layout_xml_is_well_formed() -> None:
    for k in (1, 3, 10, 20):
        root = ET.fromstring(sc.results_layout_xml(k))
        views = [v.get("singletontag") for v in root.iter("view")]
        assert views == [sc.QUERY_VIEW, *sc.result_view_names(k), "FDNTable"]
    with pytest.raises(Exception, match="top-K"):
        sc.results_layout_xml(0)


def test_module_files_are_valid() -> None:
    py_compile.compile(str(MODULE_DIR / "SlicerFDNRetrieval.py"), doraise=True)
    ui = ET.parse(MODULE_DIR / "Resources" / "UI" / "SlicerFDNRetrieval.ui").getroot()
    bound = {p.find("string").text for p in ui.iter("property") if p.get("name") == "SlicerParameterName"}
    source = (MODULE_DIR / "SlicerFDNRetrieval.py").read_text(encoding="utf-8")
    body = source.split("class SlicerFDNRetrievalParameterNode")[1].split("#\n# Widget")[0]
    declared = {
        line.split(":")[0].strip() for line in body.splitlines() if line.startswith("    ") and ":" in line
    }
    declared = {d for d in declared if d.isidentifier()}
    assert bound == declared, f"ui binds {sorted(bound)}, dataclass declares {sorted(declared)}"
    # The panel offers every distance of the vocabulary (the module file cannot import it at class level).
    line = next(x for x in body.splitlines() if x.strip().startswith("distance:"))
    assert ast.literal_eval(line.split("Choice(")[1].split(")]")[0]) == list(DISTANCES)
    line = next(x for x in body.splitlines() if x.strip().startswith("minLesionMl:"))
    assert float(line.split("=")[1].split("#")[0]) == MIN_LESION_ML
    # the lesion filter: the vocabulary's names, shown by their labels, "any" by default
    line = next(x for x in body.splitlines() if x.strip().startswith("lesion:"))
    assert ast.literal_eval(line.split("Choice(")[1].split(")]")[0]) == list(LESION_FILTERS)
    assert line.split("=")[1].split("#")[0].strip() == '"any"'
    shown = next(
        node.value
        for node in ast.parse(source).body
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "LESION_CHOICES"
    )
    assert ast.literal_eval(shown) == LESION_FILTER_LABELS
    cmake = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    # The browser viewer lives beside the module but is its own distribution, never in the extension.
    assert "FDNRetrievalWeb" not in cmake
    for path in MODULE_DIR.rglob("*"):
        skipped = {"__pycache__", "FDNRetrievalWeb"} & set(path.parts)
        if path.is_file() and not skipped and path.suffix in (".py", ".ui", ".png"):
            rel = path.relative_to(MODULE_DIR).as_posix()
            assert rel in cmake or rel.replace("SlicerFDNRetrieval", "${MODULE_NAME}") in cmake, rel
    for path in sorted((MODULE_DIR / "FDNRetrievalLib").glob("*.py")):
        text = path.read_text(encoding="utf-8")
        assert "import qt" not in text and "slicer.app" not in text, path.name
    # what runs before fdn_core is installed (or on an old Slicer) imports only the standard library
    for name in ("compat", "deps", "demo", "naming", "tasks"):
        tree = ast.parse((MODULE_DIR / "FDNRetrievalLib" / f"{name}.py").read_text(encoding="utf-8"))
        top = {
            alias.name.split(".")[0]
            for node in tree.body
            if isinstance(node, ast.Import | ast.ImportFrom)
            for alias in (
                node.names
                if isinstance(node, ast.Import)
                else [types.SimpleNamespace(name=node.module or "")]
            )
        }
        assert not top & {"numpy", "torch", "fdn_core", "vtk", "slicer"}, (name, top)
    assert len(MODALITIES) == 4


def _load_module_with_standins(
    monkeypatch: pytest.MonkeyPatch, ctx: scenario.SceneContext, cache: Path
) -> types.ModuleType:
    """Execute SlicerFDNRetrieval.py with minimal stand-ins for what only the Slicer application has (Qt,
    the scripted-module base classes, parameterNodeWrapper, slicer.app, slicer.modules) over the real
    slicer-core scene, so that the module's Logic class runs for real."""
    import slicer

    qt = types.ModuleType("qt")
    qt.QTimer = type("QTimer", (), {})
    monkeypatch.setitem(sys.modules, "qt", qt)
    base = types.ModuleType("slicer.ScriptedLoadableModule")
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleTest"):
        setattr(base, name, type(name, (), {"__init__": lambda self, *a: None}))
    base.ScriptedLoadableModuleLogic = type(
        "ScriptedLoadableModuleLogic", (), {"__init__": lambda self: None}
    )
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", base)
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = lambda cls: cls
    for name in ("Choice", "Minimum", "WithinRange"):
        setattr(wrapper, name, lambda *args: args)
    monkeypatch.setitem(sys.modules, "slicer.parameterNodeWrapper", wrapper)
    logics = types.SimpleNamespace(
        volumes=types.SimpleNamespace(logic=lambda: ctx.volumes_logic),
        segmentations=types.SimpleNamespace(logic=lambda: ctx.segmentations_logic),
    )
    layout_logic = types.SimpleNamespace(GetLayoutNode=lambda: ctx.layout_node)
    layout_manager = types.SimpleNamespace(
        layoutLogic=lambda: layout_logic,
        setLayout=lambda layout_id: ctx.layout_node.SetViewArrangement(layout_id),
    )
    app = types.SimpleNamespace(
        majorVersion=5,
        minorVersion=10,
        cachePath=str(cache),
        testingEnabled=lambda: True,
        layoutManager=lambda: layout_manager,
    )
    monkeypatch.setattr(slicer, "modules", logics, raising=False)
    monkeypatch.setattr(slicer, "mrmlScene", ctx.scene, raising=False)
    monkeypatch.setattr(slicer, "app", app, raising=False)
    monkeypatch.setattr(slicer.util, "showStatusMessage", lambda *a: None, raising=False)
    spec = importlib.util.spec_from_file_location("SlicerFDNRetrieval", MODULE_DIR / "SlicerFDNRetrieval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_module_logic_runs_on_a_real_scene(
    monkeypatch: pytest.MonkeyPatch, ctx: scenario.SceneContext, fixture: scenario.Fixture, tmp_path: Path
) -> None:
    """The module's thin Logic class, driven like the widget drives it: capture on the main thread, the
    package check, model, checks, resampling and encoding in a task, publish, follow the query view, search
    in a task, show, open one result large."""
    module = _load_module_with_standins(monkeypatch, ctx, tmp_path / "cache")
    assert module.versionProblem() is None
    assert module.demoRoot() == tmp_path / "cache" / "FDNRetrieval"
    logic = module.SlicerFDNRetrievalLogic()
    assert logic.ensureDependencies() == []  # everything is installed: nothing to do, no prompt
    assert logic.environmentProblem() is None
    assert not logic.demoStatus().ready and "Build demo database" in logic.demoStatus().message
    assert "MB" in logic.demoPlan().describe()
    case = sorted(find_cases(fixture.cohort_dir), key=lambda c: c.case_id)[0]
    nodes = scenario.load_case_nodes(ctx, case)
    captured = logic.captureStudy(nodes)

    def encoded_with(min_ml: float) -> Any:
        task = logic.encodeTask(captured, fixture.bundle_dir, fixture.db_dir, "cpu", minLesionMl=min_ml)
        poller = tasks.TaskPoller()
        ends: list[tasks.TaskStatus] = []
        poller.start(task, "encode", lambda kind, t, status: ends.append(status))
        while not ends:
            poller.tick()
        assert ends[0].error is None, ends[0].error
        return task.result()

    # the panel's size rule reaches the segmentation: everything at 0, nothing at 1e6 mL
    unfiltered = encoded_with(0.0)[1]
    assert unfiltered.lesions.min_ml == 0.0 and unfiltered.lesions.removed == 0
    emptied = encoded_with(1e6)[1]
    assert not emptied.seg.any() and not emptied.has_abnormal.any()
    assert emptied.lesions.removed == unfiltered.lesions.kept > 0
    published = logic.publishEncoding(encoded_with(MIN_LESION_ML))
    study = logic.study
    assert logic.indexedCase == case.case_id and "cases" in logic.resourcesSummary()
    assert "CPU" in logic.deviceWarning()
    assert published["segmentation"].GetSegmentation().GetNumberOfSegments() == 3
    assert len(published["reconstruction"]) == 4
    # the query slice follows the red view (standard layout)
    scrolled: list[int] = []
    follower = logic.makeQueryFollower(scrolled.append)
    follower.set_study(study.affine, study.shape)
    k = study.shape[2] // 3  # not the centre, where the red view starts
    red = sc.slice_node_by_layout_name(ctx.scene, "Red")
    red.SetOrientation("Axial")
    red.JumpSliceByCentering(*sc.ras_of_axial_slice(study.affine, study.shape, k))
    assert scrolled[-1] == k and follower.current_index() == k
    settings = logic.searchSettings(k, "both", "euclidean", 2, True, None)
    search = logic.searchTask(settings).start()
    assert search.wait(timeout=60).error is None
    hits = search.result()
    assert len(hits) == 2 and all(h.case_id != case.case_id for h in hits)
    # the panel's "References" choice reaches the search: only slices without a lesion flag, or with one
    from fdn_core.codes.database import CodeDatabase
    from fdn_core.errors import ConfigError

    db = CodeDatabase.open(fixture.db_dir)

    def flag(case_id: str, k: int) -> bool:
        rows = db.case_rows(case_id)
        return bool(db.has_abnormal[rows][np.flatnonzero(db.slice_indices[rows] == k)[0]])

    for lesion, keep in (("without", False), ("with", True)):
        settings = logic.searchSettings(k, "normal", "euclidean", 2, True, None, lesion=lesion)
        assert settings.lesion == lesion
        search = logic.searchTask(settings).start()
        assert search.wait(timeout=60).error is None
        filtered = search.result()
        assert filtered and all(flag(h.case_id, h.slice_index) is keep for h in filtered)
    with pytest.raises(ConfigError, match="unknown lesion filter 'healthy'"):
        logic.searchSettings(k, "both", "euclidean", 2, True, None, lesion="healthy")
    # an empty result says why: the filter, not an empty database
    assert "no other case" in wf.no_result_message("any") and "References" not in wf.no_result_message("any")
    assert "a slice with lesion" in wf.no_result_message("with") and "'any slice'" in wf.no_result_message(
        "with"
    )
    assert "a slice without lesion" in wf.no_result_message("without") == wf.no_result_message(" Without ")
    table = logic.publishHits(hits)
    assert table.GetTable().GetNumberOfRows() == 2 and table.GetLocked()
    ctx.layout_node.SetViewArrangement(logic.registerLayout(ctx.layout_node, len(hits)))
    logic.showTable()
    fitted: list[str] = []
    logic.showQuery(nodes["flair"], k, fitted.append)
    for hit in hits:
        logic.showHit(hit, "t2", fitted.append)
        view = sc.result_view_names(hit.rank)[-1]
        shown = sc.displayed_axial_index(ctx.scene, view, logic_volume(ctx, hit.case_id))
        assert shown == hit.slice_index
    assert fitted == [sc.QUERY_VIEW, *sc.result_view_names(len(hits))]
    # after the search the query view is what counts: scroll it
    sc.jump_to_study_slice(ctx.scene, sc.QUERY_VIEW, study, k + 1)
    assert follower.source_view() == sc.QUERY_VIEW and follower.current_index() == k + 1
    logic.linkResultViews()
    # a table row opens that result large beside the query, in the one-result layout
    assert logic.hitForRow(1) is hits[1]
    caption = logic.showDetail(1, "t2", fitted.append)
    assert ctx.layout_node.GetViewArrangement() == views.DETAIL_LAYOUT_ID
    assert caption.startswith("Result 2:") and hits[1].case_id in caption
    assert sc.displayed_axial_index(ctx.scene, views.DETAIL_VIEW, logic_volume(ctx, hits[1].case_id)) == (
        hits[1].slice_index
    )
    follower.remove()
    logic.clearResults()
    assert logic.encoded is None and logic.study is None


def logic_volume(ctx: scenario.SceneContext, case_id: str):
    """The reference volume node (T2) the module loaded for ``case_id``."""
    for i in range(ctx.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
        node = ctx.scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
        if (
            node.GetAttribute(sc.CASE_ATTRIBUTE) == case_id
            and node.GetAttribute(naming.ROLE_ATTRIBUTE) == "reference:t2"
        ):
            return node
    raise AssertionError(f"no reference volume loaded for {case_id}")


def test_module_file_imports_only_slicer_at_top_level() -> None:
    tree = ast.parse((MODULE_DIR / "SlicerFDNRetrieval.py").read_text(encoding="utf-8"))
    top = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            top.add((node.module or "").split(".")[0])
    stdlib = {
        "__future__",
        "collections",
        "contextlib",
        "logging",
        "pathlib",
        "tempfile",
        "time",
        "traceback",
    }
    assert top <= {*stdlib, "typing", "qt", "slicer", "vtk"}, top


def test_failures_are_explained_without_tracebacks_when_expected() -> None:
    from fdn_core.errors import DataError as CoreDataError

    text, expected = tasks.describe_failure(CoreDataError("T2 volume 'x' is empty; check the series"))
    assert expected and text == "T2 volume 'x' is empty; check the series"
    oom = type("OutOfMemoryError", (RuntimeError,), {})("CUDA out of memory. Tried to allocate 2.00 GiB")
    text, expected = tasks.describe_failure(oom)
    assert expected and "'cpu'" in text and "Compute on" in text
    text, expected = tasks.describe_failure(deps.DependencyError("installation declined"))
    assert expected and text == "installation declined"
    text, expected = tasks.describe_failure(KeyError("boom"))
    assert not expected and text.startswith("KeyError")  # a bug: the panel adds the traceback as details


def test_demo_model_is_found_in_the_bundled_source_before_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = tmp_path / "SlicerFDNRetrieval"
    bundled = (
        module / "Resources" / deps.BUNDLED_SOURCE_DIRNAME / "fdn_core" / "resources" / "models" / "demo"
    )
    bundled.mkdir(parents=True)
    (bundled / "bundle.json").write_text("{}")
    monkeypatch.setattr(deps.importlib.util, "find_spec", lambda name: None)  # fdn_core not installed yet
    assert deps.default_resource_paths(module, tmp_path / "cache") == (bundled, None)
