"""Computing side of the module: model + database, encoding a study, searching.

Nothing here touches MRML or Qt: functions take numpy arrays and return numpy arrays, so they run in the
panel's worker thread (``tasks.BackgroundTask``, re-exported here) while the main thread keeps the GUI alive,
and under pytest. Importing this module imports torch: the panel does it first in the worker thread.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from fdn_core.codes.database import CodeDatabase
from fdn_core.codes.search import Hit, Query, SearchEngine
from fdn_core.data.preprocess import slices_to_volume, volume_to_slices
from fdn_core.data.readers import CaseFiles, CaseVolume
from fdn_core.errors import DataError, ModelMismatchError
from fdn_core.labels import (
    DISTANCES,
    LESION_FILTER_LABELS,
    MIN_LESION_ML,
    MODALITIES,
    check_lesion_filter,
    context_slices,
    normalize_mode,
)
from fdn_core.model.bundle import InferenceBundle, load_bundle
from fdn_core.model.lesions import LesionCleanup, remove_small_lesions
from fdn_core.progress import Progress
from fdn_core.retrieval import load_hamming_codes

from .tasks import BackgroundTask, TaskStatus

__all__ = [
    "BackgroundTask",
    "EncodedStudy",
    "Resources",
    "SearchSettings",
    "TaskStatus",
    "choose_batch_size",
    "device_warning",
    "encode_study",
    "find_indexed_case",
    "make_search_engine",
    "no_result_message",
    "open_resources",
    "search_study",
]

log = logging.getLogger(__name__)
T = TypeVar("T")
#: Seconds one encoding step should take: Cancel is answered within about this time.
STEP_SECONDS = 0.2

#: The panel's similarity choices ("both": each code's distance divided by its typical size, summed).
MODES: tuple[str, ...] = ("normal", "abnormal", "both")
TOP_K_MAX = 20
# Peak activation bytes per slice and pixel in inference (about 5 live float32 maps of 64 channels at full
# resolution in the decoders); measured peaks stay below this on CPU.
_BYTES_PER_SLICE_PIXEL = 1500


# --------------------------------------------------------------------------------------- model, database


def _nonempty(path: str | Path | None) -> Path | None:
    if path is None or str(path).strip() in ("", "."):
        return None
    return Path(path)


@dataclass
class Resources:
    """A verified model bundle and the code database built with it."""

    bundle: InferenceBundle
    database: CodeDatabase
    model_path: Path
    database_path: Path


def open_resources(
    model_path: str | Path | None, database_path: str | Path | None, device: str = "auto"
) -> Resources:
    """Load the model (hash-verified) and open its database (hash-verified, same fingerprint).

    Raises DataError for missing choices, IntegrityError for damaged files, ModelMismatchError when the
    database was made with another model.
    """
    model = _nonempty(model_path)
    database = _nonempty(database_path)
    if model is None:
        raise DataError(
            "No model chosen. Pick the model folder (it holds bundle.json), e.g. the demo model models/demo."
        )
    if database is None:
        raise DataError(
            "No database chosen. Pick the code database folder (it holds manifest.json), e.g. models/demo/db."
        )
    bundle = load_bundle(model, device=device)
    try:
        db = CodeDatabase.open(database, expected_fingerprint=bundle.fingerprint)
    except ModelMismatchError as exc:
        raise ModelMismatchError(
            f"The database '{database}' was built with a different model than '{model}', so their codes "
            "cannot be compared. Pick the database that was made with this model (or the model the database "
            f"was made with). Details: {exc}"
        ) from exc
    if len(db) == 0:
        raise DataError(f"The database '{database}' holds no cases; index a reference cohort into it first.")
    return Resources(bundle, db, model, database)


def device_warning(bundle: InferenceBundle, num_slices: int) -> str | None:
    """A warning when running on the CPU (slow), else None."""
    if bundle.device.type != "cpu":
        return None
    return (
        f"Running on the CPU (no usable GPU found, or CPU was chosen): encoding {num_slices} slices at "
        f"{bundle.preprocess.image_size}x{bundle.preprocess.image_size} may take a minute or more. "
        "Choose 'cuda' as device if this computer has an NVIDIA GPU and a CUDA build of PyTorch."
    )


def _free_memory_bytes(device_type: str) -> int | None:
    if device_type == "cuda":
        import torch

        return int(torch.cuda.mem_get_info()[0])
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None  # not available on this platform (macOS, Windows)


def choose_batch_size(bundle: InferenceBundle, free_bytes: int | None = None) -> int:
    """Slices per forward pass that fit in half of the free memory of the bundle's device.

    ``free_bytes``: override the measured free memory. Falls back to the bundle's default when the free
    memory cannot be measured; always between 1 and that default.
    """
    device_type = bundle.device.type
    upper = bundle.default_batch_size()
    free = free_bytes if free_bytes is not None else _free_memory_bytes(device_type)
    if free is None:
        return upper
    per_slice = _BYTES_PER_SLICE_PIXEL * bundle.preprocess.image_size**2
    return int(max(1, min(upper, (free // 2) // per_slice)))


# -------------------------------------------------------------------------------------------- encoding


@dataclass
class EncodedStudy:
    """A study's codes and outputs, in canonical orientation.

    normal / abnormal: uint16 (Z, h, w) code grids per axial slice; has_abnormal: (Z,) bool (the model's
    segmentation has abnormal voxels in that slice); seg: uint8 (X, Y, Z) classes 0..3, without the
    predicted lesions smaller than ``lesions.min_ml`` (``lesions`` says what was removed); recon_normal:
    float32 (4, X, Y, Z) normal-appearing image in the input's intensity units (None when not computed).
    """

    normal: np.ndarray
    abnormal: np.ndarray
    has_abnormal: np.ndarray
    seg: np.ndarray
    recon_normal: np.ndarray | None
    fingerprint: str
    lesions: LesionCleanup

    @property
    def num_slices(self) -> int:
        """Number of axial slices (Z)."""
        return int(self.normal.shape[0])


def _brain_statistics(image: np.ndarray) -> list[tuple[float, float]]:
    """Per channel (mean, std) over voxels > 0: the statistics ``zscore_volume`` normalises with."""
    stats = []
    for channel in image:
        values = channel[channel > 0]
        stats.append((float(values.mean()), float(values.std())) if values.size else (0.0, 0.0))
    return stats


def _in_timed_steps(
    num_slices: int,
    max_batch: int,
    run: Callable[[int, int], T],
    progress: Progress | None,
    message: str,
    target_s: float = STEP_SECONDS,
) -> list[T]:
    """``run(start, stop)`` over slices ``[0, num_slices)`` in steps sized to last about ``target_s`` each.

    The first step is one slice; each next step holds as many slices as the last step's speed allows in
    ``target_s`` (1 to ``max_batch``). Progress is reported, and Cancel checked, after every step, so a Cancel
    is answered within about ``target_s`` whatever the model, image size and device.
    """
    out: list[T] = []
    if progress is not None:
        progress.update(0, num_slices, message)
    start, size = 0, 1
    while start < num_slices:
        stop = min(num_slices, start + size)
        began = time.perf_counter()
        out.append(run(start, stop))
        per_slice = max((time.perf_counter() - began) / (stop - start), 1e-6)
        size = int(max(1, min(max_batch, target_s / per_slice)))
        start = stop
        if progress is not None:
            progress.update(start, num_slices, message)
    return out


def encode_study(
    bundle: InferenceBundle,
    image: np.ndarray,
    affine: np.ndarray,
    batch_size: int | None = None,
    progress: Progress | None = None,
    reconstruct: bool = True,
    min_lesion_ml: float = MIN_LESION_ML,
) -> EncodedStudy:
    """Encode every axial slice of a canonical 4-channel study ``image`` (4, X, Y, Z).

    Preprocessing and encoding are those of ``fdn_core.retrieval.encode_case_stack`` (``volume_to_slices``,
    then ``InferenceBundle.encode_slices``), exactly as databases are indexed, run in steps of about
    ``STEP_SECONDS`` (at most ``batch_size`` slices) so that Cancel is answered quickly. With ``reconstruct``
    the normal-appearing image is decoded too and mapped back to the input's intensities (z-score undone
    with each channel's brain mean and standard deviation; 0 outside that channel's brain voxels).
    Predicted lesions smaller than ``min_lesion_ml`` mL are removed from the segmentation and its slice
    flags (``remove_small_lesions``; 0 keeps all).
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 4 or image.shape[0] != len(MODALITIES):
        raise DataError(f"the study must be (4, X, Y, Z) with channels {MODALITIES}, got {image.shape}")
    spacing = tuple(float(s) for s in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0)))
    case = CaseVolume(
        case_id="query",
        image=image,
        seg=None,
        anat=None,
        affine=np.asarray(affine, dtype=np.float64),
        spacing=spacing,  # type: ignore[arg-type]
        files=CaseFiles("query", "brats", None, None, None, None),
    )
    stack = volume_to_slices(case, bundle.preprocess)
    n = int(stack.images.shape[0])
    if n == 0:
        raise DataError("the study has no axial slices")
    cap = bundle.default_batch_size() if batch_size is None else max(1, int(batch_size))
    parts = _in_timed_steps(
        n,
        cap,
        lambda a, b: bundle.encode_slices(stack.images[a:b], batch_size=b - a),
        progress,
        "Encoding slices",
    )
    normal = np.concatenate([p.normal for p in parts])
    abnormal = np.concatenate([p.abnormal for p in parts])
    assert stack.voxel_ml is not None  # volume_to_slices knows the spacing
    seg_slices, lesions = remove_small_lesions(
        np.concatenate([p.seg for p in parts]), stack.voxel_ml, min_lesion_ml
    )
    seg = slices_to_volume(seg_slices, stack.geometry).astype(np.uint8)
    recon = None
    if reconstruct:
        recon_parts = _in_timed_steps(
            n,
            cap,
            lambda a, b: bundle.reconstruct(stack.images[a:b], batch_size=b - a)[1],
            progress,
            "Reconstructing slices",
        )
        recon_z = slices_to_volume(np.concatenate(recon_parts), stack.geometry, mode="bilinear")
        recon = np.zeros_like(image)
        for c, (mean, std) in enumerate(_brain_statistics(image)):
            mask = image[c] > 0
            recon[c][mask] = np.maximum(recon_z[c][mask] * std + mean, 0.0)
    has_abnormal = np.asarray((seg_slices > 0).reshape(n, -1).any(axis=1))
    return EncodedStudy(
        normal=normal,
        abnormal=abnormal,
        has_abnormal=has_abnormal,
        seg=seg,
        recon_normal=recon,
        fingerprint=bundle.fingerprint,
        lesions=lesions,
    )


