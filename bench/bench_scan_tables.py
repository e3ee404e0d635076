"""Why a single query costs what it does: the search kernel's time against the lookup table's size.

A single query sums, per row, 64 table entries chosen by the row's codes. The table holds P x K float32
(8x8 grid: 64 x K x 4 bytes), so its size decides whether the lookups hit the L1 or the L2 cache. One run
times the search engine's compiled kernel (one thread, one code type, volume-wise top-10, Euclidean) and
the plain numba loop of ``bench/bench_search.py`` (one float32 accumulator per row) over the same
1,000,000 random rows for K = 16 ... 512, with uint16 codes and, for K <= 256, uint8 codes (the code
database stores uint8 when K <= 256), and prints each time beside the table size (median and minimum:
on our shared virtual machine single timings vary by up to 40 %).

Run: ``python bench/bench_scan_tables.py`` (about two minutes; the machine should be otherwise idle).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_search import _engine, _plain_loop, _timeit, _write_db


def main(argv: list[str] | None = None) -> int:
    """Print one line per (K, code dtype)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--workdir", type=Path, default=None, help="folder for the synthetic .npy files")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import numba

    numba.set_num_threads(1)
    plain = _plain_loop()
    rng = np.random.default_rng(args.seed)
    n, p = args.rows, 64
    out = np.empty(n, np.float32)
    load = os.getloadavg()
    print(f"{n:,} rows, 8x8 grids, 1 thread, {args.queries} queries; load average {load[0]:.1f}\n")
    print("| K | codes | table | kernel ms per query, median (min) | plain loop ms, median (min) |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for k in (16, 64, 128, 256, 512):
            books = [rng.normal(size=(k, 32)).astype(np.float32) for _ in range(2)]
            lut = np.ascontiguousarray(rng.random((p, k), dtype=np.float32))
            for dtype in (np.uint16, np.uint8):
                if k > 256 and dtype == np.uint8:
                    continue
                db = _write_db(n, p, k, Path(tmp), args.seed, dtype)
                eng = _engine(db, books, None, (8, 8), threads=1)
                queries = [eng.query_from_rows(int(r)) for r in rng.integers(0, n, args.queries)]
                eng.search(queries[0], mode="normal")
                t = np.concatenate(
                    [_timeit(lambda q=q, e=eng: e.search(q, mode="normal"), 1) for q in queries]
                )
                codes = np.asarray(db["normal"])
                plain(codes, lut, out)
                tp = _timeit(lambda c=codes, t=lut: plain(c, t, out), args.queries)
                kib = p * k * 4 / 1024
                print(
                    f"| {k} | {np.dtype(dtype).name} | {kib:.0f} KiB | {np.median(t[:, 0]):.1f} "
                    f"({t[:, 0].min():.1f}) | {np.median(tp[:, 0]):.1f} ({tp[:, 0].min():.1f}) |"
                )
                del eng, db, codes
                for f in Path(tmp).glob("*.npy"):
                    f.unlink()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
