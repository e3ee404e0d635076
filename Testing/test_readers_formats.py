"""Readers: NRRD, MetaImage and DICOM series next to NIfTI (same canonical arrays and affines), resampling of
sequences on other voxel grids, headers that lie about their size, and the case-file helpers."""

from __future__ import annotations

import gzip
import locale
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

import fdn_core.data.readers as readers
from fdn_core.data.readers import (
    CaseFiles,
    canonical_grid,
    case_files_from_paths,
    find_cases,
    load_case,
    summarize_case,
    to_canonical,
)
from fdn_core.errors import DataError
from fdn_core.labels import MODALITIES

SHAPE = (16, 14, 8)
SPACING = (0.9, 1.2, 2.5)
ORIGIN_LPS = (12.5, -30.0, 4.0)
COARSE_SPACING, COARSE_SHAPE = (1.8, 2.4, 2.5), (7, 9, 8)  # T2 on a coarser grid in the resampling tests


@pytest.fixture(autouse=True)
def _accept_oblique(monkeypatch: pytest.MonkeyPatch) -> None:
    """The grids here are 8 degrees oblique on purpose (orientation bookkeeping of every format): read them
    in their nearest axis-aligned orientation, as before oblique grids were refused or resampled (those
    policies are tested in test_drills.py)."""
    monkeypatch.setenv(readers.OBLIQUE_ENV, "accept")


def _direction_lps() -> np.ndarray:
    """Voxel axis i runs along LPS y (posterior), j along LPS x (left), k up; rotated 8 degrees about the
    axial normal: a permuted, flipped (det -1), oblique orientation."""
    a = np.deg2rad(8.0)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    return rot @ np.array([[0.0, 1, 0], [1, 0, 0], [0, 0, 1]])


