"""Code database: round trip, segments, tombstones, compaction, crash at every step of a commit, concurrent
writers and readers (processes), tampering, typed manifests, paths, the format-1 layout, bad input."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from db_workers import FP, GRID, K, add_one, books, case, commit_stream, new_db, source, write_v1

import fdn_core.codes.database as dbmod
from fdn_core.codes.database import CaseCodes, CodeDatabase
from fdn_core.data.readers import CaseFiles
from fdn_core.errors import DataError, IntegrityError, ModelMismatchError
from fdn_core.fileio import sha256_file


def _state(db: CodeDatabase) -> dict[str, Any]:
    return {
        "normal": np.array(db.normal_codes),
        "abnormal": np.array(db.abnormal_codes),
        "slices": np.array(db.slice_indices),
        "ids": list(db.case_ids),
        "cases": db.cases,
    }


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (
        a["cases"] == b["cases"]
        and a["ids"] == b["ids"]
        and all(np.array_equal(a[k], b[k]) for k in ("normal", "abnormal", "slices"))
    )


def _manifest(path: Path) -> dict[str, Any]:
    return json.loads((path / "manifest.json").read_text())


def _write_manifest(path: Path, m: dict[str, Any], rehash: bool = True) -> None:
    """Write a manifest by hand; with ``rehash`` its manifest_sha256 is recomputed (a careful tamperer)."""
    if rehash:
        body = {k: v for k, v in m.items() if k != "manifest_sha256"}
        m = {**body, "manifest_sha256": dbmod._manifest_hash(body)}
    (path / "manifest.json").write_text(json.dumps(m))


def _litter(path: Path) -> list[str]:
    """Anything in the database folder that its manifests do not reference (temporaries, old segments)."""
    m = _manifest(path)
    refs = {m["codebooks"]["folder"], *(s["folder"] for s in m["segments"])}
    out = [
        p.name for p in path.iterdir() if p.name not in {"manifest.json", ".lock", "segments", "codebooks"}
    ]
    for kind in ("segments", "codebooks"):
        if (path / kind).is_dir():
            out += [f"{kind}/{p.name}" for p in (path / kind).iterdir() if f"{kind}/{p.name}" not in refs]
    return sorted(out)


# ------------------------------------------------------------------------------------------ round trip


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "db"
    db = new_db(path)
    assert len(db) == 0 and db.cases == [] and db.case_ids.shape == (0,) and db.segments() == []
    a, b, c = case("A", 5, 1), case("B", 3, 2), case("C", 4, 3, sha="a" * 64)
    db.add_case(a.case_id, a.normal, a.abnormal, a.has_abnormal, a.source)
    db.add_cases(
        [
            b,
            CaseCodes(
                c.case_id, c.normal, c.abnormal, c.has_abnormal, c.source, np.arange(10, 14), c.source_sha256
            ),
        ]
    )
    for opened in (db, CodeDatabase.open(path, expected_fingerprint=FP, expected_codebooks=books())):
        assert len(opened) == 12 and opened.cases == ["A", "B", "C"]
        assert opened.normal_codes.dtype == np.uint8 and opened.normal_codes.shape == (12, 6)  # K = 16
        np.testing.assert_array_equal(opened.normal_codes[:5], a.normal.reshape(5, 6))  # row-major
        np.testing.assert_array_equal(opened.abnormal_codes[5:8], b.abnormal.reshape(3, 6))
        np.testing.assert_array_equal(
            opened.has_abnormal, np.concatenate([a.has_abnormal, b.has_abnormal, c.has_abnormal])
        )
        np.testing.assert_array_equal(opened.slice_indices, [0, 1, 2, 3, 4, 0, 1, 2, 10, 11, 12, 13])
        assert list(opened.case_ids) == ["A"] * 5 + ["B"] * 3 + ["C"] * 4
        assert opened.sources("B") == source("B")
        assert opened.case_rows("C") == slice(8, 12)
        np.testing.assert_array_equal(opened.case_starts, [0, 5, 8, 12])
        assert opened.source_fingerprint("C") == "a" * 64 and opened.source_fingerprint("A") is None
        assert opened.cases_with_fingerprint("a" * 64) == ["C"]
        np.testing.assert_array_equal(opened.codebook_normal, books()[0])
        assert opened.grid_shape == GRID and opened.num_codes == K and opened.fingerprint == FP
    info = CodeDatabase.open(path).info()
    assert info["num_cases"] == 3 and info["num_slices"] == 12 and info["grid_shape"] == list(GRID)
    assert info["num_abnormal_slices"] == int(db.has_abnormal.sum()) and info["size_bytes"] > 0
    assert info["created"]["fdn_version"] and info["format_version"] == 3 and info["num_segments"] == 2
    # Plain .npy arrays, memory-mappable without pickle, hashed in the manifest; the case table too.
    m = _manifest(path)
    seg = path / m["segments"][1]["folder"]
    assert np.load(seg / "normal_codes.npy", mmap_mode="r", allow_pickle=False).shape == (7, 6)
    assert np.load(seg / "case_ids.npy", allow_pickle=False).tolist() == ["B", "C"]
    assert np.load(seg / "case_rows.npy", allow_pickle=False).tolist() == [0, 3, 7]
    entry = {f["name"]: f for f in m["segments"][1]["files"]}["case_ids.npy"]
    assert entry["sha256"] == sha256_file(seg / "case_ids.npy")
    db.remove_case("B")
    reopened = CodeDatabase.open(path)
    assert reopened.cases == ["A", "C"] and len(reopened) == 9 and "B" not in reopened
    np.testing.assert_array_equal(reopened.normal_codes[5:], c.normal.reshape(4, 6))
    assert reopened.case_rows("C") == slice(5, 9)
    assert reopened.info()["removed_slices"] == 3 and reopened.info()["num_removed_cases"] == 1
    assert _litter(path) == []
    kept = _state(reopened)
    assert reopened.compact() and not reopened.compact()
    assert _same(_state(CodeDatabase.open(path)), kept)
    assert len(_manifest(path)["segments"]) == 1 and _litter(path) == []
    # A search engine works straight off the database.
    from fdn_core.codes.search import SearchEngine

    eng = SearchEngine.from_database(reopened)
    hits = eng.search(eng.query_from_rows(0), top=5)
    assert [h.case_id for h in hits] == ["C"]


def test_segments_are_memory_maps_with_live_rows(tmp_path: Path) -> None:
    path = tmp_path / "db"
    db = new_db(path)
    db.add_cases([case("A", 3, 1), case("B", 2, 2)])
    db.add_cases([case("C", 4, 3)])
    db.add_cases([case("D", 1, 4)])
    db.remove_cases(["B", "D"])
    opened = CodeDatabase.open(path)
    segs = opened.segments()
    assert [s.case_ids for s in segs] == [("A", "B"), ("C",)]  # segment of D alone is dead: left out
    s0, s1 = segs
    assert isinstance(s0.normal_codes, np.memmap) and not s0.normal_codes.flags.writeable
    assert s0.alive.tolist() == [True] * 3 + [False] * 2 and s0.case_alive.tolist() == [True, False]
    assert s0.live_start == 0 and s1.live_start == 3 and s0.num_live_rows == 3
    np.testing.assert_array_equal(s0.row_case_index(), [0, 0, 0, 1, 1])
    np.testing.assert_array_equal(s1.live_rows(np.arange(4)), [3, 4, 5, 6])
    np.testing.assert_array_equal(s0.live_rows(np.arange(3)), [0, 1, 2])
    # The concatenated views hold the live rows in the same order (a copy for several segments).
    for name in ("normal_codes", "abnormal_codes", "slice_indices", "has_abnormal"):
        parts = [np.asarray(getattr(s, name))[s.alive] for s in segs]
        np.testing.assert_array_equal(getattr(opened, name), np.concatenate(parts))
    assert opened.cases == ["A", "C"] and list(opened.case_ids) == ["A"] * 3 + ["C"] * 4
    normal, abnormal = opened.slice_codes("C", 2)  # read from its segment, no concatenation
    np.testing.assert_array_equal(normal, opened.normal_codes[5])
    np.testing.assert_array_equal(abnormal, opened.abnormal_codes[5])
    assert opened.case_abnormal_count("C") == int(opened.has_abnormal[3:7].sum())
    with pytest.raises(DataError, match="has no slice 9"):
        opened.slice_codes("C", 9)
    # After compaction: one segment, and the views are the memory map itself.
    opened.compact()
    assert len(opened.segments()) == 1 and isinstance(opened.normal_codes, np.memmap)
    assert opened.cases == ["A", "C"] and len(opened) == 7
    # Rows of a case are stored in slice order, whatever order they came in.
    c = case("R", 3, 8)
    opened.add_cases(
        [CaseCodes(c.case_id, c.normal, c.abnormal, c.has_abnormal, c.source, np.array([7, 2, 5]))]
    )
    rows = opened.case_rows("R")
    np.testing.assert_array_equal(opened.slice_indices[rows], [2, 5, 7])
    np.testing.assert_array_equal(opened.normal_codes[rows], c.normal.reshape(3, 6)[[1, 2, 0]])
    opened.remove_cases(["R"])
    # A removed id can be added again (another study of that patient).
    opened.add_cases([case("B", 2, 9)])
    assert CodeDatabase.open(path).cases == ["A", "C", "B"]


def test_small_segments_are_merged_automatically(tmp_path: Path) -> None:
    path = tmp_path / "db"
    db = new_db(path)
    db.merge_fanout = 4
    expected = []
    for i in range(21):
        db.add_cases([case(f"C{i:02d}", 2, i)])
        expected.append(f"C{i:02d}")
        assert len(_manifest(path)["segments"]) <= 3 * 4
    db.remove_cases(["C03"])
    expected.remove("C03")
    for i in range(21, 30):
        db.add_cases([case(f"C{i:02d}", 2, i)])
        expected.append(f"C{i:02d}")
    opened = CodeDatabase.open(path)
    assert opened.cases == expected and len(opened) == 2 * len(expected)
    assert len(_manifest(path)["segments"]) < 12 and _litter(path) == []
    opened.verify()


# ------------------------------------------------------------------------------------ crash at every step


class Crash(BaseException):
    """A simulated process death (not an Exception: nothing may catch it)."""


def _steps(monkeypatch: pytest.MonkeyPatch, op: Callable[[], object]) -> list[str]:
    """Run ``op`` once, recording the commit steps it passes."""
    seen: list[str] = []
    monkeypatch.setattr(dbmod, "_fail_point", seen.append)
    op()
    monkeypatch.setattr(dbmod, "_fail_point", lambda step: None)
    return seen


def _crash_at(monkeypatch: pytest.MonkeyPatch, index: int) -> None:
    calls = {"n": 0}

    def fail(step: str) -> None:
        calls["n"] += 1
        if calls["n"] == index + 1:
            raise Crash(step)

    monkeypatch.setattr(dbmod, "_fail_point", fail)


OPERATIONS: dict[str, Callable[[CodeDatabase], object]] = {
    "add": lambda db: db.add_cases([case("C", 3, 3), case("D", 2, 4)]),
    "remove": lambda db: db.remove_cases(["A"]),
    "compact": lambda db: db.compact(),
    "add+merge": lambda db: db.add_cases([case("M", 2, 7)]),
}


@pytest.mark.parametrize("op", list(OPERATIONS))
def test_a_crash_at_every_step_leaves_the_last_committed_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, op: str
) -> None:
    template = tmp_path / "template"
    db = new_db(template)
    db.add_cases([case("A", 4, 1), case("B", 2, 2)])
    db.add_cases([case("E", 2, 5)])
    db.remove_cases(["E"])
    if op == "add+merge":
        for i in range(6):
            db.add_cases([case(f"F{i}", 1, 10 + i)])
    before = _state(CodeDatabase.open(template))
    trial = tmp_path / "dry"
    shutil.copytree(template, trial)
    dry = CodeDatabase.open(trial)
    steps = _steps(monkeypatch, lambda: OPERATIONS[op](dry))
    after = _state(CodeDatabase.open(trial))
    assert "manifest" in steps and "replaced" in steps and "committed" in steps, steps
    for i, step in enumerate(steps):
        work = tmp_path / f"crash{i}"
        shutil.copytree(template, work)
        victim = CodeDatabase.open(work)
        _crash_at(monkeypatch, i)
        with pytest.raises(Crash):
            OPERATIONS[op](victim)
        monkeypatch.setattr(dbmod, "_fail_point", lambda step: None)
        reopened = CodeDatabase.open(work, verify=True)
        reopened.verify()
        got = _state(reopened)
        committed = i >= steps.index("replaced")
        assert _same(got, after if committed else before) or (op == "add+merge" and _same(got, after)), (
            f"crash at step {i} ({step})"
        )
        # The next write sweeps whatever the crash left and works.
        reopened.add_cases([case("Z", 1, 99)])
        assert _litter(work) == [], f"crash at step {i} ({step})"
        assert CodeDatabase.open(work).cases[-1] == "Z"


@pytest.mark.parametrize("where", ["array", "manifest", "rename"])
def test_os_errors_leave_the_database_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """Disk full while writing an array or the manifest, device busy on the rename: the database keeps its
    last committed state and nothing is left half-written."""
    path = tmp_path / "db"
    db = new_db(path)
    db.add_cases([case("A", 4, 1), case("B", 2, 2)])
    db.add_cases([case("E", 1, 5)])  # two segments: compaction has work to do
    before = _state(CodeDatabase.open(path))
    listing = sorted(p.relative_to(path).as_posix() for p in path.rglob("*"))
    code = errno.EBUSY if where == "rename" else errno.ENOSPC

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(code, os.strerror(code), str(path / "x"))

    ops: list[Callable[[], object]] = [lambda: db.add_cases([case("C", 3, 3)]), db.compact]
    if where == "array":
        real = dbmod._write_npy

        def flaky(p: Path, *args: Any, **kwargs: Any) -> Any:
            if p.name == "slice_indices.npy":  # the third array of every segment
                fail()
            return real(p, *args, **kwargs)

        monkeypatch.setattr(dbmod, "_write_npy", flaky)
    elif where == "manifest":
        monkeypatch.setattr(dbmod, "atomic_write_json", fail)
        ops.append(lambda: db.remove_cases(["A"]))
    else:
        monkeypatch.setattr(dbmod.os, "replace", fail)
        ops.append(lambda: db.remove_cases(["A"]))
    for op in ops:
        with pytest.raises(OSError) as err:
            op()
        assert err.value.errno == code
    monkeypatch.undo()
    assert _same(_state(CodeDatabase.open(path, verify=True)), before)
    assert sorted(p.relative_to(path).as_posix() for p in path.rglob("*")) == listing
    CodeDatabase.open(path).add_cases([case("C", 3, 3)])
    assert CodeDatabase.open(path).cases == ["A", "B", "E", "C"]


def test_a_failed_write_removes_only_what_it_created(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two handles on one database: one commits, the other fails mid-write; the first one's work stays."""
    path = tmp_path / "db"
    new_db(path).add_cases([case("A", 2, 1)])
    first, second = CodeDatabase.open(path), CodeDatabase.open(path)
    first.add_cases([case("B", 2, 2)])

    def crash(step: str) -> None:
        if step == "manifest":
            raise OSError(errno.EIO, "simulated I/O error")

    monkeypatch.setattr(dbmod, "_fail_point", crash)
    with pytest.raises(OSError):
        second.add_cases([case("C", 2, 3)])
    monkeypatch.undo()
    assert CodeDatabase.open(path, verify=True).cases == ["A", "B"]
    second.add_cases([case("C", 2, 3)])  # re-reads the manifest under the lock: B is kept
    assert CodeDatabase.open(path).cases == ["A", "B", "C"] and _litter(path) == []


