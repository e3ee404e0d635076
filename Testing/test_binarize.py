"""Hyperplane binarisation, exact shortening (paper Algorithm A.1), concordance and persistence."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from fdn_core.codes import binarize as bz
from fdn_core.codes.binarize import (
    BinaryCodes,
    binarize_codebook,
    fit_binary_codes,
    hamming_table,
    jaccard_concordance,
    pair_indices,
    round_small_vectors,
    shorten_bits,
)
from fdn_core.errors import ConfigError, DataError, IntegrityError
from fdn_core.progress import Cancelled, Progress

# ----------------------------------------------------------------------------------------------------
# reference: Algorithm A.1 written out literally (slow; tiny K only)


def _literal_nearest(codes: np.ndarray, scope: str, nearest: str) -> list[frozenset[int]]:
    """Per row i, the set of j (j > i for "upper", j != i for "full") at minimal Hamming distance."""
    n = codes.shape[0]
    dist = (codes[:, None, :] != codes[None, :, :]).sum(-1)
    out = []
    for i in range(n):
        js = [j for j in range(n) if (j > i if scope == "upper" else j != i)]
        if not js:
            out.append(frozenset())
            continue
        low = min(dist[i, j] for j in js)
        best = [j for j in js if dist[i, j] == low]
        out.append(frozenset(best) if nearest == "set" else frozenset(best[:1]))
    return out


def literal_shorten(bits: np.ndarray, scope: str = "upper", nearest: str = "set", rows=None) -> np.ndarray:
    """Try removing bit e = 1, 2, ...; after every removal start again from the first bit (the paper's
    recursive ``Optimize(b', E')``); stop when no bit can be removed without changing a neighbour set."""
    members = np.arange(bits.shape[0]) if rows is None else np.flatnonzero(rows)
    codes = bits[members].astype(np.int64)
    kept = list(range(bits.shape[1]))
    while True:
        base = _literal_nearest(codes[:, kept], scope, nearest)
        for pos in range(len(kept)):
            trial = kept[:pos] + kept[pos + 1 :]
            if _literal_nearest(codes[:, trial], scope, nearest) == base:
                kept = trial
                break
        else:
            return np.array(kept, dtype=np.int64)


def _codebook(seed: int, k: int, d: int, kind: str) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "grid":  # small integers: exact ties between distances, duplicates
        return rng.integers(-2, 3, size=(k, d)).astype(np.float64)
    cb = rng.normal(size=(k, d))
    if kind == "zeros":  # a third near zero (they round to identical zero vectors)
        cb[rng.choice(k, k // 3, replace=False)] *= 1e-7
    elif kind == "dups":
        cb[rng.choice(k, 3, replace=False)] = cb[0]
    return cb


# ----------------------------------------------------------------------------------------------------
# binarisation


def test_bits_are_hyperplane_signs() -> None:
    rng = np.random.default_rng(3)
    cb = rng.normal(size=(7, 3))
    bits = binarize_codebook(cb)
    pairs = pair_indices(7)
    assert bits.shape == (7, 21) and bits.dtype == bool
    assert np.array_equal(pairs, np.stack(np.triu_indices(7, 1), axis=1))
    checked = 0
    for p, (i, j) in enumerate(pairs):
        for k in range(7):
            h = (cb[i] - cb[j]) @ cb[k] - (cb[i] @ cb[i] - cb[j] @ cb[j]) / 2  # paper eq. 14
            if abs(h) > 1e-9:
                assert bits[k, p] == (h > 0), (i, j, k, h)
                checked += 1
    assert checked > 100
    # each vector lies on its own side of its own bisectors
    assert all(bits[i, p] and not bits[j, p] for p, (i, j) in enumerate(pairs))


def test_sign_of_zero_is_one_and_degenerate_pairs() -> None:
    # 1-D points 0, 1, 2: vector 1 lies exactly on the bisector of 0 and 2 -> sgn(0) = +1 -> True
    bits = binarize_codebook(np.array([[0.0], [1.0], [2.0]]))
    assert bits[1, 1]  # pair (0, 2) is bit 1
    # identical vectors: the bisector is degenerate (H == 0 everywhere) -> the bit is True for all
    bits = binarize_codebook(np.array([[1.0, 2.0], [1.0, 2.0], [3.0, 0.0]]))
    assert bits[:, 0].all()
    assert np.array_equal(bits[0], bits[1])


def test_small_vectors_are_rounded_to_zero() -> None:
    cb = np.array([[0.0, 0.0], [1e-7, 0.0], [0.0, -6e-6], [2e-5, 0.0], [1.0, 1.0], [-1.0, 2.0]])
    rounded = round_small_vectors(cb)
    assert np.array_equal(rounded[:3], np.zeros((3, 2)))
    assert np.array_equal(rounded[3:], cb[3:])
    bits = binarize_codebook(cb)
    assert np.array_equal(bits[0], bits[1]) and np.array_equal(bits[0], bits[2])
    assert not np.array_equal(bits[0], bits[3])
    # a larger tolerance rounds vector 3 as well
    assert np.array_equal(binarize_codebook(cb, zero_tol=1e-4)[3], bits[0])
    codes = fit_binary_codes(cb)
    assert codes.report.num_zero_vectors == 3 and codes.report.compactness == pytest.approx(0.5)
    assert codes.report.num_distinct_codes == 4


def test_hamming_table() -> None:
    bits = np.array([[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]], dtype=bool)
    table = hamming_table(bits)
    assert table.dtype == np.uint16
    assert np.array_equal(table, [[0, 1, 3], [1, 0, 2], [3, 2, 0]])
    rng = np.random.default_rng(0)
    big = rng.random((5, 20000)) < 0.5
    assert np.array_equal(hamming_table(big), (big[:, None] != big[None]).sum(-1))
    # the packed popcount table used inside the shortening agrees, for any width including 0 bits
    for width in (0, 1, 63, 64, 65, 1000):
        x = rng.random((9, width)) < 0.5
        assert np.array_equal(bz._hamming_packed(bz._pack_rows(x)), (x[:, None] != x[None]).sum(-1)), width


# ----------------------------------------------------------------------------------------------------
# shortening


CASES = [
    (seed, k, d, kind)
    for seed, (k, d, kind) in enumerate(
        [
            (6, 2, "normal"),
            (9, 1, "grid"),
            (10, 2, "zeros"),
            (12, 3, "dups"),
            (14, 2, "grid"),
            (16, 3, "normal"),
            (20, 2, "zeros"),
        ]
    )
]


@pytest.mark.parametrize("nearest", ["set", "first"])
@pytest.mark.parametrize("scope", ["upper", "full"])
def test_fast_shortening_equals_literal_algorithm(scope: str, nearest: str) -> None:
    for seed, k, d, kind in CASES:
        bits = binarize_codebook(_codebook(seed, k, d, kind))
        expected = literal_shorten(bits, scope, nearest)
        assert np.array_equal(shorten_bits(bits, scope=scope, nearest=nearest), expected), (seed, k, kind)
        # the internal batching parameters change the speed, never the result
        tiny = bz._shorten(bits, None, scope, nearest, None, max_horizon=1, pair_budget=1, max_run=1, chunk=1)
        odd = bz._shorten(bits, None, scope, nearest, None, max_horizon=3, pair_budget=5, max_run=3, chunk=2)
        assert np.array_equal(tiny[0], expected) and np.array_equal(odd[0], expected), (seed, k, kind)


def test_fast_shortening_equals_literal_with_used_rows() -> None:
    for seed in range(4):
        rng = np.random.default_rng(100 + seed)
        cb = _codebook(seed, 12, 2, "zeros")
        used = rng.random(12) < 0.7
        used[:2] = True
        bits = binarize_codebook(cb, used=used)
        for scope in ("upper", "full"):
            expected = literal_shorten(bits, scope, "set", rows=used)
            assert np.array_equal(shorten_bits(bits, scope=scope, rows=used), expected), (seed, scope)


@pytest.mark.parametrize("nearest", ["set", "first"])
def test_shortened_code_keeps_neighbours_and_is_a_fixed_point(nearest: str) -> None:
    cb = _codebook(7, 48, 6, "zeros")
    bits = binarize_codebook(cb)
    kept = shorten_bits(bits, nearest=nearest)
    before = hamming_table(bits).astype(np.int64)
    after = hamming_table(bits[:, kept]).astype(np.int64)
    assert bz._neighbours_preserved(before, after, "upper", nearest)
    assert 0 < kept.size < bits.shape[1] // 4
    # no single kept bit can be removed any more (the algorithm's stopping condition)
    for b in kept:
        x = bits[:, b]
        assert not bz._neighbours_preserved(before, after - (x[:, None] != x[None, :]), "upper", nearest), b
    # and the batching parameters do not matter at this size either
    small = bz._shorten(bits, None, "upper", nearest, None, max_horizon=2, pair_budget=16, max_run=3, chunk=7)
    assert np.array_equal(small[0], kept)


def test_set_semantics_keeps_bits_that_separate_tied_neighbours() -> None:
    # in the full code, vectors 2 and 3 are both nearest (tied) to vector 0: every bit that tells 2 from 3
    # would break that tie, so "set" (the paper) keeps them all; "first" only has to keep 2 ahead of 3.
    cb = np.array([[2.0, -1.0], [-2.0, 3.0], [-2.0, -1.0], [1.0, 2.0], [1.0, 3.0]])
    bits = binarize_codebook(cb)
    table = hamming_table(bits).astype(int)
    assert table[0, 2] == table[0, 3] == table[0, 1:].min()
    separating = np.flatnonzero(bits[2] != bits[3])
    kept_set = shorten_bits(bits, nearest="set")
    kept_first = shorten_bits(bits, nearest="first")
    assert set(separating.tolist()) <= set(kept_set.tolist())
    assert kept_first.size < kept_set.size
    codes = fit_binary_codes(cb, nearest="set")
    assert codes.report.tie_kept_bits == separating.size and codes.report.nearest_preserved


def test_two_vectors_need_no_bits() -> None:
    codes = fit_binary_codes(np.array([[0.0, 1.0], [1.0, 0.0]]))
    assert codes.report.bits_before == 1 and codes.num_bits == 0
    assert codes.bits.shape == (2, 0) and codes.kept_pairs.shape == (0, 2)
    assert np.array_equal(codes.hamming_table(), np.zeros((2, 2)))


# ----------------------------------------------------------------------------------------------------
# concordance


def test_concordance_on_hand_made_case() -> None:
    cb = np.array([[0.0], [1.0], [3.0], [7.0]])  # Euclidean neighbours: 0->1, 1->0, 3->1, 7->3
    bits = np.array([[0, 0, 0], [0, 0, 1], [0, 1, 1], [1, 1, 1]], dtype=bool)  # Hamming = |rank gap|
    # top-1: vector 1 ties 0 and 2 (goes to the lower index, 0), vector 2 ties 1 and 3 (-> 1): all agree
    # top-2: only vector 2 differs ({1, 3} vs Euclidean {1, 0}: Jaccard 1/3)
    result = jaccard_concordance(cb, bits, ks=(1, 2, 10))
    assert result[1] == pytest.approx(1.0)
    assert result[2] == pytest.approx((1 + 1 + 1 / 3 + 1) / 4)
    assert result[10] == pytest.approx(1.0)  # k is clipped to the 3 other vectors: everything agrees


def test_concordance_of_reversed_codes() -> None:
    cb = np.array([[0.0], [1.0], [3.0], [7.0]])
    # codes that put 0 and 3 together and 1 and 2 together: Hamming top-1 0->3, 1->2, 2->1, 3->0
    bits = np.array([[0, 0], [1, 1], [1, 1], [0, 0]], dtype=bool)
    assert jaccard_concordance(cb, bits, ks=(1,))[1] == pytest.approx(1 / 4)  # only vector 2 agrees (->1)
    used = np.array([True, True, True, False])
    # among 0, 1, 2: Euclidean 0->1, 1->0, 2->1; Hamming 0->1 (tie 1/2 -> 1), 1->2, 2->1
    assert jaccard_concordance(cb, bits, ks=(1,), used=used)[1] == pytest.approx(2 / 3)


# ----------------------------------------------------------------------------------------------------
# fit, report, used mask, progress


def test_fit_report_and_codes_are_consistent() -> None:
    cb = _codebook(11, 24, 4, "zeros")
    codes = fit_binary_codes(cb)
    r = codes.report
    full = binarize_codebook(cb)
    pairs = pair_indices(24)
    assert r.num_codes == 24 and r.num_used == 24 and r.code_dim == 4
    assert r.bits_before == 276 and r.bits_after == codes.num_bits
    assert r.compression_ratio == pytest.approx(codes.num_bits / 276)
    assert r.compactness == pytest.approx(8 / 24) and r.num_zero_vectors == 8
    assert r.num_distinct_codes == 17 and r.nearest_preserved
    assert r.scope == "upper" and r.nearest == "set"
    assert set(r.concordance) == {1, 5, 10} and all(0 <= v <= 1 for v in r.concordance.values())
    index = {tuple(p): n for n, p in enumerate(pairs.tolist())}
    cols = [index[tuple(p)] for p in codes.kept_pairs.tolist()]
    assert np.array_equal(codes.bits, full[:, cols])
    assert codes.matches(cb) and not codes.matches(cb + 1.0)
    assert "276 ->" in r.summary()
    assert r.concordance == jaccard_concordance(round_small_vectors(cb), codes.bits)


def test_used_mask_restricts_pairs_neighbours_and_scoring() -> None:
    cb = _codebook(5, 16, 3, "normal")
    used = np.zeros(16, dtype=bool)
    used[[0, 2, 3, 5, 8, 9, 12, 15]] = True
    codes = fit_binary_codes(cb, used=used)
    assert codes.report.bits_before == 28 and codes.report.num_used == 8
    assert codes.bits.shape[0] == 16  # every vector still gets a code
    assert used[codes.kept_pairs].all()
    members = np.flatnonzero(used)
    full = binarize_codebook(cb, used=used)
    assert bz._neighbours_preserved(
        hamming_table(full[members]).astype(np.int64),
        hamming_table(codes.bits[members]).astype(np.int64),
        "upper",
        "set",
    )
    assert codes.report.concordance == jaccard_concordance(cb, codes.bits, used=used)


def _planted_dead_codes(seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """K = 48: 24 used vectors on a plane (a low-rank codebook, like a trained one) and 24 dead ones as the
    EMA update leaves them: 8 huge (norm 1e3..3e5), 8 decayed (1e-3..1e-1), 8 below the 1e-5 "zero"
    threshold; with training counts (dead: 0), shuffled."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(8, 2)))[0].T
    used = rng.uniform(-3, 3, size=(24, 2)) @ basis
    dirs = rng.normal(size=(24, 8))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    norms = np.concatenate(
        [10 ** rng.uniform(3, 5.5, 8), 10 ** rng.uniform(-3, -1, 8), 10 ** rng.uniform(-8, -6, 8)]
    )
    perm = rng.permutation(48)
    cb = np.concatenate([used, dirs * norms[:, None]])[perm]
    counts = np.concatenate([rng.integers(5, 500, 24), np.zeros(24, np.int64)])[perm]
    return cb, counts


