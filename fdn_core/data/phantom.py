"""Realistic phantom glioma cohorts in BraTS 2019 layout, with ground truth for normal AND abnormal anatomy.

BraTS cannot be downloaded here, so the demo, the tests and the benchmarks use cohorts synthesised from
the MNI ICBM152 2009a template that nilearn ships in its wheel (no network). Each case is written as
``DIR/<case>/<case>_{t1,t1ce,t2,flair,seg,anat}.nii.gz`` plus ``DIR/cohort.json``.

Source anatomy (derived once per process from the template, 1 mm, MNI coordinates, RAS):
- Tissue probabilities: grey and white matter from nilearn's GM/WM templates; CSF = brain mask minus
  GM minus WM (clipped to [0, 1]), so the three sum to one inside the mask.
- Cerebellum: the tentorium is first approximated by a surface in MNI coordinates,
  ``z = -3 - 0.45 |x| + 0.25 min(y + 60, 0)`` mm (it slopes down laterally and posteriorly), then each
  (x, y) column snaps that surface to the most CSF-like voxel within 6 mm (the dural gap between occipital
  lobe and cerebellum), and the snapped surface is smoothed. Brain below that surface and behind a frontal
  limit (``y < -30 - 0.4 max(|x| - 15, 0)``) is infratentorial. The brainstem (an elliptic cylinder
  ``(x / 15)^2 + ((y + 27) / 19)^2 < 1`` below ``z = -10``: lower midbrain, pons, medulla) gets no label;
  the largest connected remainder of the infratentorial brain is the cerebellum.
- Lateral ventricles: CSF probability > 0.55 inside the box ``|x| <= 38, -62 <= y <= 38, -12 <= z <= 32``
  (supratentorial, ``|x| >= 2.5`` to cut the septum and third ventricle), the largest connected component
  on each side, grown by 2 mm into CSF probability > 0.3.
- Left/right: split at the MNI midline ``x = 0`` (negative x is the subject's left). Labels follow
  ``ANAT_LABELS``; brainstem voxels are brain with anatomy label 0.
- Brain mask: nilearn's (template > 0.2) with holes filled slice by slice (the basal cisterns), as CSF.

Files: images int16, labels uint8, voxel size = (240, 240, 155) mm / shape. The affine is BraTS-like,
``diag(-sx, -sy, sz)`` (voxel axes point to the subject's left, posterior, superior: "LPS") with the field of
view centred on world 0, so readers must reorient (``nibabel.as_closest_canonical``); left/right labels are
anatomically correct in world (RAS) coordinates.

Generator version 2.0. Per case (a function of ``(seed, case index, shape)`` only, so neither the worker
count nor the cohort size changes a case): one case in every block of four consecutive indices is healthy;
the others carry one tumour, or two (15 %). An output voxel maps to MNI through the file affine, a random
similarity transform (head scale 0.81-0.97 of the template with +-5 % per axis; pitch +-10, roll +-8,
yaw +-10 degrees; an axial shift of +-16 mm, so some cases lose top or bottom slices), two smooth random
deformations (control points ~80 and ~48 mm apart), the mass effect of the tumours and a widening or
narrowing of the lateral ventricles along their wall normal (factor 0.7-2.1, calibrated). Atrophy turns
grey matter on sulcal banks into CSF (wider sulci, smaller parenchyma). Tissues and labels are sampled
through the same map (tissues linearly, labels by nearest neighbour), so anatomy labels stay exact.

Tumour volumes match published BraTS figures. Whole tumour (labels 1 + 2 + 4) of the BraTS 2020 training
set, 369 cases (293 HGG, 76 LGG): mean 99.55 mL, SD 59.43, median 90.74, IQR 94.39, minimum 5.8, 79 cases
(21 %) over 150 mL; per grade, HGG ET/WT 0.24, ED/WT 0.62, NCR/WT 0.15 and LGG NCR-NET/WT 0.47, ED/WT 0.50
(means). Source: GitHub repository Yashgohel018/neurovision-sgp5 ("NeuroVision AI", Module B), files
``data/dataset_summary.csv`` (rows "Whole Tumor Volume", "Enhancing Tumor Volume", "Peritumoral Edema
Volume", "Necrotic Core Volume") and ``MODULE_B_EXPLANATION.md`` sections 5 and 8, commit ee32e2a5,
computed from the BraTS 2020 training labels (Menze et al., IEEE TMI 34(10) 2015; Bakas et al., Sci Data
4:170117, 2017; Bakas et al., arXiv:1811.02629, 2018). It is not peer reviewed; no peer-reviewed table of
BraTS volumes was found in the reference stores searched (docs/PHANTOM.md says which and why the figures
are credible). A case's whole-tumour target is drawn from ``WT_VOLUME_MODEL`` (a truncated log-normal
fitted to those figures), its pattern from ``PATTERNS`` (ring-enhancing with central necrosis: labels 1
inside a 4 rim, plus 2; solid enhancing: 4 + 2; non-enhancing: 1 + 2), its core share per pattern from
the same source. Each sub-region is then sized by rank, not by a fixed threshold: the core is the target
number of eligible voxels (own cerebral hemisphere, own ventricle) lowest on a noisy ellipsoid function;
necrosis the deepest core voxels by true distance to the core's edge (so a rim at least a voxel thick
always encloses it); oedema the eligible voxels (own cerebrum, CSF < 0.5) with the shortest "travel time"
from the core, fast in white matter and slow in grey matter, so it follows white matter. Rendered volumes
therefore equal their targets to a voxel, except where the core is too thin for necrosis at coarse shapes.
Mass effect is a radial displacement field (``_push``) damped to zero at the brain surface.

Contrasts are mixtures of per-class intensities with a per-case scanner/protocol profile: the class table
(``_INTENSITY``) jittered by ~10 % and kept only if the rules that make each sequence recognisable hold
(``_CONTRAST_RULES``), a bias field of varying strength, Rician noise of varying level, in-plane blur and
slice thickness (thin 3D T1/T1ce, thick 2D T2/FLAIR), gain, and tumour texture; the background is exactly
0 (skull-stripped). cohort.json records every case's pattern, target and rendered volumes per sub-region
and lesion, anatomy parameters and contrast profile.

Multiprocessing uses "spawn": call ``generate_cohort`` with ``workers > 1`` from code guarded by
``if __name__ == "__main__":`` (the ``fdn phantom`` command is).
"""

from __future__ import annotations

import functools
import json
import math
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from fdn_core.data.readers import nifti_bytes
from fdn_core.errors import ConfigError, DataError
from fdn_core.fileio import atomic_dir, atomic_write_json
from fdn_core.labels import ABNORMAL_NAMES, ANATOMY_NAMES, CLASS_TO_BRATS_FILE, MODALITIES
from fdn_core.progress import Progress

__all__ = [
    "BRATS_WT_REFERENCE",
    "DEFAULT_SHAPE",
    "FIELD_OF_VIEW_MM",
    "GENERATOR_VERSION",
    "PATTERNS",
    "WT_VOLUME_MODEL",
    "generate_cohort",
    "read_cohort_json",
    "sample_whole_tumour_ml",
]

GENERATOR_VERSION = "2.0"
DEFAULT_SHAPE = (240, 240, 155)
FIELD_OF_VIEW_MM = (240.0, 240.0, 155.0)
#: Tumour labels as written to the ``_seg`` files (BraTS file codes) and anatomy labels of ``_anat``.
SEG_LABELS = {CLASS_TO_BRATS_FILE[c]: ABNORMAL_NAMES[c] for c in range(1, len(ABNORMAL_NAMES))}
ANAT_LABELS = dict(enumerate(ANATOMY_NAMES))
del ANAT_LABELS[0]
_TEMPLATE_NAME = "MNI ICBM152 2009a, 1 mm (nilearn.datasets GM, WM and brain-mask templates)"
_MNI_CENTRE = np.array([0.0, -17.0, 8.0])  # MNI point placed at the centre of the field of view


# ----------------------------------------------------------------------------------------------------------
# Source anatomy from the MNI template (loaded once per process)
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Atlas:
    """Template maps on a cropped 1 mm MNI grid; ``origin`` is the MNI position of voxel (0, 0, 0)."""

    origin: np.ndarray
    tissue: np.ndarray  # (X, Y, Z, 4) float32: CSF, GM, WM probabilities and the brain mask
    mask: np.ndarray
    depth2: np.ndarray
    anat: np.ndarray
    sites: np.ndarray
    site_depth: np.ndarray
    site_ventricle_distance: np.ndarray
    ventricle_sdf: np.ndarray  # 1 mm: signed distance to the lateral ventricles (mm, positive outside)


