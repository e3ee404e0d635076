"""Code database: round trip, atomic writes, model mismatch, corruption detection, bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import fdn_core.codes.database as dbmod
from fdn_core.codes.database import CaseCodes, CodeDatabase
from fdn_core.codes.search import SearchEngine
from fdn_core.data.readers import CaseFiles
from fdn_core.errors import DataError, IntegrityError, ModelMismatchError

K, D, GRID = 16, 4, (2, 3)
FP = "f" * 64


def _books(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(K, D)).astype(np.float32), rng.normal(size=(K, D)).astype(np.float32)


def _source(case_id: str) -> dict:
    return {
        "layout": "brats",
        "images": {m: f"/data/{case_id}/{case_id}_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair")},
        "image4d": None,
        "seg": f"/data/{case_id}/{case_id}_seg.nii.gz",
        "anat": None,
    }


def _case(case_id: str, slices: int, seed: int) -> CaseCodes:
    rng = np.random.default_rng(seed)
    return CaseCodes(
        case_id=case_id,
        normal=rng.integers(0, K, (slices, *GRID)).astype(np.uint16),
        abnormal=rng.integers(0, K, (slices, *GRID)).astype(np.uint16),
        has_abnormal=rng.random(slices) < 0.5,
        source=_source(case_id),
    )


def _new(path: Path) -> CodeDatabase:
    bn, ba = _books()
    return CodeDatabase.create(
        path, fingerprint=FP, codebook_normal=bn, codebook_abnormal=ba, grid_shape=GRID
    )


def _state(db: CodeDatabase) -> dict:
    return {
        "normal": np.array(db.normal_codes),
        "abnormal": np.array(db.abnormal_codes),
        "ids": list(db.case_ids),
        "cases": db.cases,
    }


def _listing(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "db"
    db = _new(path)
    assert len(db) == 0 and db.cases == [] and db.case_ids.shape == (0,)
    a, b, c = _case("A", 5, 1), _case("B", 3, 2), _case("C", 4, 3)
    db.add_case(a.case_id, a.normal, a.abnormal, a.has_abnormal, a.source)
    db.add_cases([b, CaseCodes(c.case_id, c.normal, c.abnormal, c.has_abnormal, c.source, np.arange(10, 14))])
    for opened in (db, CodeDatabase.open(path, expected_fingerprint=FP)):
        assert len(opened) == 12 and opened.cases == ["A", "B", "C"]
        assert opened.normal_codes.dtype == np.uint16 and opened.normal_codes.shape == (12, 6)
        np.testing.assert_array_equal(opened.normal_codes[:5], a.normal.reshape(5, 6))  # row-major
        np.testing.assert_array_equal(opened.abnormal_codes[5:8], b.abnormal.reshape(3, 6))
        np.testing.assert_array_equal(
            opened.has_abnormal, np.concatenate([a.has_abnormal, b.has_abnormal, c.has_abnormal])
        )
        np.testing.assert_array_equal(opened.slice_indices, [0, 1, 2, 3, 4, 0, 1, 2, 10, 11, 12, 13])
        assert list(opened.case_ids) == ["A"] * 5 + ["B"] * 3 + ["C"] * 4
        assert opened.sources("B") == _source("B")
        assert opened.case_rows("C") == slice(8, 12)
        np.testing.assert_array_equal(opened.codebook_normal, _books()[0])
        assert opened.grid_shape == GRID and opened.num_codes == K and opened.fingerprint == FP
    info = CodeDatabase.open(path).info()
    assert info["num_cases"] == 3 and info["num_slices"] == 12 and info["grid_shape"] == list(GRID)
    assert info["num_abnormal_slices"] == int(db.has_abnormal.sum()) and info["size_bytes"] > 0
    assert info["created"]["fdn_version"] and info["format_version"] == 1
    # Plain .npy arrays, memory-mappable without pickle, hashed in the manifest.
    manifest = json.loads((path / "manifest.json").read_text())
    arr = np.load(path / manifest["current"] / "normal_codes.npy", mmap_mode="r", allow_pickle=False)
    assert arr.shape == (12, 6)
    db.remove_case("B")
    reopened = CodeDatabase.open(path)
    assert reopened.cases == ["A", "C"] and len(reopened) == 9
    np.testing.assert_array_equal(reopened.normal_codes[5:], c.normal.reshape(4, 6))
    assert reopened.case_rows("C") == slice(5, 9)
    assert _listing(path) == ["manifest.json", manifest_current(path)]  # old versions swept
    # A search engine works straight off the database.
    eng = SearchEngine.from_database(reopened)
    hits = eng.search(eng.query_from_rows(0), top=5)
    assert [h.case_id for h in hits] == ["C"]


def manifest_current(path: Path) -> str:
    return json.loads((path / "manifest.json").read_text())["current"]


@pytest.mark.parametrize("fail_at", ["save", "rename", "manifest"])
def test_interrupted_write_leaves_previous_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_at: str
) -> None:
    path = tmp_path / "db"
    db = _new(path)
    db.add_cases([_case("A", 4, 1), _case("B", 2, 2)])
    before = _state(CodeDatabase.open(path))
    listing = _listing(path)

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("simulated crash")

    if fail_at == "save":  # second array file of the new version fails
        calls = {"n": 0}
        real = dbmod._save_array

        def flaky(p: Path, arr: np.ndarray) -> dict:
            calls["n"] += 1
            if calls["n"] % len(dbmod._ALL_ARRAYS) == 2:
                raise OSError("simulated crash")
            return real(p, arr)

        monkeypatch.setattr(dbmod, "_save_array", flaky)
    elif fail_at == "rename":
        monkeypatch.setattr(dbmod.os, "replace", boom)
    else:
        monkeypatch.setattr(dbmod, "atomic_write_json", boom)
    with pytest.raises(OSError, match="simulated crash"):
        c = _case("C", 3, 3)
        db.add_case("C", c.normal, c.abnormal, c.has_abnormal, c.source)
    with pytest.raises(OSError, match="simulated crash"):
        db.remove_case("A")
    monkeypatch.undo()
    after = _state(CodeDatabase.open(path, expected_fingerprint=FP, verify=True))
    assert after["cases"] == before["cases"] and after["ids"] == before["ids"]
    np.testing.assert_array_equal(after["normal"], before["normal"])
    np.testing.assert_array_equal(after["abnormal"], before["abnormal"])
    assert _listing(path) == listing  # no temporary folders left behind
    CodeDatabase.open(path).add_cases([_case("C", 3, 3)])  # and it is still writable
    assert CodeDatabase.open(path).cases == ["A", "B", "C"]


def test_litter_of_a_killed_process_is_ignored_and_swept(tmp_path: Path) -> None:
    path = tmp_path / "db"
    db = _new(path)
    db.add_cases([_case("A", 4, 1)])
    current = manifest_current(path)
    # What a process killed mid-write leaves: a half-written temp folder and a renamed, unreferenced version.
    (path / ".tmp-v000099-deadbeef").mkdir()
    (path / ".tmp-v000099-deadbeef" / "normal_codes.npy").write_bytes(b"partial")
    (path / "v000050").mkdir()
    (path / "v000050" / "normal_codes.npy").write_bytes(b"garbage")
    reopened = CodeDatabase.open(path)
    assert reopened.cases == ["A"] and manifest_current(path) == current
    reopened.add_cases([_case("B", 2, 2)])
    assert _listing(path) == ["manifest.json", manifest_current(path)]
    assert manifest_current(path) == "v000051"  # numbered past the litter, never reusing a folder


def test_open_during_a_concurrent_write_retries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader that read the manifest just before a writer swapped versions (and swept the old folder)."""
    path = tmp_path / "db"
    db = _new(path)
    db.add_cases([_case("A", 2, 1)])
    stale = json.loads((path / "manifest.json").read_text())
    db.add_cases([_case("B", 2, 2)])
    assert not (path / stale["current"]).exists()
    real = CodeDatabase._read_manifest.__func__
    calls = {"n": 0}

    def read(cls: type, p: Path) -> dict:
        calls["n"] += 1
        return stale if calls["n"] == 1 else real(cls, p)

    monkeypatch.setattr(CodeDatabase, "_read_manifest", classmethod(read))
    assert CodeDatabase.open(path).cases == ["A", "B"] and calls["n"] == 2


