"""Readers for BraTS (2019-2021) and Medical Segmentation Decathlon (Task01_BrainTumour) cohorts.

Layouts read
------------
BraTS: ``DIR/<case>/<case>_{t1,t1ce,t2,flair}.nii[.gz]``, optional ``<case>_seg.nii.gz`` (labels 0, 1 NCR/NET,
2 ED, 4 ET; absent for validation/test cases) and optional ``<case>_anat.nii.gz`` (normal anatomy, 0..6).
Case folders may be grouped one level deeper (``HGG/``, ``LGG/`` as in BraTS 2019); a folder that itself holds
the modality files is read as a single case.

MSD: ``DIR/imagesTr/<case>.nii.gz`` 4D ``(X, Y, Z, 4)`` with channels FLAIR, T1w, T1gd, T2w (or the order
``dataset.json`` names), ``DIR/labelsTr/<case>.nii.gz`` (0 bg, 1 edema, 2 non-enhancing tumour, 3 enhancing),
``DIR/imagesTs/`` without labels. Our choice for the optional anatomy labels in this layout is
``DIR/anatTr/<case>.nii.gz`` (and ``DIR/anatTs/`` for test cases). Hidden files (``._BRATS_001.nii.gz`` that
macOS archives carry) are ignored.

Both are mapped to one convention: channels ``MODALITIES`` = (t1, t1ce, t2, flair), classes 0 bg, 1 NCR/NET,
2 ED, 3 ET, volumes reoriented to the closest canonical RAS+ orientation (docs/ARCHITECTURE.md).

Bad input never vanishes silently: ``find_cases`` checks headers (missing files, dimensions, shapes, grids)
and raises one ``DataError`` listing every problem unless ``skip_bad`` is given; problems that only show when
the voxels are read (NaN/Inf, truncated files, unknown label values) are found by ``load_case`` and by the
validating scan ``validate_cohort`` that ``fdn inspect`` runs.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np

from fdn_core.errors import DataError
from fdn_core.fileio import atomic_dir, atomic_write_bytes, atomic_write_json
from fdn_core.labels import (
    ABNORMAL_NAMES,
    ANATOMY_NAMES,
    BRATS_FILE_TO_CLASS,
    MODALITIES,
    MSD_CHANNELS,
    MSD_FILE_TO_CLASS,
    MSD_MODALITY_NAMES,
)
from fdn_core.progress import Progress

__all__ = [
    "CaseFiles",
    "CaseList",
    "CaseProblem",
    "CaseSummary",
    "CaseVolume",
    "canonical_shape",
    "detect_layout",
    "find_cases",
    "from_canonical",
    "load_case",
    "nifti_bytes",
    "scan_cohort",
    "summarize_case",
    "to_canonical",
    "validate_cohort",
    "write_brats_case",
    "write_msd_copy",
]

log = logging.getLogger(__name__)

_ANAT_TO_LABEL: dict[int, int] = {i: i for i in range(len(ANATOMY_NAMES))}
_BRATS_DESC = "BraTS labels {0 background, 1 NCR/NET, 2 oedema, 4 enhancing}"
_MSD_DESC = "Decathlon labels {0 background, 1 edema, 2 non-enhancing tumour, 3 enhancing tumour}"
_ANAT_DESC = "anatomy labels {0 background, 1-6 (L/R cerebrum, L/R cerebellum, L/R lateral ventricle)}"

_BRATS_NAME = re.compile(r"^(?P<prefix>.+)_(?P<kind>t1ce|t1|t2|flair|seg|anat)\.nii(?:\.gz)?$", re.IGNORECASE)
_NIFTI_NAME = re.compile(r"^(?P<stem>.+?)\.nii(?:\.gz)?$", re.IGNORECASE)
# Grids of a case's files must agree to this many millimetres (headers store float32 values).
_AFFINE_TOL_MM = 1e-3

Layout = Literal["brats", "msd"]


@dataclass
class CaseFiles:
    """Where one case's files are. BraTS: ``images`` maps each modality to its file; MSD: ``image4d``.

    ``channel_order`` (MSD only) names the 4D file's channels in our vocabulary; None means ``MSD_CHANNELS``.
    """

    case_id: str
    layout: Layout
    images: dict[str, Path] | None
    image4d: Path | None
    seg: Path | None
    anat: Path | None
    channel_order: tuple[str, ...] | None = None

    def all_paths(self) -> list[Path]:
        """Every file of the case (images, then seg and anat when present)."""
        paths = list(self.images.values()) if self.images else []
        paths += [p for p in (self.image4d, self.seg, self.anat) if p is not None]
        return paths


@dataclass
class CaseVolume:
    """One loaded case in canonical RAS+ orientation: image float32 (4,X,Y,Z), seg/anat uint8 (X,Y,Z).

    ``load_case`` returns ``image`` as a transposed view of a (Z,4,X,Y) C-contiguous buffer, so that axial
    slices are contiguous; it is a normal numpy array in every other respect.
    """

    case_id: str
    image: np.ndarray
    seg: np.ndarray | None
    anat: np.ndarray | None
    affine: np.ndarray
    spacing: tuple[float, float, float]
    files: CaseFiles


@dataclass(frozen=True)
class CaseProblem:
    """One thing wrong with a cohort: the case (None for the whole cohort), the file and the message."""

    case_id: str | None
    path: Path | None
    message: str

    def __str__(self) -> str:
        where = []
        if self.case_id is not None:
            where.append(f"case {self.case_id}")
        if self.path is not None:
            where.append(f"{'folder' if self.path.is_dir() else 'file'} {self.path}")
        return f"{', '.join(where)}: {self.message}" if where else self.message


class CaseList(list[CaseFiles]):
    """A list of cases that also carries the problems found while scanning (``problems``)."""

    def __init__(self, cases: Iterable[CaseFiles] = (), problems: Iterable[CaseProblem] = ()) -> None:
        super().__init__(cases)
        self.problems: list[CaseProblem] = list(problems)


@dataclass
class CaseSummary:
    """What ``fdn inspect`` reports about one readable case."""

    case_id: str
    layout: Layout
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    modalities: list[str]
    seg_counts: dict[str, int] | None
    anat_counts: dict[str, int] | None
    diseased: bool | None
    n_slices: int
    n_abnormal_slices: int | None
    files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return {
            "case_id": self.case_id,
            "layout": self.layout,
            "shape": list(self.shape),
            "spacing": [round(s, 6) for s in self.spacing],
            "modalities": self.modalities,
            "seg_counts": self.seg_counts,
            "anat_counts": self.anat_counts,
            "status": "unlabelled" if self.diseased is None else ("diseased" if self.diseased else "healthy"),
            "n_slices": self.n_slices,
            "n_abnormal_slices": self.n_abnormal_slices,
            "files": self.files,
        }


class _CaseError(Exception):
    """Internal: a problem found in one file of a case (turned into DataError / CaseProblem)."""

    def __init__(self, path: Path | None, message: str) -> None:
        super().__init__(message)
        self.path = path
        self.message = message


# --------------------------------------------------------------------------------------------- orientation


def _spatial_transform(affine: np.ndarray) -> np.ndarray:
    """nibabel orientation transform from the array's voxel axes to RAS+."""
    ornt = nib.orientations.io_orientation(np.asarray(affine, dtype=np.float64))
    return nib.orientations.ornt_transform(ornt, nib.orientations.axcodes2ornt("RAS"))


