"""The code database: every indexed slice's normal and abnormal code-index grids, plus where it came from.

On disk a database is a directory::

    manifest.json            format, version, model fingerprint, grid shape, cases (with their sources),
                             and the sha256, dtype and shape of every array file of the current version
    v000007/                 the current version: plain .npy arrays
        normal_codes.npy     (N, h*w) uint16, code-index grids flattened row-major
        abnormal_codes.npy   (N, h*w) uint16
        slice_indices.npy    (N,) int32, axial slice index k of each row in its volume
        has_abnormal.npy     (N,) bool, slice has abnormal (tumour) voxels by the model's segmentation
        codebook_normal.npy  (K, D) float32
        codebook_abnormal.npy (K, D) float32

Rows of one case are contiguous, in the order cases were added. Why plain ``.npy`` files and not SQLite
or Parquet: search scans every row of two fixed-width integer matrices, and ``np.load(mmap_mode="r")``
maps them with zero parsing or copying, holds millions of rows in a few hundred MB, needs no extra
dependency (Parquet would need pyarrow; SQLite stores rows, not columns, and would have to be unpacked
into arrays on every open), and ``allow_pickle=False`` keeps loading free of code execution. The small
per-case metadata (ids, source paths) lives in the JSON manifest, readable by people.

Every write is atomic: a complete new version folder is written under a temporary name, its files are
hashed and flushed, it is renamed to ``vNNNNNN``, and only then is ``manifest.json`` replaced (one atomic
rename) to point at it. A crash at any point leaves the previous manifest and its folder intact;
leftovers are ignored on open and swept away by the next write. One writer at a time is assumed.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import shutil
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import fdn_core
from fdn_core.data.readers import validate_source
from fdn_core.errors import DataError, IntegrityError, ModelMismatchError
from fdn_core.fileio import atomic_write_json, sha256_file
from fdn_core.progress import Progress

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "CaseCodes",
    "CodeDatabase",
]

FORMAT_NAME = "fdn-code-database"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REBUILD_HINT = "rebuild it with `fdn index build` (or restore it from a backup)"

_ROW_ARRAYS = ("normal_codes", "abnormal_codes", "slice_indices", "has_abnormal")
_ALL_ARRAYS = (*_ROW_ARRAYS, "codebook_normal", "codebook_abnormal")
_VERSION_RE = re.compile(r"^v(\d{6,})$")


@dataclass(frozen=True)
class CaseCodes:
    """One case to add: its code grids (S, h, w) uint16, per-slice abnormal flags, and its source files."""

    case_id: str
    normal: np.ndarray
    abnormal: np.ndarray
    has_abnormal: np.ndarray
    source: Mapping[str, Any]
    slice_indices: np.ndarray | None = None


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _fsync_dir(path: Path) -> None:
    """Flush a directory entry to disk where the OS allows it (POSIX); a no-op elsewhere."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _save_array(path: Path, arr: np.ndarray) -> dict[str, Any]:
    """Write one .npy file, flush it, and return its manifest entry (sha256, dtype, shape)."""
    with open(path, "wb") as f:
        np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    return {"sha256": sha256_file(path), "dtype": str(arr.dtype), "shape": list(arr.shape)}


