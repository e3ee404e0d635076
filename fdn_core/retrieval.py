"""The retrieval pipeline: encode cases, build and maintain a code database, and search it.

- ``encode_case``: a loaded volume -> the code grids of every axial slice (bundle's preprocessing).
- ``index_cohort`` / ``add_cases`` / ``remove_case``: the database (``fdn_core.codes.database``) of a cohort.
  Each slice's ``has_abnormal`` flag comes from the case's tumour labels when it has them, else from the
  model's predicted segmentation without lesions under ``labels.MIN_LESION_ML``. Every case records its
  source files so a viewer can load the volume.
  The binarised codebooks that the Hamming distance needs (``fdn_core.codes.binarize``, Algorithm A.1) are
  fitted once on the database's codebooks and stored inside the database folder, under ``hamming/``.
- ``Retriever``: ranked hits for a query slice taken from the database or from a new case, in any mode
  (normal / abnormal / sum / sum-normalised), distance (euclidean / angular / hamming), slice- or volume-wise,
  with composite queries (normal codes of one slice, abnormal codes of another), own-volume exclusion and a
  lesion filter on the references (any slice, only slices without a lesion, only slices with one).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypedDict, Unpack

import numpy as np

from fdn_core.codes.binarize import BinaryCodes, fit_binary_codes
from fdn_core.codes.database import HAMMING_DIR, CaseCodes, CodeDatabase
from fdn_core.codes.identity import image_paths_of_source, same_image_paths
from fdn_core.codes.search import Hit, Query, SearchEngine
from fdn_core.data.preprocess import SliceStack, volume_to_slices
from fdn_core.data.provenance import case_fingerprint
from fdn_core.data.readers import CaseFiles, CaseVolume, find_cases, load_case, parallel_map
from fdn_core.errors import DataError
from fdn_core.fileio import describe_os_error, resolve_inside
from fdn_core.labels import DISTANCES, context_slices, normalize_mode
from fdn_core.model.bundle import EncodedSlices, InferenceBundle
from fdn_core.model.lesions import remove_small_lesions
from fdn_core.progress import Cancelled, Progress

__all__ = [
    "COMMIT_EVERY",
    "COMMIT_SECONDS",
    "HAMMING_DIR",
    "AddOptions",
    "CaseEncoder",
    "EncodedCase",
    "EncoderFailed",
    "IndexOptions",
    "IndexResult",
    "QuerySlice",
    "Retriever",
    "add_cases",
    "add_to_index",
    "build_index",
    "compact_index",
    "encode_case",
    "encode_case_stack",
    "encode_context",
    "encode_here",
    "fit_hamming_codes",
    "index_cohort",
    "load_hamming_codes",
    "parse_case_slice",
    "remove_case",
    "save_bundle_hamming_codes",
]

log = logging.getLogger(__name__)


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


def _slice_flags(seg: np.ndarray) -> np.ndarray:
    """(N,) bool: which of N label slices (N, S, S) hold a label > 0."""
    return np.asarray((seg.reshape(seg.shape[0], -1) > 0).any(axis=1), dtype=bool)


def _predicted_flags(seg: np.ndarray, voxel_ml: float | None) -> np.ndarray:
    """Per slice: the model's segmentation (Z, S, S) holds a lesion of at least ``labels.MIN_LESION_ML``
    (every predicted voxel counts where the voxel size is not known)."""
    if voxel_ml is not None and seg.size:
        seg = remove_small_lesions(seg, voxel_ml)[0]
    return _slice_flags(seg)


def _has_abnormal(stack: SliceStack, encoded: EncodedSlices) -> np.ndarray:
    """Per slice: tumour labels > 0 when the case has labels, else the model's predicted segmentation
    without its specks (``_predicted_flags``)."""
    if stack.seg is not None:
        return _slice_flags(stack.seg)
    return _predicted_flags(encoded.seg, stack.voxel_ml)


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
            with db.write_lock():  # never beside a concurrent rebuild, nor two fits at once
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
    for name in ("normal", "abnormal"):
        for suffix in (".json", ".bits.npy", ".pairs.npy"):
            resolve_inside(folder.parent, f"{folder.name}/{name}{suffix}", str(folder))
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


@dataclass
class IndexResult:
    """What an indexing run did: the database, the cases added, the cases already indexed (same image files;
    skipped), the bad cases skipped (``skip_bad``) with their problem, and whether an interrupted build was
    resumed."""

    database: CodeDatabase
    added: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    bad: list[tuple[str, str]] = field(default_factory=list)
    resumed: bool = False


@dataclass
class EncodedCase:
    """One case as an encoder hands it to the indexing loop, in the order of the cases given: indexed
    already (``note``), bad (``problem``), or encoded (``normal`` / ``abnormal`` uint16 (S, h, w) code
    grids, ``has_abnormal`` (S,) bool); ``sha`` is its content fingerprint (``case_fingerprint``)."""

    files: CaseFiles
    sha: str | None = None
    normal: np.ndarray | None = None
    abnormal: np.ndarray | None = None
    has_abnormal: np.ndarray | None = None
    note: str | None = None
    problem: str | None = None


class CaseEncoder(Protocol):
    """Where an indexing run's cases are read and encoded: yields one ``EncodedCase`` per case of
    ``files``, in that order (the database keeps that case order), skipping the cases ``db`` holds already
    (``_decide``: same image files, whatever their name) without encoding them. The default runs in this
    process (threads read ahead of the encoder); ``fdn_core.ray_index.RayEncoder`` runs on a Ray cluster."""

    def __call__(
        self,
        bundle: InferenceBundle,
        db: CodeDatabase,
        files: Sequence[CaseFiles],
        batch_size: int | None,
    ) -> Iterator[EncodedCase]:
        """Yield the encoded cases of ``files`` in order, skipping those ``db`` holds."""


class EncoderFailed(DataError):
    """An encoder stopped for a reason other than one bad case (a cluster failure, a worker that cannot
    load the model); the indexing loop commits what it holds and says how to continue."""


@dataclass
class _Prepared:
    """One case after the loader thread: skipped (``note``), bad (``problem``), or loaded (``stack``)."""

    files: CaseFiles
    sha: str | None = None
    stack: SliceStack | None = None
    note: str | None = None
    problem: str | None = None


def _case_problem(f: CaseFiles, exc: BaseException) -> str:
    """One line naming a bad case and what is wrong with it."""
    text = (
        str(exc)
        if isinstance(exc, DataError)
        else describe_os_error(exc)
        if isinstance(exc, OSError)
        else repr(exc)
    )
    return text if f.case_id in text else f"case {f.case_id}: {text}"


def _resolved_source(db: CodeDatabase, case_id: str) -> dict[str, Any]:
    """A database case's recorded source with relative paths resolved against the database folder."""
    try:
        return CaseFiles.from_database(db, case_id).to_source()
    except DataError:
        return dict(db.sources(case_id))


