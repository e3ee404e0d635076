"""Geometry the readers refuse or repair: singular voxel-to-world matrices, oblique grids (refused in cohorts,
resampled onto an axis-aligned grid in query studies, or read as they are on request), empty and flat
channels; and the record that lets ``fdn train --resume`` notice another cohort."""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import fdn_core.data.readers as readers
from fdn_core.data.readers import (
    affine_problem,
    axis_aligned_grid,
    canonical_grid,
    case_files_from_paths,
    find_cases,
    load_case,
    obliquity_deg,
    resample_to_grid,
    to_canonical,
    write_brats_case,
)
from fdn_core.errors import ConfigError, DataError

SHAPE = (20, 18, 12)
SPACING = (1.5, 1.5, 3.0)


def _rotation(degrees: float, axis: int = 2) -> np.ndarray:
    a = math.radians(degrees)
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(4)
    r[i, i], r[i, j], r[j, i], r[j, j] = math.cos(a), -math.sin(a), math.sin(a), math.cos(a)
    return r


def _oblique_affine(degrees: float, axis: int = 2) -> np.ndarray:
    return (
        _rotation(degrees, axis)
        @ np.diag([*SPACING, 1.0])
        @ np.array([[1, 0, 0, -10], [0, 1, 0, -9], [0, 0, 1, -6], [0, 0, 0, 1.0]])
    )


def _linear(points: np.ndarray) -> np.ndarray:
    """A positive function of world position that linear interpolation reproduces exactly."""
    return 200.0 + points[..., 0] + 2.0 * points[..., 1] + 3.0 * points[..., 2]


def _world(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape[:3]], indexing="ij"), -1).astype(np.float64)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def _oblique_case(root: Path, degrees: float = 30.0, axis: int = 2) -> Path:
    affine = _oblique_affine(degrees, axis)
    values = _linear(_world(affine, SHAPE)).astype(np.float32)
    image = np.stack([values, values + 10, values + 20, values + 30])
    seg = np.zeros(SHAPE, np.uint8)
    seg[8:12, 8:11, 5:7] = 2
    write_brats_case(root / "obl", "obl", image, seg=seg, affine=affine)
    return root


# ------------------------------------------------------------------------------------- singular affines


@pytest.mark.parametrize(
    ("matrix", "words"),
    [
        (np.zeros((4, 4)), "singular"),
        (np.diag([1.0, 0.0, 1.0, 1.0]), "zero axis"),
        (np.array([[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]]), "zero axis|same direction"),
        (np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]]), "same direction"),
        (np.diag([1.0, np.nan, 1.0, 1.0]), "singular or undefined"),
        (np.eye(3), "not \\(4, 4\\)"),
    ],
)
def test_singular_affines_are_named_as_such(matrix: np.ndarray, words: str) -> None:
    problem = affine_problem(matrix)
    assert problem is not None and re.search(words, problem), problem
    with pytest.raises(DataError, match=r"singular|undefined|not \(4, 4\)"):
        to_canonical(np.zeros((2, 2, 2)), matrix if matrix.shape == (4, 4) else np.zeros((4, 4)))
    for ok in (np.eye(4), np.diag([-0.9, 1.2, 2.5, 1.0]), _oblique_affine(30.0)):
        assert affine_problem(ok) is None


def test_helpers_used_by_the_slicer_library_refuse_singular_matrices() -> None:
    zero = np.zeros((4, 4))
    with pytest.raises(DataError, match="singular"):
        canonical_grid(zero, (4, 4, 4))
    with pytest.raises(DataError, match=r"source grid.*singular"):
        resample_to_grid(np.ones((4, 4, 4)), zero, np.eye(4), (4, 4, 4))
    with pytest.raises(DataError, match=r"reference grid.*singular"):
        resample_to_grid(np.ones((4, 4, 4)), np.eye(4), zero, (4, 4, 4))


def test_a_file_with_a_singular_affine_is_a_problem_naming_it(tmp_path: Path) -> None:
    import nibabel as nib

    root = _oblique_case(tmp_path, degrees=0.0)
    t2 = root / "obl" / "obl_t2.nii.gz"
    img = nib.Nifti1Image(np.asarray(nib.load(t2).dataobj), None)
    img.header.set_sform(np.zeros((4, 4)), code=1)
    img.header.set_qform(None, code=0)
    nib.save(img, t2)
    with pytest.raises(DataError, match=r"obl_t2\.nii\.gz: the voxel-to-world matrix \(affine\) is singular"):
        find_cases(root)