def _nilearn_datasets() -> Any:
    try:
        from nilearn import datasets
    except ImportError as exc:
        raise DataError(
            "the phantom generator needs nilearn's MNI152 template, but nilearn is not installed; "
            "install it with `pip install nilearn` (or the extra: `pip install 'fdn-retrieval[phantom]'`)"
        ) from exc
    return datasets


def _load_template_maps() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(affine, gm, wm, mask) of nilearn's 1 mm MNI152 2009a template, checked."""
    ds = _nilearn_datasets()
    images = {
        "gm": ds.load_mni152_gm_template(resolution=1),
        "wm": ds.load_mni152_wm_template(resolution=1),
        "mask": ds.load_mni152_brain_mask(resolution=1),
    }
    affine = np.asarray(images["mask"].affine, dtype=np.float64)
    for name, img in images.items():
        if img.shape != images["mask"].shape or not np.allclose(img.affine, affine):
            raise DataError(
                f"nilearn MNI152 {name} template: grid differs from the brain mask; reinstall nilearn"
            )
    if not np.allclose(affine[:3, :3], np.eye(3)):
        raise DataError(
            "nilearn MNI152 template is not a 1 mm RAS grid (unexpected nilearn version); "
            "install nilearn>=0.10,<0.15"
        )
    gm = np.asarray(images["gm"].dataobj, dtype=np.float32)
    wm = np.asarray(images["wm"].dataobj, dtype=np.float32)
    mask = np.asarray(images["mask"].dataobj) > 0
    return affine, gm, wm, mask


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndi.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


@functools.lru_cache(maxsize=1)
def _atlas() -> _Atlas:
    """Build the source anatomy once per process (see the module docstring for how labels are derived)."""
    affine, gm, wm, mask = _load_template_maps()
    idx = np.nonzero(mask)
    lo = np.maximum([int(a.min()) - 4 for a in idx], 0)
    hi = np.minimum([int(a.max()) + 5 for a in idx], mask.shape)
    crop = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    # Fill holes slice by slice (the basal cisterns fall below the template's mask threshold), one piece.
    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[:, :, 1] = ndi.generate_binary_structure(2, 1)
    mask = _largest_component(ndi.binary_fill_holes(mask[crop], structure=in_plane))
    gm = np.where(mask, gm[crop], 0.0).astype(np.float32)
    wm = np.where(mask, wm[crop], 0.0).astype(np.float32)
    csf = np.where(mask, np.clip(1.0 - gm - wm, 0.0, 1.0), 0.0).astype(np.float32)
    origin = affine[:3, 3] + lo
    shape = mask.shape
    x = (origin[0] + np.arange(shape[0]))[:, None, None]
    y = (origin[1] + np.arange(shape[1]))[None, :, None]
    z = (origin[2] + np.arange(shape[2]))[None, None, :]

    # Tentorium: a parametric surface snapped to the CSF gap above the cerebellum.
    x2 = x[:, :, 0]
    y2 = y[:, :, 0]
    z_guess = -3.0 - 0.45 * np.abs(x2) + 0.25 * np.minimum(y2 + 60.0, 0.0)
    csf_smooth = ndi.gaussian_filter(csf, 1.0)
    offsets = np.arange(-6, 7)
    k_guess = np.rint(z_guess - origin[2]).astype(int)
    k_band = np.clip(k_guess[..., None] + offsets, 0, shape[2] - 1)
    band = np.take_along_axis(csf_smooth, k_band, axis=2)
    best = offsets[np.argmax(band, axis=2)]
    strong = band.max(axis=2) > 0.15
    z_snap = np.where(strong, z_guess + best, z_guess)
    z_tent = ndi.gaussian_filter(z_snap, 2.0)
    front = -30.0 - 0.4 * np.maximum(np.abs(x2) - 15.0, 0.0)
    infra = mask & (z < z_tent[:, :, None]) & (y < front[:, :, None])
    brainstem = mask & ((x / 15.0) ** 2 + ((y + 27.0) / 19.0) ** 2 < 1.0) & (z < -10.0)
    infra |= brainstem
    cerebellum = np.zeros(shape, bool)
    back = (slice(None), slice(0, int(-20 - origin[1])), slice(0, int(10 - origin[2])))  # speeds up labelling
    cerebellum[back] = _largest_component((infra & ~brainstem)[back])

    # Lateral ventricles: large CSF components near the midline, one per hemisphere, inside a box.
    vb = tuple(slice(int(a - o), int(b - o) + 1) for a, b, o in zip((-38, -62, -12), (38, 38, 32), origin))
    xb = x[vb[0]]
    box = mask[vb] & ~infra[vb]
    core = box & (csf[vb] > 0.55) & (np.abs(xb) >= 2.5)
    ventricles = []
    for side in (xb < 0, xb > 0):
        seed_region = _largest_component(core & side)
        grown = (
            ndi.binary_dilation(seed_region, iterations=2)
            & (csf[vb] > 0.3)
            & box
            & side
            & (np.abs(xb) >= 2.0)
        )
        full = np.zeros(shape, bool)
        full[vb] = grown
        ventricles.append(full)

    left = np.broadcast_to(x < 0, shape)
    anat = np.zeros(shape, np.uint8)
    anat[mask & ~infra] = 2
    anat[mask & ~infra & left] = 1
    anat[cerebellum] = 4
    anat[cerebellum & left] = 3
    anat[ventricles[0]] = 5
    anat[ventricles[1]] = 6

    # Distances on a 2 mm grid (8x cheaper than 1 mm, and smooth quantities anyway).
    mask2 = mask[::2, ::2, ::2]
    depth2 = (2.0 * ndi.distance_transform_edt(mask2)).astype(np.float32)
    ventricle_distance2 = (2.0 * ndi.distance_transform_edt(anat[::2, ::2, ::2] < 5)).astype(np.float32)
    # Candidate tumour sites: deep cerebral white matter, every 2 mm.
    site_mask = (
        ((anat == 1) | (anat == 2)) & (wm > 0.75) & (np.abs(x) >= 8) & (z > z_tent[:, :, None] + 12.0)
    )[::2, ::2, ::2] & (depth2 >= 10.0)
    site_idx = np.nonzero(site_mask)
    sites = 2.0 * np.stack(site_idx, axis=1).astype(np.float64) + origin
    # Signed distance to the lateral ventricles, computed in their bounding box plus 32 mm (clipped at 30).
    inside_ventricle = anat >= 5
    vbox = tuple(slice(max(int(a.min()) - 32, 0), int(a.max()) + 33) for a in np.nonzero(inside_ventricle))
    sdf = ndi.distance_transform_edt(~inside_ventricle[vbox]) - ndi.distance_transform_edt(
        inside_ventricle[vbox]
    )
    ventricle_sdf = np.full(shape, 30.0, np.float32)
    ventricle_sdf[vbox] = np.clip(ndi.gaussian_filter(sdf.astype(np.float32), 1.0), -10.0, 30.0)
    return _Atlas(
        origin=origin,
        tissue=np.ascontiguousarray(np.stack([csf, gm, wm, mask.astype(np.float32)], axis=-1)),
        mask=mask.astype(np.float32),
        depth2=depth2,
        anat=anat,
        sites=sites,
        site_depth=depth2[site_idx],
        site_ventricle_distance=ventricle_distance2[site_idx],
        ventricle_sdf=ventricle_sdf,
    )


def _sample(
    volume: np.ndarray, points_mm: np.ndarray, origin: np.ndarray, step: float, order: int
) -> np.ndarray:
    """Values of a template-grid volume at MNI points ``(3, ...)`` (0 outside the grid)."""
    coords = (points_mm - origin.reshape((3,) + (1,) * (points_mm.ndim - 1))) / step
    return ndi.map_coordinates(volume, coords, order=order, mode="constant", cval=0.0, prefilter=False)


# ----------------------------------------------------------------------------------------------------------
# Per-case random parameters: a function of (seed, case index, shape) only
# ----------------------------------------------------------------------------------------------------------

