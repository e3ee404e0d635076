"""Where a case came from, and whether a model was trained on it.

Case ids are not identities: every phantom cohort has a ``phantom_0000``, and a real cohort may be renamed.
A case is identified by the content of its images instead: ``case_fingerprint`` is a sha256 streamed over the
bytes of its image files (a Decathlon case: its one 4D image file). Labels are left out: the same images
relabelled are still the same training input.

``training_overlap`` compares the cases a command is about to evaluate or index with the cases the bundle
was trained on. It compares fingerprints when the bundle metadata records ``train_case_fingerprints`` (a list
of fingerprints, or a mapping case id -> fingerprint); otherwise it falls back to the recorded
``train_cases`` ids and says (``ProvenanceWarning``) that the comparison is by name only.
``warn_training_overlap`` prints the result for the command line.
"""

from __future__ import annotations

import hashlib
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from fdn_core.data.readers import CaseFiles
from fdn_core.errors import DataError
from fdn_core.labels import MODALITIES

__all__ = [
    "FINGERPRINTS_KEY",
    "TRAIN_CASES_KEY",
    "TRAIN_COHORT_SEED_KEY",
    "ProvenanceWarning",
    "case_fingerprint",
    "cases_of",
    "overlap_message",
    "training_cohort_seeds",
    "training_overlap",
    "warn_training_overlap",
]

#: Bundle metadata key of the training cases' fingerprints (list, or mapping case id -> fingerprint).
FINGERPRINTS_KEY = "train_case_fingerprints"
#: Bundle metadata key of the training case ids (recorded by ``fdn train``).
TRAIN_CASES_KEY = "train_cases"
#: Bundle metadata key of the phantom training cohort's seed (``fdn train`` and ``fdn train-baseline``).
TRAIN_COHORT_SEED_KEY = "train_cohort_seed"
_CHUNK = 1 << 20


def training_cohort_seeds(metadata: Mapping[str, Any]) -> list[int]:
    """The phantom seed(s) of a bundle's training cohort: ``train_cohort_seed``, or the seed in the copy of
    ``cohort.json`` that FDN bundles exported before that key record under ``cohort``, and the seed of the
    cohort its retrieval embedding learned from (``retrieval_embedding.train_cohort_seed``); [] when
    unknown."""
    recorded = metadata.get(TRAIN_COHORT_SEED_KEY)
    if recorded is None and isinstance(metadata.get("cohort"), Mapping):
        recorded = metadata["cohort"].get("seed")
    seeds = [] if recorded is None else (recorded if isinstance(recorded, list) else [recorded])
    embedding = metadata.get("retrieval_embedding")
    if isinstance(embedding, Mapping) and embedding.get(TRAIN_COHORT_SEED_KEY) is not None:
        seeds.append(embedding[TRAIN_COHORT_SEED_KEY])
    return list(dict.fromkeys(int(s) for s in seeds))


class ProvenanceWarning(UserWarning):
    """The training-overlap check could only compare case ids, not image content."""