# --------------------------------------------------------------------------------------------- search


@dataclass(frozen=True)
class SearchSettings:
    """What the radiologist asked for.

    query_slice: canonical axial index of the query slice. mode: which codes to compare ("normal",
    "abnormal", "both" = the sum of both normalised distances). distance: "euclidean", "angular" or
    "hamming". top_k: results to return (1..20). volume_wise: at most one slice (the best) per reference
    case. abnormal_slice: composite query - take the abnormal code from this slice instead of query_slice.
    exclude_case: a database case id never to return (the query study itself when it is indexed).
    axial_context: the normal codes' distance also compares the slices around the query with those around
    each reference slice (``fdn_core.labels.AXIAL_CONTEXT``). lesion: which reference slices may be returned
    (``fdn_core.labels.LESION_FILTERS``): "any", "without" (only slices without a lesion) or "with" (only
    slices with one), by each database slice's lesion flag.
    """

    query_slice: int
    mode: str = "both"
    distance: str = "euclidean"
    top_k: int = 10
    volume_wise: bool = True
    abnormal_slice: int | None = None
    exclude_case: str | None = None
    axial_context: bool = False
    lesion: str = "any"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise DataError(f"search mode {self.mode!r} is not one of {list(MODES)}")
        normalize_mode(self.mode)
        if self.distance not in DISTANCES:
            raise DataError(f"distance {self.distance!r} is not one of {list(DISTANCES)}")
        if not 1 <= int(self.top_k) <= TOP_K_MAX:
            raise DataError(f"top-K must be between 1 and {TOP_K_MAX}, got {self.top_k}")
        check_lesion_filter(self.lesion)


