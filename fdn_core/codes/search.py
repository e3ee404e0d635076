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
- Learned ``D_L(a, r)``: ``D_A`` with a retrieval embedding ``u`` (K x M per code type) in place of the
  codebook. Not in the paper: ``u`` is learned after the FDN, on a labelled training cohort, so that the
  cosine of two embedded grids ranks slices as the Dice of their label maps does (``fdn train-embedding``);
  the paper's distances are L2-like while its evaluation scores Dice (bench/diagnose_retrieval.py). The
  engine gets ``u`` from the model bundle (``learned_embeddings``); without it the distance is unavailable.

Modes: ``normal`` (S_normal), ``abnormal`` (S_abnormal), ``sum`` (S_sum = D_normal + D_abnormal, eq. 17)
and ``sum_normalized`` (D_normal / s_normal + D_abnormal / s_abnormal, where s_t is the median of that
distance over ``normalization_pairs`` random pairs of distinct database rows, seeded, computed once per
engine and cached; the paper notes raw S_sum weighs the two terms unevenly). A composite query simply
takes its normal grid from one slice and its abnormal grid from another. Axial context (``context=True``;
not in the paper): the normal term becomes ``sum_o w_o D(q_o, r + o)`` over ``labels.AXIAL_CONTEXT``, the
query's grids ``q_o`` at slice offsets ``o`` of its own volume (``Query.normal_context``) against the rows
``o`` away from row ``r`` in its volume (clamped at the volume's ends; a database stores every slice of a
case in order); ``sum_normalized`` divides it by ``s_normal`` times the sum of the weights.