def _affine_ras(direction: np.ndarray, spacing: tuple, origin_lps: tuple) -> np.ndarray:
    """The voxel-to-RAS matrix of an ITK (LPS) grid, written out independently of the code under test."""
    lps = np.eye(4)
    lps[:3, :3] = direction * np.asarray(spacing)
    lps[:3, 3] = origin_lps
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _phantom(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(4, I, J, K) int16 images, distinct per channel and position, and (I, J, K) BraTS labels 0/1/2/4."""
    rng = np.random.default_rng(seed)
    image = rng.integers(1, 1000, size=(4, *SHAPE)).astype(np.int16)
    seg = rng.choice(np.array([0, 0, 1, 2, 4], np.uint8), size=SHAPE)
    return image, seg


def _sitk_image(array: np.ndarray, direction: np.ndarray, spacing: tuple, origin: tuple) -> sitk.Image:
    """A SimpleITK image with ``img[i, j, k] == array[i, j, k]`` on the given LPS grid."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(o) for o in origin])
    img.SetDirection(direction.ravel().tolist())
    return img


def _write_dicom_series(img: sitk.Image, folder: Path, series: str) -> Path:
    """Write a 3D int16 image as a DICOM series, slice by slice (MR, Image Position/Orientation Patient)."""
    folder.mkdir(parents=True)
    direction = np.asarray(img.GetDirection()).reshape(3, 3)
    uid = f"1.2.826.0.1.3680043.2.1125.{series}"
    orientation = "\\".join(f"{v:.10f}" for v in (*direction[:, 0], *direction[:, 1]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    # ITK's DICOM writer leaves the process locale at "C" (SimpleITK 2.5), which would make later text reads
    # of other tests ASCII: restore it (reading DICOM leaves it alone)
    saved = locale.setlocale(locale.LC_ALL)
    try:
        _write_planes(img, folder, uid, orientation, writer)
    finally:
        locale.setlocale(locale.LC_ALL, saved)
    return folder


def _write_planes(
    img: sitk.Image, folder: Path, uid: str, orientation: str, writer: sitk.ImageFileWriter
) -> None:
    for k in range(img.GetDepth()):
        plane = img[:, :, k]
        position = "\\".join(f"{v:.6f}" for v in img.TransformIndexToPhysicalPoint((0, 0, k)))
        for tag, value in (
            ("0008|0060", "MR"),
            ("0020|000d", f"{uid}.1"),
            ("0020|000e", f"{uid}.2"),
            ("0008|0018", f"{uid}.3.{k}"),
            ("0020|0013", str(k + 1)),
            ("0020|0032", position),
            ("0020|0037", orientation),
            ("0018|0050", f"{SPACING[2]}"),
        ):
            plane.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"IM{k:04d}.dcm"))
        writer.Execute(plane)


def _write_case(root: Path, case: str, fmt: str, image: np.ndarray, seg: np.ndarray | None) -> list[Path]:
    """The case's files in one format; NIfTI is written with nibabel, the others with SimpleITK."""
    direction = _direction_lps()
    paths = []
    kinds = [(mod, image[c]) for c, mod in enumerate(MODALITIES)]
    if seg is not None:
        kinds.append(("seg", seg))
    for kind, array in kinds:
        if fmt == ".nii.gz":
            path = root / f"{case}_{kind}.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(array, _affine_ras(direction, SPACING, ORIGIN_LPS)), str(path))
        elif fmt == "dicom":
            path = _write_dicom_series(
                _sitk_image(array, direction, SPACING, ORIGIN_LPS), root / f"series{len(paths)}", kind
            )
        else:
            path = root / f"{case}_{kind}{fmt}"
            path.parent.mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(_sitk_image(array, direction, SPACING, ORIGIN_LPS), str(path))
        paths.append(path)
    return paths


@pytest.mark.parametrize("fmt", [".nrrd", ".nhdr", ".mha", ".mhd", "dicom"])
def test_formats_load_like_nifti(tmp_path: Path, fmt: str) -> None:
    image, seg = _phantom(1)
    reference = load_case(
        case_files_from_paths(_write_case(tmp_path / "nifti" / "c1", "c1", ".nii.gz", image, seg))
    )
    with_seg = fmt != "dicom"  # label maps do not come as DICOM images
    cohort = tmp_path / fmt.strip(".")
    paths = _write_case(cohort / "c1", "c1", fmt, image, seg if with_seg else None)
    if fmt == "dicom":  # DICOM folders are named by the scanner: say which sequence each one is
        files = case_files_from_paths([f"{kind}={p}" for kind, p in zip(MODALITIES, paths)])
        assert files.case_id == "c1" and files.images["t1ce"] == paths[1]
    else:
        files = case_files_from_paths(paths)
        assert files.case_id == "c1"
        assert [c.case_id for c in find_cases(cohort)] == ["c1"]  # cohort folders too
    vol = load_case(files)
    assert vol.image.dtype == np.float32 and vol.image.shape == reference.image.shape
    np.testing.assert_array_equal(vol.image, reference.image)
    np.testing.assert_allclose(vol.affine, reference.affine, rtol=0, atol=1e-4)
    np.testing.assert_allclose(vol.spacing, reference.spacing, rtol=0, atol=1e-5)
    if with_seg:
        np.testing.assert_array_equal(vol.seg, reference.seg)
    assert vol.resampled == ()
    # independently of our LPS->RAS conversion: ITK's own index-to-physical map of the written image puts
    # each voxel's value where the canonical affine says it is
    itk = _sitk_image(image[1], _direction_lps(), SPACING, ORIGIN_LPS)
    for ijk in [(0, 0, 0), (3, 5, 7), (15, 13, 2), (8, 1, 4)]:
        x, y, z = itk.TransformIndexToPhysicalPoint(ijk)
        canon = np.linalg.inv(vol.affine) @ np.array([-x, -y, z, 1.0])
        assert np.allclose(canon[:3], np.rint(canon[:3]), atol=1e-3)
        assert vol.image[1][tuple(np.rint(canon[:3]).astype(int))] == image[1][ijk]
    # canonical RAS+: axis 0 left->right, 1 posterior->anterior, 2 inferior->superior
    assert np.all(np.diag(vol.affine)[:3] > 0) and vol.spacing[2] == pytest.approx(2.5)


def test_canonical_grid_is_what_to_canonical_gives() -> None:
    affine = _affine_ras(_direction_lps(), SPACING, ORIGIN_LPS)
    array = np.zeros(SHAPE, np.float32)
    canon, canon_affine = to_canonical(array, affine)
    grid_affine, grid_shape = canonical_grid(affine, SHAPE)
    np.testing.assert_array_equal(grid_affine, canon_affine)
    assert grid_shape == canon.shape == (14, 16, 8)


# ---------------------------------------------------------------------------------------------- resampling


def _linear(ras: np.ndarray) -> np.ndarray:
    """A smooth (linear) intensity of the RAS position: linear interpolation reproduces it exactly."""
    return 300.0 + 2.0 * ras[..., 0] + 3.0 * ras[..., 1] - 1.5 * ras[..., 2]


def _ras_of_grid(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1).astype(np.float64)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def _mixed_grid_case(
    root: Path, shift_t2_mm: float = 0.0
) -> tuple[list[Path], np.ndarray, np.ndarray, np.ndarray]:
    """T1ce and two sequences on the reference grid (NIfTI), T2 on a coarser, shifted grid (MetaImage), seg
    on the reference grid moved by whole voxels (NRRD). Returns the paths, the reference and T2 affines and
    the labels on the reference grid."""
    direction = _direction_lps()
    ref_affine = _affine_ras(direction, SPACING, ORIGIN_LPS)
    ref_values = _linear(_ras_of_grid(ref_affine, SHAPE)).astype(np.float32)
    root.mkdir(parents=True)
    paths = {}
    for mod in ("t1", "t1ce", "flair"):
        paths[mod] = root / f"mixed_{mod}.nii.gz"
        nib.save(nib.Nifti1Image(ref_values, ref_affine), str(paths[mod]))
    coarse_origin = tuple(np.asarray(ORIGIN_LPS) + direction @ [-0.45, 0.6, 0.0] + [0, 0, shift_t2_mm])
    coarse_affine = _affine_ras(direction, COARSE_SPACING, coarse_origin)
    coarse = _linear(_ras_of_grid(coarse_affine, COARSE_SHAPE)).astype(np.float32)
    paths["t2"] = root / "mixed_t2.mha"
    sitk.WriteImage(_sitk_image(coarse, direction, COARSE_SPACING, coarse_origin), str(paths["t2"]))
    # labels on a grid two voxels larger along i, starting one voxel earlier: nearest neighbour is exact
    labels = np.random.default_rng(3).choice(np.array([0, 1, 2, 4], np.uint8), size=(18, 14, 8))
    seg_origin = tuple(np.asarray(ORIGIN_LPS) - direction[:, 0] * SPACING[0])
    paths["seg"] = root / "mixed_seg.nrrd"
    sitk.WriteImage(_sitk_image(labels, direction, SPACING, seg_origin), str(paths["seg"]))
    return [paths[k] for k in (*MODALITIES, "seg")], ref_affine, coarse_affine, labels[1:17]


def test_query_files_on_other_grids_are_resampled_onto_t1ce(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    paths, ref_affine, coarse_affine, labels = _mixed_grid_case(tmp_path / "mixed")
    files = case_files_from_paths(paths)
    assert files.resample
    with caplog.at_level(logging.WARNING, logger="fdn_core.data.readers"):
        vol = load_case(files)
    assert vol.resampled == ("t2", "seg")
    assert summarize_case(vol).to_dict()["resampled"] == ["t2", "seg"]
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert (
        "t2 is on another voxel grid than t1ce" in warned
        and "voxel spacing" in warned
        and "resampled onto the t1ce grid (linear" in warned
    )
    assert "seg" in warned and "nearest neighbour" in warned
    canon_affine, canon_shape = canonical_grid(ref_affine, SHAPE)
    np.testing.assert_allclose(vol.affine, canon_affine, atol=1e-4)
    # T2 agrees with the function it sampled wherever the reference voxel lies between the coarse voxel
    # centres, and is 0 beyond the coarse volume's extent (half a coarse voxel past its outer centres)
    ras = _ras_of_grid(vol.affine, canon_shape)
    expected = _linear(ras)
    coarse_ijk = (ras - coarse_affine[:3, 3]) @ np.linalg.inv(coarse_affine[:3, :3]).T
    between = np.all((coarse_ijk > -1e-6) & (coarse_ijk < np.array(COARSE_SHAPE) - 1 + 1e-6), axis=-1)
    outside = np.any((coarse_ijk < -0.51) | (coarse_ijk > np.array(COARSE_SHAPE) - 0.49), axis=-1)
    t2 = vol.image[MODALITIES.index("t2")]
    assert between.mean() > 0.5 and outside.any()
    np.testing.assert_allclose(t2[between], expected[between], rtol=0, atol=1e-2)
    assert np.all(t2[outside] == 0) and np.all(t2[~outside] != 0)
    np.testing.assert_allclose(vol.image[MODALITIES.index("t1ce")], expected, rtol=0, atol=1e-2)
    # nearest-neighbour labels: exact, mapped to our classes
    np.testing.assert_array_equal(vol.seg, to_canonical(np.array([0, 1, 2, 0, 3])[labels], ref_affine)[0])
    assert vol.seg.dtype == np.uint8


def test_mismatched_grids_are_an_error_in_cohorts_unless_resample(tmp_path: Path) -> None:
    paths, _, _, _ = _mixed_grid_case(tmp_path / "cohort" / "mixed")
    with pytest.raises(DataError, match=r"t2 is on another voxel grid than t1ce .*voxel spacing") as err:
        find_cases(tmp_path / "cohort")
    assert "mixed_t2.mha" in str(err.value) and "same grid" in str(err.value)
    with pytest.raises(DataError, match=r"t2 is on another voxel grid than t1ce .*voxel spacing"):
        load_case(case_files_from_paths(paths, resample=False))
    cases = find_cases(tmp_path / "cohort", resample=True)
    assert load_case(cases[0]).resampled == ("t2", "seg")
    # a recorded source is loaded as it was indexed (resampled)
    again = CaseFiles.from_source("mixed", cases[0].to_source())
    assert again.resample and load_case(again).resampled == ("t2", "seg")


def test_sequence_outside_the_t1ce_volume_is_an_error(tmp_path: Path) -> None:
    paths, _, _, _ = _mixed_grid_case(tmp_path / "far", shift_t2_mm=500.0)
    with pytest.raises(DataError, match="does not overlap the t1ce volume") as err:
        load_case(case_files_from_paths(paths))
    assert "mixed_t2.mha" in str(err.value)


# ---------------------------------------------------------------------------------------- lying headers


def _nifti_case(root: Path, case: str) -> None:
    image, seg = _phantom(5)
    _write_case(root / case, case, ".nii.gz", image, seg)


def test_header_claiming_too_many_voxels_is_rejected_before_reading(tmp_path: Path) -> None:
    _nifti_case(tmp_path, "huge")
    path = tmp_path / "huge" / "huge_t2.nii.gz"
    path.unlink()
    lie = path.with_name("huge_t2.mha")
    lie.write_bytes(
        b"ObjectType = Image\nNDims = 3\nDimSize = 100000 100000 100000\nElementType = MET_SHORT\n"
        b"ElementDataFile = LOCAL\n" + bytes(64)
    )
    with pytest.raises(DataError, match="header claims 100000x100000x100000 voxels") as err:
        find_cases(tmp_path)
    assert "huge_t2.mha" in str(err.value) and "re-export" in str(err.value)


def test_voxel_limit_is_a_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _nifti_case(tmp_path, "small")
    monkeypatch.setattr(readers, "MAX_VOXELS", 1000)
    with pytest.raises(DataError, match=r"header claims 16x14x8 voxels \(1,792\)"):
        find_cases(tmp_path)


def _lying_nifti(path: Path, shape: tuple[int, int, int], payload: bytes, gz: bool) -> None:
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    header["vox_offset"] = 352
    raw = header.binaryblock + bytes(4) + payload
    path.write_bytes(gzip.compress(raw) if gz else raw)


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("lie_flair.nii", "but the file holds only 100 bytes of voxel data"),
        ("lie_flair.nii.gz", "compressed bytes in the file cannot hold"),
        ("lie_flair.nrrd", "but the file holds only 10 bytes of voxel data"),
        ("lie_flair.nhdr", "but its data file lie_flair.raw holds only 10 bytes"),
        ("lie_flair.mhd", "but its data file lie_flair.raw holds only 10 bytes"),
    ],
)
def test_header_claiming_more_data_than_the_file_holds(tmp_path: Path, name: str, fragment: str) -> None:
    _nifti_case(tmp_path, "lie")
    (tmp_path / "lie" / "lie_flair.nii.gz").unlink()
    path = tmp_path / "lie" / name
    if name.endswith((".nii", ".nii.gz")):
        _lying_nifti(path, (400, 400, 400), bytes(100), gz=name.endswith(".gz"))
    elif name.endswith(".nrrd"):
        path.write_bytes(
            b"NRRD0004\ntype: short\ndimension: 3\nsizes: 300 300 300\nencoding: raw\nendian: little\n\n"
            + bytes(10)
        )
    else:
        (tmp_path / "lie" / "lie_flair.raw").write_bytes(bytes(10))
        path.write_bytes(
            b"NRRD0004\ntype: short\ndimension: 3\nsizes: 300 300 300\nencoding: raw\nendian: little\n"
            b"data file: lie_flair.raw\n"
            if name.endswith(".nhdr")
            else b"ObjectType = Image\nNDims = 3\nDimSize = 300 300 300\nElementType = MET_SHORT\n"
            b"ElementDataFile = lie_flair.raw\n"
        )
    with pytest.raises(DataError, match="header claims") as err:
        find_cases(tmp_path)
    assert fragment in str(err.value) and name in str(err.value), str(err.value)
    assert "truncated or its header is wrong" in str(err.value)


