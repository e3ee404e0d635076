"""Retrieval metrics on hand-made label maps with known answers, and the montage renderer."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fdn_core.errors import DataError
from fdn_core.evaluation.metrics import dice_matrix
from fdn_core.evaluation.retrieval_eval import (
    average_precision_at_k,
    largest_tumour_slice,
    oracle_volume_wise,
    precision_at_k,
    volume_wise_best,
)
from fdn_core.labels import ABNORMAL_CLASSES
from fdn_core.report.montage import MontagePanel, display_orientation, render_montage


def test_largest_tumour_slice_picks_the_lowest_index_on_ties() -> None:
    seg = np.zeros((5, 4, 4), dtype=np.uint8)
    seg[1, :2, :2] = 1  # 4 pixels
    seg[3, :2, :] = 2  # 8 pixels
    seg[4, 2:, :] = 3  # 8 pixels, tie with slice 3
    assert largest_tumour_slice(seg) == (3, 8)
    assert largest_tumour_slice(np.zeros((3, 2, 2), np.uint8)) == (0, 0)
    with pytest.raises(DataError):
        largest_tumour_slice(np.zeros((2, 2), np.uint8))


def test_volume_wise_best_keeps_one_slice_per_volume_and_excludes_the_query_volume() -> None:
    #                  volume: 0    0    1    1    2    2    3
    scores = np.array([0.1, 0.9, 0.5, 0.7, 0.9, 0.2, 0.95])
    volumes = np.array([0, 0, 1, 1, 2, 2, 3])
    # best per volume: v0 row 1 (0.9), v1 row 3 (0.7), v2 row 4 (0.9), v3 row 6 (0.95);
    # the tie v0/v2 goes to the earlier row
    assert volume_wise_best(scores, volumes, 10, higher_is_better=True).tolist() == [6, 1, 4, 3]
    assert volume_wise_best(scores, volumes, 2, higher_is_better=True).tolist() == [6, 1]
    assert volume_wise_best(scores, volumes, 10, higher_is_better=True, exclude_volume=3).tolist() == [
        1,
        4,
        3,
    ]
    # distances: smaller first; best of v0 is row 0 (0.1), v2 row 5 (0.2), v1 row 2 (0.5), v3 row 6
    assert volume_wise_best(scores, volumes, 3, higher_is_better=False).tolist() == [0, 5, 2]


def test_oracle_on_a_hand_made_reference_set() -> None:
    # One query (tumour in the top-left corner) against 3 reference volumes of 2 slices each.
    q = np.zeros((1, 4, 4), dtype=np.uint8)
    q[0, :2, :2] = 1
    refs = np.zeros((6, 4, 4), dtype=np.uint8)
    refs[0, :2, :2] = 1  # volume 0: identical -> 1.0
    refs[1, 2:, 2:] = 1  # volume 0: disjoint -> 0.0
    refs[2, :2, :1] = 1  # volume 1: 2 of 4 pixels -> 2*2/(4+2) = 2/3
    refs[3, :1, :1] = 1  # volume 1: 1 pixel -> 2/5
    refs[4, :2, :2] = 2  # volume 2: other class -> 0.0
    refs[5, :3, :2] = 1  # volume 2: 4 of 6 -> 2*4/(4+6) = 0.8
    volumes = np.array([0, 0, 1, 1, 2, 2])
    dice = dice_matrix(q, refs, ABNORMAL_CLASSES)[0]
    np.testing.assert_allclose(dice, [1.0, 0.0, 2 / 3, 0.4, 0.0, 0.8])
    rows = oracle_volume_wise(dice, volumes, k=2)
    assert rows.tolist() == [0, 5]
    assert dice[rows].mean() == pytest.approx(0.9)
    # The query's own volume (0) never counts, even though it holds the perfect match.
    rows = oracle_volume_wise(dice, volumes, k=10, exclude_volume=0)
    assert rows.tolist() == [5, 2]
    # S_sum's oracle ranks by anatomy + tumour Dice; the reported score is their average.
    anatomy = np.array([0.0, 1.0, 0.9, 0.9, 1.0, 0.0])
    both = (anatomy + dice) / 2
    rows = oracle_volume_wise(both, volumes, k=3)
    assert rows.tolist() == [2, 0, 4]
    assert both[rows].tolist() == pytest.approx([(0.9 + 2 / 3) / 2, 0.5, 0.5])


def test_average_precision_and_precision_at_k_by_hand() -> None:
    rel = [True, False, True, False]
    # P@1 = 1, P@3 = 2/3; R = 3 relevant candidates: AP@4 = (1 + 2/3) / min(4, 3)
    assert average_precision_at_k(rel, 4, 3) == pytest.approx((1 + 2 / 3) / 3)
    # Only 2 relevant candidates exist and both were found -> (1 + 2/3) / 2
    assert average_precision_at_k(rel, 4, 2) == pytest.approx((1 + 2 / 3) / 2)
    # k smaller than R: AP@2 = 1 / min(2, 5)
    assert average_precision_at_k(rel, 2, 5) == pytest.approx(0.5)
    assert average_precision_at_k([False, False], 2, 4) == 0.0
    assert average_precision_at_k([True, True], 2, 2) == 1.0
    assert math.isnan(average_precision_at_k([False, False], 2, 0))
    assert precision_at_k(rel, 4) == 0.5
    assert precision_at_k(rel, 2) == 0.5
    assert precision_at_k([True], 4) == 0.25  # fewer results than k still divide by k
    with pytest.raises(DataError, match="relevant candidates"):
        average_precision_at_k([True, True], 2, 1)
    with pytest.raises(DataError):
        precision_at_k(rel, 0)


def test_display_orientation_is_radiological() -> None:
    # Canonical RAS+: axis 0 left -> right, axis 1 posterior -> anterior. Mark the left-anterior corner.
    s = np.zeros((3, 4))
    s[0, 3] = 1.0
    shown = display_orientation(s)
    assert shown.shape == (4, 3)
    assert shown[0, 2] == 1.0  # anterior at the top, the subject's left on the viewer's right


def test_render_montage_writes_a_png_and_checks_its_input(tmp_path) -> None:
    import matplotlib.image as mpimg

    rng = np.random.default_rng(0)
    img = rng.normal(size=(20, 24)).astype(np.float32)
    seg = np.zeros((20, 24), dtype=np.uint8)
    seg[5:9, 5:9] = 3
    anat = np.ones((20, 24), dtype=np.uint8)
    panels = [MontagePanel(img, "query", seg, anat, highlight=True)] + [
        MontagePanel(img * (i + 1), f"#{i + 1}") for i in range(4)
    ]
    out = render_montage(panels, tmp_path / "m.png", title="test", ncols=3, show_anat=True)
    data = mpimg.imread(out)
    assert data.ndim == 3 and data.shape[0] > 100 and data.shape[1] > 100
    assert not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(DataError, match="label shape"):
        render_montage([MontagePanel(img, "bad", seg[:5])], tmp_path / "bad.png")
    with pytest.raises(DataError, match="no panels"):
        render_montage([], tmp_path / "none.png")
    assert not (tmp_path / "bad.png").exists()