def test_litter_of_a_killed_process_is_ignored_and_swept(tmp_path: Path) -> None:
    path = tmp_path / "db"
    db = new_db(path)
    db.add_cases([case("A", 4, 1)])
    generation = db.generation
    # What a process killed mid-write leaves: a half-written temporary segment, a renamed but unreferenced
    # segment, and (from format 1) a stray version folder.
    (path / "segments" / ".tmp-000099-deadbeef").mkdir()
    (path / "segments" / ".tmp-000099-deadbeef" / "normal_codes.npy").write_bytes(b"partial")
    (path / "segments" / "000050-abcdef12").mkdir()
    (path / "segments" / "000050-abcdef12" / "normal_codes.npy").write_bytes(b"garbage")
    (path / "v000050").mkdir()
    reopened = CodeDatabase.open(path)
    assert reopened.cases == ["A"] and reopened.generation == generation
    reopened.add_cases([case("B", 2, 2)])
    assert _litter(path) == []
    assert not (path / "v000050").exists() and len(_manifest(path)["segments"]) == 2


# -------------------------------------------------------------------------------- concurrency (processes)


@contextlib.contextmanager
def _processes() -> Iterator[Any]:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["db_workers"])
    with ctx.Pool(2) as pool:
        yield pool


@pytest.mark.slow
def test_two_writer_processes_never_lose_a_case(tmp_path: Path) -> None:
    path = tmp_path / "db"
    new_db(path)
    expected: list[str] = []
    trials = 15
    with _processes() as pool:
        pool.apply(time.sleep, (0,))  # warm the pool up
        for t in range(trials):
            start = time.time() + 0.3
            jobs = [
                pool.apply_async(add_one, (str(path), f"T{t}{w}", 10 * t + i, start))
                for i, w in enumerate("ab")
            ]
            assert sorted(j.get(timeout=60) for j in jobs) == [f"T{t}a", f"T{t}b"]
            expected += [f"T{t}a", f"T{t}b"]
            assert sorted(CodeDatabase.open(path, verify=False).cases) == sorted(expected), f"trial {t}"
    db = CodeDatabase.open(path, verify=True)
    db.verify()
    assert sorted(db.cases) == sorted(expected) and len(db) == 3 * 2 * trials and _litter(path) == []


