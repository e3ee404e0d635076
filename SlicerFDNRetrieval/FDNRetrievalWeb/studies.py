"""Where the browser's studies come from: the database's cohort, a data folder, uploads; and the reference
slices shown beside the query.

Nothing here touches MRML, VTK or trame: functions take and return paths, ``CaseFiles`` and numpy arrays, so
they run in the server's worker threads and under pytest in any environment.

- ``StudyCatalogue``: the studies the page offers, the cases of ``--data`` (when given) and every case of
  the database (its recorded files), each under a stable key.
- ``UploadArea``: uploaded files go to one temporary folder, a subfolder per upload, named by the sequence
  their file names suggest; the folder is removed by ``close()`` (the server calls it at exit).
- ``read_display_volume``: one sequence and the tumour labels of a case, in canonical orientation, for a
  result view (reading one NIfTI file and the label file instead of the whole case when possible).
- ``ViewVolume``: voxels laid out as Slicer's image data holds them, made in the worker so that the event
  loop only wraps them (no copy, no histogram) when it adds a volume node.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from fdn_core.data.readers import CaseFiles, case_files_from_paths, find_cases, load_case, to_canonical
from fdn_core.errors import DataError
from fdn_core.labels import BRATS_FILE_TO_CLASS, MODALITIES
from FDNRetrievalLib.naming import SEQUENCE_LABELS, guess_sequence

__all__ = [
    "UPLOAD_EXTENSIONS",
    "DisplayVolume",
    "StudyCatalogue",
    "StudyEntry",
    "UploadArea",
    "ViewVolume",
    "brats_labels_to_classes",
    "read_display_volume",
    "window_for",
]

log = logging.getLogger(__name__)

#: Single-file formats accepted as uploads (a detached NRRD/MetaImage header would need its data file too).
UPLOAD_EXTENSIONS: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".mha")
_LABEL_WORDS = re.compile(r"(?:^|[^a-z])(seg|label|labels|mask)(?:[^a-z]|$)")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


# ------------------------------------------------------------------------------------------- catalogue


@dataclass(frozen=True)
class StudyEntry:
    """One study the page offers. ``key`` is what the page sends back; ``files`` is None for a database case
    (its files are resolved from the database's record when it is opened, so a moved cohort is reported
    then, not when the page loads)."""

    key: str
    case_id: str
    title: str
    files: CaseFiles | None = None
    in_database: bool = False


@dataclass
class StudyCatalogue:
    """The studies of ``data_dir`` (any BraTS or Decathlon folder) and of the database, in that order.

    A case of ``data_dir`` that the database also holds (same id) is listed once, from ``data_dir``, and
    marked "in database"; whether a study really is a database case is decided after encoding, from its codes
    (``workflow.find_indexed_case``), never from its name.
    """

    entries: list[StudyEntry] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @classmethod
    def build(cls, database: Any | None, data_dir: str | Path | None) -> StudyCatalogue:
        """List the studies (headers only for ``data_dir``; nothing is read for database cases)."""
        catalogue = cls()
        in_db = set(database.cases) if database is not None else set()
        seen: set[str] = set()
        if data_dir is not None:
            data_dir = Path(data_dir)
            if not data_dir.is_dir():
                catalogue.problems.append(
                    f"The data folder {data_dir} does not exist; no study listed from it."
                )
            else:
                found = find_cases(data_dir, skip_bad=True, resample=True)
                catalogue.problems += [str(p) for p in getattr(found, "problems", [])]
                for files in found:
                    mark = " (in database)" if files.case_id in in_db else ""
                    catalogue.entries.append(
                        StudyEntry(
                            f"data:{files.case_id}",
                            files.case_id,
                            files.case_id + mark,
                            files,
                            files.case_id in in_db,
                        )
                    )
                    seen.add(files.case_id)
        for case_id in sorted(in_db - seen):
            catalogue.entries.append(
                StudyEntry(f"db:{case_id}", case_id, f"{case_id} (in database)", None, True)
            )
        return catalogue

    def items(self) -> list[dict[str, str]]:
        """The page's select items: ``{"title", "value"}``."""
        return [{"title": e.title, "value": e.key} for e in self.entries]

    def get(self, key: str) -> StudyEntry:
        """The entry with ``key``; DataError when the page sent an unknown key."""
        for entry in self.entries:
            if entry.key == key:
                return entry
        raise DataError(f"unknown study {key!r}; reload the page")

    def files(self, key: str, database: Any | None) -> CaseFiles:
        """The files of study ``key`` (database cases resolved from the database's record)."""
        entry = self.get(key)
        if entry.files is not None:
            return entry.files
        if database is None:
            raise DataError("no database is open, so its cases cannot be opened")
        return CaseFiles.from_database(database, entry.case_id)