Scan: for a query, row j of a (P, K) lookup holds the table row of the query's code at position j; a
database row's distance term is the sum over j of lookup[j, code[n, j]]. The scan runs in
``fdn_core.codes.scan``: a compiled numba kernel (multi-threaded, both code types in one pass for the sum
modes, a block of queries per pass with 16 queries per vector instruction, each volume's best slice or each
chunk's top slices reduced on the fly) reading the database's arrays in place, or a torch
``embedding_bag`` fallback when numba is missing. ``threads`` sets the kernel's thread count (default: all
of numba's threads); ``backend`` picks the path (``"auto"``; ``"torch-offsets"`` is the former per-row
index path, kept for benchmarks). bench/bench_search.py compares them. A single volume-wise query with
Hamming or Euclidean distances on a large database first bounds every volume from uint8 tables and then
scans exactly only the volumes that can reach the top (``prune=False``: one exact pass over everything;
same hits either way).
Rows may come in several code segments (``segments``: consecutive (normal, abnormal) arrays, e.g. memory
maps of append-only files) scanned in one call. Volumes are given per volume (``cases`` and
``case_starts``) or derived from per-row ``case_ids``; the engine keeps no per-row strings, and its RAM
beyond the database is the cosine norms (4 bytes per slice per code type, built on the first angular or
learned search; one distance's at a time) plus per-volume arrays (``memory_bytes``).
Sums are float32; the distances reported in hits are recomputed in float64 from the tables, so they match
a float64 brute force to ~1e-12, and the ranking matches it except between candidates closer than float32
rounding (~1e-6 relative). Ties are broken by row order. Top-k uses ``np.argpartition``. An engine is a
snapshot of the arrays it was given: make a new one after changing the database.

Slice-wise search ranks rows; volume-wise search keeps each volume's best slice, ranks volumes and
returns the top Q. Excluded cases (always the query's own volume when it comes from the database) never
appear in results.

Lesion filter (``lesion``; ``labels.LESION_FILTERS``): "any" searches as above; "without" returns only rows
whose ``has_abnormal`` flag is False, "with" only flagged rows (the engine holds the database's per-row flags,
given as ``has_abnormal``: views of the memory maps, no copy). A filtered search forms every row's distance
(no bounds), sets the rows the filter leaves out to +inf and then selects: volume-wise, each volume by its
best eligible slice, and a volume without one is never returned (fewer than ``top`` hits when fewer exist).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fdn_core.codes.scan import (
    KIND_ANGULAR,
    KIND_EUCLIDEAN,
    KIND_HAMMING,
    SELECT_ALL,
    SELECT_TOP,
    SELECT_VOLUME,
    ScanLayout,
    ScanRequest,
    make_backend,
    smallest,
)
from fdn_core.codes.tables import check_codebook, dot_table, hamming_table, squared_euclidean_table
from fdn_core.errors import ConfigError, DataError
from fdn_core.labels import (
    AXIAL_CONTEXT,
    CODE_TYPES,
    DISTANCES,
    MODES,
    available_distances,
    check_lesion_filter,
)

__all__ = ["Hit", "Query", "SearchEngine"]

log = logging.getLogger(__name__)

_MODE_TYPES = {
    "normal": ("normal",),
    "abnormal": ("abnormal",),
    "sum": ("normal", "abnormal"),
    "sum_normalized": ("normal", "abnormal"),
}
_KIND = {
    "hamming": KIND_HAMMING,
    "euclidean": KIND_EUCLIDEAN,
    "angular": KIND_ANGULAR,
    "learned": KIND_ANGULAR,
}
#: Distances that are cosines (per-row norms from the diagonal of their dot table).
_COSINE = tuple(d for d, kind in _KIND.items() if kind == KIND_ANGULAR)
#: Slice-wise searches up to this many results keep each task's top rows in the kernel; larger ones take
#: every distance (N x block float32) and select afterwards.
_TOP_IN_KERNEL = 256
#: Queries per pass of the compiled scan, by number of code types scanned. Its lookup tables take
#: P*K*4 bytes per query and code type (128 KiB at 8x8, K = 512): 32 queries of one type (4 MiB) or 16 of
#: two (2 x 2 MiB) still scan at full speed on a 2-core machine whose L3 is shared, 32 of two types (8 MiB)
#: took 1.7x longer per query than two passes of 16 (bench/bench_search.py; 2026-11).
_PASS_QUERIES = {1: 32, 2: 16}
#: Queries per pass when every row's distance is kept (lesion filter, long slice-wise lists): at 1,000,000
#: rows 8 queries hold 32 MB of distances (a full block of 32 held 128 MB).
_ALL_ROWS_QUERIES = 8
#: Sum of the axial context's weights: the context normal term's typical size over one slice's.
_CONTEXT_WEIGHT = float(sum(w for _, w in AXIAL_CONTEXT))


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
    it) and case ids whose slices must not be returned (the query's own volume). ``normal_context``: the
    normal grids of the query's volume at ``AXIAL_CONTEXT``'s offsets from its slice (clamped to the
    volume; ``labels.context_slices``), one per offset, for searches with ``context=True``."""

    normal: np.ndarray | None = None
    abnormal: np.ndarray | None = None
    exclude_cases: tuple[str, ...] = field(default=())
    normal_context: np.ndarray | None = None


@dataclass
class _CodeType:
    """Per code type (normal or abnormal) tables of the engine."""

    codebook: np.ndarray  # (K, D) float64
    learned: np.ndarray | None = None  # (K, M) float64 retrieval embedding of the codes (distance "learned")
    tables64: dict[str, np.ndarray] = field(default_factory=dict)
    tables32: dict[str, np.ndarray] = field(default_factory=dict)


def _live_runs(segments: Sequence[Any], names: Sequence[str]) -> list[tuple[np.ndarray, ...]]:
    """The arrays ``names`` (e.g. normal_codes, has_abnormal) of every run of live rows of a database's
    segments, in row order: views of the memory maps (no copy), skipping the rows of removed cases
    (tombstones)."""
    runs = []
    for seg in segments:
        alive = np.asarray(seg.alive, dtype=np.int8)
        edges = np.flatnonzero(np.diff(np.concatenate([[0], alive, [0]])))
        for start, stop in zip(edges[::2], edges[1::2], strict=True):
            runs.append(tuple(getattr(seg, name)[start:stop] for name in names))
    return runs


def _shifted(values: np.ndarray, offset: int, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """``values[r + offset]`` for every row ``r``, clamped to the volume ``[starts[v], stops[v])`` holding
    ``r`` (volumes tile the rows in order): one shifted copy, then the ``|offset|`` rows at each volume's
    end (or start) that the shift carried across it read their volume's last (or first) row instead. (An
    index array clamped row by row costs 5x more at 1,000,000 rows.)"""
    if offset == 0:
        return values
    out = np.empty_like(values)
    size = abs(offset)
    if offset > 0:
        out[:-size] = values[size:]
    else:
        out[size:] = values[:-size]
    lengths = stops - starts
    for j in range(1, min(size, int(lengths.max(initial=0))) + 1):
        near = (stops - j) if offset > 0 else (starts + j - 1)
        near = near[lengths >= j]
        owner_lo = np.searchsorted(starts, near, side="right") - 1
        out[near] = values[np.clip(near + offset, starts[owner_lo], stops[owner_lo] - 1)]
    return out


class SearchEngine:
    """Exact table-lookup search over a code database (or equivalent arrays). Thread-safe for queries.

    Build with ``SearchEngine.from_database(db, hamming_bits=...)``. ``hamming_bits`` is a pair
    (normal, abnormal) of binarised codebooks (K, B) as made by ``fdn_core.codes.binarize``;
    ``hamming_tables`` a pair of ready (K, K) tables instead. Without either, Hamming is unavailable.

    Rows: ``normal_codes`` / ``abnormal_codes`` (N, h*w), or ``segments``, a sequence of such
    (normal, abnormal) pairs whose rows follow each other (used in place, never copied: a memory map stays
    in the OS page cache). Volumes: ``cases`` (V names) with ``case_starts`` (V + 1 row boundaries, as
    ``CodeDatabase.case_starts``), or per-row ``case_ids`` (rows of a case contiguous). ``slice_indices``:
    (N,), or one array per segment. ``has_abnormal``: the per-row lesion flags (N,) bool, or one array per
    segment, used in place; searches with a lesion filter need them (``from_database`` passes them).
    ``threads``: threads of the compiled scan (None: numba's default, all cores). ``backend``: ``"auto"``
    (numba, else torch), ``"numba"``, ``"torch"`` or ``"torch-offsets"``. ``task_rows``: rows per unit of
    work handed to a thread (whole volumes; tests make it small).
    """

    def __init__(
        self,
        *,
        normal_codes: np.ndarray | None = None,
        abnormal_codes: np.ndarray | None = None,
        case_ids: np.ndarray | Sequence[str] | None = None,
        slice_indices: np.ndarray | Sequence[Any],
        has_abnormal: np.ndarray | Sequence[Any] | None = None,
        codebook_normal: np.ndarray,
        codebook_abnormal: np.ndarray,
        grid_shape: tuple[int, int] | None = None,
        hamming_bits: tuple[np.ndarray, np.ndarray] | None = None,
        hamming_tables: tuple[np.ndarray, np.ndarray] | None = None,
        learned_embeddings: tuple[np.ndarray, np.ndarray] | None = None,
        normalization_pairs: int = 4096,
        seed: int = 0,
        segments: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
        cases: Sequence[str] | None = None,
        case_starts: np.ndarray | Sequence[int] | None = None,
        threads: int | None = None,
        backend: str = "auto",
        task_rows: int = 8192,
        prune: bool = True,
    ) -> None:
        books = (
            check_codebook(codebook_normal, "normal codebook"),
            check_codebook(codebook_abnormal, "abnormal codebook"),
        )
        k = books[0].shape[0]
        if books[1].shape[0] != k:
            raise DataError(f"the codebooks differ in size: {k} normal vs {books[1].shape[0]} abnormal codes")
        self._k = k
        if segments is None:
            if normal_codes is None or abnormal_codes is None:
                raise ConfigError("give normal_codes and abnormal_codes, or segments")
            segments = [(normal_codes, abnormal_codes)]
        elif normal_codes is not None or abnormal_codes is not None:
            raise ConfigError("give either normal_codes/abnormal_codes or segments, not both")
        n_rows = [int(np.shape(a)[0]) if np.ndim(a) == 2 else 0 for a, _ in segments]
        vol_start, vol_stop, names = self._volumes(case_ids, cases, case_starts, sum(n_rows))
        layout = ScanLayout(segments, k, vol_start, vol_stop, task_rows=task_rows)
        n, p = layout.n, layout.p
        if grid_shape is None:
            grid_shape = (p, 1)
        if int(grid_shape[0]) * int(grid_shape[1]) != p:
            raise DataError(f"grid_shape {tuple(grid_shape)} does not hold the {p} codes per row")
        self._grid = (int(grid_shape[0]), int(grid_shape[1]))
        self._n, self._p = n, p
        self._layout = layout
        self._names = names
        self._volume_of = {c: i for i, c in enumerate(names)}
        self._slices = self._row_arrays(slice_indices, layout, "slice_indices", "integers")
        self._flags: list[np.ndarray] | None = None  # per-segment lesion flags (has_abnormal)
        if has_abnormal is not None:
            self._flags = self._row_arrays(has_abnormal, layout, "has_abnormal", "booleans")
        self._gapped: list[str] | None = None  # cases whose rows are not consecutive slices (axial context)
        self._types = {"normal": _CodeType(books[0]), "abnormal": _CodeType(books[1])}
        if learned_embeddings is not None:
            for t, emb in zip(CODE_TYPES, learned_embeddings, strict=True):
                vec = check_codebook(emb, f"{t} retrieval embedding")
                if vec.shape[0] != k:
                    raise DataError(
                        f"the {t} retrieval embedding has {vec.shape[0]} rows for {k} codes: it belongs to "
                        "another model"
                    )
                self._types[t].learned = vec
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
        # (cosine distance, (2, N) float32 1/|z_r| (0 for all-zero latents), code types filled in)
        self._norms: tuple[str, np.ndarray, set[str]] | None = None
        self._lock = threading.Lock()
        self._backend = make_backend(backend, layout, threads)
        self._prune = bool(prune)
        log.info(
            "search engine: %d slices in %d segment(s), %d volumes; scan: %s",
            n,
            len(segments),
            len(names),
            self._backend.describe,
        )

    @staticmethod
    def _volumes(
        case_ids: Any, cases: Sequence[str] | None, case_starts: Any, n: int
    ) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Per-volume (start, stop, name), from per-volume names and boundaries or from per-row ids."""
        if (cases is None) != (case_starts is None):
            raise ConfigError("give cases and case_starts together")
        if cases is not None:
            if case_ids is not None:
                raise ConfigError("give either case_ids or cases/case_starts, not both")
            names = [str(c) for c in cases]
            bounds = np.asarray(case_starts, dtype=np.int64)
            if bounds.shape != (len(names) + 1,) or (bounds.size and (bounds[0] != 0 or bounds[-1] != n)):
                raise DataError(
                    f"case_starts must hold {len(names) + 1} row boundaries from 0 to {n}, got shape "
                    f"{bounds.shape}"
                )
            if np.any(np.diff(bounds) < 0):
                raise DataError("case_starts must be non-decreasing")
            keep = np.flatnonzero(np.diff(bounds) > 0)  # a case without rows is never a result
            starts, stops = bounds[:-1][keep], bounds[1:][keep]
            names = [names[i] for i in keep]
        else:
            if case_ids is None:
                raise ConfigError("give the cases: case_ids (one per row) or cases and case_starts")
            ids = np.asarray(case_ids)
            if ids.shape != (n,):
                raise DataError(f"case_ids {ids.shape} must have shape ({n},)")
            change = np.flatnonzero(ids[1:] != ids[:-1]) + 1
            starts = np.concatenate([[0], change]).astype(np.int64) if n else np.zeros(0, np.int64)
            stops = np.concatenate([change, [n]]).astype(np.int64) if n else np.zeros(0, np.int64)
            names = [str(c) for c in ids[starts]]
        if len(set(names)) != len(names):
            raise DataError("rows of one case must be contiguous (sort the rows by case id first)")
        return starts, stops, names

    @staticmethod
    def _row_arrays(values: Any, layout: ScanLayout, name: str, kind: str) -> list[np.ndarray]:
        """A per-row array (``name``: slice indices, "integers", or lesion flags, "booleans") split per
        segment (views of what was given; no copy of an (N,) array)."""
        if isinstance(values, Sequence) and values and isinstance(values[0], np.ndarray):
            parts = [np.asarray(a) for a in values]
        else:
            whole = np.asarray(values)
            if whole.ndim != 1:
                raise DataError(f"{name} must have shape ({layout.n},), got {whole.shape}")
            b = layout.seg_start
            parts = [whole[b[s] : b[s + 1]] for s in range(b.size - 1)] if whole.size == layout.n else [whole]
        sizes = [a.shape for a in parts]
        dtype = np.integer if kind == "integers" else np.bool_
        if sizes != [(int(r),) for r in layout.seg_rows] or not all(
            np.issubdtype(a.dtype, dtype) for a in parts
        ):
            raise DataError(
                f"{name} must be {kind} with shape ({layout.n},) (or one array per segment), got "
                f"{[f'{a.dtype} {a.shape}' for a in parts]}"
            )
        return parts

    @classmethod
    def from_database(cls, db: Any, **kwargs: Any) -> SearchEngine:
        """An engine over a ``CodeDatabase`` (its memory-mapped arrays, lesion flags included, are used as
        they are)."""
        if hasattr(db, "cases") and not db.cases:
            where = getattr(db, "path", "the database")
            raise DataError(
                f"{where}: the database holds no cases (none added, or every case removed); add cases with "
                "`fdn index add` (or build it again) before searching"
            )
        if callable(getattr(db, "segments", None)):  # append-only databases: memory-mapped segments
            runs = _live_runs(db.segments(), ("normal_codes", "abnormal_codes", "has_abnormal"))
            rows: dict[str, Any] = {
                "segments": [(normal, abnormal) for normal, abnormal, _ in runs],
                "has_abnormal": [flags for _, _, flags in runs],
            }
        else:
            rows = {
                "normal_codes": db.normal_codes,
                "abnormal_codes": db.abnormal_codes,
                "has_abnormal": getattr(db, "has_abnormal", None),
            }
        if hasattr(db, "case_starts") and hasattr(db, "cases"):
            volumes: dict[str, Any] = {"cases": db.cases, "case_starts": db.case_starts}
        else:
            volumes = {"case_ids": db.case_ids}
        return cls(
            **rows,
            **volumes,
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
    def has_learned(self) -> bool:
        """Whether the learned distance is available (the engine was given retrieval embeddings)."""
        return self._types["normal"].learned is not None

    @property
    def offered_distances(self) -> tuple[str, ...]:
        """The distances this engine offers (the learned one only with retrieval embeddings)."""
        return available_distances(self.has_learned)

    @property
    def has_lesion_flags(self) -> bool:
        """Whether the engine holds the per-row lesion flags (searches with a lesion filter need them)."""
        return self._flags is not None

    @property
    def has_hamming(self) -> bool:
        """Whether Hamming tables were given."""
        return "hamming" in self._types["normal"].tables64

    @property
    def backend(self) -> str:
        """The scan path in use: ``numba``, ``torch`` or ``torch-offsets``."""
        return self._backend.name

    @property
    def threads(self) -> int | None:
        """Threads of the compiled scan (None for the torch paths, which follow torch's setting)."""
        return self._backend.threads

    def memory_bytes(self) -> dict[str, int]:
        """RAM the engine holds beyond the database arrays. ``rows`` grows with N: the cosine norms (4 bytes
        per slice per code type, once an angular or learned search ran; one distance's), copies of code
        arrays that were not C-contiguous uint8/uint16, and the ``torch-offsets`` path's indices;
        ``volumes`` grows with the number of cases (boundaries and names); ``tables`` is fixed (K x K tables
        built so far)."""
        rows = self._layout.copied_bytes + self._backend.row_bytes()
        if self._norms is not None:
            rows += self._norms[1].nbytes
        lay = self._layout
        volumes = lay.vol_start.nbytes + lay.vol_stop.nbytes + lay.tasks.nbytes
        volumes += sum(len(c.encode()) + 57 + 8 for c in self._names)  # str objects + list slots (CPython)
        tables = 0
        for ct in self._types.values():
            tables += sum(t.nbytes for t in ct.tables32.values())
            tables += sum(t.nbytes for t in ct.tables64.values())
        return {"rows": rows, "volumes": volumes, "tables": tables}

    def scan_floor(self, code_type: str = "normal") -> int:
        """Read one code type's arrays once with the compiled kernel (a memory-bandwidth reference for
        benchmarks); returns the sum of the codes. numba backend only."""
        if self._backend.name != "numba":
            raise ConfigError("scan_floor needs the numba backend")
        return self._backend.sum_codes(code_type)  # type: ignore[union-attr]

    # ------------------------------------------------------------------ rows
    def _row_codes(self, code_type: str, row: int) -> np.ndarray:
        lay = self._layout
        s = int(np.searchsorted(lay.seg_start, row, side="right")) - 1
        return np.asarray(lay.codes[code_type][s][row - int(lay.seg_start[s])])

    def _volume_of_rows(self, rows: np.ndarray) -> np.ndarray:
        return np.searchsorted(self._layout.vol_start, rows, side="right") - 1

    def _slice_index(self, rows: np.ndarray) -> np.ndarray:
        lay = self._layout
        segs = np.searchsorted(lay.seg_start, rows, side="right") - 1
        return np.asarray(
            [int(self._slices[s][r - lay.seg_start[s]]) for s, r in zip(segs.tolist(), rows.tolist())],
            dtype=np.int64,
        )

    # ------------------------------------------------------------------ queries
    def query_from_rows(self, normal_row: int, abnormal_row: int | None = None) -> Query:
        """A query made of database rows: normal grid of ``normal_row``, abnormal grid of ``abnormal_row``
        (default: the same row; a different row makes a composite query). Both rows' volumes are excluded.
        """
        rows = [normal_row, normal_row if abnormal_row is None else abnormal_row]
        for r in rows:
            if not isinstance(r, int | np.integer) or not 0 <= int(r) < self._n:
                raise DataError(f"row {r!r} is not in the database (0..{self._n - 1})")
        vols = self._volume_of_rows(np.asarray(rows, dtype=np.int64))
        excl = tuple(dict.fromkeys(self._names[v] for v in vols.tolist()))
        offsets = np.asarray([o for o, _ in AXIAL_CONTEXT], dtype=np.int64)
        around = self._context_rows(np.full(offsets.size, rows[0], dtype=np.int64), offsets)
        return Query(
            normal=self._row_codes("normal", int(rows[0])),
            abnormal=self._row_codes("abnormal", int(rows[1])),
            exclude_cases=excl,
            normal_context=np.stack([self._row_codes("normal", int(r)) for r in around]),
        )

    def _context_rows(self, rows: np.ndarray, offset: int | np.ndarray) -> np.ndarray:
        """``rows + offset`` (one offset, or one per row), each clamped to its own volume (the neighbouring
        stored slice)."""
        lay = self._layout
        v = self._volume_of_rows(rows)
        return np.clip(rows + offset, lay.vol_start[v], lay.vol_stop[v] - 1)

    def row_of(self, case_id: str, slice_index: int) -> int:
        """The database row of one case's slice."""
        v = self._volume_of.get(case_id)
        if v is None:
            raise DataError(f"case {case_id!r} is not in the database")
        lo, hi = int(self._layout.vol_start[v]), int(self._layout.vol_stop[v])
        hit = np.flatnonzero(self._slice_index(np.arange(lo, hi)) == slice_index)
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
            if distance == "learned" and ct.learned is None:
                raise ConfigError(
                    "the learned distance needs the model's retrieval embedding: open the search with a "
                    "model bundle that has one (`fdn train-embedding`), or choose euclidean, angular or "
                    "hamming"
                )
            with self._lock:
                if distance not in ct.tables64:
                    if distance == "euclidean":
                        ct.tables64[distance] = squared_euclidean_table(ct.codebook)
                    else:
                        vectors = ct.learned if distance == "learned" else ct.codebook
                        assert vectors is not None
                        ct.tables64[distance] = dot_table(vectors)
        return ct.tables64[distance]

    def _table32(self, t: str, distance: str) -> np.ndarray:
        ct = self._types[t]
        if distance not in ct.tables32:
            tab = np.ascontiguousarray(self._table64(t, distance), dtype=np.float32)
            with self._lock:
                ct.tables32.setdefault(distance, tab)
        return ct.tables32[distance]

    def _inv_norms(self, types: tuple[str, ...], distance: str = "angular") -> np.ndarray:
        """(len(types), N) float32 1/|z_r| of the given code types under cosine ``distance`` (a view of the
        engine's (2, N) array for that distance)."""
        # One cosine distance's norms at a time (4 bytes per slice per code type): switching between angular
        # and learned recomputes them (one plain scan, about one query's time) instead of holding both, so
        # the engine stays within its RAM target (bench/bench_search.py).
        with self._lock:
            if self._norms is None or self._norms[0] != distance:
                self._norms = (distance, np.zeros((2, self._n), np.float32), set())
            _, inv, done = self._norms
        for t in types:
            if t in done:
                continue
            sq = np.diagonal(self._table32(t, distance))
            lut = np.ascontiguousarray(np.broadcast_to(sq, (self._p, self._k)).reshape(1, -1))
            req = ScanRequest(
                types=(t,),
                luts=lut,
                lanes=1,
                n_queries=1,
                kind=KIND_HAMMING,  # the plain sum: |z_r|^2
                inv_q=np.zeros((1, 1), np.float32),
                inv_r=np.zeros((1, 0), np.float32),
                weight=np.ones(1, np.float32),
                excluded=np.zeros((0, 3), np.int64),
                select=SELECT_ALL,
            )
            norms = self._backend.run(req)[0][:, 0, 0]
            np.sqrt(np.maximum(norms, 0, out=norms), out=norms)
            with self._lock:
                if t not in done:
                    np.divide(np.float32(1.0), norms, out=inv[CODE_TYPES.index(t)], where=norms > 0)
                    done.add(t)
        if len(types) == 2:
            return inv
        i = CODE_TYPES.index(types[0])
        return inv[i : i + 1]

    # ------------------------------------------------------------------ exact (float64) distances
    def _exact_term(self, t: str, distance: str, q: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """float64 distance of one code type between query codes ``q`` ((P,), or (R, P): one query per
        row) and database ``rows`` (R,)."""
        return self._exact_pairs(t, distance, q, self._layout.rows_codes(t, rows))

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
                d = self._exact_pairs(
                    code_type,
                    distance,
                    self._layout.rows_codes(code_type, i),
                    self._layout.rows_codes(code_type, j),
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

    def _request(
        self,
        qcodes: dict[str, np.ndarray],
        excluded: Sequence[list[int]],
        distance: str,
        mode: str,
        select: int,
        top: int = 0,
        prune: int = 0,
    ) -> ScanRequest:
        """The scan of a block of B queries (``qcodes[t]`` (B, P)): lookup tables, norms and weights."""
        types = _MODE_TYPES[mode]
        b = len(excluded)
        lanes = 1 if b == 1 else 16 * -(-b // 16)
        p, k = self._p, self._k
        luts = np.zeros((len(types), p * k * lanes), np.float32)
        inv_q = np.zeros((len(types), lanes), np.float32)
        weight = np.ones(len(types), np.float32)
        for ti, t in enumerate(types):
            q = qcodes[t]
            table = self._table32(t, distance)
            if lanes == 1:
                luts[ti] = table[q[0]].reshape(-1)
            else:
                luts[ti].reshape(p, k, lanes)[:, :, :b] = table[q].transpose(1, 2, 0)
            if distance in _COSINE:
                qn = np.sqrt(np.diagonal(self._table64(t, distance))[q].sum(axis=1))
                inv = np.zeros_like(qn)
                np.divide(1.0, qn, out=inv, where=qn > 0)
                inv_q[ti, :b] = inv
            if mode == "sum_normalized":
                weight[ti] = np.float32(1.0 / self.scale(distance, t))
        rows = self._layout
        ex = [
            (int(rows.vol_start[v]), int(rows.vol_stop[v]), qi)
            for qi, vols in enumerate(excluded)
            for v in vols
        ]
        return ScanRequest(
            types=types,
            luts=luts,
            lanes=lanes,
            n_queries=b,
            kind=_KIND[distance],
            inv_q=inv_q,
            inv_r=(
                self._inv_norms(types, distance)
                if distance in _COSINE
                else np.zeros((len(types), 0), np.float32)
            ),
            weight=weight,
            excluded=np.asarray(ex, dtype=np.int64).reshape(-1, 3),
            select=select,
            top=top,
            prune=prune,
        )

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
        out = self._backend.run(self._request(qcodes, [[]], distance, mode, SELECT_ALL))[0]
        return out[:, 0, 0].astype(np.float64)

    def search(
        self,
        query: Query,
        *,
        distance: str = "euclidean",
        mode: str = "sum",
        top: int = 10,
        per: str = "volume",
        context: bool = False,
        lesion: str = "any",
    ) -> list[Hit]:
        """Top ``top`` results for one query: per ``"volume"`` (best slice of each volume) or ``"slice"``;
        ``context`` and ``lesion``: see ``search_many``."""
        return self.search_many(
            [query], distance=distance, mode=mode, top=top, per=per, context=context, lesion=lesion
        )[0]

    def search_many(
        self,
        queries: Sequence[Query],
        *,
        distance: str = "euclidean",
        mode: str = "sum",
        top: int = 10,
        per: str = "volume",
        block: int = 32,
        context: bool = False,
        lesion: str = "any",
    ) -> list[list[Hit]]:
        """Like ``search`` for many queries; ``block`` queries share each pass over the database (with the
        compiled scan at most 32, or 16 for the sum modes: beyond that its lookup tables leave the cache).
        ``context``: the normal term spans the axial context (``_search_context``; each query needs its
        ``normal_context``); the abnormal-only mode is unchanged. ``lesion`` (``labels.LESION_FILTERS``):
        "without" returns only slices whose lesion flag is False, "with" only flagged ones; both form every
        row's distance (no bounds) and need an engine with the flags."""
        self._check_names(distance, mode)
        lesion = self._check_lesion(lesion)
        if per not in ("volume", "slice"):
            raise ConfigError(f"per must be 'volume' or 'slice', got {per!r}")
        if isinstance(top, bool) or not isinstance(top, int | np.integer) or top < 1:
            raise ConfigError(f"top must be a positive integer, got {top!r}")
        if block < 1:
            raise ConfigError(f"block must be >= 1, got {block}")
        top = int(top)
        types = _MODE_TYPES[mode]
        parsed = [
            ({t: self._query_codes(getattr(q, t), t) for t in types}, self._excluded_volumes(q))
            for q in queries
        ]
        results: list[list[Hit]] = []
        if self._n == 0:
            return [[] for _ in parsed]
        if context and "normal" in types:
            neighbours = [self._context_codes(q) for q in queries]
            return [
                self._search_context(codes, excl, around, distance, mode, top, per, lesion)
                for (codes, excl), around in zip(parsed, neighbours, strict=True)
            ]
        if lesion != "any":
            select = SELECT_ALL  # every row's distance, then the filter (``_select``)
        elif per == "volume":
            select = SELECT_VOLUME
        else:
            select = SELECT_TOP if top <= _TOP_IN_KERNEL else SELECT_ALL
        step = min(block, _PASS_QUERIES[len(types)]) if self._backend.name == "numba" else block
        if select == SELECT_ALL:  # every row's distance is held per query: N x step values, not N x 32
            step = min(step, _ALL_ROWS_QUERIES)
        for s in range(0, len(parsed), step):
            chunk = parsed[s : s + step]
            qcodes = {t: np.stack([c[0][t] for c in chunk]) for t in types}
            prune = top if select == SELECT_VOLUME and len(chunk) == 1 and self._prune else 0
            req = self._request(qcodes, [c[1] for c in chunk], distance, mode, select, top, prune)
            val, row = self._backend.run(req)
            for b, (codes, excl) in enumerate(chunk):
                if select == SELECT_VOLUME:
                    rows = row[smallest(np.ascontiguousarray(val[:, b, 0]), top), b, 0]  # excluded: inf
                elif select == SELECT_TOP:
                    v, r = val[:, b, :].ravel(), row[:, b, :].ravel()
                    keep = np.flatnonzero(np.isfinite(v))
                    rows = r[keep[np.lexsort((r[keep], v[keep]))[:top]]]
                elif lesion != "any":
                    rows = self._select(np.ascontiguousarray(val[:, b, 0]), excl, per, top, lesion)
                else:
                    rows = smallest(np.ascontiguousarray(val[:, b, 0]), top)
                results.append(self._hits(codes, rows, distance, mode))
        return results

    def _check_lesion(self, lesion: str) -> str:
        """``lesion`` as a ``LESION_FILTERS`` name; a filter other than "any" needs the engine's flags."""
        name = check_lesion_filter(lesion)
        if name != "any" and self._flags is None:
            raise DataError(
                f"a search with lesion filter {name!r} needs each slice's lesion flag (has_abnormal), and "
                "this search engine was built without them: build it with SearchEngine.from_database(db) or "
                "pass has_abnormal=..., or search with lesion='any'"
            )
        return name

    def _select(self, total: np.ndarray, excluded: list[int], per: str, top: int, lesion: str) -> np.ndarray:
        """The rows of the ``top`` hits from every row's distance ``total`` (N,), changed in place: the
        ``excluded`` volumes and the rows ``lesion`` leaves out become +inf; then the smallest rows, or per
        volume its best finite row (a volume with none is never picked). Ties by row."""
        lay = self._layout
        for v in excluded:
            total[lay.vol_start[v] : lay.vol_stop[v]] = np.inf
        if lesion != "any":
            assert self._flags is not None
            for s, flags in enumerate(self._flags):
                left_out = flags if lesion == "without" else ~np.asarray(flags)
                np.copyto(total[lay.seg_start[s] : lay.seg_start[s + 1]], np.inf, where=left_out)
        if per == "slice":
            return smallest(total, top)
        volumes = smallest(np.minimum.reduceat(total, lay.vol_start), top)
        return np.asarray(
            [lay.vol_start[v] + int(np.argmin(total[lay.vol_start[v] : lay.vol_stop[v]])) for v in volumes],
            dtype=np.int64,
        )

    def _context_codes(self, query: Query) -> np.ndarray:
        """(len(AXIAL_CONTEXT), P) normal codes of the query's axial context, checked."""
        arr = query.normal_context
        if arr is None:
            raise DataError(
                "a search with axial context needs the normal codes of the query's neighbouring slices "
                "(Query.normal_context); queries made by SearchEngine.query_from_rows or a Retriever carry "
                "them, or search without context"
            )
        a = np.asarray(arr)
        if a.ndim < 2 or a.shape[0] != len(AXIAL_CONTEXT):
            raise DataError(
                f"Query.normal_context must hold {len(AXIAL_CONTEXT)} code grids (one per axial offset "
                f"{[o for o, _ in AXIAL_CONTEXT]}), got shape {a.shape}"
            )
        grids = np.stack([self._query_codes(g, "normal context") for g in a])
        centre = [o for o, _ in AXIAL_CONTEXT].index(0)
        if query.normal is not None and not np.array_equal(
            grids[centre], self._query_codes(query.normal, "normal")
        ):
            raise DataError(
                "Query.normal_context's grid at offset 0 is not the query's normal grid: the context must be "
                "taken around the query slice itself"
            )
        return grids

    def _search_context(
        self,
        codes: dict[str, np.ndarray],
        excluded: list[int],
        around: np.ndarray,
        distance: str,
        mode: str,
        top: int,
        per: str,
        lesion: str,
    ) -> list[Hit]:
        """One search whose normal term is ``sum_o w_o D(query slice + o, row + o)`` over ``AXIAL_CONTEXT``
        (rows shifted within their volume, clamped at its ends): one scan gives every row's distance to
        each offset's query grid (a batch of queries), read back at the shifted rows; the sum modes add
        one scan of the abnormal term. Every row's distance is formed (no bounds), then selected
        (``_select``: exclusion and the lesion filter)."""
        lay, n = self._layout, self._n
        self._check_contiguous_slices()
        req = self._request({"normal": around}, [[] for _ in around], distance, "normal", SELECT_ALL)
        each = self._backend.run(req)[0]
        total = np.zeros(n)
        for i, (offset, w) in enumerate(AXIAL_CONTEXT):
            total += w * _shifted(each[:, i, 0], offset, lay.vol_start, lay.vol_stop)
        del each
        if mode != "normal":
            req = self._request({"abnormal": codes["abnormal"][None]}, [[]], distance, "abnormal", SELECT_ALL)
            abnormal = self._backend.run(req)[0][:, 0, 0]
            if mode == "sum":
                total += abnormal
            else:
                total = total / self._normal_scale(distance, True) + abnormal / self.scale(
                    distance, "abnormal"
                )
        return self._hits(codes, self._select(total, excluded, per, top, lesion), distance, mode, around)

    def _check_contiguous_slices(self) -> None:
        """Axial context shifts rows within a volume, so each volume must store consecutive slices in order
        (as ``fdn index`` does: every slice of a case, 1 apart); other cases are refused by name. Checked
        once per engine over every row (one pass over the slice indices)."""
        if self._gapped is None:
            lay = self._layout
            slices = np.concatenate(
                [np.asarray(s, dtype=np.int64) for s in self._slices] or [np.zeros(0, np.int64)]
            )
            step = np.diff(slices) != 1
            step[lay.vol_stop[:-1] - 1] = False  # between volumes anything goes
            bad = np.unique(self._volume_of_rows(np.flatnonzero(step)))
            self._gapped = [self._names[int(v)] for v in bad[:3]]
        if self._gapped:
            raise DataError(
                f"case(s) {self._gapped} do not store consecutive axial slices in order, so neighbouring "
                "rows are not neighbouring slices and axial context would compare the wrong anatomy; search "
                "without context, or index every slice of those cases (fdn index add stores them all)"
            )

    def _normal_scale(self, distance: str, context: bool) -> float:
        """``sum_normalized``'s divisor of the normal term (with context: one slice's times the weights)."""
        return self.scale(distance, "normal") * (_CONTEXT_WEIGHT if context else 1.0)

    def _hits(
        self,
        codes: dict[str, np.ndarray],
        rows: np.ndarray,
        distance: str,
        mode: str,
        around: np.ndarray | None = None,
    ) -> list[Hit]:
        """Hits for ``rows`` with distances recomputed in float64, re-sorted by (distance, row); ``around``:
        the query's axial context (the normal term spans it)."""
        if rows.size == 0:
            return []
        terms = {t: self._exact_term(t, distance, codes[t], rows) for t in _MODE_TYPES[mode]}
        if around is not None and "normal" in terms:
            terms["normal"] = sum(
                (
                    w * self._exact_term("normal", distance, around[i], self._context_rows(rows, offset))
                    for i, (offset, w) in enumerate(AXIAL_CONTEXT)
                ),
                np.zeros(rows.size),
            )
        if mode in ("normal", "abnormal"):
            total = terms[mode]
        elif mode == "sum":
            total = terms["normal"] + terms["abnormal"]
        else:
            total = terms["normal"] / self._normal_scale(distance, around is not None) + terms[
                "abnormal"
            ] / self.scale(distance, "abnormal")
        order = np.lexsort((rows, total))
        vols = self._volume_of_rows(rows)
        slices = self._slice_index(rows)
        return [
            Hit(
                rank=rank,
                row=int(rows[i]),
                case_id=self._names[int(vols[i])],
                slice_index=int(slices[i]),
                distance=float(total[i]),
                distance_normal=float(terms["normal"][i]) if "normal" in terms else None,
                distance_abnormal=float(terms["abnormal"][i]) if "abnormal" in terms else None,
            )
            for rank, i in enumerate(order, 1)
        ]
