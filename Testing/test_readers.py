"""Readers: BraTS and Decathlon layouts on tiny generated NIfTI files, orientation, bad input."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fdn_core.data.readers import (
    CaseList,
    canonical_shape,
    find_cases,
    from_canonical,
    load_case,
    scan_cohort,
    to_canonical,
    validate_cohort,
    write_brats_case,
    write_msd_copy,
)
from fdn_core.errors import DataError
from fdn_core.labels import MODALITIES

SHAPE = (16, 14, 8)
LPS = np.array([[-1.0, 0, 0, 15], [0, -1.0, 0, 13], [0, 0, 2.0, -7], [0, 0, 0, 1]])  # BraTS-like, 2 mm slices


def _volumes(seed: int, shape: tuple[int, int, int] = SHAPE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A (4,X,Y,Z) image that is 0 outside an ellipsoid, a BraTS seg (0/1/2/4) and anatomy labels (0..6)."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    brain = sum(g**2 for g in grid) < 0.9
    image = np.stack([np.where(brain, 100.0 * (c + 1) + rng.normal(0, 10, shape), 0.0) for c in range(4)])
    seg = np.where(brain, rng.choice([0, 0, 1, 2, 4], size=shape), 0).astype(np.uint8)
    anat = np.where(brain, rng.integers(1, 7, size=shape), 0).astype(np.uint8)
    return image.astype(np.float32), seg, anat


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def _brats_case(root: Path, case: str, seed: int = 0, seg: bool = True, anat: bool = False) -> dict:
    """Write a BraTS case with plain nibabel (independent of the code under test); returns the arrays."""
    image, seg_v, anat_v = _volumes(seed)
    for c, mod in enumerate(MODALITIES):
        _save(image[c], LPS, root / case / f"{case}_{mod}.nii.gz")
    if seg:
        _save(seg_v, LPS, root / case / f"{case}_seg.nii.gz")
    if anat:
        _save(anat_v, LPS, root / case / f"{case}_anat.nii.gz")
    return {"image": image, "seg": seg_v, "anat": anat_v}


def _flip_xy(a: np.ndarray) -> np.ndarray:
    """What canonical reorientation does to an LPS-stored array: reverse X and Y."""
    return a[::-1, ::-1]


# ----------------------------------------------------------------------------------------------- layouts


def test_brats_case_channels_labels_and_canonical_orientation(tmp_path: Path) -> None:
    written = _brats_case(tmp_path, "BraTS19_2013_10_1", seed=1, anat=True)
    cases = find_cases(tmp_path)
    assert isinstance(cases, CaseList) and cases.problems == []
    assert [c.case_id for c in cases] == ["BraTS19_2013_10_1"]
    assert cases[0].layout == "brats" and cases[0].seg is not None and cases[0].anat is not None
    vol = load_case(cases[0])
    assert vol.image.shape == (4, *SHAPE) and vol.image.dtype == np.float32
    for c, mod in enumerate(MODALITIES):
        np.testing.assert_array_equal(vol.image[c], _flip_xy(written["image"][c]))
        ref = nib.as_closest_canonical(nib.load(cases[0].images[mod])).get_fdata(dtype=np.float32)
        np.testing.assert_array_equal(vol.image[c], ref)
    # BraTS labels 1, 2, 4 -> classes 1, 2, 3
    expected = np.array([0, 1, 2, 255, 3], dtype=np.uint8)[_flip_xy(written["seg"])]
    np.testing.assert_array_equal(vol.seg, expected)
    assert vol.seg.dtype == np.uint8 and set(np.unique(vol.seg)) <= {0, 1, 2, 3}
    np.testing.assert_array_equal(vol.anat, _flip_xy(written["anat"]))
    # canonical RAS+: positive diagonal, same world position of voxel (0,0,0) as the stored voxel (15,13,0)
    assert np.all(np.diag(vol.affine)[:3] > 0)
    np.testing.assert_allclose(vol.affine[:3, 3], LPS[:3, :3] @ [15, 13, 0] + LPS[:3, 3])
    assert vol.spacing == (1.0, 1.0, 2.0)
    assert canonical_shape(cases[0]) == SHAPE


def test_brats_2021_names_group_folders_and_unlabelled_cases(tmp_path: Path) -> None:
    _brats_case(tmp_path / "HGG", "BraTS2021_00000", seed=2)
    _brats_case(tmp_path / "LGG", "BraTS2021_00002", seed=3, seg=False, anat=True)
    (tmp_path / "notes").mkdir()  # a folder without NIfTI files is not a case
    (tmp_path / "cohort.json").write_text("{}")
    cases = find_cases(tmp_path)
    assert [c.case_id for c in cases] == ["BraTS2021_00000", "BraTS2021_00002"]
    unlabelled = load_case(cases[1])
    assert unlabelled.seg is None and unlabelled.anat is not None


def test_single_case_folder_is_read_as_one_case(tmp_path: Path) -> None:
    _brats_case(tmp_path, "caseA", seed=4)
    cases = find_cases(tmp_path / "caseA")
    assert [c.case_id for c in cases] == ["caseA"]


def _msd_task(root: Path, order: tuple[str, ...] = ("FLAIR", "T1w", "t1gd", "T2w")) -> dict:
    """A Decathlon task with one training case (labels, anatomy) and one test case, written with nibabel."""
    image, _, anat = _volumes(5)
    ours = dict(zip(("t1", "t1ce", "t2", "flair"), image))
    names = {"FLAIR": "flair", "T1w": "t1", "t1gd": "t1ce", "T2w": "t2"}
    image4d = np.stack([ours[names[n]] for n in order], axis=-1)
    rng = np.random.default_rng(6)
    labels = np.where(image[0] > 0, rng.integers(0, 4, size=SHAPE), 0).astype(np.uint8)
    _save(image4d, LPS, root / "imagesTr" / "BRATS_001.nii.gz")
    _save(labels, LPS, root / "labelsTr" / "BRATS_001.nii.gz")
    _save(anat, LPS, root / "anatTr" / "BRATS_001.nii.gz")
    _save(image4d, LPS, root / "imagesTs" / "BRATS_101.nii.gz")
    (root / "imagesTr" / "._BRATS_001.nii.gz").write_bytes(b"macOS resource fork")
    (root / "dataset.json").write_text(json.dumps({"modality": {str(i): n for i, n in enumerate(order)}}))
    return {"image": image, "labels": labels, "anat": anat}


@pytest.mark.parametrize("order", [("FLAIR", "T1w", "t1gd", "T2w"), ("T1w", "t1gd", "T2w", "FLAIR")])
def test_msd_layout_maps_channels_and_labels(tmp_path: Path, order: tuple[str, ...]) -> None:
    written = _msd_task(tmp_path, order)
    cases = find_cases(tmp_path)
    assert [(c.case_id, c.layout) for c in cases] == [("BRATS_001", "msd"), ("BRATS_101", "msd")]
    train, test = (load_case(c) for c in cases)
    for c in range(4):  # our order t1, t1ce, t2, flair whatever the file's order
        np.testing.assert_array_equal(train.image[c], _flip_xy(written["image"][c]))
    # Decathlon 1 edema -> 2 ED, 2 non-enhancing -> 1 NCR/NET, 3 enhancing -> 3 ET
    np.testing.assert_array_equal(
        train.seg, np.array([0, 2, 1, 3], dtype=np.uint8)[_flip_xy(written["labels"])]
    )
    np.testing.assert_array_equal(train.anat, _flip_xy(written["anat"]))
    assert test.seg is None and test.anat is None
    np.testing.assert_array_equal(test.image, train.image)


def test_write_msd_copy_reads_back_identically(tmp_path: Path) -> None:
    src = tmp_path / "brats"
    _brats_case(src, "c0", seed=7, anat=True)
    _brats_case(src, "c1", seed=8, seg=False)
    out = write_msd_copy(src, tmp_path / "msd")
    assert (out / "imagesTr" / "c0.nii.gz").exists() and (out / "imagesTs" / "c1.nii.gz").exists()
    meta = json.loads((out / "dataset.json").read_text())
    assert (
        meta["modality"] == {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"} and meta["numTraining"] == 1
    )
    assert nib.load(out / "imagesTr" / "c0.nii.gz").shape == (*SHAPE, 4)
    on_disk = np.asarray(nib.load(out / "labelsTr" / "c0.nii.gz").dataobj)
    assert set(np.unique(on_disk)) <= {0, 1, 2, 3}
    for a, b in zip(find_cases(src), find_cases(out)):
        va, vb = load_case(a), load_case(b)
        assert (a.case_id, a.layout, b.layout) == (b.case_id, "brats", "msd")
        np.testing.assert_array_equal(va.image, vb.image)
        np.testing.assert_allclose(va.affine, vb.affine)
        for x, y in ((va.seg, vb.seg), (va.anat, vb.anat)):
            assert (x is None and y is None) or np.array_equal(x, y)
    with pytest.raises(DataError, match="already exists"):
        write_msd_copy(src, out)


def test_write_brats_case_writes_brats_labels(tmp_path: Path) -> None:
    image, seg, anat = _volumes(9)
    classes = np.array([0, 1, 2, 0, 3], dtype=np.uint8)[seg]
    files = write_brats_case(tmp_path / "x", "x", image, classes, anat, LPS, image_dtype=np.int16)
    assert set(np.unique(np.asarray(nib.load(files.seg).dataobj))) == {0, 1, 2, 4}
    vol = load_case(files)
    np.testing.assert_array_equal(vol.seg, _flip_xy(classes))
    np.testing.assert_array_equal(
        vol.image, _flip_xy(np.rint(image).transpose(1, 2, 3, 0)).transpose(3, 0, 1, 2)
    )


@pytest.mark.parametrize("perm", [(0, 1, 2), (2, 0, 1), (1, 2, 0)])
def test_to_and_from_canonical_match_nibabel_and_invert(perm: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(10)
    array = rng.random((5, 6, 7)).astype(np.float32)
    affine = np.eye(4)
    affine[:3, :3] = np.eye(3)[list(perm)].T * np.array([-1.0, 1.5, -2.0])
    affine[:3, 3] = [3, -4, 5]
    canon, canon_affine = to_canonical(array, affine)
    ref = nib.as_closest_canonical(nib.Nifti1Image(array, affine))
    np.testing.assert_array_equal(canon, ref.get_fdata(dtype=np.float32))
    np.testing.assert_allclose(canon_affine, ref.affine)
    np.testing.assert_array_equal(from_canonical(canon, affine), array)
    channels = np.stack([array, 2 * array])
    canon_c, _ = to_canonical(channels, affine, channels_first=True)
    np.testing.assert_array_equal(canon_c[1], 2 * canon)
    np.testing.assert_array_equal(from_canonical(canon_c, affine, channels_first=True), channels)
    with pytest.raises(DataError, match="3D"):
        to_canonical(np.zeros((4, 4)), affine)


# -------------------------------------------------------------------------------------------- bad input


def _break(root: Path, kind: str) -> tuple[str, str]:
    """Write one case broken in the way ``kind`` says; returns (case id, expected message fragment)."""
    case = f"bad_{kind}"
    _brats_case(root, case, seed=11)
    folder = root / case
    image, seg, _ = _volumes(11)
    if kind == "missing_modality":
        (folder / f"{case}_flair.nii.gz").unlink()
        return case, "missing modality flair"
    if kind == "shape":
        _save(image[1][:, :, :6], LPS, folder / f"{case}_t1ce.nii.gz")
        return case, "shape (16, 14, 6)"
    if kind == "spacing":
        _save(image[2], LPS @ np.diag([1, 1, 0.5, 1]), folder / f"{case}_t2.nii.gz")
        return case, "spacing"
    if kind == "affine":
        moved = LPS.copy()
        moved[:3, 3] += 5
        _save(seg, moved, folder / f"{case}_seg.nii.gz")
        return case, "affine"
    if kind == "not_3d":
        _save(np.stack([image[0], image[0]], -1), LPS, folder / f"{case}_t1.nii.gz")
        return case, "must be a 3D volume"
    if kind == "unreadable":
        (folder / f"{case}_t2.nii.gz").write_bytes(b"this is not a NIfTI file")
        return case, "cannot be read as NIfTI"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing_modality", "shape", "spacing", "affine", "not_3d", "unreadable"])
def test_header_level_problems_name_case_file_and_fix(tmp_path: Path, kind: str) -> None:
    _brats_case(tmp_path, "good", seed=12)
    case, fragment = _break(tmp_path, kind)
    with pytest.raises(DataError) as err:
        find_cases(tmp_path)
    msg = str(err.value)
    assert f"case {case}" in msg and fragment in msg and str(tmp_path / case) in msg
    assert "skip_bad" in msg  # says what to do
    good, problems = scan_cohort(tmp_path)
    assert [c.case_id for c in good] == ["good"] and [p.case_id for p in problems] == [case]


def _nan_case(root: Path, value: float) -> str:
    case = f"nonfinite_{value}"
    _brats_case(root, case, seed=13)
    image, _, _ = _volumes(13)
    t2 = image[2].copy()
    t2[3, 4, 5] = value
    _save(t2, LPS, root / case / f"{case}_t2.nii.gz")
    return case


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nan_or_inf_voxels_are_found_when_loading(tmp_path: Path, value: float) -> None:
    case = _nan_case(tmp_path, value)
    files = find_cases(tmp_path)[0]  # headers are fine
    with pytest.raises(DataError, match=r"NaN and \d infinite voxel") as err:
        load_case(files)
    assert f"case {case}" in str(err.value) and f"{case}_t2.nii.gz" in str(err.value)


def test_truncated_gzip_is_reported_on_load(tmp_path: Path) -> None:
    _brats_case(tmp_path, "trunc", seed=14)
    path = tmp_path / "trunc" / "trunc_t1ce.nii.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw)[: len(gzip.compress(raw)) // 2])
    files = find_cases(tmp_path)[0]
    with pytest.raises(DataError, match="truncated or corrupt") as err:
        load_case(files)
    assert "case trunc" in str(err.value) and "trunc_t1ce.nii.gz" in str(err.value)


@pytest.mark.parametrize(
    ("kind", "bad_value", "fragment"), [("seg", 3, "BraTS labels"), ("anat", 9, "anatomy labels")]
)
def test_unknown_label_values_are_rejected(tmp_path: Path, kind: str, bad_value: int, fragment: str) -> None:
    written = _brats_case(tmp_path, "labels", seed=15, anat=True)
    labels = written[kind].copy()
    labels[8, 7, 4] = bad_value
    _save(labels, LPS, tmp_path / "labels" / f"labels_{kind}.nii.gz")
    with pytest.raises(DataError, match=rf"label value\(s\) \[{bad_value}\] that are not {fragment}"):
        load_case(find_cases(tmp_path)[0])


def test_msd_specific_problems(tmp_path: Path) -> None:
    written = _msd_task(tmp_path)
    labels = written["labels"].copy()
    labels[8, 7, 4] = 4  # not a Decathlon label
    _save(labels, LPS, tmp_path / "labelsTr" / "BRATS_001.nii.gz")
    with pytest.raises(DataError, match=r"\[4\] that are not Decathlon labels"):
        load_case(find_cases(tmp_path)[0])
    _save(written["image"][:3].transpose(1, 2, 3, 0), LPS, tmp_path / "imagesTs" / "BRATS_102.nii.gz")
    _save(written["image"].transpose(1, 2, 3, 0), LPS, tmp_path / "imagesTr" / "BRATS_003.nii.gz")
    good, problems = scan_cohort(tmp_path)
    assert [c.case_id for c in good] == ["BRATS_001", "BRATS_101"]
    messages = {p.case_id: p.message for p in problems}
    assert "has no label in labelsTr" in messages["BRATS_003"]
    assert "must be 4D (X, Y, Z, 4)" in messages["BRATS_102"] and "(16, 14, 8, 3)" in messages["BRATS_102"]
    (tmp_path / "dataset.json").write_text(json.dumps({"modality": {"0": "FLAIR", "1": "T1w", "2": "CT"}}))
    _, problems = scan_cohort(tmp_path)
    assert len(problems) == 1 and "dataset.json" in str(problems[0]) and problems[0].case_id is None


def test_empty_and_missing_folders(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no cases found"):
        find_cases(tmp_path)
    with pytest.raises(DataError, match="not a folder"):
        find_cases(tmp_path / "absent")
    (tmp_path / "case" / "x.nii.gz").parent.mkdir()
    _save(np.zeros(SHAPE, np.float32), LPS, tmp_path / "case" / "x.nii.gz")
    with pytest.raises(DataError, match="BraTS naming"):
        find_cases(tmp_path)


def test_bad_cases_never_vanish_silently(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _brats_case(tmp_path, "good", seed=16)
    bad1, _ = _break(tmp_path, "missing_modality")
    bad2, _ = _break(tmp_path, "shape")
    with pytest.raises(DataError) as err:
        find_cases(tmp_path)
    assert "2 problem(s)" in str(err.value) and bad1 in str(err.value) and bad2 in str(err.value)
    with caplog.at_level(logging.WARNING, logger="fdn_core.data.readers"):
        cases = find_cases(tmp_path, skip_bad=True)
    assert [c.case_id for c in cases] == ["good"]
    assert sorted(p.case_id for p in cases.problems) == sorted([bad1, bad2])
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert bad1 in warned and bad2 in warned
    (tmp_path / "good" / "good_t1.nii.gz").unlink()  # nothing usable left: an error even with skip_bad
    with pytest.raises(DataError, match="no usable case"):
        find_cases(tmp_path, skip_bad=True)


def test_validate_cohort_loads_every_case(tmp_path: Path) -> None:
    _brats_case(tmp_path, "good", seed=17, anat=True)
    nan_case = _nan_case(tmp_path, np.nan)
    bad, _ = _break(tmp_path, "spacing")
    summaries, problems = validate_cohort(tmp_path, workers=2)
    assert [s.case_id for s in summaries] == ["good"]
    assert sorted(p.case_id for p in problems) == sorted([nan_case, bad])
    s = summaries[0].to_dict()
    assert s["shape"] == list(SHAPE) and s["spacing"] == [1.0, 1.0, 2.0] and s["status"] == "diseased"
    assert (
        set(s["seg_counts"]) == {"background", "NCR/NET", "ED", "ET"}
        and sum(s["seg_counts"].values()) == 16 * 14 * 8
    )
    assert s["anat_counts"]["L cerebrum"] > 0


def test_fdn_inspect_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fdn_core.cli import main

    src = tmp_path / "brats"
    _brats_case(src, "healthy", seed=18, anat=True)
    healthy_seg = src / "healthy" / "healthy_seg.nii.gz"
    _save(np.zeros(SHAPE, np.uint8), LPS, healthy_seg)
    _brats_case(src, "tumour", seed=19)
    assert main(["inspect", str(src), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "2 readable case(s) (1 diseased, 1 healthy, 0 unlabelled)" in out and "tumour" in out
    msd = write_msd_copy(src, tmp_path / "msd")
    assert main(["inspect", str(msd), "--json", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["layout"] == "msd" and [c["case_id"] for c in report["cases"]] == ["healthy", "tumour"]
    assert report["cases"][0]["anat_counts"] is not None and report["cases"][0]["status"] == "healthy"
    _nan_case(src, np.inf)
    assert main(["inspect", str(src), "--json", "--no-progress"]) == 2
    report = json.loads(capsys.readouterr().out)
    assert report["n_problems"] == 1 and "infinite" in report["problems"][0]["message"]