@pytest.mark.slow
def test_readers_during_a_stream_of_commits_never_fail(tmp_path: Path) -> None:
    path = tmp_path / "db"
    new_db(path).add_cases([case("A", 3, 1)])
    opens, errors = 0, []
    with _processes() as pool:
        writer = pool.apply_async(commit_stream, (str(path), 8.0))
        deadline = time.time() + 7.5
        while time.time() < deadline:
            try:
                db = CodeDatabase.open(path, verify=opens % 5 == 0)
                n = len(db)
                assert db.normal_codes.shape[0] == n and int(np.asarray(db.normal_codes).sum()) >= 0
                for cid in db.cases[-2:]:
                    db.sources(cid)
                db.close()
                opens += 1
            except Exception as exc:
                errors.append(repr(exc))
        commits = writer.get(timeout=60)
    assert errors == [] and opens > 30 and commits > 10, (opens, commits, errors[:3])


# ----------------------------------------------------------------------------------- model and integrity


def test_model_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "db"
    new_db(path)
    with pytest.raises(ModelMismatchError) as err:
        CodeDatabase.open(path, expected_fingerprint="0" * 64)
    msg = str(err.value)
    assert "ffffffffffffffff" in msg and "0000000000000000" in msg and "fdn index build" in msg
    bn, ba = books()
    replaced = bn.copy()
    replaced[3, 1] += 1e-3
    with pytest.raises(ModelMismatchError, match="normal codebook differs"):
        CodeDatabase.open(path, expected_fingerprint=FP, expected_codebooks=(replaced, ba))
    with pytest.raises(ModelMismatchError, match="abnormal codebook differs"):
        CodeDatabase.open(path, expected_fingerprint=FP, expected_codebooks=(bn, ba[:5]))
    CodeDatabase.open(path, expected_fingerprint=FP, expected_codebooks=(bn, ba))


