"""The demo database built on first use (``FDNRetrievalLib.demo``) and relative case paths in databases.

A small plan (4 phantom cases at 48 x 48 x 32, the tiny untrained model) goes through the same code as the
panel's "Build demo database": phantom cohort, indexing, ``demo.json``, Sample Data entries, moving the whole
folder, Cancel, stale model, removal.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from fdn_core.codes.database import CodeDatabase
from fdn_core.data.readers import CaseFiles, find_cases, load_case, resolve_source
from fdn_core.errors import DataError
from fdn_core.progress import Cancelled, Progress
from fdn_core.retrieval import index_cohort
from FDNRetrievalLib import demo, tasks

SMALL = demo.DemoPlan(n_cases=4, shape=(48, 48, 32), seed=5, samples=2)


@pytest.fixture(scope="module")
def built(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> demo.DemoStatus:
    root = tmp_path_factory.mktemp("demo_root")
    reports: list[tuple[int, int, str]] = []
    status = demo.build_demo(
        root, model_dir=tiny_bundle, plan=SMALL, progress=Progress(lambda d, t, m: reports.append((d, t, m)))
    )
    status.record["_reports"] = reports
    return status


def test_plan_says_size_and_time_before_it_starts() -> None:
    plan = demo.DemoPlan()
    assert plan.n_cases >= 11  # a ten-result, one-per-case search needs ten other cases
    text = plan.describe()
    assert f"{plan.n_cases} synthetic phantom cases" in text and "MB" in text and "minute" in text
    assert "Nothing is downloaded" in text
    assert 15e6 < plan.estimated_bytes() < 40e6  # measured: 23 MB for the default plan
    assert 30 < plan.estimated_seconds() < 300
    assert SMALL.estimated_bytes() < plan.estimated_bytes() / 10


def test_build_writes_cohort_database_and_record(built: demo.DemoStatus, tiny_bundle: Path) -> None:
    assert built.ready, built.message
    assert built.database is not None and built.cohort is not None
    record = json.loads((built.root / "demo" / "demo.json").read_text())
    assert record["format"] == demo.DEMO_FORMAT and record["n_cases"] == SMALL.n_cases
    assert record["bytes"] == demo.folder_bytes(built.root / "demo") - len(
        (built.root / "demo" / "demo.json").read_bytes()
    )
    db = CodeDatabase.open(built.database)
    assert len(db.cases) == SMALL.n_cases and db.fingerprint == record["model_fingerprint"]
    # progress: generation then indexing, over 2 x n_cases steps, ending at the total
    reports = built.record["_reports"]
    messages = [m for _, _, m in reports]
    assert messages[0] == "Generating phantom cases" and messages[-1] == "Indexing phantom cases"
    assert reports[-1][0] == reports[-1][1] == 2 * SMALL.n_cases
    assert demo.demo_status(built.root, record["model_fingerprint"]).ready
    stale = demo.demo_status(built.root, "another-model")
    assert not stale.ready and "rebuild" in stale.message


def test_database_records_case_paths_relative_to_itself(built: demo.DemoStatus) -> None:
    db = CodeDatabase.open(built.database)
    for case_id in db.cases:
        source = db.sources(case_id)  # as recorded on disk
        for path in [*source["images"].values(), source["seg"]]:
            assert path.startswith("../cohort/"), path
    files = CaseFiles.from_database(db, db.cases[0])
    assert all(p.is_absolute() and p.is_file() for p in files.all_paths())
    with pytest.raises(DataError, match="relative to its own folder"):
        CaseFiles.from_source(db.cases[0], db.sources(db.cases[0]))


def test_demo_folder_can_be_moved_or_copied_whole(built: demo.DemoStatus, tmp_path: Path) -> None:
    copy = tmp_path / "elsewhere" / "FDNRetrieval"
    shutil.copytree(built.root, copy)
    status = demo.demo_status(copy)
    assert status.ready and status.database == copy / "demo" / "db"
    db = CodeDatabase.open(status.database)  # hash-verified: the copy is intact
    case_id = db.cases[-1]
    files = CaseFiles.from_database(db, case_id)
    assert files.images is not None and files.images["flair"].is_relative_to(copy)
    original = load_case(CaseFiles.from_database(CodeDatabase.open(built.database), case_id))
    np.testing.assert_array_equal(load_case(files).image, original.image)


def test_absolute_paths_are_kept_outside_and_old_databases_still_open(
    built: demo.DemoStatus, tiny_bundle: Path, tmp_path: Path
) -> None:
    from fdn_core.model.bundle import load_bundle

    cohort = built.cohort
    case = find_cases(cohort)[0]
    # a database far from its cohort records absolute paths
    far = tmp_path / "a" / "b" / "db"
    index_cohort(load_bundle(tiny_bundle, "cpu"), cohort, far, cases=[case.case_id], fit_hamming=False)
    source = CodeDatabase.open(far).sources(case.case_id)
    assert Path(source["images"]["t1"]).is_absolute()
    # an old database: absolute paths written before relative paths existed, opened with and without base
    old_source = case.to_source()
    assert old_source == case.to_source(base=None) and Path(old_source["seg"]).is_absolute()
    assert CaseFiles.from_source(case.case_id, old_source, base=tmp_path).all_paths() == case.all_paths()
    assert resolve_source(case.case_id, old_source, None) == old_source
    # inside the database folder: relative without ".."; beside it: "../"
    inside = case.to_source(base=cohort.parent)
    assert inside["images"]["t1"].startswith("cohort/")
    beside = case.to_source(base=cohort.parent / "db")
    assert beside["images"]["t1"].startswith("../cohort/")
    again = CaseFiles.from_source(case.case_id, beside, base=cohort.parent / "db")
    assert again.all_paths() == [p.resolve() for p in case.all_paths()]


def test_sample_studies_come_from_the_record(built: demo.DemoStatus) -> None:
    studies = demo.demo_sample_studies(built.root)
    assert 1 <= len(studies) <= SMALL.samples
    meta = json.loads((built.cohort / "cohort.json").read_text())
    tumour = [c["case_id"] for c in meta["cases"] if not c["healthy"]]
    assert [s.case_id for s in studies] == tumour[: len(studies)]
    first = studies[0]
    assert first.node_names == [f"{first.case_id}_{s}" for s in ("t1", "t1ce", "t2", "flair")]
    path = built.cohort / first.case_id / first.file_names[1]
    assert first.uris[1] == path.resolve().as_uri()
    assert first.checksums[1] == "SHA256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    assert demo.demo_sample_studies(built.root.parent / "nowhere") == []


def test_cancel_leaves_nothing_behind(tiny_bundle: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    cases_done = threading.Event()

    def work(progress: Progress) -> demo.DemoStatus:
        def report(done: int, total: int, message: str) -> None:
            if done >= 1:
                cases_done.set()
                progress.cancel.set()  # the user presses Cancel after the first case

        inner = Progress(callback=report, cancel=progress.cancel)
        return demo.build_demo(root, model_dir=tiny_bundle, plan=SMALL, progress=inner)

    task = tasks.BackgroundTask(work, name="demo").start()
    status = task.wait(timeout=300)
    assert cases_done.is_set() and status.finished and status.cancelled
    with pytest.raises(Cancelled):
        task.result()
    assert not demo.demo_status(root).ready
    assert not root.exists() or not any(root.iterdir())  # no partial demo, no temporary folder


def test_remove_only_deletes_what_the_demo_made(built: demo.DemoStatus, tmp_path: Path) -> None:
    root = tmp_path / "FDNRetrieval"
    shutil.copytree(built.root, root)
    (root / ".demo.abc.tmp").mkdir()  # leftover of an interrupted build
    (root / ".demo.abc.tmp" / "x.bin").write_bytes(b"x" * 10)
    keep = root / "notes.txt"
    keep.write_text("the user's own file")
    expected = demo.folder_bytes(root / "demo") + 10
    assert demo.remove_demo(root) == expected
    assert sorted(p.name for p in root.iterdir()) == ["notes.txt"]
    assert not demo.demo_status(root).ready and "Build demo database" in demo.demo_status(root).message
    assert demo.remove_demo(root) == 0
    (root / "demo").mkdir()
    (root / "demo" / "data.nii.gz").write_bytes(b"not ours")  # no demo.json: never deleted
    assert demo.remove_demo(root) == 0 and (root / "demo" / "data.nii.gz").exists()
