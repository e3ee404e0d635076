"""Benchmark of the code database's storage (fdn_core.codes.database, format 3: append-only segments).

For each size (default 1M and 10M slices) a database of synthetic codes (8x8 grids, K = 512 codes of
D = 64, studies of 155 slices) is written through the database API (``add_cases`` in batches of
``--batch-cases`` studies: one segment per batch, small segments merged automatically) into a folder
under ``--tmp`` that is deleted afterwards. Measured:

- write: time to write every batch (including the automatic merges), segments at the end,
- size on disk and bytes per slice,
- open: wall time of ``CodeDatabase.open`` without hashing the row arrays (``verify=False``; sizes,
  case tables, codebooks and cross-checks are always checked) and with full verification (``verify=True``:
  every file's sha256 and every case's slice order), each in a fresh process, with the RSS the open adds
  (the arrays are memory-mapped, not read),
- add: one study of 155 slices (median and max over ``--adds`` adds, lock + manifest re-read + segment
  write + manifest commit),
- remove: one study (a tombstone),
- compact: merging every segment into one and dropping the removed rows.

Query latency is ``bench/bench_search.py``'s business. Prints a markdown table.
Run: ``python bench/bench_storage.py`` (about 5-10 minutes on 2 cores, a few GB of disk under /tmp at
10M); ``--sizes 100000`` for a quick look.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

__all__ = ["main"]

SLICES = 155
ROOT = Path(__file__).resolve().parents[1]

OPEN_SCRIPT = """
import json, sys, time
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0
import numpy
from fdn_core.codes.database import CodeDatabase
before = rss()
t = time.perf_counter()
db = CodeDatabase.open(sys.argv[1], verify=sys.argv[2] == "1")
took = time.perf_counter() - t
print(json.dumps({"seconds": took, "rss_added": rss() - before, "rows": len(db), "cases": len(db.cases)}))
"""


def _source(case_id: str) -> dict[str, object]:
    return {
        "layout": "brats",
        "images": {m: f"/archive/{case_id}/{case_id}_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair")},
        "image4d": None,
        "seg": None,
        "anat": None,
    }


def _batch(rng: np.random.Generator, first: int, count: int, k: int, grid: tuple[int, int]) -> list:
    from fdn_core.codes.database import CaseCodes

    h, w = grid
    normal = rng.integers(0, k, (count, SLICES, h, w), dtype=np.uint16)
    abnormal = rng.integers(0, k, (count, SLICES, h, w), dtype=np.uint16)
    flags = rng.random((count, SLICES)) < 0.3
    out = []
    for i in range(count):
        cid = f"study_{first + i:08d}"
        out.append(
            CaseCodes(
                case_id=cid,
                normal=normal[i],
                abnormal=abnormal[i],
                has_abnormal=flags[i],
                source=_source(cid),
                source_sha256=f"{first + i:064x}",
            )
        )
    return out


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _open_in_fresh_process(path: Path, verify: bool) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", OPEN_SCRIPT, str(path), "1" if verify else "0"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def _fmt_s(s: float) -> str:
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.1f} s"


def bench_size(n_slices: int, args: argparse.Namespace) -> dict[str, str]:
    """Write, measure and delete one database of ``n_slices`` slices; returns a table row."""
    from fdn_core.codes.database import CodeDatabase

    rng = np.random.default_rng(args.seed)
    studies = max(1, n_slices // SLICES)
    base = Path(tempfile.mkdtemp(prefix="fdn_bench_storage_", dir=args.tmp))
    path = base / "db"
    try:
        books = rng.normal(size=(args.codes, args.dim)).astype(np.float32)
        db = CodeDatabase.create(
            path, fingerprint="b" * 64, codebook_normal=books, codebook_abnormal=books[::-1].copy(),
            grid_shape=tuple(args.grid),
        )  # fmt: skip
        t0 = time.perf_counter()
        written = 0
        while written < studies:
            count = min(args.batch_cases, studies - written)
            db.add_cases(_batch(rng, written, count, args.codes, tuple(args.grid)))
            written += count
            print(f"  {written * SLICES:>11,} slices written, {len(db.segments())} segments", flush=True)
        write_s = time.perf_counter() - t0
        segments = len(db.segments())
        size = _du(path)
        db.close()
        del db
        quick = _open_in_fresh_process(path, verify=False)
        full = _open_in_fresh_process(path, verify=True)
        db = CodeDatabase.open(path, verify=False)
        adds = []
        for i in range(args.adds):
            study = _batch(rng, studies + i, 1, args.codes, tuple(args.grid))
            t = time.perf_counter()
            db.add_cases(study)
            adds.append(time.perf_counter() - t)
        t = time.perf_counter()
        db.remove_cases([f"study_{studies // 2:08d}"])
        remove_s = time.perf_counter() - t
        before_compact = len(db.segments())
        t = time.perf_counter()
        db.compact()
        compact_s = time.perf_counter() - t
        after = _open_in_fresh_process(path, verify=False)
        assert after["rows"] == (studies + args.adds - 1) * SLICES, after
        return {
            "slices": f"{studies * SLICES:,}",
            "write (all batches)": f"{_fmt_s(write_s)}",
            "segments": f"{segments}",
            "size on disk": f"{size / 1e9:.2f} GB ({size / (studies * SLICES):.0f} B/slice)",
            "open": f"{_fmt_s(quick['seconds'])}",
            "open, verify": f"{_fmt_s(full['seconds'])}",
            "RSS added by open": f"{quick['rss_added'] / 1e6:.0f} MB",
            "add 1 study (median / max)": f"{_fmt_s(statistics.median(adds))} / {_fmt_s(max(adds))}",
            "remove 1 study": _fmt_s(remove_s),
            "compact": f"{_fmt_s(compact_s)} ({before_compact} segments -> 1)",
            "open after compact": _fmt_s(after["seconds"]),
        }
    finally:
        shutil.rmtree(base, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000], help="slices")
    parser.add_argument("--grid", type=int, nargs=2, default=[8, 8])
    parser.add_argument("--codes", type=int, default=512)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch-cases", type=int, default=1000, help="studies per add (one segment each)")
    parser.add_argument("--adds", type=int, default=7, help="single-study adds to time")
    parser.add_argument("--tmp", default="/tmp", help="folder for the temporary databases")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    machine = platform.processor() or platform.machine()
    print(
        f"# storage benchmark: grid {args.grid[0]}x{args.grid[1]}, K={args.codes}, D={args.dim}, "
        f"{SLICES} slices per study, batches of {args.batch_cases} studies; {machine}, "
        f"{os.cpu_count()} CPUs, numpy {np.__version__}"
    )
    rows = []
    for n in args.sizes:
        print(f"## {n:,} slices", flush=True)
        rows.append(bench_size(n, args))
    keys = list(rows[0])
    print()
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(r[k] for k in keys) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
