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

Per case (a function of ``(seed, case index, shape)`` only, so neither the worker count nor the cohort
size changes a case): one case in every block of four consecutive indices is healthy, the others carry one
tumour, or two (15 %). An output voxel maps to MNI through the file affine, a random similarity transform
(head size, small rotations, a shift that varies the axial coverage, so some cases lose top or bottom
slices) and a smooth random deformation. Mass effect and ventricle size are radial displacement fields
(``_push``): the tumour core holds what was a smaller sphere, the oedema zone swells, and the displaced
volume fades out beyond it (compressing neighbouring tissue and ventricles, pushing the midline), damped to
zero at the brain surface; tissues and labels are both sampled through it. Maps are computed on a ~4 mm
grid and interpolated; tissue probabilities are sampled linearly (partial volume), labels by nearest
neighbour. Tumours are deformed ellipsoids (8-35 mm) with smooth-noise boundaries, centred in deep
cerebral white matter and confined to their hemisphere's cerebrum: a necrotic core (label 1) inside an
irregular enhancing rim (label 4), a solid enhancing core, or a non-enhancing core (label 1), surrounded by
oedema (label 2) whose reach scales with the local white-matter probability, so it spreads along white
matter and spares cortex and CSF. Contrasts are mixtures of per-class intensities (``_INTENSITY``) with
per-case jitter, gain, smooth multiplicative bias, anisotropic blur (thicker slices for T2/FLAIR), Rician
noise and tumour texture; the background is exactly 0 (skull-stripped).

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
    "DEFAULT_SHAPE",
    "FIELD_OF_VIEW_MM",
    "GENERATOR_VERSION",
    "generate_cohort",
    "read_cohort_json",
]

