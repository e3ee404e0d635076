"""Search engine: table-lookup scan == brute force on de-quantised latents, for every distance and mode, with
and without axial context and the lesion filter."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fdn_core.codes.search import Hit, Query, SearchEngine
from fdn_core.codes.tables import dot_table, hamming_table, squared_euclidean_table
from fdn_core.errors import ConfigError, DataError
from fdn_core.labels import DISTANCES, MODES

K, D, GRID, B = 24, 6, (3, 4), 19
P = GRID[0] * GRID[1]


def brute_force_distances(
    q_normal: np.ndarray | None,
    q_abnormal: np.ndarray | None,
    db_normal: np.ndarray,
    db_abnormal: np.ndarray,
    books: tuple[np.ndarray, np.ndarray],
    bits: tuple[np.ndarray, np.ndarray],
    distance: str,
    mode: str,
    scales: tuple[float, float] = (1.0, 1.0),
    learned: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Reference: de-quantise each grid into its flattened latent (float64) and compare whole vectors
    (the learned distance: the cosine of the grids embedded with ``learned`` instead of the codebooks)."""
    if distance == "learned":
        assert learned is not None
        books, distance = learned, "angular"

    def term(q: np.ndarray, db: np.ndarray, book: np.ndarray, bit: np.ndarray) -> np.ndarray:
        if distance == "hamming":
            zq = bit[q].reshape(-1).astype(np.float64)
            z = bit[db].reshape(len(db), -1).astype(np.float64)
            return np.abs(z - zq).sum(axis=1)
        zq = book.astype(np.float64)[q].reshape(-1)
        z = book.astype(np.float64)[db].reshape(len(db), -1)
        if distance == "euclidean":
            return np.sqrt(((z - zq) ** 2).sum(axis=1))
        denom = np.linalg.norm(z, axis=1) * np.linalg.norm(zq)
        cos = np.divide(z @ zq, denom, out=np.zeros(len(db)), where=denom > 0)
        return 1.0 - cos

    dn = term(q_normal, db_normal, books[0], bits[0]) if mode != "abnormal" else 0.0
    da = term(q_abnormal, db_abnormal, books[1], bits[1]) if mode != "normal" else 0.0
    if mode == "sum_normalized":
        return dn / scales[0] + da / scales[1]
    return dn + da


def brute_force_ranking(
    d: np.ndarray, case_ids: np.ndarray, exclude: set[str], per: str, eligible: np.ndarray | None = None
) -> list[int]:
    """Rows ranked by distance (ties by row): every eligible slice, or each volume's best eligible slice
    (``eligible``: rows the lesion filter keeps; default all)."""
    rows = [
        r
        for r in np.argsort(d, kind="stable")
        if case_ids[r] not in exclude and (eligible is None or eligible[r])
    ]
    if per == "slice":
        return rows
    seen: set[str] = set()
    best = []
    for r in rows:
        if case_ids[r] not in seen:
            seen.add(case_ids[r])
            best.append(int(r))
    return best