# ------------------------------------------------------------------------------------------ DICOM problems


def _dicom_case(root: Path) -> list[str]:
    image, _ = _phantom(7)
    paths = _write_case(root, "d", "dicom", image, None)
    return [f"{kind}={p}" for kind, p in zip(MODALITIES, paths)]


def test_dicom_series_problems_are_named(tmp_path: Path) -> None:
    specs = _dicom_case(tmp_path)
    t2 = tmp_path / "series2"
    (t2 / "IM0003.dcm").unlink()  # a missing slice would silently stretch the volume
    with pytest.raises(DataError, match="not evenly spaced") as err:
        load_case(case_files_from_paths(specs))
    assert str(t2) in str(err.value)
    shutil.rmtree(t2)
    shutil.copytree(tmp_path / "series0", t2)
    for f in (tmp_path / "series3").iterdir():
        shutil.copy(f, t2 / f"flair_{f.name}")
    with pytest.raises(DataError, match="holds 2 DICOM series"):
        load_case(case_files_from_paths(specs))
    empty = tmp_path / "empty_t2"
    empty.mkdir()
    with pytest.raises(DataError, match="without a DICOM series"):
        load_case(case_files_from_paths([*specs[:2], f"t2={empty}", specs[3]]))


def test_case_files_from_paths_naming_rules(tmp_path: Path) -> None:
    specs = _dicom_case(tmp_path)
    folder = tmp_path / "series0"
    with pytest.raises(DataError, match=r"not a folder named .*t1ce=") as err:
        case_files_from_paths([folder, *specs[1:]])
    assert str(folder) in str(err.value)
    named = folder.rename(tmp_path / "study_t1")  # <case>_<kind>: a DICOM folder needs no KIND=
    files = case_files_from_paths([named, *specs[1:]])
    assert files.case_id == "study" and files.images["t1"] == named
    source = files.to_source()
    again = CaseFiles.from_source(files.case_id, source)
    assert again.images == {m: Path(p) for m, p in source["images"].items()}
    np.testing.assert_array_equal(load_case(again).image, load_case(files).image)
    with pytest.raises(DataError, match="second t1"):
        case_files_from_paths([named, f"t1={named}", *specs[1:]])
    odd = tmp_path / "scan.dcm"
    odd.write_bytes(b"")
    with pytest.raises(DataError, match="not an image format read here"):
        load_case(case_files_from_paths([f"t1={odd}", *specs[1:]]))
