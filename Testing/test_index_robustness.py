"""``fdn index`` under a hostile user: bad cases (--skip-bad), interruptions (resume, SIGTERM), disk full /
device busy, external studies named like database cases, replaced codebooks and altered models."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fdn_core.cli import main
from fdn_core.errors import DataError, ModelMismatchError

ROOT = Path(__file__).resolve().parents[1]


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def _common(bundle: Path, data: Path) -> list[str]:
    return ["--model", str(bundle), "--data", str(data), "--device", "cpu", "--no-progress"]


def _litter(db: Path) -> list[str]:
    """Temporary files and folders in and beside a database (none may survive a command)."""
    out = [p.name for p in db.parent.iterdir() if p.name.startswith(f".{db.name}.")]
    if db.is_dir():
        out += [str(p.relative_to(db)) for p in db.rglob("*") if p.name.startswith((".tmp", f".{db.name}"))]
        out += [str(p.relative_to(db)) for p in db.rglob("*.tmp")]
    return out


@pytest.fixture(scope="module")
def cohort(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny cohort with its last case made bad (a NaN in its T1), and a database of the good cases."""
    import nibabel as nib

    from fdn_core.data.readers import find_cases

    work = tmp_path_factory.mktemp("robust")
    data = work / "cohort"
    shutil.copytree(tiny_cohort, data)
    ids = [c.case_id for c in find_cases(data)]
    bad = ids[-1]
    t1 = data / bad / f"{bad}_t1.nii.gz"
    img = nib.load(t1)
    voxels = np.asarray(img.dataobj).astype(np.float32)
    voxels[20, 20, 20] = np.nan
    nib.save(nib.Nifti1Image(voxels, img.affine), t1)
    bundle = work / "bundle"
    from fdn_core.model.bundle import save_untrained_bundle

    save_untrained_bundle(bundle, seed=0)
    return {"work": work, "data": data, "ids": ids, "bad": bad, "good": ids[:-1], "bundle": bundle}


# -------------------------------------------------------------------------------------- bad cases, resume


def test_a_bad_case_keeps_the_committed_work_and_skip_bad_finishes(
    cohort: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    db = cohort["work"] / "db_bad"
    common = _common(cohort["bundle"], cohort["data"])
    rc, out, err = _run(capsys, "index", "build", "--db", str(db), *common, "--commit-every", "2")
    assert rc == 2
    assert cohort["bad"] in err and "NaN" in err, err
    assert f"{len(cohort['good'])} case(s) before it are committed" in err and "--skip-bad" in err
    assert "skip_bad" not in err
    assert (db / "build.json").is_file() and _litter(db) == []
    with pytest.raises(DataError, match="unfinished `fdn index build`"):
        from fdn_core.codes.database import CodeDatabase

        CodeDatabase.open(db)
    # The same command with --skip-bad resumes: nothing is encoded twice, the bad case is reported.
    rc, out, err = _run(capsys, "index", "build", "--db", str(db), *common, "--skip-bad")
    assert rc == 0, err
    assert "resumed an interrupted build" in out
    assert f"already indexed (skipped): {len(cohort['good'])} case(s)" in out
    assert "skipped 1 bad case(s) (not indexed):" in out and cohort["bad"] in out
    assert f"built {db}: {len(cohort['good'])} cases" in out
    rc, out, _ = _run(capsys, "index", "info", str(db), "--cases")
    assert rc == 0 and "integrity     OK" in out and cohort["bad"] not in out
    # add --skip-bad reports it again and adds nothing.
    rc, out, _ = _run(capsys, "index", "add", "--db", str(db), *common, "--skip-bad")
    assert rc == 0 and "nothing to add" in out and cohort["bad"] in out


def test_an_interrupted_build_resumes_without_encoding_again(
    cohort: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from fdn_core.model.bundle import InferenceBundle, load_bundle
    from fdn_core.progress import Progress
    from fdn_core.retrieval import build_index

    bundle = load_bundle(cohort["bundle"], device="cpu")
    encoded: list[int] = []
    real = InferenceBundle.encode_slices

    def counting(self: InferenceBundle, images: np.ndarray, *a: Any, **k: Any) -> Any:
        encoded.append(images.shape[0])
        return real(self, images, *a, **k)

    monkeypatch.setattr(InferenceBundle, "encode_slices", counting)

    def stop_after_three(done: int, total: int, message: str) -> None:
        if message == "Indexing cases" and done == 3:
            raise KeyboardInterrupt  # Ctrl-C (SIGTERM in the CLI) after the third case

    db = cohort["work"] / "db_resume"
    good = cohort["good"]
    with pytest.raises(KeyboardInterrupt):
        build_index(bundle, cohort["data"], db, cases=good, progress=Progress(stop_after_three),
                    commit_every=2, fit_hamming=False, workers=1)  # fmt: skip
    assert len(encoded) == 3  # the pending third case was committed on the way out
    first = len(encoded)
    result = build_index(bundle, cohort["data"], db, cases=good, commit_every=2, fit_hamming=False, workers=1)
    assert result.resumed and sorted(result.already) == sorted(good[:3])
    assert sorted(result.added) == sorted(good[3:]) and len(encoded) - first == len(good) - 3
    assert result.database.cases == good and _litter(db) == []
    assert all(result.database.source_fingerprint(c) for c in good)


@pytest.mark.slow
def test_sigterm_stops_a_build_cleanly_and_the_same_command_resumes(cohort: dict[str, Any]) -> None:
    db = cohort["work"] / "db_sigterm"
    cmd = [sys.executable, "-m", "fdn_core.cli", "index", "build", "--db", str(db),
           *_common(cohort["bundle"], cohort["data"]), "--cases", *cohort["good"], "--commit-every", "1",
           "--workers", "1"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "training")])}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        doc = db / "build.json"
        if doc.is_file() and json.loads(doc.read_text())["segments"]:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, (out, err)
    assert "stopped by SIGTERM" in err and "run the same command again to continue" in err
    assert _litter(db) == []
    staged = json.loads((db / "build.json").read_text())
    assert 1 <= sum(s["num_cases"] for s in staged["segments"]) < len(cohort["good"])
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resumed an interrupted build" in done.stdout
    assert f"{len(cohort['good'])} cases" in done.stdout and _litter(db) == []