def assert_same_ranking(hits: list[Hit], d: np.ndarray, expected: list[int], top: int) -> None:
    """Same distances in the same order as the brute force; same rows except inside float ties."""
    assert [h.rank for h in hits] == list(range(1, len(hits) + 1))
    assert len(hits) == min(top, len(expected))
    got = np.array([h.distance for h in hits])
    np.testing.assert_allclose(got, d[expected[: len(hits)]], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(got, d[[h.row for h in hits]], rtol=1e-9, atol=1e-9)
    for i, h in enumerate(hits):
        if h.row != expected[i]:  # only allowed if the brute force ties these two within rounding
            assert abs(d[h.row] - d[expected[i]]) < 1e-5 * max(1.0, abs(d[h.row]))


@pytest.fixture(scope="module")
def setup() -> dict:
    rng = np.random.default_rng(7)
    books = []
    for _ in range(2):
        book = rng.normal(size=(K, D)).astype(np.float32)
        book[[3, 11]] = 0.0  # "unused" codes: zero vectors, as a trained codebook has
        books.append(book)
    sizes = [9, 4, 12, 7, 1, 10, 6]
    case_ids = np.repeat([f"case{i:02d}" for i in range(len(sizes))], sizes)
    n = len(case_ids)
    normal = rng.integers(0, K, (n, P)).astype(np.uint16)
    abnormal = rng.integers(0, K, (n, P)).astype(np.uint16)
    normal[5] = 3  # an all-zero latent: angular distance to it is 1 by convention
    abnormal[20] = abnormal[21]  # exact duplicates: ties broken by row
    normal[20] = normal[21]
    slice_indices = np.concatenate([np.arange(s) + 2 for s in sizes]).astype(np.int32)
    bits = (rng.random((K, B)) < 0.5, rng.random((K, B)) < 0.5)
    learned = tuple(rng.normal(size=(K, 5)) for _ in range(2))
    learned[0][3] = 0.0  # row 5's normal grid embeds to zero: cosine taken as 0, as for D_A
    # lesion flags: case01 (rows 9-12) flagged throughout, case04 (row 32) not at all, the rest mixed
    has_abnormal = np.random.default_rng(11).random(n) < 0.4
    has_abnormal[9:13], has_abnormal[32] = True, False
    engine = SearchEngine(
        normal_codes=normal,
        abnormal_codes=abnormal,
        case_ids=case_ids,
        slice_indices=slice_indices,
        has_abnormal=has_abnormal,
        codebook_normal=books[0],
        codebook_abnormal=books[1],
        grid_shape=GRID,
        hamming_bits=bits,
        learned_embeddings=learned,
        normalization_pairs=512,
    )
    return {
        "engine": engine,
        "books": tuple(books),
        "bits": bits,
        "learned": learned,
        "normal": normal,
        "abnormal": abnormal,
        "case_ids": case_ids,
        "slice_indices": slice_indices,
        "has_abnormal": has_abnormal,
        "rng": rng,
    }


def _brute(s: dict, qn, qa, distance: str, mode: str) -> np.ndarray:
    eng: SearchEngine = s["engine"]
    scales = (
        (eng.scale(distance, "normal"), eng.scale(distance, "abnormal"))
        if mode == "sum_normalized"
        else (1, 1)
    )
    return brute_force_distances(
        qn, qa, s["normal"], s["abnormal"], s["books"], s["bits"], distance, mode, scales, s["learned"]
    )


@pytest.mark.parametrize(("distance", "mode"), list(itertools.product(DISTANCES, MODES)))
def test_distances_match_brute_force(setup: dict, distance: str, mode: str) -> None:
    eng: SearchEngine = setup["engine"]
    rng = np.random.default_rng(1)
    for _ in range(3):
        qn = rng.integers(0, K, GRID)
        qa = rng.integers(0, K, P)
        got = eng.distances(Query(normal=qn, abnormal=qa), distance=distance, mode=mode)
        want = _brute(setup, qn.reshape(-1), qa, distance, mode)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize(
    ("distance", "mode", "per"), list(itertools.product(DISTANCES, MODES, ("slice", "volume")))
)
def test_search_matches_brute_force(setup: dict, distance: str, mode: str, per: str) -> None:
    eng: SearchEngine = setup["engine"]
    ids = setup["case_ids"]
    for row in (0, 5, 21, 40):
        query = eng.query_from_rows(row)
        qn, qa = setup["normal"][row], setup["abnormal"][row]
        d = _brute(setup, qn, qa, distance, mode)
        expected = brute_force_ranking(d, ids, {ids[row]}, per)
        for top in (1, 4, 100):
            hits = eng.search(query, distance=distance, mode=mode, top=top, per=per)
            assert_same_ranking(hits, d, expected, top)
            assert all(h.case_id != ids[row] for h in hits)
            for h in hits:
                assert h.case_id == ids[h.row] and h.slice_index == setup["slice_indices"][h.row]


@pytest.mark.parametrize("distance", DISTANCES)
def test_composite_query(setup: dict, distance: str) -> None:
    """Normal code of one slice with the abnormal code of another, both volumes excluded."""
    eng: SearchEngine = setup["engine"]
    ids = setup["case_ids"]
    a, b = 2, 30
    query = eng.query_from_rows(a, b)
    assert query.exclude_cases == (ids[a], ids[b])
    np.testing.assert_array_equal(query.normal, setup["normal"][a])
    np.testing.assert_array_equal(query.abnormal, setup["abnormal"][b])
    for mode in ("sum", "sum_normalized"):
        d = _brute(setup, setup["normal"][a], setup["abnormal"][b], distance, mode)
        for per in ("slice", "volume"):
            hits = eng.search(query, distance=distance, mode=mode, top=5, per=per)
            assert_same_ranking(hits, d, brute_force_ranking(d, ids, {ids[a], ids[b]}, per), 5)
            assert {h.case_id for h in hits}.isdisjoint({ids[a], ids[b]})


def test_own_volume_and_given_cases_excluded(setup: dict) -> None:
    eng: SearchEngine = setup["engine"]
    ids = setup["case_ids"]
    n = len(ids)
    query = eng.query_from_rows(0)
    hits = eng.search(query, per="slice", top=n)
    assert len(hits) == n - int((ids == ids[0]).sum())
    vols = eng.search(query, per="volume", top=100)
    assert sorted(h.case_id for h in vols) == sorted(set(ids) - {ids[0]})
    extra = Query(normal=query.normal, abnormal=query.abnormal, exclude_cases=(ids[0], "case03", "not-in-db"))
    vols = eng.search(extra, per="volume", top=100)
    assert {h.case_id for h in vols} == set(ids) - {ids[0], "case03"}
    # An external query (no exclusion) finds the slice itself first, at distance 0.
    own = eng.search(Query(normal=query.normal, abnormal=query.abnormal), per="slice", top=1)
    assert own[0].row == 0 and own[0].distance == pytest.approx(0.0, abs=1e-9)


def test_ties_and_zero_latents(setup: dict) -> None:
    eng: SearchEngine = setup["engine"]
    # Rows 20 and 21 are identical: an external query equal to them ranks 20 before 21.
    query = Query(normal=setup["normal"][21], abnormal=setup["abnormal"][21])
    for distance in DISTANCES:
        hits = eng.search(query, distance=distance, per="slice", top=2)
        assert [h.row for h in hits] == [20, 21]
        assert hits[0].distance == hits[1].distance
        assert [h.row for h in eng.search(query, distance=distance, per="slice", top=1)] == [20]
    # Row 5's normal latent is all zeros: cosine undefined, angular distance taken as 1.
    d = eng.distances(Query(normal=setup["normal"][0]), distance="angular", mode="normal")
    assert d[5] == pytest.approx(1.0)
    hit = eng.search(Query(normal=setup["normal"][5]), distance="angular", mode="normal", per="slice", top=1)
    assert hit[0].distance == pytest.approx(1.0)


def test_batched_equals_single(setup: dict) -> None:
    eng: SearchEngine = setup["engine"]
    queries = [eng.query_from_rows(r, (r * 7) % len(eng)) for r in range(0, 50, 3)]
    for distance, mode in (("euclidean", "sum"), ("angular", "normal"), ("hamming", "sum_normalized")):
        many = eng.search_many(queries, distance=distance, mode=mode, top=6, per="volume", block=4)
        assert many == [eng.search(q, distance=distance, mode=mode, top=6, per="volume") for q in queries]


def test_normalisation_scale_is_median_of_pairs(setup: dict) -> None:
    eng: SearchEngine = setup["engine"]
    normal = setup["normal"]
    for distance in DISTANCES:
        scale = eng.scale(distance, "normal")
        all_pairs = np.concatenate(
            [
                brute_force_distances(
                    normal[i],
                    None,
                    normal[i + 1 :],
                    normal[i + 1 :],
                    setup["books"],
                    setup["bits"],
                    distance,
                    "normal",
                    learned=setup["learned"],
                )
                for i in range(len(normal) - 1)
            ]
        )
        assert np.quantile(all_pairs, 0.4) <= scale <= np.quantile(all_pairs, 0.6)
        assert eng.scale(distance, "normal") == scale  # cached


def test_tables_and_hamming_inputs(setup: dict) -> None:
    rng = np.random.default_rng(3)
    book = rng.normal(size=(10, 5))
    np.testing.assert_allclose(squared_euclidean_table(book), ((book[:, None] - book[None]) ** 2).sum(-1))
    np.testing.assert_allclose(dot_table(book), book @ book.T)
    bits = rng.random((10, 70001)) < 0.5
    want = (bits[:, None, :] != bits[None, :, :]).sum(-1)
    table = hamming_table(bits)
    assert table.dtype == np.uint32 and np.array_equal(table, want)
    small = bits[:, :33]
    t16 = hamming_table(small)
    assert t16.dtype == np.uint16
    assert np.array_equal(
        t16, hamming_table(np.where(small, 1, -1).astype(np.int8))
    )  # paper's sgn convention
    assert np.array_equal(t16, hamming_table(small.astype(np.uint8)))
    with pytest.raises(DataError, match="bits must be"):
        hamming_table(np.full((4, 3), 2))
    with pytest.raises(DataError, match=r"\(K, B\)"):
        hamming_table(np.zeros(5, bool))
    # Giving ready tables is the same as giving the bits.
    kw = {
        "normal_codes": setup["normal"],
        "abnormal_codes": setup["abnormal"],
        "case_ids": setup["case_ids"],
        "slice_indices": setup["slice_indices"],
        "codebook_normal": setup["books"][0],
        "codebook_abnormal": setup["books"][1],
        "grid_shape": GRID,
    }
    tables = SearchEngine(**kw, hamming_tables=tuple(hamming_table(b) for b in setup["bits"]))
    q = setup["engine"].query_from_rows(9)
    assert tables.search(q, distance="hamming") == setup["engine"].search(q, distance="hamming")
    no_bits = SearchEngine(**kw)
    assert not no_bits.has_hamming
    with pytest.raises(ConfigError, match="hamming_bits"):
        no_bits.search(q, distance="hamming")
    with pytest.raises(ConfigError, match="not both"):
        SearchEngine(**kw, hamming_bits=setup["bits"], hamming_tables=(t16, t16))
    bad = hamming_table(setup["bits"][0]).astype(np.int64)
    bad[0, 1] += 1
    with pytest.raises(DataError, match="symmetric"):
        SearchEngine(**kw, hamming_tables=(bad, bad))


def test_bad_inputs(setup: dict) -> None:
    eng: SearchEngine = setup["engine"]
    q = eng.query_from_rows(0)
    with pytest.raises(ConfigError, match="unknown distance"):
        eng.search(q, distance="cosine")
    with pytest.raises(ConfigError, match="unknown search mode"):
        eng.search(q, mode="both")
    with pytest.raises(ConfigError, match="per must be"):
        eng.search(q, per="case")
    with pytest.raises(ConfigError, match="top must be"):
        eng.search(q, top=0)
    with pytest.raises(DataError, match="abnormal codes"):
        eng.search(Query(normal=q.normal), mode="sum")
    with pytest.raises(DataError, match="shape"):
        eng.search(Query(normal=np.zeros((4, 3), int)), mode="normal")
    with pytest.raises(DataError, match=r"\[0, 24\)"):
        eng.search(Query(normal=np.full(P, K)), mode="normal")
    with pytest.raises(DataError, match="integer"):
        eng.search(Query(normal=np.zeros(P)), mode="normal")
    with pytest.raises(DataError, match="not one string"):
        eng.search(Query(normal=q.normal, abnormal=q.abnormal, exclude_cases="case00"))
    with pytest.raises(DataError, match="not in the database"):
        eng.query_from_rows(10_000)
    assert eng.row_of("case02", 2 + 3) == 9 + 4 + 3
    with pytest.raises(DataError, match="no slice 99"):
        eng.row_of("case02", 99)
    kw = {
        "normal_codes": setup["normal"],
        "abnormal_codes": setup["abnormal"],
        "case_ids": setup["case_ids"],
        "slice_indices": setup["slice_indices"],
        "codebook_normal": setup["books"][0],
        "codebook_abnormal": setup["books"][1],
        "grid_shape": GRID,
    }
    shuffled = setup["case_ids"].copy()
    shuffled[[0, 15]] = shuffled[[15, 0]]
    with pytest.raises(DataError, match="contiguous"):
        SearchEngine(**{**kw, "case_ids": shuffled})
    with pytest.raises(DataError, match="lie in"):
        SearchEngine(**{**kw, "normal_codes": setup["normal"].astype(np.int64) + K})
    with pytest.raises(DataError, match="grid_shape"):
        SearchEngine(**{**kw, "grid_shape": (4, 4)})
    with pytest.raises(DataError, match="NaN"):
        SearchEngine(**{**kw, "codebook_normal": np.full((K, D), np.nan)})


def test_empty_database() -> None:
    eng = SearchEngine(
        normal_codes=np.zeros((0, 4), np.uint16),
        abnormal_codes=np.zeros((0, 4), np.uint16),
        case_ids=np.zeros(0, str),
        slice_indices=np.zeros(0, np.int32),
        codebook_normal=np.eye(4),
        codebook_abnormal=np.eye(4),
        grid_shape=(2, 2),
    )
    assert eng.search(Query(normal=np.zeros(4, int), abnormal=np.zeros(4, int))) == []
    assert eng.distances(Query(normal=np.zeros(4, int)), mode="normal").shape == (0,)
    assert eng.scale("euclidean", "normal") == 1.0


# ---------------------------------------------------------------------------------------------- scan paths
def _variant(setup: dict, **kw: object) -> SearchEngine:
    """An engine over the fixture's rows built another way (dtype, segments, threads, backend)."""
    args: dict = {
        "normal_codes": setup["normal"],
        "abnormal_codes": setup["abnormal"],
        "case_ids": setup["case_ids"],
        "slice_indices": setup["slice_indices"],
        "has_abnormal": setup["has_abnormal"],
        "codebook_normal": setup["books"][0],
        "codebook_abnormal": setup["books"][1],
        "grid_shape": GRID,
        "hamming_bits": setup["bits"],
        "learned_embeddings": setup["learned"],
        "normalization_pairs": 512,
    }
    args.update(kw)
    return SearchEngine(**args)


def _segments(setup: dict, bounds: list[int], dtype: type) -> list[tuple[np.ndarray, np.ndarray]]:
    n, a = setup["normal"].astype(dtype), setup["abnormal"].astype(dtype)
    return [(n[lo:hi], a[lo:hi]) for lo, hi in itertools.pairwise(bounds)]


def _check_engine(setup: dict, eng: SearchEngine) -> None:
    """Distances, slice- and volume-wise hits and a batch (also filtered by lesion) all equal the float64
    brute force."""
    ids = setup["case_ids"]
    rng = np.random.default_rng(5)
    for distance, mode in itertools.product(DISTANCES, MODES):
        qn, qa = rng.integers(0, K, P), rng.integers(0, K, P)
        want = _brute(setup, qn, qa, distance, mode)
        got = eng.distances(Query(normal=qn, abnormal=qa), distance=distance, mode=mode)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
        queries = [eng.query_from_rows(r, (r * 5) % len(eng)) for r in (0, 5, 21, 40)]
        for per in ("slice", "volume"):
            batch = eng.search_many(queries, distance=distance, mode=mode, top=7, per=per, block=3)
            for r, q, hits in zip((0, 5, 21, 40), queries, batch, strict=True):
                d = _brute(setup, setup["normal"][r], setup["abnormal"][(r * 5) % len(eng)], distance, mode)
                expected = brute_force_ranking(d, ids, set(q.exclude_cases), per)
                assert_same_ranking(hits, d, expected, 7)
                assert hits == eng.search(q, distance=distance, mode=mode, top=7, per=per)
                for h in hits:
                    assert h.case_id == ids[h.row] and h.slice_index == setup["slice_indices"][h.row]
            without = eng.search_many(
                queries, distance=distance, mode=mode, top=7, per=per, block=3, lesion="without"
            )
            for r, q, hits in zip((0, 5, 21, 40), queries, without, strict=True):
                d = _brute(setup, setup["normal"][r], setup["abnormal"][(r * 5) % len(eng)], distance, mode)
                eligible = ~setup["has_abnormal"]
                assert_same_ranking(
                    hits, d, brute_force_ranking(d, ids, set(q.exclude_cases), per, eligible), 7
                )
        if mode != "abnormal":  # axial context: one pass of a batch of the context's grids
            for r in (0, 21, 47):
                d = _context_brute(setup, r, distance, mode)
                hits = eng.search(eng.query_from_rows(r), distance=distance, mode=mode, top=5, context=True)
                assert_same_ranking(hits, d, brute_force_ranking(d, ids, {ids[r]}, "volume"), 5)


@pytest.mark.parametrize("dtype", [np.uint16, np.uint8])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("bounds", [[0, 49], [0, 13, 13, 33, 49]], ids=["one-segment", "three-segments"])
def test_numba_kernel_exact(
    setup: dict, dtype: type, threads: int, bounds: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The compiled kernel (uint16 and uint8 codes, 1 and 2 threads, one segment or several, an empty one
    among them, and tasks of a few volumes) matches the brute force for every distance and mode."""
    pytest.importorskip("numba")
    import fdn_core.codes.scan as scan

    monkeypatch.setattr(scan, "_WORK_PER_THREAD", 1)  # use every thread even on this tiny database
    segs = _segments(setup, bounds, dtype)
    eng = _variant(
        setup,
        normal_codes=None,
        abnormal_codes=None,
        segments=segs,
        threads=threads,
        backend="numba",
        task_rows=10,
    )
    assert eng.backend == "numba" and eng.threads == threads
    assert len(eng._layout.tasks) > 2
    for s, (n_codes, _) in enumerate(segs):  # used in place
        assert np.shares_memory(eng._layout.codes["normal"][s], n_codes) or n_codes.size == 0
    _check_engine(setup, eng)


@pytest.mark.parametrize("backend", ["torch", "torch-offsets"])
def test_torch_paths_exact(setup: dict, backend: str) -> None:
    """The fallback (chunked embedding_bag) and the former path give the same results as brute force."""
    eng = _variant(
        setup,
        normal_codes=None,
        abnormal_codes=None,
        segments=_segments(setup, [0, 13, 33, 49], np.uint16),
        backend=backend,
    )
    assert eng.backend == backend and eng.threads is None
    _check_engine(setup, eng)


def test_large_top_takes_every_distance(setup: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Slice-wise searches above the in-kernel top limit select from every distance: same results."""
    import fdn_core.codes.search as search_module

    eng: SearchEngine = setup["engine"]
    q = eng.query_from_rows(21)
    want = [eng.search(q, distance=d, per="slice", top=30) for d in DISTANCES]
    monkeypatch.setattr(search_module, "_TOP_IN_KERNEL", 3)
    assert [eng.search(q, distance=d, per="slice", top=30) for d in DISTANCES] == want


def test_fallback_without_numba(setup: dict, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    """Without numba, ``auto`` picks the torch fallback, says so in the log, and is exact."""
    import fdn_core.codes.scan as scan

    monkeypatch.setattr(scan, "_numba_state", {})
    monkeypatch.setitem(__import__("sys").modules, "fdn_core.codes._scan_numba", None)  # import fails
    with caplog.at_level("INFO", logger="fdn_core.codes"):
        eng = _variant(setup)
    assert eng.backend == "torch"
    assert "numba unavailable" in caplog.text and "numpy/torch fallback" in caplog.text
    assert "scan: numpy/torch fallback" in caplog.text
    with pytest.raises(ConfigError, match="numba"):
        _variant(setup, backend="numba")
    _check_engine(setup, eng)
    monkeypatch.undo()
    scan._numba_state.clear()
    if __import__("importlib").util.find_spec("numba") is not None:
        with caplog.at_level("INFO", logger="fdn_core.codes"):
            assert _variant(setup).backend == "numba"
        assert "compiled kernel" in caplog.text


def test_memory_maps_used_in_place_and_ram_per_slice(setup: dict, tmp_path) -> None:
    """Memory-mapped codes are scanned without copies; per-row RAM is only the angular norms (4 bytes per
    slice per code type); volumes are held per volume, not per row."""
    paths = {}
    for name in ("normal", "abnormal", "slice_indices", "has_abnormal"):
        paths[name] = tmp_path / f"{name}.npy"
        np.save(paths[name], setup[name])
    maps = {name: np.load(path, mmap_mode="r") for name, path in paths.items()}
    ids = setup["case_ids"]
    names = list(dict.fromkeys(ids.tolist()))
    bounds = [*np.searchsorted(ids, names).tolist(), len(ids)]
    eng = _variant(
        setup,
        normal_codes=maps["normal"],
        abnormal_codes=maps["abnormal"],
        slice_indices=maps["slice_indices"],
        has_abnormal=maps["has_abnormal"],
        case_ids=None,
        cases=names,
        case_starts=bounds,
    )
    n = len(ids)
    assert eng._flags is not None and np.shares_memory(eng._flags[0], maps["has_abnormal"])
    assert np.shares_memory(eng._layout.codes["normal"][0], maps["normal"])
    assert np.shares_memory(eng._layout.codes["abnormal"][0], maps["abnormal"])
    assert np.shares_memory(eng._slices[0], maps["slice_indices"])
    assert eng.memory_bytes()["rows"] == 0
    eng.search(eng.query_from_rows(3), distance="euclidean", mode="sum")
    eng.search(eng.query_from_rows(3), distance="hamming", mode="sum_normalized", per="slice")
    eng.search(eng.query_from_rows(3), distance="euclidean", mode="normal", lesion="without")
    assert eng.memory_bytes()["rows"] == 0
    eng.search(eng.query_from_rows(3), distance="angular", mode="sum")
    assert eng.memory_bytes()["rows"] == 2 * 4 * n  # the two norm arrays, float32
    assert eng.memory_bytes()["volumes"] < 200 * len(names)

    def row_arrays(obj: object, seen: set[int]) -> list[np.ndarray]:
        """Arrays with a row per slice reachable from the engine's attributes (not the given maps)."""
        if id(obj) in seen:
            return []
        seen.add(id(obj))
        if isinstance(obj, np.ndarray):
            mine = not any(np.shares_memory(obj, m) for m in maps.values())
            return [obj] if mine and n in obj.shape else []
        children = (
            list(obj.values())
            if isinstance(obj, dict)
            else list(obj)
            if isinstance(obj, list | tuple | set)
            else list(vars(obj).values())
            if type(obj).__module__.startswith("fdn_core")  # the engine's own objects, not numba's
            else []
        )
        return [a for c in children for a in row_arrays(c, seen)]

    held = row_arrays(eng, set())
    assert [a.shape for a in held] == [(2, n)]  # only the angular norms
    # The engine built from per-volume names answers like the one built from per-row ids.
    q = eng.query_from_rows(30)
    for mode in MODES:
        assert eng.search(q, mode=mode, top=5) == setup["engine"].search(q, mode=mode, top=5)


def test_volumes_and_segments_inputs(setup: dict) -> None:
    ids = setup["case_ids"]
    with pytest.raises(DataError, match="spans two code segments"):
        _variant(
            setup, normal_codes=None, abnormal_codes=None, segments=_segments(setup, [0, 10, 49], np.uint16)
        )
    with pytest.raises(ConfigError, match="not both"):
        _variant(setup, segments=_segments(setup, [0, 49], np.uint16))
    with pytest.raises(DataError, match="case_starts"):
        _variant(setup, case_ids=None, cases=["a", "b"], case_starts=[0, 3, 40])
    with pytest.raises(ConfigError, match="together"):
        _variant(setup, case_ids=None, cases=["a"])
    with pytest.raises(ConfigError, match="threads"):
        _variant(setup, threads=0)
    with pytest.raises(ConfigError, match="unknown search backend"):
        _variant(setup, backend="gpu")
    # A case without rows is accepted and never returned; rows are found by (case, slice).
    names = list(dict.fromkeys(ids.tolist()))
    bounds = [*np.searchsorted(ids, names).tolist(), len(ids)]
    eng = _variant(
        setup, case_ids=None, cases=[*names[:2], "empty", *names[2:]], case_starts=[*bounds[:3], *bounds[2:]]
    )
    hits = eng.search(eng.query_from_rows(0), top=100)
    assert "empty" not in {h.case_id for h in hits} and len(hits) == len(names) - 1
    assert eng.row_of("case02", 5) == setup["engine"].row_of("case02", 5)
    # Per-segment slice indices work too.
    segs = _segments(setup, [0, 13, 33, 49], np.uint16)
    per_segment = [setup["slice_indices"][lo:hi] for lo, hi in itertools.pairwise([0, 13, 33, 49])]
    eng = _variant(setup, normal_codes=None, abnormal_codes=None, segments=segs, slice_indices=per_segment)
    assert eng.search(eng.query_from_rows(40), top=6) == setup["engine"].search(
        eng.query_from_rows(40), top=6
    )


@pytest.mark.parametrize("dtype", [np.uint16, np.uint8])
@pytest.mark.parametrize("threads", [1, 2])
def test_bounded_scan_equals_one_exact_pass(
    dtype: type, threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Single volume-wise queries bounded by uint8 tables give the one exact pass's hits (Euclidean and
    Hamming, every mode, top 1/5/12, exclusions, duplicate rows, an outlier code whose entries are clipped,
    three segments) while scanning only a few volumes exactly; angular and partial exclusions scan all."""
    pytest.importorskip("numba")
    import fdn_core.codes.scan as scan

    monkeypatch.setattr(scan, "_WORK_PER_THREAD", 1)
    monkeypatch.setattr(scan, "_PRUNE_MIN_WORK", 1)  # bound even this small database
    rng = np.random.default_rng(11)
    k, n_vol, rows = 40, 90, 6
    books = [rng.normal(size=(k, D)) for _ in range(2)]
    books[0][7] *= 1e3  # its table entries lie far above the 95th percentile: clipped to the top level
    n = n_vol * rows
    few = [rng.integers(0, k, (25, P)) for _ in range(2)]  # many duplicate rows: ties between volumes
    pick = rng.integers(0, 25, n)
    codes = [few[t][pick].astype(dtype) for t in range(2)]
    codes[0][::17, 0] = 7
    ids = np.repeat([f"v{i:03d}" for i in range(n_vol)], rows)
    cut = [0, 30 * rows, 31 * rows, n]
    args: dict = {
        "segments": [(codes[0][a:b], codes[1][a:b]) for a, b in itertools.pairwise(cut)],
        "case_ids": ids,
        "slice_indices": np.tile(np.arange(rows), n_vol),
        "codebook_normal": books[0],
        "codebook_abnormal": books[1],
        "grid_shape": GRID,
        "hamming_bits": tuple(rng.random((k, B)) < 0.5 for _ in range(2)),
        "learned_embeddings": tuple(rng.normal(size=(k, 3)) for _ in range(2)),
        "threads": threads,
        "backend": "numba",
        "task_rows": 40,
    }
    bounded, full = SearchEngine(**args), SearchEngine(**args, prune=False)
    scanned: list[int] = []
    real_scan = scan._NumbaBackend._scan

    def spy(self, req, addrs, tasks, rows_, out_val, out_row):  # type: ignore[no-untyped-def]
        scanned.append(int(tasks.shape[0]))
        return real_scan(self, req, addrs, tasks, rows_, out_val, out_row)

    monkeypatch.setattr(scan._NumbaBackend, "_scan", spy)
    for distance, mode, top in itertools.product(("euclidean", "hamming"), MODES, (1, 5, 12)):
        for r in rng.integers(0, n, 3):
            q = bounded.query_from_rows(int(r))
            scanned.clear()
            got = bounded.search(q, distance=distance, mode=mode, top=top)
            assert got == full.search(q, distance=distance, mode=mode, top=top), (distance, mode, top)
            assert sum(scanned) < n_vol, (distance, mode, top, scanned)
    # exclusions that are not whole volumes, and angular distances: one exact pass over every volume
    q = Query(normal=codes[0][3], abnormal=codes[1][3], exclude_cases=("v001", "v050"))
    for distance in DISTANCES:
        scanned.clear()
        assert bounded.search(q, distance=distance) == full.search(q, distance=distance)
        assert (sum(scanned) < n_vol) == (distance not in ("angular", "learned"))
    req = bounded._request({"normal": codes[0][:1].astype(np.int64)}, [[]], "euclidean", "normal", 1, 10)
    req.prune, req.excluded = 10, np.array([[2, 4, 0]], np.int64)
    assert not bounded._backend._prunable(req)
    req.excluded = np.array([[6, 12, 0]], np.int64)  # volume v001: whole
    assert bounded._backend._prunable(req)
    monkeypatch.setattr(scan, "_PRUNE_MIN_WORK", n + 1)  # a small database: one exact pass
    assert not bounded._backend._prunable(req)


def test_learned_distance_needs_an_embedding_of_the_codebook_size(setup: dict) -> None:
    """Without a retrieval embedding the learned distance says how to get one; one of another size (another
    model) is refused; the cosine norms of angular and learned are kept apart."""
    q = Query(normal=setup["normal"][0], abnormal=setup["abnormal"][0])
    plain = _variant(setup, learned_embeddings=None)
    assert not plain.has_learned and setup["engine"].has_learned
    with pytest.raises(ConfigError, match="train-embedding"):
        plain.search(q, distance="learned")
    with pytest.raises(DataError, match="another model"):
        _variant(setup, learned_embeddings=(np.ones((K - 1, 2)), np.ones((K - 1, 2))))
    eng = _variant(setup)
    a = eng.distances(q, "angular", "sum")
    held = eng.memory_bytes()["rows"]
    b = eng.distances(q, "learned", "sum")
    assert not np.allclose(a, b)
    assert eng.memory_bytes()["rows"] == held  # one cosine distance's norms at a time
    assert np.array_equal(eng.distances(q, "angular", "sum"), a)


def _context_brute(s: dict, row: int, distance: str, mode: str) -> np.ndarray:
    """Reference of a search with axial context from database ``row``: the normal term summed over
    ``AXIAL_CONTEXT`` with query and reference rows shifted within their own volumes (clamped)."""
    from fdn_core.labels import AXIAL_CONTEXT

    eng: SearchEngine = s["engine"]
    ids = s["case_ids"]
    n = len(ids)
    first = {c: int(np.flatnonzero(ids == c)[0]) for c in dict.fromkeys(ids)}
    last = {c: int(np.flatnonzero(ids == c)[-1]) for c in dict.fromkeys(ids)}

    def shifted(r: int, o: int) -> int:
        return min(max(r + o, first[ids[r]]), last[ids[r]])

    normal = np.zeros(n)
    for o, w in AXIAL_CONTEXT:
        q = s["normal"][shifted(row, o)]
        refs = np.asarray([shifted(r, o) for r in range(n)])
        d = brute_force_distances(
            q,
            None,
            s["normal"][refs],
            s["abnormal"],
            s["books"],
            s["bits"],
            distance,
            "normal",
            learned=s["learned"],
        )
        normal += w * d
    if mode == "normal":
        return normal
    abnormal = _brute(s, None, s["abnormal"][row], distance, "abnormal")
    if mode == "sum":
        return normal + abnormal
    weight = sum(w for _, w in AXIAL_CONTEXT)
    return normal / (eng.scale(distance, "normal") * weight) + abnormal / eng.scale(distance, "abnormal")


@pytest.mark.parametrize(
    ("distance", "mode", "per"), list(itertools.product(DISTANCES, MODES, ("slice", "volume")))
)
def test_axial_context_matches_brute_force(setup: dict, distance: str, mode: str, per: str) -> None:
    eng: SearchEngine = setup["engine"]
    ids = setup["case_ids"]
    for row in (0, 5, 21, 40, 47):  # first, inner and last slices of volumes (clamped context)
        query = eng.query_from_rows(row)
        d = (
            _context_brute(setup, row, distance, mode)
            if mode != "abnormal"
            else _brute(setup, None, setup["abnormal"][row], distance, mode)
        )
        expected = brute_force_ranking(d, ids, {ids[row]}, per)
        for top in (1, 4, 100):
            hits = eng.search(query, distance=distance, mode=mode, top=top, per=per, context=True)
            assert_same_ranking(hits, d, expected, top)
            assert all(h.case_id != ids[row] for h in hits)


def test_axial_context_of_a_query_and_its_errors(setup: dict) -> None:
    from fdn_core.labels import AXIAL_CONTEXT, context_slices

    eng: SearchEngine = setup["engine"]
    # row 9 is the first slice of a 4-slice volume (rows 9..12): offsets clamp to rows 9..12
    q = eng.query_from_rows(10)
    assert q.normal_context is not None and q.normal_context.shape == (len(AXIAL_CONTEXT), P)
    want = [min(max(10 + o, 9), 12) for o, _ in AXIAL_CONTEXT]
    np.testing.assert_array_equal(q.normal_context, setup["normal"][want])
    assert context_slices(1, 4) == [w - 9 for w in want]  # the same offsets on a volume's slice indices
    # without context the search is the one-slice search
    plain = eng.search(q, distance="euclidean", mode="normal", top=3)
    bare = Query(normal=q.normal, abnormal=q.abnormal, exclude_cases=q.exclude_cases)
    assert plain == eng.search(bare, distance="euclidean", mode="normal", top=3)
    with pytest.raises(DataError, match="neighbouring slices"):
        eng.search(bare, distance="euclidean", mode="normal", context=True)
    assert eng.search(bare, mode="abnormal", context=True) == eng.search(bare, mode="abnormal")
    wrong = Query(normal=q.normal, abnormal=q.abnormal, normal_context=q.normal_context[:3])
    with pytest.raises(DataError, match="must hold 5 code grids"):
        eng.search(wrong, mode="normal", context=True)
    bad = Query(normal=q.normal, abnormal=q.abnormal, normal_context=np.full((5, P), K))
    with pytest.raises(DataError, match="must lie in"):
        eng.search(bad, mode="normal", context=True)
    elsewhere = Query(normal=q.normal, normal_context=eng.query_from_rows(30).normal_context)
    with pytest.raises(DataError, match="offset 0 is not the query's normal grid"):
        eng.search(elsewhere, mode="normal", context=True)
    # a case stored with gaps in its slices: neighbouring rows are not neighbouring slices
    gapped = setup["slice_indices"].copy()
    gapped[13:25] = np.arange(12) * 2 + 2  # case02 (rows 13-24) stores every other slice
    other = _variant(setup, slice_indices=gapped)
    with pytest.raises(DataError, match=r"\['case02'\] do not store consecutive axial slices"):
        other.search(q, mode="normal", context=True)
    swapped = setup["slice_indices"].copy()
    swapped[[40, 41]] = swapped[[41, 40]]  # case05 (rows 37-46) with two slices out of order
    with pytest.raises(DataError, match=r"\['case05'\] do not store"):
        _variant(setup, slice_indices=swapped).search(q, mode="normal", context=True)
    plain_rows = [(h.row, h.distance) for h in eng.search(q, mode="normal")]
    assert [(h.row, h.distance) for h in other.search(q, mode="normal")] == plain_rows
    # the batched call gives each query its own context
    queries = [eng.query_from_rows(r) for r in (0, 21, 40)]
    many = eng.search_many(queries, distance="angular", mode="sum", top=4, context=True)
    assert many == [eng.search(x, distance="angular", mode="sum", top=4, context=True) for x in queries]


# ------------------------------------------------------------------------------------------- lesion filter
def _check_lesion_filter(s: dict, rows: tuple[int, ...], tops: tuple[int, ...] = (1, 4, 100)) -> int:
    """For every distance, mode, per and context, with "without" and "with": the engine ``s["engine"]``'s
    hits equal the float64 brute force over the eligible rows (``s["has_abnormal"]``) of the other volumes.
    Returns the number of searches that found fewer eligible volumes than asked for."""
    eng: SearchEngine = s["engine"]
    ids, flags = s["case_ids"], s["has_abnormal"]
    short = 0
    for distance, mode, per, context in itertools.product(
        DISTANCES, MODES, ("slice", "volume"), (False, True)
    ):
        for row in rows:
            query = eng.query_from_rows(row)
            if context and mode != "abnormal":
                d = _context_brute(s, row, distance, mode)
            else:
                d = _brute(s, s["normal"][row], s["abnormal"][row], distance, mode)
            for lesion, eligible in (("without", ~flags), ("with", flags)):
                expected = brute_force_ranking(d, ids, {ids[row]}, per, eligible)
                for top in tops:
                    hits = eng.search(
                        query, distance=distance, mode=mode, top=top, per=per, context=context, lesion=lesion
                    )
                    assert_same_ranking(hits, d, expected, top)
                    assert all(eligible[h.row] and h.case_id != ids[row] for h in hits)
                    short += len(hits) < top
    return short


def test_lesion_filter_matches_brute_force_over_eligible_slices(setup: dict) -> None:
    """The filters "without" / "with" return the brute force's ranking over unflagged / flagged slices
    (volume-wise: each volume's best such slice), for every distance and mode, with and without axial
    context; a volume without an eligible slice never appears, and fewer than ``top`` hits come when fewer
    exist."""
    assert _check_lesion_filter(setup, (0, 5, 21, 40, 47)) > 0
    eng: SearchEngine = setup["engine"]
    q = eng.query_from_rows(0)
    without = eng.search(q, per="volume", top=100, lesion="without")
    assert "case01" not in {h.case_id for h in without}  # every slice of case01 is flagged
    assert len(without) == 5  # the 7 volumes less the query's own and case01
    flagged = eng.search(q, per="volume", top=100, lesion="with")
    assert "case04" not in {h.case_id for h in flagged}  # its one slice is not flagged
    # slice-wise "with" is the plain ranking with the unflagged slices taken out
    rows = [(h.row, h.distance) for h in eng.search(q, per="slice", top=100, lesion="with")]
    assert rows == [
        (h.row, h.distance) for h in eng.search(q, per="slice", top=100) if setup["has_abnormal"][h.row]
    ]
    # a batch gives each query its own filtered hits
    queries = [eng.query_from_rows(r) for r in (0, 21, 40)]
    for context in (False, True):
        many = eng.search_many(
            queries, distance="angular", mode="sum", top=4, context=context, lesion="without"
        )
        assert many == [
            eng.search(x, distance="angular", mode="sum", top=4, context=context, lesion="without")
            for x in queries
        ]


def test_lesion_filter_any_is_the_plain_search_and_bad_names_are_refused(setup: dict) -> None:
    eng: SearchEngine = setup["engine"]
    bare = _variant(setup, has_abnormal=None)  # an engine built without the flags
    assert eng.has_lesion_flags and not bare.has_lesion_flags
    for row, per, context in itertools.product((0, 21), ("slice", "volume"), (False, True)):
        q = eng.query_from_rows(row)
        plain = eng.search(q, mode="sum", top=6, per=per, context=context)
        assert eng.search(q, mode="sum", top=6, per=per, context=context, lesion="any") == plain
        assert bare.search(q, mode="sum", top=6, per=per, context=context, lesion="any") == plain
    q = eng.query_from_rows(0)
    assert eng.search(q, lesion=" Without ") == eng.search(q, lesion="without")
    for wrong in ("none", "healthy", "", None):
        with pytest.raises(ConfigError, match=r"unknown lesion filter .*'any', 'without', 'with'"):
            eng.search(q, lesion=wrong)  # type: ignore[arg-type]
    with pytest.raises(DataError, match=r"built without them: build it with SearchEngine.from_database"):
        bare.search(q, lesion="without")
    with pytest.raises(DataError, match="lesion flag"):
        bare.search_many([q], lesion="with", context=True)
    with pytest.raises(DataError, match=r"has_abnormal must be booleans with shape \(49,\)"):
        _variant(setup, has_abnormal=setup["has_abnormal"].astype(np.int8))
    with pytest.raises(DataError, match="has_abnormal must be booleans"):
        _variant(setup, has_abnormal=setup["has_abnormal"][:-1])


def test_lesion_filter_on_a_segmented_database_with_a_removed_case(setup: dict, tmp_path) -> None:
    """An engine over a database of three segments, one case removed (a tombstone in the middle of a
    segment), takes each live run's flags from the memory maps (no copy) and filters exactly."""
    from db_workers import source

    from fdn_core.codes.database import CaseCodes, CodeDatabase

    db = CodeDatabase.create(
        tmp_path / "db",
        fingerprint="f" * 64,
        codebook_normal=setup["books"][0],
        codebook_abnormal=setup["books"][1],
        grid_shape=GRID,
    )
    ids = setup["case_ids"]
    names = list(dict.fromkeys(ids.tolist()))

    def codes(case_id: str) -> CaseCodes:
        rows = ids == case_id
        return CaseCodes(
            case_id,
            setup["normal"][rows].reshape(-1, *GRID),
            setup["abnormal"][rows].reshape(-1, *GRID),
            setup["has_abnormal"][rows],
            source(case_id),
        )

    for group in (names[:2], names[2:5], names[5:]):
        db.add_cases([codes(c) for c in group])
    db.remove_case("case03")  # the middle case of the second segment
    db = CodeDatabase.open(tmp_path / "db")
    eng = SearchEngine.from_database(
        db, hamming_bits=setup["bits"], learned_embeddings=setup["learned"], normalization_pairs=512
    )
    assert eng._flags is not None and len(eng._flags) == 4  # live runs: 0-1 | 2 | 4 | 5-6
    maps = [seg.has_abnormal for seg in db.segments()]
    assert all(any(np.shares_memory(f, m) for m in maps) for f in eng._flags)
    live = ids != "case03"
    s = {
        **setup,
        "engine": eng,
        "normal": setup["normal"][live],
        "abnormal": setup["abnormal"][live],
        "case_ids": ids[live],
        "has_abnormal": setup["has_abnormal"][live],
    }
    np.testing.assert_array_equal(np.asarray(db.has_abnormal), s["has_abnormal"])
    _check_lesion_filter(s, (0, 20, 39), tops=(1, 100))
    hits = eng.search(eng.query_from_rows(0), per="volume", top=100, lesion="without", context=True)
    assert {h.case_id for h in hits} == {"case02", "case04", "case05", "case06"}  # not case01, not case03
    # every case removed: a clear error instead of a failed concatenation
    db.remove_cases([c for c in names if c != "case03"])
    with pytest.raises(DataError, match="holds no cases"):
        SearchEngine.from_database(CodeDatabase.open(tmp_path / "db"))