def _hash_path(h: Any, path: Path) -> None:
    """Feed one file (or every file of a DICOM series folder, by relative name) into ``h``, streamed."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        h.update(f"dir\0{len(files)}\0".encode())
        for p in files:
            h.update(f"{p.relative_to(path).as_posix()}\0".encode())
            _hash_path(h, p)
        return
    h.update(f"file\0{path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)


def _image_digest(files: CaseFiles) -> str:
    """Hex sha256 over a case's image files (the four sequences by name, or the 4D image), read in 1 MiB
    blocks. Label files are left out: adding labels later does not make another study."""
    h = hashlib.sha256(b"fdn-source-v1\0")
    if files.images:
        for kind in sorted(files.images):
            h.update(f"{kind}\0".encode())
            _hash_path(h, Path(files.images[kind]))
    if files.image4d is not None:
        h.update(b"image4d\0")
        _hash_path(h, Path(files.image4d))
    return h.hexdigest()


def case_fingerprint(files: CaseFiles) -> str:
    """Hex sha256 streamed over a case's image files (the four sequences by name, DICOM folders file by
    file, or the Decathlon 4D image). Label files are left out: adding labels later does not make another
    study. The one content fingerprint of the project (training provenance and database identity)."""
    if not files.images and files.image4d is None:
        raise DataError(f"case {files.case_id}: no image files recorded, so it cannot be fingerprinted")
    missing = [m for m in MODALITIES if files.images and m not in files.images]
    if missing:
        raise DataError(f"case {files.case_id}: no {missing} image file(s); a case needs all four")
    try:
        return _image_digest(files)
    except OSError as exc:
        raise DataError(
            f"case {files.case_id}: cannot read its image files to fingerprint them ({exc}); check the files"
        ) from exc


def cases_of(data_dir: str | Path, case_ids: Sequence[str] | None = None) -> list[CaseFiles]:
    """The cases of a cohort folder (only ``case_ids`` when given; unknown ids and an unreadable folder are
    left to the command that uses them to report)."""
    from fdn_core.data.readers import find_cases

    try:
        found = find_cases(data_dir)
    except DataError:
        return []
    if case_ids is None:
        return list(found)
    wanted = set(case_ids)
    return [c for c in found if c.case_id in wanted]


def _recorded_fingerprints(value: Any) -> dict[str, str]:
    """fingerprint -> training case id ("" when unknown) from the metadata's recorded fingerprints."""
    if isinstance(value, Mapping):
        return {str(fp): str(cid) for cid, fp in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return {str(fp): "" for fp in value}
    raise DataError(
        f"bundle metadata {FINGERPRINTS_KEY!r} is {type(value).__name__}; expected a list of sha256 "
        "fingerprints or a mapping case id -> fingerprint (re-export the bundle)"
    )


def training_overlap(metadata: Mapping[str, Any], cases: Sequence[CaseFiles]) -> list[str]:
    """Ids of ``cases`` the bundle was trained on (``metadata``: ``InferenceBundle.metadata``).

    By image fingerprint when the metadata records ``train_case_fingerprints``; otherwise by case id against
    ``train_cases``, with a ``ProvenanceWarning`` that the comparison is by name only. Nothing recorded: [].
    """
    recorded = metadata.get(FINGERPRINTS_KEY)
    if recorded:
        trained = _recorded_fingerprints(recorded)
        return [c.case_id for c in cases if case_fingerprint(c) in trained]
    names = metadata.get(TRAIN_CASES_KEY)
    if not names:
        return []
    warnings.warn(
        f"the bundle records no {FINGERPRINTS_KEY}, so cases were compared with its training cases by name "
        "only: a case renamed since training is missed, and a different case that reuses a training id "
        "(every phantom cohort has phantom_0000 ...) is flagged",
        ProvenanceWarning,
        stacklevel=2,
    )
    trained_names = {str(n) for n in names}
    return [c.case_id for c in cases if c.case_id in trained_names]


def overlap_message(metadata: Mapping[str, Any], cases: Iterable[CaseFiles], what: str) -> str | None:
    """The message to show for ``what`` (e.g. "fdn index build") about ``cases``; None when all is clear."""
    cases = list({c.case_id: c for c in cases}.values())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ProvenanceWarning)
        overlap = training_overlap(metadata, cases)
    by_name = [str(w.message) for w in caught if issubclass(w.category, ProvenanceWarning)]
    if not overlap:
        if by_name:
            return f"note: {what}: no case id matches a training case id ({by_name[0]})"
        if not metadata.get(FINGERPRINTS_KEY) and not metadata.get(TRAIN_CASES_KEY):
            if metadata.get("trained") is False:
                return None  # an untrained bundle (tests, self-tests): there is nothing to overlap with
            return (
                f"note: {what}: the bundle records no training cases, so overlap with its training data "
                "was not checked"
            )
        return None
    shown = ", ".join(overlap[:20]) + (f" ... ({len(overlap)} in all)" if len(overlap) > 20 else "")
    how = f"BY NAME ONLY ({by_name[0]})" if by_name else "by image fingerprint (identical image files)"
    return (
        f"WARNING: {what}: {len(overlap)} of {len(cases)} case(s) overlap the model's TRAINING cases, "
        f"compared {how}: {shown}. Figures measured on them are not figures on unseen data; evaluate on "
        "cases the model never saw (e.g. a phantom cohort of another seed)."
    )


def warn_training_overlap(
    metadata: Mapping[str, Any], cases: Iterable[CaseFiles], what: str, stream: TextIO | None = None
) -> str | None:
    """Print ``overlap_message`` (if any) on ``stream`` (default stderr) and return it."""
    message = overlap_message(metadata, cases, what)
    if message is not None:
        print(message, file=stream or sys.stderr, flush=True)
    return message
