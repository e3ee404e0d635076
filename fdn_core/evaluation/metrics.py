"""Overlap and classification metrics, one implementation each (training validation, model evaluation and
retrieval evaluation all use these).

Dice is computed from overlap counts so that counts can be pooled first (over batches, or over processes
with an all-reduce) and turned into Dice once. PPV and ROC AUC are written here rather than taken from
scikit-learn: they are a few lines each, and scikit-learn would add a large dependency to every install
(Slicer's Python included) for them; the tests check them against scikit-learn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fdn_core.errors import DataError
from fdn_core.labels import ABNORMAL_DICE_GROUPS

__all__ = [
    "abnormal_dice",
    "dice",
    "dice_from_counts",
    "dice_matrix",
    "dice_per_class",
    "multiclass_dice",
    "overlap_counts",
    "ppv",
    "roc_auc",
]


def overlap_counts(pred: np.ndarray, ref: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """(3, C) int64 counts per class: intersection, predicted size, reference size (label maps, one shape)."""
    pred = np.asarray(pred)
    ref = np.asarray(ref)
    if pred.shape != ref.shape:
        raise DataError(f"Dice: label map shapes differ, prediction {pred.shape} vs reference {ref.shape}")
    out = np.zeros((3, len(classes)), dtype=np.int64)
    for i, c in enumerate(classes):
        p, r = pred == c, ref == c
        out[:, i] = (np.count_nonzero(p & r), np.count_nonzero(p), np.count_nonzero(r))
    return out


def dice_from_counts(counts: np.ndarray) -> np.ndarray:
    """Dice ``2|P&R| / (|P|+|R|)`` per column of ``overlap_counts`` (pooled or not); NaN if both empty."""
    counts = np.asarray(counts, dtype=np.float64)
    denom = counts[1] + counts[2]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2.0 * counts[0] / np.where(denom > 0, denom, 1.0), np.nan)


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two boolean masks; NaN when both are empty (undefined)."""
    counts = overlap_counts(np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool), (True,))
    return float(dice_from_counts(counts)[0])


def dice_per_class(a: np.ndarray, b: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """Dice of each class between label maps ``a`` and ``b``; NaN where the class is absent from both."""
    return dice_from_counts(overlap_counts(a, b, classes))


def multiclass_dice(a: np.ndarray, b: np.ndarray, classes: Sequence[int]) -> float:
    """Mean per-class Dice over the classes present in ``a`` or ``b``; 1.0 when neither holds any class."""
    per = dice_per_class(a, b, classes)
    present = ~np.isnan(per)
    return float(per[present].mean()) if present.any() else 1.0


def abnormal_dice(
    pred_labels: np.ndarray,
    ref_labels: np.ndarray,
    groups: Mapping[str, Sequence[int]] = ABNORMAL_DICE_GROUPS,
) -> dict[str, float]:
    """Dice of each abnormal region (NCR/NET, ED, ET and the whole tumour by default)."""
    return {
        name: dice(np.isin(pred_labels, values), np.isin(ref_labels, values))
        for name, values in groups.items()
    }


def dice_matrix(queries: np.ndarray, refs: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """``multiclass_dice`` of every query slice against every reference slice: (Nq,H,W) x (Nr,H,W) -> (Nq,Nr).

    Vectorised as one matrix product of class indicator masks per class (counts are exact in float32 up to
    2^24 pixels per slice); equal to ``multiclass_dice`` on each pair (tested).
    """
    q = np.asarray(queries)
    r = np.asarray(refs)
    if q.ndim != 3 or r.ndim != 3 or q.shape[1:] != r.shape[1:]:
        raise DataError(
            f"dice_matrix: expected (N,H,W) label stacks of equal slice size, got {q.shape} and {r.shape}"
        )
    nq, nr = q.shape[0], r.shape[0]
    qf = q.reshape(nq, -1)
    rf = r.reshape(nr, -1)
    total = np.zeros((nq, nr), dtype=np.float64)
    count = np.zeros((nq, nr), dtype=np.int64)
    for c in classes:
        qc = (qf == c).astype(np.float32)
        rc = (rf == c).astype(np.float32)
        sq = qc.sum(axis=1, dtype=np.float64)
        sr = rc.sum(axis=1, dtype=np.float64)
        denom = sq[:, None] + sr[None, :]
        present = denom > 0
        if not present.any():
            continue
        inter = (qc @ rc.T).astype(np.float64)
        total += np.where(present, 2.0 * inter / np.where(present, denom, 1.0), 0.0)
        count += present
    return np.where(count > 0, total / np.maximum(count, 1), 1.0)


def ppv(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Positive predictive value TP / (TP + FP); NaN if nothing is predicted positive."""
    y_true = np.asarray(y_true).astype(bool)
    y_pred = np.asarray(y_pred).astype(bool)
    predicted = int(y_pred.sum())
    if predicted == 0:
        return float("nan")
    return int(np.logical_and(y_true, y_pred).sum()) / predicted


def roc_auc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, tied scores count one half); NaN with one class only."""
    from scipy.stats import rankdata

    y_true = np.asarray(y_true).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(y_true.sum()), int((~y_true).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)  # average ranks for ties
    u = ranks[y_true].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))