#: Published BraTS 2020 training-set figures the tumour volumes are matched to (mL, whole tumour = labels
#: 1 + 2 + 4; n = 369: 293 HGG, 76 LGG). Source and derivation: module docstring and docs/PHANTOM.md.
BRATS_WT_REFERENCE: dict[str, float] = {
    "n": 369,
    "mean": 99.55,
    "sd": 59.43,
    "median": 90.74,
    "iqr": 94.39,
    "min": 5.8,
    "fraction_over_150": 79 / 369,
}
#: Whole-tumour volume model: log(V / mL) ~ Normal(mu, sigma), truncated to [min_ml, max_ml]. The three free
#: parameters (mu, sigma, max_ml) were fitted by least squares on the relative errors of the reference mean,
#: SD, median, IQR and fraction over 150 mL (min_ml is the published minimum); the model's own figures are in
#: docs/PHANTOM.md. The published SD (59) is small for its IQR (94), so an untruncated log-normal cannot fit.
WT_VOLUME_MODEL: dict[str, float] = {"mu": 4.952, "sigma": 1.103, "min_ml": 5.8, "max_ml": 228.0}
#: Appearance patterns and their probabilities among tumours (see docs/PHANTOM.md for why these).
PATTERNS: dict[str, float] = {"ring": 0.60, "solid": 0.25, "non-enhancing": 0.15}
#: Tumour core (labels 1 + 4) as a fraction of the whole tumour: Beta distribution (mean, concentration) per
#: pattern; the rest is oedema. Means from the reference (HGG TC/WT 0.38, LGG 0.50).
_CORE_FRACTION = {"ring": (0.38, 14.0), "solid": (0.33, 14.0), "non-enhancing": (0.50, 10.0)}
#: Enhancing rim as a fraction of a ring tumour's core (reference HGG ET/TC: 23.4 / 37.7 = 0.62).
_RING_ET_FRACTION = (0.62, 12.0)
_SECOND_LESION_PROBABILITY = 0.15
_FOV_HALF_Z = FIELD_OF_VIEW_MM[2] / 2.0


@dataclass(frozen=True, eq=False)
class _Lesion:
    """One tumour, placed in the case's MNI-like frame (after the similarity transform)."""

    pattern: str  # "ring" (NCR core + ET rim), "solid" (ET core), "non-enhancing" (NET core, label 1)
    target_ml: dict[str, float]  # "ncr_net", "ed", "et", "total": volumes to render, in output (world) mL
    centre: np.ndarray  # MNI mm
    shape_axes: np.ndarray  # relative semi-axes of the core ellipsoid (product 1)
    rotation: np.ndarray  # 3x3, ellipsoid axes
    irregularity: float  # amplitude of the boundary noise, fraction of the radius
    rim_variation_mm: float  # how much the enhancing rim's thickness varies around the necrosis
    push_fraction: float  # mass effect: the core holds what was a sphere (1 - push_fraction) times smaller
    swelling: float  # volume fraction added in the oedema zone
    push_decay_mm: float  # Gaussian fade of the displaced volume beyond the oedema zone
    noise_seed: int


@dataclass(frozen=True, eq=False)
class _Contrast:
    """One case's scanner/protocol: relative class intensities and image degradations, per sequence."""

    table: np.ndarray  # (4, 7): rows MODALITIES, columns _CLASSES
    oedema_strength: float  # how fully oedema replaces the normal tissue signal
    bias_sd: np.ndarray  # (4,) SD of the log bias field's quadratic-polynomial coefficients
    noise: np.ndarray  # (4,) Rician noise SD, fraction of the brighter of GM and WM
    inplane_blur_mm: np.ndarray  # (4,) Gaussian sigma in-plane
    slice_thickness_mm: np.ndarray  # (4,) through-plane resolution (Gaussian sigma = 0.42 x thickness)
    gain: np.ndarray  # (4,) overall scale of the stored integers
    seed: int  # bias coefficients and noise realisations


@dataclass(frozen=True, eq=False)
class _CaseParams:
    """Everything random about one case; ``_render_case`` is deterministic given these."""

    case_id: str
    seed: int
    index: int
    shape: tuple[int, int, int]
    healthy: bool
    scale: np.ndarray  # head size relative to the template, per axis
    tilt_deg: np.ndarray  # pitch (about left-right), roll (about anterior-posterior), yaw (about vertical)
    rotation: np.ndarray  # 3x3, world -> MNI
    shift_mm: np.ndarray  # head position in the field of view
    warp_mm: tuple[float, float]  # amplitudes of the coarse and the fine smooth nonlinear deformation
    warp_seed: int
    ventricle_factor: float  # intended lateral-ventricle volume relative to the template
    ventricle_dilation_mm: float  # the wall displacement that gives it (``_dilate_ventricles``)
    atrophy: float  # 0..1: share of sulcal-bank grey matter turned into CSF (wider sulci)
    lesions: tuple[_Lesion, ...]
    contrast: _Contrast


def _spacing(shape: Sequence[int]) -> tuple[float, float, float]:
    return (
        FIELD_OF_VIEW_MM[0] / shape[0],
        FIELD_OF_VIEW_MM[1] / shape[1],
        FIELD_OF_VIEW_MM[2] / shape[2],
    )


def _affine(shape: Sequence[int]) -> np.ndarray:
    """BraTS-like LPS voxel axes (diag(-1, -1, 1) times the spacing), field of view centred on world 0."""
    sx, sy, sz = _spacing(shape)
    affine = np.diag([-sx, -sy, sz, 1.0])
    affine[:3, 3] = [sx * (shape[0] - 1) / 2.0, sy * (shape[1] - 1) / 2.0, -sz * (shape[2] - 1) / 2.0]
    return affine


def _case_id(index: int) -> str:
    return f"phantom_{index:04d}"


def _is_healthy(seed: int, index: int) -> bool:
    """Exactly one healthy case in every block of four consecutive indices (position drawn per seed)."""
    block = index // 4
    position = int(np.random.default_rng([seed, block, 0x4EA1]).integers(4))
    return index % 4 == position