def test_corruption_detected(tmp_path: Path) -> None:
    path = tmp_path / "db"
    db = new_db(path)
    db.add_cases([case("A", 6, 1)])
    seg = path / _manifest(path)["segments"][0]["folder"]
    target = seg / "abnormal_codes.npy"
    data = bytearray(target.read_bytes())
    data[-3] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"abnormal_codes\.npy.*fdn index build"):
        CodeDatabase.open(path)
    opened = CodeDatabase.open(path, verify=False)  # explicit opt-out skips hashing the big arrays
    with pytest.raises(IntegrityError, match=r"abnormal_codes\.npy"):
        opened.verify()
    # Compaction never carries a damaged row into a new, freshly hashed segment.
    opened.add_cases([case("B", 2, 2)])
    with pytest.raises(IntegrityError, match=r"abnormal_codes\.npy"):
        opened.compact()
    assert len(_manifest(path)["segments"]) == 2 and _litter(path) == []
    target.write_bytes(bytes(data[:-1]))
    with pytest.raises(IntegrityError, match="truncated"):
        CodeDatabase.open(path, verify=False)  # sizes are always checked
    target.unlink()
    with pytest.raises(IntegrityError, match="missing"):
        CodeDatabase.open(path)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(IntegrityError, match="unreadable"):
        CodeDatabase.open(path)


def _rewrite_array(path: Path, seg: dict[str, Any], name: str, arr: np.ndarray) -> None:
    """Replace one array of a segment and record its new hash in the manifest (a careful tamperer)."""
    fpath = path / seg["folder"] / name
    np.save(fpath, arr, allow_pickle=False)
    for f in seg["files"]:
        if f["name"] == name:
            f.update(
                sha256=sha256_file(fpath),
                size=fpath.stat().st_size,
                dtype=str(arr.dtype),
                shape=list(arr.shape),
            )


