"""The code database: every indexed slice's normal and abnormal code-index grids, plus where it came from.

On disk (format version 3) a database is a folder of immutable, append-only segments::

    manifest.json              the commit point: model fingerprint, grid shape, the codebook folder, the
                               list of live segments (with the sha256, size, dtype and shape of every file),
                               the removed cases (tombstones), and ``manifest_sha256`` over all of that
    build.json                 only while an ``fdn index build`` is unfinished: the staged database
    .lock                      lock file: one writer at a time (``filelock``)
    codebooks/000001-1a2b3c4d/ codebook_normal.npy, codebook_abnormal.npy  (K, D) float32
    segments/000002-5e6f7a8b/  one segment (one add, one build batch, or a merge):
        normal_codes.npy       (n, h*w) code-index grids flattened row-major: uint8 when the codebooks
                               have at most 256 codes, else uint16 (``code_dtype``)
        abnormal_codes.npy     (n, h*w) likewise
        slice_indices.npy      (n,) int32, axial slice index k of each row in its volume
        has_abnormal.npy       (n,) bool, slice has abnormal (tumour) voxels
        case_ids.npy           (c,) unicode, the segment's cases in row order
        case_rows.npy          (c + 1,) int64 row boundaries: case i owns rows case_rows[i]:case_rows[i + 1]
        source_sha256.npy      (c,) bytes, sha256 of each case's image files (empty when unknown)
        sources.json           each case's source file paths (people-readable)
    hamming/                   binarised codebooks for the Hamming distance (derived from the codebooks)

The case table of a segment lives in its hashed files, so swapped, shifted or renamed rows and duplicate
ids are integrity errors, not silent misattribution; the manifest's own hash catches hand edits of the
segment list and tombstones (a deliberate rewrite of every hash cannot be told from a legitimate write
without a secret key, which this format does not have).

Writes: ``add_cases`` writes one new segment; ``remove_cases`` records tombstones (search skips those rows);
``compact`` merges segments and drops removed rows; small segments are merged automatically (tiered, at most
``merge_max_rows`` rows). Every write takes the lock, re-reads the manifest under it, writes its segment
(files flushed, folder renamed into place), then atomically replaces the manifest: a crash at any point
leaves the last committed state; leftovers are swept, under the lock, by the next writer. A failed write
removes only the folders it created. Readers take no lock: they memory-map the segments of the manifest
they read (no copy) and retry on the current manifest if a segment vanished under them (a compaction).

Why uint8 when it fits: a search reads every code of every row, and half the bytes are a sixth less time per
query at K = 256 (bench/bench_search.py, uint8 against uint16 rows) and half the disk and page cache.
Version 2 (the same layout, codes always uint16) is read as is; its new segments are written in the narrow
type, merges and ``compact`` rewrite the old ones, and the search widens only the narrow segments while
both kinds exist (``fdn_core.codes.scan``).

Format version 1 (one ``vNNNNNN/`` folder holding every array, the case table inside the manifest) is still
read; the first write converts it to segments (one-time rewrite, under the lock).

Why plain ``.npy`` files: search scans every row of two fixed-width integer matrices, and
``np.load(mmap_mode="r")`` maps them with zero parsing or copying; ``allow_pickle=False`` keeps loading free
of code execution; no extra dependency (SQLite stores rows, Parquet needs pyarrow).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import hashlib
import itertools
import json
import logging
import mmap
import os
import platform
import re
import secrets
import shutil
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

import fdn_core
from fdn_core.config import config_from_dict
from fdn_core.data.readers import validate_source
from fdn_core.errors import ConfigError, DataError, IntegrityError, ModelMismatchError
from fdn_core.fileio import (
    HashingWriter,
    atomic_write_json,
    fsync_dir,
    recover_dir,
    resolve_inside,
    sha256_file,
)
from fdn_core.progress import Progress

__all__ = [
    "BUILD_MANIFEST",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "HAMMING_DIR",
    "MANIFEST",
    "CaseCodes",
    "CodeDatabase",
    "Segment",
]

log = logging.getLogger(__name__)

FORMAT_NAME = "fdn-code-database"
FORMAT_VERSION = 3
LEGACY_FORMAT_VERSION = 1
#: Versions this module reads: 1 (converted on the first write), 2 (segments, uint16 codes), 3.
READABLE_FORMAT_VERSIONS = (LEGACY_FORMAT_VERSION, 2, FORMAT_VERSION)


def code_dtype(num_codes: int) -> np.dtype[Any]:
    """The stored code-index type for a codebook of ``num_codes`` vectors: uint8 up to 256, else uint16."""
    return np.dtype(np.uint8) if num_codes <= 256 else np.dtype(np.uint16)


MANIFEST = "manifest.json"
BUILD_MANIFEST = "build.json"
LOCK_FILE = ".lock"
SEGMENTS_DIR = "segments"
CODEBOOKS_DIR = "codebooks"
#: Folder of the binarised codebooks (``fdn_core.retrieval``); removed when the codebooks change.
HAMMING_DIR = "hamming"
REBUILD_HINT = "rebuild it with `fdn index build --overwrite` (or restore it from a backup)"

_ROW_FILES = ("normal_codes", "abnormal_codes", "slice_indices", "has_abnormal")
_CASE_FILES = ("case_ids", "case_rows", "source_sha256")
_SOURCES = "sources.json"
_SEGMENT_FILES = (*(f"{n}.npy" for n in (*_ROW_FILES, *_CASE_FILES)), _SOURCES)
_BOOK_FILES = ("codebook_normal.npy", "codebook_abnormal.npy")
_FOLDER_RE = re.compile(rf"^({SEGMENTS_DIR}|{CODEBOOKS_DIR})/(\d{{6,}})-([0-9a-f]{{8}})$")
_NAME_RE = re.compile(r"^(\d{6,})-([0-9a-f]{8})$")
_TMP_PREFIX = ".tmp-"
_V1_ARRAYS = (*_ROW_FILES, "codebook_normal", "codebook_abnormal")
_V1_VERSION_RE = re.compile(r"^v(\d{6,})$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_CHUNK_ROWS = 1 << 20


@dataclass(frozen=True)
class CaseCodes:
    """One case to add: its code grids (S, h, w) uint16, per-slice abnormal flags, its source files, and
    optionally the slice index of each grid and the sha256 of its image files (``source_fingerprint``)."""

    case_id: str
    normal: np.ndarray
    abnormal: np.ndarray
    has_abnormal: np.ndarray
    source: Mapping[str, Any]
    slice_indices: np.ndarray | None = None
    source_sha256: str | None = None


@dataclass(frozen=True)
class Segment:
    """One segment as search sees it: memory-mapped arrays (no copy) and which of its rows are alive.

    ``case_ids`` / ``case_rows`` list every case stored in the segment (removed ones too); ``alive`` is
    False on the rows of removed cases. ``live_start`` is the row, in the database's concatenated views
    (``CodeDatabase.normal_codes`` ...), of this segment's first live row; ``live_rows`` maps rows.
    """

    name: str
    normal_codes: np.ndarray
    abnormal_codes: np.ndarray
    slice_indices: np.ndarray
    has_abnormal: np.ndarray
    case_ids: tuple[str, ...]
    case_rows: np.ndarray
    case_alive: np.ndarray
    alive: np.ndarray
    live_start: int

    @property
    def num_rows(self) -> int:
        """Rows stored (removed ones included)."""
        return int(self.normal_codes.shape[0])

    @property
    def num_live_rows(self) -> int:
        """Rows of cases that are not removed."""
        return int(np.count_nonzero(self.alive))

    def row_case_index(self) -> np.ndarray:
        """(n,) int32: the index into ``case_ids`` of every row."""
        return np.repeat(np.arange(len(self.case_ids), dtype=np.int32), np.diff(self.case_rows))

    def live_rows(self, rows: np.ndarray) -> np.ndarray:
        """Rows of this segment (alive ones) -> their rows in the database's concatenated views."""
        rows = np.asarray(rows, dtype=np.int64)
        dead = (~self.case_alive).astype(np.int64) * np.diff(self.case_rows)
        dead_before_case = np.concatenate([[0], np.cumsum(dead)])
        case = np.searchsorted(self.case_rows, rows, side="right") - 1
        return self.live_start + rows - dead_before_case[case]


# ---------------------------------------------------------------------------------- manifest documents


@dataclass(frozen=True)
class _FileEntry:
    __config_allow_defaults__ = True
    name: str
    sha256: str
    size: int
    dtype: str | None = None
    shape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class _BooksEntry:
    folder: str
    files: list[_FileEntry]


@dataclass(frozen=True)
class _SegmentEntry:
    folder: str
    num_rows: int
    num_cases: int
    files: list[_FileEntry]


@dataclass(frozen=True)
class _Tombstone:
    segment: str
    case_id: str


@dataclass(frozen=True)
class _BuildState:
    __config_allow_defaults__ = True
    started_utc: str
    data: str | None = None
    cases: list[str] | None = None


@dataclass(frozen=True)
class _ManifestV2:
    __config_allow_defaults__ = True
    format: str
    format_version: int
    fingerprint: str
    grid_shape: tuple[int, int]
    num_codes: int
    code_dim: int
    generation: int
    codebooks: _BooksEntry
    segments: list[_SegmentEntry]
    removed: list[_Tombstone]
    manifest_sha256: str
    created: dict[str, Any] = field(default_factory=dict)
    modified_utc: str = ""
    build: _BuildState | None = None


@dataclass(frozen=True)
class _V1File:
    sha256: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class _V1Case:
    case_id: str
    start: int
    stop: int
    source: dict[str, Any]


@dataclass(frozen=True)
class _ManifestV1:
    __config_allow_defaults__ = True
    format: str
    format_version: int
    fingerprint: str
    grid_shape: tuple[int, int]
    num_codes: int
    code_dim: int
    version: int
    current: str
    cases: list[_V1Case]
    files: dict[str, Any]
    created: dict[str, Any] = field(default_factory=dict)
    modified_utc: str = ""
    num_slices: int = 0