def _check_slice(index: int, num_slices: int, what: str) -> int:
    if not 0 <= int(index) < num_slices:
        raise DataError(
            f"{what} {index} is outside the study (slices 0..{num_slices - 1}); choose another slice"
        )
    return int(index)


def make_search_engine(database: CodeDatabase, bundle: InferenceBundle | None = None) -> SearchEngine:
    """A search engine over ``database``; Hamming distance is available when the database folder holds
    binarised codebooks (``fdn index build`` stores them under ``hamming/``), the learned distance when
    ``bundle`` has a retrieval embedding (``fdn train-embedding``)."""
    codes = load_hamming_codes(database)
    bits = None if codes is None else (codes[0].bits, codes[1].bits)
    learned = None if bundle is None else bundle.retrieval_embedding
    return SearchEngine.from_database(database, hamming_bits=bits, learned_embeddings=learned)


def find_indexed_case(database: CodeDatabase, encoded: EncodedStudy) -> str | None:
    """The database case whose stored codes equal this study's codes slice for slice (the study itself is
    indexed), or None. Such a case is left out of the results, as the paper's protocol requires."""
    rows_per_case = np.diff(np.append(database.case_starts, len(database)))
    normal = encoded.normal.reshape(encoded.num_slices, -1)
    middle = encoded.num_slices // 2
    for case_id, start, count in zip(database.cases, database.case_starts, rows_per_case):
        if int(count) != encoded.num_slices:
            continue
        start = int(start)
        if int(database.slice_indices[start + middle]) == middle and not np.array_equal(
            database.normal_codes[start + middle], normal[middle]
        ):
            continue  # cheap rejection on one row before reading the whole case
        rows = slice(start, start + int(count))
        order = np.argsort(np.asarray(database.slice_indices[rows]))
        stored = np.asarray(database.normal_codes[rows])[order]
        if np.array_equal(stored, normal):
            stored_abn = np.asarray(database.abnormal_codes[rows])[order]
            if np.array_equal(stored_abn, encoded.abnormal.reshape(encoded.num_slices, -1)):
                return str(case_id)
    return None