def test_manifest_and_case_table_tampering_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "db"
    db = new_db(path)
    db.add_cases([case("A", 4, 1), case("B", 3, 2)])
    db.add_cases([case("C", 2, 3)])
    db.remove_cases(["C"])
    pristine = tmp_path / "pristine"
    shutil.copytree(path, pristine)

    def fresh() -> tuple[Path, dict[str, Any]]:
        shutil.rmtree(path)
        shutil.copytree(pristine, path)
        return path, _manifest(path)

    # A hand edit of the manifest (dropping a tombstone would resurrect a removed patient).
    p, m = fresh()
    m["removed"] = []
    _write_manifest(p, m, rehash=False)
    with pytest.raises(IntegrityError, match="edited or damaged"):
        CodeDatabase.open(p)
    # Renamed case: the case table is a hashed file.
    p, m = fresh()
    seg = p / m["segments"][0]["folder"]
    np.save(seg / "case_ids.npy", np.asarray(["B", "A"]), allow_pickle=False)
    for opener in (lambda: CodeDatabase.open(p, verify=False), lambda: CodeDatabase.open(p)):
        with pytest.raises(IntegrityError, match=r"case_ids\.npy"):
            opener()
    # Shifted row ranges with every hash recomputed: the slices stored in the rows say otherwise (the
    # verify pass reads them: each case's slice indices increase along its rows).
    p, m = fresh()
    _rewrite_array(p, m["segments"][0], "case_rows.npy", np.asarray([0, 3, 7], dtype=np.int64))
    _write_manifest(p, m)
    with pytest.raises(IntegrityError, match="'B' do not increase along its rows"):
        CodeDatabase.open(p, verify=True)
    # Shifted row ranges that do not partition the rows.
    p, m = fresh()
    _rewrite_array(p, m["segments"][0], "case_rows.npy", np.asarray([0, 4, 8], dtype=np.int64))
    _write_manifest(p, m)
    with pytest.raises(IntegrityError, match="do not partition"):
        CodeDatabase.open(p, verify=False)
    # Duplicate ids within a segment, and across segments.
    p, m = fresh()
    _rewrite_array(p, m["segments"][0], "case_ids.npy", np.asarray(["A", "A"]))
    _write_manifest(p, m)
    with pytest.raises(IntegrityError, match="appear twice"):
        CodeDatabase.open(p, verify=False)
    p, m = fresh()
    _rewrite_array(p, m["segments"][1], "case_ids.npy", np.asarray(["A"]))
    m["removed"] = []
    _write_manifest(p, m)
    with pytest.raises(IntegrityError, match="stored twice"):
        CodeDatabase.open(p, verify=False)
    # The same segment listed twice.
    p, m = fresh()
    m["segments"].append(m["segments"][0])
    _write_manifest(p, m)
    with pytest.raises(IntegrityError, match="twice"):
        CodeDatabase.open(p, verify=False)
    # A tombstone naming no stored case.
    p, m = fresh()
    m["removed"] = [{"segment": m["segments"][0]["folder"], "case_id": "nobody"}]
    _write_manifest(p, m)
    with pytest.raises(IntegrityError, match="names no stored case"):
        CodeDatabase.open(p, verify=False)
    # sources.json rewritten to attribute a case to another patient's files.
    p, m = fresh()
    seg = p / m["segments"][0]["folder"]
    doc = json.loads((seg / "sources.json").read_text())
    doc["cases"][0]["source"], doc["cases"][1]["source"] = (
        doc["cases"][1]["source"],
        doc["cases"][0]["source"],
    )
    (seg / "sources.json").write_text(json.dumps(doc))
    with pytest.raises(IntegrityError, match=r"sources\.json"):
        CodeDatabase.open(p, verify=False).sources("A")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda m: m.update(segments=None), "segments"),
        (lambda m: m.update(segments={"a": 1}), "segments"),
        (lambda m: m.update(grid_shape="8x8"), "grid_shape"),
        (lambda m: m.update(grid_shape=[2, "3"]), "grid_shape"),
        (lambda m: m["segments"][0].update(files=None), "files"),
        (lambda m: m["segments"][0]["files"][0].update(size="12"), "size"),
        (lambda m: m["segments"][0].update(num_rows=None), "num_rows"),
        (lambda m: m.update(removed=[["seg", "A"]]), "removed"),
        (lambda m: m.update(codebooks=[]), "codebooks"),
        (lambda m: m.update(fingerprint=7), "fingerprint"),
        (lambda m: m.update(extra=1), "extra"),
        (lambda m: m.pop("segments"), "segments"),
    ],
)
def test_wrongly_typed_manifest_fields_are_clear_errors(tmp_path: Path, change: Any, match: str) -> None:
    path = tmp_path / "db"
    new_db(path).add_cases([case("A", 2, 1)])
    m = _manifest(path)
    change(m)
    _write_manifest(path, m)
    with pytest.raises(IntegrityError, match=match) as err:
        CodeDatabase.open(path)
    assert "manifest.json" in str(err.value)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda m: m.update(files=None), "files"),
        (lambda m: m.update(cases={"A": [0, 2]}), "cases"),
        (lambda m: m.update(grid_shape="2x3"), "grid_shape"),
        (lambda m: m["cases"][0].update(start="0"), "start"),
        (lambda m: m.update(current="../elsewhere"), "current"),
    ],
)
def test_wrongly_typed_format_1_manifests_are_clear_errors(tmp_path: Path, change: Any, match: str) -> None:
    path = tmp_path / "db"
    write_v1(path, [case("A", 2, 1)])
    m = _manifest(path)
    change(m)
    _write_manifest(path, m, rehash=False)
    with pytest.raises(IntegrityError, match=match):
        CodeDatabase.open(path)


def test_files_outside_the_database_are_never_read(tmp_path: Path) -> None:
    path = tmp_path / "db"
    new_db(path).add_cases([case("A", 2, 1)])
    pristine = tmp_path / "pristine"
    shutil.copytree(path, pristine)
    for folder in ("../outside", "segments/../../outside", "/etc", "segments/000001-0000000g"):
        m = _manifest(path)
        m["segments"][0]["folder"] = folder
        _write_manifest(path, m)
        with pytest.raises(IntegrityError, match="not a segments folder"):
            CodeDatabase.open(path)
    # A segment folder that is a link to somewhere else.
    shutil.rmtree(path)
    shutil.copytree(pristine, path)
    seg = path / _manifest(path)["segments"][0]["folder"]
    elsewhere = tmp_path / "elsewhere"
    seg.rename(elsewhere)
    seg.symlink_to(elsewhere)
    with pytest.raises(IntegrityError, match="outside"):
        CodeDatabase.open(path)
    # ... or a file in it that is a link.
    seg.unlink()
    elsewhere.rename(seg)
    (seg / "sources.json").rename(tmp_path / "sources.json")
    (seg / "sources.json").symlink_to(tmp_path / "sources.json")
    with pytest.raises(IntegrityError, match="outside"):
        CodeDatabase.open(path)