def test_dead_codes_are_excluded_bits_shrink_and_concordance_is_given_both_ways(tmp_path) -> None:
    cb, counts = _planted_dead_codes()
    paper = fit_binary_codes(cb).report  # every vector, as the paper does
    codes = fit_binary_codes(cb, usage_counts=counts)
    r = codes.report
    used = counts > 0
    assert np.array_equal(codes.used, used) and r.num_used == 24 and r.bits_before == 276
    assert used[codes.kept_pairs].all()  # only pairs of used codes give bits
    assert r.bits_after < paper.bits_after / 2  # dead codes' bits are gone
    assert r.bits_share_of_pairs == pytest.approx(r.bits_after / (48 * 47 / 2))
    assert r.compactness == pytest.approx(8 / 48)  # the paper's compactness counts only the tiny ones
    # Over the used codes the neighbours are kept far better once the dead codes stop claiming bits;
    # over all K (the paper's definition) the dead codes' neighbours are not preserved any more.
    assert r.concordance_used[10] >= 0.75
    assert (
        r.concordance_used[5] > paper.concordance_used[5]
        and r.concordance_used[10] > paper.concordance_used[10]
    )
    assert set(r.concordance_paper) == {1, 5, 10} and r.concordance_paper[10] < r.concordance_used[10]
    assert r.concordance_used == jaccard_concordance(round_small_vectors(cb), codes.bits, used=used)
    assert r.concordance_paper == jaccard_concordance(round_small_vectors(cb), codes.bits)
    assert paper.concordance_paper == paper.concordance  # without a mask the fitted set is all K
    assert "24 of 48 codes used" in r.summary() and "used only" in r.summary()
    # The report keeps the new fields through save/load; reports saved before them still load.
    codes.save(tmp_path, name="abnormal")
    assert BinaryCodes.load(tmp_path, name="abnormal").report == r
    meta = json.loads((tmp_path / "abnormal.json").read_text())
    for key in ("concordance_paper", "concordance_used"):
        del meta["report"][key]
    (tmp_path / "abnormal.json").write_text(json.dumps(meta))
    assert BinaryCodes.load(tmp_path, name="abnormal").report.concordance_used == {}
    # Usage helpers: the mask, or None when fewer than two codes were used.
    assert np.array_equal(bz.used_codes(counts), used)
    assert bz.used_codes(np.array([0, 3, 0])) is None
    with pytest.raises(ConfigError, match="not both"):
        fit_binary_codes(cb, used=used, usage_counts=counts)
    with pytest.raises(DataError, match="usage_counts"):
        fit_binary_codes(cb, usage_counts=counts[:5])


