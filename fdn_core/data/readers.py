"""Readers for BraTS (2019-2021) and Medical Segmentation Decathlon (Task01_BrainTumour) cohorts, and for
one study given file by file.

Layouts read
------------
BraTS: ``DIR/<case>/<case>_{t1,t1ce,t2,flair}<ext>``, optional ``<case>_seg<ext>`` (labels 0, 1 NCR/NET,
2 ED, 4 ET; absent for validation/test cases) and optional ``<case>_anat<ext>`` (normal anatomy, 0..6), where
``<ext>`` is a NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``) or MetaImage (``.mha``, ``.mhd``)
extension. Case folders may be grouped one level deeper (``HGG/``, ``LGG/`` as in BraTS 2019); a folder that
itself holds the modality files is read as a single case.

MSD: ``DIR/imagesTr/<case>.nii.gz`` 4D ``(X, Y, Z, 4)`` with channels FLAIR, T1w, T1gd, T2w (or the order
``dataset.json`` names), ``DIR/labelsTr/<case>.nii.gz`` (0 bg, 1 edema, 2 non-enhancing tumour, 3 enhancing),
``DIR/imagesTs/`` without labels. Our choice for the optional anatomy labels in this layout is
``DIR/anatTr/<case>.nii.gz`` (and ``DIR/anatTs/`` for test cases). Hidden files (``._BRATS_001.nii.gz`` that
macOS archives carry) are ignored.

One study (``case_files_from_paths``, e.g. ``fdn query --case``): a case folder, or its files one by one, in
any of the formats above or as folders holding one DICOM series each.

Formats: NIfTI is read with nibabel; NRRD, MetaImage and DICOM series with SimpleITK, whose LPS geometry is
converted to the same voxel-to-RAS matrix nibabel gives. All are mapped to one convention: channels
``MODALITIES`` = (t1, t1ce, t2, flair), classes 0 bg, 1 NCR/NET, 2 ED, 3 ET, volumes reoriented to the closest
canonical RAS+ orientation (docs/ARCHITECTURE.md).

Voxel grids: in a cohort folder all files of a case must share one voxel grid (a mismatch is an error) unless
the cohort is read with ``resample=True``; a study given file by file is resampled onto its T1ce grid (linear
for images, nearest neighbour for labels), and the loaded ``CaseVolume.resampled`` says which files were.

Bad input never vanishes silently: ``find_cases`` checks headers (missing files, dimensions, shapes, grids,
voxel counts against ``MAX_VOXELS`` and against the file's size) and raises one ``DataError`` listing every
problem unless ``skip_bad`` is given; problems that only show when the voxels are read (NaN/Inf, truncated
files, unknown label values) are found by ``load_case`` and by the validating scan ``validate_cohort`` that
``fdn inspect`` runs.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar

import nibabel as nib
import numpy as np
import numpy.typing as npt

from fdn_core.data._typed_io import (
    SitkImage,
    SitkImageFileReader,
    nifti1_image,
    nifti_header,
    orientations,
    simpleitk,
)
from fdn_core.errors import DataError
from fdn_core.fileio import atomic_dir, atomic_write_bytes, atomic_write_json, describe_os_error
from fdn_core.labels import (
    ABNORMAL_NAMES,
    ANATOMY_NAMES,
    BRATS_FILE_TO_CLASS,
    MODALITIES,
    MSD_CHANNELS,
    MSD_DATASET_LABELS,
    MSD_DATASET_MODALITY,
    MSD_FILE_TO_CLASS,
    MSD_MODALITY_NAMES,
)
from fdn_core.progress import Progress

_T = TypeVar("_T")
_R = TypeVar("_R")

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_VOXELS",
    "OBLIQUE_ENV",
    "OBLIQUE_POLICIES",
    "OBLIQUE_TOLERANCE_DEG",
    "REFERENCE_SEQUENCE",
    "SOURCE_KEYS",
    "CaseFiles",
    "CaseList",
    "CaseProblem",
    "CaseSummary",
    "CaseVolume",
    "ObliquePolicy",
    "affine_problem",
    "axis_aligned_grid",
    "canonical_grid",
    "canonical_shape",
    "case_files_from_paths",
    "check_affine",
    "detect_layout",
    "find_cases",
    "from_canonical",
    "load_case",
    "nifti_bytes",
    "oblique_policy",
    "obliquity_deg",
    "parallel_map",
    "resample_to_grid",
    "resolve_source",
    "scan_cohort",
    "set_oblique_policy",
    "summarize_case",
    "to_canonical",
    "validate_cohort",
    "validate_source",
    "write_brats_case",
    "write_msd_copy",
]

log = logging.getLogger(__name__)

#: File name endings read as images (NIfTI through nibabel; NRRD and MetaImage through SimpleITK).
IMAGE_EXTENSIONS: tuple[str, ...] = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
#: Most voxels one image file may claim in its header (all axes, channels included). A header claiming more
#: is corrupt or not one MR volume; it is rejected before any voxel memory is allocated.
MAX_VOXELS: int = 2**31
#: The sequence whose voxel grid a case's other files are resampled onto (when resampling is allowed).
REFERENCE_SEQUENCE = "t1ce"
#: Keys of a case's recorded source in a code database (``CaseFiles.to_source``).
SOURCE_KEYS: tuple[str, ...] = ("layout", "images", "image4d", "seg", "anat")
#: A grid whose voxel axes are rotated against the world axes by more than this (degrees) is oblique: the
#: canonical reorientation (axis permutations and flips) cannot make its slices axial. At 1 degree a point
#: 100 mm from the centre moves 1.7 mm, under two voxels of a 1 mm grid.
OBLIQUE_TOLERANCE_DEG: float = 1.0
#: How an oblique grid is read: "auto" resamples where a case may be resampled (``CaseFiles.resample``:
#: query studies, database sources) and refuses it in cohorts; "resample" always resamples it onto an
#: axis-aligned grid; "refuse" always refuses it; "accept" reads it as its nearest axis-aligned orientation
#: (the rotation is ignored, with a warning).
OBLIQUE_POLICIES: tuple[str, ...] = ("auto", "resample", "refuse", "accept")
#: Environment variable holding the oblique policy (``fdn --oblique`` sets it for one command).
OBLIQUE_ENV = "FDN_OBLIQUE"
ObliquePolicy = Literal["auto", "resample", "refuse", "accept"]
_oblique_policy: ObliquePolicy | None = None
_ORNT = orientations()
# A voxel axis shorter than this (mm), or two axes closer than asin(_MIN_AXIS_SINE) to parallel, make a
# voxel-to-world matrix singular.
_MIN_VOXEL_MM = 1e-6
_MIN_AXIS_SINE = 1e-6
_SINGULAR_FIX = (
    "the header's orientation or voxel size is corrupt: re-export the image with a valid geometry (NIfTI: "
    "sform/qform and pixdim; NRRD: space directions; MetaImage: TransformMatrix and ElementSpacing)"
)

_ANAT_TO_LABEL: dict[int, int] = {i: i for i in range(len(ANATOMY_NAMES))}
_BRATS_DESC = "BraTS labels {0 background, 1 NCR/NET, 2 oedema, 4 enhancing}"
_MSD_DESC = "Decathlon labels {0 background, 1 edema, 2 non-enhancing tumour, 3 enhancing tumour}"
_ANAT_DESC = "anatomy labels {0 background, 1-6 (L/R cerebrum, L/R cerebellum, L/R lateral ventricle)}"

_EXT_PATTERN = "|".join(re.escape(e) for e in sorted(IMAGE_EXTENSIONS, key=len, reverse=True))
# <case>_<kind><ext>: an image file; <case>_<kind> without extension: a folder holding one DICOM series.
_BRATS_NAME = re.compile(
    rf"^(?P<prefix>.+)_(?P<kind>t1ce|t1|t2|flair|seg|anat)(?P<ext>{_EXT_PATTERN})?$", re.IGNORECASE
)
_IMAGE_NAME = re.compile(rf"^(?P<stem>.+?)(?P<ext>{_EXT_PATTERN})$", re.IGNORECASE)
_NIFTI_NAME = re.compile(r"^(?P<stem>.+?)\.nii(?:\.gz)?$", re.IGNORECASE)
# KIND=PATH on the command line: a file or DICOM folder whose name does not say which sequence it is.
_KIND_SPEC = re.compile(r"^(?P<kind>t1ce|t1|t2|flair|seg|anat)=(?P<path>.+)$", re.IGNORECASE)
_NAMING_HELP = (
    "<case>_<t1|t1ce|t2|flair|seg|anat> followed by .nii[.gz], .nrrd, .nhdr, .mha or .mhd (a DICOM series "
    "folder: no extension)"
)
_FORMATS_HELP = (
    "NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) or a folder holding one DICOM series"
)
# Grids of a case's files must agree to this many millimetres (headers store float32 values).
_AFFINE_TOL_MM = 1e-3

Layout = Literal["brats", "msd"]


@dataclass
class CaseFiles:
    """Where one case's files are. BraTS: ``images`` maps each modality to its file (or DICOM series folder);
    MSD: ``image4d``.

    ``channel_order`` (MSD only) names the 4D file's channels in our vocabulary; None means ``MSD_CHANNELS``.
    ``resample``: files on another voxel grid than the T1ce (MSD: the image) are resampled onto it when the
    case is loaded, instead of being an error.
    """

    case_id: str
    layout: Layout
    images: dict[str, Path] | None
    image4d: Path | None
    seg: Path | None
    anat: Path | None
    channel_order: tuple[str, ...] | None = None
    resample: bool = False

    def all_paths(self) -> list[Path]:
        """Every file of the case (images, then seg and anat when present)."""
        paths = list(self.images.values()) if self.images else []
        paths += [p for p in (self.image4d, self.seg, self.anat) if p is not None]
        return paths

    def to_source(self, base: str | Path | None = None) -> dict[str, Any]:
        """The source a code database records for this case: layout and file paths (plain JSON).

        ``base``: the database folder. A file inside that folder or beside it (under the folder's parent, e.g.
        ``demo/cohort`` next to ``demo/db``) is recorded relative to ``base`` (POSIX separators), so the
        database and its cohort can be moved or copied together; any other file, or every file without
        ``base``, is recorded as an absolute path.
        """

        def opt(p: Path | None) -> str | None:
            return None if p is None else _source_path(Path(p), base)

        return {
            "layout": str(self.layout),
            "images": None if self.images is None else {str(m): opt(p) for m, p in self.images.items()},
            "image4d": opt(self.image4d),
            "seg": opt(self.seg),
            "anat": opt(self.anat),
        }

    @classmethod
    def from_source(
        cls, case_id: str, source: Mapping[str, Any], base: str | Path | None = None
    ) -> CaseFiles:
        """The files of a database case from its recorded source (``to_source``, ``CodeDatabase.sources``).

        ``base``: the database folder, against which relative paths are resolved (``from_database`` passes
        it); absolute paths (databases written before relative paths existed) are used as they are.
        Decathlon cases are looked up again in their cohort folder, because the 4D channel order comes from
        its ``dataset.json`` and is not part of the recorded source. The case was accepted when it was
        indexed, so files on different grids are resampled as they were then.
        """
        source = resolve_source(case_id, source, base)
        paths = [p for p in (*(source["images"] or {}).values(), source["image4d"]) if p]
        missing = [p for p in paths if not Path(p).exists()]
        if missing:
            raise DataError(
                f"case {case_id}: source file(s) {missing[:3]} recorded in the database no longer exist; "
                "move the files back, or re-index the case from its new location "
                "(fdn index remove, then fdn index add)"
            )
        layout, images = source["layout"], source["images"]
        if layout == "msd" and source["image4d"]:
            root = Path(source["image4d"]).parent.parent
            for files in find_cases(root, skip_bad=True, resample=True):
                if files.case_id == case_id:
                    return files
            raise DataError(
                f"case {case_id}: not found again in its Decathlon folder {root}; re-index the case"
            )
        if layout != "brats" or not images or sorted(images) != sorted(MODALITIES):
            raise DataError(f"case {case_id}: the recorded source {source!r} is not a complete BraTS case")
        return cls(
            case_id=case_id,
            layout="brats",
            images={m: Path(images[m]) for m in MODALITIES},
            image4d=None,
            seg=None if source["seg"] is None else Path(source["seg"]),
            anat=None if source["anat"] is None else Path(source["anat"]),
            resample=True,
        )

    @classmethod
    def from_database(cls, db: Any, case_id: str) -> CaseFiles:
        """The files of case ``case_id`` of code database ``db`` (anything with ``sources()`` and ``path``),
        relative paths resolved against the database folder."""
        return cls.from_source(case_id, db.sources(case_id), base=db.path)


def _source_path(path: Path, base: str | Path | None) -> str:
    """``path`` as a database records it: relative to ``base`` if inside ``base``'s parent, else absolute."""
    absolute = path.resolve()
    if base is None:
        return str(absolute)
    folder = Path(base).resolve()
    if not absolute.is_relative_to(folder.parent):
        return str(absolute)
    return Path(os.path.relpath(absolute, folder)).as_posix()