def test_format_checks(tmp_path: Path) -> None:
    path = tmp_path / "db"
    new_db(path)
    manifest = _manifest(path)
    _write_manifest(path, {**manifest, "format_version": 99})
    with pytest.raises(DataError, match="format version 99"):
        CodeDatabase.open(path)
    with pytest.raises(DataError, match="not a code database"):
        CodeDatabase.open(tmp_path / "nothing-here")
    (path / "manifest.json").write_text(json.dumps({"format": "someone-elses"}))
    with pytest.raises(DataError, match="not a code database manifest"):
        CodeDatabase.open(path)


# ---------------------------------------------------------------------------------------- format 1


def test_format_1_is_read_and_converted_by_the_first_write(tmp_path: Path) -> None:
    path = tmp_path / "db"
    a, b = case("A", 4, 1), case("B", 3, 2)
    write_v1(path, [a, b])
    old = CodeDatabase.open(path, expected_fingerprint=FP, expected_codebooks=books())
    assert old.format_version == 1 and old.cases == ["A", "B"] and len(old) == 7
    np.testing.assert_array_equal(old.normal_codes[4:], b.normal.reshape(3, 6))
    assert old.sources("B") == source("B") and old.source_fingerprint("A") is None
    assert len(old.segments()) == 1 and old.info()["format_version"] == 1
    before = _state(old)
    old.add_cases([case("C", 2, 3)])
    new = CodeDatabase.open(path, verify=True)
    new.verify()
    assert new.format_version == dbmod.FORMAT_VERSION and new.cases == ["A", "B", "C"]
    state = _state(new)
    for key in ("normal", "abnormal", "slices"):
        np.testing.assert_array_equal(state[key][:7], before[key])
    assert not (path / "v000003").exists() and _litter(path) == []
    assert new.generation > 3


def test_format_1_conversion_survives_a_crash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "db"
    write_v1(path, [case("A", 4, 1)])

    def crash(step: str) -> None:
        if step == "segment-rename":
            raise Crash(step)

    monkeypatch.setattr(dbmod, "_fail_point", crash)
    with pytest.raises(Crash):
        CodeDatabase.open(path).add_cases([case("B", 2, 2)])
    monkeypatch.undo()
    assert CodeDatabase.open(path).format_version == 1 and CodeDatabase.open(path).cases == ["A"]
    CodeDatabase.open(path).remove_cases(["A"])
    assert (
        CodeDatabase.open(path).cases == [] and CodeDatabase.open(path).format_version == dbmod.FORMAT_VERSION
    )


# ------------------------------------------------------------------------------------- staged builds


def test_staged_build_is_resumable_and_invisible_until_finished(tmp_path: Path) -> None:
    path = tmp_path / "db"
    bn, ba = books()
    kw = {"fingerprint": FP, "codebook_normal": bn, "codebook_abnormal": ba, "grid_shape": GRID}
    staged = CodeDatabase.begin_build(path, **kw)
    assert staged.staged and not staged.resumed
    staged.add_cases([case("A", 2, 1)])
    with pytest.raises(DataError, match="unfinished `fdn index build`"):
        CodeDatabase.open(path)
    again = CodeDatabase.begin_build(path, **kw)  # the same build again: resumed, A kept
    assert again.resumed and again.cases == ["A"]
    again.add_cases([case("B", 2, 2)])
    db = again.finish_build()
    assert not db.staged and CodeDatabase.open(path).cases == ["A", "B"]
    assert not (path / "build.json").exists()
    # A rebuild beside the finished database: readers keep the old one until the rebuild finishes.
    with pytest.raises(DataError, match="already exists"):
        CodeDatabase.begin_build(path, **kw)
    other = CodeDatabase.begin_build(path, **{**kw, "fingerprint": "e" * 64}, overwrite=True)
    other.add_cases([case("X", 2, 5)])
    assert CodeDatabase.open(path).cases == ["A", "B"]
    with pytest.raises(DataError, match="interrupted rebuild"):
        CodeDatabase.begin_build(path, **kw)
    # A build of another model replaces a stale unfinished one.
    fresh = CodeDatabase.begin_build(path, **kw, overwrite=True)
    assert not fresh.resumed and fresh.cases == []
    fresh.add_cases([case("Y", 2, 6)])
    fresh.finish_build()
    assert CodeDatabase.open(path).cases == ["Y"] and _litter(path) == []


def test_create_refuses_to_clobber(tmp_path: Path) -> None:
    bn, ba = books()
    kw = {"fingerprint": FP, "codebook_normal": bn, "codebook_abnormal": ba, "grid_shape": GRID}
    other = tmp_path / "documents"
    other.mkdir()
    (other / "thesis.txt").write_text("precious")
    with pytest.raises(DataError, match="not a code database"):
        CodeDatabase.create(other, **kw, overwrite=True)
    with pytest.raises(DataError, match="not a code database"):
        CodeDatabase.begin_build(other, **kw, overwrite=True)
    (other / "manifest.json").write_text('{"format": "someone-elses"}')
    with pytest.raises(DataError, match="not a code database"):
        CodeDatabase.create(other, **kw, overwrite=True)
    assert (other / "thesis.txt").read_text() == "precious"
    path = tmp_path / "db"
    db = CodeDatabase.create(path, **kw)
    db.add_cases([case("A", 2, 1)])
    (path / "hamming").mkdir()
    with pytest.raises(DataError, match="overwrite"):
        CodeDatabase.create(path, **kw)
    fresh = CodeDatabase.create(path, **{**kw, "fingerprint": "e" * 64}, overwrite=True)
    assert len(fresh) == 0 and CodeDatabase.open(path, expected_fingerprint="e" * 64).cases == []
    assert _litter(path) == [] and not (path / "hamming").exists()  # codes of the old codebooks go
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
        CodeDatabase.create(tmp_path / "x4", **{**kw, "codebook_normal": np.zeros((K, 4), int)})