def test_progress_and_cancel() -> None:
    cb = _codebook(2, 20, 3, "normal")
    seen: list[tuple[int, int, str]] = []
    fit_binary_codes(cb, progress=Progress(callback=lambda d, t, m: seen.append((d, t, m))))
    assert any("shortening" in m and d == t for d, t, m in seen)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        fit_binary_codes(cb, progress=Progress(cancel=cancel))


# ----------------------------------------------------------------------------------------------------
# persistence


def test_save_load_round_trip(tmp_path) -> None:
    cb = _codebook(4, 18, 3, "zeros")
    used = np.ones(18, dtype=bool)
    used[[3, 7]] = False
    codes = fit_binary_codes(cb, used=used, scope="full")
    json_path = codes.save(tmp_path / "db", name="normal_codes")
    assert json_path.name == "normal_codes.json"
    loaded = BinaryCodes.load(tmp_path / "db", name="normal_codes")
    assert np.array_equal(loaded.bits, codes.bits) and loaded.bits.dtype == bool
    assert np.array_equal(loaded.kept_pairs, codes.kept_pairs)
    assert np.array_equal(loaded.used, used)
    assert loaded.report == codes.report
    assert loaded.matches(cb)
    # no pickle anywhere: both arrays load with allow_pickle=False
    np.load(tmp_path / "db" / "normal_codes.bits.npy", allow_pickle=False)
    # an unused-mask-free fit round-trips too
    plain = fit_binary_codes(cb)
    plain.save(tmp_path / "db", name="plain")
    assert BinaryCodes.load(tmp_path / "db", name="plain").used is None