def resolve_source(case_id: str, source: Mapping[str, Any], base: str | Path | None) -> dict[str, Any]:
    """A validated source (``validate_source``) whose relative paths are made absolute against ``base``.

    DataError when the source holds relative paths but no ``base`` (the database folder) is given.
    """
    out = validate_source(case_id, source)

    def absolute(p: str | None) -> str | None:
        if p is None or os.path.isabs(p):
            return p
        if base is None:
            raise DataError(
                f"case {case_id!r}: the database records the path {p!r} relative to its own folder; open the "
                "case with CaseFiles.from_database(db, case_id) (or pass base=<database folder>)"
            )
        return os.path.normpath(os.path.join(os.fspath(base), p))

    if out["images"] is not None:
        out["images"] = {m: absolute(p) for m, p in out["images"].items()}
    for key in ("image4d", "seg", "anat"):
        out[key] = absolute(out[key])
    return out


def validate_source(case_id: str, source: Mapping[str, Any]) -> dict[str, Any]:
    """Check and normalise a case's recorded source (keys ``SOURCE_KEYS``; paths as strings or None)."""
    where = f"case {case_id!r}: source"
    if not isinstance(source, Mapping):
        raise DataError(f"{where} must be a dict with keys {list(SOURCE_KEYS)}, got {type(source).__name__}")
    unknown = sorted(set(source) - set(SOURCE_KEYS))
    if unknown:
        raise DataError(f"{where} has unknown keys {unknown}; allowed keys are {list(SOURCE_KEYS)}")
    layout = source.get("layout")
    if not isinstance(layout, str) or not layout:
        raise DataError(f"{where} needs a 'layout' string (e.g. 'brats' or 'msd'), got {layout!r}")
    out: dict[str, Any] = {"layout": layout}
    images = source.get("images")
    if images is not None:
        if not isinstance(images, Mapping) or not images:
            raise DataError(f"{where}['images'] must map modality name -> file path, got {images!r}")
        out["images"] = {}
        for mod, p in images.items():
            if not isinstance(mod, str) or not isinstance(p, str | os.PathLike):
                raise DataError(f"{where}['images'] must map modality name -> file path, got {mod!r}: {p!r}")
            out["images"][mod] = os.fspath(p)
    else:
        out["images"] = None
    for key in ("image4d", "seg", "anat"):
        p = source.get(key)
        if p is not None and not isinstance(p, str | os.PathLike):
            raise DataError(f"{where}[{key!r}] must be a file path or None, got {p!r}")
        out[key] = None if p is None else os.fspath(p)
    if out["images"] is None and out["image4d"] is None:
        raise DataError(f"{where} names no image: give 'images' (modality -> path) or 'image4d'")
    return out


