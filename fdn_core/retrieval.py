"""The retrieval pipeline: encode cases, build and maintain a code database, and search it.

- ``encode_case``: a loaded volume -> the code grids of every axial slice (bundle's preprocessing).
- ``index_cohort`` / ``add_cases`` / ``remove_case``: the database (``fdn_core.codes.database``) of a cohort.
  Each slice's ``has_abnormal`` flag comes from the case's tumour labels when it has them, else from the
  model's predicted segmentation. Every case records its source files so a viewer can load the volume.
  The binarised codebooks that the Hamming distance needs (``fdn_core.codes.binarize``, Algorithm A.1) are
  fitted once on the database's codebooks and stored inside the database folder, under ``hamming/``.
- ``Retriever``: ranked hits for a query slice taken from the database or from a new case, in any mode
  (normal / abnormal / sum / sum-normalised), distance (euclidean / angular / hamming), slice- or volume-wise,
  with composite queries (normal codes of one slice, abnormal codes of another) and own-volume exclusion.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fdn_core.codes.binarize import BinaryCodes, fit_binary_codes
from fdn_core.codes.database import CaseCodes, CodeDatabase
from fdn_core.codes.search import Hit, Query, SearchEngine
from fdn_core.data.preprocess import SliceStack, volume_to_slices
from fdn_core.data.readers import CaseFiles, CaseVolume, find_cases, load_case
from fdn_core.errors import DataError
from fdn_core.fileio import atomic_dir
from fdn_core.labels import DISTANCES, normalize_mode
from fdn_core.model.bundle import EncodedSlices, InferenceBundle
from fdn_core.progress import Progress

__all__ = [
    "HAMMING_DIR",
    "QuerySlice",
    "Retriever",
    "add_cases",
    "encode_case",
    "encode_case_stack",
    "fit_hamming_codes",
    "index_cohort",
    "load_hamming_codes",
    "parse_case_slice",
    "remove_case",
    "save_bundle_hamming_codes",
]

log = logging.getLogger(__name__)

#: Folder inside a database that holds the binarised codebooks (``normal.*`` and ``abnormal.*``).
HAMMING_DIR = "hamming"


# -------------------------------------------------------------------------------------------- encoding


def encode_case_stack(
    bundle: InferenceBundle, case: CaseVolume, batch_size: int | None = None, progress: Progress | None = None
) -> tuple[SliceStack, EncodedSlices]:
    """Preprocess ``case`` with the bundle's settings and encode every axial slice; returns both."""
    stack = volume_to_slices(case, bundle.preprocess)
    if stack.images.shape[0] == 0:
        raise DataError(f"case {case.case_id}: the volume has no axial slices")
    return stack, bundle.encode_slices(stack.images, batch_size=batch_size, progress=progress)


def encode_case(
    bundle: InferenceBundle, case: CaseVolume, batch_size: int | None = None, progress: Progress | None = None
) -> EncodedSlices:
    """Code grids (and predicted tumour classes) of every axial slice of ``case``."""
    return encode_case_stack(bundle, case, batch_size, progress)[1]


def _has_abnormal(stack: SliceStack, encoded: EncodedSlices) -> np.ndarray:
    """Per slice: tumour labels > 0 when the case has labels, else the model's predicted segmentation."""
    seg = stack.seg if stack.seg is not None else encoded.seg
    return (seg.reshape(seg.shape[0], -1) > 0).any(axis=1)


# --------------------------------------------------------------------------------------------- hamming