def test_load_rejects_missing_tampered_and_malformed_files(tmp_path) -> None:
    codes = fit_binary_codes(_codebook(4, 10, 2, "normal"))
    codes.save(tmp_path)
    with pytest.raises(DataError, match="not found"):
        BinaryCodes.load(tmp_path, name="other")
    bits_file = tmp_path / "binary_codes.bits.npy"
    original = bits_file.read_bytes()
    bits_file.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(IntegrityError, match="does not match"):
        BinaryCodes.load(tmp_path)
    bits_file.write_bytes(original)
    meta_path = tmp_path / "binary_codes.json"
    meta = json.loads(meta_path.read_text())
    meta["report"]["surprise"] = 1
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DataError, match="unknown keys"):
        BinaryCodes.load(tmp_path)
    meta_path.write_text("{ not json")
    with pytest.raises(DataError, match="unreadable"):
        BinaryCodes.load(tmp_path)
    with pytest.raises(ConfigError):
        codes.save(tmp_path, name="../escape")


# ----------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    ("codebook", "message"),
    [
        (np.zeros(5), "2-D"),
        (np.zeros((2, 3, 4)), "2-D"),
        (np.zeros((1, 4)), "at least 2"),
        (np.array([[0.0, np.nan], [1.0, 1.0]]), "NaN"),
        (np.array([[0.0, np.inf], [1.0, 1.0]]), "NaN or infinite"),
        (np.array([["a", "b"], ["c", "d"]]), "numeric"),
        (np.zeros((3, 0)), "dimension 0"),
    ],
)
def test_bad_codebooks_are_rejected(codebook: np.ndarray, message: str) -> None:
    with pytest.raises(DataError, match=message):
        fit_binary_codes(codebook)
    with pytest.raises(DataError, match=message):
        binarize_codebook(codebook)