def _decide(db: CodeDatabase, f: CaseFiles, sha: str) -> tuple[str | None, str | None]:
    """(note, problem) for a case about to be indexed: a note when it is indexed already (same image files,
    or the same recorded files for cases indexed before fingerprints), a problem when its id is taken by
    another study; (None, None) when it is new."""
    if f.case_id in db:
        stored = db.source_fingerprint(f.case_id)
        recorded = _resolved_source(db, f.case_id)
        if stored == sha or (stored is None and same_image_paths(recorded, f.to_source())):
            return f"{f.case_id}: already indexed", None
        return None, (
            f"case {f.case_id}: {db.path} already holds a case {f.case_id!r} indexed from other image files "
            "(another study with the same name, or its files changed); remove it first "
            f"(fdn index remove --case {f.case_id}) to re-index it, or give this study another name"
        )
    twins = db.cases_with_fingerprint(sha)
    if twins:
        return f"{f.case_id}: already indexed as {twins[0]} (identical image files)", None
    return None, None


def _prepare(bundle: InferenceBundle, db: CodeDatabase, f: CaseFiles) -> _Prepared:
    """Hash one case, decide whether ``db`` needs it, and load and preprocess it if so."""
    try:
        sha = case_fingerprint(f)
        note, problem = _decide(db, f, sha)
        if note is not None or problem is not None:
            return _Prepared(f, sha, note=note, problem=problem)
        return _Prepared(f, sha, stack=volume_to_slices(load_case(f), bundle.preprocess))
    except (DataError, OSError) as exc:
        return _Prepared(f, problem=_case_problem(f, exc))