@dataclass
class CaseVolume:
    """One loaded case in canonical RAS+ orientation: image float32 (4,X,Y,Z), seg/anat uint8 (X,Y,Z).

    ``load_case`` returns ``image`` as a transposed view of a (Z,4,X,Y) C-contiguous buffer, so that axial
    slices are contiguous; it is a normal numpy array in every other respect. ``resampled`` names the files
    (modalities, "image" for a Decathlon 4D image, "seg", "anat") that were resampled when loading: onto the
    reference grid, or all of them onto an axis-aligned grid when the reference grid was oblique.
    ``oblique_deg``: that obliquity (also when an oblique grid was read as it is, ``--oblique accept``); 0 for
    axis-aligned grids.
    """

    case_id: str
    image: np.ndarray
    seg: np.ndarray | None
    anat: np.ndarray | None
    affine: np.ndarray
    spacing: tuple[float, float, float]
    files: CaseFiles
    resampled: tuple[str, ...] = ()
    oblique_deg: float = 0.0


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
    resampled: list[str] = field(default_factory=list)

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
            "resampled": self.resampled,
        }


class _CaseError(Exception):
    """Internal: a problem found in one file of a case (turned into DataError / CaseProblem)."""

    def __init__(self, path: Path | None, message: str) -> None:
        super().__init__(message)
        self.path = path
        self.message = message


# --------------------------------------------------------------------------------------------- orientation


def affine_problem(affine: npt.ArrayLike) -> str | None:
    """What makes a voxel-to-world matrix unusable (None when it is usable): not 4x4, non-finite entries, or
    a singular 3x3 part (a zero voxel size, or two voxel axes pointing the same way), as corrupt headers
    (an all-zero sform, zero pixel sizes) give."""
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4):
        return f"the voxel-to-world matrix has shape {a.shape}, not (4, 4)"
    if not np.isfinite(a).all():
        return (
            "the voxel-to-world matrix (affine) is singular or undefined: it contains NaN or infinite values"
        )
    m = a[:3, :3]
    sizes = np.sqrt((m**2).sum(axis=0))
    if sizes.min() < _MIN_VOXEL_MM:
        shown = ", ".join(f"{v:.4g}" for v in sizes)
        return f"the voxel-to-world matrix (affine) is singular: voxel size ({shown}) mm has a zero axis"
    # |det| over the product of the axis lengths: 1 for orthogonal axes, 0 for parallel ones.
    if abs(float(np.linalg.det(m))) < _MIN_AXIS_SINE * float(np.prod(sizes)):
        return "the voxel-to-world matrix (affine) is singular: two voxel axes point in the same direction"
    return None


def check_affine(affine: npt.ArrayLike, what: str) -> np.ndarray:
    """``affine`` as a float64 (4, 4) array; DataError naming ``what`` (a file, a volume) when it is unusable
    (``affine_problem``)."""
    problem = affine_problem(affine)
    if problem is not None:
        raise DataError(f"{what}: {problem}; {_SINGULAR_FIX}")
    return np.asarray(affine, dtype=np.float64)


def obliquity_deg(affine: npt.ArrayLike) -> float:
    """The largest angle (degrees) between a voxel axis and the world (RAS) axis nearest to it: 0 for
    grids whose axes run along the scanner's axes, 30 for a grid rotated by 30 degrees about one axis."""
    m = np.asarray(affine, dtype=np.float64)[:3, :3]
    sizes = np.sqrt((m**2).sum(axis=0))
    cosines = np.abs(m).max(axis=0) / np.maximum(sizes, np.finfo(np.float64).tiny)
    return float(np.degrees(np.arccos(np.clip(cosines.min(), 0.0, 1.0))))


def axis_aligned_grid(affine: npt.ArrayLike, shape: Sequence[int]) -> tuple[np.ndarray, tuple[int, int, int]]:
    """An axis-aligned RAS+ grid covering the oblique grid ``affine`` / ``shape``: the same voxel sizes (along
    the nearest world axes), the bounding box of the oblique volume. ``(affine, (X, Y, Z))``."""
    canon, _ = canonical_grid(affine, shape)
    sizes = np.sqrt((canon[:3, :3] ** 2).sum(axis=0))
    shape3 = np.asarray([int(s) for s in shape[:3]], dtype=np.float64)
    box = np.array(np.meshgrid(*[(-0.5, n - 0.5) for n in shape3], indexing="ij")).reshape(3, -1)
    corners = np.asarray(affine, dtype=np.float64)[:3, :3] @ box + np.asarray(affine, np.float64)[:3, 3:]
    lo, hi = corners.min(axis=1), corners.max(axis=1)
    counts = np.maximum(np.ceil((hi - lo) / sizes - 1e-6), 1).astype(int)
    out = np.eye(4)
    out[:3, :3] = np.diag(sizes)
    out[:3, 3] = lo + sizes / 2
    return out, (int(counts[0]), int(counts[1]), int(counts[2]))


def oblique_policy() -> ObliquePolicy:
    """How oblique grids are read now: ``set_oblique_policy``, else ``$FDN_OBLIQUE``, else "auto"."""
    policy = _oblique_policy or os.environ.get(OBLIQUE_ENV, "").strip().lower() or "auto"
    if policy not in OBLIQUE_POLICIES:
        raise DataError(
            f"{OBLIQUE_ENV}={policy!r} is not an oblique-grid policy; use one of {list(OBLIQUE_POLICIES)}"
        )
    return policy  # type: ignore[return-value]


def set_oblique_policy(policy: str | None) -> None:
    """Set how grids more than ``OBLIQUE_TOLERANCE_DEG`` oblique are read (None: back to ``$FDN_OBLIQUE``
    or "auto"); see the module docstring. ``fdn --oblique POLICY`` sets it for one command."""
    global _oblique_policy
    if policy is not None and policy not in OBLIQUE_POLICIES:
        raise DataError(f"oblique policy {policy!r}: use one of {list(OBLIQUE_POLICIES)}")
    _oblique_policy = policy  # type: ignore[assignment]


def _spatial_transform(affine: np.ndarray, what: str = "volume") -> np.ndarray:
    """nibabel orientation transform from the array's voxel axes to RAS+ (DataError for a singular affine)."""
    ornt = _ORNT.io_orientation(check_affine(affine, what))
    return _ORNT.ornt_transform(ornt, _ORNT.axcodes2ornt("RAS"))


def _apply(array: np.ndarray, transform: np.ndarray, channels_first: bool) -> np.ndarray:
    if channels_first:
        moved = np.moveaxis(array, 0, -1)
        return np.moveaxis(_ORNT.apply_orientation(moved, transform), -1, 0)
    return _ORNT.apply_orientation(array, transform)