def test_model_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "db"
    _new(path)
    with pytest.raises(ModelMismatchError) as err:
        CodeDatabase.open(path, expected_fingerprint="0" * 64)
    msg = str(err.value)
    assert "ffffffffffffffff" in msg and "0000000000000000" in msg and "fdn index build" in msg


def test_corruption_detected(tmp_path: Path) -> None:
    path = tmp_path / "db"
    db = _new(path)
    db.add_cases([_case("A", 6, 1)])
    target = path / manifest_current(path) / "abnormal_codes.npy"
    data = bytearray(target.read_bytes())
    data[-3] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"abnormal_codes\.npy.*fdn index build"):
        CodeDatabase.open(path)
    opened = CodeDatabase.open(path, verify=False)  # explicit opt-out skips hashing
    with pytest.raises(IntegrityError, match=r"abnormal_codes\.npy"):
        opened.verify()
    target.unlink()
    with pytest.raises(IntegrityError, match="missing"):
        CodeDatabase.open(path)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(IntegrityError, match="unreadable"):
        CodeDatabase.open(path)


def test_format_checks(tmp_path: Path) -> None:
    path = tmp_path / "db"
    _new(path)
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(DataError, match="format version 99"):
        CodeDatabase.open(path)
    (path / "manifest.json").write_text(
        json.dumps({**manifest, "cases": [{"case_id": "X", "start": 0, "stop": 3}]})
    )
    with pytest.raises(IntegrityError, match="cover 3 rows"):
        CodeDatabase.open(path)
    with pytest.raises(DataError, match="not a code database"):
        CodeDatabase.open(tmp_path / "nothing-here")