def _encode_prepared(bundle: InferenceBundle, item: _Prepared, batch_size: int | None) -> EncodedCase:
    """Encode one prepared case in this process (or pass its note / problem on)."""
    f = item.files
    if item.note is not None:
        return EncodedCase(f, item.sha, note=item.note)
    if item.problem is not None or item.stack is None:
        return EncodedCase(f, item.sha, problem=item.problem or f"case {f.case_id}: could not be loaded")
    if item.stack.images.shape[0] == 0:
        return EncodedCase(f, item.sha, problem=f"case {f.case_id}: the volume has no axial slices")
    try:
        enc = bundle.encode_slices(item.stack.images, batch_size=batch_size)
    except DataError as exc:
        return EncodedCase(f, item.sha, problem=_case_problem(f, exc))
    return EncodedCase(f, item.sha, enc.normal, enc.abnormal, _has_abnormal(item.stack, enc))


def encode_here(
    bundle: InferenceBundle, db: CodeDatabase, f: CaseFiles, batch_size: int | None = None
) -> EncodedCase:
    """Read, check against ``db`` and encode one case in this process (what the default encoder does)."""
    return _encode_prepared(bundle, _prepare(bundle, db, f), batch_size)


def _local_encoder(workers: int) -> CaseEncoder:
    """The in-process encoder: ``workers`` threads read ahead, this thread encodes."""

    def encode(
        bundle: InferenceBundle, db: CodeDatabase, files: Sequence[CaseFiles], batch_size: int | None
    ) -> Iterator[EncodedCase]:
        for item in _prepared_cases(bundle, db, files, workers):
            yield _encode_prepared(bundle, item, batch_size)

    return encode


def _prepared_cases(
    bundle: InferenceBundle, db: CodeDatabase, files: Sequence[CaseFiles], workers: int
) -> Iterator[_Prepared]:
    """Yield each case in order while up to ``workers`` threads hash, load and preprocess the next ones
    (reading and decompressing NIfTI files, not the encoder, is what limits indexing on a GPU). Cases
    already in ``db`` are not loaded; a case that cannot be read comes back with its problem."""

    def prepare(f: CaseFiles) -> _Prepared:
        return _prepare(bundle, db, f)

    yield from parallel_map(prepare, files, workers)


def _index_into(
    db: CodeDatabase,
    bundle: InferenceBundle,
    files: Sequence[CaseFiles],
    result: IndexResult,
    *,
    batch_size: int | None,
    progress: Progress | None,
    message: str,
    workers: int,
    skip_bad: bool,
    commit_every: int,
    commit_seconds: float,
    encoder: CaseEncoder | None = None,
) -> None:
    """Encode ``files`` into ``db`` (with ``encoder``; default: in this process), committing a segment
    every ``commit_every`` cases or ``commit_seconds`` seconds, so that an interruption or a bad case loses
    at most one batch (the batch is committed before a bad case's error, and before Ctrl-C / SIGTERM /
    cancel / an encoder failure propagate). This process is the only writer, under the database's lock."""
    if commit_every < 1 or commit_seconds <= 0:
        raise DataError(
            f"commit_every ({commit_every}) must be >= 1 and commit_seconds ({commit_seconds}) > 0"
        )
    pending: list[CaseCodes] = []
    last = time.monotonic()

    def flush() -> None:
        nonlocal last
        if pending:
            result.added.extend(db.add_cases(pending, if_present="skip"))
            pending.clear()
        last = time.monotonic()

    def fail(f: CaseFiles, problem: str) -> None:
        if skip_bad:
            log.warning("skipping bad case: %s", problem)
            result.bad.append((f.case_id, problem))
            return
        flush()
        kept = len(result.added) + len(result.already)
        raise DataError(
            f"{problem}\n{kept} case(s) before it are committed to {db.path} and are kept. Fix or remove "
            "this case, or skip bad cases (skip_bad=True), then run the same command again: it continues "
            "where it stopped"
        )

    if progress is not None:
        progress.update(0, len(files), message)
    stream = (encoder or _local_encoder(workers))(bundle, db, files, batch_size)
    try:
        for i, item in enumerate(stream, 1):
            f = item.files
            if item.note is not None:
                log.info("%s", item.note)
                result.already.append(f.case_id)
            elif (
                item.problem is not None
                or item.normal is None
                or item.abnormal is None
                or item.has_abnormal is None
            ):
                fail(f, item.problem or f"case {f.case_id}: could not be encoded")
            else:
                pending.append(
                    CaseCodes(
                        case_id=f.case_id,
                        normal=item.normal,
                        abnormal=item.abnormal,
                        has_abnormal=item.has_abnormal,
                        source=f.to_source(base=db.path),
                        slice_indices=np.arange(item.normal.shape[0], dtype=np.int32),
                        source_sha256=item.sha,
                    )
                )
            if len(pending) >= commit_every or (pending and time.monotonic() - last >= commit_seconds):
                flush()
            if progress is not None:
                progress.update(i, len(files), message)
        flush()
    except (KeyboardInterrupt, Cancelled):
        flush()  # keep the encoded batch; a second interrupt during this commit leaves the last commit
        raise
    except EncoderFailed as exc:
        flush()
        kept = len(result.added) + len(result.already)
        raise EncoderFailed(
            f"{exc}\n{kept} case(s) are committed to {db.path} and are kept; once the problem is fixed, run "
            "the same command again: it continues where it stopped"
        ) from exc
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()  # stop the encoder (threads, a Ray pipeline) now, not when garbage is collected