def test_bad_cases_are_rejected_and_nothing_written(tmp_path: Path) -> None:
    path = tmp_path / "db"
    db = new_db(path)
    db.add_cases([case("A", 3, 1)])
    generation = db.generation
    good = case("B", 3, 2)

    def attempt(match: str, **change: object) -> None:
        fields = {**good.__dict__, **change}
        with pytest.raises(DataError, match=match):
            db.add_cases([case("Z", 2, 9), CaseCodes(**fields)])  # a valid case first: all or nothing

    attempt("already in the database; remove it first", case_id="A")
    attempt(r"\(slices, 2, 3\)", normal=good.normal.reshape(3, 3, 2))
    attempt(r"in \[0, 16\)", abnormal=good.abnormal.astype(np.int64) + K)
    attempt("integer code indices", normal=good.normal.astype(np.float32))
    attempt("3 normal grids but 2 abnormal", abnormal=good.abnormal[:2])
    attempt("has_abnormal", has_abnormal=np.ones(2, bool))
    attempt("slice_indices has repeated", slice_indices=np.array([1, 1, 2]))
    attempt("unknown keys", source={**source("B"), "notes": "x"})
    attempt("'layout'", source={k: v for k, v in source("B").items() if k != "layout"})
    attempt("names no image", source={"layout": "msd", "seg": "/x"})
    attempt("no slices", normal=good.normal[:0], abnormal=good.abnormal[:0], has_abnormal=np.zeros(0, bool))
    attempt("case id", case_id=" B")
    attempt("source_sha256", source_sha256="not-a-hash")
    with pytest.raises(DataError, match="given twice"):
        db.add_cases([good, good])
    with pytest.raises(DataError, match="no case 'nope'"):
        db.remove_case("nope")
    assert db.generation == generation and CodeDatabase.open(path).cases == ["A"]
    # The same study added again by another process meanwhile is skipped on request, not duplicated.
    db.add_cases([case("S", 2, 3, sha="b" * 64)])
    assert db.add_cases([case("S", 2, 3, sha="b" * 64)], if_present="skip") == []
    with pytest.raises(DataError, match="already in the database"):
        db.add_cases([case("S", 2, 3, sha="c" * 64)], if_present="skip")


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
    db = new_db(tmp_path / "db")
    c = case("A", 2, 1)
    db.add_case("A", c.normal, c.abnormal, c.has_abnormal, src)
    assert CodeDatabase.open(tmp_path / "db").sources("A") == src
    assert os.path.isabs(db.sources("A")["image4d"])


# ------------------------------------------------------------------------------- read-only, lock, gap


