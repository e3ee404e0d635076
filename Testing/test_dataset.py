"""Slice cache (build, reuse, invalidation, bad cases), SliceDataset and augmentation, case-wise split."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from fdn_core.data.cache import SliceCache
from fdn_core.data.dataset import AugmentConfig, RandSliceAugmentd, SliceDataset, split_cases
from fdn_core.data.preprocess import PreprocessConfig, volume_to_slices
from fdn_core.data.readers import find_cases, load_case, write_brats_case
from fdn_core.errors import ConfigError, DataError
from fdn_core.progress import Progress

SHAPE = (16, 12, 6)
CFG = PreprocessConfig(64)


def _write_case(
    root: Path, case: str, seed: int, tumour: bool = True, seg: bool = True, anat: bool = True
) -> None:
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in SHAPE], indexing="ij")
    brain = x**2 + y**2 + z**2 < 0.9
    image = np.stack([np.where(brain, rng.gamma(5, 40, SHAPE) + 1, 0) for _ in range(4)])
    labels = np.zeros(SHAPE, np.uint8)
    if tumour:
        labels[(x - 0.3) ** 2 + y**2 + z**2 < 0.2] = 2
        labels[(x - 0.3) ** 2 + y**2 + z**2 < 0.05] = 3
    hemi = np.where(brain, np.where(x < 0, 1, 2), 0).astype(np.uint8)
    write_brats_case(root / case, case, image, labels if seg else None, hemi if anat else None, np.eye(4))


@pytest.fixture
def cohort(tmp_path: Path) -> Path:
    root = tmp_path / "cohort"
    _write_case(root, "a_tumour", 1)
    _write_case(root, "b_tumour", 2, anat=False)
    _write_case(root, "c_healthy", 3, tumour=False)
    _write_case(root, "d_unlabelled", 4, seg=False)
    return root


# ----------------------------------------------------------------------------------------------- cache


def test_cache_contents_match_preprocessing(cohort: Path, tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []
    cache = SliceCache.build_or_open(
        cohort, tmp_path / "cache", CFG, Progress(lambda d, t, m: seen.append((d, t)))
    )
    assert cache.rebuilt and seen[-1] == (4, 4)
    assert (
        cache.case_ids == ["a_tumour", "b_tumour", "c_healthy", "d_unlabelled"] and len(cache) == 4 * SHAPE[2]
    )
    assert cache.images.shape == (24, 4, 64, 64) and cache.images.dtype == np.float16
    assert cache.seg.dtype == np.uint8 and cache.anat.shape == (24, 64, 64)
    for name in ("images", "seg", "anat"):  # plain .npy, readable without pickle
        assert np.load(tmp_path / "cache" / f"{name}.npy", mmap_mode="r", allow_pickle=False).shape[0] == 24
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert index["slices"]["slice_index"][:7] == [0, 1, 2, 3, 4, 5, 0] and index["slices"]["case"][6] == 1
    assert index["settings"]["preprocess"] == {"image_size": 64} and len(index["source"]["files"]) == 22
    for files in find_cases(cohort):
        entry = cache.case(files.case_id)
        expected = volume_to_slices(load_case(files), CFG)
        stack = cache.stack(files.case_id)
        np.testing.assert_allclose(stack.images, expected.images, atol=2e-2, rtol=1e-3)
        assert stack.geometry == expected.geometry == entry.geometry
        assert entry.has_seg == (expected.seg is not None) and entry.has_anat == (expected.anat is not None)
        if expected.seg is not None:
            np.testing.assert_array_equal(stack.seg, expected.seg)
            assert entry.n_abnormal == int(expected.seg.reshape(SHAPE[2], -1).any(1).sum())
            np.testing.assert_array_equal(
                cache.abnormal[entry.start : entry.stop], expected.seg.any(axis=(1, 2))
            )
    assert cache.case("a_tumour").n_abnormal > 0 and cache.case("c_healthy").n_abnormal == 0
    assert cache.case("a_tumour").shape == SHAPE
    with pytest.raises(DataError, match="not in slice cache"):
        cache.case("zzz")


def test_cache_reused_and_rebuilt_on_changes(cohort: Path, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    assert SliceCache.build_or_open(cohort, cache_dir, CFG).rebuilt
    assert not SliceCache.build_or_open(cohort, cache_dir, CFG).rebuilt
    # settings change
    c = SliceCache.build_or_open(cohort, cache_dir, PreprocessConfig(80))
    assert c.rebuilt and c.images.shape[-1] == 80
    c = SliceCache.build_or_open(cohort, cache_dir, PreprocessConfig(80), image_dtype="float32")
    assert c.rebuilt and c.images.dtype == np.float32
    assert not SliceCache.build_or_open(
        cohort, cache_dir, PreprocessConfig(80), image_dtype="float32"
    ).rebuilt
    # a source file changes (same size; a different mtime)
    path = cohort / "a_tumour" / "a_tumour_t2.nii.gz"
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert SliceCache.build_or_open(cohort, cache_dir, PreprocessConfig(80), image_dtype="float32").rebuilt
    # a case is added
    _write_case(cohort, "e_new", 5)
    c = SliceCache.build_or_open(cohort, cache_dir, PreprocessConfig(80), image_dtype="float32")
    assert c.rebuilt and "e_new" in c.case_ids
    # a damaged cache is rebuilt
    (cache_dir / "seg.npy").unlink()
    with pytest.raises(DataError, match="damaged"):
        SliceCache.open(cache_dir)
    assert SliceCache.build_or_open(cohort, cache_dir, PreprocessConfig(80), image_dtype="float32").rebuilt
    assert not list(tmp_path.glob(".cache.*"))  # no temporary folders left behind


def test_cache_refuses_foreign_folders_and_bad_settings(cohort: Path, tmp_path: Path) -> None:
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a slice cache"):
        SliceCache.build_or_open(cohort, other, CFG)
    assert (other / "notes.txt").read_text() == "keep me"
    with pytest.raises(DataError, match="data folder itself"):
        SliceCache.build_or_open(cohort, cohort, CFG)
    with pytest.raises(DataError, match="image_dtype"):
        SliceCache.build_or_open(cohort, tmp_path / "c", CFG, image_dtype="int8")


def test_bad_case_fails_the_build_unless_skipped(cohort: Path, tmp_path: Path) -> None:
    path = cohort / "b_tumour" / "b_tumour_flair.nii.gz"
    img = nib.load(path)
    data = np.asarray(img.dataobj, dtype=np.float32)
    data[5, 5, 3] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), str(path))
    cache_dir = tmp_path / "cache"
    with pytest.raises(DataError, match=r"case b_tumour.*NaN"):
        SliceCache.build_or_open(cohort, cache_dir, CFG)
    assert not cache_dir.exists()
    cache = SliceCache.build_or_open(cohort, cache_dir, CFG, skip_bad=True, workers=2)
    assert cache.case_ids == ["a_tumour", "c_healthy", "d_unlabelled"] and len(cache) == 18
    assert cache.images.shape[0] == 18 and [p.case_id for p in cache.skipped] == ["b_tumour"]
    assert cache.case("c_healthy").start == 6 and list(cache.slice_case[6:12]) == [1] * 6
    with pytest.raises(DataError, match="b_tumour"):  # the skip is not forgotten on reopening
        SliceCache.build_or_open(cohort, cache_dir, CFG)


# --------------------------------------------------------------------------------------------- dataset


def test_dataset_items_shapes_and_dtypes(cohort: Path, tmp_path: Path) -> None:
    cache = SliceCache.build_or_open(cohort, tmp_path / "cache", CFG)
    ds = SliceDataset(cache, ["a_tumour", "b_tumour", "c_healthy"], augment=False)
    assert len(ds) == 18
    item = ds[8]
    assert set(item) == {"image", "seg", "anat", "has_anat", "abnormal", "case_id", "slice_index"}
    assert item["image"].shape == (4, 64, 64) and item["image"].dtype == torch.float32
    assert item["seg"].shape == (64, 64) and item["seg"].dtype == torch.int64
    assert item["anat"].dtype == torch.int64 and item["has_anat"] is False
    assert (item["case_id"], item["slice_index"]) == ("b_tumour", 2)
    np.testing.assert_array_equal(item["image"].numpy(), cache.images[8].astype(np.float32))
    flags = [ds[i]["abnormal"] for i in range(len(ds))]
    assert flags == ds.abnormal.tolist() and any(flags) and not any(flags[12:])
    assert ds[0]["has_anat"] is True and ds[-1]["case_id"] == "c_healthy"
    batch = next(iter(DataLoader(ds, batch_size=5)))
    assert batch["image"].shape == (5, 4, 64, 64) and batch["case_id"] == ["a_tumour"] * 5
    with pytest.raises(DataError, match="no segmentation"):
        SliceDataset(cache, ["d_unlabelled"], augment=False)
    assert len(SliceDataset(cache, ["d_unlabelled"], augment=False, require_seg=False)) == 6
    with pytest.raises(DataError, match="not in slice cache"):
        SliceDataset(cache, ["nope"], augment=False)


def test_augmentation_is_deterministic_and_label_safe(cohort: Path, tmp_path: Path) -> None:
    cache = SliceCache.build_or_open(cohort, tmp_path / "cache", CFG)
    ds = SliceDataset(cache, ["a_tumour", "c_healthy"], augment=True, seed=3)
    first = [ds[i] for i in range(len(ds))]
    again = [ds[i] for i in range(len(ds))]
    for a, b in zip(first, again):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["seg"], b["seg"])
    plain = SliceDataset(cache, ["a_tumour", "c_healthy"], augment=False)
    assert any(not torch.equal(a["image"], plain[i]["image"]) for i, a in enumerate(first))
    for item in first:
        assert set(item["seg"].unique().tolist()) <= {0, 1, 2, 3}
        assert set(item["anat"].unique().tolist()) <= {0, 1, 2}
        assert item["abnormal"] == bool((item["seg"] > 0).any())
    ds.set_epoch(1)
    assert any(not torch.equal(a["image"], ds[i]["image"]) for i, a in enumerate(first))
    ds.set_epoch(0)
    # the same items whatever the number of worker processes
    loaded = next(iter(DataLoader(ds, batch_size=len(ds), num_workers=2)))
    assert torch.equal(loaded["image"], torch.stack([a["image"] for a in first]))
    other_seed = SliceDataset(cache, ["a_tumour", "c_healthy"], augment=True, seed=4)
    assert any(not torch.equal(a["image"], other_seed[i]["image"]) for i, a in enumerate(first))


def test_flip_is_left_right_and_swaps_anatomy_sides() -> None:
    image = torch.arange(2 * 8 * 6, dtype=torch.float32).reshape(2, 8, 6)
    labels = torch.zeros((2, 8, 6))
    labels[1, :4] = 1.0  # label 1 (left) on the low-X half: axis 0 runs left -> right
    labels[1, 4:] = 2.0
    labels[0, 0, 0] = 3.0
    t = RandSliceAugmentd(
        config=AugmentConfig(flip_prob=1.0, max_rotation_deg=0.0, scale_min=1.0, scale_max=1.0)
    )
    t.set_random_state(seed=0)
    out = t({"image": image, "labels": labels})
    torch.testing.assert_close(out["image"], image.flip(1))
    assert torch.equal(out["labels"][1], labels[1])  # mirrored AND relabelled: left is still label 1
    assert out["labels"][0, 7, 0] == 3.0 and out["labels"][0, 0, 0] == 0.0
    with pytest.raises(ConfigError, match="flip_prob"):
        AugmentConfig(flip_prob=1.5)


# ----------------------------------------------------------------------------------------------- split


def test_split_cases_is_case_wise_and_deterministic() -> None:
    ids = [f"case{i:03d}" for i in range(23)]
    train, val, test = split_cases(ids, (0.7, 0.15, 0.15), seed=0)
    assert (len(train), len(val), len(test)) == (16, 4, 3)
    assert set(train) | set(val) | set(test) == set(ids)
    assert not (set(train) & set(val) or set(train) & set(test) or set(val) & set(test))
    assert split_cases(list(reversed(ids)), (0.7, 0.15, 0.15), seed=0) == (train, val, test)
    assert split_cases(ids, (0.7, 0.15, 0.15), seed=1) != (train, val, test)
    small = split_cases(ids[:3], (0.8, 0.1, 0.1), seed=0)
    assert [len(s) for s in small] == [1, 1, 1]
    assert split_cases(ids[:4], (1.0, 0.0), seed=0) == (sorted(ids[:4]), [])
    with pytest.raises(ConfigError, match="sum to 1"):
        split_cases(ids, (0.5, 0.2), seed=0)
    with pytest.raises(DataError, match="cannot fill"):
        split_cases(ids[:2], (0.8, 0.1, 0.1), seed=0)
    with pytest.raises(DataError, match="repeat"):
        split_cases(["a", "a", "b"], (0.5, 0.5), seed=0)


def test_phantom_cohort_end_to_end(tiny_cohort: Path, tmp_path: Path) -> None:
    """Integration: the shared phantom cohort goes through readers, cache and dataset."""
    cases = find_cases(tiny_cohort)
    assert len(cases) == 6
    cache = SliceCache.build_or_open(tiny_cohort, tmp_path / "cache", CFG)
    train, _ = split_cases(cache.case_ids, (0.67, 0.33), seed=0)
    ds = SliceDataset(cache, train, augment=True)
    assert len(ds) == sum(len(cache.case(c).rows) for c in train)
    assert ds.abnormal.any() and not ds.abnormal.all()
    item = ds[len(ds) // 2]
    assert item["image"].shape == (4, 64, 64) and item["has_anat"] is True
