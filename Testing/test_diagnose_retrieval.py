"""``bench/diagnose_retrieval.py`` on the tiny seeded phantom cohort with the tiny untrained bundle: every row
of the table (the code Dice rows with per-code profiles learned on a separate tiny training cohort), the
ground-truth rankings' bounds, the recomputed codes, the helpers, and clear errors."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
NAME = "phantom"  # the tiny cohort's folder name


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "diagnose_retrieval", ROOT / "bench" / "diagnose_retrieval.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["diagnose_retrieval"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script() -> ModuleType:
    return _script()


@pytest.fixture(scope="module")
def cohort(tiny_cohort: Path) -> Path:
    """The session's seeded 6-case phantom cohort (conftest)."""
    return tiny_cohort


def _argv(model: Path, cohort: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--cohort", str(cohort), "--out", str(out), "--top", "3", "--draws", "3",
            "--device", "cpu", "--no-progress", "--threads", "1", *extra]  # fmt: skip


def _main(script: ModuleType, argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = script.main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def train_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A separate 2-case tiny phantom cohort (another seed) to learn the code profiles on."""
    from fdn_core.data.phantom import generate_cohort

    out = tmp_path_factory.mktemp("train") / "train"
    generate_cohort(out, n_cases=2, seed=4321, shape=(64, 64, 40), workers=1)
    return out


@pytest.fixture(scope="module")
def diagnosed(
    script: ModuleType,
    tiny_bundle: Path,
    cohort: Path,
    train_cohort: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("diagnose")
    cache = out / "profiles.npz"
    extra = ("--train-data", str(train_cohort), "--profile-cache", str(cache))
    rc, stdout, stderr = _main(script, _argv(tiny_bundle, cohort, out, *extra))
    return {"rc": rc, "out": out, "stdout": stdout, "stderr": stderr, "cache": cache}


def test_table_has_every_ranking_and_the_ground_truth_bounds(diagnosed: dict[str, Any]) -> None:
    assert diagnosed["rc"] == 0, diagnosed["stderr"]
    out, text = diagnosed["out"], diagnosed["stdout"]
    report = json.loads((out / "diagnose_retrieval.json").read_text())
    entry = report["cohorts"][NAME]
    ratios = entry["ratios"]
    expected = {"euclidean", "angular", "hamming", "continuous_l2", "continuous_cosine", "model_seg_grid",
                "model_seg_grid_dice", "gt_grid", "gt_grid_dice", "gt_full", "random", "level_prior",
                "pooled_pixels", "oracle", "code_dice", "code_dice_modelseg", "code_dice_classmean",
                "gt_grid_pooled_dice", "code_dice_expected", "code_dice_expected_pos"}  # fmt: skip
    assert set(ratios) == expected
    md = (out / "diagnose_retrieval.md").read_text()
    for key in expected:
        row = f"| {entry['labels'][key]}"
        assert row in md and row in text, key
    assert "GT masks at code resolution (8x8 fractions, L2) [ground truth: a diagnostic" in md
    for col in ("S_normal", "S_abnormal", "S_sum", "S_sum_normalized"):
        assert ratios["oracle"][col] == pytest.approx(1.0)
        for key in expected:
            assert 0.0 <= ratios[key][col] <= 1.0 + 1e-9, (key, col)
    # Ground truth at the code grid knows where the tumour is: it beats picking slices at random.
    assert ratios["gt_grid"]["S_abnormal"] >= ratios["random"]["S_abnormal"]
    assert ratios["gt_grid"]["S_normal"] >= ratios["random"]["S_normal"]
    assert ratios["gt_grid_dice"]["S_abnormal"] >= ratios["random"]["S_abnormal"]
    # The FDN predicts no anatomy: its segmentation row ranks S_normal by the ground-truth anatomy.
    assert ratios["model_seg_grid"]["S_normal"] == pytest.approx(ratios["gt_grid"]["S_normal"])
    assert ratios["model_seg_grid_dice"]["S_normal"] == pytest.approx(ratios["gt_grid_dice"]["S_normal"])
    # The continuous features are the ones the database's codes were quantised from.
    assert entry["code_agreement"] == {"normal": 1.0, "abnormal": 1.0}
    assert any(line.startswith("quantisation, Euclidean") for line in entry["reading"])
    assert "chain S_abnormal: Oracle 1.000 -> GT 8x8 soft Dice" in md
    # The code Dice rows: labelled as codes + training-cohort profiles, with the anatomy caveat; the
    # label-free variant shares D_D's normal profile, so its S_normal ranking is D_D's.
    assert (
        "D_D code Dice (codes + per-code profiles learned on the training cohort"
        in entry["labels"]["code_dice"]
    )
    assert "BraTS does not" in entry["labels"]["code_dice"]
    assert "label-free" in entry["labels"]["code_dice_modelseg"]
    assert ratios["code_dice_modelseg"]["S_normal"] == pytest.approx(ratios["code_dice"]["S_normal"])
    assert "(= D_D)" in md
    assert sum(line.startswith("targets D_D code Dice") for line in entry["reading"]) == 3
    # The expected-overlap rows D_X: codes + tables learned on the training cohort, anatomy caveat, their
    # targets and steps in the reading, and how many cell pairs the table entries got.
    for key in ("code_dice_expected", "code_dice_expected_pos"):
        assert "expected-overlap tables learned on the training cohort" in entry["labels"][key]
    assert "BraTS does not" in entry["labels"]["code_dice_expected"]
    assert sum(line.startswith("targets D_X expected-overlap") for line in entry["reading"]) == 2
    assert any(line.startswith("expected overlap (D_X vs D_D per-class") for line in entry["reading"])
    pairs = entry["code_dice"]["tables"]["pairs"]
    assert set(pairs) == {"normal", "abnormal", "normal_position", "abnormal_position"}
    for st in pairs.values():
        assert st["median_pairs"] >= 0 and 0.0 <= st["never_observed"] <= 1.0
    assert "D_X tables (exact means over all pairs" in md and "-> D_X " in md
    assert any(line.startswith("per-code profiles (D_D on codes") for line in entry["reading"])
    prof = entry["code_dice"]["profiles"]
    assert prof["num_cases"] == 2 and prof["seed"] == 4321 and prof["num_slices"] == 80
    assert "code profiles learned on" in md and "D_D ranking" in md
    full = json.loads((out / f"eval_{NAME}" / "retrieval_eval.json").read_text())
    assert full["settings"]["leave_one_out"] and set(full["summary"]) == expected


def test_reuses_the_database_and_runs_without_code_dice(
    script: ModuleType, tiny_bundle: Path, cohort: Path, diagnosed: dict[str, Any]
) -> None:
    out = diagnosed["out"]
    db = ("--db", str(out / f"db_{NAME}"))
    rc, text, _ = _main(script, _argv(tiny_bundle, cohort, out, *db, "--seg-grids", "8", "64"))
    assert rc == 0 and f"reusing {out / f'db_{NAME}'}" in text
    assert "no --train-data" in text and "D_D code Dice" not in text
    ratios = json.loads((out / "diagnose_retrieval.json").read_text())["cohorts"][NAME]["ratios"]
    assert "code_dice" not in ratios and "gt_grid_dice" in ratios
    # the decoded segmentation at the code grid is the existing row; at 64 x 64 another ranking
    assert ratios["model_seg_8_dice"] == ratios["model_seg_grid_dice"]
    assert (
        "model_seg_64_dice" in ratios
        and "Model segmentation at 64x64 (fractions, soft Dice; the exact" in text
    )
    rc, _, err = _main(script, _argv(tiny_bundle, cohort, out, *db, "--seg-grids", "65"))
    assert rc == 2 and "--seg-grids 65" in err


def test_profile_cache_holds_the_learned_profiles(
    script: ModuleType, tiny_bundle: Path, train_cohort: Path, diagnosed: dict[str, Any]
) -> None:
    from fdn_core.model.bundle import load_bundle

    bundle = load_bundle(tiny_bundle, device="cpu")
    cached = script.learn_code_profiles(bundle, train_cohort, cache=diagnosed["cache"])
    assert cached.meta.get("cached") == str(diagnosed["cache"])
    k = int(bundle.config.num_codes)
    assert cached["normal"].shape == (k, 6) and cached["abnormal"].shape == (k, 3)
    # Every training cell carries one normal and one abnormal code; fractions lie in [0, 1].
    h, w = bundle.grid_shape
    assert cached["counts_normal"].sum() == cached["counts_abnormal"].sum() == 80 * h * w
    for name in ("normal", "abnormal", "abnormal_model"):
        assert cached[name].min() >= 0.0 and cached[name].max() <= 1.0 + 1e-12
        assert not cached[name][
            (cached["counts_normal" if name == "normal" else "counts_abnormal"] == 0)
        ].any()
    # The training cells are kept for D_X: their codes give the counts, their class pixel counts the means.
    assert cached.has_cells and cached["cells_normal"].shape == (80, h * w)
    levels = int(cached["cell_levels"])
    for t, lab in (("normal", "cells_anat"), ("abnormal", "cells_seg")):
        codes, pix = cached[f"cells_{t}"], cached[lab]
        assert np.bincount(codes.reshape(-1), minlength=k).tolist() == cached[f"counts_{t}"].tolist()
        assert pix.sum(axis=1).max() <= levels
        profile, _ = script.code_profiles(codes, pix / levels, k)
        assert profile == pytest.approx(cached[t])
    # A cache without the cells serves D_D but not D_X (it is relearned then).
    bare = script.CodeProfiles({n: cached[n] for n in script.CodeProfiles.ARRAYS}, cached.meta)
    path = diagnosed["out"] / "bare.npz"
    bare.save(path)
    assert script.CodeProfiles.load(path, {}) is not None
    assert script.CodeProfiles.load(path, {}, need_cells=True) is None


def test_bad_input_is_a_clear_error(
    script: ModuleType, tiny_bundle: Path, cohort: Path, train_cohort: Path, tmp_path: Path
) -> None:
    rc, _, err = _main(script, _argv(tiny_bundle, tmp_path / "nowhere", tmp_path / "o"))
    assert rc == 2 and "diagnose_retrieval: error:" in err and "no such folder" in err
    assert "Traceback" not in err
    # The training cohort is missing: a clear error, nothing evaluated.
    missing = ("--train-data", str(tmp_path / "no_train"))
    rc, _, err = _main(script, _argv(tiny_bundle, cohort, tmp_path / "o", *missing))
    assert rc == 2 and "--train-data" in err and "no such folder" in err and "Traceback" not in err
    # Profiles learned on the evaluated cohort itself would leak its labels into the ranking: refused.
    rc, _, err = _main(
        script, _argv(tiny_bundle, train_cohort, tmp_path / "o", "--train-data", str(train_cohort))
    )
    assert rc == 2 and "code profiles were learned on" in err


def test_helpers_on_hand_made_labels(script: ModuleType) -> None:
    a = np.zeros((4, 4), dtype=np.uint8)
    a[:2, :2] = 1  # 4 pixels of class 1 in the top-left cell
    b = np.zeros((2, 4, 4), dtype=np.uint8)
    b[0, :2, :2] = 2  # same place, other class: 4 pixels x 2 differing one-hot entries
    b[1, :2, :2] = 1  # identical
    assert script.label_l2(a, b) == pytest.approx([np.sqrt(8.0), 0.0])
    frac = script.class_fractions(np.stack([a, b[0]]), (1, 2), (2, 2))
    assert frac.shape == (2, 8)
    assert frac[0].tolist() == [1, 0, 0, 0, 0, 0, 0, 0] and frac[1].tolist() == [0, 0, 0, 0, 1, 0, 0, 0]


def test_soft_dice_at_full_resolution_is_the_protocol_dice(script: ModuleType) -> None:
    """On fractions at the labels' own resolution the soft Dice is the evaluation's multi-class Dice."""
    from fdn_core.evaluation.metrics import dice_matrix

    rng = np.random.default_rng(5)
    labels = rng.integers(0, 4, size=(6, 8, 8)).astype(np.uint8)
    labels[0] = 0  # an empty slice: Dice 1 with another empty one, 0 with any other
    labels[1] = 0
    frac = script.class_fractions(labels, (1, 2, 3), (8, 8))
    got = np.stack([script.soft_dice_distance(f, frac, 3) for f in frac])
    assert got == pytest.approx(1.0 - dice_matrix(labels, labels, (1, 2, 3)))
    assert got[0, 1] == 0.0 and got[0, 2] == 1.0


def test_code_profiles_are_the_mean_of_the_cells_that_carry_each_code(script: ModuleType) -> None:
    # Two grids of 3 cells, 2 classes; code 0 sits on three cells, code 2 on two, code 1 on one, code 3 never.
    codes = np.array([[0, 2, 0], [1, 0, 2]])
    frac = np.array([[[0.2, 0.5, 0.4], [0.0, 0.1, 0.6]], [[1.0, 0.3, 0.1], [0.0, 0.7, 0.2]]])  # (n, C, P)
    profile, counts = script.code_profiles(codes, frac, 4)
    assert counts.tolist() == [3, 1, 2, 0]
    assert profile[0] == pytest.approx([(0.2 + 0.4 + 0.3) / 3, (0.0 + 0.6 + 0.7) / 3])
    assert profile[1] == pytest.approx([1.0, 0.0])
    assert profile[2] == pytest.approx([(0.5 + 0.1) / 2, (0.1 + 0.2) / 2])
    assert profile[3].tolist() == [0.0, 0.0]


def test_code_dice_on_hand_made_profiles(script: ModuleType) -> None:
    rng = np.random.default_rng(3)
    # One code per distinct cell content: D_D is then the class-pooled soft Dice of the fractions themselves.
    profile = rng.uniform(0, 1, size=(10, 3))
    profile[0] = 0.0  # an empty code (e.g. background only)
    grids = rng.integers(1, 10, size=(5, 4))
    grids[4] = 0  # an empty grid
    d = script.code_dice_distance(grids, grids, profile)
    f = profile[grids]  # (n, P, C)
    for a in range(5):
        for b in range(5):
            total = f[a].sum() + f[b].sum()
            want = 0.0 if total == 0 else 1.0 - 2.0 * np.minimum(f[a], f[b]).sum() / total
            assert d[a, b] == pytest.approx(want)
    assert np.diag(d)[:4] == pytest.approx(0.0)  # a grid is at distance 0 from itself
    assert d[4, 4] == 0.0 and d[0, 4] == 1.0 and d[4, 0] == 1.0  # both empty: 0; one empty: 1
    assert (d >= -1e-12).all() and (d <= 1.0 + 1e-12).all() and d == pytest.approx(d.T)
    i, j = np.array([0, 1, 3, 4]), np.array([2, 1, 4, 4])
    assert script.code_dice_pairs(grids[i], grids[j], profile) == pytest.approx(d[i, j])
    # The same on the fractions themselves (class_fractions layout): the GT rows' class-pooled soft Dice,
    # and, per class, the per-class soft Dice of the diagnostic.
    frac = f.transpose(0, 2, 1).reshape(5, -1)
    pooled = np.stack([script.soft_dice_distance(x, frac, 3, pooled=True) for x in frac])
    assert pooled == pytest.approx(d)
    per_class = script.code_dice_distance(grids, grids, profile, per_class=True)
    assert per_class == pytest.approx(np.stack([script.soft_dice_distance(x, frac, 3) for x in frac]))
    assert script.code_dice_pairs(grids[i], grids[j], profile, per_class=True) == pytest.approx(
        per_class[i, j]
    )
    assert not np.allclose(per_class, d)  # the two weigh the classes differently
    with pytest.raises(Exception, match="code indices"):
        script.code_dice_distance(grids, grids + 5, profile)


def _brute_overlap(codes: np.ndarray, frac: np.ndarray, a: int, b: int) -> float | None:
    """Mean of min(f(x), f(y)) over the pairs of distinct cells x, y with codes a and b (None: no pair)."""
    pairs = [(x, y) for x in np.flatnonzero(codes == a) for y in np.flatnonzero(codes == b) if x != y]
    return float(np.mean([min(frac[x], frac[y]) for x, y in pairs])) if pairs else None


def test_expected_overlap_tables_on_hand_made_cells(script: ModuleType) -> None:
    rng = np.random.default_rng(7)
    levels, k = 4, 5
    codes = rng.integers(0, 3, 30)
    codes[0] = 3  # code 3 on one cell only: no pair of distinct cells for (3, 3); code 4 never seen
    counts = rng.integers(0, levels + 1, (30, 2))
    tables, means, pairs = script.overlap_tables(codes, counts, k, levels)
    frac = counts / levels
    for c in range(2):
        m = [frac[codes == a, c].mean() if (codes == a).any() else 0.0 for a in range(k)]
        assert means[:, c] == pytest.approx(m)
        for a in range(k):
            for b in range(k):
                want = _brute_overlap(codes, frac[:, c], a, b)
                assert tables[c, a, b] == pytest.approx(min(m[a], m[b]) if want is None else want)
    n = np.bincount(codes, minlength=k)
    assert pairs.tolist() == (np.outer(n, n) - np.diag(n)).tolist() and pairs[3, 3] == 0
    assert tables == pytest.approx(tables.transpose(0, 2, 1))
    assert (tables <= np.minimum(means.T[:, :, None], means.T[:, None, :]) + 1e-12).all()  # E[min] <= min E
    # D_X and its paired form against the formula; per position the same with one table per position.
    grids = rng.integers(0, k, (6, 3))
    d = script.expected_dice_distance(grids, grids, tables, means)
    for i in range(6):
        for j in range(6):
            vals = []
            for c in range(2):
                total = means[grids[i], c].sum() + means[grids[j], c].sum()
                if total > 0:
                    vals.append(1.0 - 2.0 * tables[c, grids[i], grids[j]].sum() / total)
            assert d[i, j] == pytest.approx(np.mean(vals) if vals else 0.0)
    ia, ib = np.array([0, 2, 5]), np.array([1, 2, 3])
    assert script.expected_dice_pairs(grids[ia], grids[ib], tables, means) == pytest.approx(d[ia, ib])
    pos_codes = rng.integers(0, k - 1, (20, 3))
    pos_counts = rng.integers(0, levels + 1, (20, 2, 3))
    shared = script.overlap_tables(pos_codes.reshape(-1), pos_counts.transpose(0, 2, 1).reshape(-1, 2), k, 4)
    tp, mp, pp = script.position_overlap_tables(pos_codes, pos_counts, k, levels, shared[:2])
    assert (
        pp[1].tolist() == script.overlap_tables(pos_codes[:, 1], pos_counts[:, :, 1], k, levels)[2].tolist()
    )
    for p in range(3):
        for a in range(k):
            want = _brute_overlap(pos_codes[:, p], pos_counts[:, 1, p] / levels, a, 2)
            assert tp[p, 1, a, 2] == pytest.approx(shared[0][1, a, 2] if want is None else want)
    dp = script.expected_dice_distance(grids, grids, tp, mp)
    assert script.expected_dice_pairs(grids[ia], grids[ib], tp, mp) == pytest.approx(dp[ia, ib])


def test_expected_dice_of_a_grid_with_itself(script: ModuleType) -> None:
    """One class, one code per grid: code 0's two cells are one empty, one full (mean 0.5, but they never
    overlap), code 1's are all half full (every pair overlaps by 0.5). D_D sees the same mean profile 0.5 for
    both and puts each grid at 0 from itself; D_X knows that two code-0 cells overlap by nothing in
    expectation, two code-1 cells fully."""
    codes = np.array([0, 0, 1, 1, 1])
    counts = np.array([[0], [4], [2], [2], [2]])
    tables, means, pairs = script.overlap_tables(codes, counts, 2, 4)
    assert means[:, 0] == pytest.approx([0.5, 0.5])
    assert tables[0] == pytest.approx(np.array([[0.0, 0.25], [0.25, 0.5]])) and pairs.tolist() == [
        [2, 6],
        [6, 6],
    ]
    grids = np.array([[0, 0, 0], [1, 1, 1]])
    d = script.expected_dice_distance(grids, grids, tables, means)
    assert d == pytest.approx(np.array([[1.0, 0.5], [0.5, 0.0]]))
    assert script.code_dice_distance(grids, grids, means, per_class=True) == pytest.approx(0.0)


def test_reading_compares_the_learned_distance(script: ModuleType) -> None:
    """With D_L in the table the reading sets it against the best of the paper's distances and, on
    S_abnormal, the model's own segmentation ranked by soft Dice (elsewhere the GT masks)."""
    values = {"euclidean": 0.5, "angular": 0.6, "hamming": 0.55, "learned": 0.7,
              "model_seg_grid_dice": 0.72, "gt_grid_dice": 0.8, "oracle": 1.0}  # fmt: skip
    summary = {m: {c: {"ratio_to_oracle": v} for c in script.COLUMNS} for m, v in values.items()}
    labels = {"euclidean": "D_E", "angular": "D_A", "hamming": "D_H", "learned": "D_L"}
    lines = [line for line in script.diagnosis_lines(summary, labels) if "learned distance" in line]
    assert len(lines) == len(script.COLUMNS)
    abnormal = next(line for line in lines if line.startswith("S_abnormal"))
    assert "D_L 0.700 (vs best paper distance D_A +0.100; vs the model's 8x8 segmentation" in abnormal
    assert abnormal.endswith("-0.020)")
    normal = next(line for line in lines if line.startswith("S_normal:"))
    assert "GT masks at 8x8 by soft Dice [GT] -0.100" in normal
    # without D_L there is no such line
    del summary["learned"]
    assert not any("learned distance" in line for line in script.diagnosis_lines(summary, labels))