def _unprivileged(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` as a user without write permission on root-owned folders (root ignores chmod): in a forked
    child that drops to uid/gid 65534 when we are root; directly otherwise."""
    if os.geteuid() != 0:
        return fn()
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()

    def body() -> None:
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            child.send(("ok", fn()))
        except BaseException as exc:
            child.send(("error", exc))

    proc = ctx.Process(target=body)
    proc.start()
    kind, value = parent.recv()
    proc.join(30)
    if kind == "error":
        raise value
    return value


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
def test_read_only_database_reads_and_refuses_writes_clearly() -> None:
    import tempfile

    from fdn_core.cli import main

    base = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        path = base / "db"
        new_db(path).add_cases([case("A", 3, 1)])
        import filelock  # noqa: F401 - imported before the child drops privileges

        from fdn_core.cli import build_parser

        build_parser()  # imports every command module before the child drops privileges
        for p in [path, *path.rglob("*")]:
            os.chmod(p, 0o555 if p.is_dir() else 0o444)

        def attempt() -> tuple[list[str], str, int]:
            cases = CodeDatabase.open(path).cases  # reading needs no write permission
            try:
                CodeDatabase.open(path).add_cases([case("B", 2, 2)])
                err = "no error"
            except OSError as exc:
                from fdn_core.fileio import describe_os_error

                err = describe_os_error(exc) + "".join(getattr(exc, "__notes__", []))
            rc = main(["index", "remove", "--db", str(path), "--case", "A"])
            return cases, err, rc

        cases, err, rc = _unprivileged(attempt)
        assert cases == ["A"]
        assert ("EACCES" in err or "EROFS" in err or "EPERM" in err) and "nothing was changed" in err, err
        assert rc == 2
        assert CodeDatabase.open(path, verify=True).cases == ["A"]
    finally:
        for p in [base, *base.rglob("*")]:
            with contextlib.suppress(OSError):
                os.chmod(p, 0o755)
        shutil.rmtree(base, ignore_errors=True)


def test_a_writer_waits_for_the_lock_and_says_so(tmp_path: Path) -> None:
    from filelock import FileLock

    path = tmp_path / "db"
    new_db(path)
    db = CodeDatabase.open(path)
    db.lock_timeout = 0.3
    with FileLock(str(path / ".lock")), pytest.raises(DataError, match="another process has been writing"):
        db.add_cases([case("A", 2, 1)])
    db.add_cases([case("A", 2, 1)])


def test_an_interrupted_replacement_is_repaired_on_open(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A process that died between the two renames of a folder replacement (the old ``atomic_dir``): the
    database sits in ``.db.old`` and the new copy in ``.db.*.tmp``; opening puts one back."""
    path = tmp_path / "db"
    new_db(path).add_cases([case("A", 2, 1)])
    os.replace(path, tmp_path / ".db.old")
    stale = tmp_path / ".db.ab12cd34.tmp"
    stale.mkdir()
    old = time.time() - 60
    os.utime(tmp_path / ".db.old", (old, old))
    with caplog.at_level("WARNING"):
        assert CodeDatabase.open(path).cases == ["A"]
    assert "undid an interrupted replacement" in caplog.text
    assert not (tmp_path / ".db.old").exists()
    # With the marker of the two-rename fallback, the complete new copy is put in place.
    shutil.copytree(path, tmp_path / ".db.host.1.xyz.tmp")
    CodeDatabase.open(tmp_path / ".db.host.1.xyz.tmp").add_cases([case("B", 2, 2)])
    os.replace(path, tmp_path / ".db.old")
    (tmp_path / ".db.swap.json").write_text(json.dumps({"new": ".db.host.1.xyz.tmp", "old": ".db.old"}))
    os.utime(tmp_path / ".db.swap.json", (old, old))
    assert CodeDatabase.open(path).cases == ["A", "B"]
    assert not (tmp_path / ".db.swap.json").exists() and not (tmp_path / ".db.old").exists()


def test_sha256_of_manifest_helper_matches_canonical_json() -> None:
    body = {"b": 1, "a": [1, 2]}
    assert dbmod._manifest_hash(body) == hashlib.sha256(b'{"a":[1,2],"b":1}').hexdigest()


def _one_array_engine(opened: CodeDatabase, dtype: Any = None) -> Any:
    """A search engine over copies of the database's live rows as single arrays (``dtype``: the codes')."""
    from fdn_core.codes.search import SearchEngine

    return SearchEngine(
        normal_codes=np.array(opened.normal_codes, dtype=dtype),
        abnormal_codes=np.array(opened.abnormal_codes, dtype=dtype),
        case_ids=np.array(opened.case_ids),
        slice_indices=np.array(opened.slice_indices),
        codebook_normal=opened.codebook_normal,
        codebook_abnormal=opened.codebook_abnormal,
        grid_shape=opened.grid_shape,
    )


def test_search_spans_segments_and_skips_removed_cases(tmp_path: Path) -> None:
    """The engine scans the live rows of every segment in place and ranks exactly as over one array."""
    from fdn_core.codes.search import Query, SearchEngine

    path = tmp_path / "db"
    db = new_db(path)
    db.add_cases([case("A", 3, 1), case("B", 2, 2), case("E", 2, 5)])
    db.add_cases([case("C", 4, 3)])
    db.add_cases([case("D", 1, 4)])
    db.remove_cases(["B", "D"])
    opened = CodeDatabase.open(path)
    assert len(opened.segments()) == 2  # A, (B removed), E | C
    segmented = SearchEngine.from_database(opened)
    flat = _one_array_engine(opened)
    query = Query(normal=opened.normal_codes[4], abnormal=opened.abnormal_codes[0])
    for mode in ("normal", "sum"):
        for per in ("slice", "volume"):
            got = segmented.search(query, mode=mode, top=20, per=per)
            want = flat.search(query, mode=mode, top=20, per=per)
            assert [(h.case_id, h.slice_index, h.distance) for h in got] == [
                (h.case_id, h.slice_index, h.distance) for h in want
            ]
            assert "B" not in {h.case_id for h in got} and "D" not in {h.case_id for h in got}


def test_version_2_uint16_segments_mix_with_uint8_ones_and_compact_narrows_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A version-2 database (uint16 codes) is read, grows with uint8 segments (K <= 256), is searched across
    both kinds exactly as one uint16 array, and ``compact`` rewrites it as uint8, version 3."""
    from fdn_core.codes.search import Query, SearchEngine

    assert dbmod.code_dtype(256) == np.uint8 and dbmod.code_dtype(257) == np.uint16
    path = tmp_path / "db"
    with monkeypatch.context() as m:  # what version 2 wrote
        m.setattr(dbmod, "code_dtype", lambda num_codes: np.dtype(np.uint16))
        m.setattr(dbmod, "FORMAT_VERSION", 2)
        old = new_db(path)
        old.add_cases([case("A", 3, 1), case("B", 2, 2)])
    raw = json.loads((path / "manifest.json").read_text())
    assert raw["format_version"] == 2
    db = CodeDatabase.open(path, verify=True)
    assert db.format_version == 2
    db.add_cases([case("C", 4, 3)])
    opened = CodeDatabase.open(path, verify=True)
    assert [s.normal_codes.dtype for s in opened.segments()] == [np.uint16, np.uint8]
    assert (
        opened.format_version == 3 and json.loads((path / "manifest.json").read_text())["format_version"] == 3
    )
    assert opened.slice_codes("C", 0)[0].dtype == np.uint16
    segmented = SearchEngine.from_database(opened)
    wide = _one_array_engine(opened, np.uint16)
    query = Query(normal=opened.normal_codes[6], abnormal=opened.abnormal_codes[1])
    for mode in ("normal", "sum"):
        got = segmented.search(query, mode=mode, top=20, per="slice")
        want = wide.search(query, mode=mode, top=20, per="slice")
        assert [(h.case_id, h.slice_index, h.distance) for h in got] == [
            (h.case_id, h.slice_index, h.distance) for h in want
        ]
    before = np.array(opened.normal_codes, dtype=np.uint16)
    opened.compact()
    done = CodeDatabase.open(path, verify=True)
    assert [s.normal_codes.dtype for s in done.segments()] == [np.uint8]
    np.testing.assert_array_equal(done.normal_codes, before)


def test_info_says_where_the_lesion_flags_came_from(tmp_path: Path) -> None:
    """A case recorded without a tumour label file had its flags from the model's segmentation; ``info``
    counts both kinds (the lesion filter of a search reads the flags), removed cases left out."""
    db = new_db(tmp_path / "db")
    unlabelled = case("U", 4, 1)
    unlabelled = CaseCodes(**{**unlabelled.__dict__, "source": {**source("U"), "seg": None}})
    db.add_cases([case("A", 4, 0), unlabelled])
    db.add_cases([case("B", 3, 2)])
    info = CodeDatabase.open(tmp_path / "db").info()
    assert info["cases_flagged_by_labels"] == 2 and info["num_cases"] == 3
    db.remove_case("A")
    assert CodeDatabase.open(tmp_path / "db").info()["cases_flagged_by_labels"] == 1