def no_result_message(lesion: str) -> str:
    """What the panel and the browser say when a search returns nothing: with a lesion filter, that no
    other case has such a slice (not that the database is empty)."""
    name = check_lesion_filter(lesion)
    if name == "any":
        return "No result: the database holds no other case to compare with."
    return (
        f"No result: no other case in the database has a slice {LESION_FILTER_LABELS[name]}; set "
        "References to 'any slice' to search every slice."
    )


def search_study(engine: SearchEngine, encoded: EncodedStudy, settings: SearchSettings) -> list[Hit]:
    """Search the database with one slice of the encoded study (or a composite of two slices).

    mode "both" adds the normal and abnormal distances, each divided by its typical size in the database
    (the engine's ``sum_normalized``), so that neither code type dominates.
    """
    q = _check_slice(settings.query_slice, encoded.num_slices, "query slice")
    a = (
        q
        if settings.abnormal_slice is None
        else _check_slice(settings.abnormal_slice, encoded.num_slices, "abnormal-code slice")
    )
    if settings.distance == "hamming" and not engine.has_hamming:
        raise DataError(
            "Hamming distance needs the binarised codebooks, which this database does not have; choose "
            "euclidean or angular, or rebuild the database with binarised codes."
        )
    query = Query(
        normal=encoded.normal[q],
        abnormal=encoded.abnormal[a],
        exclude_cases=() if settings.exclude_case is None else (settings.exclude_case,),
        normal_context=encoded.normal[context_slices(q, encoded.num_slices)],
    )
    hits = engine.search(
        query,
        distance=settings.distance,
        mode=normalize_mode(settings.mode),
        top=int(settings.top_k),
        per="volume" if settings.volume_wise else "slice",
        context=settings.axial_context,
        lesion=settings.lesion,
    )
    return hits