# ---------------------------------------------------------------------------------------------- uploads


def _upload_extension(name: str) -> str | None:
    lowered = name.lower()
    for ext in UPLOAD_EXTENSIONS:
        if lowered.endswith(ext):
            return ext
    return None


def _study_name(stems: Sequence[str]) -> str:
    """A readable name for an uploaded study: the file names' common prefix (``BraTS_001_t1`` ... ->
    ``BraTS_001``), else "uploaded study"."""
    prefix = stems[0] if stems else ""
    for stem in stems[1:]:
        while not stem.startswith(prefix):
            prefix = prefix[:-1]
    return prefix.rstrip("_-. ") or "uploaded study"


class UploadArea:
    """Uploaded studies, one subfolder each, in a temporary folder removed by ``close()``.

    ``stage(files)`` checks the file names (format, which sequence each file is, exactly one of each),
    writes the files and returns the study's ``CaseFiles`` (files on other grids are resampled onto the
    T1ce grid when the study is loaded, as for any query study). Messages say what to rename or add.
    """

    def __init__(self, parent: str | Path | None = None) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="fdn-web-uploads-", dir=parent))
        self._count = 0

    def stage(self, files: Sequence[tuple[str, bytes]]) -> CaseFiles:
        """Write one uploaded study (``(file name, content)`` pairs) and return its files."""
        if not files:
            raise DataError("No file was uploaded. Choose the four files of one study (T1, T1ce, T2, FLAIR).")
        kinds: dict[str, tuple[str, str, bytes]] = {}
        stems = []
        for raw_name, content in files:
            name = Path(str(raw_name).replace("\\", "/")).name  # never a path from the browser
            ext = _upload_extension(name)
            if ext is None:
                raise DataError(
                    f"'{name}' is not a NIfTI (.nii, .nii.gz), NRRD (.nrrd) or MetaImage (.mha) file. Upload "
                    "the study's four sequences as such files (DICOM: convert the series first)."
                )
            stem = name[: -len(ext)]
            if _LABEL_WORDS.search(stem.lower()):
                kind = "seg"
            else:
                guessed = guess_sequence(stem)
                if guessed is None:
                    raise DataError(
                        f"The name '{name}' does not say which sequence it is. Rename the files so that "
                        "each name contains t1, t1ce, t2 or flair (e.g. 'patient7_t1ce.nii.gz')."
                    )
                kind = guessed
                stems.append(stem)
            if kind in kinds:
                raise DataError(
                    f"'{kinds[kind][0]}' and '{name}' both look like "
                    f"{SEQUENCE_LABELS.get(kind, 'label')} files; upload one file per sequence."
                )
            if not content:
                raise DataError(f"'{name}' is empty (0 bytes); upload it again.")
            kinds[kind] = (name, ext, content)
        missing = [SEQUENCE_LABELS[m] for m in MODALITIES if m not in kinds]
        if missing:
            raise DataError(
                f"Missing {', '.join(missing)}: a study needs four files, one per sequence (T1, T1ce, T2, "
                "FLAIR), named so that each name says which sequence it is."
            )
        self._count += 1
        folder = self.root / f"upload-{self._count:03d}"
        folder.mkdir()
        specs = []
        for kind, (name, ext, content) in kinds.items():
            path = folder / f"{kind}_{_UNSAFE.sub('_', name[: -len(ext)])[:80]}{ext}"
            path.write_bytes(content)
            specs.append(f"{kind}={path}")
        return replace(case_files_from_paths(specs, resample=True), case_id=_study_name(stems))

    def discard_others(self, keep: CaseFiles | None) -> None:
        """Delete every upload folder except the one ``keep`` lives in (the study on screen)."""
        keep_dir = None if keep is None else next(iter(keep.all_paths()), Path()).parent
        for folder in self.root.glob("upload-*"):
            if folder != keep_dir:
                shutil.rmtree(folder, ignore_errors=True)

    def close(self) -> None:
        """Remove the whole upload folder (server exit)."""
        shutil.rmtree(self.root, ignore_errors=True)


# --------------------------------------------------------------------------------------- display volumes


