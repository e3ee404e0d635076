"""The segmentation's size rule: predicted lesions below a volume are removed whole (all classes)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from fdn_core.data.preprocess import SliceGeometry
from fdn_core.errors import DataError
from fdn_core.model.lesions import remove_small_lesions

ROOT = Path(__file__).resolve().parents[1]


def _labels() -> np.ndarray:
    """A 4x4x4 tumour of three classes (64 voxels), a 2-voxel speck touching nothing, and a 3-voxel speck
    that touches the tumour only at a corner (26-connected: part of it)."""
    z = np.zeros((12, 12, 12), np.uint8)
    z[1:5, 1:5, 1:5] = 2
    z[2:4, 2:4, 2:4] = 1
    z[1, 1:5, 1:5] = 4
    z[9, 9, 9:11] = 2
    z[5, 5, 5] = 4  # corner contact with the tumour
    z[5, 5, 6:8] = 1
    return z


def test_small_lesions_are_removed_whole_and_counted() -> None:
    labels = _labels()
    out, cleanup = remove_small_lesions(labels, voxel_ml=0.1, min_ml=1.0)
    assert cleanup.kept == 1 and cleanup.removed == 1
    assert cleanup.kept_ml == pytest.approx(6.7) and cleanup.removed_ml == pytest.approx(0.2)
    expected = labels.copy()
    expected[9, 9, 9:11] = 0
    np.testing.assert_array_equal(out, expected)  # the corner-touching speck belongs to the tumour
    assert labels[9, 9, 9] == 2  # the input is not modified
    assert (
        cleanup.describe()
    ) == "1 predicted lesion(s) of at least 1 mL (6.7 mL); 1 smaller one(s) removed (0.20 mL)"


def test_zero_keeps_everything_and_a_large_size_removes_all() -> None:
    labels = _labels()
    out, cleanup = remove_small_lesions(labels, voxel_ml=0.1, min_ml=0.0)
    np.testing.assert_array_equal(out, labels)
    assert (cleanup.kept, cleanup.removed) == (2, 0) and "no size filter" in cleanup.describe()
    out, cleanup = remove_small_lesions(labels, voxel_ml=0.1, min_ml=100.0)
    assert not out.any() and (cleanup.kept, cleanup.removed) == (0, 2)
    empty, cleanup = remove_small_lesions(np.zeros((3, 4, 5), np.uint8), voxel_ml=1.0)
    assert not empty.any() and (cleanup.kept, cleanup.removed) == (0, 0)


@pytest.mark.parametrize(
    ("labels", "voxel_ml", "min_ml", "message"),
    [
        (np.zeros((4, 4), np.uint8), 1.0, 1.0, "3D label array"),
        (np.zeros((4, 4, 4), np.uint8), 0.0, 1.0, "voxel volume"),
        (np.zeros((4, 4, 4), np.uint8), 1.0, -1.0, "minimum lesion size"),
        (np.zeros((4, 4, 4), np.uint8), 1.0, float("nan"), "minimum lesion size"),
    ],
)
def test_bad_arguments_are_named(labels: np.ndarray, voxel_ml: float, min_ml: float, message: str) -> None:
    with pytest.raises(DataError, match=message):
        remove_small_lesions(labels, voxel_ml, min_ml)


def test_model_voxel_volume_follows_the_padding_and_resize() -> None:
    # 240 x 200 slices pad to 240 x 240 and shrink to 64: one model pixel is 3.75 x 3.75 original pixels.
    geometry = SliceGeometry.for_shape(240, 200, 64)
    assert geometry.voxel_ml((1.0, 1.0, 1.0)) == pytest.approx(3.75**2 / 1000)
    assert geometry.voxel_ml((0.5, 0.5, 3.0)) == pytest.approx(3.75**2 * 0.25 * 3 / 1000)


def test_unlabelled_slices_are_flagged_from_the_cleaned_prediction() -> None:
    from fdn_core.data.preprocess import SliceStack
    from fdn_core.model.bundle import EncodedSlices
    from fdn_core.retrieval import _has_abnormal

    seg = _labels()  # read as (Z, S, S): the tumour spans slices 1-5, the lone speck slice 9
    grids = np.zeros((12, 2, 2), np.uint16)
    encoded = EncodedSlices(grids, grids, seg)
    geometry = SliceGeometry.for_shape(12, 12, 12)
    images = np.zeros((12, 4, 12, 12), np.float32)
    flags = _has_abnormal(SliceStack(images, None, None, geometry, voxel_ml=0.1), encoded)
    np.testing.assert_array_equal(np.flatnonzero(flags), [1, 2, 3, 4, 5])
    unknown_size = _has_abnormal(SliceStack(images, None, None, geometry), encoded)
    np.testing.assert_array_equal(np.flatnonzero(unknown_size), [1, 2, 3, 4, 5, 9])
    labelled = SliceStack(images, seg * 0, None, geometry, voxel_ml=0.1)  # labels win over the prediction
    assert not _has_abnormal(labelled, encoded).any()


def test_size_bench_agrees_with_the_model_evaluation(
    tiny_bundle: Path, tiny_cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``bench/lesion_size.py`` scores the same segmentation as ``fdn eval-model`` at the same size."""
    from fdn_core.evaluation.model_eval import LeakinessSettings, evaluate_model

    spec = importlib.util.spec_from_file_location("lesion_size", ROOT / "bench" / "lesion_size.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "sizes.json"
    argv = ["--model", str(tiny_bundle), "--data", str(tiny_cohort), "--sizes", "0", "0.5", "1e6"]
    assert bench.main([*argv, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert "| 0.5 |" in capsys.readouterr().out and [r["min_lesion_ml"] for r in rows] == [0, 0.5, 1e6]
    # 0.5 mL removes some of the untrained model's lesions here, 1e6 mL all of them
    assert rows[1]["whole_tumour_dice_mean"] != rows[0]["whole_tumour_dice_mean"]
    assert rows[2]["healthy_with_false_tumour"] == 0 and rows[2]["whole_tumour_dice_mean"] == 0.0
    leak = LeakinessSettings(input_size=16, epochs=1, width=8, slices_per_case=4)
    for row in rows[1:]:
        results = evaluate_model(
            tiny_bundle, tiny_cohort, leak=leak, binarize=False, min_lesion_ml=row["min_lesion_ml"]
        )
        seg = results["segmentation"]
        assert row["whole_tumour_dice_mean"] == pytest.approx(seg["tumour_cases"]["whole_tumour"]["mean"])
        assert row["healthy_with_false_tumour"] == seg["healthy_cases"]["with_predicted_tumour"]
        assert row["false_tumour_ml_max"] == pytest.approx(seg["healthy_cases"]["predicted_ml_max"])
        unprocessed = seg["unprocessed"]["tumour_cases"]["whole_tumour"]["mean"]
        assert unprocessed == pytest.approx(rows[0]["whole_tumour_dice_mean"])  # the same prediction, raw
        removed = [c for c in results["segmentation_per_case"] if c["lesions_removed"]]
        wt = [
            (c["dice"]["whole_tumour"], c["dice_unprocessed"]["whole_tumour"]) for c in removed if c["tumour"]
        ]
        assert wt and all(after != before for after, before in wt)


def test_bad_sizes_are_refused_before_any_work(
    tiny_bundle: Path, tiny_cohort: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fdn_core.cli import main
    from fdn_core.evaluation.model_eval import evaluate_model

    with pytest.raises(DataError, match="minimum lesion size"):
        evaluate_model(tiny_bundle, tiny_cohort / "no-such-folder", min_lesion_ml=-1.0)
    for bad in ("-1", "nan", "inf", "two"):
        with pytest.raises(SystemExit) as exit_info:
            main(["eval-model", "--model", str(tiny_bundle), "--data", str(tiny_cohort), "--out", "x",
                  "--min-lesion-ml", bad])  # fmt: skip
        assert exit_info.value.code == 2 and "--min-lesion-ml" in capsys.readouterr().err


def test_lesion_filter_bench_counts_what_the_filter_returns(
    tiny_bundle: Path, tiny_cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``bench/lesion_filter.py``: with "without" no result shows a tumour (the engine's own tests check the
    filter itself); its synthetic timing checks every filtered hit's flag."""
    from fdn_core.model.bundle import load_bundle
    from fdn_core.retrieval import index_cohort

    spec = importlib.util.spec_from_file_location("lesion_filter", ROOT / "bench" / "lesion_filter.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    db = index_cohort(load_bundle(tiny_bundle, device="cpu"), tiny_cohort, tmp_path / "db")
    rows = bench.quality_rows(db.path, tiny_bundle, ("euclidean",))
    got = {(r["distance"], r["lesion"]): r for r in rows}
    assert set(got) == {(d, f) for d in ("euclidean", "euclidean + context") for f in ("any", "without")}
    for d in ("euclidean", "euclidean + context"):
        assert got[d, "without"]["with_tumour"] == 0 <= got[d, "any"]["with_tumour"]
        assert got[d, "without"]["results"] == got[d, "any"]["results"] == 4 * 5  # 4 queries, 5 other cases
        assert 0 < got[d, "without"]["anatomy_dice"] <= 1
    assert bench.main(["--sizes", "3100", "--repeats", "2", "--threads", "1"]) == 0
    assert "| sum | yes | with |" in capsys.readouterr().out
