"""Overlap and classification metrics on hand-made cases with known answers, and against scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fdn_core.errors import DataError
from fdn_core.evaluation.metrics import (
    abnormal_dice,
    dice,
    dice_from_counts,
    dice_matrix,
    dice_per_class,
    multiclass_dice,
    overlap_counts,
    ppv,
    roc_auc,
)
from fdn_core.labels import ABNORMAL_CLASSES, ANATOMY_CLASSES


def test_dice_hand_computed() -> None:
    assert dice(np.array([1, 1, 0, 0]), np.array([1, 0, 1, 0])) == pytest.approx(0.5)
    assert dice(np.array([1, 1]), np.array([1, 1])) == 1.0
    assert dice(np.array([1, 0]), np.array([0, 1])) == 0.0
    assert math.isnan(dice(np.zeros(4), np.zeros(4)))  # undefined when both are empty
    with pytest.raises(ValueError, match="shapes differ"):
        dice(np.zeros(3), np.zeros(4))


def test_abnormal_dice_per_class_and_whole_tumour() -> None:
    pred = np.array([[1, 2], [3, 0]])[..., None]
    ref = np.array([[1, 2], [2, 0]])[..., None]
    d = abnormal_dice(pred, ref)
    assert d["ncr_net"] == 1.0
    assert d["ed"] == pytest.approx(2 * 1 / (1 + 2))
    assert d["et"] == 0.0  # predicted, not in the reference
    assert d["whole_tumour"] == 1.0  # the same three voxels are tumour in both


def test_ppv_and_auc_hand_computed() -> None:
    assert ppv(np.array([1, 0, 1, 0]), np.array([1, 1, 0, 0])) == pytest.approx(0.5)
    assert ppv(np.array([1, 1, 0]), np.array([1, 1, 0])) == 1.0
    assert math.isnan(ppv(np.array([1, 0]), np.array([0, 0])))
    y = np.array([0, 0, 1, 1])
    assert roc_auc(y, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert roc_auc(y, np.array([0.9, 0.8, 0.2, 0.1])) == 0.0
    assert roc_auc(y, np.full(4, 0.5)) == 0.5
    # One of four (positive, negative) pairs is ordered wrongly: 3/4.
    assert roc_auc(y, np.array([0.1, 0.6, 0.5, 0.9])) == pytest.approx(0.75)
    assert math.isnan(roc_auc(np.ones(3), np.arange(3.0)))


def test_dice_per_class_by_hand() -> None:
    a = np.array([[1, 1, 0], [2, 0, 0]])
    b = np.array([[1, 0, 0], [2, 2, 3]])
    per = dice_per_class(a, b, (1, 2, 3, 4))
    # class 1: |A|=2, |B|=1, overlap 1 -> 2/3; class 2: |A|=1, |B|=2, overlap 1 -> 2/3;
    # class 3: only in b -> 0; class 4: in neither -> NaN (skipped).
    assert per[:3] == pytest.approx([2 / 3, 2 / 3, 0.0])
    assert math.isnan(per[3])
    assert multiclass_dice(a, b, (1, 2, 3, 4)) == pytest.approx((2 / 3 + 2 / 3 + 0.0) / 3)


def test_multiclass_dice_empty_and_identical_maps() -> None:
    empty = np.zeros((4, 4), dtype=np.uint8)
    tumour = empty.copy()
    tumour[1:3, 1:3] = 2
    assert multiclass_dice(empty, empty, ABNORMAL_CLASSES) == 1.0  # nothing to disagree about
    assert multiclass_dice(tumour, empty, ABNORMAL_CLASSES) == 0.0
    assert multiclass_dice(empty, tumour, ABNORMAL_CLASSES) == 0.0
    assert multiclass_dice(tumour, tumour, ABNORMAL_CLASSES) == 1.0
    with pytest.raises(DataError, match="shapes differ"):
        multiclass_dice(tumour, tumour[:3], ABNORMAL_CLASSES)


def test_dice_matrix_matches_the_pairwise_definition() -> None:
    rng = np.random.default_rng(3)
    queries = rng.integers(0, 7, size=(3, 6, 5)).astype(np.uint8)
    refs = rng.integers(0, 7, size=(5, 6, 5)).astype(np.uint8)
    refs[0] = 0  # an empty reference slice
    queries[1] = 0
    refs[1] = 0  # empty vs empty -> 1
    m = dice_matrix(queries, refs, ANATOMY_CLASSES)
    expected = np.array([[multiclass_dice(q, r, ANATOMY_CLASSES) for r in refs] for q in queries])
    np.testing.assert_allclose(m, expected, rtol=0, atol=1e-12)
    assert m[1, 1] == 1.0 and m[0, 0] == 0.0
    with pytest.raises(DataError, match="label stacks"):
        dice_matrix(queries, refs[:, :5], ANATOMY_CLASSES)


def test_pooled_counts_give_the_dice_of_the_union() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 4, (2, 10, 8, 8))
    pooled = sum(overlap_counts(a[i], b[i], ABNORMAL_CLASSES) for i in range(10))
    np.testing.assert_allclose(dice_from_counts(pooled), dice_per_class(a, b, ABNORMAL_CLASSES))


def test_ppv_and_auc_agree_with_scikit_learn() -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200).astype(bool)
    scores = np.round(rng.normal(size=200) + y, 1)  # rounded: ties occur
    assert roc_auc(y, scores) == pytest.approx(metrics.roc_auc_score(y, scores))
    pred = scores > 0.5
    assert ppv(y, pred) == pytest.approx(metrics.precision_score(y, pred))