# ------------------------------------------------------------------------------------ in-memory state


@dataclass
class _Stored:
    """One segment as loaded: arrays (row arrays memory-mapped), case table, lazily parsed sources."""

    folder: str
    files: dict[str, dict[str, Any]]
    normal_codes: np.ndarray
    abnormal_codes: np.ndarray
    slice_indices: np.ndarray
    has_abnormal: np.ndarray
    case_ids: tuple[str, ...]
    case_rows: np.ndarray
    source_sha256: tuple[str | None, ...]
    sources_path: Path | None
    sources_map: mmap.mmap | None = None
    sources: list[dict[str, Any]] | None = None  # parsed on first use (legacy: given)
    verified: bool = False

    @property
    def num_rows(self) -> int:
        return int(self.normal_codes.shape[0])


@dataclass
class _State:
    """A committed (or staged) database as read from one manifest."""

    manifest: dict[str, Any]
    name: str  # MANIFEST or BUILD_MANIFEST
    legacy: bool
    books: tuple[np.ndarray, np.ndarray]
    stored: list[_Stored]
    removed: set[tuple[str, str]]
    # live cases, in row order of the concatenated views
    ids: list[str] = field(default_factory=list)
    where: list[tuple[int, int]] = field(default_factory=list)  # (segment index, case index in segment)
    starts: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))
    index: dict[str, int] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        return str(self.manifest["fingerprint"])

    @property
    def generation(self) -> int:
        return int(self.manifest.get("generation", self.manifest.get("version", 0)))

    def alive(self, si: int, ci: int) -> bool:
        s = self.stored[si]
        return (s.folder, s.case_ids[ci]) not in self.removed


class _Vanished(IntegrityError):
    """A file the manifest names is gone (a concurrent compaction swept it): read the manifest again."""


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("utf-8")


def _manifest_hash(m: Mapping[str, Any]) -> str:
    return hashlib.sha256(_canonical({k: v for k, v in m.items() if k != "manifest_sha256"})).hexdigest()


@functools.lru_cache(maxsize=4)
def _parse_v2(text: str, where: str) -> _ManifestV2:
    """The typed manifest of the JSON ``text`` (cached: writers re-read an unchanged manifest often)."""
    return config_from_dict(_ManifestV2, json.loads(text), where=where)


def _fail_point(step: str) -> None:
    """Called between the steps of a commit; tests replace it to simulate a crash at ``step``."""


def _check_id(case_id: object, where: str) -> str:
    if (
        not isinstance(case_id, str)
        or not case_id
        or case_id != case_id.strip()
        or any(ord(ch) < 32 for ch in case_id)
    ):
        raise DataError(f"{where}: case id must be a non-empty string without edge spaces: {case_id!r}")
    return case_id


# ------------------------------------------------------------------------------------------- writing


def _write_npy(
    path: Path, dtype: np.dtype[Any], shape: tuple[int, ...], chunks: Iterable[np.ndarray]
) -> dict[str, Any]:
    """Write one .npy file from row chunks in one pass (hashing as it writes), flush it, and return its
    manifest entry (name, sha256, size, dtype, shape)."""
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    rows = 0
    with open(path, "wb") as f:
        w = HashingWriter(f)
        np.lib.format.write_array_header_1_0(w, header)
        for chunk in chunks:
            a = np.ascontiguousarray(chunk, dtype=dtype)
            rows += a.shape[0] if a.ndim else 1
            if a.nbytes:
                w.write(a.reshape(-1).view(np.uint8).data)
        f.flush()
        os.fsync(f.fileno())
    if shape and rows != shape[0]:
        raise RuntimeError(f"{path}: wrote {rows} rows, expected {shape[0]}")  # a bug, never user input
    return {
        "name": path.name,
        "sha256": w.hexdigest(),
        "size": w.size,
        "dtype": str(dtype),
        "shape": list(shape),
    }