def _find(data_dir: Path, skip_bad: bool) -> tuple[list[CaseFiles], list[tuple[str, str]]]:
    """The cohort's cases and, with ``skip_bad``, the bad ones its scan found (id or path, problem)."""
    found = find_cases(data_dir, skip_bad=skip_bad)
    bad = [(p.case_id or str(p.path), str(p)) for p in getattr(found, "problems", [])]
    return list(found), bad


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


#: Default batch of an indexing run: a segment is committed after this many cases ...
COMMIT_EVERY = 16
#: ... or after this many seconds, whichever comes first.
COMMIT_SECONDS = 120.0


def build_index(
    bundle: InferenceBundle,
    data_dir: str | Path,
    db_path: str | Path,
    cases: Sequence[str] | None = None,
    progress: Progress | None = None,
    overwrite: bool = False,
    batch_size: int | None = None,
    fit_hamming: bool = True,
    workers: int = 2,
    skip_bad: bool = False,
    commit_every: int = COMMIT_EVERY,
    commit_seconds: float = COMMIT_SECONDS,
    encoder: CaseEncoder | None = None,
) -> IndexResult:
    """Encode every case of ``data_dir`` (or the named ``cases``) into a new database at ``db_path``.

    The build is staged beside any previous database (``CodeDatabase.begin_build``) and committed batch by
    batch, so an interruption keeps the encoded batches: running the same build again resumes it, skipping
    committed cases. The previous database stays what ``open`` sees until the build finishes. An existing
    database is replaced only with ``overwrite``; a folder that is not a database is never replaced. With
    ``skip_bad`` unreadable cases are reported in the result instead of stopping the build. ``encoder``
    reads and encodes the cases elsewhere (``fdn_core.ray_index.RayEncoder``: a Ray cluster); this process
    still commits them.
    """
    data_dir, db_path = Path(data_dir), Path(db_path)
    found, scan_bad = _find(data_dir, skip_bad)
    files = _select_cases(found, cases, data_dir)
    normal_book, abnormal_book = bundle.codebooks()
    staged = CodeDatabase.begin_build(
        db_path,
        fingerprint=bundle.fingerprint,
        codebook_normal=normal_book,
        codebook_abnormal=abnormal_book,
        grid_shape=bundle.grid_shape,
        overwrite=overwrite,
        data=str(data_dir),
        cases=None if cases is None else list(cases),
    )
    result = IndexResult(staged, resumed=staged.resumed)
    if cases is None:
        result.bad.extend(scan_bad)
    if staged.resumed:
        log.info("%s: resuming an interrupted build (%d case(s) committed)", db_path, len(staged.cases))
    _index_into(
        staged,
        bundle,
        files,
        result,
        batch_size=batch_size,
        progress=progress,
        message="Indexing cases",
        workers=workers,
        skip_bad=skip_bad,
        commit_every=commit_every,
        commit_seconds=commit_seconds,
        encoder=encoder,
    )
    db = staged.finish_build()
    if fit_hamming:
        fit_hamming_codes(db, progress, bundle_dir=bundle.path, usage=bundle.code_usage())
    result.database = db
    return result


class AddOptions(TypedDict, total=False):
    """The keyword options of ``add_cases`` (those of ``add_to_index``; same defaults)."""

    progress: Progress | None
    batch_size: int | None
    workers: int
    skip_bad: bool