# ------------------------------------------------------------------------------------------ oblique grids


def test_obliquity_ignores_permutations_and_flips() -> None:
    flipped = np.array([[0, -2.0, 0, 0], [1.5, 0, 0, 0], [0, 0, -3.0, 0], [0, 0, 0, 1]])
    assert obliquity_deg(flipped) == pytest.approx(0.0, abs=1e-9)
    assert obliquity_deg(_oblique_affine(30.0)) == pytest.approx(30.0)
    assert obliquity_deg(_oblique_affine(20.0, axis=0)) == pytest.approx(20.0)
    assert obliquity_deg(_oblique_affine(0.5)) < readers.OBLIQUE_TOLERANCE_DEG


def test_the_axis_aligned_grid_covers_the_oblique_volume() -> None:
    affine = _oblique_affine(30.0)
    grid, shape = axis_aligned_grid(affine, SHAPE)
    assert obliquity_deg(grid) == 0.0 and np.allclose(np.diag(grid)[:3], SPACING)
    corners = _world(affine, SHAPE)[[0, -1]][:, [0, -1]][:, :, [0, -1]].reshape(-1, 3)
    inside = (corners - grid[:3, 3]) / np.diag(grid)[:3]
    assert (inside >= -0.5 - 1e-9).all() and (inside <= np.asarray(shape) - 0.5 + 1e-9).all()


def test_cohorts_refuse_oblique_grids_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(readers.OBLIQUE_ENV, raising=False)
    root = _oblique_case(tmp_path)
    with pytest.raises(
        DataError, match=r"obl_t1ce\.nii\.gz: t1ce is 30\.0 degrees oblique.*--oblique resample"
    ):
        find_cases(root)
    assert find_cases(_oblique_case(tmp_path / "slight", degrees=0.5))  # under the tolerance: read


def test_query_studies_are_resampled_onto_an_axis_aligned_grid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv(readers.OBLIQUE_ENV, raising=False)
    root = _oblique_case(tmp_path)
    with caplog.at_level("WARNING", logger="fdn_core.data.readers"):
        vol = load_case(case_files_from_paths([root / "obl"]))
    assert "30.0 degrees oblique" in caplog.text and "axis-aligned grid" in caplog.text
    assert vol.oblique_deg == pytest.approx(30.0)
    assert vol.resampled == ("t1", "t1ce", "t2", "flair", "seg")
    assert obliquity_deg(vol.affine) == 0.0 and vol.spacing == pytest.approx(SPACING)
    # every voxel inside the oblique volume holds the image's value at its world position (linear
    # interpolation is exact for a linear image); voxels outside it are 0
    expected = _linear(_world(vol.affine, vol.image.shape[1:]))
    t1 = vol.image[0]
    inside = t1 > 0
    assert inside.mean() > 0.4
    src = np.linalg.inv(_oblique_affine(30.0))
    ijk = _world(vol.affine, vol.image.shape[1:]) @ src[:3, :3].T + src[:3, 3]
    deep = np.all((ijk > 0.5) & (ijk < np.asarray(SHAPE) - 1.5), axis=-1)
    assert deep.sum() > 100 and inside[deep].all()
    np.testing.assert_allclose(t1[deep], expected[deep], rtol=0, atol=1e-2)
    np.testing.assert_allclose(vol.image[3][deep], expected[deep] + 30, rtol=0, atol=1e-2)
    assert vol.seg is not None and set(np.unique(vol.seg)) == {0, 2}  # nearest neighbour keeps labels


