"""The ranking metrics on hand-made cases, each under its exact name: P@k, AP@k (normalised by min(k, R)),
mP@1..k (the mean of P@1..P@k, what seed 003 calls "MAP"), and the relevance definitions (same lesion-class
set, same level, both)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fdn_core.evaluation.retrieval_eval import (
    RELEVANCES,
    average_precision_at_k,
    class_set_codes,
    mean_precision_1_to_k,
    precision_at_k,
    relevance_matrices,
)


def test_mean_precision_1_to_k_is_not_average_precision() -> None:
    rel = [True, False, True, False, False]
    # P@1..5 = 1, 1/2, 2/3, 2/4, 2/5
    assert mean_precision_1_to_k(rel, 5) == pytest.approx((1 + 0.5 + 2 / 3 + 0.5 + 0.4) / 5)
    # AP@5 with R = 2 relevant candidates: (P@1 + P@3) / 2
    assert average_precision_at_k(rel, 5, 2) == pytest.approx((1 + 2 / 3) / 2)
    assert precision_at_k(rel, 5) == pytest.approx(0.4)
    # seed 003's code averaged P@1..4 and called it "MAP@5": our mP@1..5 differs from that
    seed003_code = float(np.mean([precision_at_k(rel, i) for i in range(1, 5)]))
    assert mean_precision_1_to_k(rel, 5) != pytest.approx(seed003_code)
    assert mean_precision_1_to_k(rel, 4) == pytest.approx(seed003_code)


def test_mean_precision_short_lists_and_edges() -> None:
    assert mean_precision_1_to_k([True], 3) == pytest.approx(
        (1 + 1 / 2 + 1 / 3) / 3
    )  # missing = not relevant
    assert mean_precision_1_to_k([], 2) == 0.0
    assert mean_precision_1_to_k([True, True], 2) == 1.0
    assert math.isnan(average_precision_at_k([False, False], 2, 0))


def test_class_set_codes_and_relevance_matrices() -> None:
    seg = np.zeros((4, 3, 3), dtype=np.uint8)
    seg[1, 0, 0] = 2  # ED only
    seg[2, 0, 0], seg[2, 1, 1] = 2, 3  # ED + ET
    seg[3, 0, 0], seg[3, 1, 1], seg[3, 2, 2] = 1, 2, 3  # all three
    assert class_set_codes(seg).tolist() == [0, 2, 6, 7]
    q_class = np.array([6, 2])
    q_level = np.array([0.5, 0.2])
    r_class = np.array([0, 2, 6, 7, 6])
    r_level = np.array([0.5, 0.2, 0.54, 0.5, 0.9])
    rel = relevance_matrices(q_class, q_level, r_class, r_level, 0.05)
    assert set(rel) == set(RELEVANCES)
    assert rel["lesion"].tolist() == [[False, True, True, True, True]] * 2
    assert rel["lesion_classes"].tolist() == [
        [False, False, True, False, True],
        [False, True, False, False, False],
    ]
    assert rel["level"].tolist() == [[True, False, True, True, False], [False, True, False, False, False]]
    assert rel["classes_and_level"].tolist() == [
        [False, False, True, False, False],
        [False, True, False, False, False],
    ]