class IndexOptions(AddOptions, total=False):
    """The keyword options of ``index_cohort`` (those of ``build_index``; same defaults)."""

    overwrite: bool
    fit_hamming: bool


def index_cohort(
    bundle: InferenceBundle,
    data_dir: str | Path,
    db_path: str | Path,
    cases: Sequence[str] | None = None,
    **options: Unpack[IndexOptions],
) -> CodeDatabase:
    """``build_index`` returning just the database."""
    return build_index(bundle, data_dir, db_path, cases, **options).database


def add_to_index(
    bundle: InferenceBundle,
    db_path: str | Path,
    data_dir: str | Path,
    cases: Sequence[str] | None = None,
    progress: Progress | None = None,
    batch_size: int | None = None,
    workers: int = 2,
    skip_bad: bool = False,
    commit_every: int = COMMIT_EVERY,
    commit_seconds: float = COMMIT_SECONDS,
    encoder: CaseEncoder | None = None,
) -> IndexResult:
    """Encode and add cases of ``data_dir`` (default: all) to an existing database, batch by batch
    (``encoder``: as in ``build_index``).

    Cases whose image files are indexed already (by content, whatever their name) are skipped, so running
    the same command again after an interruption continues it. A case whose id the database holds for
    other image files is an error (or, with ``skip_bad``, reported and skipped).
    """
    data_dir = Path(data_dir)
    books = bundle.codebooks()
    db = CodeDatabase.open(
        db_path, expected_fingerprint=bundle.fingerprint, expected_codebooks=books, verify=False
    )
    found, scan_bad = _find(data_dir, skip_bad)
    files = _select_cases(found, cases, data_dir)
    result = IndexResult(db, bad=scan_bad if cases is None else [])
    _index_into(
        db,
        bundle,
        files,
        result,
        batch_size=batch_size,
        progress=progress,
        message="Adding cases",
        workers=workers,
        skip_bad=skip_bad,
        commit_every=commit_every,
        commit_seconds=commit_seconds,
        encoder=encoder,
    )
    return result


def add_cases(
    bundle: InferenceBundle,
    db_path: str | Path,
    data_dir: str | Path,
    cases: Sequence[str] | None = None,
    **options: Unpack[AddOptions],
) -> list[str]:
    """``add_to_index`` returning the ids added."""
    return add_to_index(bundle, db_path, data_dir, cases, **options).added


def remove_case(db_path: str | Path, case_id: str) -> None:
    """Remove one case from the database at ``db_path`` (a tombstone; ``compact_index`` erases its rows)."""
    db = CodeDatabase.open(db_path, verify=False)
    if case_id not in db:
        raise DataError(f"{db.path}: no case {case_id!r} in this database; `fdn index info` lists the cases")
    db.remove_case(case_id)


def compact_index(db_path: str | Path, progress: Progress | None = None) -> bool:
    """Merge the database's segments into one and erase removed cases' rows; False if nothing to do."""
    return CodeDatabase.open(db_path, verify=False).compact(progress)


# ------------------------------------------------------------------------------------------- searching


def encode_context(
    bundle: InferenceBundle, images: np.ndarray, k: int, centre: np.ndarray, batch_size: int | None = None
) -> np.ndarray:
    """The normal grids of a study's axial context around slice ``k`` (``labels.context_slices``), from
    its model-input slices ``images`` (Z, 4, S, S); ``centre``, slice k's grid, is already encoded."""
    at = context_slices(k, images.shape[0])
    others = sorted(set(at) - {k})
    near = {k: centre}
    if others:  # a one-slice study has no neighbours
        near.update(
            zip(others, bundle.encode_slices(images[others], batch_size=batch_size).normal, strict=True)
        )
    return np.stack([near[s] for s in at])


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
    """A query's codes and where they came from. ``database_case`` is the database case this slice belongs
    to (decided by the study's image files or codes, never by its name alone), whose volume is left out of
    the results; ``in_database`` says whether there is one. ``case`` is set when the slice was encoded
    from a volume (not read from the database), so callers can show it without loading it again."""

    case_id: str
    slice_index: int
    normal: np.ndarray
    abnormal: np.ndarray
    in_database: bool
    case: CaseVolume | None = None
    database_case: str | None = None
    #: Normal grids at ``labels.AXIAL_CONTEXT``'s offsets (for searches with axial context).
    normal_context: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.in_database and self.database_case is None and self.case is None:
            self.database_case = self.case_id  # read from the database by its id