def canonical_grid(affine: npt.ArrayLike, shape: Sequence[int]) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The grid with voxel-to-RAS ``affine`` and voxel ``shape`` (I, J, K, ...) once reoriented to the closest
    canonical RAS+ orientation: ``(canonical_affine, (X, Y, Z))``, as ``to_canonical`` gives them.

    Slicer: pass a node's IJK-to-RAS matrix and its (I, J, K) dimensions.
    """
    shape3 = tuple(int(s) for s in shape[:3])
    if len(shape3) != 3:
        raise DataError(f"canonical_grid: expected a 3D grid shape, got {tuple(shape)}")
    affine = check_affine(affine, "canonical_grid")
    transform = _spatial_transform(affine)
    canon_affine = affine @ _ORNT.inv_ornt_aff(transform, shape3)
    x, y, z = (shape3[int(axis)] for axis in transform[:, 0].argsort())
    return canon_affine, (x, y, z)


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
    transform = _spatial_transform(affine, "to_canonical")
    return _apply(array, transform, channels_first), canonical_grid(affine, shape)[0]


def from_canonical(
    array: np.ndarray, affine_original: np.ndarray, *, channels_first: bool = False
) -> np.ndarray:
    """Inverse of ``to_canonical``: put a canonical-orientation array back on the voxel axes of the grid whose
    voxel-to-RAS matrix is ``affine_original`` (e.g. a Slicer node's IJK-to-RAS; transpose the result to KJI
    for ``updateVolumeFromArray``)."""
    ornt = _ORNT.io_orientation(check_affine(affine_original, "from_canonical"))
    back = _ORNT.ornt_transform(_ORNT.axcodes2ornt("RAS"), ornt)
    return _apply(np.asarray(array), back, channels_first)


def resample_to_grid(
    array: np.ndarray,
    src_affine: np.ndarray,
    ref_affine: np.ndarray,
    ref_shape: Sequence[int],
    order: int = 1,
) -> np.ndarray:
    """Resample ``array`` (I, J, K) from its grid (voxel-to-RAS ``src_affine``) onto the grid ``ref_affine`` /
    ``ref_shape``: linear (``order=1``, float32 result) or nearest neighbour (``order=0``, for labels: the
    dtype is kept). Points outside the source volume (beyond half a voxel from its outer voxel centres) are 0.
    Slicer: pass IJK-to-RAS matrices. DataError when either matrix is singular (``affine_problem``)."""
    from scipy import ndimage

    src = check_affine(src_affine, "resample_to_grid: the source grid")
    ref = check_affine(ref_affine, "resample_to_grid: the reference grid")
    # output voxel o samples input voxel inv(src) @ ref @ o: one affine map, which scipy applies directly.
    mapping = np.linalg.inv(src) @ ref
    matrix, offset = mapping[:3, :3], mapping[:3, 3]
    out_shape = tuple(int(s) for s in ref_shape[:3])
    data = np.asarray(array)
    if order != 0:
        data = data.astype(np.float32, copy=False)
    out = ndimage.affine_transform(
        data, matrix, offset=offset, output_shape=out_shape, order=order, mode="nearest"
    )
    # 'nearest' keeps points that land a rounding error outside the outer voxel centres (grids that coincide);
    # a ones-volume padded by one voxel of zeros marks where the source volume ends.
    inside = ndimage.affine_transform(
        np.pad(np.ones(data.shape[:3], np.uint8), 1),
        matrix,
        offset=offset + 1,
        output_shape=out_shape,
        order=0,
    )
    out[inside == 0] = 0
    return out


def _spacing(affine: np.ndarray) -> tuple[float, float, float]:
    sp = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    return (float(sp[0]), float(sp[1]), float(sp[2]))


# ---------------------------------------------------------------------------------------------- image files

# Deflate (gzip, zlib) compresses at most about 1032:1: a compressed file smaller than its claimed voxel data
# divided by this cannot hold it.
_MAX_DEFLATE_RATIO = 1032
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class _DataExtent(NamedTuple):
    """Where a file's voxel data lies: the file holding it, its first byte, and whether it is deflated."""

    file: Path
    offset: int
    compressed: bool


@dataclass
class _Image:
    """One opened image (a file, or a folder holding one DICOM series): its header; voxels are read on demand.

    ``shape`` lists the voxel axes I, J, K and any further axes (channels); ``affine`` maps (I, J, K) to RAS+.
    """

    path: Path
    shape: tuple[int, ...]
    affine: np.ndarray
    reader: Callable[[], np.ndarray]

    def read(self) -> np.ndarray:
        """The voxels as an (I, J, K, ...) array; unreadable data becomes _CaseError."""
        try:
            data = self.reader()
        except _CaseError:
            raise
        except MemoryError as exc:
            dims = "x".join(map(str, self.shape))
            raise _CaseError(
                self.path,
                f"not enough memory to read its {dims} voxels; free memory (close other programs, lower "
                "--workers) or use a machine with more memory",
            ) from exc
        except OSError as exc:
            if exc.errno is None:  # e.g. gzip.BadGzipFile: corrupt content, not an operating-system error
                raise _CaseError(self.path, _corrupt(exc)) from exc
            raise _CaseError(self.path, _os_problem(exc)) from exc
        except Exception as exc:
            raise _CaseError(self.path, _corrupt(exc)) from exc
        if tuple(data.shape) != self.shape:
            raise _CaseError(
                self.path,
                f"voxel data has shape {tuple(data.shape)} but the header says {self.shape}; "
                "re-export the file",
            )
        return data


def _os_problem(exc: OSError) -> str:
    """An operating-system error reading a file, in words (without the path, which the problem names)."""
    text = describe_os_error(exc)
    return text.removeprefix(f"{exc.filename}: ") if exc.filename is not None else text


def _corrupt(exc: BaseException) -> str:
    return (
        f"voxel data cannot be read ({type(exc).__name__}: {_short(exc)}); the file is truncated or corrupt: "
        "re-export or re-download it"
    )


def _short(exc: BaseException) -> str:
    """The informative last line of an exception message (ITK's messages start with source locations)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    last = lines[-1] if lines else type(exc).__name__
    return re.sub(r"^(sitk|itk)::ERROR:\s*", "", last)


def _check_extent(path: Path, shape: tuple[int, ...], itemsize: int, data: _DataExtent | None) -> None:
    """Reject a header that claims ``MAX_VOXELS`` voxels or more, or more voxel bytes than its file holds
    (``data``: None when that cannot be told from the header, e.g. a DICOM series)."""
    n = math.prod(shape)
    dims = "x".join(str(s) for s in shape)
    if n >= MAX_VOXELS:
        raise _CaseError(
            path,
            f"header claims {dims} voxels ({n:,}), not below the limit of {MAX_VOXELS:,} voxels per volume "
            "(fdn_core.data.readers.MAX_VOXELS); the header is corrupt or this is not one MR volume: "
            "re-export the file",
        )
    if data is None:
        return
    try:
        size = data.file.stat().st_size
    except OSError as exc:
        raise _CaseError(
            data.file, f"voxel data file named by the header {path.name} is missing; restore it"
        ) from exc
    need, have = n * itemsize, max(size - data.offset, 0)
    where = "the file" if data.file == path else f"its data file {data.file.name}"
    if data.compressed and have * _MAX_DEFLATE_RATIO < need:
        found = f"which {have:,} compressed bytes in {where} cannot hold"
    elif not data.compressed and have < need:
        found = f"but {where} holds only {have:,} bytes of voxel data"
    else:
        return
    raise _CaseError(
        path,
        f"header claims {dims} voxels of {itemsize} byte(s) ({need:,} bytes), {found}; the file is truncated "
        "or its header is wrong: re-export or re-download it",
    )


def _open_image(path: Path) -> _Image:
    """Open an image file or DICOM series folder by its name (header only); problems become _CaseError."""
    if path.is_dir():
        img = _open_dicom_series(path)
    elif not path.is_file():
        raise _CaseError(path, "file is missing; restore it")
    elif path.name.lower().endswith((".nii", ".nii.gz")):
        img = _open_nifti(path)
    elif path.name.lower().endswith(IMAGE_EXTENSIONS):
        img = _open_sitk_file(path)
    else:
        raise _CaseError(path, f"is not an image format read here; give {_FORMATS_HELP}")
    problem = affine_problem(img.affine)
    if problem is not None:
        raise _CaseError(path, f"{problem}; {_SINGULAR_FIX}")
    return img


def _open_nifti(path: Path) -> _Image:
    try:
        img = nib.load(str(path))
    except Exception as exc:
        if isinstance(exc, OSError) and exc.errno is not None:  # permission denied, I/O error, ...
            raise _CaseError(path, _os_problem(exc)) from exc
        raise _CaseError(
            path, f"cannot be read as NIfTI ({type(exc).__name__}: {exc}); re-export or re-download the file"
        ) from exc
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise _CaseError(path, f"is a {type(img).__name__}, not NIfTI; convert it to .nii.gz")
    shape = tuple(int(s) for s in img.shape)
    compressed = path.name.lower().endswith(".gz")
    offset = 0 if compressed else int(getattr(img.dataobj, "offset", 0))
    itemsize = nifti_header(img.header).get_data_dtype().itemsize
    _check_extent(path, shape, itemsize, _DataExtent(path, offset, compressed))
    return _Image(path, shape, np.asarray(img.affine, dtype=np.float64), lambda: np.asanyarray(img.dataobj))


def _sitk_affine(
    origin: Sequence[float] | np.ndarray, spacing: Sequence[float], direction: Sequence[float] | np.ndarray
) -> np.ndarray:
    """Voxel-to-RAS matrix of the first three axes of an ITK grid (ITK's physical space is LPS)."""
    dim = len(origin)
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(direction, np.float64).reshape(dim, dim)[:3, :3] * np.asarray(spacing[:3])
    lps[:3, 3] = origin[:3]
    return _LPS_TO_RAS @ lps


def _sitk_voxels(image: SitkImage) -> np.ndarray:
    """A SimpleITK image's voxels as (I, J, K, ...[, C]) (SimpleITK's arrays run (..., K, J, I[, C]))."""
    array = simpleitk().GetArrayFromImage(image)
    dim = image.GetDimension()
    return array.transpose([*range(dim - 1, -1, -1), *range(dim, array.ndim)])


def _sitk_shape(reader: SitkImageFileReader, path: Path) -> tuple[int, ...]:
    """Voxel shape (I, J, K, ...[, C]) from a SimpleITK reader that read the image information."""
    size = tuple(int(s) for s in reader.GetSize())
    if len(size) < 3:
        raise _CaseError(
            path, f"is a {len(size)}D image ({'x'.join(map(str, size))} pixels); give the whole 3D volume"
        )
    n_comp = int(reader.GetNumberOfComponents())
    return size + ((n_comp,) if n_comp > 1 else ())


def _sitk_itemsize(reader: SitkImageFileReader) -> int:
    return int(simpleitk().Image([1, 1], reader.GetPixelID()).GetSizeOfPixelComponent()) * max(
        1, int(reader.GetNumberOfComponents())
    )


def _open_sitk_file(path: Path) -> _Image:
    """Open an NRRD or MetaImage file through SimpleITK (header only)."""
    sitk = simpleitk()
    kind = "NRRD" if path.name.lower().endswith((".nrrd", ".nhdr")) else "MetaImage"
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise _CaseError(
            path, f"cannot be read as {kind} ({_short(exc)}); re-export or re-download the file"
        ) from exc
    shape = _sitk_shape(reader, path)
    extent = _nrrd_extent(path) if kind == "NRRD" else _meta_extent(path)
    _check_extent(path, shape, _sitk_itemsize(reader), extent)
    affine = _sitk_affine(reader.GetOrigin(), reader.GetSpacing(), reader.GetDirection())

    def read() -> np.ndarray:
        return _sitk_voxels(sitk.ReadImage(str(path)))

    return _Image(path, shape, affine, read)


def _header_lines(path: Path, limit: int = 1 << 16) -> Iterator[tuple[str, int]]:
    """(line, offset of the byte after it) for the complete lines of a file's first ``limit`` bytes."""
    with path.open("rb") as fh:
        head = fh.read(limit)
    pos = 0
    while (end := head.find(b"\n", pos)) >= 0:
        yield head[pos:end].rstrip(b"\r").decode("latin-1"), end + 1
        pos = end + 1


def _int_field(fields: dict[str, str], key: str) -> int | None:
    try:
        return int(fields.get(key, "0") or 0)
    except ValueError:
        return None


def _single_data_file(path: Path, name: str) -> Path | None:
    """The one data file a header names (None for lists and numbered file patterns)."""
    if not name or name.upper().startswith("LIST") or "%" in name or " " in name.strip():
        return None
    return path.parent / name.strip()


def _nrrd_extent(path: Path) -> _DataExtent | None:
    """Where an NRRD file's raw or gzip voxel data lies (None for other encodings or unusual layouts)."""
    fields: dict[str, str] = {}
    header_end = None
    for i, (line, end) in enumerate(_header_lines(path)):
        if i == 0 or line.startswith("#") or ":=" in line:
            continue
        if not line:
            header_end = end
            break
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip().lower()] = value.strip()
    encoding = fields.get("encoding", "").lower()
    if encoding not in ("raw", "gzip", "gz"):
        return None
    compressed = encoding != "raw"
    skip = _int_field(fields, "byte skip")
    if skip is None:
        return None
    name = fields.get("data file", fields.get("datafile"))
    if name is None:  # attached data after the header's blank line
        if header_end is None:
            return None
        return _DataExtent(path, 0 if skip == -1 else header_end + (0 if compressed else skip), compressed)
    data_file = _single_data_file(path, name)
    if data_file is None:
        return None
    return _DataExtent(data_file, 0 if skip == -1 or compressed else skip, compressed)