def test_create_refuses_to_clobber(tmp_path: Path) -> None:
    bn, ba = _books()
    kw = {"fingerprint": FP, "codebook_normal": bn, "codebook_abnormal": ba, "grid_shape": GRID}
    other = tmp_path / "documents"
    other.mkdir()
    (other / "thesis.txt").write_text("precious")
    with pytest.raises(DataError, match="not a code database"):
        CodeDatabase.create(other, **kw, overwrite=True)
    (other / "manifest.json").write_text('{"format": "someone-elses"}')
    with pytest.raises(DataError, match="not a code database"):
        CodeDatabase.create(other, **kw, overwrite=True)
    assert (other / "thesis.txt").read_text() == "precious"
    path = tmp_path / "db"
    db = CodeDatabase.create(path, **kw)
    db.add_cases([_case("A", 2, 1)])
    with pytest.raises(DataError, match="overwrite"):
        CodeDatabase.create(path, **kw)
    fresh = CodeDatabase.create(path, **{**kw, "fingerprint": "e" * 64}, overwrite=True)
    assert len(fresh) == 0 and CodeDatabase.open(path, expected_fingerprint="e" * 64).cases == []
    assert _listing(path) == ["manifest.json", manifest_current(path)]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert len(CodeDatabase.create(empty, **kw)) == 0
    with pytest.raises(DataError, match="fingerprint"):
        CodeDatabase.create(tmp_path / "x1", **{**kw, "fingerprint": ""})
    with pytest.raises(DataError, match="grid_shape"):
        CodeDatabase.create(tmp_path / "x2", **{**kw, "grid_shape": (0, 3)})
    with pytest.raises(DataError, match="differ in shape"):
        CodeDatabase.create(tmp_path / "x3", **{**kw, "codebook_abnormal": ba[:5]})
    with pytest.raises(DataError, match="float"):
        CodeDatabase.create(tmp_path / "x4", **{**kw, "codebook_normal": np.zeros((K, D), int)})


def test_bad_cases_are_rejected_and_nothing_written(tmp_path: Path) -> None:
    path = tmp_path / "db"
    db = _new(path)
    db.add_cases([_case("A", 3, 1)])
    version = manifest_current(path)
    good = _case("B", 3, 2)

    def attempt(match: str, **change: object) -> None:
        fields = {**good.__dict__, **change}
        with pytest.raises(DataError, match=match):
            db.add_cases([_case("Z", 2, 9), CaseCodes(**fields)])  # a valid case first: all or nothing

    attempt("already in the database; remove it first", case_id="A")
    attempt(r"\(slices, 2, 3\)", normal=good.normal.reshape(3, 3, 2))
    attempt(r"in \[0, 16\)", abnormal=good.abnormal.astype(np.int64) + K)
    attempt("integer code indices", normal=good.normal.astype(np.float32))
    attempt("3 normal grids but 2 abnormal", abnormal=good.abnormal[:2])
    attempt("has_abnormal", has_abnormal=np.ones(2, bool))
    attempt("slice_indices has repeated", slice_indices=np.array([1, 1, 2]))
    attempt("unknown keys", source={**_source("B"), "notes": "x"})
    attempt("'layout'", source={k: v for k, v in _source("B").items() if k != "layout"})
    attempt("names no image", source={"layout": "msd", "seg": "/x"})
    attempt("no slices", normal=good.normal[:0], abnormal=good.abnormal[:0], has_abnormal=np.zeros(0, bool))
    attempt("case id", case_id=" B")
    with pytest.raises(DataError, match="given twice"):
        db.add_cases([good, good])
    with pytest.raises(DataError, match="no case 'nope'"):
        db.remove_case("nope")
    assert manifest_current(path) == version and CodeDatabase.open(path).cases == ["A"]


def test_case_files_to_source(tmp_path: Path) -> None:
    files = CaseFiles(
        case_id="A",
        layout="msd",
        images=None,
        image4d=tmp_path / "imagesTr" / "A.nii.gz",
        seg=tmp_path / "labelsTr" / "A.nii.gz",
        anat=None,
    )
    src = files.to_source()
    assert src == {
        "layout": "msd",
        "images": None,
        "image4d": str((tmp_path / "imagesTr" / "A.nii.gz").resolve()),
        "seg": str((tmp_path / "labelsTr" / "A.nii.gz").resolve()),
        "anat": None,
    }
    db = _new(tmp_path / "db")
    c = _case("A", 2, 1)
    db.add_case("A", c.normal, c.abnormal, c.has_abnormal, src)
    assert CodeDatabase.open(tmp_path / "db").sources("A") == src
    assert os.path.isabs(db.sources("A")["image4d"])