class Retriever:
    """Search one code database with one model. Built with ``Retriever.open``, which refuses a model whose
    fingerprint or codebooks differ from the database's (``ModelMismatchError``). The Hamming codes are read
    from the database; a database without them gets them fitted (and stored) on the first Hamming search.

    Search spans the database's segments through ``SearchEngine.from_database``."""

    def __init__(
        self,
        db: CodeDatabase,
        bundle: InferenceBundle | None = None,
        hamming: tuple[BinaryCodes, BinaryCodes] | None = None,
    ) -> None:
        if bundle is not None:
            db.check_model(bundle.fingerprint, bundle.codebooks())
        self.db = db
        self.bundle = bundle
        self.hamming = hamming
        bits = None if hamming is None else (hamming[0].bits, hamming[1].bits)
        self.engine = SearchEngine.from_database(db, hamming_bits=bits, learned_embeddings=self._learned())
        self._by_paths: dict[tuple[tuple[str, str], ...], str] | None = None

    @classmethod
    def open(
        cls, db_path: str | Path, bundle: InferenceBundle | None = None, verify: bool = True
    ) -> Retriever:
        """Open the database (checking every file's hash when ``verify``) and its stored binary codes."""
        expected = None if bundle is None else bundle.fingerprint
        books = None if bundle is None else bundle.codebooks()
        db = CodeDatabase.open(
            db_path, expected_fingerprint=expected, verify=verify, expected_codebooks=books
        )
        return cls(db, bundle, load_hamming_codes(db))

    def ensure_hamming(self, progress: Progress | None = None) -> None:
        """Make the Hamming distance available: fit (and store) the binary codes if the database has none."""
        if self.hamming is None:
            log.info("%s has no binary codes yet; fitting them once (Algorithm A.1)", self.db.path)
            usage = None if self.bundle is None else self.bundle.code_usage()
            self.hamming = fit_hamming_codes(self.db, progress, usage=usage)
            bits = (self.hamming[0].bits, self.hamming[1].bits)
            self.engine = SearchEngine.from_database(
                self.db, hamming_bits=bits, learned_embeddings=self._learned()
            )

    @property
    def distances(self) -> tuple[str, ...]:
        """The distances this retriever offers: the paper's, and the learned one when the bundle has a
        retrieval embedding."""
        return self.engine.offered_distances

    def _learned(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The bundle's retrieval embedding (the learned distance), if it has one."""
        return None if self.bundle is None else self.bundle.retrieval_embedding

    def slice_from_database(self, case_id: str, slice_index: int) -> QuerySlice:
        """The stored codes of one database slice."""
        if case_id not in self.db:
            raise DataError(f"case {case_id!r} is not in the database")
        normal, abnormal = self.db.slice_codes(case_id, int(slice_index))
        h, w = self.db.grid_shape
        around = self.engine.query_from_rows(self.engine.row_of(case_id, int(slice_index))).normal_context
        return QuerySlice(
            case_id,
            int(slice_index),
            normal.reshape(h, w),
            abnormal.reshape(h, w),
            in_database=True,
            database_case=case_id,
            normal_context=None if around is None else np.asarray(around).reshape(-1, h, w),
        )

    def database_case_of(self, case: CaseVolume) -> str | None:
        """The database case holding this study, by content: the sha256 of its image files, else the image
        paths recorded when it was indexed. None when neither matches (a same-named case is another study)."""
        files = getattr(case, "files", None)
        if not isinstance(files, CaseFiles):
            return None  # a volume that came without files (e.g. from a viewer's scene)
        try:
            sha = case_fingerprint(files)
        except DataError as exc:
            log.warning("case %s: cannot hash its image files (%s)", case.case_id, exc)
            sha = None
        if sha is not None:
            twins = self.db.cases_with_fingerprint(sha)
            if twins:
                return twins[0]
        key = tuple(sorted(image_paths_of_source(files.to_source()).items()))
        if not key:
            return None
        if self._by_paths is None:
            index: dict[tuple[tuple[str, str], ...], str] = {}
            for cid in self.db.cases:
                recorded = image_paths_of_source(_resolved_source(self.db, cid))
                index.setdefault(tuple(sorted(recorded.items())), cid)
            self._by_paths = index
        own = self._by_paths.get(key)
        if own is not None and sha is not None and self.db.source_fingerprint(own) not in (None, sha):
            log.warning(
                "study %s has the image files of database case %s (same paths), but they changed since the "
                "case was indexed; it is treated as that case (left out of the results): re-index it "
                "(fdn index remove, then fdn index add)",
                case.case_id,
                own,
            )
        return own

    def _same_codes_case(
        self, case: CaseVolume, stack: SliceStack, k: int, first: EncodedSlices
    ) -> str | None:
        """A database case indexed before source fingerprints were recorded whose codes equal the study's,
        slice for slice (the last resort of identity, for format-1 databases)."""
        assert self.bundle is not None
        db = self.db
        n = stack.images.shape[0]
        candidates = []
        for cid in db.cases:
            if db.source_fingerprint(cid) is not None:
                continue
            rows = db.case_rows(cid)
            if rows.stop - rows.start != n:
                continue
            sl = np.asarray(db.slice_indices[rows])
            hit = np.flatnonzero(sl == k)
            if hit.size and np.array_equal(
                db.normal_codes[rows.start + int(hit[0])], first.normal[0].reshape(-1)
            ):
                candidates.append((cid, rows, sl))
        if not candidates:
            return None
        enc = self.bundle.encode_slices(stack.images)
        normal = enc.normal.reshape(n, -1)
        abnormal = enc.abnormal.reshape(n, -1)
        for cid, rows, sl in candidates:
            if sl.min() < 0 or sl.max() >= n:
                continue
            if np.array_equal(np.asarray(db.normal_codes[rows]), normal[sl]) and np.array_equal(
                np.asarray(db.abnormal_codes[rows]), abnormal[sl]
            ):
                return cid
        return None

    def slice_from_case(
        self, case: CaseVolume, slice_index: int, batch_size: int | None = None
    ) -> QuerySlice:
        """Encode one axial slice of a loaded volume with the bundle, and find out whether the study is a
        database case (``database_case``; by its image files or codes, not by its name)."""
        if self.bundle is None:
            raise DataError("encoding a new case needs the model bundle; open the Retriever with a bundle")
        z = case.image.shape[-1]
        if not 0 <= slice_index < z:
            raise DataError(f"case {case.case_id}: slice {slice_index} is outside 0..{z - 1}")
        stack = volume_to_slices(case, self.bundle.preprocess)
        enc = self.bundle.encode_slices(stack.images[slice_index : slice_index + 1], batch_size=batch_size)
        around = encode_context(self.bundle, stack.images, slice_index, enc.normal[0], batch_size)
        own = self.database_case_of(case)
        if own is None:
            own = self._same_codes_case(case, stack, slice_index, enc)
        if own is not None and own != case.case_id:
            log.info("study %s is database case %s (same image files or codes)", case.case_id, own)
        return QuerySlice(
            case.case_id,
            int(slice_index),
            enc.normal[0],
            enc.abnormal[0],
            in_database=own is not None,
            case=case,
            database_case=own,
            normal_context=around,
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
        context: bool = False,
        lesion: str = "any",
    ) -> list[Hit]:
        """Ranked hits for ``query``. ``abnormal_from`` makes a composite query (the abnormal codes of another
        slice). The database case the query belongs to (``database_case``; and ``abnormal_from``'s) is never
        returned, nor ``exclude_cases``; a same-named case of another study is. ``context``: the normal term
        spans the query's axial context; ``lesion``: "any", "without" (only reference slices whose lesion
        flag is False) or "with" (only flagged ones) (``SearchEngine.search_many``)."""
        if distance not in DISTANCES:
            raise DataError(f"unknown distance {distance!r}; choose one of {list(DISTANCES)}")
        if distance == "hamming":
            self.ensure_hamming()
        abnormal = query.abnormal if abnormal_from is None else abnormal_from.abnormal
        excluded = [*([query.database_case] if query.database_case else []), *exclude_cases]
        if abnormal_from is not None and abnormal_from.database_case:
            excluded.append(abnormal_from.database_case)
        q = Query(
            normal=query.normal,
            abnormal=abnormal,
            exclude_cases=tuple(dict.fromkeys(excluded)),
            normal_context=query.normal_context,
        )
        return self.engine.search(
            q,
            distance=distance,
            mode=normalize_mode(mode),
            top=int(top),
            per="slice" if slice_wise else "volume",
            context=context,
            lesion=lesion,
        )
