"""The browser application's parts that need no browser, no trame and no MRML: uploads, the study catalogue,
reading retrieved cases for display, and which demo database ``fdn web`` opens by default.

These run in both environments (the test one and ``.venv-web``); the browser itself is tested in
``test_web_app.py``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fdn_core.data.readers import find_cases, load_case
from fdn_core.errors import DataError
from fdn_core.labels import MODALITIES
from FDNRetrievalWeb import locate
from FDNRetrievalWeb.studies import (
    StudyCatalogue,
    UploadArea,
    brats_labels_to_classes,
    read_display_volume,
    window_for,
)


def _case_files(cohort: Path, index: int = 1) -> dict[str, Path]:
    case = find_cases(cohort)[index]
    assert case.images is not None
    return dict(case.images)


def _upload(area: UploadArea, files: dict[str, Path], names: dict[str, str]) -> object:
    return area.stage([(names[k], files[k].read_bytes()) for k in names])


# ------------------------------------------------------------------------------------------------ uploads


def test_upload_maps_names_to_sequences_and_loads(tiny_cohort: Path, tmp_path: Path) -> None:
    files = _case_files(tiny_cohort)
    area = UploadArea(tmp_path)
    names = {
        "t1": "Pat 7 T1w.nii.gz",
        "t1ce": "pat7_T1_Gd.nii.gz",
        "t2": "pat7-T2.nii.gz",
        "flair": "pat7 FLAIR.nii.gz",
    }
    case = _upload(area, files, names)
    assert case.case_id == "uploaded study"  # the names share no prefix
    assert {k: p.name.split("_", 1)[0] for k, p in case.images.items()} == {k: k for k in MODALITIES}
    assert all(p.parent.parent == area.root for p in case.images.values())
    loaded = load_case(case)
    reference = load_case(find_cases(tiny_cohort)[1])
    assert np.array_equal(loaded.image, reference.image)
    area.close()
    assert not area.root.exists()


def test_upload_names_the_study_after_the_files(tiny_cohort: Path, tmp_path: Path) -> None:
    files = _case_files(tiny_cohort)
    area = UploadArea(tmp_path)
    case = _upload(area, files, {k: f"BraTS_042_{k}.nii.gz" for k in MODALITIES})
    assert case.case_id == "BraTS_042"
    area.close()


@pytest.mark.parametrize(
    ("names", "words"),
    [
        ({"t1": "a_t1.nii.gz", "t1ce": "a_t1ce.nii.gz", "t2": "a_t2.nii.gz"},
         ("Missing FLAIR", "four files")),
        ({"t1": "a_t1.nii.gz", "t1ce": "a_t1ce.nii.gz", "t2": "a_t2.nii.gz", "flair": "scan4.nii.gz"},
         ("scan4.nii.gz", "does not say which sequence")),
        ({"t1": "a_t1.nii.gz", "t1ce": "a_t1ce.nii.gz", "t2": "a_t2.nii.gz", "flair": "a_flair.dcm"},
         ("a_flair.dcm", "NIfTI")),
        ({"t1": "a_t1.nii.gz", "t1ce": "b_t1.nii.gz", "t2": "a_t2.nii.gz", "flair": "a_flair.nii.gz"},
         ("both look like T1",)),
    ],
)  # fmt: skip
def test_upload_explains_bad_names(
    tiny_cohort: Path, tmp_path: Path, names: dict[str, str], words: tuple[str, ...]
) -> None:
    files = _case_files(tiny_cohort)
    area = UploadArea(tmp_path)
    with pytest.raises(DataError) as info:
        _upload(area, files, names)
    for word in words:
        assert word in str(info.value)
    assert not list(area.root.iterdir()), "a refused upload leaves nothing behind"
    area.close()


def test_upload_never_writes_outside_its_folder(tiny_cohort: Path, tmp_path: Path) -> None:
    files = _case_files(tiny_cohort)
    area = UploadArea(tmp_path)
    names = {k: f"../../{k}/../evil_{k}.nii.gz" for k in MODALITIES}
    case = _upload(area, files, names)
    assert all(area.root in p.parents for p in case.images.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == [area.root.name]
    area.close()


def test_unreadable_upload_is_a_data_error(tiny_cohort: Path, tmp_path: Path) -> None:
    files = _case_files(tiny_cohort)
    area = UploadArea(tmp_path)
    pairs = [(f"x_{k}.nii.gz", files[k].read_bytes() if k != "t2" else b"not an image") for k in MODALITIES]
    case = area.stage(pairs)
    with pytest.raises(DataError, match="cannot be read"):
        load_case(case)
    area.close()


def test_discard_keeps_only_the_study_on_screen(tiny_cohort: Path, tmp_path: Path) -> None:
    files = _case_files(tiny_cohort)
    area = UploadArea(tmp_path)
    first = _upload(area, files, {k: f"a_{k}.nii.gz" for k in MODALITIES})
    second = _upload(area, files, {k: f"b_{k}.nii.gz" for k in MODALITIES})
    area.discard_others(second)
    assert not next(iter(first.images.values())).exists()
    assert all(p.exists() for p in second.images.values())
    area.discard_others(None)
    assert not list(area.root.iterdir())
    area.close()


# ---------------------------------------------------------------------------------------------- catalogue


class _FakeDatabase:
    def __init__(self, cases: list[str]) -> None:
        self.cases = cases


def test_catalogue_lists_data_cases_then_database_cases(tiny_cohort: Path) -> None:
    data_ids = sorted(c.case_id for c in find_cases(tiny_cohort))
    catalogue = StudyCatalogue.build(_FakeDatabase([data_ids[0], "other_case"]), tiny_cohort)
    keys = [e.key for e in catalogue.entries]
    assert keys == [f"data:{c}" for c in data_ids] + ["db:other_case"]
    assert catalogue.entries[0].in_database and catalogue.entries[0].title.endswith("(in database)")
    assert not catalogue.entries[1].in_database
    assert catalogue.items()[0] == {"title": catalogue.entries[0].title, "value": keys[0]}
    assert catalogue.files(keys[1], None).case_id == data_ids[1]
    with pytest.raises(DataError, match="no database"):
        catalogue.files("db:other_case", None)
    with pytest.raises(DataError, match="unknown study"):
        catalogue.get("data:nope")


def test_catalogue_reports_a_missing_data_folder(tmp_path: Path) -> None:
    catalogue = StudyCatalogue.build(_FakeDatabase(["a"]), tmp_path / "missing")
    assert [e.key for e in catalogue.entries] == ["db:a"]
    assert "does not exist" in catalogue.problems[0]


# ------------------------------------------------------------------------------------------ display volumes


def test_display_volume_matches_the_indexed_orientation(tiny_cohort: Path) -> None:
    files = find_cases(tiny_cohort)[2]
    reference = load_case(files)
    for sequence in ("flair", "t1ce"):
        volume = read_display_volume(files, sequence)
        assert np.array_equal(volume.image.canonical, reference.image[MODALITIES.index(sequence)])
        assert np.allclose(volume.image.ijk_to_ras, reference.affine)
        assert volume.image.kji.flags.c_contiguous and volume.image.window is not None
        assert volume.labels is not None and reference.seg is not None
        assert np.array_equal(volume.labels.canonical, reference.seg) and volume.labels.window is None
    with pytest.raises(DataError, match="unknown sequence"):
        read_display_volume(files, "dwi")


def test_display_volume_falls_back_to_the_full_reader(tiny_cohort: Path, tmp_path: Path) -> None:
    """A case whose FLAIR is on another grid: read through fdn_core (resampled onto T1ce) like at indexing."""
    import nibabel as nib

    files = find_cases(tiny_cohort)[2]
    case_dir = tmp_path / files.case_id
    shutil.copytree(Path(files.images["t1"]).parent, case_dir)
    flair = case_dir / f"{files.case_id}_flair.nii.gz"
    img = nib.load(str(flair))
    nib.save(
        nib.Nifti1Image(np.asarray(img.dataobj)[::2, ::2], img.affine @ np.diag([2, 2, 1, 1])), str(flair)
    )
    moved = find_cases(tmp_path, resample=True)[0]
    volume = read_display_volume(moved, "flair")
    assert volume.image.canonical.shape == load_case(files).image.shape[1:]


def test_brats_labels_and_window() -> None:
    assert brats_labels_to_classes(np.array([0, 1, 2, 4, 3, 7, -1])).tolist() == [0, 1, 2, 3, 0, 0, 0]
    image = np.zeros((10, 10, 10), np.float32)
    image[2:8, 2:8, 2:8] = np.linspace(1, 100, 216).reshape(6, 6, 6)
    low, high = window_for(image)
    assert 1 <= low < 5 and 95 < high <= 100
    assert window_for(np.zeros((3, 3, 3))) == (0.0, 1.0)


# ------------------------------------------------------------------------------------------ default database


def _fake_db(path: Path, fingerprint: str) -> Path:
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({"fingerprint": fingerprint}))
    return path


def test_demo_database_from_make_demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(locate, "_REPO", tmp_path / "repo")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    assert locate.find_demo_database("abc") is None
    _fake_db(tmp_path / "demo_out" / "db", "abc")
    (tmp_path / "demo_out" / "cohort").mkdir()
    found = locate.find_demo_database("abc")
    assert found is not None and found.database == (tmp_path / "demo_out" / "db").resolve()
    assert found.cohort == (tmp_path / "demo_out" / "cohort").resolve()
    assert "make demo" in found.origin
    assert locate.find_demo_database("another model") is None  # built with another model: not offered


def test_demo_database_of_the_slicer_panel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(locate, "_REPO", tmp_path / "repo")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    panel = _fake_db(tmp_path / "cache" / "slicer.org" / "Slicer" / "FDNRetrieval" / "demo" / "db", "abc")
    found = locate.find_demo_database("abc")
    assert found is not None and found.database == panel.resolve() and "Slicer panel" in found.origin
    # a cache folder set in Slicer's settings comes first
    ini = tmp_path / "config" / "slicer.org" / "Slicer.ini"
    ini.parent.mkdir(parents=True)
    ini.write_text(f"[General]\nfoo=@Variant(\\0)\n[Cache]\nPath={tmp_path / 'custom'}\n")
    custom = _fake_db(tmp_path / "custom" / "FDNRetrieval" / "demo" / "db", "abc")
    found = locate.find_demo_database("abc")
    assert found is not None and found.database == custom.resolve()


def test_web_command_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fdn_core.resources import shipped_model_dir
    from FDNRetrievalWeb.command import resolve_settings

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(locate, "_REPO", tmp_path / "repo")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    args = argparse.Namespace(model=None, db=None, data=None, device="cpu", threads=None)
    with pytest.raises(DataError, match="make demo"):
        resolve_settings(args)
    fingerprint = json.loads((shipped_model_dir("demo") / "bundle.json").read_text())["fingerprint"]
    db = _fake_db(tmp_path / "demo_out" / "db", fingerprint)
    (tmp_path / "demo_out" / "cohort").mkdir()
    settings = resolve_settings(args)
    assert settings.model == shipped_model_dir("demo") and settings.database == db.resolve()
    assert settings.data == (tmp_path / "demo_out" / "cohort").resolve() and settings.threads >= 1
    explicit = resolve_settings(argparse.Namespace(model=tmp_path, db=db, data=None, device="cpu", threads=3))
    assert explicit.data is None and explicit.threads == 3 and explicit.notes == []
    for missing in ({"db": tmp_path / "nowhere"}, {"data": tmp_path / "nowhere"}, {"model": tmp_path / "no"}):
        named = {"model": tmp_path, "db": db, "data": None, **missing}
        with pytest.raises(DataError, match="does not exist"):
            resolve_settings(argparse.Namespace(**named, device="cpu", threads=1))
