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


# ------------------------------------------------------------------------ ranking methods and baselines


def _context(depths: list[int], own: list[int | None], k: int = 2, query_depth: int = 10, slice_: int = 4):
    """A hand-made RankingContext: volumes with ``depths`` slices (every slice indexed), one query per
    ``own`` entry (its own volume, or None), each at axial ``slice_`` of a ``query_depth``-slice volume."""
    from fdn_core.evaluation.ranking import RankingContext

    starts = np.concatenate([[0], np.cumsum(depths)])
    row_volume = np.repeat(np.arange(len(depths)), depths)
    nq = len(own)
    return RankingContext(
        top=k,
        query_case_ids=[f"q{i}" for i in range(nq)],
        query_slice=[slice_] * nq,
        query_depth=[query_depth] * nq,
        query_codes=[(np.zeros((2, 2), np.uint16), np.zeros((2, 2), np.uint16))] * nq,
        own_volume=own,
        k=[min(k, len(depths) - (o is not None)) for o in own],
        case_names=[f"v{i}" for i in range(len(depths))],
        volume_starts=starts,
        volume_depth=np.asarray(depths),
        row_volume=row_volume,
        slice_indices=np.concatenate([np.arange(d) for d in depths]),
        scores={"tumour": np.zeros((nq, int(starts[-1])))},
    )


def test_random_baseline_is_seeded_reproducible_and_volume_wise() -> None:
    from fdn_core.evaluation.ranking import RandomSlices

    ctx = _context([10, 10, 10, 10, 10], own=[0, None, 3], k=3)
    method = RandomSlices(seed=5, draws=4)
    first = method.rank(ctx, None, 0)
    assert [r.tolist() for r in first] == [
        r.tolist() for r in RandomSlices(seed=5, draws=4).rank(ctx, None, 0)
    ]
    draws = [[r.tolist() for r in method.rank(ctx, None, d)] for d in range(4)]
    assert len({str(d) for d in draws}) > 1, "different draws give different rankings"
    assert [r.tolist() for r in RandomSlices(seed=6).rank(ctx, None, 0)] != [r.tolist() for r in first]
    for d in range(4):
        for q, rows in enumerate(method.rank(ctx, None, d)):
            vols = ctx.row_volume[rows]
            assert rows.size == 3 and len(set(vols.tolist())) == 3  # k distinct volumes, one slice each
            assert ctx.own_volume[q] not in vols.tolist()
    # Over many draws every candidate volume and many slice levels turn up (uniform, not fixed).
    many = np.concatenate([r for d in range(40) for r in RandomSlices(seed=1).rank(ctx, None, d)])
    assert len(set(ctx.slice_indices[many].tolist())) == 10
    with pytest.raises(Exception, match="draws"):
        RandomSlices(draws=0)


def test_level_prior_picks_the_same_axial_index_or_the_same_relative_position() -> None:
    from fdn_core.evaluation.ranking import LevelPrior

    same = _context([10, 10, 10, 10], own=[1, None], k=3, query_depth=10, slice_=4)
    method = LevelPrior(seed=0, draws=3)
    for d in range(3):
        for q, rows in enumerate(method.rank(same, None, d)):
            assert same.slice_indices[rows].tolist() == [4, 4, 4]
            assert same.own_volume[q] not in same.row_volume[rows].tolist()
    # Volumes of 19 slices (twice the query's 10 - 1 intervals): slice 4 of 10 -> 8 of 19; 5 slices -> 2.
    scaled = _context([19, 5, 10], own=[None], k=3, query_depth=10, slice_=4)
    rows = method.rank(scaled, None, 0)[0]
    got = dict(zip(scaled.row_volume[rows].tolist(), scaled.slice_indices[rows].tolist()))
    assert got == {0: 8, 1: 2, 2: 4}
    assert LevelPrior.target_index(0, 10, 19) == 0 and LevelPrior.target_index(9, 10, 19) == 18
    # Reproducible per seed, and the draw changes which volumes come first.
    again = LevelPrior(seed=0, draws=3).rank(scaled, None, 0)[0]
    assert again.tolist() == rows.tolist()


def test_pooled_pixels_ranks_an_identical_slice_first() -> None:
    from fdn_core.evaluation.ranking import PooledPixels

    rng = np.random.default_rng(0)
    ctx = _context([6, 6, 6], own=[None, 0], k=3, query_depth=6, slice_=2)
    volumes = [rng.normal(size=(6, 4, 16, 16)).astype(np.float32) for _ in range(3)]
    method = PooledPixels((8, 8))
    assert method.embed(volumes[0]).shape == (6, 4 * 8 * 8)
    # Pooling is an average over 2x2 blocks.
    np.testing.assert_allclose(method.embed(volumes[0])[0, 0], volumes[0][0, 0, :2, :2].mean(), rtol=1e-6)
    query_volume = volumes[1].copy()  # query 0 is slice 2 of a copy of volume 1 (not in the database)
    method.observe_query(0, query_volume, 2)
    method.observe_query(1, volumes[0], 2)  # query 1 is slice 2 of volume 0, its own volume
    for v, vol in enumerate(volumes):
        method.observe_reference(v, slice(6 * v, 6 * v + 6), vol)
    first, second = method.rank(ctx, None, 0)
    assert first[0] == 6 + 2  # the identical slice of volume 1 comes first
    assert len(first) == 3 and len(set(ctx.row_volume[first].tolist())) == 3
    assert 0 not in ctx.row_volume[second].tolist() and len(second) == 2  # own volume excluded