def _meta_extent(path: Path) -> _DataExtent | None:
    """Where a MetaImage file's voxel data lies (None for file lists and numbered file patterns)."""
    fields: dict[str, str] = {}
    header_end = None
    for line, end in _header_lines(path):
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip().lower()] = value.strip()
            if key.strip().lower() == "elementdatafile":
                header_end = end
                break
    if header_end is None:
        return None
    compressed = fields.get("compresseddata", "false").lower() == "true"
    header_size = _int_field(fields, "headersize")
    if header_size is None:
        return None
    name = fields["elementdatafile"]
    if name.upper() == "LOCAL":
        return _DataExtent(path, 0 if header_size == -1 else header_end, compressed)
    data_file = _single_data_file(path, name)
    if data_file is None:
        return None
    return _DataExtent(data_file, 0 if header_size == -1 or compressed else header_size, compressed)


def _open_dicom_series(folder: Path) -> _Image:
    """Open the one DICOM series in ``folder`` (headers of its files only; voxels are read on demand)."""
    sitk = simpleitk()
    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not ids:
        raise _CaseError(folder, f"is a folder without a DICOM series; give {_FORMATS_HELP}")
    if len(ids) > 1:
        raise _CaseError(
            folder,
            f"holds {len(ids)} DICOM series ({', '.join(ids[:3])}{', ...' if len(ids) > 3 else ''}); give a "
            "folder holding exactly one series (move the others into folders of their own)",
        )
    names = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), ids[0]))
    if len(names) < 2:
        raise _CaseError(folder, "holds a single DICOM slice; give the whole 3D series (all axial slices)")
    infos = []
    for name in names:
        reader = sitk.ImageFileReader()
        reader.SetFileName(name)
        try:
            reader.ReadImageInformation()
        except RuntimeError as exc:
            raise _CaseError(
                Path(name), f"cannot be read as DICOM ({_short(exc)}); re-export the series"
            ) from exc
        infos.append(reader)
    first = infos[0]
    direction = np.asarray(first.GetDirection(), np.float64).reshape(3, 3)
    for name, info in zip(names, infos):
        if tuple(info.GetSize()[:2]) != tuple(first.GetSize()[:2]) or not np.allclose(
            np.asarray(info.GetDirection()).reshape(3, 3), direction, atol=1e-4
        ):
            raise _CaseError(
                Path(name),
                f"slice size or orientation differs from the series' first slice {Path(names[0]).name}; the "
                "folder mixes acquisitions: export one series per folder",
            )
    # ITK's series geometry: origin and orientation of the first slice (sorted along the slice normal), slice
    # spacing from the first to the last slice. Uneven or sheared slice positions would make it wrong.
    origins = np.asarray([info.GetOrigin() for info in infos], np.float64)
    normal = direction[:, 2]
    along = (origins - origins[0]) @ normal
    step = float(along[-1]) / (len(names) - 1)
    gaps = np.diff(along)
    uneven = np.abs(gaps - step) > max(_AFFINE_TOL_MM, 0.01 * abs(step))
    if step <= _AFFINE_TOL_MM or uneven.any():
        i = int(np.argmax(uneven)) if uneven.any() else 0
        raise _CaseError(
            folder,
            f"slice positions are not evenly spaced (slices {i} and {i + 1} are {gaps[i]:.4g} mm apart, "
            f"{step:.4g} mm on average): slices are missing or repeated, or several acquisitions are mixed; "
            "export the complete series on its own",
        )
    if np.abs(origins - origins[0] - np.outer(along, normal)).max() > max(_AFFINE_TOL_MM, 0.01 * step):
        raise _CaseError(
            folder,
            "slices are shifted against each other within their planes (a tilted-gantry or sheared series); "
            "resample it onto a regular grid (e.g. in 3D Slicer) and export that",
        )
    spacing = (*first.GetSpacing()[:2], step)
    shape = (*(int(s) for s in first.GetSize()[:2]), len(names))
    n_comp = int(first.GetNumberOfComponents())
    shape += (n_comp,) if n_comp > 1 else ()
    _check_extent(folder, shape, _sitk_itemsize(first), None)
    affine = _sitk_affine(origins[0], spacing, direction.ravel())

    def read() -> np.ndarray:
        series = sitk.ImageSeriesReader()
        series.SetFileNames(names)
        image = series.Execute()
        got = _sitk_affine(image.GetOrigin(), image.GetSpacing(), image.GetDirection())
        if not np.allclose(got, affine, rtol=0, atol=_AFFINE_TOL_MM):
            raise _CaseError(
                folder,
                "the series' geometry read with its voxels differs from its slice headers; "
                "re-export the series",
            )
        return _sitk_voxels(image)

    return _Image(folder, shape, affine, read)