def _apply(array: np.ndarray, transform: np.ndarray, channels_first: bool) -> np.ndarray:
    if channels_first:
        moved = np.moveaxis(array, 0, -1)
        return np.moveaxis(nib.orientations.apply_orientation(moved, transform), -1, 0)
    return nib.orientations.apply_orientation(array, transform)


def to_canonical(
    array: np.ndarray, affine: np.ndarray, *, channels_first: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Reorient ``array`` (voxel axes first, e.g. (X,Y,Z) or (X,Y,Z,C); (C,X,Y,Z) with ``channels_first``)
    with voxel-to-RAS ``affine`` to the closest canonical RAS+ orientation, as ``nib.as_closest_canonical``.

    Returns ``(array, canonical_affine)``; the array may be a view (axis flips and permutations only).
    Slicer: pass the (I,J,K) array (``arrayFromVolume(node).T``) and the node's IJK-to-RAS matrix.
    """
    array = np.asarray(array)
    shape = array.shape[1:4] if channels_first else array.shape[:3]
    if len(shape) != 3:
        raise DataError(
            f"to_canonical: expected a 3D volume (optionally with channels), got shape {array.shape}"
        )
    transform = _spatial_transform(affine)
    new_affine = np.asarray(affine, dtype=np.float64) @ nib.orientations.inv_ornt_aff(transform, shape)
    return _apply(array, transform, channels_first), new_affine


def from_canonical(
    array: np.ndarray, affine_original: np.ndarray, *, channels_first: bool = False
) -> np.ndarray:
    """Inverse of ``to_canonical``: put a canonical-orientation array back on the voxel axes of the grid whose
    voxel-to-RAS matrix is ``affine_original`` (e.g. a Slicer node's IJK-to-RAS; transpose the result to KJI
    for ``updateVolumeFromArray``)."""
    ornt = nib.orientations.io_orientation(np.asarray(affine_original, dtype=np.float64))
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), ornt)
    return _apply(np.asarray(array), back, channels_first)


def _spacing(affine: np.ndarray) -> tuple[float, float, float]:
    sp = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    return (float(sp[0]), float(sp[1]), float(sp[2]))


# ------------------------------------------------------------------------------------------------ discovery


def detect_layout(root: str | Path) -> Layout:
    """ "msd" when ``root`` has ``imagesTr/`` or ``imagesTs/``, else "brats"."""
    root = Path(root)
    if (root / "imagesTr").is_dir() or (root / "imagesTs").is_dir():
        return "msd"
    return "brats"


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _nifti_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and _visible(p) and _NIFTI_NAME.match(p.name))


def _header(path: Path) -> nib.Nifti1Image:
    """Load a NIfTI header (voxels are read lazily); unreadable files become _CaseError."""
    try:
        img = nib.load(str(path))
    except FileNotFoundError as exc:
        raise _CaseError(path, "file is missing; restore it") from exc
    except Exception as exc:
        raise _CaseError(
            path, f"cannot be read as NIfTI ({type(exc).__name__}: {exc}); re-export or re-download the file"
        ) from exc
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise _CaseError(path, f"is a {type(img).__name__}, not NIfTI; convert it to .nii.gz")
    return img


def _spatial_shape(img: nib.Nifti1Image, path: Path, kind: str) -> tuple[int, int, int]:
    """The 3D shape of a single volume (trailing axes of length 1 are allowed, as some tools write them)."""
    shape = tuple(int(s) for s in img.shape)
    core = shape[:3] if len(shape) >= 3 and all(s == 1 for s in shape[3:]) else None
    if core is None or len(shape) < 3 or min(core) < 1:
        raise _CaseError(
            path,
            f"{kind} must be a 3D volume, but its shape is {shape}; "
            "give one 3D file per modality (split 4D files, or use the Decathlon layout for 4D images)",
        )
    return core  # type: ignore[return-value]


def _check_grid(
    affine: np.ndarray,
    ref_affine: np.ndarray,
    path: Path,
    kind: str,
    ref_kind: str,
    shape: tuple,
    ref_shape: tuple,
) -> None:
    if shape != ref_shape:
        raise _CaseError(
            path,
            f"{kind} has shape {shape} but {ref_kind} has {ref_shape}; all files of a case must share one "
            "voxel grid: resample them onto the same grid (e.g. with SimpleITK or 3D Slicer) and try again",
        )
    if not np.allclose(affine, ref_affine, rtol=0, atol=_AFFINE_TOL_MM):
        sp, ref_sp = _spacing(affine), _spacing(ref_affine)
        if not np.allclose(sp, ref_sp, rtol=0, atol=_AFFINE_TOL_MM):
            what = f"voxel spacing {tuple(round(s, 4) for s in sp)} mm differs from {ref_kind}'s " + str(
                tuple(round(s, 4) for s in ref_sp)
            )
        else:
            what = f"orientation/origin (affine) differs from {ref_kind}'s"
        raise _CaseError(
            path,
            f"{kind} {what}; all files of a case must share one voxel grid: "
            "resample or co-register them onto the same grid and try again",
        )


_MSD_SHAPE_MSG = (
    "a Decathlon image must be 4D (X, Y, Z, 4) with channels FLAIR, T1w, T1gd, T2w, but its shape is "
    "{shape}; give all four channels in one file (or use the BraTS folder layout)"
)


@dataclass
class _Headers:
    """A case's opened headers, after checking that they share one voxel grid."""

    images: dict[str, nib.Nifti1Image]  # BraTS: one per modality; MSD: {"image": the 4D file}
    seg: nib.Nifti1Image | None
    anat: nib.Nifti1Image | None
    shape: tuple[int, int, int]
    affine: np.ndarray


def _open_headers(files: CaseFiles) -> _Headers:
    """Header-level checks of one case (cheap: voxels are not read)."""
    images: dict[str, nib.Nifti1Image] = {}
    if files.layout == "brats":
        if not files.images:
            raise _CaseError(None, "no image files")
        ref_kind = MODALITIES[0]
        for mod in MODALITIES:
            path = files.images[mod]
            img = images[mod] = _header(path)
            shape = _spatial_shape(img, path, mod)
            if mod == ref_kind:
                ref_shape, ref_affine = shape, np.asarray(img.affine, dtype=np.float64)
            else:
                _check_grid(img.affine, ref_affine, path, mod, ref_kind, shape, ref_shape)
    else:
        if files.image4d is None:
            raise _CaseError(None, "no 4D image file")
        img = images["image"] = _header(files.image4d)
        shape4 = tuple(int(s) for s in img.shape)
        if len(shape4) != 4 or shape4[3] != 4:
            raise _CaseError(files.image4d, _MSD_SHAPE_MSG.format(shape=shape4))
        ref_kind, ref_shape = "image", shape4[:3]
        ref_affine = np.asarray(img.affine, dtype=np.float64)
    labels: dict[str, nib.Nifti1Image | None] = {}
    for kind, path in (("seg", files.seg), ("anat", files.anat)):
        labels[kind] = None
        if path is not None:
            img = labels[kind] = _header(path)
            _check_grid(
                img.affine, ref_affine, path, kind, ref_kind, _spatial_shape(img, path, kind), ref_shape
            )
    return _Headers(images, labels["seg"], labels["anat"], ref_shape, ref_affine)  # type: ignore[arg-type]


def _brats_case_dirs(root: Path) -> list[Path]:
    """Folders that hold one BraTS case each (root itself, its children, or grandchildren under groups)."""
    if any(_BRATS_NAME.match(p.name) for p in _nifti_files(root)):
        return [root]
    found: list[Path] = []
    for child in sorted(p for p in root.iterdir() if p.is_dir() and _visible(p)):
        niftis = _nifti_files(child)
        if niftis:
            found.append(child)
            continue
        grand = [g for g in sorted(child.iterdir()) if g.is_dir() and _visible(g) and _nifti_files(g)]
        if grand:
            found.extend(grand)
        else:
            log.debug("ignoring folder without NIfTI files: %s", child)
    return found


def _brats_case(folder: Path) -> CaseFiles:
    """Collect one BraTS case folder's files; missing or ambiguous files become _CaseError."""
    by_kind: dict[str, list[Path]] = {}
    prefixes: set[str] = set()
    unknown: list[str] = []
    for path in _nifti_files(folder):
        m = _BRATS_NAME.match(path.name)
        if m is None:
            unknown.append(path.name)
            continue
        prefixes.add(m.group("prefix"))
        by_kind.setdefault(m.group("kind").lower(), []).append(path)
    case_id = folder.name
    if len(prefixes) > 1:
        raise _CaseError(
            folder,
            f"holds files of several cases ({', '.join(sorted(prefixes))}); put each case in its own folder",
        )
    if not by_kind:
        raise _CaseError(
            folder,
            "no file follows the BraTS naming <case>_<t1|t1ce|t2|flair|seg>.nii.gz "
            f"(found {', '.join(unknown)}); rename the files",
        )
    for kind, paths in by_kind.items():
        if len(paths) > 1:
            raise _CaseError(
                folder, f"several {kind} files ({', '.join(p.name for p in paths)}); keep exactly one"
            )
    missing = [m for m in MODALITIES if m not in by_kind]
    if missing:
        prefix = next(iter(prefixes)) if len(prefixes) == 1 else case_id
        want = ", ".join(f"{prefix}_{m}.nii.gz" for m in missing)
        raise _CaseError(
            folder / f"{prefix}_{missing[0]}.nii.gz",
            f"missing modality {', '.join(missing)} (expected {want}); every case needs T1, T1ce, T2 and "
            "FLAIR: add the file(s) or remove the case folder",
        )
    return CaseFiles(
        case_id=case_id,
        layout="brats",
        images={m: by_kind[m][0] for m in MODALITIES},
        image4d=None,
        seg=by_kind.get("seg", [None])[0],
        anat=by_kind.get("anat", [None])[0],
    )


def _msd_channel_order(root: Path) -> tuple[str, ...]:
    """Channel order from dataset.json's "modality" entry (MSD_CHANNELS when there is no dataset.json)."""
    path = root / "dataset.json"
    if not path.exists():
        return MSD_CHANNELS
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        modality = meta["modality"]
        names = [str(modality[str(i)]) for i in range(len(modality))]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _CaseError(
            path,
            f'cannot read its "modality" entry ({type(exc).__name__}: {exc}); fix or remove dataset.json',
        ) from exc
    order = tuple(MSD_MODALITY_NAMES.get(re.sub(r"[^a-z0-9]", "", n.lower()), "?") for n in names)
    if sorted(order) != sorted(MODALITIES):
        raise _CaseError(
            path,
            f'"modality" lists {names}; expected the four channels FLAIR, T1w, T1gd, T2w (in any order); '
            "fix dataset.json",
        )
    return order


def _by_stem(folder: Path) -> dict[str, Path]:
    """NIfTI files of a folder keyed by name without extension (empty when the folder is absent)."""
    if not folder.is_dir():
        return {}
    return {_NIFTI_NAME.match(p.name).group("stem"): p for p in _nifti_files(folder)}  # type: ignore[union-attr]


def _msd_cases(root: Path, problems: list[CaseProblem]) -> list[CaseFiles]:
    try:
        order = _msd_channel_order(root)
    except _CaseError as exc:
        problems.append(CaseProblem(None, exc.path, exc.message))
        return []
    cases: list[CaseFiles] = []
    for split, labelled in (("Tr", True), ("Ts", False)):
        images_dir = root / f"images{split}"
        if not images_dir.is_dir():
            continue
        label_dir, anat_dir = root / f"labels{split}", root / f"anat{split}"
        images, labels, anats = _by_stem(images_dir), _by_stem(label_dir), _by_stem(anat_dir)
        for stem in sorted(set(labels) - set(images)):
            problems.append(
                CaseProblem(
                    stem,
                    labels[stem],
                    f"label file has no image images{split}/{stem}.nii.gz; add the image or remove the label",
                )
            )
        for stem in sorted(set(anats) - set(images)):
            problems.append(
                CaseProblem(
                    stem,
                    anats[stem],
                    f"anatomy file has no image images{split}/{stem}.nii.gz; "
                    "add the image or remove the anatomy file",
                )
            )
        for stem, path in images.items():
            if labelled and stem not in labels:
                problems.append(
                    CaseProblem(
                        stem,
                        label_dir / f"{stem}.nii.gz",
                        "training image (imagesTr) has no label in labelsTr; add the label, or move the "
                        "image to imagesTs if the case is unlabelled",
                    )
                )
                continue
            cases.append(CaseFiles(stem, "msd", None, path, labels.get(stem), anats.get(stem), order))
    return cases


def scan_cohort(root: str | Path) -> tuple[list[CaseFiles], list[CaseProblem]]:
    """Find every case under ``root`` and check its files' headers; returns ``(good_cases, problems)``.

    Voxels are not read here: ``validate_cohort`` additionally loads every case.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"{root}: not a folder; give the folder holding the BraTS case folders or the Decathlon "
            "task (imagesTr/, labelsTr/)"
        )
    problems: list[CaseProblem] = []
    layout = detect_layout(root)
    candidates: list[CaseFiles] = []
    if layout == "msd":
        candidates = _msd_cases(root, problems)
    else:
        for folder in _brats_case_dirs(root):
            try:
                candidates.append(_brats_case(folder))
            except _CaseError as exc:
                problems.append(CaseProblem(folder.name, exc.path, exc.message))
    good: list[CaseFiles] = []
    seen: dict[str, CaseFiles] = {}
    for case in candidates:
        if case.case_id in seen:
            problems.append(
                CaseProblem(
                    case.case_id,
                    case.all_paths()[0],
                    f"case id also used by {seen[case.case_id].all_paths()[0]}; case ids must be unique: "
                    "rename one of the folders",
                )
            )
            continue
        seen[case.case_id] = case
        try:
            _open_headers(case)
        except _CaseError as exc:
            problems.append(CaseProblem(case.case_id, exc.path, exc.message))
            continue
        good.append(case)
    problems.sort(key=lambda p: (p.case_id or "", str(p.path)))
    if not good and not problems:
        problems.append(
            CaseProblem(
                None,
                root,
                "no cases found; expected BraTS case folders (<case>/<case>_t1.nii.gz, _t1ce, _t2, _flair) "
                "or a Decathlon task (imagesTr/, labelsTr/, dataset.json): check the path",
            )
        )
    return good, problems


def _problem_report(root: Path, problems: list[CaseProblem]) -> str:
    lines = "\n".join(f"  - {p}" for p in problems)
    return f"{len(problems)} problem(s) in cohort {root}:\n{lines}"


def find_cases(root: str | Path, skip_bad: bool = False) -> CaseList:
    """Cases under ``root`` (BraTS or Decathlon layout), sorted by id.

    Any problem raises one DataError listing all of them, unless ``skip_bad``: then each bad case is logged as
    a warning and left out, and the problems are on the returned list's ``problems`` attribute. A cohort with
    no usable case is always an error.
    """
    root = Path(root)
    good, problems = scan_cohort(root)
    if problems and not skip_bad:
        if all(p.case_id is None for p in problems):
            raise DataError(_problem_report(root, problems))
        hint = "fix or remove these files" + (
            ", or skip the bad cases explicitly (skip_bad=True)" if good else ""
        )
        raise DataError(f"{_problem_report(root, problems)}\n{hint}")
    if not good:
        raise DataError(f"{_problem_report(root, problems)}\nno usable case is left; fix the files")
    for p in problems:
        log.warning("skipping bad case: %s", p)
    return CaseList(sorted(good, key=lambda c: c.case_id), problems)


# ---------------------------------------------------------------------------------------------------- loading


def _read_voxels(img: nib.Nifti1Image, path: Path) -> np.ndarray:
    try:
        return np.asanyarray(img.dataobj)
    except MemoryError:
        raise
    except Exception as exc:
        raise _CaseError(
            path,
            f"voxel data cannot be read ({type(exc).__name__}: {exc}); the file is truncated or corrupt: "
            "re-export or re-download it",
        ) from exc


def _check_finite(data: np.ndarray, path: Path, kind: str) -> None:
    if data.dtype.kind in "fc" and not np.isfinite(data).all():
        n_nan, n_inf = int(np.isnan(data).sum()), int(np.isinf(data).sum())
        raise _CaseError(
            path,
            f"{kind} contains {n_nan} NaN and {n_inf} infinite voxel(s); replace them (e.g. by 0 outside the "
            "brain) and save the file again",
        )


def _read_labels(
    img: nib.Nifti1Image, path: Path, mapping: dict[int, int], kind: str, desc: str
) -> np.ndarray:
    """Read a label volume and map file values to ours (uint8); unknown values are _CaseError."""
    raw = _read_voxels(img, path)
    raw = raw.reshape(raw.shape[:3])
    if raw.dtype.kind == "f":
        _check_finite(raw, path, kind)
        rounded = np.rint(raw)
        if not np.array_equal(rounded, raw):
            bad = np.unique(raw[rounded != raw])[:5]
            raise _CaseError(path, f"{kind} has non-integer values such as {bad.tolist()}; expected {desc}")
        raw = rounded
    elif raw.dtype.kind not in "iub":
        raise _CaseError(path, f"{kind} has data type {raw.dtype}; expected integer {desc}")
    lo, hi = (float(raw.min()), float(raw.max())) if raw.size else (0.0, 0.0)
    lut = np.full(256, 255, dtype=np.uint8)
    for src, dst in mapping.items():
        lut[src] = dst
    if lo < 0 or hi > 255:
        bad_vals = [v for v in (lo, hi) if v < 0 or v > 255]
        raise _CaseError(
            path, f"{kind} has values {[int(v) for v in bad_vals]} outside {desc}; fix the labels"
        )
    mapped = lut[raw.astype(np.uint8, copy=False)]
    invalid = mapped == 255
    if invalid.any():
        values = np.unique(raw[invalid]).astype(int).tolist()
        raise _CaseError(
            path, f"{kind} has label value(s) {values} that are not {desc}; fix or convert the labels"
        )
    return mapped


def _load_case(files: CaseFiles) -> CaseVolume:
    heads = _open_headers(files)
    transform = _spatial_transform(heads.affine)
    affine = heads.affine @ nib.orientations.inv_ornt_aff(transform, heads.shape)
    canon_shape = tuple(heads.shape[int(axis)] for axis in transform[:, 0].argsort())
    # The image lives in a (Z, 4, X, Y) buffer and is exposed as its (4, X, Y, Z) view: axial slices are then
    # contiguous for slicing and resizing, and each channel is cast, reoriented and transposed in one copy.
    buffer = np.empty((canon_shape[2], len(MODALITIES), canon_shape[0], canon_shape[1]), dtype=np.float32)
    image = buffer.transpose(1, 2, 3, 0)
    if files.layout == "brats":
        for c, mod in enumerate(MODALITIES):
            path = files.images[mod]  # type: ignore[index]
            data = _read_voxels(heads.images[mod], path).reshape(heads.shape)
            _check_finite(data, path, mod)
            image[c] = nib.orientations.apply_orientation(data, transform)
    else:
        data = _read_voxels(heads.images["image"], files.image4d)  # type: ignore[arg-type]
        _check_finite(data, files.image4d, "image")  # type: ignore[arg-type]
        order = files.channel_order or MSD_CHANNELS
        for c, mod in enumerate(MODALITIES):
            image[c] = nib.orientations.apply_orientation(data[..., order.index(mod)], transform)
    labels: list[np.ndarray | None] = [None, None]
    if heads.seg is not None:
        mapping, desc = (
            (BRATS_FILE_TO_CLASS, _BRATS_DESC) if files.layout == "brats" else (MSD_FILE_TO_CLASS, _MSD_DESC)
        )
        seg = _read_labels(heads.seg, files.seg, mapping, "seg", desc)  # type: ignore[arg-type]
        labels[0] = np.ascontiguousarray(nib.orientations.apply_orientation(seg, transform))
    if heads.anat is not None:
        anat = _read_labels(heads.anat, files.anat, _ANAT_TO_LABEL, "anat", _ANAT_DESC)  # type: ignore[arg-type]
        labels[1] = np.ascontiguousarray(nib.orientations.apply_orientation(anat, transform))
    return CaseVolume(files.case_id, image, labels[0], labels[1], affine, _spacing(affine), files)


def canonical_shape(files: CaseFiles) -> tuple[int, int, int]:
    """(X, Y, Z) of the case once reoriented to canonical RAS+, from its headers (voxels are not read)."""
    try:
        heads = _open_headers(files)
    except _CaseError as exc:
        where = f", file {exc.path}" if exc.path is not None else ""
        raise DataError(f"case {files.case_id}{where}: {exc.message}") from exc
    transform = _spatial_transform(heads.affine)
    return tuple(heads.shape[int(axis)] for axis in transform[:, 0].argsort())  # type: ignore[return-value]


def load_case(files: CaseFiles) -> CaseVolume:
    """Read one case into canonical RAS+ arrays (channels ``MODALITIES``, classes 0..3).

    Raises DataError naming the case, the file, what is wrong and what to do.
    """
    try:
        return _load_case(files)
    except _CaseError as exc:
        where = f", file {exc.path}" if exc.path is not None else ""
        raise DataError(f"case {files.case_id}{where}: {exc.message}") from exc


# ------------------------------------------------------------------------------------------------ inspection


def summarize_case(case: CaseVolume) -> CaseSummary:
    """Shape, spacing, modalities and label counts of a loaded case."""
    seg_counts = anat_counts = None
    diseased = n_abn = None
    if case.seg is not None:
        counts = np.bincount(case.seg.ravel(), minlength=len(ABNORMAL_NAMES))
        seg_counts = {ABNORMAL_NAMES[i]: int(counts[i]) for i in range(len(ABNORMAL_NAMES))}
        per_slice = (case.seg > 0).any(axis=(0, 1))
        diseased, n_abn = bool(per_slice.any()), int(per_slice.sum())
    if case.anat is not None:
        counts = np.bincount(case.anat.ravel(), minlength=len(ANATOMY_NAMES))
        anat_counts = {ANATOMY_NAMES[i]: int(counts[i]) for i in range(len(ANATOMY_NAMES))}
    files = case.files
    mods = list(MODALITIES) if files.layout == "brats" else list(files.channel_order or MSD_CHANNELS)
    return CaseSummary(
        case_id=case.case_id,
        layout=files.layout,
        shape=tuple(int(s) for s in case.image.shape[1:]),  # type: ignore[arg-type]
        spacing=case.spacing,
        modalities=mods,
        seg_counts=seg_counts,
        anat_counts=anat_counts,
        diseased=diseased,
        n_slices=int(case.image.shape[3]),
        n_abnormal_slices=n_abn,
        files=[str(p) for p in files.all_paths()],
    )


def _parallel_map(fn: Callable[[Any], Any], items: list[Any], workers: int | None) -> Iterable[Any]:
    """Ordered map over a thread pool (file reads and numpy release the GIL), at most workers+1 in flight."""
    n = max(1, int(workers or 1))
    if n == 1 or len(items) < 2:
        for item in items:
            yield fn(item)
        return
    with ThreadPoolExecutor(max_workers=n) as pool:
        pending = []
        it = iter(items)
        for item in it:
            pending.append(pool.submit(fn, item))
            if len(pending) > n:
                yield pending.pop(0).result()
        for fut in pending:
            yield fut.result()


def validate_cohort(
    root: str | Path, progress: Progress | None = None, workers: int | None = None
) -> tuple[list[CaseSummary], list[CaseProblem]]:
    """Scan ``root`` and load every case (finds NaN/Inf, truncated files, unknown labels too).

    Returns summaries of the readable cases and every problem; raises only when ``root`` is not a folder.
    """
    cases, problems = scan_cohort(root)

    def load(files: CaseFiles) -> CaseSummary | CaseProblem:
        try:
            return summarize_case(_load_case(files))
        except _CaseError as exc:
            return CaseProblem(files.case_id, exc.path, exc.message)

    summaries: list[CaseSummary] = []
    total = len(cases)
    if progress is not None and total:
        progress.update(0, total, "checking cases")
    for i, result in enumerate(_parallel_map(load, cases, workers), 1):
        (summaries if isinstance(result, CaseSummary) else problems).append(result)
        if progress is not None:
            progress.update(i, total, "checking cases")
    summaries.sort(key=lambda s: s.case_id)
    return summaries, problems


# ---------------------------------------------------------------------------------------------------- writing


def nifti_bytes(array: np.ndarray, affine: np.ndarray, gz: bool = True) -> bytes:
    """NIfTI-1 bytes (gzipped with a fixed timestamp: equal arrays give equal files) with q- and sform set."""
    affine = np.asarray(affine, dtype=np.float64)
    img = nib.Nifti1Image(np.asarray(array), affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    raw = img.to_bytes()
    return gzip.compress(raw, compresslevel=1, mtime=0) if gz else raw


def _to_file_labels(labels: np.ndarray, mapping: dict[int, int], what: str) -> np.ndarray:
    inverse = np.full(256, 255, dtype=np.uint8)
    for src, dst in mapping.items():
        inverse[dst] = src
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= len(mapping)):
        raise DataError(
            f"{what}: values must be 0..{len(mapping) - 1}, got {int(labels.min())}..{int(labels.max())}"
        )
    return inverse[labels.astype(np.uint8)]


def write_brats_case(
    case_dir: str | Path,
    case_id: str,
    image: np.ndarray,
    seg: np.ndarray | None = None,
    anat: np.ndarray | None = None,
    affine: np.ndarray | None = None,
    image_dtype: type = np.float32,
) -> CaseFiles:
    """Write one case in BraTS layout (``<case_dir>/<case_id>_<mod>.nii.gz``; seg in BraTS labels 1/2/4).

    ``image`` is (4,X,Y,Z) in ``MODALITIES`` order, ``seg`` our classes 0..3, ``anat`` 0..6; each file is
    written atomically. Returns the files as ``find_cases`` would.
    """
    case_dir = Path(case_dir)
    image = np.asarray(image)
    if image.ndim != 4 or image.shape[0] != len(MODALITIES):
        raise DataError(f"write_brats_case({case_id}): image must be (4, X, Y, Z), got {image.shape}")
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    paths: dict[str, Path] = {}
    for c, mod in enumerate(MODALITIES):
        data = image[c]
        if np.dtype(image_dtype).kind in "iu":
            info = np.iinfo(image_dtype)
            data = np.clip(np.rint(data), info.min, info.max)
        paths[mod] = case_dir / f"{case_id}_{mod}.nii.gz"
        atomic_write_bytes(paths[mod], nifti_bytes(data.astype(image_dtype), affine))
    seg_path = anat_path = None
    if seg is not None:
        seg_path = case_dir / f"{case_id}_seg.nii.gz"
        atomic_write_bytes(
            seg_path, nifti_bytes(_to_file_labels(seg, BRATS_FILE_TO_CLASS, f"{case_id} seg"), affine)
        )
    if anat is not None:
        anat_path = case_dir / f"{case_id}_anat.nii.gz"
        atomic_write_bytes(
            anat_path, nifti_bytes(_to_file_labels(anat, _ANAT_TO_LABEL, f"{case_id} anat"), affine)
        )
    return CaseFiles(case_id, "brats", paths, None, seg_path, anat_path)


def write_msd_copy(
    brats_dir: str | Path, out_dir: str | Path, overwrite: bool = False, progress: Progress | None = None
) -> Path:
    """Convert a BraTS-layout cohort into a Decathlon-layout copy at ``out_dir`` (written atomically).

    Cases with a segmentation go to imagesTr/labelsTr, the others to imagesTs; anatomy labels to
    anatTr/anatTs. File names keep the BraTS case ids; volumes are written in canonical RAS+ orientation as
    float32 4D images (channels FLAIR, T1w, T1gd, T2w) and uint8 labels (1 edema, 2 non-enhancing,
    3 enhancing).
    """
    if Path(out_dir).exists() and not overwrite:
        raise DataError(f"{out_dir}: already exists; choose another output folder or allow overwriting it")
    cases = find_cases(brats_dir)
    training: list[dict[str, str]] = []
    test: list[str] = []
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        total = len(cases)
        if progress is not None:
            progress.update(0, total, "writing Decathlon copy")
        for i, files in enumerate(cases, 1):
            case = load_case(files)
            split = "Tr" if case.seg is not None else "Ts"
            name = f"{case.case_id}.nii.gz"
            order = [MODALITIES.index(m) for m in MSD_CHANNELS]
            image4d = np.moveaxis(case.image[order], 0, -1)
            atomic_write_bytes(tmp / f"images{split}" / name, nifti_bytes(image4d, case.affine))
            if case.seg is not None:
                labels = _to_file_labels(case.seg, MSD_FILE_TO_CLASS, f"{case.case_id} seg")
                atomic_write_bytes(tmp / "labelsTr" / name, nifti_bytes(labels, case.affine))
                training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
            else:
                test.append(f"./imagesTs/{name}")
            if case.anat is not None:
                atomic_write_bytes(tmp / f"anat{split}" / name, nifti_bytes(case.anat, case.affine))
            if progress is not None:
                progress.update(i, total, "writing Decathlon copy")
        atomic_write_json(
            tmp / "dataset.json",
            {
                "name": "BRATS",
                "description": f"Decathlon-layout copy of {Path(brats_dir).name} written by fdn_core",
                "tensorImageSize": "4D",
                "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
                "labels": {
                    "0": "background",
                    "1": "edema",
                    "2": "non-enhancing tumor",
                    "3": "enhancing tumour",
                },
                "numTraining": len(training),
                "numTest": len(test),
                "training": training,
                "test": test,
            },
        )
    return Path(out_dir)