def _write_json_file(path: Path, obj: Any) -> dict[str, Any]:
    data = (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode("utf-8")
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"name": path.name, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def _chunked(arr: np.ndarray, start: int = 0, stop: int | None = None) -> Iterator[np.ndarray]:
    stop = arr.shape[0] if stop is None else stop
    for a in range(start, stop, _CHUNK_ROWS):
        yield arr[a : min(a + _CHUNK_ROWS, stop)]


@dataclass
class _Part:
    """Rows to write into a new segment: row arrays (any array-likes) and their case table."""

    normal: np.ndarray
    abnormal: np.ndarray
    slices: np.ndarray
    flags: np.ndarray
    ranges: list[tuple[int, int]]  # row ranges to take, one per case
    ids: list[str]
    shas: list[str | None]
    sources: list[dict[str, Any]]


# ---------------------------------------------------------------------------------------- the class


class CodeDatabase:
    """An on-disk, memory-mapped table of per-slice code grids; see the module docstring for the format.

    Open with ``CodeDatabase.open(path)``, make an empty one with ``CodeDatabase.create(...)``, or stage a
    resumable build with ``CodeDatabase.begin_build(...)`` ... ``finish_build()``. Arrays are read-only
    memory maps; every mutation takes the database's write lock and commits a new manifest atomically.
    An instance is a snapshot: it sees other processes' writes when it writes itself or is opened again.
    """

    #: Seconds a writer waits for another writer's lock before giving up (DataError).
    lock_timeout: float = 600.0
    #: Automatic merging of small segments: this many trailing segments of one size tier are merged ...
    merge_fanout: int = 8
    #: ... as long as each has fewer rows than this (larger merges only by ``compact``).
    merge_max_rows: int = 1 << 20

    def __init__(self, path: Path, state: _State) -> None:
        self._path = path
        self._state = state
        self._views: dict[str, np.ndarray] = {}
        self._mutex = threading.RLock()

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(
        cls,
        path: str | Path,
        expected_fingerprint: str | None = None,
        verify: bool = True,
        expected_codebooks: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> CodeDatabase:
        """Open a database; refuse one built by another model (its fingerprint, and with
        ``expected_codebooks`` its codebooks compared exactly); with ``verify`` check every file's hash."""
        path = Path(path)
        cls._recover(path)
        state = cls._read_retrying(path, MANIFEST, verify)
        db = cls(path, state)
        db.check_model(expected_fingerprint, expected_codebooks)
        return db

    def check_model(
        self, fingerprint: str | None, codebooks: tuple[np.ndarray, np.ndarray] | None = None
    ) -> None:
        """ModelMismatchError unless this database was built by the model with ``fingerprint`` and
        ``codebooks`` (either may be None: not checked)."""
        fp = self._state.fingerprint
        if fingerprint is not None and fp != fingerprint:
            raise ModelMismatchError(
                f"{self._path} was built with model {fp[:16]}..., but the model in use is "
                f"{fingerprint[:16]}...; codes of different models are not comparable. "
                "Open the model the database was built with, or rebuild the database with `fdn index build`."
            )
        if codebooks is not None:
            for name, mine, theirs in zip(("normal", "abnormal"), self._state.books, codebooks):
                other = np.asarray(theirs, dtype=np.float32)
                if other.shape != mine.shape or not np.array_equal(other, mine):
                    how = "values differ" if other.shape == mine.shape else f"{mine.shape} vs {other.shape}"
                    raise ModelMismatchError(
                        f"{self._path}: the database's {name} codebook differs from the model's ({how})"
                        " although the fingerprints agree: the model or the database was altered. Use the "
                        "model the database was built with, or rebuild the database with `fdn index build`."
                    )

    @classmethod
    def _recover(cls, path: Path) -> None:
        """Put back a database folder that a replacement (``fileio.atomic_dir``) left between renames."""
        if path.exists():
            return
        try:
            done = recover_dir(path)
        except OSError as exc:
            raise DataError(
                f"{path} is missing, and an interrupted replacement of it (.{path.name}.old / "
                f".{path.name}.*.tmp) could not be repaired ({exc}); move the previous copy "
                f"(.{path.name}.old) back to {path.name} by hand"
            ) from exc
        if done:
            log.warning("%s", done)

    @classmethod
    def _read_retrying(cls, path: Path, name: str, verify: bool) -> _State:
        """Read and load a manifest; if a file it names vanished (a concurrent compaction swept it), read
        the then-current manifest again."""
        last: _Vanished | None = None
        for _ in range(8):
            raw = cls._read_manifest_raw(path, name)
            try:
                return cls._load(path, name, raw, verify)
            except _Vanished as exc:
                last = exc
                again = cls._read_manifest_raw(path, name)
                if _canonical(again) == _canonical(raw):
                    raise IntegrityError(str(exc)) from None
        assert last is not None
        raise IntegrityError(str(last))

    @classmethod
    def _read_manifest_raw(cls, path: Path, name: str) -> dict[str, Any]:
        mpath = path / name
        if not mpath.is_file():
            if name == BUILD_MANIFEST and (path / MANIFEST).is_file():
                raise DataError(
                    f"{path}: the staged build is gone: another process finished or replaced it meanwhile; "
                    "open the database again (or run the build again)"
                )
            if name == MANIFEST and (path / BUILD_MANIFEST).is_file():
                raise DataError(
                    f"{path} holds an unfinished `fdn index build` (interrupted, or still running); run the "
                    "same build command again to resume it, then open the database"
                )
            raise DataError(
                f"{path} is not a code database (no {MANIFEST}); build one with `fdn index build`"
            )
        try:
            raw = json.loads(mpath.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise IntegrityError(f"{mpath} is unreadable ({exc}); {REBUILD_HINT}") from exc
        if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
            raise DataError(f"{mpath} is not a code database manifest (format is not {FORMAT_NAME!r})")
        version = raw.get("format_version")
        if version not in READABLE_FORMAT_VERSIONS or isinstance(version, bool):
            raise DataError(
                f"{mpath} has format version {version!r}; this software reads versions "
                f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))}. Update fdn_core, or rebuild the database "
                "with `fdn index build`."
            )
        return raw

    # ------------------------------------------------------------------ loading (both formats)
    @classmethod
    def _load(
        cls,
        path: Path,
        name: str,
        raw: dict[str, Any],
        verify: bool,
        cache: Mapping[str, _Stored] | None = None,
    ) -> _State:
        if raw["format_version"] == LEGACY_FORMAT_VERSION:
            return cls._load_v1(path, name, raw, verify)
        mpath = path / name
        try:
            m = _parse_v2(json.dumps(raw, sort_keys=True), str(mpath))
        except ConfigError as exc:
            raise IntegrityError(f"{exc}; {REBUILD_HINT}") from None
        if m.manifest_sha256 != _manifest_hash(raw):
            raise IntegrityError(
                f"{mpath} was edited or damaged (its manifest_sha256 does not match its content); "
                f"{REBUILD_HINT}"
            )
        h, w = m.grid_shape
        if h < 1 or w < 1 or not 1 <= m.num_codes <= 65536 or m.code_dim < 1 or not m.fingerprint:
            raise IntegrityError(
                f"{mpath}: impossible grid_shape/num_codes/code_dim/fingerprint; {REBUILD_HINT}"
            )
        books = cls._load_books(path, mpath, m)
        stored: list[_Stored] = []
        seen_folders: set[str] = set()
        for entry in m.segments:
            if entry.folder in seen_folders:
                raise IntegrityError(f"{mpath} lists segment {entry.folder} twice; {REBUILD_HINT}")
            seen_folders.add(entry.folder)
            cached = None if cache is None else cache.get(entry.folder)
            files = {f.name: cls._entry_dict(f) for f in entry.files}
            if cached is not None and cached.files == files and (cached.verified or not verify):
                stored.append(cached)
            else:
                stored.append(cls._load_segment(path, mpath, entry, files, (h * w), verify))
        removed: set[tuple[str, str]] = set()
        by_folder = {s.folder: s for s in stored}
        for t in m.removed:
            seg = by_folder.get(t.segment)
            if seg is None or t.case_id not in seg.case_ids or (t.segment, t.case_id) in removed:
                raise IntegrityError(
                    f"{mpath}: the removal record of case {t.case_id!r} in {t.segment} names no stored case "
                    f"(or repeats one); {REBUILD_HINT}"
                )
            removed.add((t.segment, t.case_id))
        state = _State(raw, name, False, books, stored, removed)
        cls._index(state, mpath)
        return state

    @staticmethod
    def _entry_dict(f: _FileEntry) -> dict[str, Any]:
        return {
            "name": f.name,
            "sha256": f.sha256,
            "size": f.size,
            "dtype": f.dtype,
            "shape": None if f.shape is None else list(f.shape),
        }

    @classmethod
    def _folder(cls, path: Path, mpath: Path, folder: str, kind: str) -> Path:
        m = _FOLDER_RE.match(folder)
        if m is None or m.group(1) != kind:
            raise IntegrityError(f"{mpath} names the folder {folder!r}, not a {kind} folder; {REBUILD_HINT}")
        return resolve_inside(path, folder, str(mpath))

    @classmethod
    def _file(cls, path: Path, mpath: Path, folder: str, entry: Mapping[str, Any], hash_it: bool) -> Path:
        """A file a manifest names: inside the database, present, of the recorded size (and hash)."""
        fpath = resolve_inside(path, f"{folder}/{entry['name']}", str(mpath))
        try:
            size = fpath.stat().st_size
        except FileNotFoundError:
            raise _Vanished(f"{fpath} is missing; {REBUILD_HINT}") from None
        if size != entry["size"]:
            raise IntegrityError(
                f"{fpath} has {size} bytes, but {mpath} records {entry['size']} (truncated or modified); "
                f"{REBUILD_HINT}"
            )
        if hash_it:
            try:
                digest = sha256_file(fpath)
            except FileNotFoundError:
                raise _Vanished(f"{fpath} is missing; {REBUILD_HINT}") from None
            if digest != entry["sha256"]:
                raise IntegrityError(
                    f"{fpath} does not match the hash recorded in {mpath} (corrupted or modified); "
                    f"{REBUILD_HINT}"
                )
        return fpath

    @classmethod
    def _npy(
        cls, fpath: Path, mpath: Path, entry: Mapping[str, Any], mmap_mode: Literal["r"] | None
    ) -> np.ndarray:
        try:
            arr = np.load(fpath, mmap_mode=mmap_mode, allow_pickle=False)
        except FileNotFoundError:
            raise _Vanished(f"{fpath} is missing; {REBUILD_HINT}") from None
        except (OSError, ValueError) as exc:
            raise IntegrityError(f"{fpath} is not a readable .npy array ({exc}); {REBUILD_HINT}") from exc
        if str(arr.dtype) != entry.get("dtype") or list(arr.shape) != entry.get("shape"):
            raise IntegrityError(
                f"{fpath} holds {arr.dtype} {tuple(arr.shape)}, but {mpath} records "
                f"{entry.get('dtype')} {entry.get('shape')}; {REBUILD_HINT}"
            )
        return arr

    @classmethod
    def _load_books(cls, path: Path, mpath: Path, m: _ManifestV2) -> tuple[np.ndarray, np.ndarray]:
        cls._folder(path, mpath, m.codebooks.folder, CODEBOOKS_DIR)
        files = {f.name: cls._entry_dict(f) for f in m.codebooks.files}
        if sorted(files) != sorted(_BOOK_FILES):
            raise IntegrityError(f"{mpath}: the codebook folder lists {sorted(files)}; {REBUILD_HINT}")
        out = []
        for fname in _BOOK_FILES:
            entry = files[fname]
            fpath = cls._file(path, mpath, m.codebooks.folder, entry, hash_it=True)
            arr = cls._npy(fpath, mpath, entry, None)
            if arr.dtype != np.float32 or arr.shape != (m.num_codes, m.code_dim):
                raise IntegrityError(
                    f"{fpath}: codebook {arr.dtype} {arr.shape}, expected float32 "
                    f"({m.num_codes}, {m.code_dim}); {REBUILD_HINT}"
                )
            arr.flags.writeable = False
            out.append(arr)
        return out[0], out[1]

    @classmethod
    def _load_segment(
        cls,
        path: Path,
        mpath: Path,
        entry: _SegmentEntry,
        files: dict[str, dict[str, Any]],
        p: int,
        verify: bool,
    ) -> _Stored:
        cls._folder(path, mpath, entry.folder, SEGMENTS_DIR)
        if sorted(files) != sorted(_SEGMENT_FILES):
            raise IntegrityError(
                f"{mpath}: segment {entry.folder} lists files {sorted(files)}, expected "
                f"{sorted(_SEGMENT_FILES)}; {REBUILD_HINT}"
            )
        arrays: dict[str, np.ndarray] = {}
        for name in (*_ROW_FILES, *_CASE_FILES):
            fe = files[f"{name}.npy"]
            small = name in _CASE_FILES
            fpath = cls._file(path, mpath, entry.folder, fe, hash_it=verify or small)
            arrays[name] = cls._npy(fpath, mpath, fe, None if small else "r")
        sources_entry = files[_SOURCES]
        sources_path = cls._file(path, mpath, entry.folder, sources_entry, hash_it=verify)
        where = f"{mpath}: segment {entry.folder}"
        n, c = entry.num_rows, entry.num_cases
        problems = []
        if n < 1 or c < 1:
            problems.append("is empty")
        if arrays["normal_codes"].shape != (n, p) or arrays["abnormal_codes"].shape != (n, p):
            problems.append(f"code arrays are not ({n}, {p})")
        dtypes = {arrays["normal_codes"].dtype, arrays["abnormal_codes"].dtype}
        if len(dtypes) != 1 or not dtypes <= {np.dtype(np.uint8), np.dtype(np.uint16)}:
            problems.append("code arrays are not both uint8 or both uint16")
        if arrays["slice_indices"].shape != (n,) or arrays["slice_indices"].dtype != np.int32:
            problems.append(f"slice_indices is not ({n},) int32")
        if arrays["has_abnormal"].shape != (n,) or arrays["has_abnormal"].dtype != np.bool_:
            problems.append(f"has_abnormal is not ({n},) bool")
        ids_arr, rows, shas = arrays["case_ids"], arrays["case_rows"], arrays["source_sha256"]
        if ids_arr.shape != (c,) or ids_arr.dtype.kind != "U":
            problems.append(f"case_ids is not ({c},) text")
        if rows.shape != (c + 1,) or rows.dtype != np.int64:
            problems.append(f"case_rows is not ({c + 1},) int64")
        elif rows[0] != 0 or rows[-1] != n or np.any(np.diff(rows) < 1):
            problems.append("case row ranges do not partition the rows (each case one or more rows)")
        if shas.shape != (c,) or shas.dtype.kind != "S":
            problems.append(f"source_sha256 is not ({c},) bytes")
        if problems:
            raise IntegrityError(f"{where}: {'; '.join(problems)}; {REBUILD_HINT}")
        ids = tuple(str(x) for x in ids_arr.tolist())
        for cid in ids:
            _check_id(cid, where)
        if len(set(ids)) != len(ids):
            dup = sorted(c for c, k in Counter(ids).items() if k > 1)
            raise IntegrityError(f"{where}: case ids {dup[:5]} appear twice; {REBUILD_HINT}")
        sha_list: list[str | None] = []
        for s in shas.tolist():
            text = s.decode("ascii", "replace")
            if text and not _SHA_RE.match(text):
                raise IntegrityError(
                    f"{where}: a source fingerprint is not a sha256 ({text!r}); {REBUILD_HINT}"
                )
            sha_list.append(text or None)
        for arr in arrays.values():
            if isinstance(arr, np.ndarray) and arr.flags.writeable:
                arr.flags.writeable = False
        stored = _Stored(
            folder=entry.folder,
            files=files,
            normal_codes=arrays["normal_codes"],
            abnormal_codes=arrays["abnormal_codes"],
            slice_indices=arrays["slice_indices"],
            has_abnormal=arrays["has_abnormal"],
            case_ids=ids,
            case_rows=rows,
            source_sha256=tuple(sha_list),
            sources_path=sources_path,
            verified=verify,
        )
        try:
            with open(sources_path, "rb") as f:
                stored.sources_map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            raise _Vanished(f"{sources_path} is missing; {REBUILD_HINT}") from None
        except (OSError, ValueError) as exc:
            raise IntegrityError(f"{sources_path} cannot be read ({exc}); {REBUILD_HINT}") from exc
        if verify:
            cls._check_slices(stored, where)
        return stored

    @staticmethod
    def _check_slices(s: _Stored, where: str) -> None:
        """Slice indices are non-negative and strictly increasing within each case, as ``add_cases`` stores
        them (reads every row): row ranges shifted against the slices they hold show here."""
        sl = np.asarray(s.slice_indices, dtype=np.int64)
        if sl.size and sl.min() < 0:
            raise IntegrityError(f"{where}: negative slice indices; {REBUILD_HINT}")
        step = np.diff(sl)
        boundary = np.zeros(step.shape, dtype=bool)
        inner = s.case_rows[1:-1] - 1
        boundary[inner[inner < step.size]] = True
        bad = np.flatnonzero((step <= 0) & ~boundary)
        if bad.size:
            ci = int(np.searchsorted(s.case_rows, bad[0], side="right") - 1)
            raise IntegrityError(
                f"{where}: the slice indices of case {s.case_ids[ci]!r} do not increase along its rows (its "
                f"row range does not match its slices); {REBUILD_HINT}"
            )

    @classmethod
    def _load_v1(cls, path: Path, name: str, raw: dict[str, Any], verify: bool) -> _State:
        """Format version 1: one version folder with every array, the case table in the manifest."""
        mpath = path / name
        try:
            m = config_from_dict(_ManifestV1, raw, where=str(mpath))
        except ConfigError as exc:
            raise IntegrityError(f"{exc}; {REBUILD_HINT}") from None
        if not _V1_VERSION_RE.match(m.current):
            raise IntegrityError(f"{mpath} names no valid current version ({m.current!r}); {REBUILD_HINT}")
        if sorted(m.files) != sorted(_V1_ARRAYS):
            raise IntegrityError(f"{mpath} lists files {sorted(m.files)}, expected {list(_V1_ARRAYS)}")
        resolve_inside(path, m.current, str(mpath))
        arrays: dict[str, np.ndarray] = {}
        for aname in _V1_ARRAYS:
            try:
                fe = config_from_dict(_V1File, m.files[aname], where=f"{mpath}: files.{aname}")
            except ConfigError as exc:
                raise IntegrityError(f"{exc}; {REBUILD_HINT}") from None
            fpath = resolve_inside(path, f"{m.current}/{aname}.npy", str(mpath))
            if not fpath.is_file():
                raise _Vanished(f"{fpath} is missing; {REBUILD_HINT}")
            if verify and sha256_file(fpath) != fe.sha256:
                raise IntegrityError(
                    f"{fpath} does not match the hash recorded in {mpath} (corrupted or modified); "
                    f"{REBUILD_HINT}"
                )
            entry = {"dtype": fe.dtype, "shape": list(fe.shape)}
            arrays[aname] = cls._npy(fpath, mpath, entry, "r")
        h, w = m.grid_shape
        n = arrays["normal_codes"].shape[0]
        problems = []
        if arrays["normal_codes"].shape != (n, h * w) or arrays["abnormal_codes"].shape != (n, h * w):
            problems.append("code arrays do not match the grid shape")
        if any(arrays[x].shape != (n,) for x in ("slice_indices", "has_abnormal")):
            problems.append("per-slice arrays differ in length from the code arrays")
        for book in ("codebook_normal", "codebook_abnormal"):
            if arrays[book].shape != (m.num_codes, m.code_dim):
                problems.append("codebooks do not have the recorded (num_codes, code_dim)")
                break
        stop = 0
        for c in m.cases:
            if c.start != stop or c.stop <= c.start:
                problems.append(f"case {c.case_id!r} rows are not contiguous")
                break
            stop = c.stop
        if not problems and stop != n:
            problems.append(f"cases cover {stop} rows but the arrays have {n}")
        ids = [c.case_id for c in m.cases]
        if len(set(ids)) != len(ids):
            problems.append("a case id appears twice")
        if problems:
            raise IntegrityError(f"{mpath}: {'; '.join(problems)}; {REBUILD_HINT}")
        sources = [validate_source(c.case_id, c.source) for c in m.cases]
        stored = _Stored(
            folder=m.current,
            files={},
            normal_codes=arrays["normal_codes"],
            abnormal_codes=arrays["abnormal_codes"],
            slice_indices=arrays["slice_indices"],
            has_abnormal=arrays["has_abnormal"],
            case_ids=tuple(ids),
            case_rows=np.asarray([0] + [c.stop for c in m.cases], dtype=np.int64),
            source_sha256=tuple(None for _ in ids),
            sources_path=None,
            sources=sources,
            verified=verify,
        )
        books = (
            np.asarray(arrays["codebook_normal"], dtype=np.float32),
            np.asarray(arrays["codebook_abnormal"], dtype=np.float32),
        )
        state = _State(raw, name, True, books, [stored] if n else [], set())
        cls._index(state, mpath)
        return state

    @staticmethod
    def _index(state: _State, mpath: Path) -> None:
        """The live cases of ``state`` in row order; case ids must be unique among them."""
        ids: list[str] = []
        where: list[tuple[int, int]] = []
        counts: list[np.ndarray] = []
        with_tombstones = {folder for folder, _ in state.removed}
        for si, s in enumerate(state.stored):
            sizes = np.diff(s.case_rows)
            if s.folder not in with_tombstones:  # the common case: every case of the segment is live
                ids.extend(s.case_ids)
                where.extend(zip(itertools.repeat(si), range(len(s.case_ids))))
                counts.append(sizes)
                continue
            live = [ci for ci, cid in enumerate(s.case_ids) if (s.folder, cid) not in state.removed]
            ids.extend(s.case_ids[ci] for ci in live)
            where.extend((si, ci) for ci in live)
            counts.append(sizes[live])
        index = {cid: i for i, cid in enumerate(ids)}
        if len(index) != len(ids):
            dup = sorted(c for c, k in Counter(ids).items() if k > 1)
            raise IntegrityError(
                f"{mpath}: case ids {dup[:5]} are stored twice (in different segments); {REBUILD_HINT}"
            )
        state.ids, state.where, state.index = ids, where, index
        sizes_all = np.concatenate(counts) if counts else np.zeros(0, np.int64)
        state.starts = np.concatenate([[0], np.cumsum(sizes_all, dtype=np.int64)]).astype(np.int64)

    # ------------------------------------------------------------------ creation and builds
    @classmethod
    def create(
        cls,
        path: str | Path,
        *,
        fingerprint: str,
        codebook_normal: np.ndarray,
        codebook_abnormal: np.ndarray,
        grid_shape: tuple[int, int],
        overwrite: bool = False,
    ) -> CodeDatabase:
        """Create an empty database for one model (its fingerprint and codebooks) and return it opened.

        An existing database at ``path`` is replaced only with ``overwrite``; a non-empty folder that is
        not a code database is never replaced.
        """
        path = Path(path)
        head = cls._new_head(path, fingerprint, codebook_normal, codebook_abnormal, grid_shape)
        cls._prepare_folder(path, overwrite)
        db = cls(path, _State({}, MANIFEST, False, head[1], [], set()))
        with db._write_lock():
            if ((path / MANIFEST).is_file() or (path / BUILD_MANIFEST).is_file()) and not overwrite:
                raise DataError(
                    f"{path} already holds a code database (or an unfinished build); pass overwrite=True "
                    "(CLI: --overwrite) to replace it, or choose another path"
                )
            previous = db._peek(MANIFEST)
            created: list[Path] = []
            try:
                books = db._write_books(head[1], created)
                manifest = db._fresh_manifest(head[0], books)
                db._commit(manifest, MANIFEST, created)
            except BaseException:
                db._rollback(created)
                raise
            with contextlib.suppress(FileNotFoundError):
                (path / BUILD_MANIFEST).unlink()
            db._after_commit(MANIFEST, codebooks_changed=db._books_differ(previous, manifest))
        return db

    @staticmethod
    def _new_head(
        path: Path,
        fingerprint: str,
        codebook_normal: np.ndarray,
        codebook_abnormal: np.ndarray,
        grid_shape: tuple[int, int],
    ) -> tuple[dict[str, Any], tuple[np.ndarray, np.ndarray]]:
        """Validated (model fields of a manifest, float32 codebooks)."""
        if not isinstance(fingerprint, str) or not fingerprint.strip():
            raise DataError(f"{path}: the model fingerprint must be a non-empty string, got {fingerprint!r}")
        try:
            h, w = (int(v) for v in grid_shape)
        except (TypeError, ValueError):
            raise DataError(f"{path}: grid_shape must be two integers (h, w), got {grid_shape!r}") from None
        if h < 1 or w < 1:
            raise DataError(f"{path}: grid_shape must be positive, got {grid_shape!r}")
        books = []
        for name, book in (("codebook_normal", codebook_normal), ("codebook_abnormal", codebook_abnormal)):
            arr = np.asarray(book)
            if (
                arr.ndim != 2
                or arr.shape[0] < 1
                or arr.shape[1] < 1
                or not np.issubdtype(arr.dtype, np.floating)
            ):
                raise DataError(f"{path}: {name} must be a float (K, D) array, got {arr.dtype} {arr.shape}")
            if arr.shape[0] > 65536:
                raise DataError(f"{path}: {name} has {arr.shape[0]} codes; uint16 indices allow 65536")
            if not np.all(np.isfinite(arr)):
                raise DataError(
                    f"{path}: {name} contains NaN or infinite values; use the codebooks of a trained, "
                    "verified model (load_bundle(...).codebooks())"
                )
            books.append(np.ascontiguousarray(arr, dtype=np.float32))
        if books[0].shape != books[1].shape:
            raise DataError(
                f"{path}: the normal and abnormal codebooks differ in shape "
                f"({books[0].shape} vs {books[1].shape})"
            )
        head = {
            "fingerprint": fingerprint,
            "grid_shape": [h, w],
            "num_codes": int(books[0].shape[0]),
            "code_dim": int(books[0].shape[1]),
        }
        return head, (books[0], books[1])

    @staticmethod
    def _prepare_folder(path: Path, overwrite: bool) -> None:
        """Make the database folder; refuse a file, or a non-empty folder that is not a code database."""
        CodeDatabase._recover(path)
        if path.exists() and not path.is_dir():
            raise DataError(f"{path} exists and is not a folder; choose another database path")
        if path.is_dir():
            contents = [p for p in path.iterdir() if p.name != LOCK_FILE]
            if contents:
                ours = False
                for name in (MANIFEST, BUILD_MANIFEST):
                    try:
                        doc = json.loads((path / name).read_text(encoding="utf-8"))
                        ours = ours or (isinstance(doc, dict) and doc.get("format") == FORMAT_NAME)
                    except (OSError, ValueError):
                        pass
                if not ours:
                    raise DataError(
                        f"{path} is a non-empty folder that is not a code database; refusing to replace "
                        "it. Choose an empty or new path."
                    )
        path.mkdir(parents=True, exist_ok=True)

    @classmethod
    def begin_build(
        cls,
        path: str | Path,
        *,
        fingerprint: str,
        codebook_normal: np.ndarray,
        codebook_abnormal: np.ndarray,
        grid_shape: tuple[int, int],
        overwrite: bool = False,
        data: str | None = None,
        cases: Sequence[str] | None = None,
    ) -> CodeDatabase:
        """Stage a new database at ``path`` (in ``build.json``; ``open`` keeps seeing the previous one) that
        ``add_cases`` fills batch by batch and ``finish_build`` puts in place. An unfinished build of the same
        model at ``path`` is resumed (its committed cases are kept: ``resumed`` is True); one of another
        model is discarded. An existing finished database is replaced (at ``finish_build``) only with
        ``overwrite``."""
        path = Path(path)
        head, books = cls._new_head(path, fingerprint, codebook_normal, codebook_abnormal, grid_shape)
        cls._prepare_folder(path, overwrite)
        db = cls(path, _State({}, BUILD_MANIFEST, False, books, [], set()))
        db.resumed = False
        with db._write_lock():
            if (path / MANIFEST).is_file() and not overwrite:
                staged = (
                    " (an interrupted rebuild is staged in it: add --overwrite to resume it)"
                    if (path / BUILD_MANIFEST).is_file()
                    else ""
                )
                raise DataError(
                    f"{path} already exists as a code database{staged}; pass overwrite (CLI: --overwrite) "
                    "to rebuild it, or add cases to it with `fdn index add`"
                )
            if (path / BUILD_MANIFEST).is_file():
                try:
                    old = cls._load(path, BUILD_MANIFEST, cls._read_manifest_raw(path, BUILD_MANIFEST), False)
                except (DataError, IntegrityError) as exc:
                    log.warning("%s: discarding an unreadable unfinished build (%s)", path, exc)
                    old = None
                same = (
                    old is not None
                    and not old.legacy
                    and old.fingerprint == fingerprint
                    and list(old.manifest["grid_shape"]) == head["grid_shape"]
                    and all(np.array_equal(a, b) for a, b in zip(old.books, books))
                )
                if same and old is not None:
                    db._adopt(old)
                    db.resumed = True
                    return db
                log.warning("%s: discarding an unfinished build made with another model", path)
                (path / BUILD_MANIFEST).unlink()
            created: list[Path] = []
            try:
                book_entry = db._write_books(books, created)
                manifest = db._fresh_manifest(head, book_entry)
                manifest["build"] = {
                    "started_utc": _now(),
                    "data": data,
                    "cases": None if cases is None else list(cases),
                }
                db._commit(manifest, BUILD_MANIFEST, created)
            except BaseException:
                db._rollback(created)
                raise
            db._after_commit(BUILD_MANIFEST, codebooks_changed=False)
        return db

    #: Whether ``begin_build`` resumed an unfinished build (set by ``begin_build``).
    resumed: bool = False

    @property
    def staged(self) -> bool:
        """Whether this is an unfinished build (``begin_build``) rather than the committed database."""
        return self._state.name == BUILD_MANIFEST

    def finish_build(self) -> CodeDatabase:
        """Put a staged build in place of the database at its path (one atomic rename) and return it."""
        if not self.staged:
            raise DataError(f"{self._path}: finish_build is for a database staged with begin_build")
        with self._mutex, self._write_lock():
            state = self._reread()
            previous = self._peek(MANIFEST)
            manifest = self._next_manifest(state)
            manifest["build"] = None
            if previous is not None:
                manifest["generation"] = max(manifest["generation"], int(previous.get("generation", 0)) + 1)
            self._commit(manifest, BUILD_MANIFEST, [])
            _fail_point("promote")
            os.replace(self._path / BUILD_MANIFEST, self._path / MANIFEST)
            fsync_dir(self._path)
            self._after_commit(MANIFEST, codebooks_changed=self._books_differ(previous, manifest))
        return self

    def _peek(self, name: str) -> dict[str, Any] | None:
        """The raw manifest ``name`` when it is readable, else None."""
        try:
            doc = json.loads((self._path / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return doc if isinstance(doc, dict) else None

    @staticmethod
    def _books_differ(previous: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
        """Whether the committed codebooks change (stored Hamming codes must then go)."""
        if previous is None:
            return True
        try:
            if previous.get("format_version") == LEGACY_FORMAT_VERSION:
                old = [previous["files"][n]["sha256"] for n in ("codebook_normal", "codebook_abnormal")]
            else:
                old = [f["sha256"] for f in previous["codebooks"]["files"]]
            return bool(previous["fingerprint"] != new["fingerprint"]) or old != [
                f["sha256"] for f in new["codebooks"]["files"]
            ]
        except (KeyError, TypeError, AttributeError):
            return True

    # ------------------------------------------------------------------ properties
    @property
    def path(self) -> Path:
        """The database folder."""
        return self._path

    @property
    def fingerprint(self) -> str:
        """Fingerprint of the model whose codes these are."""
        return self._state.fingerprint

    @property
    def grid_shape(self) -> tuple[int, int]:
        """(h, w) of the code-index grids."""
        h, w = self._state.manifest["grid_shape"]
        return int(h), int(w)

    @property
    def num_codes(self) -> int:
        """K, the codebook size."""
        return int(self._state.manifest["num_codes"])

    @property
    def codebook_normal(self) -> np.ndarray:
        """(K, D) float32 normal-anatomy codebook."""
        return self._state.books[0]

    @property
    def codebook_abnormal(self) -> np.ndarray:
        """(K, D) float32 abnormal-anatomy codebook."""
        return self._state.books[1]

    @property
    def generation(self) -> int:
        """Commit counter: grows with every committed write."""
        return self._state.generation

    @property
    def format_version(self) -> int:
        """The committed manifest's format version: 1 for a database not yet converted to segments; a
        version 2 manifest becomes the current version with the next write."""
        return int(self._state.manifest["format_version"])

    def segments(self) -> list[Segment]:
        """Per stored segment, its memory-mapped arrays (no copy) and which rows are alive (search spans
        these; see ``Segment``). Segments whose every case was removed are left out."""
        out = []
        live = 0
        for si, s in enumerate(self._state.stored):
            case_alive = np.asarray([self._state.alive(si, ci) for ci in range(len(s.case_ids))], dtype=bool)
            if not case_alive.any():
                continue
            alive = np.repeat(case_alive, np.diff(s.case_rows))
            out.append(
                Segment(
                    name=s.folder,
                    normal_codes=s.normal_codes,
                    abnormal_codes=s.abnormal_codes,
                    slice_indices=s.slice_indices,
                    has_abnormal=s.has_abnormal,
                    case_ids=s.case_ids,
                    case_rows=s.case_rows,
                    case_alive=case_alive,
                    alive=alive,
                    live_start=live,
                )
            )
            live += int(alive.sum())
        return out

    def _view(self, name: str) -> np.ndarray:
        """A row array over every live row: the memory map itself for one segment without removed cases,
        else a concatenated copy (made once per snapshot)."""
        with self._mutex:
            if name in self._views:
                return self._views[name]
            st = self._state
            if len(st.stored) == 1 and not st.removed:
                arr = getattr(st.stored[0], name)
            elif not st.stored:
                h, w = self.grid_shape
                dtype = code_dtype(self.num_codes)
                empty = {
                    "normal_codes": np.zeros((0, h * w), dtype),
                    "abnormal_codes": np.zeros((0, h * w), dtype),
                    "slice_indices": np.zeros((0,), np.int32),
                    "has_abnormal": np.zeros((0,), np.bool_),
                }
                arr = empty[name]
            else:
                parts = []
                for si, ci in st.where:
                    s = st.stored[si]
                    parts.append((si, int(s.case_rows[ci]), int(s.case_rows[ci + 1])))
                merged: list[tuple[int, int, int]] = []
                for si, a, b in parts:  # merge runs of adjacent live cases into one slice each
                    if merged and merged[-1][0] == si and merged[-1][2] == a:
                        merged[-1] = (si, merged[-1][1], b)
                    else:
                        merged.append((si, a, b))
                arr = np.concatenate([getattr(st.stored[si], name)[a:b] for si, a, b in merged])
            arr = arr.view()
            arr.flags.writeable = False
            self._views[name] = arr
            return arr

    @property
    def normal_codes(self) -> np.ndarray:
        """(N, h*w) normal code indices (uint8 or uint16, see ``code_dtype``), one row per live slice
        (read-only). A memory map for a single-segment database without removed cases; otherwise a
        concatenated copy (use ``segments()`` to avoid it)."""
        return self._view("normal_codes")

    @property
    def abnormal_codes(self) -> np.ndarray:
        """(N, h*w) abnormal code indices (like ``normal_codes``)."""
        return self._view("abnormal_codes")

    @property
    def slice_indices(self) -> np.ndarray:
        """(N,) int32 axial slice index of each row within its volume (like ``normal_codes``)."""
        return self._view("slice_indices")

    @property
    def has_abnormal(self) -> np.ndarray:
        """(N,) bool: the slice has abnormal voxels (like ``normal_codes``)."""
        return self._view("has_abnormal")

    @property
    def case_ids(self) -> np.ndarray:
        """(N,) str case id of each live row."""
        with self._mutex:
            if "case_ids" not in self._views:
                st = self._state
                if not st.ids:
                    ids = np.zeros((0,), dtype="<U1")
                else:
                    ids = np.repeat(np.asarray(st.ids), np.diff(st.starts))
                ids.flags.writeable = False
                self._views["case_ids"] = ids
            return self._views["case_ids"]

    @property
    def cases(self) -> list[str]:
        """Live case ids in row order."""
        return list(self._state.ids)

    @property
    def case_starts(self) -> np.ndarray:
        """(C + 1,) int64 row boundaries: rows of case i are ``case_starts[i]:case_starts[i + 1]``."""
        return self._state.starts.copy()

    def __len__(self) -> int:
        return int(self._state.starts[-1])

    def __contains__(self, case_id: object) -> bool:
        return case_id in self._state.index

    def case_rows(self, case_id: str) -> slice:
        """The rows of one case in the concatenated views."""
        i = self._lookup(case_id)
        return slice(int(self._state.starts[i]), int(self._state.starts[i + 1]))

    def _stored_case(self, case_id: str) -> tuple[_Stored, int]:
        si, ci = self._state.where[self._lookup(case_id)]
        return self._state.stored[si], ci

    def slice_codes(self, case_id: str, slice_index: int) -> tuple[np.ndarray, np.ndarray]:
        """(normal, abnormal) (h*w,) uint16 codes of one stored slice (whatever the stored type), read from
        its segment (no copy of the database)."""
        s, ci = self._stored_case(case_id)
        a, b = int(s.case_rows[ci]), int(s.case_rows[ci + 1])
        sl = np.asarray(s.slice_indices[a:b])
        hit = np.flatnonzero(sl == int(slice_index))
        if not hit.size:
            raise DataError(
                f"{self._path}: case {case_id!r} has no slice {slice_index} in the database "
                f"(it holds slices {int(sl.min())}..{int(sl.max())}); give a slice in that range"
            )
        row = a + int(hit[0])
        return np.array(s.normal_codes[row], dtype=np.uint16), np.array(
            s.abnormal_codes[row], dtype=np.uint16
        )

    def case_abnormal_count(self, case_id: str) -> int:
        """How many of the case's slices have abnormal (tumour) voxels."""
        s, ci = self._stored_case(case_id)
        return int(np.count_nonzero(s.has_abnormal[int(s.case_rows[ci]) : int(s.case_rows[ci + 1])]))

    def sources(self, case_id: str) -> dict[str, Any]:
        """Where the case's volume lives: ``{"layout", "images", "image4d", "seg", "anat"}`` (str paths)."""
        s, ci = self._stored_case(case_id)
        return json.loads(json.dumps(self._segment_sources(s)[ci]))

    def source_fingerprint(self, case_id: str) -> str | None:
        """sha256 of the case's image files when it was indexed (None for cases indexed before it was
        recorded)."""
        s, ci = self._stored_case(case_id)
        return s.source_sha256[ci]

    def cases_with_fingerprint(self, source_sha256: str) -> list[str]:
        """Live cases whose image files had this sha256 when indexed."""
        st = self._state
        return [
            cid for cid, (si, ci) in zip(st.ids, st.where) if st.stored[si].source_sha256[ci] == source_sha256
        ]

    def _segment_sources(self, s: _Stored) -> list[dict[str, Any]]:
        """The sources of a segment's cases, parsed (and hash-checked) on first use."""
        if s.sources is not None:
            return s.sources
        assert s.sources_map is not None
        data = bytes(s.sources_map)
        entry = s.files[_SOURCES]
        where = f"{self._path / s.folder / _SOURCES}"
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise IntegrityError(f"{where} does not match the hash recorded in the manifest; {REBUILD_HINT}")
        try:
            doc = json.loads(data.decode("utf-8"))
            rows = doc["cases"]
            ids = [r["case_id"] for r in rows]
            sources = [validate_source(r["case_id"], r["source"]) for r in rows]
        except (ValueError, KeyError, TypeError, DataError) as exc:
            raise IntegrityError(f"{where} is malformed ({exc}); {REBUILD_HINT}") from None
        if tuple(ids) != s.case_ids:
            raise IntegrityError(f"{where} lists other cases than the segment's case table; {REBUILD_HINT}")
        s.sources = sources
        return sources

    def _lookup(self, case_id: str) -> int:
        try:
            return self._state.index[case_id]
        except (KeyError, TypeError):
            raise DataError(
                f"{self._path}: no case {case_id!r} in this database; check the id (`fdn index info --cases` "
                "lists them)"
            ) from None

    def info(self) -> dict[str, Any]:
        """Summary for people and the CLI: model, grid, sizes, segments, dates."""
        st = self._state
        m = st.manifest
        size = (self._path / st.name).stat().st_size
        if st.legacy:
            vdir = self._path / str(m["current"])
            size += sum(f.stat().st_size for f in vdir.iterdir() if f.is_file())
        else:
            size += sum(int(f["size"]) for f in m["codebooks"]["files"])
            size += sum(int(f["size"]) for s in m["segments"] for f in s["files"])
        stored_rows = sum(s.num_rows for s in st.stored)
        return {
            "path": str(self._path),
            "format_version": self.format_version,
            "fingerprint": st.fingerprint,
            "grid_shape": list(self.grid_shape),
            "num_codes": int(m["num_codes"]),
            "code_dim": int(m["code_dim"]),
            "num_cases": len(st.ids),
            "num_slices": len(self),
            "num_abnormal_slices": int(
                sum(int(np.count_nonzero(s.has_abnormal[a:b])) for s, a, b in self._live_ranges())
            ),
            "num_segments": len(st.stored),
            "num_removed_cases": len(st.removed),
            "removed_slices": stored_rows - len(self),
            "cases_with_fingerprint": sum(
                1 for si, ci in st.where if st.stored[si].source_sha256[ci] is not None
            ),
            # where the lesion flags came from: the case's tumour labels (its source names a seg file), else
            # the model's segmentation (``retrieval._has_abnormal``); the lesion filter of a search reads them
            "cases_flagged_by_labels": sum(
                1 for si, ci in st.where if self._segment_sources(st.stored[si])[ci].get("seg")
            ),
            "created": dict(m.get("created") or {}),
            "modified_utc": m.get("modified_utc", ""),
            "version": st.generation,
            "build": m.get("build"),
            "size_bytes": size,
        }

    def _live_ranges(self) -> Iterator[tuple[_Stored, int, int]]:
        st = self._state
        for si, ci in st.where:
            s = st.stored[si]
            yield s, int(s.case_rows[ci]), int(s.case_rows[ci + 1])

    def verify(self) -> None:
        """Recompute every file's sha256 and check every case's slices and sources; IntegrityError names the
        first problem."""
        state = self._read_retrying(self._path, self._state.name, verify=True)
        for s in state.stored:
            self._segment_sources(s)

    def close(self) -> None:
        """Drop this snapshot's memory maps (the files of a swept segment are freed once closed)."""
        with self._mutex:
            for s in self._state.stored:
                if s.sources_map is not None:
                    with contextlib.suppress(BufferError, ValueError):
                        s.sources_map.close()
            self._views.clear()
            self._state = _State(
                self._state.manifest, self._state.name, self._state.legacy, self._state.books, [], set()
            )
            self._index(self._state, self._path)

    def __enter__(self) -> CodeDatabase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ mutation: checking input
    def _check_case(
        self, c: CaseCodes
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """Validate one case's arrays against this database; return them in stored form."""
        _check_id(c.case_id, str(self._path))
        where = f"case {c.case_id!r}"
        h, w = self.grid_shape
        k = self.num_codes
        grids = []
        for name, arr in (("normal", c.normal), ("abnormal", c.abnormal)):
            a = np.asarray(arr)
            if a.ndim != 3 or a.shape[1:] != (h, w):
                raise DataError(
                    f"{where}: {name} codes must be (slices, {h}, {w}) to match this database, got {a.shape}"
                )
            if not np.issubdtype(a.dtype, np.integer):
                raise DataError(f"{where}: {name} codes must be integer code indices, got dtype {a.dtype}")
            if a.size and (a.min() < 0 or a.max() >= k):
                raise DataError(
                    f"{where}: {name} code indices must lie in [0, {k}); found {a.min()}..{a.max()}. "
                    "Were the codes made by the model this database belongs to?"
                )
            grids.append(a.reshape(a.shape[0], h * w).astype(code_dtype(k)))
        s = grids[0].shape[0]
        if s == 0:
            raise DataError(f"{where}: has no slices")
        if grids[1].shape[0] != s:
            raise DataError(f"{where}: {s} normal grids but {grids[1].shape[0]} abnormal grids")
        flags = np.asarray(c.has_abnormal)
        if flags.shape != (s,) or not (flags.dtype == np.bool_ or np.isin(flags, (0, 1)).all()):
            raise DataError(f"{where}: has_abnormal must be ({s},) booleans, got {flags.dtype} {flags.shape}")
        if c.slice_indices is None:
            sl = np.arange(s, dtype=np.int32)
        else:
            sl = np.asarray(c.slice_indices)
            if sl.shape != (s,) or not np.issubdtype(sl.dtype, np.integer) or (sl.size and sl.min() < 0):
                raise DataError(
                    f"{where}: slice_indices must be ({s},) non-negative integers, got {sl.shape}"
                )
            if np.unique(sl).size != s:
                raise DataError(f"{where}: slice_indices has repeated values")
            if sl.max() > np.iinfo(np.int32).max:
                raise DataError(f"{where}: slice_indices exceed int32")
            order = np.argsort(sl, kind="stable")  # stored in slice order (checked by verify)
            sl = sl[order].astype(np.int32)
            grids = [g[order] for g in grids]
            flags = flags[order]
        if c.source_sha256 is not None and (
            not isinstance(c.source_sha256, str) or not _SHA_RE.match(c.source_sha256)
        ):
            raise DataError(f"{where}: source_sha256 must be a lowercase hex sha256, got {c.source_sha256!r}")
        return grids[0], grids[1], flags.astype(np.bool_), sl, validate_source(c.case_id, c.source)

    # ------------------------------------------------------------------ mutation: public operations
    def add_case(
        self,
        case_id: str,
        normal: np.ndarray,
        abnormal: np.ndarray,
        has_abnormal: np.ndarray,
        source: Mapping[str, Any],
        slice_indices: np.ndarray | None = None,
        source_sha256: str | None = None,
    ) -> None:
        """Add one case (grids (S, h, w) uint16, flags (S,) bool) as one new segment."""
        self.add_cases(
            [CaseCodes(case_id, normal, abnormal, has_abnormal, source, slice_indices, source_sha256)]
        )

    def add_cases(
        self,
        cases: Iterable[CaseCodes],
        progress: Progress | None = None,
        if_present: Literal["error", "skip"] = "error",
    ) -> list[str]:
        """Add cases as one new segment (all or nothing); returns the ids added.

        A case id already in the database is an error, unless ``if_present="skip"`` and the stored case has
        the same source fingerprint (another process added the very same study meanwhile): it is skipped.
        """
        cases = list(cases)
        seen: set[str] = set()
        checked = []
        for i, c in enumerate(cases):
            if progress is not None:
                progress.update(i, len(cases), "checking cases")
            if not isinstance(c, CaseCodes):
                raise DataError(f"add_cases expects CaseCodes items, got {type(c).__name__}")
            if c.case_id in seen:
                raise DataError(f"case {c.case_id!r} is given twice in one add")
            seen.add(c.case_id)
            checked.append((c, *self._check_case(c)))
        if not checked:
            return []
        if progress is not None:
            progress.update(len(cases), len(cases), "writing database")
        with self._mutex, self._write_lock():
            state = self._reread_for_write()
            keep = []
            for item in checked:
                c = item[0]
                if c.case_id in state.index:
                    si, ci = state.where[state.index[c.case_id]]
                    stored_sha = state.stored[si].source_sha256[ci]
                    if if_present == "skip" and stored_sha is not None and stored_sha == c.source_sha256:
                        continue
                    raise DataError(
                        f"{self._path}: case {c.case_id!r} is already in the database; "
                        "remove it first (remove_case / `fdn index remove`) to replace it"
                    )
                keep.append(item)
            if not keep:
                return []
            part = _Part(
                normal=np.concatenate([x[1] for x in keep]),
                abnormal=np.concatenate([x[2] for x in keep]),
                flags=np.concatenate([x[3] for x in keep]),
                slices=np.concatenate([x[4] for x in keep]),
                ranges=[],
                ids=[x[0].case_id for x in keep],
                shas=[x[0].source_sha256 for x in keep],
                sources=[x[5] for x in keep],
            )
            n = 0
            for x in keep:
                part.ranges.append((n, n + x[1].shape[0]))
                n += x[1].shape[0]
            created: list[Path] = []
            try:
                entry = self._write_segment([part], created)
                manifest = self._next_manifest(state)
                manifest["segments"] = [*manifest["segments"], entry]
                self._commit(manifest, state.name, created)
            except BaseException:
                self._rollback(created)
                raise
            self._after_commit(state.name)
            self._auto_merge()
        return [x[0].case_id for x in keep]

    def remove_case(self, case_id: str) -> None:
        """Remove one case (a tombstone: its rows stay on disk until ``compact``)."""
        self.remove_cases([case_id])

    def remove_cases(self, case_ids: Sequence[str]) -> None:
        """Remove several cases in one commit (tombstones; ``compact`` drops their rows from disk)."""
        wanted = list(dict.fromkeys(case_ids))
        for cid in wanted:
            self._lookup(cid)
        if not wanted:
            return
        with self._mutex, self._write_lock():
            state = self._reread_for_write()
            missing = [c for c in wanted if c not in state.index]
            if missing:
                raise DataError(f"{self._path}: no case(s) {missing} in this database (removed meanwhile?)")
            manifest = self._next_manifest(state)
            for cid in wanted:
                si, _ = state.where[state.index[cid]]
                manifest["removed"] = [
                    *manifest["removed"],
                    {"segment": state.stored[si].folder, "case_id": cid},
                ]
            self._commit(manifest, state.name, [])
            self._after_commit(state.name)

    def compact(self, progress: Progress | None = None) -> bool:
        """Merge every segment into one and drop removed cases' rows; returns False when there was nothing
        to do (one segment, nothing removed). Readers of the old segments keep their memory maps."""
        with self._mutex, self._write_lock():
            state = self._reread_for_write()
            if len(state.stored) <= 1 and not state.removed:
                return False
            self._merge(state, 0, len(state.stored), progress)
        return True

    # ------------------------------------------------------------------ mutation: machinery
    @contextlib.contextmanager
    def write_lock(self) -> Iterator[None]:
        """Hold the database's write lock for a write of derived files beside it (the Hamming codes); fails
        with ModelMismatchError if the database was rebuilt with other codebooks since it was opened."""
        with self._mutex, self._write_lock():
            current = self._reread()
            if current.fingerprint != self._state.fingerprint or any(
                not np.array_equal(a, b) for a, b in zip(current.books, self._state.books)
            ):
                raise ModelMismatchError(
                    f"{self._path} was rebuilt with another model since it was opened; open it again"
                )
            yield

    @contextlib.contextmanager
    def _write_lock(self) -> Iterator[None]:
        """Hold the database's exclusive write lock (a lock file in the folder; waits up to
        ``lock_timeout`` seconds for another writer)."""
        from filelock import FileLock, Timeout

        lock_path = self._path / LOCK_FILE
        lock = FileLock(str(lock_path), timeout=self.lock_timeout)
        try:
            lock.acquire()
        except Timeout:
            raise DataError(
                f"{self._path}: another process has been writing to this database for over "
                f"{self.lock_timeout:.0f} s (lock file {lock_path}); wait for it to finish (an `fdn index` "
                "command or the Slicer module) and run the command again"
            ) from None
        except OSError as exc:
            exc.add_note(f"while locking the database {self._path} for writing; nothing was changed")
            raise
        try:
            yield
        finally:
            lock.release()

    def _reread(self) -> _State:
        """The current state of this database's manifest, read under the lock (others may have written)."""
        raw = self._read_manifest_raw(self._path, self._state.name)
        cache = {s.folder: s for s in self._state.stored}
        return self._load(self._path, self._state.name, raw, verify=False, cache=cache)

    def _reread_for_write(self) -> _State:
        """``_reread``, checked to be of this model, and converted from format 1 first if needed."""
        state = self._reread()
        if state.fingerprint != self._state.fingerprint or any(
            not np.array_equal(a, b) for a, b in zip(state.books, self._state.books)
        ):
            raise ModelMismatchError(
                f"{self._path} was rebuilt with another model ({state.fingerprint[:16]}...) since it was "
                "opened; open it again"
            )
        if state.legacy:
            state = self._migrate(state)
        self._sweep()
        return state

    def _migrate(self, state: _State) -> _State:
        """Convert a format-1 database into segments (one-time rewrite) and commit it."""
        log.info("%s: converting the database to the segment format (version %d)", self._path, FORMAT_VERSION)
        state = self._load(self._path, state.name, state.manifest, verify=True)  # carry no damaged row over
        m = state.manifest
        created: list[Path] = []
        try:
            books = self._write_books(state.books, created)
            head = {k: m[k] for k in ("fingerprint", "grid_shape", "num_codes", "code_dim")}
            manifest = self._fresh_manifest(head, books)
            manifest["created"] = dict(m.get("created") or manifest["created"])
            manifest["generation"] = int(m.get("version", 0)) + 1
            if state.stored:
                s = state.stored[0]
                arrays = [s.normal_codes, s.abnormal_codes, s.slice_indices, s.has_abnormal]
                case_of_row = np.repeat(np.arange(len(s.case_ids)), np.diff(s.case_rows))
                order = np.lexsort((np.asarray(s.slice_indices), case_of_row))
                if not np.array_equal(order, np.arange(order.size)):  # format 1 allowed any slice order
                    arrays = [np.asarray(a)[order] for a in arrays]
                part = _Part(
                    arrays[0],
                    arrays[1],
                    arrays[2],
                    arrays[3],
                    [(int(a), int(b)) for a, b in zip(s.case_rows[:-1], s.case_rows[1:])],
                    list(s.case_ids),
                    list(s.source_sha256),
                    list(s.sources or []),
                )
                manifest["segments"] = [self._write_segment([part], created)]
            self._commit(manifest, state.name, created)
        except BaseException:
            self._rollback(created)
            raise
        self._after_commit(state.name)
        return self._reread()

    def _fresh_manifest(self, head: Mapping[str, Any], books: dict[str, Any]) -> dict[str, Any]:
        now = _now()
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            **head,
            "created": {
                "utc": now,
                "fdn_version": fdn_core.__version__,
                "numpy": np.__version__,
                "python": platform.python_version(),
                "host": platform.node(),
            },
            "modified_utc": now,
            "generation": 1,
            "codebooks": books,
            "segments": [],
            "removed": [],
            "build": None,
        }

    @staticmethod
    def _next_manifest(state: _State) -> dict[str, Any]:
        m = {k: v for k, v in state.manifest.items() if k != "manifest_sha256"}
        m["generation"] = state.generation + 1
        m["modified_utc"] = _now()
        m["format_version"] = FORMAT_VERSION  # a version-2 manifest is upgraded by the first write
        return m

    def _new_folder(self, kind: str) -> tuple[str, Path]:
        """A fresh folder name ``kind/NNNNNN-xxxxxxxx`` numbered past every folder present, and its path."""
        base = self._path / kind
        base.mkdir(exist_ok=True)
        top = 0
        for e in base.iterdir():
            m = _NAME_RE.match(e.name.removeprefix(_TMP_PREFIX))
            if m is not None:
                top = max(top, int(m.group(1)))
        name = f"{top + 1:06d}-{secrets.token_hex(4)}"
        return f"{kind}/{name}", base / name

    def _write_books(self, books: tuple[np.ndarray, np.ndarray], created: list[Path]) -> dict[str, Any]:
        rel, final = self._new_folder(CODEBOOKS_DIR)
        tmp = final.with_name(_TMP_PREFIX + final.name)
        created.append(tmp)
        tmp.mkdir()
        files = [
            _write_npy(tmp / fname, np.dtype(np.float32), tuple(book.shape), [book])
            for fname, book in zip(_BOOK_FILES, books)
        ]
        fsync_dir(tmp)
        created.append(final)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        return {"folder": rel, "files": files}

    def _write_segment(self, parts: Sequence[_Part], created: list[Path]) -> dict[str, Any]:
        """Write the rows of ``parts`` (their case ranges, in order) as one new segment folder (files
        flushed, folder renamed into place) and return its manifest entry."""
        rel, final = self._new_folder(SEGMENTS_DIR)
        tmp = final.with_name(_TMP_PREFIX + final.name)
        created.append(tmp)
        tmp.mkdir()
        h, w = self.grid_shape
        n = sum(b - a for part in parts for a, b in part.ranges)
        ids = [cid for part in parts for cid in part.ids]
        shas = [s or "" for part in parts for s in part.shas]
        sources = [src for part in parts for src in part.sources]
        sizes = [b - a for part in parts for a, b in part.ranges]

        def rows(attr: str) -> Iterator[np.ndarray]:
            for part in parts:
                arr = getattr(part, attr)
                for a, b in part.ranges:
                    yield from _chunked(arr, a, b)

        files = [
            _write_npy(tmp / "normal_codes.npy", code_dtype(self.num_codes), (n, h * w), rows("normal")),
            _write_npy(tmp / "abnormal_codes.npy", code_dtype(self.num_codes), (n, h * w), rows("abnormal")),
            _write_npy(tmp / "slice_indices.npy", np.dtype(np.int32), (n,), rows("slices")),
            _write_npy(tmp / "has_abnormal.npy", np.dtype(np.bool_), (n,), rows("flags")),
        ]
        _fail_point("segment-rows")
        id_dtype = np.dtype(f"<U{max(1, max(len(x) for x in ids))}")
        files += [
            _write_npy(tmp / "case_ids.npy", id_dtype, (len(ids),), [np.asarray(ids, dtype=id_dtype)]),
            _write_npy(
                tmp / "case_rows.npy",
                np.dtype(np.int64),
                (len(ids) + 1,),
                [np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])],
            ),
            _write_npy(
                tmp / "source_sha256.npy", np.dtype("S64"), (len(ids),), [np.asarray(shas, dtype="S64")]
            ),
            _write_json_file(
                tmp / _SOURCES,
                {
                    "format": "fdn-segment-sources",
                    "cases": [{"case_id": c, "source": s} for c, s in zip(ids, sources)],
                },
            ),
        ]
        fsync_dir(tmp)
        _fail_point("segment-files")
        created.append(final)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        _fail_point("segment-rename")
        return {"folder": rel, "num_rows": n, "num_cases": len(ids), "files": files}

    def _commit(self, manifest: dict[str, Any], name: str, created: list[Path]) -> None:
        """Atomically replace the manifest ``name`` (the commit point)."""
        manifest = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
        manifest["manifest_sha256"] = _manifest_hash(manifest)
        _fail_point("manifest")
        atomic_write_json(self._path / name, manifest)
        _fail_point("replaced")  # committed, but the writer does not know yet (rollback checks the refs)
        created.clear()  # committed: what was created is now referenced, never rolled back
        _fail_point("committed")

    def _rollback(self, created: list[Path]) -> None:
        """Remove the folders this process created for a write that did not commit (never others'). An
        interruption can land after the manifest was replaced but before the write noticed, so a folder the
        manifests reference is kept whatever happened."""
        refs = self._referenced()
        for p in created:
            if refs is not None and f"{p.parent.name}/{p.name}" not in refs:
                shutil.rmtree(p, ignore_errors=True)
        created.clear()

    def _referenced(self) -> set[str] | None:
        """Folders (``segments/...``, ``codebooks/...``, format-1 ``vNNNNNN``) that ``manifest.json`` or
        ``build.json`` reference; None when one of them cannot be read (then nothing may be deleted)."""
        refs: set[str] = set()
        for name in (MANIFEST, BUILD_MANIFEST):
            if not (self._path / name).is_file():
                continue
            try:
                raw = json.loads((self._path / name).read_text(encoding="utf-8"))
                if raw.get("format_version") == LEGACY_FORMAT_VERSION:
                    refs.add(str(raw["current"]))
                else:
                    refs.add(str(raw["codebooks"]["folder"]))
                    refs.update(str(s["folder"]) for s in raw["segments"])
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                return None
        return refs

    def _after_commit(self, name: str, codebooks_changed: bool = False) -> None:
        """Adopt the committed state and sweep what no manifest references any more."""
        raw = self._read_manifest_raw(self._path, name)
        cache = {s.folder: s for s in self._state.stored}
        state = self._load(self._path, name, raw, verify=False, cache=cache)
        self._adopt(state)
        if codebooks_changed:
            shutil.rmtree(self._path / HAMMING_DIR, ignore_errors=True)
        try:
            self._sweep()
        except OSError as exc:  # committed already; litter is swept by the next writer
            log.warning("%s: could not sweep old segments (%s)", self._path, exc)

    def _adopt(self, state: _State) -> None:
        with self._mutex:
            self._state = state
            self._views = {}

    def _sweep(self) -> None:
        """Delete (under the lock) folders no manifest references: old segments and codebooks, temporary
        folders of dead writers, format-1 version folders. Best effort: a folder still memory-mapped on
        Windows is left for a later sweep."""
        _fail_point("sweep")
        refs = self._referenced()
        if refs is None:
            return  # an unreadable manifest: sweep nothing
        for kind in (SEGMENTS_DIR, CODEBOOKS_DIR):
            base = self._path / kind
            if not base.is_dir():
                continue
            for e in base.iterdir():
                if f"{kind}/{e.name}" not in refs and (
                    _NAME_RE.match(e.name) or e.name.startswith(_TMP_PREFIX)
                ):
                    shutil.rmtree(e, ignore_errors=True)
        for e in self._path.iterdir():
            if (
                e.is_dir()
                and (_V1_VERSION_RE.match(e.name) or e.name.startswith(".tmp-v"))
                and e.name not in refs
            ):
                shutil.rmtree(e, ignore_errors=True)

    # ------------------------------------------------------------------ merging
    def _auto_merge(self) -> None:
        """Merge the trailing run of small segments of one size tier once it holds ``merge_fanout`` of them
        (keeps the number of segments logarithmic in the size of the database). Failures leave the
        committed add in place and are only logged."""
        st = self._state
        sizes = [s.num_rows for s in st.stored]
        if len(sizes) < self.merge_fanout:
            return

        def tier(n: int) -> int:
            t = 0
            while n >= self.merge_fanout:
                n //= self.merge_fanout
                t += 1
            return t

        end = len(sizes)
        start = end - 1
        if sizes[start] >= self.merge_max_rows:
            return
        t = tier(sizes[start])
        while start > 0 and sizes[start - 1] < self.merge_max_rows and tier(sizes[start - 1]) <= t:
            start -= 1
        if end - start < self.merge_fanout:
            return
        try:
            self._merge(self._reread_for_write(), start, end, None)
        except (OSError, DataError, IntegrityError) as exc:
            log.warning("%s: merging small segments failed (%s); the add is committed", self._path, exc)

    def _verify_stored(self, s: _Stored) -> None:
        """Check the hashes of a segment's row arrays (once per loaded segment)."""
        if s.verified or not s.files:
            return
        mpath = self._path / self._state.name
        for name in _ROW_FILES:
            self._file(self._path, mpath, s.folder, s.files[f"{name}.npy"], hash_it=True)
        s.verified = True

    def _merge(self, state: _State, start: int, end: int, progress: Progress | None) -> None:
        """Replace segments ``start:end`` of ``state`` by one holding their live rows (commits)."""
        parts = []
        group = state.stored[start:end]
        for s in group:
            self._verify_stored(s)  # never carry a damaged row into a new, freshly hashed segment
            live = [ci for ci in range(len(s.case_ids)) if (s.folder, s.case_ids[ci]) not in state.removed]
            if not live:
                continue
            sources = self._segment_sources(s) if s.sources is None else s.sources
            parts.append(
                _Part(
                    s.normal_codes,
                    s.abnormal_codes,
                    s.slice_indices,
                    s.has_abnormal,
                    [(int(s.case_rows[ci]), int(s.case_rows[ci + 1])) for ci in live],
                    [s.case_ids[ci] for ci in live],
                    [s.source_sha256[ci] for ci in live],
                    [sources[ci] for ci in live],
                )
            )
        if progress is not None:
            progress.update(0, 1, "compacting the database")
        created: list[Path] = []
        try:
            manifest = self._next_manifest(state)
            folders = {s.folder for s in group}
            new = [self._write_segment(parts, created)] if parts else []
            segs = manifest["segments"]
            manifest["segments"] = [*segs[:start], *new, *segs[end:]]
            manifest["removed"] = [t for t in manifest["removed"] if t["segment"] not in folders]
            self._commit(manifest, state.name, created)
        except BaseException:
            self._rollback(created)
            raise
        self._after_commit(state.name)
        if progress is not None:
            progress.update(1, 1, "compacting the database")