# ------------------------------------------------------------------------------------------- OS errors


@pytest.mark.parametrize(("code", "words"), [(errno.ENOSPC, "disk is full"), (errno.EBUSY, "busy")])
def test_os_errors_are_reported_with_the_path_and_what_to_do(
    cohort: dict[str, Any], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, code: int,
    words: str,
) -> None:  # fmt: skip
    import fdn_core.codes.database as dbmod

    db = cohort["work"] / f"db_oserror{code}"
    common = _common(cohort["bundle"], cohort["data"])
    rc, _, err = _run(capsys, "index", "build", "--db", str(db), *common, "--cases", *cohort["good"][:2],
                      "--no-hamming")  # fmt: skip
    assert rc == 0, err
    listing = sorted(str(p) for p in db.rglob("*"))

    def fail(path: Path, *args: Any, **kwargs: Any) -> Any:
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(dbmod, "_write_npy", fail)
    rc, out, err = _run(capsys, "index", "add", "--db", str(db), *common, "--cases", cohort["good"][2])
    assert rc == 2 and "Traceback" not in err
    assert f"[{errno.errorcode[code]}]" in err and words in err and str(db) in err, err
    assert "keeps its last committed state" in err
    monkeypatch.setattr(dbmod, "atomic_write_json", fail)
    rc, _, err = _run(capsys, "index", "remove", "--db", str(db), "--case", cohort["good"][0])
    assert rc == 2 and f"[{errno.errorcode[code]}]" in err and "manifest.json" in err
    monkeypatch.undo()
    assert sorted(str(p) for p in db.rglob("*")) == listing
    rc, out, _ = _run(capsys, "index", "info", str(db))
    assert rc == 0 and "cases         2" in out


# ---------------------------------------------------------------------------- identity of query studies


def test_an_external_study_named_like_a_database_case_is_not_excluded(cohort: dict[str, Any]) -> None:
    """Another patient's study whose folder carries a database case's name is searched like any external
    study: the database case of that name stays in the results. The same study under another name is
    recognised by its image files and excluded."""
    from fdn_core.data.readers import case_files_from_paths, load_case
    from fdn_core.model.bundle import load_bundle
    from fdn_core.retrieval import Retriever, build_index

    bundle = load_bundle(cohort["bundle"], device="cpu")
    db = cohort["work"] / "db_identity"
    refs, outsider = cohort["good"][:-1], cohort["good"][-1]
    build_index(bundle, cohort["data"], db, cases=refs, fit_hamming=False, workers=1)
    retriever = Retriever.open(db, bundle)
    studies = cohort["work"] / "studies"

    def copy_as(case_id: str, name: str) -> Path:
        folder = studies / name
        folder.mkdir(parents=True)
        for f in (cohort["data"] / case_id).iterdir():
            shutil.copy(f, folder / f.name.replace(case_id, name))
        return folder

    k = 20
    plain = retriever.slice_from_case(load_case(case_files_from_paths([cohort["data"] / outsider])), k)
    assert plain.database_case is None and not plain.in_database
    expected = retriever.search(plain, top=len(refs))
    assert {h.case_id for h in expected} == set(refs)
    namesake = copy_as(outsider, refs[0])  # another patient, named like database case refs[0]
    q = retriever.slice_from_case(load_case(case_files_from_paths([namesake])), k)
    assert q.case_id == refs[0] and q.database_case is None and not q.in_database
    hits = retriever.search(q, top=len(refs))
    assert [(h.case_id, h.slice_index, h.distance) for h in hits] == [
        (h.case_id, h.slice_index, h.distance) for h in expected
    ]
    # A database case copied elsewhere under another name is that case (same image files): excluded.
    twin = copy_as(refs[1], "renamed_study")
    q2 = retriever.slice_from_case(load_case(case_files_from_paths([twin])), k)
    assert q2.database_case == refs[1] and q2.in_database
    assert refs[1] not in {h.case_id for h in retriever.search(q2, top=len(refs))}
    # The database case itself, given by its folder: excluded too (by its recorded files).
    q3 = retriever.slice_from_case(load_case(case_files_from_paths([cohort["data"] / refs[2]])), k)
    assert q3.database_case == refs[2]
    # Its axial context, encoded from the volume, is the stored one: the same search with context.
    stored = retriever.slice_from_database(refs[2], k)
    assert q3.normal_context is not None and stored.normal_context is not None
    np.testing.assert_array_equal(q3.normal_context, stored.normal_context)
    assert retriever.search(q3, top=3, context=True) == retriever.search(stored, top=3, context=True)