@pytest.mark.parametrize("policy", ["resample", "refuse", "accept"])
def test_the_oblique_policy_applies_to_cohorts_and_studies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, policy: str
) -> None:
    root = _oblique_case(tmp_path)
    monkeypatch.setenv(readers.OBLIQUE_ENV, policy)
    for resample in (False, True):
        if policy == "refuse":
            with pytest.raises(DataError, match="oblique"):
                load_case(case_files_from_paths([root / "obl"], resample=resample))
            continue
        vol = load_case(case_files_from_paths([root / "obl"], resample=resample))
        assert vol.oblique_deg == pytest.approx(30.0)
        if policy == "accept":  # the nearest axis-aligned orientation, as before (the tilt is kept)
            assert vol.resampled == () and vol.image.shape[1:] == SHAPE
        else:
            assert vol.resampled[:4] == ("t1", "t1ce", "t2", "flair") and obliquity_deg(vol.affine) == 0.0


def test_an_unknown_policy_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(readers.OBLIQUE_ENV, "sideways")
    with pytest.raises(DataError, match=r"FDN_OBLIQUE='sideways'.*auto"):
        readers.oblique_policy()
    with pytest.raises(DataError, match="use one of"):
        readers.set_oblique_policy("sideways")


def test_fdn_oblique_flag_sets_the_policy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fdn_core.cli import main

    monkeypatch.delenv(readers.OBLIQUE_ENV, raising=False)
    root = _oblique_case(tmp_path)
    assert main(["inspect", str(root), "--no-progress"]) == 2
    assert "oblique" in capsys.readouterr().err
    try:
        assert main(["--oblique", "resample", "inspect", str(root), "--no-progress"]) == 0
        assert "1 readable case" in capsys.readouterr().out
    finally:
        readers.set_oblique_policy(None)
        monkeypatch.delenv(readers.OBLIQUE_ENV, raising=False)


# --------------------------------------------------------------------------------------------- channels


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda a: np.zeros_like(a), "t2 is empty: no voxel is above 0 \\(every voxel is 0\\)"),
        (lambda a: -a, "t2 is empty: no voxel is above 0 \\(values"),
        (lambda a: np.full_like(a, 7.0), "t2 has the same value 7 in every voxel above 0"),
    ],
)
def test_empty_and_flat_channels_are_refused_naming_the_file(tmp_path: Path, change, words: str) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    image = rng.uniform(1, 100, size=(4, *SHAPE)).astype(np.float32)
    image[2] = change(image[2])
    write_brats_case(tmp_path / "c", "c", image, affine=np.diag([*SPACING, 1.0]))
    with pytest.raises(DataError, match=rf"c_t2\.nii\.gz: {words}"):
        load_case(find_cases(tmp_path)[0])


# --------------------------------------------------------------------------------- fdn train --resume


def test_the_case_list_record_notices_another_cohort_and_accepts_a_copy(tmp_path: Path) -> None:
    from fdn_training.rundata import case_list_record, check_resume_data, record_run_data

    rng = np.random.default_rng(0)
    cohort = tmp_path / "cohort"
    for cid in ("a", "b"):
        write_brats_case(cohort / cid, cid, rng.uniform(1, 9, (4, 6, 6, 4)).astype(np.float32))
    run = tmp_path / "run"
    run.mkdir()
    payload = {"train_cases": ["a"], "val_cases": ["b"]}
    record_run_data(run, case_list_record(cohort))
    copy = tmp_path / "copy"
    shutil.copytree(cohort, copy)
    assert check_resume_data(run, copy, payload, False, True)["n_cases"] == 2  # moved: same case list
    other = tmp_path / "other"
    shutil.copytree(cohort, other)
    write_brats_case(other / "b", "b", rng.uniform(1, 9, (4, 6, 6, 5)).astype(np.float32))
    with pytest.raises(ConfigError, match=r"1 case\(s\) changed \(e\.g\. b\).*--allow-data-change"):
        check_resume_data(run, other, payload, False, True)
    check_resume_data(run, other, payload, True, True)  # allowed: the record follows the new data
    assert check_resume_data(run, other, payload, False, True)["n_cases"] == 2
    # a run without a record (older versions) is compared by the case ids of its checkpoint
    (run / "data.json").unlink()
    with pytest.raises(ConfigError, match=r"1 case\(s\) added \(e\.g\. c\)"):
        shutil.copytree(cohort / "a", cohort / "c")
        for f in (cohort / "c").iterdir():
            f.rename(f.with_name(f.name.replace("a_", "c_")))
        check_resume_data(run, cohort, payload, False, True)