class CodeDatabase:
    """An on-disk, memory-mapped table of per-slice code grids; see the module docstring for the format.

    Open with ``CodeDatabase.open(path)`` or make an empty one with ``CodeDatabase.create(...)``. Arrays
    are read-only memory maps of the current version; every mutation writes a new version atomically.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self._path = path
        self._manifest = manifest
        self._arrays = arrays
        self._case_index = {c["case_id"]: i for i, c in enumerate(manifest["cases"])}
        self._case_ids: np.ndarray | None = None

    # ------------------------------------------------------------------ creation and opening
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
        if not isinstance(fingerprint, str) or not fingerprint.strip():
            raise DataError(f"{path}: the model fingerprint must be a non-empty string, got {fingerprint!r}")
        try:
            h, w = (int(v) for v in grid_shape)
        except (TypeError, ValueError):
            raise DataError(f"{path}: grid_shape must be two integers (h, w), got {grid_shape!r}") from None
        if h < 1 or w < 1:
            raise DataError(f"{path}: grid_shape must be positive, got {grid_shape!r}")
        books = {}
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
                raise DataError(f"{path}: {name} contains NaN or infinite values")
            books[name] = arr.astype(np.float32)
        if books["codebook_normal"].shape != books["codebook_abnormal"].shape:
            raise DataError(
                f"{path}: the normal and abnormal codebooks differ in shape "
                f"({books['codebook_normal'].shape} vs {books['codebook_abnormal'].shape})"
            )
        if path.exists():
            if not path.is_dir():
                raise DataError(f"{path} exists and is not a folder; choose another database path")
            contents = list(path.iterdir())
            if contents:
                try:
                    ours = (
                        json.loads((path / MANIFEST).read_text(encoding="utf-8")).get("format") == FORMAT_NAME
                    )
                except (OSError, ValueError, AttributeError):
                    ours = False
                if not ours:
                    raise DataError(
                        f"{path} is a non-empty folder that is not a code database; refusing to replace it. "
                        "Choose an empty or new path."
                    )
                if not overwrite:
                    raise DataError(
                        f"{path} already holds a code database; pass overwrite=True (CLI: --overwrite) "
                        "to replace it, or choose another path"
                    )
        path.mkdir(parents=True, exist_ok=True)
        p = h * w
        now = _now()
        manifest: dict[str, Any] = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "fingerprint": fingerprint,
            "grid_shape": [h, w],
            "num_codes": int(books["codebook_normal"].shape[0]),
            "code_dim": int(books["codebook_normal"].shape[1]),
            "created": {
                "utc": now,
                "fdn_version": fdn_core.__version__,
                "numpy": np.__version__,
                "python": platform.python_version(),
                "host": platform.node(),
            },
            "modified_utc": now,
            "version": 0,
            "current": None,
            "num_slices": 0,
            "cases": [],
            "files": {},
        }
        arrays = {
            "normal_codes": np.zeros((0, p), np.uint16),
            "abnormal_codes": np.zeros((0, p), np.uint16),
            "slice_indices": np.zeros((0,), np.int32),
            "has_abnormal": np.zeros((0,), np.bool_),
            **books,
        }
        db = cls(path, manifest, arrays)
        db._commit(arrays, [])
        return db

    @classmethod
    def open(
        cls, path: str | Path, expected_fingerprint: str | None = None, verify: bool = True
    ) -> CodeDatabase:
        """Open a database; refuse one built by another model; with ``verify`` check every file's hash."""
        path = Path(path)
        manifest = cls._read_manifest(path)
        if expected_fingerprint is not None and manifest["fingerprint"] != expected_fingerprint:
            raise ModelMismatchError(
                f"{path} was built with model {manifest['fingerprint'][:16]}..., but the model in use is "
                f"{expected_fingerprint[:16]}...; codes of different models are not comparable. "
                "Open the model the database was built with, or rebuild the database with `fdn index build`."
            )
        for _ in range(3):
            try:
                return cls(path, manifest, cls._load_version(path, manifest, verify))
            except IntegrityError:
                # A writer may have swapped in a new version (and swept this one) while we were reading.
                latest = cls._read_manifest(path)
                if (
                    latest["current"] == manifest["current"]
                    or latest["fingerprint"] != manifest["fingerprint"]
                ):
                    raise
                manifest = latest
        return cls(path, manifest, cls._load_version(path, manifest, verify))

    @classmethod
    def _read_manifest(cls, path: Path) -> dict[str, Any]:
        mpath = path / MANIFEST
        if not mpath.is_file():
            raise DataError(
                f"{path} is not a code database (no {MANIFEST}); build one with `fdn index build`"
            )
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise IntegrityError(f"{mpath} is unreadable ({exc}); {REBUILD_HINT}") from exc
        cls._check_manifest(mpath, manifest)
        return manifest

    @classmethod
    def _load_version(cls, path: Path, manifest: dict[str, Any], verify: bool) -> dict[str, np.ndarray]:
        """Memory-map the current version's arrays, checking hashes (with ``verify``), dtypes and shapes."""
        mpath = path / MANIFEST
        vdir = path / manifest["current"]
        arrays: dict[str, np.ndarray] = {}
        for name in _ALL_ARRAYS:
            entry = manifest["files"][name]
            fpath = vdir / f"{name}.npy"
            if not fpath.is_file():
                raise IntegrityError(f"{fpath} is missing; {REBUILD_HINT}")
            if verify and sha256_file(fpath) != entry["sha256"]:
                raise IntegrityError(
                    f"{fpath} does not match the hash recorded in {mpath} (corrupted or modified); "
                    f"{REBUILD_HINT}"
                )
            try:
                arr = np.load(fpath, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise IntegrityError(f"{fpath} is not a readable .npy array ({exc}); {REBUILD_HINT}") from exc
            if str(arr.dtype) != entry["dtype"] or list(arr.shape) != entry["shape"]:
                raise IntegrityError(
                    f"{fpath} holds {arr.dtype} {tuple(arr.shape)}, but {mpath} records "
                    f"{entry['dtype']} {tuple(entry['shape'])}; {REBUILD_HINT}"
                )
            arrays[name] = arr
        cls._check_consistency(mpath, manifest, arrays)
        return arrays

    @staticmethod
    def _check_manifest(mpath: Path, m: Any) -> None:
        if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
            raise DataError(f"{mpath} is not a code database manifest (format is not {FORMAT_NAME!r})")
        if m.get("format_version") != FORMAT_VERSION:
            raise DataError(
                f"{mpath} has format version {m.get('format_version')!r}; this software reads version "
                f"{FORMAT_VERSION}. Rebuild the database with `fdn index build`."
            )
        need = ("fingerprint", "grid_shape", "num_codes", "code_dim", "version", "current", "cases", "files")
        missing = [k for k in need if k not in m]
        if missing:
            raise IntegrityError(f"{mpath} lacks keys {missing}; {REBUILD_HINT}")
        cur = m["current"]
        if not isinstance(cur, str) or not _VERSION_RE.match(cur):
            raise IntegrityError(f"{mpath} names no valid current version ({cur!r}); {REBUILD_HINT}")
        if set(m["files"]) != set(_ALL_ARRAYS):
            raise IntegrityError(f"{mpath} lists files {sorted(m['files'])}, expected {list(_ALL_ARRAYS)}")

    @staticmethod
    def _check_consistency(mpath: Path, m: dict[str, Any], a: dict[str, np.ndarray]) -> None:
        h, w = m["grid_shape"]
        n = a["normal_codes"].shape[0]
        k, d = m["num_codes"], m["code_dim"]
        problems = []
        if a["normal_codes"].shape != (n, h * w) or a["abnormal_codes"].shape != (n, h * w):
            problems.append("code arrays do not match the grid shape")
        if any(a[x].shape != (n,) for x in ("slice_indices", "has_abnormal")):
            problems.append("per-slice arrays differ in length from the code arrays")
        if a["codebook_normal"].shape != (k, d) or a["codebook_abnormal"].shape != (k, d):
            problems.append("codebooks do not have the recorded (num_codes, code_dim)")
        stop = 0
        for c in m["cases"]:
            if c.get("start") != stop or not isinstance(c.get("stop"), int) or c["stop"] < c["start"]:
                problems.append(f"case {c.get('case_id')!r} rows are not contiguous")
                break
            stop = c["stop"]
        if stop != n:
            problems.append(f"cases cover {stop} rows but the arrays have {n}")
        if problems:
            raise IntegrityError(f"{mpath}: {'; '.join(problems)}; {REBUILD_HINT}")

    # ------------------------------------------------------------------ properties
    @property
    def path(self) -> Path:
        """The database folder."""
        return self._path

    @property
    def fingerprint(self) -> str:
        """Fingerprint of the model whose codes these are."""
        return str(self._manifest["fingerprint"])

    @property
    def grid_shape(self) -> tuple[int, int]:
        """(h, w) of the code-index grids."""
        h, w = self._manifest["grid_shape"]
        return int(h), int(w)

    @property
    def num_codes(self) -> int:
        """K, the codebook size."""
        return int(self._manifest["num_codes"])

    @property
    def codebook_normal(self) -> np.ndarray:
        """(K, D) float32 normal-anatomy codebook."""
        return self._arrays["codebook_normal"]

    @property
    def codebook_abnormal(self) -> np.ndarray:
        """(K, D) float32 abnormal-anatomy codebook."""
        return self._arrays["codebook_abnormal"]

    @property
    def normal_codes(self) -> np.ndarray:
        """(N, h*w) uint16 normal code indices, one row per slice (read-only)."""
        return self._arrays["normal_codes"]

    @property
    def abnormal_codes(self) -> np.ndarray:
        """(N, h*w) uint16 abnormal code indices, one row per slice (read-only)."""
        return self._arrays["abnormal_codes"]

    @property
    def slice_indices(self) -> np.ndarray:
        """(N,) int32 axial slice index of each row within its volume."""
        return self._arrays["slice_indices"]

    @property
    def has_abnormal(self) -> np.ndarray:
        """(N,) bool: the slice has abnormal voxels."""
        return self._arrays["has_abnormal"]

    @property
    def case_ids(self) -> np.ndarray:
        """(N,) str case id of each row."""
        if self._case_ids is None:
            cases = self._manifest["cases"]
            if not cases:
                ids = np.zeros((0,), dtype="<U1")
            else:
                names = np.asarray([c["case_id"] for c in cases])
                ids = np.repeat(names, [c["stop"] - c["start"] for c in cases])
            ids.flags.writeable = False
            self._case_ids = ids
        return self._case_ids

    @property
    def cases(self) -> list[str]:
        """Case ids in row order."""
        return [c["case_id"] for c in self._manifest["cases"]]

    @property
    def case_starts(self) -> np.ndarray:
        """(C + 1,) int64 row boundaries: rows of case i are ``case_starts[i]:case_starts[i + 1]``."""
        return np.asarray([0] + [c["stop"] for c in self._manifest["cases"]], dtype=np.int64)

    def __len__(self) -> int:
        return int(self._arrays["normal_codes"].shape[0])

    def __contains__(self, case_id: object) -> bool:
        return case_id in self._case_index

    def case_rows(self, case_id: str) -> slice:
        """The rows of one case."""
        c = self._manifest["cases"][self._lookup(case_id)]
        return slice(c["start"], c["stop"])

    def sources(self, case_id: str) -> dict[str, Any]:
        """Where the case's volume lives: ``{"layout", "images", "image4d", "seg", "anat"}`` (str paths)."""
        return json.loads(json.dumps(self._manifest["cases"][self._lookup(case_id)]["source"]))

    def _lookup(self, case_id: str) -> int:
        try:
            return self._case_index[case_id]
        except KeyError:
            raise DataError(f"{self._path}: no case {case_id!r} in this database") from None

    def info(self) -> dict[str, Any]:
        """Summary for people and the CLI: model, grid, sizes, dates."""
        m = self._manifest
        vdir = self._path / m["current"]
        size = sum(f.stat().st_size for f in vdir.iterdir() if f.is_file())
        return {
            "path": str(self._path),
            "format_version": m["format_version"],
            "fingerprint": m["fingerprint"],
            "grid_shape": list(self.grid_shape),
            "num_codes": m["num_codes"],
            "code_dim": m["code_dim"],
            "num_cases": len(m["cases"]),
            "num_slices": len(self),
            "num_abnormal_slices": int(np.count_nonzero(self.has_abnormal)),
            "created": dict(m["created"]),
            "modified_utc": m["modified_utc"],
            "version": m["version"],
            "size_bytes": size + (self._path / MANIFEST).stat().st_size,
        }

    def verify(self) -> None:
        """Recompute every array file's sha256; IntegrityError names the first file that does not match."""
        vdir = self._path / self._manifest["current"]
        for name in _ALL_ARRAYS:
            fpath = vdir / f"{name}.npy"
            if not fpath.is_file():
                raise IntegrityError(f"{fpath} is missing; {REBUILD_HINT}")
            if sha256_file(fpath) != self._manifest["files"][name]["sha256"]:
                raise IntegrityError(
                    f"{fpath} does not match the hash recorded in {self._path / MANIFEST} "
                    f"(corrupted or modified); {REBUILD_HINT}"
                )

    # ------------------------------------------------------------------ mutation
    def _check_case(self, c: CaseCodes) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
        """Validate one case's arrays against this database; return them in stored form."""
        if not isinstance(c.case_id, str) or not c.case_id or c.case_id != c.case_id.strip():
            raise DataError(
                f"{self._path}: case id must be a non-empty string without edge spaces: {c.case_id!r}"
            )
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
            grids.append(a.reshape(a.shape[0], h * w).astype(np.uint16))
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
            sl = sl.astype(np.int32)
        return grids[0], grids[1], flags.astype(np.bool_), sl, validate_source(c.case_id, c.source)

    def add_case(
        self,
        case_id: str,
        normal: np.ndarray,
        abnormal: np.ndarray,
        has_abnormal: np.ndarray,
        source: Mapping[str, Any],
        slice_indices: np.ndarray | None = None,
    ) -> None:
        """Add one case (grids (S, h, w) uint16, flags (S,) bool); written atomically."""
        self.add_cases([CaseCodes(case_id, normal, abnormal, has_abnormal, source, slice_indices)])

    def add_cases(self, cases: Iterable[CaseCodes], progress: Progress | None = None) -> None:
        """Add many cases with a single atomic rewrite. Nothing is written if any case is invalid."""
        cases = list(cases)
        seen: set[str] = set()
        checked = []
        for i, c in enumerate(cases):
            if progress is not None:
                progress.update(i, len(cases), "checking cases")
            if not isinstance(c, CaseCodes):
                raise DataError(f"add_cases expects CaseCodes items, got {type(c).__name__}")
            if c.case_id in self._case_index:
                raise DataError(
                    f"{self._path}: case {c.case_id!r} is already in the database; "
                    "remove it first (remove_case / `fdn index remove`) to replace it"
                )
            if c.case_id in seen:
                raise DataError(f"case {c.case_id!r} is given twice in one add")
            seen.add(c.case_id)
            checked.append((c.case_id, *self._check_case(c)))
        if not checked:
            return
        a = self._arrays
        n = len(self)
        new_cases = [dict(c) for c in self._manifest["cases"]]
        for cid, nor, _abn, _flags, _sl, src in checked:
            new_cases.append({"case_id": cid, "start": n, "stop": n + nor.shape[0], "source": src})
            n += nor.shape[0]
        arrays = {
            "normal_codes": np.concatenate([a["normal_codes"], *(x[1] for x in checked)]),
            "abnormal_codes": np.concatenate([a["abnormal_codes"], *(x[2] for x in checked)]),
            "has_abnormal": np.concatenate([a["has_abnormal"], *(x[3] for x in checked)]),
            "slice_indices": np.concatenate([a["slice_indices"], *(x[4] for x in checked)]),
            "codebook_normal": np.asarray(a["codebook_normal"]),
            "codebook_abnormal": np.asarray(a["codebook_abnormal"]),
        }
        if progress is not None:
            progress.update(len(cases), len(cases), "writing database")
        self._commit(arrays, new_cases)

    def remove_case(self, case_id: str) -> None:
        """Remove one case's rows; written atomically."""
        self.remove_cases([case_id])

    def remove_cases(self, case_ids: Sequence[str]) -> None:
        """Remove several cases in a single atomic rewrite."""
        drop = {self._lookup(cid) for cid in case_ids}
        keep = np.ones(len(self), dtype=bool)
        new_cases = []
        n = 0
        for i, c in enumerate(self._manifest["cases"]):
            if i in drop:
                keep[c["start"] : c["stop"]] = False
            else:
                size = c["stop"] - c["start"]
                new_cases.append({**c, "start": n, "stop": n + size})
                n += size
        arrays = {name: np.asarray(self._arrays[name])[keep] for name in _ROW_ARRAYS}
        arrays["codebook_normal"] = np.asarray(self._arrays["codebook_normal"])
        arrays["codebook_abnormal"] = np.asarray(self._arrays["codebook_abnormal"])
        self._commit(arrays, new_cases)

    def _commit(self, arrays: dict[str, np.ndarray], cases: list[dict[str, Any]]) -> None:
        """Write ``arrays`` as a new version, swap the manifest to it, reopen, and sweep old versions."""
        # A number above every version folder present (current, or litter of a crashed write), so the
        # rename below never touches the folder the current manifest points to.
        present = [int(m.group(1)) for e in self._path.iterdir() if (m := _VERSION_RE.match(e.name))]
        version = max([int(self._manifest["version"]), *present]) + 1
        vname = f"v{version:06d}"
        tmp = self._path / f".tmp-{vname}-{uuid.uuid4().hex[:8]}"
        final = self._path / vname
        committed = False
        try:
            tmp.mkdir()
            files = {name: _save_array(tmp / f"{name}.npy", arrays[name]) for name in _ALL_ARRAYS}
            _fsync_dir(tmp)
            os.replace(tmp, final)
            _fsync_dir(self._path)
            manifest = {
                **self._manifest,
                "version": version,
                "current": vname,
                "modified_utc": _now(),
                "num_slices": int(arrays["normal_codes"].shape[0]),
                "cases": cases,
                "files": files,
            }
            atomic_write_json(self._path / MANIFEST, manifest)
            committed = True
        finally:
            if not committed:
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.rmtree(final, ignore_errors=True)
        reopened = CodeDatabase.open(self._path, verify=False)
        self._manifest, self._arrays = reopened._manifest, reopened._arrays
        self._case_index = reopened._case_index
        self._case_ids = None
        self._sweep()

    def _sweep(self) -> None:
        """Delete version folders and temporaries other than the current one (best effort: a folder still
        memory-mapped elsewhere on Windows is left for a later sweep)."""
        current = self._manifest["current"]
        for entry in self._path.iterdir():
            if entry.name == current or not entry.is_dir():
                continue
            if _VERSION_RE.match(entry.name) or entry.name.startswith(".tmp-v"):
                shutil.rmtree(entry, ignore_errors=True)