def test_bad_arguments_are_rejected() -> None:
    cb = _codebook(1, 6, 2, "normal")
    with pytest.raises(ConfigError, match="zero_tol"):
        fit_binary_codes(cb, zero_tol=-1.0)
    with pytest.raises(ConfigError, match="scope"):
        fit_binary_codes(cb, scope="lower")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="nearest"):
        fit_binary_codes(cb, nearest="any")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="ks"):
        fit_binary_codes(cb, ks=(0,))
    with pytest.raises(DataError, match="shape"):
        fit_binary_codes(cb, used=np.ones(5, dtype=bool))
    with pytest.raises(DataError, match="at least 2"):
        fit_binary_codes(cb, used=np.eye(6, dtype=bool)[0])
    with pytest.raises(DataError, match="boolean"):
        fit_binary_codes(cb, used=np.ones(6))
    with pytest.raises(DataError, match="shape"):
        hamming_table(np.zeros(4, dtype=bool))
    with pytest.raises(DataError, match="only 0 and 1"):
        shorten_bits(np.full((3, 3), 2))
    with pytest.raises(DataError, match="codes but the codebook has"):
        jaccard_concordance(cb, np.zeros((5, 3), dtype=bool))
    with pytest.raises(DataError, match="kept_pairs"):
        BinaryCodes(bits=np.zeros((3, 1), dtype=bool), kept_pairs=np.array([[2, 1]]), report=None)  # type: ignore[arg-type]