def fit_hamming_codes(
    db: CodeDatabase,
    progress: Progress | None = None,
    save: bool = True,
    bundle_dir: str | Path | None = None,
    usage: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[BinaryCodes, BinaryCodes]:
    """Binarise and shorten both codebooks of ``db`` (Algorithm A.1); with ``save`` store them in
    ``db/hamming`` (a read-only database keeps them in memory only, with a warning).

    The codes depend only on the codebooks: when ``bundle_dir/hamming`` holds codes fitted on exactly these
    codebooks (``fdn export`` / ``save_bundle_hamming_codes``), they are reused instead of fitted again.
    ``usage``: the (normal, abnormal) selection counts the bundle recorded in training
    (``InferenceBundle.code_usage()``); codes never selected are left out of the fit (see
    ``fdn_core.codes.binarize``). None: every code takes part, as in the paper.
    """
    out = None if bundle_dir is None else _stored_codes(Path(bundle_dir) / HAMMING_DIR, db)
    if out is None:
        out = []
        books = (("normal", db.codebook_normal), ("abnormal", db.codebook_abnormal))
        for i, (name, book) in enumerate(books):
            counts = None if usage is None else usage[i]
            codes = fit_binary_codes(np.asarray(book), progress, usage_counts=counts)
            log.info("%s codebook binarised: %s", name, codes.report.summary())
            out.append(codes)
    if save:
        try:
            for name, codes in zip(("normal", "abnormal"), out):
                codes.save(db.path / HAMMING_DIR, name=name)
        except OSError as exc:
            log.warning(
                "cannot store the binary codes in %s (%s); they are kept in memory only", db.path, exc
            )
    return out[0], out[1]


def save_bundle_hamming_codes(bundle: InferenceBundle, progress: Progress | None = None) -> Path:
    """Fit the binary codes of ``bundle``'s codebooks once and store them in ``bundle.path/hamming`` so every
    database built with this model reuses them (fitting takes minutes for K = 512). Codes the bundle's
    training never selected (``code_usage``) are left out of the fit."""
    folder = bundle.path / HAMMING_DIR
    usage = bundle.code_usage()
    for i, (name, book) in enumerate(zip(("normal", "abnormal"), bundle.codebooks())):
        counts = None if usage is None else usage[i]
        codes = fit_binary_codes(np.asarray(book), progress, usage_counts=counts)
        log.info("%s codebook binarised: %s", name, codes.report.summary())
        codes.save(folder, name=name)
    return folder


def _stored_codes(folder: Path, db: CodeDatabase, strict: bool = False) -> list[BinaryCodes] | None:
    """Binary codes stored in ``folder`` for exactly ``db``'s codebooks; None when there are none (or, unless
    ``strict``, when they belong to other codebooks; ``strict`` raises DataError then)."""
    if not (folder / "normal.json").is_file() or not (folder / "abnormal.json").is_file():
        return None
    out = []
    for name, book in (("normal", db.codebook_normal), ("abnormal", db.codebook_abnormal)):
        codes = BinaryCodes.load(folder, name=name)
        if not codes.matches(np.asarray(book)):
            if strict:
                raise DataError(
                    f"{folder / name}.json: these binary codes were fitted on another codebook than the "
                    "database's; rebuild the database (fdn index build --overwrite)"
                )
            log.warning("%s: binary codes of other codebooks; fitting new ones", folder / name)
            return None
        out.append(codes)
    return out


def load_hamming_codes(db: CodeDatabase) -> tuple[BinaryCodes, BinaryCodes] | None:
    """The stored binarised codebooks of ``db`` (hashes verified), or None when there are none.

    Raises IntegrityError when a file is damaged and DataError when the codes were fitted on other codebooks.
    """
    out = _stored_codes(db.path / HAMMING_DIR, db, strict=True)
    return None if out is None else (out[0], out[1])


# -------------------------------------------------------------------------------------------- indexing


def _prepared_cases(
    bundle: InferenceBundle, files: Sequence[CaseFiles], workers: int
) -> Iterator[tuple[CaseFiles, SliceStack]]:
    """Yield ``(files, slices)`` in order while up to ``workers`` threads load and preprocess the next cases
    (reading and decompressing NIfTI files, not the encoder, is what limits indexing on a GPU)."""

    def prepare(f: CaseFiles) -> tuple[CaseFiles, SliceStack]:
        return f, volume_to_slices(load_case(f), bundle.preprocess)

    if workers <= 1:
        yield from map(prepare, files)
        return
    remaining = iter(files)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = deque(pool.submit(prepare, f) for f in itertools.islice(remaining, workers))
        while pending:
            result = pending.popleft().result()
            following = next(remaining, None)
            if following is not None:
                pending.append(pool.submit(prepare, following))
            yield result


def _encode_cases(
    bundle: InferenceBundle,
    files: Sequence[CaseFiles],
    batch_size: int | None,
    progress: Progress | None,
    message: str,
    workers: int = 2,
) -> list[CaseCodes]:
    out = []
    if progress is not None:
        progress.update(0, len(files), message)
    for i, (f, stack) in enumerate(_prepared_cases(bundle, files, workers), 1):
        if stack.images.shape[0] == 0:
            raise DataError(f"case {f.case_id}: the volume has no axial slices")
        enc = bundle.encode_slices(stack.images, batch_size=batch_size)
        out.append(
            CaseCodes(
                case_id=f.case_id,
                normal=enc.normal,
                abnormal=enc.abnormal,
                has_abnormal=_has_abnormal(stack, enc),
                source=f.to_source(),
                slice_indices=np.arange(enc.normal.shape[0], dtype=np.int32),
            )
        )
        if progress is not None:
            progress.update(i, len(files), message)
    return out


def _select_cases(
    all_cases: Sequence[CaseFiles], wanted: Sequence[str] | None, data_dir: Path
) -> list[CaseFiles]:
    if wanted is None:
        return list(all_cases)
    by_id = {c.case_id: c for c in all_cases}
    unknown = [c for c in wanted if c not in by_id]
    if unknown:
        raise DataError(
            f"{data_dir}: no case(s) {unknown}; available cases include {sorted(by_id)[:10]} "
            "(use `fdn inspect` to list them)"
        )
    return [by_id[c] for c in dict.fromkeys(wanted)]


def index_cohort(
    bundle: InferenceBundle,
    data_dir: str | Path,
    db_path: str | Path,
    cases: Sequence[str] | None = None,
    progress: Progress | None = None,
    overwrite: bool = False,
    batch_size: int | None = None,
    fit_hamming: bool = True,
    workers: int = 2,
) -> CodeDatabase:
    """Encode every case of ``data_dir`` (or the named ``cases``) into a new database at ``db_path``.

    The database is built in a temporary folder beside ``db_path`` and moved into place only when complete,
    so an interruption (or a cancel) leaves any previous database untouched. An existing database is replaced
    only with ``overwrite``; a folder that is not a database is never replaced. ``workers`` threads load the
    next cases while the model encodes the current one.
    """
    data_dir, db_path = Path(data_dir), Path(db_path)
    if db_path.exists():
        if not overwrite:
            raise DataError(
                f"{db_path} already exists; pass overwrite (CLI: --overwrite) to rebuild it, "
                "or add cases to it with `fdn index add`"
            )
        if not db_path.is_dir() or (any(db_path.iterdir()) and not (db_path / "manifest.json").is_file()):
            raise DataError(f"{db_path} exists and is not a code database; refusing to replace it")
    files = _select_cases(find_cases(data_dir), cases, data_dir)
    h, w = bundle.grid_shape
    normal_book, abnormal_book = bundle.codebooks()
    with atomic_dir(db_path, overwrite=overwrite) as tmp:
        db = CodeDatabase.create(
            tmp,
            fingerprint=bundle.fingerprint,
            codebook_normal=normal_book,
            codebook_abnormal=abnormal_book,
            grid_shape=(h, w),
        )
        if fit_hamming:
            fit_hamming_codes(db, progress, bundle_dir=bundle.path, usage=bundle.code_usage())
        db.add_cases(_encode_cases(bundle, files, batch_size, progress, "Indexing cases", workers))
    return CodeDatabase.open(db_path, expected_fingerprint=bundle.fingerprint, verify=False)


def add_cases(
    bundle: InferenceBundle,
    db_path: str | Path,
    data_dir: str | Path,
    cases: Sequence[str] | None = None,
    progress: Progress | None = None,
    batch_size: int | None = None,
    workers: int = 2,
) -> list[str]:
    """Encode and add cases of ``data_dir`` to an existing database; returns the ids added.

    Without ``cases``, every case of ``data_dir`` not yet in the database is added. Naming a case that is
    already in the database is an error (remove it first to re-index it).
    """
    data_dir = Path(data_dir)
    db = CodeDatabase.open(db_path, expected_fingerprint=bundle.fingerprint)
    all_cases = find_cases(data_dir)
    if cases is None:
        files = [c for c in all_cases if c.case_id not in db]
    else:
        files = _select_cases(all_cases, cases, data_dir)
        present = [c.case_id for c in files if c.case_id in db]
        if present:
            raise DataError(
                f"{db.path}: case(s) {present} are already in the database; remove them first "
                "(fdn index remove) to re-index them"
            )
    if not files:
        return []
    db.add_cases(_encode_cases(bundle, files, batch_size, progress, "Adding cases", workers))
    return [f.case_id for f in files]


def remove_case(db_path: str | Path, case_id: str) -> None:
    """Remove one case's slices from the database at ``db_path`` (atomically)."""
    db = CodeDatabase.open(db_path)
    if case_id not in db:
        raise DataError(f"{db.path}: no case {case_id!r} in this database; `fdn index info` lists the cases")
    db.remove_case(case_id)


# ------------------------------------------------------------------------------------------- searching


def parse_case_slice(text: str) -> tuple[str, int]:
    """``"CASE:SLICE"`` -> (case id, slice index)."""
    case, sep, index = str(text).rpartition(":")
    if not sep or not case or not index.strip().lstrip("-").isdigit():
        raise DataError(f"{text!r} is not CASE:SLICE (e.g. BraTS19_001:72)")
    k = int(index)
    if k < 0:
        raise DataError(f"{text!r}: the slice index must be >= 0")
    return case, k


@dataclass
class QuerySlice:
    """A query's codes and where they came from. ``case`` is set when the slice was encoded from a volume
    (not read from the database), so callers can show it without loading it again."""

    case_id: str
    slice_index: int
    normal: np.ndarray
    abnormal: np.ndarray
    in_database: bool
    case: CaseVolume | None = None


class Retriever:
    """Search one code database with one model. Built with ``Retriever.open``, which refuses a model whose
    fingerprint differs from the database's (``ModelMismatchError``). The Hamming codes are read from the
    database; a database without them gets them fitted (and stored) on the first Hamming search."""

    def __init__(
        self,
        db: CodeDatabase,
        bundle: InferenceBundle | None = None,
        hamming: tuple[BinaryCodes, BinaryCodes] | None = None,
    ) -> None:
        self.db = db
        self.bundle = bundle
        self.hamming = hamming
        bits = None if hamming is None else (hamming[0].bits, hamming[1].bits)
        self.engine = SearchEngine.from_database(db, hamming_bits=bits)

    @classmethod
    def open(
        cls, db_path: str | Path, bundle: InferenceBundle | None = None, verify: bool = True
    ) -> Retriever:
        """Open the database (checking every file's hash when ``verify``) and its stored binary codes."""
        expected = None if bundle is None else bundle.fingerprint
        db = CodeDatabase.open(db_path, expected_fingerprint=expected, verify=verify)
        return cls(db, bundle, load_hamming_codes(db))

    def ensure_hamming(self, progress: Progress | None = None) -> None:
        """Make the Hamming distance available: fit (and store) the binary codes if the database has none."""
        if self.hamming is None:
            log.info("%s has no binary codes yet; fitting them once (Algorithm A.1)", self.db.path)
            usage = None if self.bundle is None else self.bundle.code_usage()
            self.hamming = fit_hamming_codes(self.db, progress, usage=usage)
            bits = (self.hamming[0].bits, self.hamming[1].bits)
            self.engine = SearchEngine.from_database(self.db, hamming_bits=bits)

    def slice_from_database(self, case_id: str, slice_index: int) -> QuerySlice:
        """The stored codes of one database slice."""
        row = self.engine.row_of(case_id, int(slice_index))
        h, w = self.db.grid_shape
        return QuerySlice(
            case_id,
            int(slice_index),
            np.asarray(self.db.normal_codes[row]).reshape(h, w),
            np.asarray(self.db.abnormal_codes[row]).reshape(h, w),
            in_database=True,
        )

    def slice_from_case(
        self, case: CaseVolume, slice_index: int, batch_size: int | None = None
    ) -> QuerySlice:
        """Encode one axial slice of a loaded volume with the bundle."""
        if self.bundle is None:
            raise DataError("encoding a new case needs the model bundle; open the Retriever with a bundle")
        z = case.image.shape[-1]
        if not 0 <= slice_index < z:
            raise DataError(f"case {case.case_id}: slice {slice_index} is outside 0..{z - 1}")
        stack = volume_to_slices(case, self.bundle.preprocess)
        enc = self.bundle.encode_slices(stack.images[slice_index : slice_index + 1], batch_size=batch_size)
        return QuerySlice(
            case.case_id,
            int(slice_index),
            enc.normal[0],
            enc.abnormal[0],
            in_database=case.case_id in self.db,
            case=case,
        )

    def search(
        self,
        query: QuerySlice,
        *,
        mode: str = "sum",
        distance: str = "euclidean",
        top: int = 10,
        slice_wise: bool = False,
        abnormal_from: QuerySlice | None = None,
        exclude_cases: Sequence[str] = (),
    ) -> list[Hit]:
        """Ranked hits for ``query``. ``abnormal_from`` makes a composite query (the abnormal codes of another
        slice). The query's own volume (and ``abnormal_from``'s) is never returned, nor ``exclude_cases``."""
        if distance not in DISTANCES:
            raise DataError(f"unknown distance {distance!r}; choose one of {list(DISTANCES)}")
        if distance == "hamming":
            self.ensure_hamming()
        abnormal = query.abnormal if abnormal_from is None else abnormal_from.abnormal
        excluded = [query.case_id, *exclude_cases]
        if abnormal_from is not None:
            excluded.append(abnormal_from.case_id)
        q = Query(normal=query.normal, abnormal=abnormal, exclude_cases=tuple(dict.fromkeys(excluded)))
        return self.engine.search(
            q,
            distance=distance,
            mode=normalize_mode(mode),
            top=int(top),
            per="slice" if slice_wise else "volume",
        )
