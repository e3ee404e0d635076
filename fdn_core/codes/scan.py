"""Scan backends of the search engine: one pass over the stored code grids per block of queries.

The engine (``fdn_core.codes.search``) turns a block of B queries into per-code-type lookup tables and asks
a backend to scan every row. A backend sums, per row and query, the table entries of the row's codes over
all positions (both code types in one pass for the ``sum`` modes), turns the sums into the mode's distance
and reduces it right away: every distance (``SELECT_ALL``), each volume's best slice (``SELECT_VOLUME``)
or each task's ``top`` nearest slices (``SELECT_TOP``); the engine merges the small results.

Backends:

- ``numba`` (default when numba imports): the compiled kernel of ``_scan_numba``, multi-threaded over
  tasks, reading the database's arrays in place (uint16, or uint8 when stored so) and allocating nothing
  per row.
- ``torch`` (fallback without numba), on chunks of at most ``_CHUNK_ROWS`` rows with numpy reductions: a
  single query sums ``np.take`` of each position's table row, a batch runs ``embedding_bag`` over the
  chunk's int32 index (a 16 MiB buffer reused). Several times slower than the kernel for single queries
  (bench/bench_search.py), no per-row memory either.
- ``torch-offsets``: the engine's former path, kept for benchmarks: int32 indices of every row built once
  and kept (4 bytes per position per code type and slice), one ``embedding_bag`` call per segment.

Rows live in ``segments``: consecutive (normal, abnormal) code arrays whose rows follow each other in the
engine's row order (a database's live segments, ``CodeDatabase.segments()``). Volumes
(the rows of one case) are contiguous and never cross a segment boundary. ``tasks`` cut the rows into
ranges of whole volumes inside one segment, about ``task_rows`` rows each; numba's threads take them one at
a time (dynamic scheduling), and each volume's best slice is reduced by the one task that holds it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fdn_core.errors import ConfigError, DataError

__all__ = [
    "BACKENDS",
    "KIND_ANGULAR",
    "KIND_EUCLIDEAN",
    "KIND_HAMMING",
    "SELECT_ALL",
    "SELECT_TOP",
    "SELECT_VOLUME",
    "ScanLayout",
    "ScanRequest",
    "make_backend",
    "numba_status",
    "smallest",
]

log = logging.getLogger(__name__)

BACKENDS = ("auto", "numba", "torch", "torch-offsets")
KIND_HAMMING, KIND_EUCLIDEAN, KIND_ANGULAR = 0, 1, 2
SELECT_ALL, SELECT_VOLUME, SELECT_TOP = 0, 1, 2

#: Work (rows x code types, x 5 per 16 batched queries) each thread of a scan must have: about 10 ms of
#: one thread, far more than waking a thread costs even on a loaded machine (small scans run on fewer).
_WORK_PER_THREAD = 1 << 18
#: Rows per chunk of the torch fallback (its int32 index is 4 * P bytes per row: 16 MiB at 8x8 grids).
_CHUNK_ROWS = 1 << 16

#: Row x code-type count from which single queries scan bounds first: below it the fixed cost of the
#: bounded search (uint8 tables, three kernel calls: about 1-3 ms) exceeds its saving. Measured
#: (K = 512, 2 threads, median of 31 queries): 20,000 rows 2.4 ms bounded against 1.5 ms one pass (`sum`
#: 5.9 against 3.0), 155,000 rows 8.9 against 10.1 (`sum` 20.7 against 19.2), 1,000,000 rows 17.7 against
#: 22.3 (`sum` 46.4 against 53.6).
_PRUNE_MIN_WORK = 1 << 19

# numba's default threading layer outside OpenMP/TBB ("workqueue") must not be entered by two threads at
# once; one scan already uses every thread, so scans are serialised process-wide.
_KERNEL_LOCK = threading.Lock()
_STATUS_LOCK = threading.Lock()
_numba_state: dict[str, Any] = {}


def numba_status() -> tuple[Any, str]:
    """(the ``_scan_numba`` module or None, a one-line description). Imports numba once per process (under
    a lock: engines are built in worker threads)."""
    with _STATUS_LOCK:
        return _numba_status()


def _numba_status() -> tuple[Any, str]:
    if "module" not in _numba_state:
        try:
            module = importlib.import_module("fdn_core.codes._scan_numba")
            version = importlib.metadata.version("numba")
            _numba_state["module"] = module
            _numba_state["why"] = f"numba {version}"
        except Exception as exc:  # ImportError, or a numba/llvmlite that does not fit this numpy
            _numba_state["module"] = None
            _numba_state["why"] = f"numba unavailable ({type(exc).__name__}: {exc})"
            log.warning(
                "search: %s; scanning with the slower numpy/torch fallback (pip install numba for the "
                "compiled kernel)",
                _numba_state["why"],
            )
    return _numba_state["module"], _numba_state["why"]


@dataclass
class ScanRequest:
    """One scan: ``luts`` (T, P*K*lanes) float32 holds, for each code type used (T = 1 or 2: normal then
    abnormal for the sum modes) and each (position j, code c), the entries of the B queries at
    ``(j*K + c)*lanes + b`` (lanes = 1 for one query, else B rounded up to a multiple of 16, padded with 0).
    A row's distance is ``sum_t weight[t] * term_t`` with ``term_t`` = the sum (Hamming), its square root
    (Euclidean) or ``1 - sum * inv_r[t, row] * inv_q[t, b]`` (angular). ``excluded`` (E, 3) int64: rows
    ``[first, stop)`` are +inf for query b."""

    types: tuple[str, ...]
    luts: np.ndarray
    lanes: int
    n_queries: int
    kind: int
    inv_q: np.ndarray  # (T, lanes) float32
    inv_r: np.ndarray  # (T, N) float32 for angular, else (T, 0)
    weight: np.ndarray  # (T,) float32
    excluded: np.ndarray  # (E, 3) int64
    select: int
    top: int = 0
    #: > 0 (one query, ``SELECT_VOLUME``): only the ``prune`` nearest volumes are needed; a backend may
    #: leave the others at +inf (row -1). The numba backend then scans bounds first (``_pruned``).
    prune: int = 0


class ScanLayout:
    """The rows an engine scans: code segments, volumes and the task partition.

    ``segments``: (normal, abnormal) integer code arrays of shape (n_s, P) in row order. Arrays that are
    C-contiguous uint8/uint16 are used in place (memory maps stay memory maps); any other dtype or layout
    is copied once (logged, and counted by ``copied_bytes``). ``vol_start`` / ``vol_stop``: (V,) global row
    range of each volume, contiguous and covering every row.
    """

    def __init__(
        self,
        segments: Sequence[tuple[Any, Any]],
        k: int,
        vol_start: np.ndarray,
        vol_stop: np.ndarray,
        task_rows: int = 8192,
    ) -> None:
        if not segments:
            raise DataError("the search engine needs at least one code segment")
        self.k = int(k)
        self.copied_bytes = 0
        arrays: dict[str, list[np.ndarray]] = {"normal": [], "abnormal": []}
        for s, pair in enumerate(segments):
            if len(pair) != 2:
                raise DataError(f"segment {s} must be a (normal_codes, abnormal_codes) pair")
            for name, arr in zip(("normal", "abnormal"), pair, strict=True):
                arrays[name].append(self._check_codes(arr, f"segment {s} {name} codes"))
        shapes = [(a.shape, b.shape) for a, b in zip(arrays["normal"], arrays["abnormal"], strict=True)]
        for s, (sn, sa) in enumerate(shapes):
            if sn != sa:
                raise DataError(f"segment {s}: normal codes {sn} and abnormal codes {sa} differ in shape")
        p = {sn[1] for sn, _ in shapes}
        if len(p) != 1:
            raise DataError(f"segments differ in code positions per row: {sorted(p)}")
        self.p = p.pop()
        dtypes = {a.dtype for name in arrays for a in arrays[name]}
        if len(dtypes) > 1:  # mixed uint8 / uint16 segments: one dtype; _copy copies only the uint8 ones
            for name in arrays:
                arrays[name] = [self._copy(a, np.uint16, "segments of mixed dtypes") for a in arrays[name]]
        self.codes = arrays
        self.dtype = arrays["normal"][0].dtype
        rows = np.asarray([a.shape[0] for a in arrays["normal"]], dtype=np.int64)
        self.seg_rows = rows
        self.seg_start = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
        self.n = int(self.seg_start[-1])
        self.addrs = np.asarray(
            [[a.__array_interface__["data"][0] for a in arrays[name]] for name in ("normal", "abnormal")],
            dtype=np.int64,
        )
        self.vol_start = np.ascontiguousarray(vol_start, dtype=np.int64)
        self.vol_stop = np.ascontiguousarray(vol_stop, dtype=np.int64)
        self.tasks = self._make_tasks(int(task_rows))

    def _check_codes(self, arr: Any, where: str) -> np.ndarray:
        a = np.asarray(arr)
        if a.ndim != 2 or not np.issubdtype(a.dtype, np.integer):
            raise DataError(f"{where} must be an integer (N, h*w) array, got {a.dtype} {a.shape}")
        if a.size:  # the kernel reads table entries at these indices unchecked: validate them once
            step = max(1, (1 << 22) // max(1, a.shape[1]))
            lo = min(int(a[s : s + step].min()) for s in range(0, a.shape[0], step))
            hi = max(int(a[s : s + step].max()) for s in range(0, a.shape[0], step))
            if lo < 0 or hi >= self.k:
                raise DataError(f"{where} must lie in [0, {self.k}); found {lo}..{hi}")
        if a.dtype not in (np.uint8, np.uint16):
            return self._copy(a, np.uint16 if self.k > 256 or a.dtype.itemsize > 1 else np.uint8, where)
        if not a.flags.c_contiguous:
            return self._copy(a, a.dtype, where)
        return a

    def _copy(self, a: np.ndarray, dtype: Any, where: str) -> np.ndarray:
        out = np.ascontiguousarray(a, dtype=dtype)
        if out is not a and not np.shares_memory(out, a):
            self.copied_bytes += out.nbytes
            log.info(
                "search: %s are %s %s; scanning a %s copy (%.1f MB; store C-contiguous uint16 to avoid it)",
                where,
                a.dtype,
                "C-contiguous" if a.flags.c_contiguous else "strided",
                out.dtype,
                out.nbytes / 1e6,
            )
        return out

    def _make_tasks(self, task_rows: int) -> np.ndarray:
        """(M, 5) int64: segment, first row, stop row, first volume, first row within the segment."""
        seg_of_start = np.searchsorted(self.seg_start, self.vol_start, side="right") - 1
        seg_of_last = np.searchsorted(self.seg_start, self.vol_stop - 1, side="right") - 1
        crossing = np.flatnonzero(seg_of_start != seg_of_last)
        if crossing.size:
            v = int(crossing[0])
            raise DataError(
                f"volume {v} (rows {self.vol_start[v]}..{self.vol_stop[v] - 1}) spans two code segments; "
                "a case's rows must lie in one segment"
            )
        tasks: list[tuple[int, int, int, int, int]] = []
        v, n_vol = 0, self.vol_start.size
        while v < n_vol:
            seg = int(seg_of_start[v])
            first = int(self.vol_start[v])
            w = v
            while w < n_vol and seg_of_start[w] == seg and self.vol_stop[w] - first <= task_rows:
                w += 1
            w = max(w, v + 1)  # a volume larger than task_rows is a task of its own
            tasks.append((seg, first, int(self.vol_stop[w - 1]), v, first - int(self.seg_start[seg])))
            v = w
        return np.asarray(tasks, dtype=np.int64).reshape(-1, 5)

    def volume_tasks(self, volumes: np.ndarray) -> np.ndarray:
        """Tasks (as ``tasks``) scanning only ``volumes``, one task per volume, in volume order."""
        v = np.sort(np.asarray(volumes, dtype=np.int64))
        seg = np.searchsorted(self.seg_start, self.vol_start[v], side="right") - 1
        first = self.vol_start[v]
        return np.stack([seg, first, self.vol_stop[v], v, first - self.seg_start[seg]], axis=1).astype(
            np.int64
        )

    def rows_codes(self, code_type: str, rows: np.ndarray) -> np.ndarray:
        """(R, P) codes of global ``rows`` (int64) of one code type, gathered across segments."""
        rows = np.asarray(rows, dtype=np.int64)
        segs = self.codes[code_type]
        if len(segs) == 1:
            return np.asarray(segs[0][rows], dtype=np.int64)
        out = np.empty((rows.size, self.p), dtype=np.int64)
        which = np.searchsorted(self.seg_start, rows, side="right") - 1
        for s in np.unique(which):
            sel = which == s
            out[sel] = segs[s][rows[sel] - self.seg_start[s]]
        return out


class _NumbaBackend:
    name = "numba"

    def __init__(self, layout: ScanLayout, threads: int | None) -> None:
        module, why = numba_status()
        if module is None:
            raise ConfigError(f"the numba scan backend was requested, but {why}")
        import numba

        self._kernels = module
        self._numba = numba
        self._layout = layout
        self._proto = np.zeros(0, dtype=layout.dtype)
        limit = int(numba.config.NUMBA_NUM_THREADS)
        self.threads = limit if threads is None else max(1, min(int(threads), limit))
        self.describe = f"{why} compiled kernel, {self.threads} thread(s), {layout.dtype} codes"

    def row_bytes(self) -> int:
        return 0

    def sum_codes(self, code_type: str) -> int:
        """Read one code type's arrays once (benchmark floor)."""
        lay = self._layout
        t = 0 if code_type == "normal" else 1
        with _KERNEL_LOCK:
            previous = self._numba.get_num_threads()
            self._numba.set_num_threads(self.threads)
            try:
                return int(self._kernels.sum_codes(lay.addrs[t : t + 1], lay.seg_rows, self._proto, lay.p))
            finally:
                self._numba.set_num_threads(previous)

    def _threads(self, rows: int, req: ScanRequest) -> int:
        """Threads for a scan of ``rows`` rows: a small scan runs on one thread (waking the others costs
        more than it saves on a busy machine)."""
        work = rows * len(req.types) * (1 if req.lanes == 1 else 5 * req.lanes // 16)
        return max(1, min(self.threads, work // _WORK_PER_THREAD))

    def _call(self, kernel: Any, threads: int, *args: Any) -> None:
        with _KERNEL_LOCK:
            previous = self._numba.get_num_threads()
            self._numba.set_num_threads(threads)
            try:
                with self._numba.parallel_chunksize(1):
                    kernel(*args)
            finally:
                self._numba.set_num_threads(previous)

    def run(self, req: ScanRequest) -> tuple[np.ndarray, np.ndarray]:
        lay = self._layout
        out_val, out_row = _outputs(req, lay, lay.tasks.shape[0])
        addrs = np.ascontiguousarray(lay.addrs[[0 if t == "normal" else 1 for t in req.types]])
        bounds = _quantised_tables(req, lay.p, lay.k) if self._prunable(req) else None
        if bounds is not None:
            self._pruned(req, addrs, bounds, out_val, out_row)
        else:
            self._scan(req, addrs, lay.tasks, lay.n, out_val, out_row)
        return out_val, out_row

    def _scan(
        self,
        req: ScanRequest,
        addrs: np.ndarray,
        tasks: np.ndarray,
        rows: int,
        out_val: np.ndarray,
        out_row: np.ndarray,
    ) -> None:
        lay = self._layout
        self._call(
            self._kernels.scan_kernel,
            self._threads(rows, req),
            addrs,
            lay.seg_rows,
            self._proto,
            lay.p,
            tasks,
            lay.vol_stop,
            req.luts,
            lay.k,
            req.lanes,
            req.n_queries,
            req.kind,
            req.inv_q,
            req.inv_r,
            req.weight,
            req.excluded,
            req.select,
            out_val,
            out_row,
        )

    def _prunable(self, req: ScanRequest) -> bool:
        """Bounds pay for one volume-wise query with non-negative terms (Hamming, Euclidean) and weights,
        excluded ranges made of whole volumes, many more volumes than wanted, and a large database."""
        lay = self._layout
        if not (
            req.prune > 0
            and req.lanes == 1
            and req.select == SELECT_VOLUME
            and req.kind in (KIND_HAMMING, KIND_EUCLIDEAN)
            and lay.vol_start.size > 4 * req.prune
            and lay.n * len(req.types) >= _PRUNE_MIN_WORK
            and bool(np.all(req.weight > 0))
        ):
            return False
        for first, stop, _ in req.excluded:  # the bound kernel excludes whole volumes
            v = int(np.searchsorted(lay.vol_start, first))
            w = int(np.searchsorted(lay.vol_stop, stop))
            if v >= lay.vol_start.size or lay.vol_start[v] != first or w >= lay.vol_stop.size:
                return False
            if lay.vol_stop[w] != stop:
                return False
        return True

    def _pruned(
        self,
        req: ScanRequest,
        addrs: np.ndarray,
        bounds: tuple[np.ndarray, np.ndarray],
        out_val: np.ndarray,
        out_row: np.ndarray,
    ) -> None:
        """Volume-wise search of one query in three steps, with the same results as the full scan for the
        ``prune`` nearest volumes: (1) ``bound_kernel`` gives each volume a lower bound of its best
        distance; (2) the ``prune`` volumes with the smallest bounds are scanned exactly, and the largest
        of their distances caps the ``prune``-th best distance; (3) every other volume whose bound does not
        exceed that cap is scanned exactly. The rest stay +inf."""
        lay = self._layout
        qluts, terms = bounds
        lower = np.full(lay.vol_start.size, np.inf)
        self._call(
            self._kernels.bound_kernel,
            self._threads(lay.n, req),
            addrs,
            lay.seg_rows,
            self._proto,
            lay.p,
            lay.tasks,
            lay.vol_stop,
            qluts,
            lay.k,
            terms,
            req.excluded,
            lower,
        )
        finite = np.flatnonzero(np.isfinite(lower))
        if finite.size <= req.prune:
            self._scan_volumes(req, addrs, finite, out_val, out_row)
            return
        first = finite[np.argpartition(lower[finite], req.prune - 1)[: req.prune]]
        self._scan_volumes(req, addrs, first, out_val, out_row)
        cap = float(out_val[first, 0, 0].max())
        # The exact distances are float32 sums of non-negative terms: within 1e-5 of the real value.
        rest = np.flatnonzero(lower * (1.0 - 1e-5) <= cap)
        self._scan_volumes(req, addrs, rest[~np.isin(rest, first)], out_val, out_row)

    def _scan_volumes(
        self,
        req: ScanRequest,
        addrs: np.ndarray,
        volumes: np.ndarray,
        out_val: np.ndarray,
        out_row: np.ndarray,
    ) -> None:
        """Scan only ``volumes`` exactly (nothing when there are none)."""
        if volumes.size:
            tasks = self._layout.volume_tasks(volumes)
            self._scan(req, addrs, tasks, int((tasks[:, 2] - tasks[:, 1]).sum()), out_val, out_row)


def _quantised_tables(req: ScanRequest, p: int, k: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(qluts (T, P*K) uint8, terms (T, 255*P + 1) float64) for ``bound_kernel``. Per code type, each
    position's table entries minus their minimum are floored onto 256 levels of one step, so that
    ``offset + step * sum_j qlut[j, code_j]`` never exceeds the row's table sum; ``terms[t, Q]`` is the
    weighted distance term of that bound. Entries above the 95th percentile are clipped to the top level
    (a weaker bound, still a bound; rows holding such codes are far anyway): the levels go to the small
    entries that near rows are made of. None when an entry is negative or not finite (the bound needs
    non-negative terms)."""
    t_count = req.luts.shape[0]
    qluts = np.empty((t_count, p * k), np.uint8)
    terms = np.empty((t_count, 255 * p + 1))
    for t in range(t_count):
        table = req.luts[t].astype(np.float64).reshape(p, k)
        if not np.isfinite(table).all() or table.min() < 0:
            return None
        low = table.min(axis=1, keepdims=True)
        rel = table - low
        # the 95th percentile of every 7th entry: any clip level keeps the bound valid, and a sample
        # costs 0.05 ms instead of 0.3 ms per query (a twentieth of the scan's serial part)
        top = float(np.quantile(rel.reshape(-1)[::7], 0.95))
        step = top / 255.0 if top > 0 else 1.0
        q = np.floor(rel / step)
        q -= q * step > rel  # one level lower where the division rounded up
        qluts[t] = np.clip(q, 0, 255).astype(np.uint8).reshape(-1)
        sums = float(low.sum()) + step * np.arange(255 * p + 1)
        terms[t] = float(req.weight[t]) * (np.sqrt(sums) if req.kind == KIND_EUCLIDEAN else sums)
    return qluts, terms


def _outputs(req: ScanRequest, lay: ScanLayout, n_chunks: int) -> tuple[np.ndarray, np.ndarray]:
    """Outputs of a scan, always 3-D: (N, B, 1) every distance, (V, B, 1) each volume's best, or
    (chunks, B, top) each chunk's nearest rows."""
    b = req.n_queries
    if req.select == SELECT_ALL:
        return np.empty((lay.n, b, 1), np.float32), np.zeros((0, 0, 0), np.int64)
    if req.select == SELECT_VOLUME:
        shape: tuple[int, ...] = (lay.vol_start.size, b, 1)
    else:
        shape = (n_chunks, b, req.top)
    return np.full(shape, np.inf, np.float32), np.full(shape, -1, np.int64)


class _TorchBackend:
    """The scan without numba, per chunk of whole volumes: one query sums ``np.take`` of each position's
    table row (positions in order, as the kernel adds them); a batch runs ``embedding_bag`` over the chunk's
    int32 index, built in a buffer reused from chunk to chunk. ``keep_offsets``: the engine's former path,
    every segment's int32 index kept, one ``embedding_bag`` call per segment."""

    def __init__(self, layout: ScanLayout, keep_offsets: bool) -> None:
        self._layout = layout
        self._keep = keep_offsets
        self._offsets: dict[tuple[str, int], Any] = {}
        self._buffer: np.ndarray | None = None  # (_CHUNK_ROWS, P) int32, allocated on the first batch
        self._lock = threading.Lock()
        self.name = "torch-offsets" if keep_offsets else "torch"
        self.threads = None
        self._chunks = self._make_chunks()
        _, why = numba_status() if not keep_offsets else (None, "")
        self.describe = (
            "torch embedding_bag over kept int32 row indices (former path, 4 B per position and code type)"
            if keep_offsets
            else f"numpy/torch fallback in chunks of {_CHUNK_ROWS} rows ({why})"
        )

    def _make_chunks(self) -> np.ndarray:
        """Tasks merged into chunks of at most _CHUNK_ROWS rows (whole segments when offsets are kept)."""
        tasks = self._layout.tasks
        out: list[list[int]] = []
        for task in tasks.tolist():
            if out and out[-1][0] == task[0] and (self._keep or task[2] - out[-1][1] <= _CHUNK_ROWS):
                out[-1][2] = task[2]
            else:
                out.append(list(task))
        return np.asarray(out, dtype=np.int64).reshape(-1, 5)

    def row_bytes(self) -> int:
        return sum(int(v.numel()) * int(v.element_size()) for v in self._offsets.values())

    def _index(self, code_type: str, seg: int, local: int, rows: int) -> Any:
        """The (rows, P) int32 tensor of ``code + position * K`` for a chunk (a view of the kept index, or
        of the reused buffer: valid until the next call)."""
        import torch

        lay = self._layout
        codes = lay.codes[code_type][seg]
        offsets = np.arange(lay.p, dtype=np.int32) * np.int32(lay.k)
        if not self._keep:
            if self._buffer is None:
                self._buffer = np.empty((_CHUNK_ROWS, lay.p), dtype=np.int32)
            idx = self._buffer[:rows]
            np.add(codes[local : local + rows], offsets, out=idx, dtype=np.int32)
            return torch.from_numpy(idx)
        key = (code_type, seg)
        if key not in self._offsets:
            idx = np.empty(codes.shape, dtype=np.int32)
            for s in range(0, codes.shape[0], _CHUNK_ROWS):
                np.add(codes[s : s + _CHUNK_ROWS], offsets, out=idx[s : s + _CHUNK_ROWS], dtype=np.int32)
            self._offsets[key] = torch.from_numpy(idx)
        return self._offsets[key][local : local + rows]

    def _sums(self, code_type: str, t: int, req: ScanRequest, seg: int, local: int, rows: int) -> np.ndarray:
        """(rows, lanes) float32 table sums of one code type over a chunk."""
        import torch

        lay = self._layout
        if req.lanes == 1 and not self._keep:
            codes = lay.codes[code_type][seg][local : local + rows]
            lut = req.luts[t]
            acc = np.zeros(rows, np.float32)
            tmp = np.empty(rows, np.float32)
            for j in range(lay.p):
                np.take(lut[j * lay.k : (j + 1) * lay.k], codes[:, j], out=tmp)
                acc += tmp
            return acc[:, None]
        weight = torch.from_numpy(req.luts[t].reshape(lay.p * lay.k, req.lanes))
        with torch.inference_mode():
            out = torch.nn.functional.embedding_bag(
                self._index(code_type, seg, local, rows), weight, mode="sum"
            )
        return np.asarray(out.numpy())

    def run(self, req: ScanRequest) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:  # one scan at a time: the chunk buffer and the kept indices are shared
            return self._run(req)

    def _run(self, req: ScanRequest) -> tuple[np.ndarray, np.ndarray]:
        lay = self._layout
        out_val, out_row = _outputs(req, lay, self._chunks.shape[0])
        b = req.n_queries
        for c, (seg, first, stop, v0, local) in enumerate(self._chunks.tolist()):
            rows = stop - first
            total = np.zeros((rows, req.lanes), np.float32)
            for t, code_type in enumerate(req.types):
                s = self._sums(code_type, t, req, seg, local, rows)
                if req.kind == KIND_EUCLIDEAN:
                    np.sqrt(np.maximum(s, np.float32(0.0), out=s), out=s)
                elif req.kind == KIND_ANGULAR:
                    s *= req.inv_r[t, first:stop, None]
                    s *= req.inv_q[t][None, :]
                    np.subtract(np.float32(1.0), s, out=s)
                s *= req.weight[t]
                total += s
            dist = total[:, :b]
            for lo, hi, q in req.excluded.tolist():
                dist[max(lo, first) - first : max(min(hi, stop), first) - first, q] = np.inf
            if req.select == SELECT_ALL:
                out_val[first:stop, :, 0] = dist
            elif req.select == SELECT_VOLUME:
                v1 = int(np.searchsorted(lay.vol_stop, stop, side="left")) + 1
                starts = lay.vol_start[v0:v1] - first
                best = np.minimum.reduceat(dist, starts, axis=0)
                counts = lay.vol_stop[v0:v1] - lay.vol_start[v0:v1]
                at_best = dist == np.repeat(best, counts, axis=0)
                row_ids = np.arange(first, stop, dtype=np.int64)[:, None]
                arg = np.minimum.reduceat(np.where(at_best, row_ids, np.iinfo(np.int64).max), starts, axis=0)
                arg[~np.isfinite(best)] = -1
                out_val[v0:v1, :, 0] = best
                out_row[v0:v1, :, 0] = arg
            else:
                for q in range(b):
                    idx = smallest(np.ascontiguousarray(dist[:, q]), req.top)
                    out_val[c, q, : idx.size] = dist[idx, q]
                    out_row[c, q, : idx.size] = idx + first
        return out_val, out_row


def smallest(d: np.ndarray, k: int) -> np.ndarray:
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


def make_backend(name: str, layout: ScanLayout, threads: int | None) -> _NumbaBackend | _TorchBackend:
    """The scan backend ``name`` (see ``BACKENDS``); ``auto`` is numba when it imports, else torch."""
    if name not in BACKENDS:
        raise ConfigError(f"unknown search backend {name!r}; choose one of {BACKENDS}")
    if threads is not None and (isinstance(threads, bool) or int(threads) < 1):
        raise ConfigError(f"threads must be a positive integer or None, got {threads!r}")
    if name == "auto":
        name = "numba" if numba_status()[0] is not None else "torch"
    if name == "numba":
        return _NumbaBackend(layout, threads)
    return _TorchBackend(layout, keep_offsets=name == "torch-offsets")
