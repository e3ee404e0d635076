"""Benchmark of the exact table-lookup search (fdn_core.codes.search) against simple alternatives.

Random code grids (default 8x8, K = 512 codes of D = 64) in volumes of 155 slices, at 10k, 100k and 1M
database rows. For every distance and mode: latency of one volume-wise top-10 query (median and p95 over
single queries) and the time per query when queries come in batches (``search_many``), plus memory per
slice. Baselines, on the normal codes with the Euclidean distance:

- ``numpy fancy``: ``T[q, db].sum(1)`` with the K x K float32 table (one N x P gather),
- ``numpy take``: per-position ``np.take`` on a transposed, contiguous (P, N) uint16 array, summed,
- ``faiss flat``: ``faiss.IndexFlatL2`` over the de-quantised latents (P*D floats per slice: 16 KB at
  8x8, 16 GB at 1M rows), only up to ``--faiss-max`` rows where it fits in memory.

Each size also checks that the engine's top 10 equals a float64 brute force. Prints a markdown table.
Run: ``python bench/bench_search.py`` (about 3-5 minutes on 2 cores; ``--sizes 10000`` for a quick look).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable

import numpy as np

__all__ = ["main"]

SLICES_PER_VOLUME = 155


def _timeit(fn: Callable[[], object], repeats: int, per: int = 1) -> list[tuple[float, float]]:
    """(wall ms, process CPU ms) of each call, divided by ``per`` (queries per call)."""
    out = []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        out.append(((time.perf_counter() - t) * 1000.0 / per, (time.process_time() - c) * 1000.0 / per))
    return out


def _fmt(ms: float | None) -> str:
    return "-" if ms is None else (f"{ms:.1f}" if ms < 100 else f"{ms:.0f}")


def _topk(d: np.ndarray, k: int) -> np.ndarray:
    part = np.argpartition(d, k - 1)[:k]
    return part[np.argsort(d[part], kind="stable")]


def bench_size(n: int, args: argparse.Namespace, rows: list[list[str]]) -> None:
    """Benchmark one database size; appends table rows."""
    from fdn_core.codes.search import SearchEngine
    from fdn_core.codes.tables import squared_euclidean_table
    from fdn_core.labels import DISTANCES, MODES

    rng = np.random.default_rng(args.seed)
    p = args.grid[0] * args.grid[1]
    k = args.codes
    normal = rng.integers(0, k, (n, p), dtype=np.uint16)
    abnormal = rng.integers(0, k, (n, p), dtype=np.uint16)
    case_ids = np.repeat(np.arange(n // SLICES_PER_VOLUME + 1), SLICES_PER_VOLUME)[:n].astype(str)
    slice_indices = (np.arange(n) % SLICES_PER_VOLUME).astype(np.int32)
    books = [rng.normal(size=(k, args.dim)).astype(np.float32) for _ in range(2)]
    bits = [rng.random((k, args.bits)) < 0.5 for _ in range(2)]
    t0 = time.perf_counter()
    engine = SearchEngine(
        normal_codes=normal,
        abnormal_codes=abnormal,
        case_ids=case_ids,
        slice_indices=slice_indices,
        codebook_normal=books[0],
        codebook_abnormal=books[1],
        grid_shape=tuple(args.grid),
        hamming_bits=tuple(bits),
    )
    warm = engine.query_from_rows(0)
    for distance in DISTANCES:  # build every table, scan index, norm and normalisation scale once
        engine.search(warm, distance=distance, mode="sum_normalized")
    build_s = time.perf_counter() - t0
    db_bytes = 2 * p * 2 + 4 + 1  # two uint16 grids + slice index + abnormal flag (manifest aside)
    used = engine.memory_bytes()
    mem = f"{db_bytes} + {used['rows'] / n:.0f}"
    print(
        f"N={n:,}: engine built in {build_s:.1f} s; RAM beyond the database: {used['rows'] / n:.0f} B/slice "
        f"+ {used['tables'] / 2**20:.0f} MiB of K x K tables"
    )

    # Exactness against a float64 brute force (table sums equal de-quantised vectors: Testing/test_search.py).
    t64 = squared_euclidean_table(books[0])
    for r in rng.integers(0, n, 2):
        q = engine.query_from_rows(int(r))
        hits = engine.search(q, distance="euclidean", mode="normal", per="slice", top=10)
        d = np.sqrt(t64[normal[r].astype(np.int64)[None, :], normal].sum(axis=1))
        d[case_ids == case_ids[r]] = np.inf
        assert np.allclose([h.distance for h in hits], d[_topk(d, 10)], rtol=1e-9), "engine != brute force"
    queries = [engine.query_from_rows(int(r)) for r in rng.integers(0, n, max(args.queries, args.batch))]
    nq = args.queries if n < 1_000_000 else max(5, args.queries // 2)
    batch = queries[: args.batch]
    for distance in DISTANCES:
        for mode in MODES:
            kw = {"distance": distance, "mode": mode, "top": 10}
            single = [t for q in queries[:nq] for t in _timeit(lambda q=q, kw=kw: engine.search(q, **kw), 1)]
            times = _timeit(lambda kw=kw: engine.search_many(batch, block=args.batch, **kw), 2, len(batch))
            rows.append(_row(n, "engine", distance, mode, single, times, mem))

    # Baselines: normal codes, Euclidean, top-10 slices.
    t32 = t64.astype(np.float32)
    qs = [normal[int(r)].astype(np.intp) for r in rng.integers(0, n, 3 if n >= 1_000_000 else 8)]

    def fancy(q: np.ndarray) -> np.ndarray:
        return _topk(np.sqrt(t32[q[None, :], normal].sum(axis=1)), 10)

    ts = [t for q in qs for t in _timeit(lambda q=q: fancy(q), 1)]
    rows.append(_row(n, "numpy fancy", "euclidean", "normal", ts, None, str(p * 2)))
    normal_t = np.ascontiguousarray(normal.T)

    def take(q: np.ndarray, normal_t: np.ndarray = normal_t) -> np.ndarray:
        acc = np.zeros(n, np.float32)
        tmp = np.empty(n, np.float32)
        for j in range(p):
            np.take(t32[q[j]], normal_t[j], out=tmp)
            acc += tmp
        return _topk(np.sqrt(acc), 10)

    ts = [t for q in qs for t in _timeit(lambda q=q: take(q), 1)]
    rows.append(_row(n, "numpy take", "euclidean", "normal", ts, None, str(p * 2)))
    flat_bytes = p * args.dim * 4
    if n <= args.faiss_max:
        import faiss

        index = faiss.IndexFlatL2(p * args.dim)
        for s in range(0, n, 50_000):  # de-quantise in pieces to bound the temporary memory
            index.add(books[0][normal[s : s + 50_000]].reshape(-1, p * args.dim))
        xq = np.stack([books[0][q].reshape(-1) for q in qs])
        ts = [t for i in range(len(qs)) for t in _timeit(lambda i=i: index.search(xq[i : i + 1], 10), 1)]
        xqb = books[0][normal[rng.integers(0, n, args.batch)]].reshape(args.batch, -1)
        tb = _timeit(lambda: index.search(xqb, 10), 2, args.batch)
        rows.append(_row(n, "faiss flat", "euclidean", "normal", ts, tb, str(flat_bytes)))
        del index
    else:
        rows.append(
            _row(n, "faiss flat", "euclidean", "normal", None, None, f"{flat_bytes} (skipped: memory)")
        )


def _row(
    n: int,
    method: str,
    distance: str,
    mode: str,
    single: list[tuple[float, float]] | None,
    batched: list[tuple[float, float]] | None,
    mem: str,
) -> list[str]:
    cells = [f"{n:,}", method, distance, mode]
    if single is None:
        cells += ["-", "-", "-"]
    else:
        wall, cpu = np.array(single).T
        cells += [
            _fmt(float(np.median(wall))),
            _fmt(float(np.percentile(wall, 95))),
            _fmt(float(np.median(cpu))),
        ]
    if batched is None:
        cells += ["-", "-"]
    else:
        wall, cpu = np.array(batched).T
        cells += [_fmt(float(np.median(wall))), _fmt(float(np.median(cpu)))]
    return [*cells, mem]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--grid", type=int, nargs=2, default=[8, 8])
    parser.add_argument("--codes", type=int, default=512, help="codebook size K")
    parser.add_argument("--dim", type=int, default=64, help="code vector dimension D")
    parser.add_argument("--bits", type=int, default=512, help="bits per binarised code (paper: 292-789)")
    parser.add_argument("--queries", type=int, default=20, help="single queries timed per setting")
    parser.add_argument("--batch", type=int, default=32, help="queries per batch")
    parser.add_argument("--faiss-max", type=int, default=100_000, help="largest N for faiss (memory)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads {args.threads}, "
        f"load average at start {load[0]:.1f}; grid {args.grid[0]}x{args.grid[1]}, K={args.codes}, "
        f"D={args.dim}, {args.bits} bits; volume-wise top-10"
    )
    rows: list[list[str]] = []
    t0 = time.perf_counter()
    for n in args.sizes:
        bench_size(n, args, rows)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"total {time.perf_counter() - t0:.0f} s; load average at end {load[0]:.1f}\n")
    header = ["N", "method", "distance", "mode", "single ms median", "single ms p95", "single CPU ms"]
    header += ["batched ms/query", "batched CPU ms/query", "bytes/slice (db + engine)"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
