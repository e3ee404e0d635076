"""On-disk cache of preprocessed axial slices, read through memory maps.

A cache folder holds plain ``.npy`` arrays (no pickle anywhere; read with ``allow_pickle=False``)

- ``images.npy``  float16 (default) or float32 ``(N, 4, S, S)``: z-scored, padded and resized slices;
- ``seg.npy``     uint8 ``(N, S, S)``: classes 0..3 (zeros for a case without segmentation);
- ``anat.npy``    uint8 ``(N, S, S)``: anatomy labels 0..6 (zeros for a case without them);

and ``index.json``: the settings, the source fingerprint (relative path, size and mtime of every source file),
one entry per case (rows ``start:stop``, original shape, spacing, canonical affine, ``SliceGeometry``,
has_seg / has_anat), and per slice its case (position in ``cases``), slice index and abnormal flag.

``SliceCache.build_or_open`` reuses a cache whose settings and sources are unchanged and rebuilds it
otherwise; building happens in a temporary folder renamed into place (``fdn_core.fileio.atomic_dir``), so an
interrupted build leaves the previous cache (or nothing) behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fdn_core.config import config_from_dict, config_to_dict
from fdn_core.data.preprocess import PreprocessConfig, SliceGeometry, SliceStack, volume_to_slices
from fdn_core.data.readers import (
    CaseFiles,
    CaseProblem,
    CaseVolume,
    canonical_shape,
    find_cases,
    load_case,
    parallel_map,
)
from fdn_core.errors import DataError, FDNError
from fdn_core.fileio import atomic_dir, atomic_write_bytes
from fdn_core.progress import Progress

__all__ = ["CACHE_FORMAT", "CachedCase", "SliceCache", "source_fingerprint"]

log = logging.getLogger(__name__)

#: Version of the folder layout; a cache of another version is rebuilt.
CACHE_FORMAT = 1
_IMAGE_DTYPES = ("float16", "float32")
_ARRAYS = ("images", "seg", "anat")


@dataclass(frozen=True)
class CachedCase:
    """Where one case's slices are in the cache and how to map them back onto its volume."""

    case_id: str
    layout: str
    start: int
    stop: int
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    affine: np.ndarray
    geometry: SliceGeometry
    has_seg: bool
    has_anat: bool
    n_abnormal: int

    @property
    def rows(self) -> range:
        """Cache rows of this case, in slice order (row ``start + k`` is axial slice ``k``)."""
        return range(self.start, self.stop)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form stored in index.json."""
        return {
            "case_id": self.case_id,
            "layout": self.layout,
            "start": self.start,
            "stop": self.stop,
            "shape": list(self.shape),
            "spacing": list(self.spacing),
            "affine": np.asarray(self.affine).tolist(),
            "geometry": self.geometry.to_dict(),
            "has_seg": self.has_seg,
            "has_anat": self.has_anat,
            "n_abnormal": self.n_abnormal,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CachedCase:
        """Inverse of ``to_dict``."""
        return cls(
            case_id=str(d["case_id"]),
            layout=str(d["layout"]),
            start=int(d["start"]),
            stop=int(d["stop"]),
            shape=tuple(int(v) for v in d["shape"]),  # type: ignore[arg-type]
            spacing=tuple(float(v) for v in d["spacing"]),  # type: ignore[arg-type]
            affine=np.asarray(d["affine"], dtype=np.float64),
            geometry=SliceGeometry.from_dict(d["geometry"]),
            has_seg=bool(d["has_seg"]),
            has_anat=bool(d["has_anat"]),
            n_abnormal=int(d["n_abnormal"]),
        )


def source_fingerprint(cases: list[CaseFiles], data_dir: str | Path) -> dict[str, Any]:
    """Relative path, size and mtime (ns) of every source file, plus their sha256 digest.

    Sizes and mtimes (not content hashes) keep opening a large cache cheap; rewriting a file changes them.
    """
    root = Path(data_dir).resolve()
    files = []
    for case in cases:
        for path in case.all_paths():
            resolved = path.resolve()
            try:
                rel = str(resolved.relative_to(root))
            except ValueError:
                rel = str(resolved)
            st = resolved.stat()
            files.append([rel, int(st.st_size), int(st.st_mtime_ns)])
    files.sort()
    digest = hashlib.sha256(json.dumps(files, separators=(",", ":")).encode("utf-8")).hexdigest()
    return {"sha256": digest, "files": files}


def _settings(cfg: PreprocessConfig, image_dtype: str) -> dict[str, Any]:
    return {"format": CACHE_FORMAT, "preprocess": config_to_dict(cfg), "image_dtype": image_dtype}


class SliceCache:
    """A built slice cache: memory-mapped ``images`` / ``seg`` / ``anat`` plus the index (see module doc).

    Attributes: ``path``, ``config`` (PreprocessConfig), ``image_dtype``, ``images``, ``seg``, ``anat``,
    ``slice_case`` (int32 (N,), position in ``case_ids``), ``slice_index`` (int32 (N,)), ``abnormal``
    (bool (N,)), ``case_ids`` (list, cache order), ``cases`` (case id -> CachedCase), ``skipped`` (problems
    of cases left out with ``skip_bad``) and ``rebuilt`` (whether the call that returned it built it).
    """

    images: np.ndarray
    seg: np.ndarray
    anat: np.ndarray

    def __init__(self, path: str | Path, rebuilt: bool = False) -> None:
        self.path = Path(path)
        self.rebuilt = rebuilt
        index_path = self.path / "index.json"
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise DataError(
                f"{self.path}: not a slice cache (no index.json); build it with build_or_open"
            ) from exc
        except (OSError, ValueError) as exc:
            raise DataError(
                f"{index_path}: unreadable ({exc}); delete the cache folder to rebuild it"
            ) from exc
        try:
            self._load(index)
        except (KeyError, TypeError, ValueError, OSError) as exc:
            if isinstance(exc, FDNError):
                raise
            raise DataError(
                f"{self.path}: damaged slice cache ({type(exc).__name__}: {exc}); "
                "delete the folder to rebuild it"
            ) from exc

    def _load(self, index: dict[str, Any]) -> None:
        self.index = index
        settings = index["settings"]
        if settings.get("format") != CACHE_FORMAT:
            raise DataError(
                f"{self.path}: cache format {settings.get('format')} is not {CACHE_FORMAT}; rebuild it"
            )
        self.config = config_from_dict(
            PreprocessConfig, settings["preprocess"], where=f"{self.path}/index.json"
        )
        self.image_dtype = str(settings["image_dtype"])
        self.cases = {c["case_id"]: CachedCase.from_dict(c) for c in index["cases"]}
        self.case_ids = list(self.cases)
        self.skipped = [CaseProblem(p["case_id"], None, p["message"]) for p in index.get("skipped", [])]
        slices = index["slices"]
        self.slice_case = np.asarray(slices["case"], dtype=np.int32)
        self.slice_index = np.asarray(slices["slice_index"], dtype=np.int32)
        self.abnormal = np.asarray(slices["abnormal"], dtype=bool)
        n, s = int(index["n_slices"]), self.config.image_size
        expected = {
            "images": ((n, 4, s, s), self.image_dtype),
            "seg": ((n, s, s), "uint8"),
            "anat": ((n, s, s), "uint8"),
        }
        for name, (shape, dtype) in expected.items():
            arr = np.load(self.path / f"{name}.npy", mmap_mode="r", allow_pickle=False)
            if arr.shape != shape or arr.dtype != np.dtype(dtype):
                raise DataError(
                    f"{self.path / (name + '.npy')}: holds {arr.dtype} {arr.shape}, index.json says "
                    f"{dtype} {shape}; the cache is damaged: delete the folder to rebuild it"
                )
            setattr(self, name, arr)
        if not (len(self.slice_case) == len(self.slice_index) == len(self.abnormal) == n):
            raise DataError(
                f"{self.path}/index.json: per-slice lists do not have {n} entries; rebuild the cache"
            )

    # -------------------------------------------------------------------------------------------- access

    def __len__(self) -> int:
        return int(self.index["n_slices"])

    def __getstate__(self) -> dict[str, Any]:
        # Memory maps are reopened by path in the receiving process (a DataLoader worker) instead of copied.
        return {"path": str(self.path), "rebuilt": self.rebuilt}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["rebuilt"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return (
            f"SliceCache({str(self.path)!r}, cases={len(self.case_ids)}, slices={len(self)}, "
            f"image_size={self.config.image_size}, dtype={self.image_dtype})"
        )

    def case(self, case_id: str) -> CachedCase:
        """The index entry of ``case_id``."""
        try:
            return self.cases[case_id]
        except KeyError:
            raise DataError(
                f"case {case_id!r} is not in slice cache {self.path}; known cases: {len(self.cases)}"
            ) from None

    def stack(self, case_id: str) -> SliceStack:
        """All slices of one case as arrays in memory (images float32)."""
        c = self.case(case_id)
        return SliceStack(
            images=np.asarray(self.images[c.start : c.stop], dtype=np.float32),
            seg=np.array(self.seg[c.start : c.stop]) if c.has_seg else None,
            anat=np.array(self.anat[c.start : c.stop]) if c.has_anat else None,
            geometry=c.geometry,
            voxel_ml=c.geometry.voxel_ml(c.spacing),
        )

    def stale_reason(
        self, cfg: PreprocessConfig, image_dtype: str, fingerprint: dict[str, Any]
    ) -> str | None:
        """Why this cache does not match these settings and sources (None when it does)."""
        if self.index.get("settings") != _settings(cfg, image_dtype):
            return f"settings changed ({self.index.get('settings')} -> {_settings(cfg, image_dtype)})"
        source = self.index.get("source") or {}
        if source.get("sha256") != fingerprint["sha256"]:
            old = {f[0]: f[1:] for f in source.get("files", [])}
            new = {f[0]: f[1:] for f in fingerprint["files"]}
            changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
            return f"{len(changed)} source file(s) added, removed or modified (e.g. {changed[0]})"
        return None

    # ------------------------------------------------------------------------------------------ building

    @classmethod
    def open(cls, cache_dir: str | Path) -> SliceCache:
        """Open an existing cache without checking its sources (e.g. when the data folder is not at hand)."""
        return cls(cache_dir)

    @classmethod
    def build_or_open(
        cls,
        data_dir: str | Path,
        cache_dir: str | Path,
        cfg: PreprocessConfig,
        progress: Progress | None = None,
        *,
        image_dtype: str = "float16",
        skip_bad: bool = False,
        workers: int | None = None,
    ) -> SliceCache:
        """Open the cache at ``cache_dir`` if it was built from the current ``data_dir`` files with these
        settings, else (re)build it. ``skip_bad`` leaves bad cases out (logged, listed in ``skipped``)
        instead of failing; ``workers`` threads read cases in parallel (default: up to 2)."""
        if image_dtype not in _IMAGE_DTYPES:
            raise DataError(f"image_dtype {image_dtype!r}: use one of {_IMAGE_DTYPES}")
        data_dir, cache_dir = Path(data_dir), Path(cache_dir)
        if cache_dir.resolve() == data_dir.resolve():
            raise DataError(
                f"{cache_dir}: the slice cache cannot be the data folder itself; choose another folder"
            )
        cases = find_cases(data_dir, skip_bad=skip_bad)
        fingerprint = source_fingerprint(cases, data_dir)
        if (cache_dir / "index.json").exists():
            try:
                cache = cls(cache_dir)
                reason = cache.stale_reason(cfg, image_dtype, fingerprint)
            except DataError as exc:
                cache, reason = None, f"unusable ({exc})"
            if cache is not None and reason is None:
                if cache.skipped and not skip_bad:
                    listing = "\n".join(f"  - {p}" for p in cache.skipped)
                    raise DataError(
                        f"{len(cache.skipped)} case(s) of {data_dir} cannot be read:\n{listing}\n"
                        "fix these files, or skip the bad cases explicitly (skip_bad=True)"
                    )
                return cache
            log.info("rebuilding slice cache %s: %s", cache_dir, reason)
        elif cache_dir.exists() and any(cache_dir.iterdir()):
            raise DataError(
                f"{cache_dir}: folder exists, is not empty and is not a slice cache (no index.json); "
                "choose a new or empty folder for the cache"
            )
        return cls._build(
            cases, data_dir, cache_dir, cfg, fingerprint, progress, image_dtype, skip_bad, workers
        )

    @classmethod
    def _build(
        cls,
        cases: list[CaseFiles],
        data_dir: Path,
        cache_dir: Path,
        cfg: PreprocessConfig,
        fingerprint: dict[str, Any],
        progress: Progress | None,
        image_dtype: str,
        skip_bad: bool,
        workers: int | None,
    ) -> SliceCache:
        s = cfg.image_size
        depth = [canonical_shape(c)[2] for c in cases]
        total_rows = int(sum(depth))
        entries: list[dict[str, Any]] = []
        skipped: list[dict[str, Any]] = []
        slice_case: list[int] = []
        slice_index: list[int] = []
        abnormal: list[int] = []
        n_workers = workers if workers is not None else min(2, os.cpu_count() or 1)

        def work(files: CaseFiles) -> tuple[CaseVolume, SliceStack] | DataError:
            try:
                case = load_case(files)
                return case, volume_to_slices(case, cfg)
            except DataError as exc:
                return exc

        with atomic_dir(cache_dir, overwrite=True) as tmp:
            arrays = {
                "images": np.lib.format.open_memmap(
                    tmp / "images.npy", "w+", image_dtype, (total_rows, 4, s, s)
                ),
                "seg": np.lib.format.open_memmap(tmp / "seg.npy", "w+", np.uint8, (total_rows, s, s)),
                "anat": np.lib.format.open_memmap(tmp / "anat.npy", "w+", np.uint8, (total_rows, s, s)),
            }
            row = 0
            message = f"building slice cache ({s}x{s})"
            if progress is not None:
                progress.update(0, len(cases), message)
            for i, (files, loaded) in enumerate(zip(cases, parallel_map(work, cases, n_workers)), 1):
                if isinstance(loaded, DataError):
                    if not skip_bad:
                        raise loaded
                    log.warning("skipping bad case: %s", loaded)
                    skipped.append({"case_id": files.case_id, "message": str(loaded)})
                else:
                    case, stack = loaded
                    z = stack.images.shape[0]
                    arrays["images"][row : row + z] = stack.images
                    arrays["seg"][row : row + z] = 0 if stack.seg is None else stack.seg
                    arrays["anat"][row : row + z] = 0 if stack.anat is None else stack.anat
                    flags: list[bool] = (
                        [] if stack.seg is None else np.asarray(stack.seg.reshape(z, -1).any(axis=1)).tolist()
                    )
                    entry = CachedCase(
                        case_id=case.case_id,
                        layout=files.layout,
                        start=row,
                        stop=row + z,
                        shape=tuple(int(v) for v in case.image.shape[1:]),  # type: ignore[arg-type]
                        spacing=case.spacing,
                        affine=case.affine,
                        geometry=stack.geometry,
                        has_seg=stack.seg is not None,
                        has_anat=stack.anat is not None,
                        n_abnormal=int(sum(flags)),
                    )
                    slice_case += [len(entries)] * z
                    slice_index += list(range(z))
                    abnormal += [int(f) for f in flags] if flags else [0] * z
                    entries.append(entry.to_dict())
                    row += z
                if progress is not None:
                    progress.update(i, len(cases), message)
            if not entries:
                raise DataError(
                    f"{data_dir}: no case could be read; see the warnings above and fix the files"
                )
            for arr in arrays.values():
                arr.flush()
            del arrays
            if row < total_rows:  # bad cases were skipped: shrink the arrays to the rows written
                for name in _ARRAYS:
                    _truncate_rows(tmp / f"{name}.npy", row)
            index = {
                "settings": _settings(cfg, image_dtype),
                "source": {"data_dir": str(data_dir.resolve()), **fingerprint},
                "n_slices": row,
                "cases": entries,
                "skipped": skipped,
                "slices": {"case": slice_case, "slice_index": slice_index, "abnormal": abnormal},
            }
            atomic_write_bytes(tmp / "index.json", json.dumps(index, separators=(",", ":")).encode("utf-8"))
        return cls(cache_dir, rebuilt=True)

    def iter_cases(self) -> Iterator[CachedCase]:
        """Index entries in cache order."""
        return iter(self.cases.values())


def _truncate_rows(path: Path, rows: int) -> None:
    """Rewrite a .npy file keeping its first ``rows`` rows (only after cases were skipped)."""
    src = np.load(path, mmap_mode="r", allow_pickle=False)
    tmp = path.with_name(path.stem + ".part.npy")
    dst = np.lib.format.open_memmap(tmp, "w+", src.dtype, (rows, *src.shape[1:]))
    dst[:] = src[:rows]
    dst.flush()
    del dst, src
    os.replace(tmp, path)