def _rotation(angles_deg: Sequence[float]) -> np.ndarray:
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.standard_normal(4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def _beta(rng: np.random.Generator, mean: float, concentration: float) -> float:
    return float(rng.beta(mean * concentration, (1.0 - mean) * concentration))


def sample_whole_tumour_ml(rng: np.random.Generator, size: int | None = None) -> np.ndarray | float:
    """Whole-tumour volumes (mL) drawn from ``WT_VOLUME_MODEL`` (inverse CDF of the truncated log-normal)."""
    from scipy.special import ndtr, ndtri

    m = WT_VOLUME_MODEL
    lo, hi = (ndtr((math.log(v) - m["mu"]) / m["sigma"]) for v in (m["min_ml"], m["max_ml"]))
    u = rng.uniform(lo, hi, size)
    values = np.exp(m["mu"] + m["sigma"] * ndtri(u))
    return float(values) if size is None else values


def _split_targets(rng: np.random.Generator, pattern: str, total_ml: float) -> dict[str, float]:
    """Sub-region target volumes of one lesion of ``total_ml``: core fraction per pattern, rest oedema."""
    core = total_ml * _beta(rng, *_CORE_FRACTION[pattern])
    if pattern == "ring":
        et = core * _beta(rng, *_RING_ET_FRACTION)
        ncr = core - et
    elif pattern == "solid":
        et, ncr = core, 0.0
    else:
        et, ncr = 0.0, core
    return {"ncr_net": ncr, "ed": total_ml - core, "et": et, "total": total_ml}


def _sphere_radius(volume_ml: float) -> float:
    return (3.0 * volume_ml * 1000.0 / (4.0 * math.pi)) ** (1.0 / 3.0)


def _lesion_reach(target_ml: dict[str, float], scale: float) -> tuple[float, float, float]:
    """(core radius, whole-tumour radius, evaluation radius) of a lesion in the case's MNI frame (mm)."""
    r_core = _sphere_radius(target_ml["ncr_net"] + target_ml["et"]) / scale
    r_wt = _sphere_radius(target_ml["total"]) / scale
    # Oedema spreads along white matter and spares cortex, so it reaches well beyond the equivalent sphere.
    return r_core, r_wt, min(115.0, max(2.0 * r_wt, r_core + 30.0) + 5.0)


def _draw_lesion(
    rng: np.random.Generator,
    atlas: _Atlas,
    avoid: list[_Lesion],
    pattern: str,
    total_ml: float,
    frame: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> _Lesion:
    """One lesion of ``total_ml`` in deep cerebral white matter, fully inside the axial field of view.

    ``frame`` is (scale, rotation world->MNI, shift) of the case: a site's world z is checked against the
    field of view so that the core is rendered whole (cropped cases keep their targets).
    """
    targets = _split_targets(rng, pattern, total_ml)
    scale, rotation, shift = frame
    s = float(np.prod(scale) ** (1.0 / 3.0))
    r_core, r_wt, _ = _lesion_reach(targets, s)
    world_z = (scale[2] * ((atlas.sites - _MNI_CENTRE) @ rotation)[:, 2]) + shift[2]
    depth_ok = atlas.site_depth >= min(r_core + 4.0, 24.0)
    ventricle_ok = atlas.site_ventricle_distance >= min(0.5 * r_core + 3.0, 12.0)
    fov_ok = np.abs(world_z) <= _FOV_HALF_Z - min(s * r_core + 8.0, 40.0)
    apart = np.ones(len(atlas.sites), bool)
    for other in avoid:
        other_wt = _sphere_radius(other.target_ml["total"]) / s
        apart &= np.linalg.norm(atlas.sites - other.centre, axis=1) >= r_wt + other_wt + 5.0
    candidates = np.flatnonzero(depth_ok & ventricle_ok & fov_ok & apart)
    for relaxed in (depth_ok & fov_ok & apart, fov_ok & apart, fov_ok, np.ones_like(fov_ok)):
        if candidates.size:
            break
        candidates = np.flatnonzero(relaxed)
    centre = atlas.sites[int(rng.choice(candidates))] + rng.uniform(-1.0, 1.0, 3)
    shape_axes = np.exp(rng.normal(0.0, 0.15, 3))
    shape_axes /= float(np.prod(shape_axes) ** (1.0 / 3.0))
    return _Lesion(
        pattern=pattern,
        target_ml=targets,
        centre=centre,
        shape_axes=shape_axes,
        rotation=_random_rotation(rng),
        irregularity=float(rng.uniform(0.12, 0.35)),
        rim_variation_mm=float(rng.uniform(0.8, 2.5)),
        push_fraction=float(rng.uniform(0.2, 0.45)),
        swelling=float(rng.uniform(0.15, 0.4)),
        push_decay_mm=float(rng.uniform(15.0, 35.0)),
        noise_seed=int(rng.integers(2**31)),
    )


# Relative intensities per contrast (rows: MODALITIES) and class (columns: _CLASSES), WM in T1 about 0.9.
_CLASSES = ("csf", "gm", "wm", "ncr", "net", "et", "ed")
_INTENSITY = np.array(
    [
        [0.30, 0.62, 0.88, 0.26, 0.50, 0.58, 0.56],  # T1: WM > GM > CSF
        [0.30, 0.64, 0.88, 0.24, 0.52, 1.30, 0.56],  # T1ce: enhancing tumour bright, necrosis dark
        [1.00, 0.56, 0.40, 0.92, 0.78, 0.62, 0.80],  # T2: CSF > GM > WM, oedema and necrosis bright
        [0.12, 0.64, 0.46, 0.40, 0.88, 0.72, 0.95],  # FLAIR: CSF dark, GM > WM, oedema bright
    ]
)
#: What keeps a sequence recognisable: (sequence, brighter class, darker class, minimum ratio).
_CONTRAST_RULES = (
    ("t1", "wm", "gm", 1.15),
    ("t1", "gm", "csf", 1.4),
    ("t1", "gm", "ncr", 1.2),
    ("t1ce", "wm", "gm", 1.15),
    ("t1ce", "gm", "csf", 1.4),
    ("t1ce", "et", "wm", 1.2),
    ("t1ce", "wm", "ncr", 1.6),
    ("t2", "csf", "gm", 1.3),
    ("t2", "gm", "wm", 1.2),
    ("t2", "ed", "wm", 1.4),
    ("t2", "ncr", "gm", 1.1),
    ("flair", "gm", "wm", 1.2),
    ("flair", "wm", "csf", 2.0),
    ("flair", "ed", "gm", 1.12),
)


def _contrast_ok(table: np.ndarray) -> bool:
    rows = {name: table[i] for i, name in enumerate(MODALITIES)}
    col = {name: j for j, name in enumerate(_CLASSES)}
    return all(rows[s][col[a]] >= ratio * rows[s][col[b]] for s, a, b, ratio in _CONTRAST_RULES)


def _draw_contrast(rng: np.random.Generator) -> _Contrast:
    """A scanner/protocol profile: class intensities jittered by ~10 % (kept only if every rule in
    ``_CONTRAST_RULES`` holds), bias, noise, in-plane blur and slice thickness, gain."""
    table = _INTENSITY
    for _ in range(200):  # rejection sampling; acceptance is about one in two
        candidate = _INTENSITY * np.exp(rng.normal(0.0, 0.10, _INTENSITY.shape))
        if _contrast_ok(candidate):
            table = candidate
            break
    three_d = np.array([True, True, False, False])  # T1 and T1ce from 3D sequences, T2 and FLAIR from 2D
    return _Contrast(
        table=table,
        oedema_strength=float(rng.uniform(0.8, 0.95)),
        bias_sd=float(rng.uniform(0.02, 0.10)) * rng.uniform(0.7, 1.3, 4),
        noise=float(rng.uniform(0.015, 0.045)) * rng.uniform(0.8, 1.25, 4),
        inplane_blur_mm=np.where(three_d, rng.uniform(0.25, 0.6, 4), rng.uniform(0.3, 0.8, 4)),
        slice_thickness_mm=np.where(three_d, rng.uniform(1.0, 3.0, 4), rng.uniform(2.0, 5.0, 4)),
        gain=1000.0 * rng.uniform(0.6, 1.6, 4),
        seed=int(rng.integers(2**31)),
    )


#: Lateral-ventricle volume factor -> wall displacement (mm) of ``_dilate_ventricles``, calibrated on rendered
#: cases (docs/PHANTOM.md); interpolated linearly in log(factor).
_VENTRICLE_CALIBRATION = (
    (0.678, -1.5),
    (0.812, -0.75),
    (1.0, 0.0),
    (1.307, 1.0),
    (1.653, 2.0),
    (1.988, 3.0),
    (2.144, 3.5),
)


def _ventricle_dilation(factor: float) -> float:
    factors, amounts = zip(*_VENTRICLE_CALIBRATION)
    return float(np.interp(math.log(factor), np.log(factors), amounts))


def _case_params(seed: int, index: int, shape: tuple[int, int, int]) -> _CaseParams:
    """Draw one case's parameters from the RNG of (seed, index)."""
    rng = np.random.default_rng([seed, index, 2])
    healthy = _is_healthy(seed, index)
    atlas = _atlas()
    # Anatomy: the MNI template is a large brain, so heads are mostly smaller; atrophy widens the sulci and
    # (partly) the ventricles.
    scale = rng.uniform(0.81, 0.97) * rng.uniform(0.95, 1.05, 3)
    tilt = rng.uniform([-10.0, -8.0, -10.0], [10.0, 8.0, 10.0])
    rotation = _rotation(tilt.tolist())
    shift = np.array(
        [rng.normal(0, 3.0), float(np.clip(rng.normal(0, 3.0), -6, 6)), rng.uniform(-16.0, 16.0)]
    )
    atrophy = float(rng.beta(1.3, 3.0))
    ventricle_factor = float(0.7 * 3.0 ** (0.5 * atrophy + 0.5 * rng.random()))  # 0.7 .. 2.1
    warp = (float(rng.uniform(1.5, 4.0)), float(rng.uniform(1.0, 3.0)))
    warp_seed = int(rng.integers(2**31))
    contrast = _draw_contrast(rng)
    lesions: list[_Lesion] = []
    if not healthy:
        pattern = str(rng.choice(list(PATTERNS), p=list(PATTERNS.values())))
        total = float(sample_whole_tumour_ml(rng))
        shares = [1.0]
        if rng.random() < _SECOND_LESION_PROBABILITY:
            second = float(rng.uniform(0.12, 0.3))
            shares = [1.0 - second, second]
        for k, share in enumerate(shares):
            own = pattern
            if k and own == "ring" and share * total < 10.0:
                own = "solid"  # a small satellite rarely shows a necrotic centre
            lesions.append(_draw_lesion(rng, atlas, lesions, own, share * total, (scale, rotation, shift)))
    return _CaseParams(
        case_id=_case_id(index),
        seed=seed,
        index=index,
        shape=shape,
        healthy=healthy,
        scale=scale,
        tilt_deg=tilt,
        rotation=rotation,
        shift_mm=shift,
        warp_mm=warp,
        warp_seed=warp_seed,
        ventricle_factor=ventricle_factor,
        ventricle_dilation_mm=_ventricle_dilation(ventricle_factor),
        atrophy=atrophy,
        lesions=tuple(lesions),
        contrast=contrast,
    )


# ----------------------------------------------------------------------------------------------------------
# Rendering one case
# ----------------------------------------------------------------------------------------------------------

_FLAT = 1.0e6  # "infinitely far" signed distance


@dataclass(frozen=True, eq=False)
class _Rendered:
    images: dict[str, np.ndarray]  # int16 (X, Y, Z) in file voxel order
    seg: np.ndarray  # uint8 BraTS codes
    anat: np.ndarray  # uint8 ANAT_LABELS
    tissue: np.ndarray  # uint8 dominant normal tissue (probability >= 0.7): 1 CSF, 2 GM, 3 WM; 4 mixed
    affine: np.ndarray
    summary: dict[str, Any]


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    field = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return field / max(float(field.std()), 1e-6)


def _push(
    points: np.ndarray,
    centre: np.ndarray,
    radius: float,
    push: float,
    swell_radius: float,
    swelling: float,
    decay: float,
    damp: np.ndarray,
) -> np.ndarray:
    """Inverse map of a radial mass effect about ``centre``: where each output point's tissue came from.

    With ``r0`` the source radius of an output point at radius ``r``: the sphere of ``radius`` holds what
    was a sphere of ``radius - push`` (scaled linearly); between ``radius`` and ``swell_radius`` (oedema)
    the tissue swells by the volume fraction ``swelling``; beyond, the displaced volume fades out as a
    Gaussian of width ``decay`` (the tissue there is compressed). ``r0^3`` is monotone in ``r`` on every
    ray, so the map never folds. The displacement is multiplied by ``damp`` (0 at the brain surface).
    """
    d = points - centre.reshape((3,) + (1,) * (points.ndim - 1))
    r = np.sqrt(np.sum(d * d, axis=0))
    r3 = r**3
    inner = radius - push
    added_core = radius**3 - inner**3
    added_total = added_core + swelling * (swell_radius**3 - radius**3)
    fade = np.exp(-0.5 * ((r - swell_radius) / decay) ** 2)
    r0_cubed = np.where(
        r < radius,
        r3 * (inner / radius) ** 3,
        np.where(
            r < swell_radius,
            r3 - added_core - swelling * (r3 - radius**3),
            r3 - added_total * fade,
        ),
    )
    r0 = np.cbrt(np.maximum(r0_cubed, 0.0))
    return points - d * (damp * (r - r0) / np.maximum(r, 1e-6))


def _dilate_ventricles(points: np.ndarray, atlas: _Atlas, amount_mm: float) -> np.ndarray:
    """Inverse map that widens (``amount_mm`` > 0) or narrows the lateral ventricles by about ``amount_mm``.

    A point at signed distance ``D`` from the ventricle wall takes what was at ``D - delta(D)`` along the
    wall normal, with ``delta = amount * exp(-max(D, 0) / 8) * clip((D + 4) / 4, 0, 1)``: ``D - delta(D)``
    increases with ``D`` for ``|amount| < 4`` mm, so the map never folds; deep inside and far away it is 0.
    """
    distance = _sample(atlas.ventricle_sdf, points, atlas.origin, 1.0, 1)
    gradient = np.zeros_like(points)
    for axis in range(3):
        offset = np.zeros((3,) + (1,) * (points.ndim - 1))
        offset[axis] = 1.0
        ahead = _sample(atlas.ventricle_sdf, points + offset, atlas.origin, 1.0, 1)
        behind = _sample(atlas.ventricle_sdf, points - offset, atlas.origin, 1.0, 1)
        gradient[axis] = 0.5 * (ahead - behind)
    normal = gradient / np.maximum(np.sqrt(np.sum(gradient * gradient, axis=0)), 1.0)
    delta = amount_mm * np.exp(-np.maximum(distance, 0.0) / 8.0) * np.clip((distance + 4.0) / 4.0, 0.0, 1.0)
    return points - delta * normal


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _trilinear(volume: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``volume`` (X, Y, Z, 4) float32 at voxel coordinates ``(3, N)``; 0 outside.

    Our own gather rather than scipy's map_coordinates: each corner fetches all four channels as one
    16-byte element, several times faster for the tissue maps, which dominate the rendering time.
    """
    dims = volume.shape[:3]
    if volume.dtype != np.float32 or volume.shape[3] != 4 or not volume.flags.c_contiguous:
        raise ValueError("_trilinear needs a C-contiguous float32 (X, Y, Z, 4) volume")
    flat = volume.reshape(-1, 4).view(np.complex128).ravel()
    strides = (dims[1] * dims[2], dims[2], 1)
    n = coords.shape[1]
    base = np.zeros(n, np.intp)
    valid = np.ones(n, bool)
    weights = []
    for a in range(3):
        x = coords[a]
        valid &= (x >= 0.0) & (x <= dims[a] - 1)
        i = np.clip(np.floor(x), 0, dims[a] - 2).astype(np.intp)
        base += i * strides[a]
        w = np.clip(x - i, 0.0, 1.0).astype(np.float32)
        weights.append((1.0 - w, w))
    out = np.zeros((n, 4), np.float32)
    tmp = np.empty((n, 4), np.float32)
    for dx in (0, 1):
        for dy in (0, 1):
            wxy = weights[0][dx] * weights[1][dy]
            for dz in (0, 1):
                corner = flat.take(base + (dx * strides[0] + dy * strides[1] + dz)).view(np.float32)
                np.multiply(corner.reshape(n, 4), (wxy * weights[2][dz])[:, None], out=tmp)
                out += tmp
    out[~valid] = 0.0
    return out


def _nearest(volume: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Nearest-neighbour values of a 3D ``volume`` at voxel coordinates ``(3, N)``; 0 outside the grid."""
    idx = np.rint(coords).astype(np.intp)
    valid = np.all((idx >= 0) & (idx < np.array(volume.shape).reshape(3, 1)), axis=0)
    idx[:, ~valid] = 0
    out = volume[idx[0], idx[1], idx[2]]
    out[~valid] = 0
    return out


def _upsample(coarse: np.ndarray, step: int, lo: Sequence[int], hi: Sequence[int]) -> np.ndarray:
    """Linear interpolation of a coarse grid (nodes every ``step`` voxels) on voxels ``lo:hi``, per axis."""
    out = coarse
    for axis in range(3):
        pos = np.arange(lo[axis], hi[axis], dtype=np.float32) / step
        i = np.minimum(pos.astype(np.intp), coarse.shape[axis] - 2)
        t = (pos - i).reshape([-1 if a == axis else 1 for a in range(3)])
        a = np.take(out, i, axis=axis)
        out = a + (np.take(out, i + 1, axis=axis) - a) * t
    return out


def _rank_threshold(values: np.ndarray, eligible: np.ndarray, count: int) -> tuple[np.ndarray, float]:
    """(``values - t``, ``t``): exactly the ``count`` smallest eligible values fall below ``t`` (all of them
    when fewer are eligible); ineligible entries become ``_FLAT``.

    Sizing a region by rank rather than by a fixed threshold is what makes rendered volumes meet their
    targets whatever the anatomy around the lesion (cortex, ventricles, the falx and the field of view).
    """
    candidates = values[eligible]
    if count <= 0 or candidates.size == 0:
        return np.full(values.shape, _FLAT, np.float32), -_FLAT
    if count >= candidates.size:
        threshold = float(candidates.max()) + 1e-3
    else:
        low, high = np.partition(candidates, (count - 1, count))[count - 1 : count + 1]
        threshold = 0.5 * (float(low) + float(high))
    shifted = np.where(eligible, values - np.float32(threshold), np.float32(_FLAT)).astype(np.float32)
    return shifted, threshold


def _depth_inside(vox: list[np.ndarray], member: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Euclidean distance (mm) from each voxel ``vox`` to the nearest voxel outside the ``member`` set."""
    idx = [v[member] for v in vox]
    lo = [int(i.min()) - 1 for i in idx]
    size = [int(i.max()) + 2 - o for i, o in zip(idx, lo)]
    grid = np.zeros(size, bool)
    grid[tuple(i - o for i, o in zip(idx, lo))] = True
    depth = np.zeros(member.shape, np.float32)
    depth[member] = ndi.distance_transform_edt(grid, sampling=spacing)[tuple(i - o for i, o in zip(idx, lo))]
    return depth


def _warped_mni(
    p: _CaseParams, shape: tuple[int, int, int], step: int
) -> tuple[np.ndarray, list[np.ndarray]]:
    """MNI position of every coarse-grid node: file voxel -> world -> similarity -> coarse + fine warp."""
    affine = _affine(shape)
    nodes = [np.arange(math.ceil((n - 1) / step) + 1) * step for n in shape]
    grid = np.stack(np.meshgrid(*nodes, indexing="ij")).astype(np.float64)
    world = np.einsum("ij,j...->i...", affine[:3, :3], grid) + affine[:3, 3].reshape(3, 1, 1, 1)
    rel = (world - p.shift_mm.reshape(3, 1, 1, 1)) / p.scale.reshape(3, 1, 1, 1)
    mni = np.einsum("ij,j...->i...", p.rotation, rel) + _MNI_CENTRE.reshape(3, 1, 1, 1)
    wrng = np.random.default_rng(p.warp_seed)
    # Two smooth random fields (control points ~80 mm and ~48 mm apart, cubic splines): the displacement
    # gradient stays well below 1, so the map never folds and labels stay exact.
    for amplitude, control in zip(p.warp_mm, ((4, 4, 4), (6, 6, 5))):
        ctrl = wrng.standard_normal((3, *control)) * amplitude
        at = np.meshgrid(*[np.linspace(0, c - 1, len(nd)) for c, nd in zip(control, nodes)], indexing="ij")
        mni += np.stack([ndi.map_coordinates(ctrl[i], at, order=3, mode="nearest") for i in range(3)])
    return mni, nodes


def _render_case(p: _CaseParams) -> _Rendered:
    """Synthesise one case: four contrasts, seg and anat, in file voxel order (deterministic given ``p``)."""
    atlas = _atlas()
    shape = p.shape
    spacing = np.array(_spacing(shape))
    affine = _affine(shape)
    origin = atlas.origin.reshape(3, 1, 1, 1)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    head_scale = float(np.prod(p.scale) ** (1.0 / 3.0))

    # Coordinates on a coarse (~4 mm) grid, then the mass effect of each lesion (radial displacement fields
    # damped near the brain surface) and the ventricle size (wall dilation).
    step = max(1, round(4.0 / float(spacing.min())))
    mni, nodes = _warped_mni(p, shape, step)
    source = mni.copy()
    pushes = []
    for les in p.lesions:
        r_core, r_wt, _ = _lesion_reach(les.target_ml, head_scale)
        push = min(les.push_fraction * r_core, 10.0)
        pushes.append(
            (les.centre, r_core, push, r_core + 0.7 * (r_wt - r_core) + 2.0, les.swelling, les.push_decay_mm)
        )
    for centre, radius, push, swell_radius, swelling, decay in pushes:
        damp = np.clip(_sample(atlas.depth2, source, atlas.origin, 2.0, 1) / 10.0, 0.0, 1.0)
        source = _push(source, centre, radius, push, swell_radius, swelling, decay, damp)
    if p.ventricle_dilation_mm != 0.0:
        source = _dilate_ventricles(source, atlas, p.ventricle_dilation_mm)
    source_vox = (source - origin).astype(np.float32)  # template voxel coordinates

    # Full resolution only inside the bounding box of cells that can hold brain.
    inside = _sample(atlas.mask, source, atlas.origin, 1.0, 1) > 0.0
    inside = ndi.binary_dilation(inside, structure=np.ones((3, 3, 3), bool))
    cells = [np.minimum(np.arange(n) // step, len(nd) - 1) for n, nd in zip(shape, nodes)]
    nz = np.nonzero(inside)
    lo = [int(np.searchsorted(c, k.min())) for c, k in zip(cells, nz)]
    hi = [int(np.searchsorted(c, k.max(), side="right")) for c, k in zip(cells, nz)]
    box = tuple(h - o for h, o in zip(hi, lo))
    candidate = inside[np.ix_(*[c[o:h] for c, o, h in zip(cells, lo, hi)])]
    src = np.stack([_upsample(source_vox[i], step, lo, hi)[candidate] for i in range(3)])
    tissue = _trilinear(atlas.tissue, src)
    brain = tissue[:, 3] >= 0.5
    src = src[:, brain]
    tissue = tissue[brain]
    anat = _nearest(atlas.anat, src)
    local = np.flatnonzero(candidate)[brain]  # flat index of each brain voxel inside the box
    vox = [v + o for v, o in zip(np.unravel_index(local, box), lo)]  # file voxel indices
    total = tissue[:, :3].sum(axis=1)
    empty = total < 1e-3
    tissue[empty, 0] = 1.0
    total[empty] = 1.0
    csf, gm, wm = (tissue[:, k] / total for k in range(3))
    del tissue, total, src

    def smooth(values: np.ndarray, sigma_mm: np.ndarray | float) -> np.ndarray:
        """Gaussian blur of per-voxel values through the box volume (background 0)."""
        vol = np.zeros(box, np.float32)
        vol.ravel()[local] = values
        return ndi.gaussian_filter(vol, np.broadcast_to(sigma_mm, 3) / spacing, truncate=2.5).ravel()[local]

    # Atrophy: grey matter on sulcal banks (where the neighbourhood holds CSF) turns into CSF.
    if p.atrophy > 0.0:
        banks = np.clip((smooth(csf, 1.5) - 0.08) / 0.3, 0.0, 1.0)
        lost = (0.85 * p.atrophy) * gm * banks
        gm = gm - lost
        csf = csf + lost

    # Tumours: each sub-region is the set of eligible voxels ranked lowest by a smooth shape function, cut
    # at the rank that gives its target volume (output voxels).
    n = gm.size
    f_nec = np.zeros(n, np.float32)
    f_et = np.zeros(n, np.float32)
    f_net = np.zeros(n, np.float32)
    f_ed = np.zeros(n, np.float32)
    texture = np.zeros(n, np.float32)
    seg = np.zeros(n, np.uint8)
    lesion_info = []
    mni_packed = np.zeros((*mni.shape[1:], 4), np.float32)
    mni_packed[..., :3] = np.moveaxis(mni, 0, -1)
    min_rim = float(spacing.max()) + 1e-3  # at least one voxel of enhancing rim around necrosis
    for les in p.lesions:
        r_core, _, reach = _lesion_reach(les.target_ml, head_scale)
        near_nodes = np.all(
            np.abs(mni - les.centre.reshape(3, 1, 1, 1)) < reach + 2.0 * step * spacing.max(), axis=0
        )
        sel = np.flatnonzero(near_nodes[cells[0][vox[0]], cells[1][vox[1]], cells[2][vox[2]]])
        frac = np.stack([v[sel] for v in vox]).astype(np.float32) / step
        d = _trilinear(mni_packed, frac)[:, :3].T - les.centre.reshape(3, 1).astype(np.float32)
        keep = np.sum(d * d, axis=0) < reach * reach
        sel = sel[keep]
        d = d[:, keep]
        semi_axes = (r_core * les.shape_axes).astype(np.float32)
        q = (les.rotation.T.astype(np.float32) @ d) / semi_axes.reshape(3, 1)
        rho = np.sqrt(np.sum(q * q, axis=0))
        dist = np.sqrt(np.sum(d * d, axis=0))
        radius_dir = np.where(rho > 1e-6, dist / np.maximum(rho, 1e-6), np.float32(r_core))
        # Smooth noise around the lesion: boundary shape, rim thickness, oedema reach, texture.
        lrng = np.random.default_rng(les.noise_seed)
        cell = max(2.0, reach / 40.0)
        m = math.ceil(2.0 * reach / cell) + 2
        noise = np.zeros((m, m, m, 4), np.float32)
        # Boundary noise scales with the core, so large and small tumours are equally (ir)regular.
        coarse, fine = max(4.0, 0.45 * r_core) / cell, max(2.0, 0.18 * r_core) / cell
        noise[..., 0] = 0.8 * _smooth_noise(lrng, (m, m, m), coarse) + 0.45 * _smooth_noise(
            lrng, (m, m, m), fine
        )
        noise[..., 1] = _smooth_noise(lrng, (m, m, m), 6.0 / cell)
        noise[..., 2] = _smooth_noise(lrng, (m, m, m), 4.0 / cell)
        noise[..., 3] = _smooth_noise(lrng, (m, m, m), 2.0 / cell)
        shape_noise, rim_noise, ed_noise, tex_noise = _trilinear(noise, (d + reach) / cell).T
        del noise
        shape_fn = (
            rho - 1.0 - les.irregularity * shape_noise
        ) * radius_dir  # ~ mm outside the noisy ellipsoid

        # Confined to the lesion's cerebral hemisphere (the falx stops it); the core may reach into the
        # ventricle; earlier lesions keep their voxels.
        own_cerebrum, own_ventricle = (1, 5) if les.centre[0] < 0 else (2, 6)
        lab = anat[sel]
        old = seg[sel]
        cerebrum = lab == own_cerebrum
        core_ok = (cerebrum | (lab == own_ventricle)) & ((old == 0) | (old == 2))
        target_vox = {k: round(v / voxel_ml) for k, v in les.target_ml.items()}
        n_core = target_vox["ncr_net"] + target_vox["et"]
        phi_core, core_threshold = _rank_threshold(shape_fn, core_ok, n_core)
        core = phi_core < 0.0
        if les.pattern == "ring" and core.any():
            # Necrosis: the deepest part of the core (true distance to the core's edge), behind an enhancing
            # rim of varying thickness; only voxels whose six neighbours are all core qualify.
            depth = _depth_inside([v[sel] for v in vox], core, spacing)
            deep = -depth - les.rim_variation_mm * np.clip(rim_noise, -2.0, 2.0)  # slowly varying: no islands
            phi_nec, _ = _rank_threshold(deep, core & (depth > min_rim), target_vox["ncr_net"])
        else:
            phi_nec = np.full_like(phi_core, _FLAT)
        # Oedema: ranked by "travel time" from the core, fast in white matter, slow in grey matter.
        speed = (0.12 + 0.88 * wm[sel]) * np.clip(1.0 + 0.45 * ed_noise, 0.2, 1.6)
        outside = np.maximum(shape_fn - np.float32(max(core_threshold, -r_core)), 0.0)
        ed_ok = cerebrum & (csf[sel] < 0.5) & ~core & (old == 0)
        travel, _ = _rank_threshold(outside / speed, ed_ok, target_vox["ed"])
        phi_ed = np.where(ed_ok, travel * speed, _FLAT)

        fc = _sigmoid(-phi_core / 0.5)
        fn = np.minimum(_sigmoid(-phi_nec / 0.7), fc)
        rim = fc - fn
        f_nec[sel] = np.maximum(f_nec[sel], fn)
        if les.pattern == "non-enhancing":
            f_net[sel] = np.maximum(f_net[sel], rim)
        else:
            f_et[sel] = np.maximum(f_et[sel], rim)
        f_ed[sel] = np.maximum(f_ed[sel], _sigmoid(-phi_ed / 1.0) * (1.0 - fc))
        texture[sel] = tex_noise

        codes = np.where(phi_nec < 0.0, 1, 1 if les.pattern == "non-enhancing" else 4)
        new = np.where(core, codes, np.where(phi_ed < 0.0, 2, 0)).astype(np.uint8)
        seg[sel] = np.where(new != 0, new, old)
        anat[sel] = np.where(core & (lab == own_ventricle), own_cerebrum, lab)
        counts = np.bincount(new, minlength=5)
        drawn = sel[core] if core.any() else sel[new != 0]
        if drawn.size == 0:  # nothing of it inside the field of view
            continue
        centre_vox = np.stack([v[drawn] for v in vox]).astype(np.float64).mean(axis=1)
        lesion_info.append(
            {
                "pattern": les.pattern,
                "centre_mm": [round(float(c), 2) for c in affine[:3, :3] @ centre_vox + affine[:3, 3]],
                "centre_voxel": [round(float(c), 3) for c in centre_vox],
                "target_ml": {k: round(float(v), 3) for k, v in les.target_ml.items()},
                "volume_ml": _volumes_ml(counts, voxel_ml),
            }
        )

    f_core = f_nec + f_et + f_net
    over = f_core > 1.0
    if np.any(over):
        for f in (f_nec, f_et, f_net):
            f[over] /= f_core[over]
        f_core = np.minimum(f_core, 1.0)

    # Contrasts: class mixtures with the case's intensity table, bias, blur, Rician noise, gain.
    contrast = p.contrast
    crng = np.random.default_rng(contrast.seed)
    table = contrast.table.astype(np.float32)
    a_ed = f_ed * np.float32(contrast.oedema_strength) * (gm + wm)
    u = [(v.astype(np.float32) - (s - 1) / 2.0) / (s / 2.0) for v, s in zip(vox, shape)]
    monomials = np.stack(
        [u[0], u[1], u[2], u[0] * u[0], u[1] * u[1], u[2] * u[2], u[0] * u[1], u[0] * u[2], u[1] * u[2]]
    )
    del u
    tumour = bool(np.any(f_core > 0) or np.any(a_ed > 0))
    flat = np.ravel_multi_index(tuple(vox), shape)
    images = {}
    for ci, name in enumerate(MODALITIES):
        t = table[ci]
        value = gm * t[1] + wm * t[2] + csf * t[0]
        if tumour:
            value += a_ed * (t[6] * (1.0 + 0.06 * texture) - value)
            value = (
                (1.0 - f_core) * value
                + f_nec * t[3] * (1.0 + 0.08 * texture)
                + f_et * t[5] * (1.0 + 0.2 * texture)
                + f_net * t[4] * (1.0 + 0.08 * texture)
            )
        coefficients = crng.normal(0.0, float(contrast.bias_sd[ci]), 9).astype(np.float32)
        value *= np.exp(coefficients @ monomials)
        sigma_mm = np.array([contrast.inplane_blur_mm[ci]] * 2 + [0.42 * contrast.slice_thickness_mm[ci]])
        if float((sigma_mm / spacing).max()) >= 0.2:
            value = smooth(value, sigma_mm)
        noise_sd = float(contrast.noise[ci]) * float(max(t[1], t[2]))
        real = value + noise_sd * crng.standard_normal(n, dtype=np.float32)
        imag = noise_sd * crng.standard_normal(n, dtype=np.float32)
        value = np.sqrt(real * real + imag * imag)
        out = np.zeros(shape, np.int16)
        out.ravel()[flat] = np.clip(np.rint(value * float(contrast.gain[ci])), 1, 32767).astype(np.int16)
        images[name] = out

    seg_vol = np.zeros(shape, np.uint8)
    seg_vol.ravel()[flat] = seg
    anat_vol = np.zeros(shape, np.uint8)
    anat_vol.ravel()[flat] = anat
    probabilities = np.stack([csf, gm, wm])
    tissue_vol = np.zeros(shape, np.uint8)
    tissue_vol.ravel()[flat] = np.where(probabilities.max(axis=0) >= 0.7, probabilities.argmax(axis=0) + 1, 4)
    anat_counts = np.bincount(anat, minlength=7)
    targets = {k: sum(les.target_ml[k] for les in p.lesions) for k in ("ncr_net", "ed", "et", "total")}
    summary = {
        "case_id": p.case_id,
        "healthy": p.healthy,
        "pattern": p.lesions[0].pattern if p.lesions else None,
        "n_lesions": len(lesion_info),
        "lesions": lesion_info,
        "tumour_volume_ml": _volumes_ml(np.bincount(seg, minlength=5), voxel_ml),
        "tumour_target_ml": {k: round(float(v), 3) for k, v in targets.items()},
        "anat_volume_ml": {
            ANAT_LABELS[k].replace(" ", "_"): round(float(anat_counts[k]) * voxel_ml, 3)
            for k in sorted(ANAT_LABELS)
        },
        "brain_volume_ml": round(n * voxel_ml, 3),
        "parenchyma_volume_ml": round(float(np.sum(gm + wm)) * voxel_ml, 3),
        "cropped": {"bottom": bool(np.any(vox[2] == 0)), "top": bool(np.any(vox[2] == shape[2] - 1))},
        "anatomy": {
            "head_scale": round(head_scale, 4),
            "scale": [round(float(s), 4) for s in p.scale],
            "tilt_deg": {k: round(float(a), 2) for k, a in zip(("pitch", "roll", "yaw"), p.tilt_deg)},
            "shift_mm": [round(float(s), 2) for s in p.shift_mm],
            "warp_mm": [round(float(w), 2) for w in p.warp_mm],
            "ventricle_factor": round(p.ventricle_factor, 3),
            "atrophy": round(p.atrophy, 3),
        },
        "contrast": {
            name: {
                **{c: round(float(v), 3) for c, v in zip(_CLASSES, contrast.table[ci])},
                "bias_sd": round(float(contrast.bias_sd[ci]), 4),
                "noise": round(float(contrast.noise[ci]), 4),
                "inplane_blur_mm": round(float(contrast.inplane_blur_mm[ci]), 3),
                "slice_thickness_mm": round(float(contrast.slice_thickness_mm[ci]), 3),
                "gain": round(float(contrast.gain[ci]), 1),
            }
            for ci, name in enumerate(MODALITIES)
        },
    }
    return _Rendered(
        images=images, seg=seg_vol, anat=anat_vol, tissue=tissue_vol, affine=affine, summary=summary
    )


def _volumes_ml(counts: np.ndarray, voxel_ml: float) -> dict[str, float]:
    """BraTS sub-region volumes from label counts (index = file code)."""
    return {
        "ncr_net": round(float(counts[1]) * voxel_ml, 3),
        "ed": round(float(counts[2]) * voxel_ml, 3),
        "et": round(float(counts[4]) * voxel_ml, 3),
        "total": round(float(counts[1] + counts[2] + counts[4]) * voxel_ml, 3),
    }


# ----------------------------------------------------------------------------------------------------------
# Files and cohorts
# ----------------------------------------------------------------------------------------------------------


def _case_files(case_id: str) -> dict[str, str]:
    names = (*MODALITIES, "seg", "anat")
    return {name: f"{case_id}/{case_id}_{name}.nii.gz" for name in names}


def _write_case(root: str, seed: int, index: int, shape: tuple[int, int, int]) -> dict[str, Any]:
    """Render case ``index`` and write its six files under ``root``; returns its cohort.json entry.

    Top-level (picklable) so spawned worker processes can run it.
    """
    params = _case_params(seed, index, shape)
    rendered = _render_case(params)
    files = _case_files(params.case_id)
    arrays = {**rendered.images, "seg": rendered.seg, "anat": rendered.anat}
    try:
        (Path(root) / params.case_id).mkdir(parents=True, exist_ok=True)
        for name, rel in files.items():
            (Path(root) / rel).write_bytes(nifti_bytes(arrays[name], rendered.affine))
    except OSError as exc:
        raise DataError(
            f"case {params.case_id}: cannot write into {root} ({exc.strerror or exc}); "
            "check free disk space and write permission of the output folder's parent"
        ) from exc
    return {**rendered.summary, "files": files}


def _check_arguments(
    n_cases: Any, seed: Any, shape: Any, workers: Any
) -> tuple[int, int, tuple[int, int, int], int]:
    if isinstance(n_cases, bool) or not isinstance(n_cases, (int, np.integer)) or n_cases < 1:
        raise ConfigError(f"phantom cohort: n_cases={n_cases!r} must be a positive integer")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"phantom cohort: seed={seed!r} must be a non-negative integer")
    try:
        shape_t = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise ConfigError(f"phantom cohort: shape={shape!r} must be three integers (X Y Z)") from None
    if (
        len(shape_t) != 3
        or any(s < 16 or s > 512 for s in shape_t)
        or any(s != v for s, v in zip(shape_t, shape))
    ):
        raise ConfigError(f"phantom cohort: shape={tuple(shape)!r} must be three integers between 16 and 512")
    if workers is None:
        workers = os.cpu_count() or 1
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
        raise ConfigError(
            f"phantom cohort: workers={workers!r} must be a positive integer (or None for all cores)"
        )
    return int(n_cases), int(seed), shape_t, min(int(workers), int(n_cases))


def generate_cohort(
    out_dir: str | Path,
    n_cases: int,
    seed: int,
    shape: Sequence[int] = DEFAULT_SHAPE,
    workers: int | None = None,
    progress: Progress | None = None,
    *,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write a phantom cohort in BraTS 2019 layout to ``out_dir`` and return the cohort.json content.

    ``shape`` keeps the 240 x 240 x 155 mm field of view (voxel size = field / shape, recorded in the affine).
    Case ``i`` depends only on ``(seed, i, shape)``: the same seed gives byte-identical files whatever
    ``workers`` is. One case in every four consecutive ones is healthy (empty seg); the others have one or
    two tumours. The folder is built beside ``out_dir`` and renamed into place when complete; an existing
    non-empty ``out_dir`` is refused unless ``overwrite``.
    """
    n_cases, seed, shape_t, n_workers = _check_arguments(n_cases, seed, shape, workers)
    out = Path(out_dir)
    if out.exists():
        if not out.is_dir():
            raise DataError(f"{out}: exists and is not a folder; choose another output path")
        if any(out.iterdir()) and not overwrite:
            raise DataError(
                f"{out}: folder is not empty; choose a new folder, or replace it with overwrite=True "
                "(command line: --overwrite)"
            )
    _nilearn_datasets()  # fail early, before any worker starts, if nilearn is missing
    if progress is not None:
        progress.update(0, n_cases, "phantom cases")
    with atomic_dir(out, overwrite=out.exists()) as tmp:
        tmp.chmod(0o755)  # mkdtemp makes it private; a cohort is meant to be shared
        entries: dict[int, dict[str, Any]] = {}
        if n_workers == 1:
            for i in range(n_cases):
                entries[i] = _write_case(str(tmp), seed, i, shape_t)
                if progress is not None:
                    progress.update(i + 1, n_cases, "phantom cases")
        else:
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=n_workers, mp_context=context) as pool:
                pending = {pool.submit(_write_case, str(tmp), seed, i, shape_t): i for i in range(n_cases)}
                try:
                    while pending:
                        done, _ = wait(pending, return_when=FIRST_COMPLETED)
                        for future in done:
                            entries[pending.pop(future)] = future.result()
                        if progress is not None:
                            progress.update(len(entries), n_cases, "phantom cases")
                except BaseException:
                    for future in pending:
                        future.cancel()
                    raise
        cases = [entries[i] for i in range(n_cases)]
        cohort = {
            "generator": "fdn_core.data.phantom",
            "generator_version": GENERATOR_VERSION,
            "template": _TEMPLATE_NAME,
            "seed": seed,
            "n_cases": n_cases,
            "n_healthy": sum(1 for c in cases if c["healthy"]),
            "shape": list(shape_t),
            "spacing": [round(s, 6) for s in _spacing(shape_t)],
            "affine": [[round(float(v), 6) for v in row] for row in _affine(shape_t)],
            "layout": "brats",
            "modalities": list(MODALITIES),
            "seg_labels": {str(k): v for k, v in SEG_LABELS.items()},
            "anat_labels": {str(k): v for k, v in ANAT_LABELS.items()},
            "cases": cases,
        }
        atomic_write_json(tmp / "cohort.json", cohort)
        (tmp / "cohort.json").chmod(0o644)
    return cohort


def read_cohort_json(cohort_dir: str | Path) -> dict[str, Any]:
    """The ``cohort.json`` of a phantom cohort (case list, parameters, statistics), checked."""
    cohort_dir = Path(cohort_dir)
    path = cohort_dir / "cohort.json"
    try:
        cohort = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(
            f"{path}: not found; {cohort_dir} is not a phantom cohort (make one with `fdn phantom`)"
        ) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable ({exc}); regenerate the cohort with `fdn phantom`") from exc
    if not isinstance(cohort, dict) or not isinstance(cohort.get("cases"), list):
        raise DataError(f"{path}: has no 'cases' list; regenerate the cohort with `fdn phantom`")
    return cohort