# ------------------------------------------------------------------------------------------------ discovery


def detect_layout(root: str | Path) -> Layout:
    """ "msd" when ``root`` has ``imagesTr/`` or ``imagesTs/``, else "brats"."""
    root = Path(root)
    if (root / "imagesTr").is_dir() or (root / "imagesTs").is_dir():
        return "msd"
    return "brats"


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _image_files(folder: Path, pattern: re.Pattern[str] = _IMAGE_NAME) -> list[Path]:
    """Visible files of ``folder`` whose names match ``pattern`` (default: any image extension), sorted."""
    return sorted(p for p in folder.iterdir() if p.is_file() and _visible(p) and pattern.match(p.name))


def _spatial_shape(img: _Image, kind: str) -> tuple[int, int, int]:
    """The 3D shape of a single volume (trailing axes of length 1 are allowed, as some tools write them)."""
    shape = img.shape
    core = shape[:3] if len(shape) >= 3 and all(s == 1 for s in shape[3:]) else None
    if core is None or len(shape) < 3 or min(core) < 1:
        raise _CaseError(
            img.path,
            f"{kind} must be a 3D volume, but its shape is {shape}; "
            "give one 3D file per modality (split 4D files, or use the Decathlon layout for 4D images)",
        )
    return core  # type: ignore[return-value]


def _grid_difference(
    img: _Image,
    shape: tuple[int, ...],
    ref: _Image,
    ref_shape: tuple[int, ...],
    kind: str,
    ref_kind: str,
) -> str | None:
    """How ``img``'s voxel grid differs from the reference's (None when they are the same grid)."""
    same_shape = shape == ref_shape
    if same_shape and np.allclose(img.affine, ref.affine, rtol=0, atol=_AFFINE_TOL_MM):
        return None
    parts = [] if same_shape else [f"shape {shape} where {ref_kind} has shape {ref_shape}"]
    sp, ref_sp = _spacing(img.affine), _spacing(ref.affine)
    if not np.allclose(sp, ref_sp, rtol=0, atol=_AFFINE_TOL_MM):
        rounded, ref_rounded = tuple(round(s, 4) for s in sp), tuple(round(s, 4) for s in ref_sp)
        parts.append(f"voxel spacing {rounded} mm where {ref_kind} has {ref_rounded}")
    elif same_shape or not np.allclose(img.affine[:3], ref.affine[:3], rtol=0, atol=_AFFINE_TOL_MM):
        parts.append("orientation/origin (affine) differs")
    return f"{kind} is on another voxel grid than {ref_kind} ({ref.path.name}): {'; '.join(parts)}"


_MSD_SHAPE_MSG = (
    "a Decathlon image must be 4D (X, Y, Z, 4) with channels FLAIR, T1w, T1gd, T2w, but its shape is "
    "{shape}; give all four channels in one file (or use the BraTS folder layout)"
)


@dataclass
class _Headers:
    """A case's opened headers, after checking that they share one voxel grid (or may be resampled onto it).

    ``shape`` / ``affine``: the grid the case is read onto (the reference file's, or an axis-aligned grid
    covering it when the reference is oblique and resampled). ``off_grid`` maps each file kind that is not on
    that grid to why. ``oblique_deg``: the reference's obliquity when it was resampled or accepted, else 0.
    """

    images: dict[str, _Image]  # BraTS: one per modality; MSD: {"image": the 4D file}
    seg: _Image | None
    anat: _Image | None
    shape: tuple[int, int, int]
    affine: np.ndarray
    ref_kind: str
    off_grid: dict[str, str]
    oblique_deg: float = 0.0
    oblique_note: str | None = None

    @property
    def target(self) -> str:
        """The grid files are resampled onto, in words."""
        if self.off_grid.get(self.ref_kind):
            return f"an axis-aligned grid covering the {self.ref_kind} volume"
        return f"the {self.ref_kind} grid"


def _reference_grid(
    files: CaseFiles, ref: _Image, ref_kind: str, ref_shape: tuple[int, int, int]
) -> tuple[np.ndarray, tuple[int, int, int], float, str | None]:
    """The grid a case is read onto: ``(affine, shape, obliquity, note)``. The reference file's own grid,
    unless it is oblique (``OBLIQUE_TOLERANCE_DEG``): then per ``oblique_policy()`` an axis-aligned grid
    covering it ("resample"; ``note`` says so), the reference grid itself ("accept"; ``note`` is the
    warning), or a _CaseError ("refuse"; "auto" refuses unless ``files.resample``)."""
    angle = obliquity_deg(ref.affine)
    if angle <= OBLIQUE_TOLERANCE_DEG:
        return ref.affine, ref_shape, 0.0, None
    policy = oblique_policy()
    if policy == "auto":
        policy = "resample" if files.resample else "refuse"
    what = (
        f"{ref_kind} is {angle:.1f} degrees oblique (its voxel axes are rotated against the scanner's "
        "right-anterior-superior axes)"
    )
    if policy == "refuse":
        raise _CaseError(
            ref.path,
            f"{what}, and reorienting by axis flips and permutations would leave its axial slices tilted; "
            "resample the case onto an axis-aligned grid (read it with `fdn --oblique resample ...`, or "
            "resample it in 3D Slicer), accept the tilt with `fdn --oblique accept ...`, or leave the case "
            "out (--skip-bad)",
        )
    if policy == "accept":
        accepted = f"{what}; read in its nearest axis-aligned orientation, tilt kept (--oblique accept)"
        return ref.affine, ref_shape, angle, accepted
    affine, shape = axis_aligned_grid(ref.affine, ref_shape)
    channels = 1 if files.layout == "brats" else len(MODALITIES)
    if math.prod(shape) * channels >= MAX_VOXELS:
        raise _CaseError(
            ref.path,
            f"{what}; the axis-aligned grid covering it would have {'x'.join(map(str, shape))} voxels, over "
            f"the limit of {MAX_VOXELS:,}: resample it onto a coarser axis-aligned grid yourself",
        )
    return affine, shape, angle, f"{what}; resampled onto an axis-aligned grid"


def _open_headers(files: CaseFiles) -> _Headers:
    """Header-level checks of one case (cheap: voxels are not read)."""
    images: dict[str, _Image] = {}
    off_grid: dict[str, str] = {}
    if files.layout == "brats":
        if not files.images:
            raise _CaseError(None, "no image files")
        ref_kind = REFERENCE_SEQUENCE
        ref = images[ref_kind] = _open_image(files.images[ref_kind])
        ref_shape = _spatial_shape(ref, ref_kind)
    else:
        if files.image4d is None:
            raise _CaseError(None, "no 4D image file")
        ref_kind = "image"
        ref = images["image"] = _open_image(files.image4d)
        if len(ref.shape) != 4 or ref.shape[3] != 4:
            raise _CaseError(files.image4d, _MSD_SHAPE_MSG.format(shape=ref.shape))
        ref_shape = (ref.shape[0], ref.shape[1], ref.shape[2])
    grid_affine, grid_shape, angle, note = _reference_grid(files, ref, ref_kind, ref_shape)
    resampling_oblique = grid_shape != ref_shape or not np.array_equal(grid_affine, ref.affine)
    if resampling_oblique:
        off_grid[ref_kind] = note or ""

    def compare(img: _Image, kind: str) -> None:
        diff = _grid_difference(img, _spatial_shape(img, kind), ref, ref_shape, kind, ref_kind)
        if diff is not None and not files.resample:
            raise _CaseError(
                img.path,
                f"{diff}; all files of a case must share one voxel grid: resample or co-register them onto "
                "the same grid (e.g. with SimpleITK or 3D Slicer) and try again",
            )
        if diff is not None or resampling_oblique:
            off_grid[kind] = diff or off_grid[ref_kind]

    if files.layout == "brats":
        for mod in MODALITIES:
            if mod != ref_kind:
                images[mod] = _open_image(files.images[mod])  # type: ignore[index]
                compare(images[mod], mod)
    labels: dict[str, _Image | None] = {"seg": None, "anat": None}
    for kind, path in (("seg", files.seg), ("anat", files.anat)):
        if path is not None:
            label_img = labels[kind] = _open_image(path)
            compare(label_img, kind)
    return _Headers(
        images, labels["seg"], labels["anat"], grid_shape, grid_affine, ref_kind, off_grid, angle, note
    )