GENERATOR_VERSION = "1.0"
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
    ventricle_centres: np.ndarray


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
    centres = np.array([np.mean(np.nonzero(v), axis=1) + origin for v in ventricles])
    return _Atlas(
        origin=origin,
        tissue=np.ascontiguousarray(np.stack([csf, gm, wm, mask.astype(np.float32)], axis=-1)),
        mask=mask.astype(np.float32),
        depth2=depth2,
        anat=anat,
        sites=sites,
        site_depth=depth2[site_idx],
        site_ventricle_distance=ventricle_distance2[site_idx],
        ventricle_centres=centres,
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


@dataclass(frozen=True, eq=False)
class _Lesion:
    """One tumour, placed in the case's MNI-like frame (after the similarity transform)."""

    centre: np.ndarray  # MNI mm
    semi_axes: np.ndarray  # mm, of the core ellipsoid
    rotation: np.ndarray  # 3x3, ellipsoid axes
    kind: str  # "necrotic" (NCR core + ET rim), "solid" (ET only), "non_enhancing" (NET core)
    irregularity: float  # amplitude of the boundary noise, fraction of the radius
    rim_mm: float  # mean thickness of the enhancing rim around necrosis
    oedema_mm: float  # oedema reach beyond the core in pure white matter
    push_mm: float  # radial displacement at the core surface (mass effect)
    swelling: float  # volume fraction added in the oedema zone
    push_decay_mm: float  # Gaussian fade of the displaced volume beyond the oedema zone
    noise_seed: int


@dataclass(frozen=True, eq=False)
class _CaseParams:
    """Everything random about one case; ``_render_case`` is deterministic given these."""

    case_id: str
    seed: int
    index: int
    shape: tuple[int, int, int]
    healthy: bool
    scale: np.ndarray  # head size relative to the template, per axis
    rotation: np.ndarray  # 3x3, world -> MNI
    shift_mm: np.ndarray  # head position in the field of view
    warp_mm: float  # amplitude of the smooth nonlinear deformation
    warp_seed: int
    ventricle_push_mm: float  # ventricle enlargement
    lesions: tuple[_Lesion, ...]
    contrast_seed: int


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


def _draw_lesion(rng: np.random.Generator, atlas: _Atlas, avoid: list[_Lesion], small: bool) -> _Lesion:
    diameter = float(rng.uniform(8.0, 20.0)) if small else float(8.0 + 27.0 * rng.beta(1.4, 1.1))
    radius = diameter / 2.0
    if diameter < 14.0:
        kind = str(rng.choice(["solid", "non_enhancing"], p=[0.5, 0.5]))
    else:
        kind = str(rng.choice(["necrotic", "solid", "non_enhancing"], p=[0.65, 0.12, 0.23]))
    oedema = {
        "necrotic": rng.uniform(8.0, 30.0),
        "solid": rng.uniform(5.0, 20.0),
        "non_enhancing": rng.uniform(2.0, 10.0),
    }[kind]
    ok = (atlas.site_depth >= radius + 4.0) & (atlas.site_ventricle_distance >= 0.5 * radius + 3.0)
    for other in avoid:
        gap = np.linalg.norm(atlas.sites - other.centre, axis=1)
        ok &= gap >= radius + float(np.max(other.semi_axes)) + 12.0
    candidates = np.flatnonzero(ok)
    if candidates.size == 0:  # a huge second lesion next to the first: fall back to any deep site
        candidates = np.flatnonzero(atlas.site_depth >= radius + 4.0)
    centre = atlas.sites[int(rng.choice(candidates))] + rng.uniform(-1.0, 1.0, 3)
    semi_axes = radius * rng.uniform(0.75, 1.25, 3)
    semi_axes *= radius / float(np.prod(semi_axes) ** (1.0 / 3.0))  # keep the equivalent diameter
    push = radius * rng.uniform(0.4, 0.7)
    return _Lesion(
        centre=centre,
        semi_axes=semi_axes,
        rotation=_random_rotation(rng),
        kind=kind,
        irregularity=float(rng.uniform(0.12, 0.3)),
        rim_mm=float(rng.uniform(1.5, 4.5)),
        oedema_mm=float(oedema),
        push_mm=float(push),
        swelling=float(rng.uniform(0.2, 0.5)),
        push_decay_mm=float(rng.uniform(15.0, 35.0)),
        noise_seed=int(rng.integers(2**31)),
    )


def _case_params(seed: int, index: int, shape: tuple[int, int, int]) -> _CaseParams:
    """Draw one case's parameters from the RNG of (seed, index)."""
    rng = np.random.default_rng([seed, index])
    healthy = _is_healthy(seed, index)
    atlas = _atlas()
    lesions: list[_Lesion] = []
    if not healthy:
        lesions.append(_draw_lesion(rng, atlas, [], small=False))
        if rng.random() < 0.15:
            lesions.append(_draw_lesion(rng, atlas, lesions, small=True))
    scale = rng.uniform(0.86, 1.0) * rng.uniform(0.96, 1.04, 3)  # the MNI template is a large brain
    return _CaseParams(
        case_id=_case_id(index),
        seed=seed,
        index=index,
        shape=shape,
        healthy=healthy,
        scale=scale,
        rotation=_rotation(rng.uniform([-8.0, -4.0, -6.0], [8.0, 4.0, 6.0])),
        shift_mm=np.array(
            [rng.normal(0, 3.0), rng.normal(0, 5.0), float(np.clip(rng.normal(0, 5.0), -10, 10))]
        ),
        warp_mm=float(rng.uniform(1.0, 3.0)),
        warp_seed=int(rng.integers(2**31)),
        ventricle_push_mm=float(rng.uniform(-1.0, 3.5)),
        lesions=tuple(lesions),
        contrast_seed=int(rng.integers(2**31)),
    )


# ----------------------------------------------------------------------------------------------------------
# Rendering one case
# ----------------------------------------------------------------------------------------------------------

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


def _render_case(p: _CaseParams) -> _Rendered:
    """Synthesise one case: four contrasts, seg and anat, in file voxel order (deterministic given ``p``)."""
    atlas = _atlas()
    shape = p.shape
    spacing = np.array(_spacing(shape))
    affine = _affine(shape)
    origin = atlas.origin.reshape(3, 1, 1, 1)

    # Coordinates on a coarse (~4 mm) grid: file voxel -> world -> MNI (similarity + smooth warp).
    step = max(1, round(4.0 / float(spacing.min())))
    nodes = [np.arange(math.ceil((n - 1) / step) + 1) * step for n in shape]
    grid = np.stack(np.meshgrid(*nodes, indexing="ij")).astype(np.float64)
    world = np.einsum("ij,j...->i...", affine[:3, :3], grid) + affine[:3, 3].reshape(3, 1, 1, 1)
    rel = (world - p.shift_mm.reshape(3, 1, 1, 1)) / p.scale.reshape(3, 1, 1, 1)
    mni = np.einsum("ij,j...->i...", p.rotation, rel) + _MNI_CENTRE.reshape(3, 1, 1, 1)
    ctrl = np.random.default_rng(p.warp_seed).standard_normal((3, 6, 6, 5)) * p.warp_mm
    at = np.meshgrid(*[np.linspace(0, c - 1, len(nd)) for c, nd in zip(ctrl.shape[1:], nodes)], indexing="ij")
    mni += np.stack([ndi.map_coordinates(ctrl[i], at, order=3, mode="nearest") for i in range(3)])

    # Mass effect of each lesion, then ventricle size, as displacement fields (damped near the surface).
    source = mni.copy()
    pushes = []
    for les in p.lesions:
        radius = float(np.mean(les.semi_axes))
        pushes.append(
            (les.centre, radius, les.push_mm, radius + 0.7 * les.oedema_mm, les.swelling, les.push_decay_mm)
        )
    pushes += [(c, 10.0, p.ventricle_push_mm, 10.0, 0.0, 14.0) for c in atlas.ventricle_centres]
    for centre, radius, push, swell_radius, swelling, decay in pushes:
        damp = np.clip(_sample(atlas.depth2, source, atlas.origin, 2.0, 1) / 10.0, 0.0, 1.0)
        source = _push(source, centre, radius, push, swell_radius, swelling, decay, damp)
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

    # Tumours, evaluated in the case frame around each lesion.
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
    for les in p.lesions:
        reach = float(np.max(les.semi_axes)) * (1.0 + 3.0 * les.irregularity) + 1.6 * les.oedema_mm + 1.0
        near_nodes = np.all(
            np.abs(mni - les.centre.reshape(3, 1, 1, 1)) < reach + 2.0 * step * spacing.max(), axis=0
        )
        sel = np.flatnonzero(near_nodes[cells[0][vox[0]], cells[1][vox[1]], cells[2][vox[2]]])
        frac = np.stack([v[sel] for v in vox]).astype(np.float32) / step
        d = _trilinear(mni_packed, frac)[:, :3].T - les.centre.reshape(3, 1).astype(np.float32)
        keep = np.sum(d * d, axis=0) < reach * reach
        sel = sel[keep]
        d = d[:, keep]
        q = (les.rotation.T @ d) / les.semi_axes.reshape(3, 1)
        rho = np.sqrt(np.sum(q * q, axis=0))
        dist = np.sqrt(np.sum(d * d, axis=0))
        radius_dir = np.where(rho > 1e-6, dist / np.maximum(rho, 1e-6), float(np.mean(les.semi_axes)))
        # Smooth noise on a 2 mm grid around the lesion: boundary shape, rim thickness, oedema reach, texture.
        lrng = np.random.default_rng(les.noise_seed)
        cell = 2.0
        m = math.ceil(2.0 * reach / cell) + 2
        noise = np.zeros((m, m, m, 4), np.float32)
        noise[..., 0] = 0.8 * _smooth_noise(lrng, (m, m, m), 3.0) + 0.45 * _smooth_noise(lrng, (m, m, m), 1.2)
        noise[..., 1] = _smooth_noise(lrng, (m, m, m), 1.5)
        noise[..., 2] = _smooth_noise(lrng, (m, m, m), 2.0)
        noise[..., 3] = _smooth_noise(lrng, (m, m, m), 1.0)
        shape_noise, rim_noise, ed_noise, tex_noise = _trilinear(noise, (d + reach) / cell).T
        del noise
        phi_core = (rho - 1.0 - les.irregularity * shape_noise) * radius_dir
        # Confined to the lesion's cerebral hemisphere (the falx stops it); it may reach into the ventricle.
        own_cerebrum, own_ventricle = (1, 5) if les.centre[0] < 0 else (2, 6)
        lab = anat[sel]
        cerebrum = lab == own_cerebrum
        phi_core = np.where(cerebrum | (lab == own_ventricle), phi_core, _FLAT)
        if les.kind == "necrotic":
            phi_nec = phi_core + les.rim_mm * np.clip(1.0 + 0.6 * rim_noise, 0.35, None)
        else:
            phi_nec = np.full_like(phi_core, _FLAT)
        reach_ed = les.oedema_mm * (0.12 + 0.88 * wm[sel]) * np.clip(1.0 + 0.45 * ed_noise, 0.2, 1.6)
        phi_ed = np.where(cerebrum & (csf[sel] < 0.5), phi_core - reach_ed, _FLAT)

        fc = _sigmoid(-phi_core / 0.5)
        fn = np.minimum(_sigmoid(-phi_nec / 0.7), fc)
        rim = fc - fn
        f_nec[sel] = np.maximum(f_nec[sel], fn)
        if les.kind == "non_enhancing":
            f_net[sel] = np.maximum(f_net[sel], rim)
        else:
            f_et[sel] = np.maximum(f_et[sel], rim)
        f_ed[sel] = np.maximum(f_ed[sel], _sigmoid(-phi_ed / 1.0) * (1.0 - fc))
        texture[sel] = tex_noise

        core = phi_core < 0.0
        codes = np.where(phi_nec < 0.0, 1, 1 if les.kind == "non_enhancing" else 4)
        new = np.where(core, codes, np.where(phi_ed < 0.0, 2, 0)).astype(np.uint8)
        old = seg[sel]
        seg[sel] = np.where((new != 0) & ((old == 0) | (old == 2)), new, old)
        anat[sel] = np.where(core & (lab == own_ventricle), own_cerebrum, lab)
        core_vox = np.stack([v[sel[core]] for v in vox]).astype(np.float64)
        if core_vox.shape[1]:
            centre_vox = core_vox.mean(axis=1)
            lesion_info.append(
                {
                    "kind": les.kind,
                    "centre_mm": [round(float(c), 2) for c in affine[:3, :3] @ centre_vox + affine[:3, 3]],
                    "centre_voxel": [round(float(c), 2) for c in centre_vox],
                    "core_diameter_mm": round(float(2.0 * np.prod(les.semi_axes) ** (1.0 / 3.0)), 2),
                }
            )

    f_core = f_nec + f_et + f_net
    over = f_core > 1.0
    if np.any(over):
        for f in (f_nec, f_et, f_net):
            f[over] /= f_core[over]
        f_core = np.minimum(f_core, 1.0)

    # Contrasts: class mixtures, per-case jitter, bias, blur, Rician noise, gain.
    crng = np.random.default_rng(p.contrast_seed)
    table = (_INTENSITY * np.exp(crng.normal(0.0, 0.04, _INTENSITY.shape))).astype(np.float32)
    oedema_strength = float(crng.uniform(0.75, 0.95))
    a_ed = f_ed * oedema_strength * (gm + wm)
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
        value *= np.exp(crng.normal(0.0, 0.09, 9).astype(np.float32) @ monomials)
        sigma_mm = np.array(
            [crng.uniform(0.3, 0.7)] * 2 + [crng.uniform(0.3, 0.8) if ci < 2 else crng.uniform(0.5, 1.6)]
        )
        sigma = sigma_mm / spacing
        if float(sigma.max()) >= 0.2:
            vol = np.zeros(box, np.float32)
            vol.ravel()[local] = value
            value = ndi.gaussian_filter(vol, sigma, truncate=2.5).ravel()[local]
            del vol
        noise = float(crng.uniform(0.02, 0.045)) * float(max(t[1], t[2]))
        real = value + noise * crng.standard_normal(n, dtype=np.float32)
        imag = noise * crng.standard_normal(n, dtype=np.float32)
        value = np.sqrt(real * real + imag * imag)
        gain = 1000.0 * float(crng.uniform(0.6, 1.6))
        out = np.zeros(shape, np.int16)
        out.ravel()[flat] = np.clip(np.rint(value * gain), 1, 32767).astype(np.int16)
        images[name] = out

    seg_vol = np.zeros(shape, np.uint8)
    seg_vol.ravel()[flat] = seg
    anat_vol = np.zeros(shape, np.uint8)
    anat_vol.ravel()[flat] = anat
    probabilities = np.stack([csf, gm, wm])
    tissue_vol = np.zeros(shape, np.uint8)
    tissue_vol.ravel()[flat] = np.where(probabilities.max(axis=0) >= 0.7, probabilities.argmax(axis=0) + 1, 4)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    counts = np.bincount(seg, minlength=5)
    anat_counts = np.bincount(anat, minlength=7)
    summary = {
        "case_id": p.case_id,
        "healthy": p.healthy,
        "n_lesions": len(lesion_info),
        "lesions": lesion_info,
        "tumour_volume_ml": {
            "ncr_net": round(float(counts[1]) * voxel_ml, 3),
            "ed": round(float(counts[2]) * voxel_ml, 3),
            "et": round(float(counts[4]) * voxel_ml, 3),
            "total": round(float(counts[1] + counts[2] + counts[4]) * voxel_ml, 3),
        },
        "anat_volume_ml": {
            ANAT_LABELS[k].replace(" ", "_"): round(float(anat_counts[k]) * voxel_ml, 3)
            for k in sorted(ANAT_LABELS)
        },
        "brain_volume_ml": round(n * voxel_ml, 3),
        "cropped": {"bottom": bool(np.any(vox[2] == 0)), "top": bool(np.any(vox[2] == shape[2] - 1))},
    }
    return _Rendered(
        images=images, seg=seg_vol, anat=anat_vol, tissue=tissue_vol, affine=affine, summary=summary
    )


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
    return int(n_cases), int(seed), shape_t, min(int(workers), int(n_cases))  # type: ignore[return-value]


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