def test_oracle_method_matches_oracle_volume_wise() -> None:
    from fdn_core.evaluation.ranking import SIMILARITIES, Oracle

    ctx = _context([2, 2, 2], own=[0], k=2)
    ctx.scores["tumour"] = np.array([[1.0, 0.0, 2 / 3, 0.4, 0.0, 0.8]])
    abnormal = next(s for s in SIMILARITIES if s.key == "S_abnormal")
    assert Oracle().rank(ctx, abnormal, 0)[0].tolist() == [5, 2]


def _hand_evaluation():
    """A RetrievalEvaluation over 4 queries with known scores: one FDN distance, three baselines, oracle."""
    from fdn_core.evaluation.ranking import make_baselines
    from fdn_core.evaluation.retrieval_eval import MethodInfo, QueryInfo, RetrievalEvaluation

    cols = ["S_normal", "S_abnormal"]
    per_query = {
        "euclidean": {"S_normal": [0.8, 0.8, 0.8, 0.8], "S_abnormal": [0.2, 0.2, 0.1, 0.1]},
        "pooled_pixels": {"S_normal": [0.6, 0.6, 0.6, 0.6], "S_abnormal": [0.3, 0.3, 0.0, 0.0]},
        "oracle": {"S_normal": [1.0, 1.0, 1.0, 1.0], "S_abnormal": [0.4, 0.4, 0.4, 0.4]},
    }
    draws = {  # random: 2 draws of 4 queries
        "random": {"S_normal": np.array([[0.3] * 4, [0.5] * 4]), "S_abnormal": np.zeros((2, 4))},
        "level_prior": {"S_normal": np.array([[0.7] * 4, [0.7] * 4]), "S_abnormal": np.full((2, 4), 0.05)},
    }
    scores = {m: {c: np.asarray(v[c], float) for c in cols} for m, v in per_query.items()}
    scores.update({m: {c: v[c].mean(axis=0) for c in cols} for m, v in draws.items()})
    nan = {m: {c: np.full(4, np.nan) for c in cols} for m in scores}
    methods = {
        m.key: MethodInfo.of(m) for m in make_baselines(["random", "level_prior", "pooled_pixels"], (8, 8), 2)
    }
    return RetrievalEvaluation(
        queries=[QueryInfo(f"c{i}", 3, 10, True) for i in range(4)],
        top=10,
        k_effective=[10] * 4,
        scores=scores,
        ap=nan,
        precision=nan,
        retrieved={m: {c: [[("x", 1)]] * 4 for c in cols} for m in scores},
        search_seconds={m: 0.0 for m in scores},
        settings={
            "database": "db",
            "num_reference_volumes": 11,
            "num_reference_slices": 99,
            "model_fingerprint": "0" * 64,
            "image_size": 64,
            "num_queries": 4,
            "query_selection": "given",
        },
        notes=[],
        methods=methods,
        draw_scores=draws,
    )


def test_margins_and_the_one_table_report() -> None:
    from fdn_core.evaluation.retrieval_eval import margin_lines, markdown_report

    result = _hand_evaluation()
    summary = result.summary()
    assert summary["random"]["S_normal"]["mean_dice"] == pytest.approx(0.4)
    assert summary["random"]["S_normal"]["draws"] == 2
    assert summary["random"]["S_normal"]["ratio_draw_std"] == pytest.approx(0.1)
    assert summary["random"]["S_normal"]["ratio_draw_min"] == pytest.approx(0.3)
    assert "draws" not in summary["euclidean"]["S_normal"]
    margins = result.margins()
    # S_normal: FDN 0.8 vs the best baseline, level prior 0.7 -> +0.1, 8/7.
    assert margins["S_normal"]["best_baseline"] == "level_prior"
    assert margins["S_normal"]["difference"] == pytest.approx(0.1)
    assert margins["S_normal"]["ratio_of_ratios"] == pytest.approx(8 / 7)
    assert margins["S_normal"]["fdn_beats_baseline"] and margins["S_normal"]["queries_fdn_higher"] == 4
    # S_abnormal: FDN 0.15/0.4 vs pooled pixels 0.15/0.4: a tie is not a win; 2 queries each way.
    m = margins["S_abnormal"]
    assert m["best_baseline"] == "pooled_pixels" and m["difference"] == pytest.approx(0.0)
    assert not m["fdn_beats_baseline"]
    assert (m["queries_fdn_higher"], m["queries_fdn_lower"], m["queries_equal"]) == (2, 2, 0)
    lines = margin_lines(result)
    assert lines[0].startswith("S_normal: FDN beats the best trivial baseline") and "+0.100" in lines[0]
    assert lines[1].startswith("S_abnormal: FDN does NOT beat") and "1.00x" in lines[1]
    md = markdown_report(result)
    table = md.split("## Mean Dice")[1].split("\n\n")[1].splitlines()
    assert table[0] == "| Method | S_normal | S_abnormal |"
    labels = [row.split(" | ")[0].lstrip("| ") for row in table[2:]]
    assert labels[0] == "D_E" and labels[-1] == "Oracle (brutal search)"
    assert any(lab.startswith("Random") and "[2 draws]" in lab for lab in labels)
    assert any(lab.startswith("Level prior") for lab in labels) and any("Pooled" in lab for lab in labels)
    assert "0.400 ± 0.000 (0.40 ± 0.10)" in md  # random S_normal: mean over draws, spread over draws
    assert "FDN beats the best trivial baseline" in md and "does NOT beat" in md
    data = result.to_dict()
    assert data["margins"]["S_normal"]["best_fdn"] == "euclidean"
    assert (
        data["methods"]["level_prior"]["kind"] == "baseline" and data["methods"]["oracle"]["kind"] == "oracle"
    )