def _brats_case_dirs(root: Path) -> list[Path]:
    """Folders that hold one BraTS case each (root itself, its children, or grandchildren under groups)."""
    if any(_BRATS_NAME.match(p.name) for p in _image_files(root)):
        return [root]
    found: list[Path] = []
    for child in sorted(p for p in root.iterdir() if p.is_dir() and _visible(p)):
        if _image_files(child):
            found.append(child)
            continue
        grand = [g for g in sorted(child.iterdir()) if g.is_dir() and _visible(g) and _image_files(g)]
        if grand:
            found.extend(grand)
        else:
            log.debug("ignoring folder without image files: %s", child)
    return found


def _brats_case(folder: Path) -> CaseFiles:
    """Collect one BraTS case folder's files; missing or ambiguous files become _CaseError."""
    by_kind: dict[str, list[Path]] = {}
    prefixes: set[str] = set()
    unknown: list[str] = []
    for path in _image_files(folder):
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
            f"no file follows the BraTS naming {_NAMING_HELP} (found {', '.join(unknown)}); rename the files",
        )
    for kind, paths in by_kind.items():
        if len(paths) > 1:
            raise _CaseError(
                folder, f"several {kind} files ({', '.join(p.name for p in paths)}); keep exactly one"
            )
    missing = [m for m in MODALITIES if m not in by_kind]
    if missing:
        prefix = next(iter(prefixes)) if len(prefixes) == 1 else case_id
        ext = _BRATS_NAME.match(next(iter(by_kind.values()))[0].name).group("ext")  # type: ignore[union-attr]
        want = ", ".join(f"{prefix}_{m}{ext}" for m in missing)
        raise _CaseError(
            folder / f"{prefix}_{missing[0]}{ext}",
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
    return {
        _NIFTI_NAME.match(p.name).group("stem"): p  # type: ignore[union-attr]
        for p in _image_files(folder, _NIFTI_NAME)
    }


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


def scan_cohort(root: str | Path, resample: bool = False) -> tuple[list[CaseFiles], list[CaseProblem]]:
    """Find every case under ``root`` and check its files' headers; returns ``(good_cases, problems)``.

    Voxels are not read here: ``validate_cohort`` additionally loads every case. ``resample``: files of a case
    on different voxel grids are resampled onto its T1ce grid when loaded instead of being a problem.
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
        case.resample = resample
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
                "no cases found; expected BraTS case folders (<case>/<case>_t1.nii.gz, _t1ce, _t2, _flair; "
                "or .nrrd, .nhdr, .mha, .mhd) "
                "or a Decathlon task (imagesTr/, labelsTr/, dataset.json): check the path",
            )
        )
    return good, problems


def _problem_report(root: Path, problems: list[CaseProblem]) -> str:
    lines = "\n".join(f"  - {p}" for p in problems)
    return f"{len(problems)} problem(s) in cohort {root}:\n{lines}"


def find_cases(root: str | Path, skip_bad: bool = False, resample: bool = False) -> CaseList:
    """Cases under ``root`` (BraTS or Decathlon layout), sorted by id.

    Any problem raises one DataError listing all of them, unless ``skip_bad``: then each bad case is logged as
    a warning and left out, and the problems are on the returned list's ``problems`` attribute. A cohort with
    no usable case is always an error. Equal voxel grids within a case are the cohort contract; with
    ``resample`` a case's files on other grids are resampled onto its T1ce grid when loaded.
    """
    root = Path(root)
    good, problems = scan_cohort(root, resample)
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


def _common_folder_name(paths: Iterable[Path]) -> str:
    """Name of the deepest folder holding all ``paths`` ("query" when there is none)."""
    try:
        common = Path(os.path.commonpath([str(p.resolve().parent) for p in paths]))
    except ValueError:
        return "query"
    return common.name or "query"


def case_files_from_paths(paths: Sequence[str | Path], resample: bool = True) -> CaseFiles:
    """One study given on the command line: its case folder (BraTS layout), or its files one by one.

    Files are named ``<case>_<t1|t1ce|t2|flair|seg|anat><ext>`` (``IMAGE_EXTENSIONS``; a folder holding one
    DICOM series: ``<case>_<kind>`` without extension), or given as ``KIND=PATH`` (``t1ce=/dicom/series7``)
    whatever their names; the case id is then the name of the folder holding them. With ``resample`` (the
    default: a query study comes as the scanner wrote it) files on other voxel grids than the T1ce are
    resampled onto the T1ce grid when the case is loaded.
    """
    items: list[tuple[str | None, Path]] = []
    for item in paths:
        text = os.fspath(item)
        spec = None if Path(text).exists() else _KIND_SPEC.match(text)
        items.append((spec.group("kind").lower(), Path(spec.group("path"))) if spec else (None, Path(text)))
    if not items:
        raise DataError("no case given: pass a case folder or its four image files")
    for _, p in items:
        if not p.exists():
            raise DataError(f"{p}: no such file or folder; give a case folder or its image files")
    if len(items) == 1 and items[0][0] is None and items[0][1].is_dir():
        cases = find_cases(items[0][1], resample=resample)
        if len(cases) != 1:
            raise DataError(
                f"{items[0][1]} holds {len(cases)} cases; give one case folder (e.g. {cases[0].case_id}) "
                "or its four image files"
            )
        return cases[0]
    kinds: dict[str, Path] = {}
    prefixes: set[str] = set()
    for given, p in items:
        kind = given
        if kind is None:
            m = _BRATS_NAME.match(p.name)
            if m is None or (m.group("ext") is None) != p.is_dir():
                what = "folder" if p.is_dir() else "file"
                raise DataError(
                    f"{p}: not a {what} named {_NAMING_HELP}; rename it, give it as KIND=PATH (e.g. "
                    f"t1ce={p}), or give the case folder"
                )
            kind = m.group("kind").lower()
            prefixes.add(m.group("prefix"))
        if kind in kinds:
            raise DataError(f"{p}: a second {kind} file ({kinds[kind]} was given too); give one of each")
        kinds[kind] = p
    if len(prefixes) > 1:
        raise DataError(f"the files belong to several cases ({', '.join(sorted(prefixes))}); give one case")
    missing = [m for m in MODALITIES if m not in kinds]
    if missing:
        raise DataError(f"missing modality file(s) {missing}; every case needs T1, T1ce, T2 and FLAIR")
    return CaseFiles(
        case_id=prefixes.pop() if prefixes else _common_folder_name(kinds.values()),
        layout="brats",
        images={m: kinds[m] for m in MODALITIES},
        image4d=None,
        seg=kinds.get("seg"),
        anat=kinds.get("anat"),
        resample=resample,
    )


# ---------------------------------------------------------------------------------------------------- loading


def _check_finite(data: np.ndarray, path: Path, kind: str) -> None:
    if data.dtype.kind in "fc" and not np.isfinite(data).all():
        n_nan, n_inf = int(np.isnan(data).sum()), int(np.isinf(data).sum())
        raise _CaseError(
            path,
            f"{kind} contains {n_nan} NaN and {n_inf} infinite voxel(s); replace them (e.g. by 0 outside the "
            "brain) and save the file again",
        )


def _image_voxels(data: np.ndarray, path: Path, kind: str) -> np.ndarray:
    """``data`` (one MR channel as read) after checking that it holds real, finite numbers."""
    if data.dtype.kind not in "biuf":
        what = "complex" if data.dtype.kind == "c" else "colour (RGB) or compound"
        raise _CaseError(
            path,
            f"{kind} has {what} voxels ({data.dtype}); give a grey-level image of real values (e.g. the "
            "magnitude image) and save it again",
        )
    _check_finite(data, path, kind)
    return data


def _check_signal(data: np.ndarray, path: Path, kind: str) -> np.ndarray:
    """``data`` (one MR channel on the case's grid) after checking that it is an image at all: some voxel
    above 0 (the brain, as ``zscore_volume`` reads it) and more than one value there. An empty or flat
    channel would be encoded as blank slices, which match blank slices at distance 0."""
    brain = data > 0
    if not brain.any():
        lo, hi = float(data.min()), float(data.max())
        values = "every voxel is 0" if lo == hi == 0 else f"values {lo:g}..{hi:g}"
        raise _CaseError(
            path,
            f"{kind} is empty: no voxel is above 0 ({values}), so there is no image to encode; check that "
            f"this file holds the {kind} series and was exported completely, and replace it",
        )
    inside = data[brain]
    lo, hi = float(inside.min()), float(inside.max())
    if hi - lo <= 1e-6 * max(abs(hi), 1e-30):
        raise _CaseError(
            path,
            f"{kind} has the same value {hi:g} in every voxel above 0 (no contrast), so there is no image to "
            f"encode; check that this file holds the {kind} series, and replace it",
        )
    return data


def _read_labels(img: _Image, mapping: dict[int, int], kind: str, desc: str) -> np.ndarray:
    """Read a label volume and map file values to ours (uint8); unknown values are _CaseError."""
    path = img.path
    raw = img.read()
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


def _onto_reference(heads: _Headers, kind: str, img: _Image, data: np.ndarray, order: int) -> np.ndarray:
    """``data`` (the voxels of ``img``) on the case's grid: resampled when the file is not on it."""
    if kind not in heads.off_grid:
        return data
    out = resample_to_grid(data, img.affine, heads.affine, heads.shape, order=order)
    if data.any() and not out.any():
        raise _CaseError(
            img.path,
            f"{kind} does not overlap the {heads.ref_kind} volume in space; are the files from the same "
            "study? Give the sequences of one examination",
        )
    return out


def _load_case(files: CaseFiles) -> CaseVolume:
    heads = _open_headers(files)
    transform = _spatial_transform(heads.affine)
    affine, canon_shape = canonical_grid(heads.affine, heads.shape)
    # The image lives in a (Z, 4, X, Y) buffer and is exposed as its (4, X, Y, Z) view: axial slices are then
    # contiguous for slicing and resizing, and each channel is cast, reoriented and transposed in one copy.
    buffer = np.empty((canon_shape[2], len(MODALITIES), canon_shape[0], canon_shape[1]), dtype=np.float32)
    image = buffer.transpose(1, 2, 3, 0)
    if files.layout == "brats":
        for c, mod in enumerate(MODALITIES):
            img = heads.images[mod]
            data = _image_voxels(img.read().reshape(img.shape[:3]), img.path, mod)
            on_grid = _check_signal(_onto_reference(heads, mod, img, data, 1), img.path, mod)
            image[c] = _ORNT.apply_orientation(on_grid, transform)
    else:
        img = heads.images["image"]
        data = img.read()
        order = files.channel_order or MSD_CHANNELS
        for c, mod in enumerate(MODALITIES):
            i = order.index(mod)
            what = f"{mod} (channel {i} of the 4D image)"
            channel = _onto_reference(heads, "image", img, _image_voxels(data[..., i], img.path, what), 1)
            image[c] = _ORNT.apply_orientation(_check_signal(channel, img.path, what), transform)
    mapping, desc = (
        (BRATS_FILE_TO_CLASS, _BRATS_DESC) if files.layout == "brats" else (MSD_FILE_TO_CLASS, _MSD_DESC)
    )
    labels: dict[str, np.ndarray | None] = {"seg": None, "anat": None}
    for kind, label_img, kind_mapping, kind_desc in (
        ("seg", heads.seg, mapping, desc),
        ("anat", heads.anat, _ANAT_TO_LABEL, _ANAT_DESC),
    ):
        if label_img is not None:
            raw = _read_labels(label_img, kind_mapping, kind, kind_desc)
            on_grid = _onto_reference(heads, kind, label_img, raw, 0)
            labels[kind] = np.ascontiguousarray(_ORNT.apply_orientation(on_grid, transform))
    resampled = tuple(k for k in (*MODALITIES, "image", "seg", "anat") if k in heads.off_grid)
    if heads.oblique_note is not None:
        log.warning("case %s: %s", files.case_id, heads.oblique_note)
    for kind in resampled:
        if heads.off_grid[kind] == heads.oblique_note:
            continue  # said once above
        how = "nearest neighbour" if kind in ("seg", "anat") else "linear interpolation"
        log.warning(
            "case %s: %s; resampled onto %s (%s)", files.case_id, heads.off_grid[kind], heads.target, how
        )
    return CaseVolume(
        files.case_id,
        image,
        labels["seg"],
        labels["anat"],
        affine,
        _spacing(affine),
        files,
        resampled,
        heads.oblique_deg,
    )


def canonical_shape(files: CaseFiles) -> tuple[int, int, int]:
    """(X, Y, Z) of the case once reoriented to canonical RAS+, from its headers (voxels are not read)."""
    try:
        heads = _open_headers(files)
    except _CaseError as exc:
        where = f", file {exc.path}" if exc.path is not None else ""
        raise DataError(f"case {files.case_id}{where}: {exc.message}") from exc
    return canonical_grid(heads.affine, heads.shape)[1]


def load_case(files: CaseFiles) -> CaseVolume:
    """Read one case into canonical RAS+ arrays (channels ``MODALITIES``, classes 0..3).

    Files on another voxel grid than the T1ce are resampled onto it when ``files.resample`` is set (the
    volume's ``resampled`` names them; a warning is logged), and are an error otherwise. Raises DataError
    naming the case, the file, what is wrong and what to do.
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
        resampled=list(case.resampled),
    )


def parallel_map(fn: Callable[[_T], _R], items: Sequence[_T], workers: int | None) -> Iterator[_R]:
    """Ordered map over a pool of ``workers`` threads (file reads, decompression and numpy release the GIL):
    ``fn`` runs on the next items while the caller works on the one yielded, at most workers+1 in flight.
    The one read-ahead loop of the package (cohort scans, slice caches, indexing, retrieval evaluation)."""
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
    root: str | Path, progress: Progress | None = None, workers: int | None = None, resample: bool = False
) -> tuple[list[CaseSummary], list[CaseProblem]]:
    """Scan ``root`` and load every case (finds NaN/Inf, truncated files, unknown labels too).

    Returns summaries of the readable cases and every problem; raises only when ``root`` is not a folder.
    ``resample`` as for ``find_cases``.
    """
    cases, problems = scan_cohort(root, resample)

    def load(files: CaseFiles) -> CaseSummary | CaseProblem:
        try:
            return summarize_case(_load_case(files))
        except _CaseError as exc:
            return CaseProblem(files.case_id, exc.path, exc.message)

    summaries: list[CaseSummary] = []
    total = len(cases)
    if progress is not None and total:
        progress.update(0, total, "checking cases")
    for i, result in enumerate(parallel_map(load, cases, workers), 1):
        if isinstance(result, CaseSummary):
            summaries.append(result)
        else:
            problems.append(result)
        if progress is not None:
            progress.update(i, total, "checking cases")
    summaries.sort(key=lambda s: s.case_id)
    return summaries, problems


# ---------------------------------------------------------------------------------------------------- writing


def nifti_bytes(array: np.ndarray, affine: np.ndarray, gz: bool = True) -> bytes:
    """NIfTI-1 bytes (gzipped with a fixed timestamp: equal arrays give equal files) with q- and sform set."""
    affine = np.asarray(affine, dtype=np.float64)
    img = nifti1_image(np.asarray(array), affine)
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
                "modality": dict(MSD_DATASET_MODALITY),
                "labels": dict(MSD_DATASET_LABELS),
                "numTraining": len(training),
                "numTest": len(test),
                "training": training,
                "test": test,
            },
        )
    return Path(out_dir)
