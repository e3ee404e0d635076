"""Why a single query costs what it does: the plain gather loop's time against the lookup table's size.

A single query sums, per row, 64 table entries chosen by the row's codes. The table holds P x K float32
(8x8 grid: 64 x K x 4 bytes), so its size decides whether the lookups hit the L1 or the L2 cache. One run
times the plain numba loop of ``bench/bench_search.py`` (one thread, one float32 accumulator per row) over
the same 1,000,000 random rows for K = 16 ... 512, with uint16 codes and, for K <= 256, uint8 codes, and
prints the time beside the table size and the time per lookup.

Run: ``python bench/bench_scan_tables.py`` (about a minute; the machine should be otherwise idle).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_search import _plain_loop, _timeit


def main(argv: list[str] | None = None) -> int:
    """Print one line per (K, code dtype)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--positions", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import numba

    numba.set_num_threads(1)
    plain = _plain_loop()
    rng = np.random.default_rng(args.seed)
    n, p = args.rows, args.positions
    base = rng.integers(0, 1 << 16, (n, p), dtype=np.uint32)
    out = np.empty(n, np.float32)
    load = os.getloadavg()
    print(f"{n:,} rows x {p} positions, 1 thread, load average {load[0]:.1f} at start\n")
    print("| K | codes | table | ms per query (median of 7) | ns per lookup |")
    print("|---|---|---|---|---|")
    for k in (16, 64, 128, 256, 512):
        lut = np.ascontiguousarray(rng.random((p, k), dtype=np.float32))
        for dtype in (np.uint16, np.uint8):
            if k > 256 and dtype == np.uint8:
                continue
            codes = np.ascontiguousarray(base % k, dtype=dtype)
            plain(codes, lut, out)
            ms = float(np.median(_timeit(lambda c=codes, t=lut: plain(c, t, out), 7)[:, 0]))
            kib = lut.nbytes / 1024
            print(f"| {k} | {np.dtype(dtype).name} | {kib:.0f} KiB | {ms:.1f} | {ms * 1e6 / (n * p):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