def test_adding_a_namesake_is_refused_and_a_renamed_copy_is_indexed_already(
    cohort: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    db = cohort["work"] / "db_identity"
    studies = cohort["work"] / "studies"
    if not (studies / "renamed_study").is_dir():
        pytest.skip("needs test_an_external_study_named_like_a_database_case_is_not_excluded")
    common = _common(cohort["bundle"], studies)
    rc, _, err = _run(capsys, "index", "add", "--db", str(db), *common)
    assert rc == 2 and f"already holds a case {cohort['good'][0]!r} indexed from other image files" in err
    rc, out, _ = _run(capsys, "index", "add", "--db", str(db), *common, "--skip-bad")
    assert rc == 0 and "skipped 1 bad case(s)" in out and "nothing to add" in out
    assert "already indexed (skipped): 1 case(s): renamed_study" in out


def test_format_1_databases_identify_studies_by_their_codes(cohort: dict[str, Any]) -> None:
    """A format-1 database records no fingerprints: a study is its case when its codes are the case's,
    slice for slice, whatever its name; a namesake with other codes is another study."""
    from db_workers import write_v1

    from fdn_core.codes.database import CaseCodes, CodeDatabase
    from fdn_core.data.readers import case_files_from_paths, load_case
    from fdn_core.model.bundle import load_bundle
    from fdn_core.retrieval import Retriever

    bundle = load_bundle(cohort["bundle"], device="cpu")
    v2 = CodeDatabase.open(cohort["work"] / "db_identity")
    h, w = v2.grid_shape
    cases = []
    for cid in v2.cases:
        rows = v2.case_rows(cid)
        cases.append(
            CaseCodes(
                cid,
                np.asarray(v2.normal_codes[rows]).reshape(-1, h, w),
                np.asarray(v2.abnormal_codes[rows]).reshape(-1, h, w),
                np.asarray(v2.has_abnormal[rows]),
                v2.sources(cid),
                np.asarray(v2.slice_indices[rows]),
            )
        )
    v1 = cohort["work"] / "db_identity_v1"
    write_v1(v1, cases, fingerprint=v2.fingerprint, codebooks=bundle.codebooks(), grid=(h, w))
    retriever = Retriever.open(v1, bundle)
    assert retriever.db.format_version == 1
    studies = cohort["work"] / "studies"
    twin = retriever.slice_from_case(load_case(case_files_from_paths([studies / "renamed_study"])), 20)
    assert twin.database_case == v2.cases[1]  # same codes, other name and place
    namesake = retriever.slice_from_case(load_case(case_files_from_paths([studies / v2.cases[0]])), 20)
    assert namesake.database_case is None  # same name, other codes


def test_fdn_query_with_a_namesake_study_says_it_is_not_in_the_database(
    cohort: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    db = cohort["work"] / "db_identity"
    namesake = cohort["work"] / "studies" / cohort["good"][0]
    if not db.is_dir() or not namesake.is_dir():
        pytest.skip("needs test_an_external_study_named_like_a_database_case_is_not_excluded")
    rc, out, err = _run(capsys, "query", "--db", str(db), "--model", str(cohort["bundle"]), "--case",
                        str(namesake), "--slice", "20", "--device", "cpu", "--top", "10")  # fmt: skip
    assert rc == 0, err
    assert "(not in the database)" in out
    assert cohort["good"][0] in out.split("result(s)")[1]  # the real database case is a result


# --------------------------------------------------------------------------------- model and codebooks


def test_replaced_codebooks_and_altered_models_are_refused(
    cohort: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    import hashlib

    import fdn_core.codes.database as dbmod
    from fdn_core.fileio import sha256_file
    from fdn_core.model.bundle import MANIFEST_NAME, WEIGHTS_NAME, load_bundle, weights_fingerprint

    db = cohort["work"] / "db_model"
    common = _common(cohort["bundle"], cohort["data"])
    rc, _, err = _run(capsys, "index", "build", "--db", str(db), *common, "--cases", *cohort["good"][:2],
                      "--no-hamming")  # fmt: skip
    assert rc == 0, err
    query = ["query", "--db", str(db), "--case", cohort["good"][0], "--slice", "20", "--device", "cpu"]

    # 1. The database's codebook replaced, every hash recomputed: the model's codebooks do not match.
    tampered = cohort["work"] / "db_model_books"
    shutil.copytree(db, tampered)
    m = json.loads((tampered / "manifest.json").read_text())
    book = tampered / m["codebooks"]["folder"] / "codebook_normal.npy"
    values = np.load(book)
    values[0] += 0.5
    np.save(book, values)
    for f in m["codebooks"]["files"]:
        if f["name"] == "codebook_normal.npy":
            f.update(sha256=sha256_file(book), size=book.stat().st_size)
    body = {k: v for k, v in m.items() if k != "manifest_sha256"}
    (tampered / "manifest.json").write_text(
        json.dumps({**body, "manifest_sha256": dbmod._manifest_hash(body)})
    )
    rc, _, err = _run(capsys, *[a if a != str(db) else str(tampered) for a in query], "--model",
                      str(cohort["bundle"]))  # fmt: skip
    assert rc == 2 and "normal codebook differs" in err
    with pytest.raises(ModelMismatchError):
        from fdn_core.retrieval import Retriever

        Retriever.open(tampered, load_bundle(cohort["bundle"], device="cpu"))

    # 2. The model's encoder weights changed and every hash recomputed, fingerprint included: it names
    # another code space, which the database refuses.
    from safetensors.torch import load_file, save_file

    altered = cohort["work"] / "bundle_altered"
    shutil.copytree(cohort["bundle"], altered)
    weights = altered / WEIGHTS_NAME
    state = load_file(str(weights))
    state["stem.0.weight"] = state["stem.0.weight"] * 1.01
    save_file(state, str(weights))
    doc = json.loads((altered / MANIFEST_NAME).read_text())
    doc.pop("manifest_sha256")
    doc["files"][WEIGHTS_NAME] = {"sha256": sha256_file(weights), "bytes": weights.stat().st_size}
    from fdn_core.config import config_from_dict
    from fdn_core.model.fdn import FDNConfig

    doc["fingerprint"] = weights_fingerprint(state, config_from_dict(FDNConfig, doc["model"]))
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    doc["manifest_sha256"] = hashlib.sha256(canonical).hexdigest()
    (altered / MANIFEST_NAME).write_text(json.dumps(doc))
    rc, _, err = _run(capsys, *query, "--model", str(altered))
    assert rc == 2 and "was built with model" in err and "not comparable" in err
    rc, _, err = _run(capsys, "index", "add", "--db", str(db), *_common(altered, cohort["data"]))
    assert rc == 2 and "was built with model" in err


def test_compact_and_info(cohort: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    db = cohort["work"] / "db_compact"
    common = _common(cohort["bundle"], cohort["data"])
    good = cohort["good"]
    rc, _, err = _run(
        capsys, "index", "build", "--db", str(db), *common, "--cases", *good[:2], "--no-hamming"
    )
    assert rc == 0, err
    rc, _, err = _run(
        capsys, "index", "add", "--db", str(db), *common, "--cases", good[2], "--commit-every", "1"
    )
    assert rc == 0, err
    rc, out, _ = _run(capsys, "index", "remove", "--db", str(db), "--case", good[0])
    assert rc == 0
    rc, out, _ = _run(capsys, "index", "info", str(db))
    assert rc == 0 and "segments      2; 1 removed case(s) (40 slices) still on disk" in out
    assert "cases         2 (2 with a source fingerprint)" in out
    rc, out, _ = _run(capsys, "index", "compact", "--db", str(db))
    assert rc == 0 and "2 segment(s) -> 1, 40 removed slice(s) erased" in out
    rc, out, _ = _run(capsys, "index", "compact", "--db", str(db))
    assert rc == 0 and "compact already" in out
    rc, out, _ = _run(capsys, "index", "remove", "--db", str(db), "--case", good[1], "--compact")
    assert rc == 0
    rc, out, _ = _run(capsys, "index", "info", str(db))
    assert rc == 0 and "segments      1\n" in out and "cases         1 " in out