def window_for(image: np.ndarray) -> tuple[float, float]:
    """A display range (low, high) for an MR image: the 0.5th and 99.5th percentiles of its non-zero voxels
    (the brain). The normal-appearing reconstruction is shown with its study's range, so the two compare."""
    values = np.asarray(image)
    values = values[values > 0]
    if values.size == 0:
        return 0.0, 1.0
    sample = values[:: max(1, values.size // 200_000)]
    low, high = (float(v) for v in np.percentile(sample, [0.5, 99.5]))
    return low, max(high, low + 1e-3)


@dataclass
class ViewVolume:
    """Voxels made ready, in a worker thread, to become a Slicer volume node on the event loop without any
    copy: ``kji`` is the (K, J, I) C-contiguous array Slicer's image data holds, on the grid ``ijk_to_ras``;
    ``window``: the display range (None for labels)."""

    kji: np.ndarray
    ijk_to_ras: np.ndarray
    window: tuple[float, float] | None = None

    @classmethod
    def from_canonical(
        cls, array: np.ndarray, affine: np.ndarray, window: tuple[float, float] | bool | None = True
    ) -> ViewVolume:
        """From a canonical (X, Y, Z) array and its voxel-to-RAS matrix (the node's IJK is canonical XYZ).
        ``window``: True computes the display range, a pair sets it, False/None for labels."""
        kji = np.ascontiguousarray(np.asarray(array).transpose(2, 1, 0))
        if window is True:
            window = window_for(kji)
        return cls(kji, np.asarray(affine, dtype=np.float64), window or None)

    @property
    def canonical(self) -> np.ndarray:
        """The voxels as a canonical (X, Y, Z) array (a view, no copy)."""
        return self.kji.transpose(2, 1, 0)


@dataclass
class DisplayVolume:
    """One sequence of a case and its tumour classes 0..3 (None when the case has no labels), ready for the
    result views; in canonical orientation as the database indexed it (axial slice k is ``[..., k]``)."""

    case_id: str
    sequence: str
    image: ViewVolume
    labels: ViewVolume | None


def brats_labels_to_classes(values: np.ndarray) -> np.ndarray:
    """BraTS label values (1 NCR/NET, 2 ED, 4 ET) to our classes 1, 2, 3; other values become 0."""
    lookup = np.zeros(256, dtype=np.uint8)
    for file_value, cls in BRATS_FILE_TO_CLASS.items():
        lookup[file_value] = cls
    values = np.asarray(values)
    inside = (values >= 0) & (values < 256)
    return np.where(inside, lookup[np.clip(values, 0, 255).astype(np.intp)], 0).astype(np.uint8)


def _nifti_grid(path: Path) -> tuple[tuple[int, ...], np.ndarray] | None:
    import nibabel as nib

    try:
        img = nib.load(str(path))
    except Exception:  # not readable as NIfTI here: the full reader reports it properly
        return None
    return tuple(int(s) for s in img.shape), np.asarray(img.affine, dtype=np.float64)


def _read_nifti(path: Path, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    img = nib.load(str(path))
    return np.asarray(img.dataobj, dtype=dtype), np.asarray(img.affine, dtype=np.float64)


def read_display_volume(files: CaseFiles, sequence: str) -> DisplayVolume:
    """``sequence`` and the labels of a case, canonical, on the case's T1ce grid (the grid it was indexed on).

    A BraTS-layout case whose sequence and label files are NIfTI on the T1ce's grid is read file by file
    (two files instead of five); anything else (NRRD, DICOM, Decathlon 4D, files on other grids) goes
    through ``fdn_core``'s full reader, which checks and resamples as when the case was indexed.
    """
    if sequence not in MODALITIES:
        raise DataError(f"unknown sequence {sequence!r}; one of {list(MODALITIES)}")
    images = files.images or {}
    path, reference = images.get(sequence), images.get("t1ce")
    candidates = [p for p in (path, reference, files.seg) if p is not None]
    if (
        files.layout == "brats"
        and path is not None
        and reference is not None
        and all(str(p).lower().endswith((".nii", ".nii.gz")) for p in candidates)
    ):
        grids = [_nifti_grid(Path(p)) for p in candidates]
        first = grids[0]
        if (
            first is not None
            and len(first[0]) == 3
            and all(
                g is not None and g[0] == first[0] and np.allclose(g[1], first[1], atol=1e-3) for g in grids
            )
        ):
            image, affine = to_canonical(*_read_nifti(Path(path), np.float32))
            labels = None
            if files.seg is not None:
                seg, seg_affine = to_canonical(*_read_nifti(Path(files.seg), np.int16))
                labels = ViewVolume.from_canonical(brats_labels_to_classes(seg), seg_affine, window=False)
            return DisplayVolume(files.case_id, sequence, ViewVolume.from_canonical(image, affine), labels)
    case = load_case(files)
    channel = MODALITIES.index(sequence)
    labels = None if case.seg is None else ViewVolume.from_canonical(case.seg, case.affine, window=False)
    return DisplayVolume(
        files.case_id, sequence, ViewVolume.from_canonical(case.image[channel], case.affine), labels
    )
