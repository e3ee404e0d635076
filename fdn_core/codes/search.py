"""Exact similarity search over code-index grids by table lookup (paper section 3.2; no published code).

Each slice carries two grids of P = h*w code indices (normal, abnormal). Distances between two slices,
for one code type, with ``e`` that type's codebook (K x D) and ``b`` its binarised codebook:

- Euclidean ``D_E(a, r) = || z_a - z_r ||_2``, the L2 distance of the flattened quantised latents
  (P*D values), as in the paper's eq. 13 ("a distance function such as Euclidean distance" between the
  latent vectors) and the ML4H version ("the L2 distance ... between the query and reference latent
  codes"). NOT squared, and not a sum of per-position norms: ``D_E^2 = sum_p ||e[a_p] - e[r_p]||^2``
  is a per-position sum of the K x K table of squared code distances, and ``D_E`` is its square root.
- Angular ``D_A(a, r) = 1 - <z_a, z_r> / (|z_a| |z_r|)``, the cosine distance of the flattened latents
  (in [0, 2]). ``<z_a, z_r> = sum_p e[a_p].e[r_p]`` is a per-position sum of the K x K dot table and
  ``|z_r|^2 = sum_p |e[r_p]|^2`` is precomputed once per database row. When either latent is all-zero
  the cosine is undefined; it is taken as 0 (``D_A = 1``).
- Hamming ``D_H(a, r) = sum_p hamming(b[a_p], b[r_p])``, the Hamming distance of the flattened binarised
  latents: a per-position sum of the K x K Hamming table (``tables.hamming_table``).

Modes: ``normal`` (S_normal), ``abnormal`` (S_abnormal), ``sum`` (S_sum = D_normal + D_abnormal, eq. 17)
and ``sum_normalized`` (D_normal / s_normal + D_abnormal / s_abnormal, where s_t is the median of that
distance over ``normalization_pairs`` random pairs of distinct database rows, seeded, computed once per
engine and cached; the paper notes raw S_sum weighs the two terms unevenly). A composite query simply
takes its normal grid from one slice and its abnormal grid from another.

Scan: for a query, row p of a (P, K) lookup holds the table row of the query's code at p; a database row's
distance term is the sum over p of lookup[p, code[n, p]]. That gather-and-sum runs as one
``torch.nn.functional.embedding_bag(mode="sum")`` over a (N, P) int32 array of ``code + p*K`` built once
per code type (4 bytes per position per slice). A batch of B queries becomes a (P*K, B) weight, so one
pass over the database serves all B. We use torch's fused kernel rather than a numpy loop because, per
query, it needs 1.4-2.2x less CPU time than per-position ``np.take`` + add (10k-1M rows), and numpy
has no fused batched form at all (bench/bench_search.py). It uses ``torch.get_num_threads()`` threads;
on a heavily oversubscribed machine OpenMP threads wait on each other, and ``torch.set_num_threads(1)``
is faster.
Sums are float32; the distances reported in hits are recomputed in float64 from the tables, so they match
a float64 brute force to ~1e-12, and the ranking matches it except between candidates closer than float32
rounding (~1e-6 relative). Ties are broken by row order. Top-k uses ``np.argpartition``. An engine is a
snapshot of the arrays it was given: make a new one after changing the database.

Slice-wise search ranks rows; volume-wise search keeps each volume's best slice, ranks volumes and
returns the top Q. Excluded cases (always the query's own volume when it comes from the database) never
appear in results.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fdn_core.codes.tables import check_codebook, dot_table, hamming_table, squared_euclidean_table
from fdn_core.errors import ConfigError, DataError
from fdn_core.labels import CODE_TYPES, DISTANCES, MODES

__all__ = ["Hit", "Query", "SearchEngine"]

_MODE_TYPES = {
    "normal": ("normal",),
    "abnormal": ("abnormal",),
    "sum": ("normal", "abnormal"),
    "sum_normalized": ("normal", "abnormal"),
}


@dataclass(frozen=True)
class Hit:
    """One search result. ``rank`` starts at 1; ``distance`` is the mode's combined distance (smaller is
    closer); ``distance_normal`` / ``distance_abnormal`` are the raw per-type terms the mode used."""

    rank: int
    row: int
    case_id: str
    slice_index: int
    distance: float
    distance_normal: float | None = None
    distance_abnormal: float | None = None


@dataclass(frozen=True)
class Query:
    """Code grids to search with ((h, w) or (h*w,) indices; either may be None if the mode does not use
    it) and case ids whose slices must not be returned (the query's own volume)."""

    normal: np.ndarray | None = None
    abnormal: np.ndarray | None = None
    exclude_cases: tuple[str, ...] = field(default=())


@dataclass
class _CodeType:
    """Per code type (normal or abnormal) data of the engine."""

    codes: np.ndarray  # (N, P) uint16
    codebook: np.ndarray  # (K, D) float64
    tables64: dict[str, np.ndarray] = field(default_factory=dict)
    tables32: dict[str, np.ndarray] = field(default_factory=dict)
    offset_index: Any = None  # torch int32 (N, P), code + p*K
    inv_norm: np.ndarray | None = None  # (N,) float32 1/|z_r| (0 for all-zero latents)


class SearchEngine:
    """Exact table-lookup search over a code database (or equivalent arrays). Thread-safe for queries.

    Build with ``SearchEngine.from_database(db, hamming_bits=...)``. ``hamming_bits`` is a pair
    (normal, abnormal) of binarised codebooks (K, B) as made by ``fdn_core.codes.binarize``;
    ``hamming_tables`` a pair of ready (K, K) tables instead. Without either, Hamming is unavailable.
    """

    def __init__(
        self,
        *,
        normal_codes: np.ndarray,
        abnormal_codes: np.ndarray,
        case_ids: np.ndarray | Sequence[str],
        slice_indices: np.ndarray,
        codebook_normal: np.ndarray,
        codebook_abnormal: np.ndarray,
        grid_shape: tuple[int, int] | None = None,
        hamming_bits: tuple[np.ndarray, np.ndarray] | None = None,
        hamming_tables: tuple[np.ndarray, np.ndarray] | None = None,
        normalization_pairs: int = 4096,
        seed: int = 0,
    ) -> None:
        books = (
            check_codebook(codebook_normal, "normal codebook"),
            check_codebook(codebook_abnormal, "abnormal codebook"),
        )
        k = books[0].shape[0]
        if books[1].shape[0] != k:
            raise DataError(f"the codebooks differ in size: {k} normal vs {books[1].shape[0]} abnormal codes")
        self._k = k
        codes = []
        for name, arr in (("normal", normal_codes), ("abnormal", abnormal_codes)):
            a = np.asarray(arr)
            if a.ndim != 2 or not np.issubdtype(a.dtype, np.integer):
                raise DataError(f"{name} codes must be an integer (N, h*w) array, got {a.dtype} {a.shape}")
            if a.size and (int(a.min()) < 0 or int(a.max()) >= k):
                raise DataError(f"{name} codes must lie in [0, {k}); found {a.min()}..{a.max()}")
            codes.append(a)
        if codes[0].shape != codes[1].shape:
            raise DataError(
                f"normal codes {codes[0].shape} and abnormal codes {codes[1].shape} differ in shape"
            )
        n, p = codes[0].shape
        if grid_shape is None:
            grid_shape = (p, 1)
        if int(grid_shape[0]) * int(grid_shape[1]) != p:
            raise DataError(f"grid_shape {tuple(grid_shape)} does not hold the {p} codes per row")
        self._grid = (int(grid_shape[0]), int(grid_shape[1]))
        self._n, self._p = n, p
        ids = np.asarray(case_ids)
        sl = np.asarray(slice_indices)
        if ids.shape != (n,) or sl.shape != (n,):
            raise DataError(f"case_ids {ids.shape} and slice_indices {sl.shape} must both have shape ({n},)")
        self._case_ids = ids.astype(str)
        self._slice_indices = sl.astype(np.int64)
        # Volumes: rows of a case must be contiguous (CodeDatabase stores them so).
        change = np.flatnonzero(self._case_ids[1:] != self._case_ids[:-1]) + 1 if n else np.zeros(0, np.int64)
        self._starts = np.concatenate([[0], change]).astype(np.int64) if n else np.zeros(0, np.int64)
        self._stops = np.concatenate([change, [n]]).astype(np.int64) if n else np.zeros(0, np.int64)
        names = self._case_ids[self._starts]
        if np.unique(names).size != names.size:
            raise DataError("rows of one case must be contiguous (sort the rows by case id first)")
        self._volume_of = {str(c): i for i, c in enumerate(names)}
        self._types = {
            "normal": _CodeType(codes[0], books[0]),
            "abnormal": _CodeType(codes[1], books[1]),
        }
        if hamming_bits is not None and hamming_tables is not None:
            raise ConfigError("give either hamming_bits or hamming_tables, not both")
        if hamming_bits is not None:
            hamming_tables = (hamming_table(hamming_bits[0]), hamming_table(hamming_bits[1]))
        if hamming_tables is not None:
            for t, table in zip(CODE_TYPES, hamming_tables, strict=True):
                self._types[t].tables64["hamming"] = self._check_hamming_table(table, t)
        if normalization_pairs < 1:
            raise ConfigError(f"normalization_pairs must be >= 1, got {normalization_pairs}")
        self._pairs = int(normalization_pairs)
        self._seed = int(seed)
        self._scales: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_database(cls, db: Any, **kwargs: Any) -> SearchEngine:
        """An engine over a ``CodeDatabase`` (its memory-mapped arrays are used as they are)."""
        return cls(
            normal_codes=db.normal_codes,
            abnormal_codes=db.abnormal_codes,
            case_ids=db.case_ids,
            slice_indices=db.slice_indices,
            codebook_normal=db.codebook_normal,
            codebook_abnormal=db.codebook_abnormal,
            grid_shape=db.grid_shape,
            **kwargs,
        )

    def _check_hamming_table(self, table: np.ndarray, t: str) -> np.ndarray:
        tab = np.asarray(table)
        k = self._k
        if tab.shape != (k, k) or not np.issubdtype(tab.dtype, np.integer):
            raise DataError(
                f"{t} Hamming table must be an integer ({k}, {k}) array, got {tab.dtype} {tab.shape}"
            )
        if (tab < 0).any() or not np.array_equal(tab, tab.T) or np.diagonal(tab).any():
            raise DataError(f"{t} Hamming table must be non-negative, symmetric and zero on the diagonal")
        return tab.astype(np.float64)

    # ------------------------------------------------------------------ introspection
    def __len__(self) -> int:
        return self._n

    @property
    def grid_shape(self) -> tuple[int, int]:
        """(h, w) of the code grids."""
        return self._grid

    @property
    def has_hamming(self) -> bool:
        """Whether Hamming tables were given."""
        return "hamming" in self._types["normal"].tables64

    def memory_bytes(self) -> dict[str, int]:
        """RAM the engine holds beyond the database arrays: ``rows`` grows with N (scan indices: 4 bytes per
        position per code type used; norms), ``tables`` is fixed (K x K tables built so far)."""
        rows = tables = 0
        for ct in self._types.values():
            if ct.offset_index is not None:
                rows += ct.offset_index.numel() * ct.offset_index.element_size()
            if ct.inv_norm is not None:
                rows += ct.inv_norm.nbytes
            tables += sum(t.nbytes for t in ct.tables32.values())
            tables += sum(t.nbytes for t in ct.tables64.values())
        return {"rows": rows, "tables": tables}

    # ------------------------------------------------------------------ queries
    def query_from_rows(self, normal_row: int, abnormal_row: int | None = None) -> Query:
        """A query made of database rows: normal grid of ``normal_row``, abnormal grid of ``abnormal_row``
        (default: the same row; a different row makes a composite query). Both rows' volumes are excluded.
        """
        rows = [normal_row, normal_row if abnormal_row is None else abnormal_row]
        for r in rows:
            if not isinstance(r, int | np.integer) or not 0 <= int(r) < self._n:
                raise DataError(f"row {r!r} is not in the database (0..{self._n - 1})")
        excl = tuple(dict.fromkeys(str(self._case_ids[r]) for r in rows))
        return Query(
            normal=np.asarray(self._types["normal"].codes[rows[0]]),
            abnormal=np.asarray(self._types["abnormal"].codes[rows[1]]),
            exclude_cases=excl,
        )

    def row_of(self, case_id: str, slice_index: int) -> int:
        """The database row of one case's slice."""
        v = self._volume_of.get(case_id)
        if v is None:
            raise DataError(f"case {case_id!r} is not in the database")
        lo, hi = self._starts[v], self._stops[v]
        hit = np.flatnonzero(self._slice_indices[lo:hi] == slice_index)
        if hit.size == 0:
            raise DataError(f"case {case_id!r} has no slice {slice_index} in the database")
        return int(lo + hit[0])

    def _query_codes(self, arr: Any, t: str) -> np.ndarray:
        if arr is None:
            raise DataError(f"this search mode needs the query's {t} codes, but the query has none")
        a = np.asarray(arr)
        if a.shape not in ((self._p,), self._grid) or not np.issubdtype(a.dtype, np.integer):
            raise DataError(
                f"query {t} codes must be integer indices of shape {self._grid} or ({self._p},), "
                f"got {a.dtype} {a.shape}"
            )
        if int(a.min()) < 0 or int(a.max()) >= self._k:
            raise DataError(f"query {t} codes must lie in [0, {self._k}); found {a.min()}..{a.max()}")
        return a.reshape(self._p).astype(np.int64)

    # ------------------------------------------------------------------ lazily built structures
    def _table64(self, t: str, distance: str) -> np.ndarray:
        ct = self._types[t]
        if distance not in ct.tables64:
            if distance == "hamming":
                raise ConfigError(
                    "Hamming distance needs binarised codebooks: build the engine with hamming_bits "
                    "(from fdn_core.codes.binarize) or hamming_tables"
                )
            with self._lock:
                if distance not in ct.tables64:
                    maker = squared_euclidean_table if distance == "euclidean" else dot_table
                    ct.tables64[distance] = maker(ct.codebook)
        return ct.tables64[distance]

    def _table32(self, t: str, distance: str) -> np.ndarray:
        ct = self._types[t]
        if distance not in ct.tables32:
            tab = np.ascontiguousarray(self._table64(t, distance), dtype=np.float32)
            with self._lock:
                ct.tables32.setdefault(distance, tab)
        return ct.tables32[distance]

    def _offset_index(self, t: str) -> Any:
        import torch

        ct = self._types[t]
        if ct.offset_index is None:
            with self._lock:
                if ct.offset_index is None:
                    offsets = np.arange(self._p, dtype=np.int32) * np.int32(self._k)
                    idx = np.empty((self._n, self._p), dtype=np.int32)
                    step = 1 << 16  # chunked: no int64 temporaries the size of the database
                    for s in range(0, self._n, step):
                        np.add(ct.codes[s : s + step], offsets, out=idx[s : s + step], dtype=np.int32)
                    ct.offset_index = torch.from_numpy(idx)
        return ct.offset_index

    def _scan(self, t: str, lookups: np.ndarray) -> np.ndarray:
        """Sum over positions of ``lookups[b, p, code[n, p]]`` for every row n: (N, B) float32."""
        import torch

        b = lookups.shape[0]
        w = np.empty((self._p * self._k, b), dtype=np.float32)  # fresh array: plain row-major strides
        w[...] = lookups.reshape(b, self._p * self._k).T
        weight = torch.from_numpy(w)
        with torch.inference_mode():
            out = torch.nn.functional.embedding_bag(self._offset_index(t), weight, mode="sum")
        return out.numpy()

    def _inv_norm(self, t: str) -> np.ndarray:
        ct = self._types[t]
        if ct.inv_norm is None:
            sq = np.diagonal(self._table32(t, "angular"))
            norms = np.sqrt(np.maximum(self._scan(t, np.broadcast_to(sq, (1, self._p, self._k)))[:, 0], 0))
            inv = np.zeros_like(norms)
            np.divide(1.0, norms, out=inv, where=norms > 0)
            with self._lock:
                if ct.inv_norm is None:
                    ct.inv_norm = inv
        return ct.inv_norm

    # ------------------------------------------------------------------ exact (float64) distances
    def _exact_term(self, t: str, distance: str, q: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """float64 distance of one code type between query codes ``q`` ((P,), or (R, P): one query per
        row) and database ``rows`` (R,)."""
        return self._exact_pairs(t, distance, q, np.asarray(self._types[t].codes[rows], dtype=np.int64))

    def _exact_pairs(self, t: str, distance: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """float64 distances between code grids ``a`` ((P,) or (R, P)) and ``b`` (R, P), row by row."""
        a = np.broadcast_to(a, b.shape)
        table = self._table64(t, distance)
        s = table[a, b].sum(axis=1)
        if distance == "euclidean":
            return np.sqrt(np.maximum(s, 0.0))
        if distance == "hamming":
            return s
        sq = np.diagonal(table)
        denom = np.sqrt(sq[a].sum(axis=1)) * np.sqrt(sq[b].sum(axis=1))
        cos = np.zeros_like(s)
        np.divide(s, denom, out=cos, where=denom > 0)
        return 1.0 - cos

    def scale(self, distance: str, code_type: str) -> float:
        """Typical size of one distance term in this database (used by ``sum_normalized``): the median over
        random pairs of distinct rows (mean if the median is 0; 1 if both are 0 or N < 2)."""
        self._check_names(distance, "normal")
        if code_type not in CODE_TYPES:
            raise ConfigError(f"unknown code type {code_type!r}; choose one of {CODE_TYPES}")
        key = (distance, code_type)
        if key not in self._scales:
            value = 1.0
            if self._n >= 2:
                rng = np.random.default_rng(self._seed)
                i = rng.integers(0, self._n, self._pairs)
                j = rng.integers(0, self._n - 1, self._pairs)
                j = j + (j >= i)
                codes = self._types[code_type].codes
                d = self._exact_pairs(
                    code_type,
                    distance,
                    np.asarray(codes[i], dtype=np.int64),
                    np.asarray(codes[j], dtype=np.int64),
                )
                med = float(np.median(d))
                value = med if med > 0 else (float(d.mean()) if d.mean() > 0 else 1.0)
            with self._lock:
                self._scales.setdefault(key, value)
        return self._scales[key]

    # ------------------------------------------------------------------ search
    @staticmethod
    def _check_names(distance: str, mode: str) -> None:
        if distance not in DISTANCES:
            raise ConfigError(f"unknown distance {distance!r}; choose one of {DISTANCES}")
        if mode not in MODES:
            raise ConfigError(f"unknown search mode {mode!r}; choose one of {MODES}")

    def _block_distances(self, qcodes: dict[str, np.ndarray], distance: str, mode: str) -> np.ndarray:
        """Approximate (float32) combined distances (N, B) of every row to a block of B queries."""
        terms: dict[str, np.ndarray] = {}
        for t in _MODE_TYPES[mode]:
            q = qcodes[t]  # (B, P)
            s = self._scan(t, self._table32(t, distance)[q])  # (N, B), row-major
            if distance == "euclidean":
                np.sqrt(np.maximum(s, 0, out=s), out=s)
            elif distance == "angular":
                sq = np.diagonal(self._table64(t, "angular"))
                qn = np.sqrt(sq[q].sum(axis=1))
                inv_q = np.zeros_like(qn)
                np.divide(1.0, qn, out=inv_q, where=qn > 0)
                s *= self._inv_norm(t)[:, None]
                s *= inv_q.astype(np.float32)[None, :]
                np.subtract(1.0, s, out=s)
            terms[t] = s
        if mode in ("normal", "abnormal"):
            return terms[mode]
        if mode == "sum":
            terms["normal"] += terms["abnormal"]
            return terms["normal"]
        terms["normal"] /= np.float32(self.scale(distance, "normal"))
        terms["abnormal"] /= np.float32(self.scale(distance, "abnormal"))
        terms["normal"] += terms["abnormal"]
        return terms["normal"]

    def _excluded_volumes(self, query: Query) -> list[int]:
        if isinstance(query.exclude_cases, str):
            raise DataError("Query.exclude_cases must be a sequence of case ids, not one string")
        # Ids not in the database are fine: an external query's own volume is simply absent.
        return [self._volume_of[c] for c in query.exclude_cases if c in self._volume_of]

    def distances(self, query: Query, distance: str = "euclidean", mode: str = "sum") -> np.ndarray:
        """(N,) float64 distance of every database row to ``query`` (float32 precision; no exclusion)."""
        self._check_names(distance, mode)
        qcodes = {t: self._query_codes(getattr(query, t), t)[None, :] for t in _MODE_TYPES[mode]}
        if self._n == 0:
            return np.zeros(0)
        return self._block_distances(qcodes, distance, mode)[:, 0].astype(np.float64)

    def search(
        self,
        query: Query,
        *,
        distance: str = "euclidean",
        mode: str = "sum",
        top: int = 10,
        per: str = "volume",
    ) -> list[Hit]:
        """Top ``top`` results for one query: per ``"volume"`` (best slice of each volume) or ``"slice"``."""
        return self.search_many([query], distance=distance, mode=mode, top=top, per=per)[0]

    def search_many(
        self,
        queries: Sequence[Query],
        *,
        distance: str = "euclidean",
        mode: str = "sum",
        top: int = 10,
        per: str = "volume",
        block: int = 16,
    ) -> list[list[Hit]]:
        """Like ``search`` for many queries; ``block`` queries share each pass over the database."""
        self._check_names(distance, mode)
        if per not in ("volume", "slice"):
            raise ConfigError(f"per must be 'volume' or 'slice', got {per!r}")
        if isinstance(top, bool) or not isinstance(top, int | np.integer) or top < 1:
            raise ConfigError(f"top must be a positive integer, got {top!r}")
        if block < 1:
            raise ConfigError(f"block must be >= 1, got {block}")
        types = _MODE_TYPES[mode]
        parsed = [
            ({t: self._query_codes(getattr(q, t), t) for t in types}, self._excluded_volumes(q))
            for q in queries
        ]
        results: list[list[Hit]] = []
        if self._n == 0:
            return [[] for _ in parsed]
        for s in range(0, len(parsed), block):
            chunk = parsed[s : s + block]
            qcodes = {t: np.stack([c[0][t] for c in chunk]) for t in types}
            dist = self._block_distances(qcodes, distance, mode)  # (N, B)
            for b, (_, excluded) in enumerate(chunk):
                for v in excluded:
                    dist[self._starts[v] : self._stops[v], b] = np.inf
            if per == "volume":
                best = np.minimum.reduceat(dist, self._starts, axis=0)  # (V, B): each volume's best slice
            for b, (codes, _) in enumerate(chunk):
                if per == "slice":
                    rows = self._smallest(np.ascontiguousarray(dist[:, b]), int(top))
                else:
                    vols = self._smallest(np.ascontiguousarray(best[:, b]), int(top))  # excluded: inf
                    rows = np.asarray(
                        [
                            self._starts[v] + int(np.argmin(dist[self._starts[v] : self._stops[v], b]))
                            for v in vols
                        ],
                        dtype=np.int64,
                    )
                results.append(self._hits(codes, rows, distance, mode))
        return results

    @staticmethod
    def _smallest(d: np.ndarray, k: int) -> np.ndarray:
        """Indices of the k smallest finite values, sorted by (value, index); deterministic under ties."""
        finite = int(np.count_nonzero(np.isfinite(d)))
        k = min(k, finite)
        if k == 0:
            return np.zeros(0, dtype=np.int64)
        if k < d.size:
            part = np.argpartition(d, k - 1)[:k]
            v = d[part].max()
            below = np.flatnonzero(d < v)
            ties = np.flatnonzero(d == v)[: k - below.size]
            idx = np.concatenate([below, ties])
        else:
            idx = np.flatnonzero(np.isfinite(d))
        return idx[np.lexsort((idx, d[idx]))]

    def _hits(self, codes: dict[str, np.ndarray], rows: np.ndarray, distance: str, mode: str) -> list[Hit]:
        """Hits for ``rows`` with distances recomputed in float64, re-sorted by (distance, row)."""
        if rows.size == 0:
            return []
        terms = {t: self._exact_term(t, distance, codes[t], rows) for t in _MODE_TYPES[mode]}
        if mode in ("normal", "abnormal"):
            total = terms[mode]
        elif mode == "sum":
            total = terms["normal"] + terms["abnormal"]
        else:
            total = terms["normal"] / self.scale(distance, "normal") + terms["abnormal"] / self.scale(
                distance, "abnormal"
            )
        order = np.lexsort((rows, total))
        return [
            Hit(
                rank=rank,
                row=int(rows[i]),
                case_id=str(self._case_ids[rows[i]]),
                slice_index=int(self._slice_indices[rows[i]]),
                distance=float(total[i]),
                distance_normal=float(terms["normal"][i]) if "normal" in terms else None,
                distance_abnormal=float(terms["abnormal"][i]) if "abnormal" in terms else None,
            )
            for rank, i in enumerate(order, 1)
        ]
