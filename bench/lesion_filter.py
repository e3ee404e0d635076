"""The lesion filter of a search (``--lesion any|without|with``): what it returns and what it costs.

Quality, on a labelled cohort's database: the largest-tumour slice (at the model's resolution) of every tumour
case is the query of a normal-code, volume-wise top-10 search with each distance, with and without axial
context; per filter, how many results show a tumour and the mean anatomy Dice of the results to the query
(the S_normal score). Speed, on synthetic databases (``bench_search``'s arrays, 8x8 grids, K = 512, a
tumour-like run of flagged slices in 60 % of the volumes): median and p95 wall ms of single queries with each
filter, and the ratio to the unfiltered search.

    python bench/lesion_filter.py --db DB_9101 --model fdn_core/resources/models/demo
    python bench/lesion_filter.py --sizes 1000000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_search import SLICES_PER_VOLUME, _engine, _timeit, _write_db

from fdn_core.labels import LESION_FILTERS

__all__ = ["main", "quality_rows", "speed_rows"]


def quality_rows(db_path: Path, model: Path, distances: tuple[str, ...]) -> list[dict[str, Any]]:
    """Per distance, context and filter: results showing a tumour and their mean anatomy Dice to the query."""
    from fdn_core.data.preprocess import volume_to_slices
    from fdn_core.data.readers import CaseFiles, load_case
    from fdn_core.evaluation.metrics import multiclass_dice
    from fdn_core.labels import ANATOMY_CLASSES
    from fdn_core.model.bundle import load_bundle
    from fdn_core.retrieval import Retriever

    bundle = load_bundle(model, device="cpu")
    retriever = Retriever.open(db_path, bundle)
    stacks = {
        c: volume_to_slices(load_case(CaseFiles.from_database(retriever.db, c)), bundle.preprocess)
        for c in retriever.db.cases
    }
    queries, labels = [], {}
    for c, st in stacks.items():
        if st.seg is None or st.anat is None:
            raise SystemExit(f"{c}: the quality study needs tumour and anatomy labels (a phantom cohort)")
        labels[c] = (st.seg, st.anat)
        area = (st.seg > 0).reshape(st.seg.shape[0], -1).sum(axis=1)
        if area.any():
            queries.append((c, int(np.argmax(area))))
    rows = []
    for distance in distances:
        for context in (False, True):
            for lesion in LESION_FILTERS[:2]:
                dices, tumour, hits_n = [], 0, 0
                for c, k in queries:
                    q = retriever.slice_from_database(c, k)
                    hits = retriever.search(
                        q, mode="normal", distance=distance, top=10, context=context, lesion=lesion
                    )
                    got = [(labels[h.case_id], h.slice_index) for h in hits]
                    dices.append(
                        np.mean(
                            [multiclass_dice(labels[c][1][k], a[i], ANATOMY_CLASSES) for (_, a), i in got]
                        )
                    )
                    tumour += sum(bool((seg[i] > 0).any()) for (seg, _), i in got)
                    hits_n += len(hits)
                rows.append(
                    {
                        "distance": distance + (" + context" if context else ""),
                        "lesion": lesion,
                        "queries": len(queries),
                        "results": hits_n,
                        "with_tumour": tumour,
                        "anatomy_dice": round(float(np.mean(dices)), 4),
                    }
                )
                print(rows[-1], flush=True)
    return rows


def speed_rows(n: int, repeats: int, threads: int) -> list[dict[str, Any]]:
    """Median and p95 wall ms of single queries per workload and filter at ``n`` synthetic slices."""
    rng = np.random.default_rng(0)
    k, d, grid = 512, 64, (8, 8)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        db = _write_db(n, grid[0] * grid[1], k, folder, seed=0)
        flags = np.zeros(n, bool)
        for start in range(0, n, SLICES_PER_VOLUME):
            if rng.random() < 0.6:  # a tumour: a run of 20-59 flagged slices
                a = start + int(rng.integers(30, 90))
                flags[a : a + int(rng.integers(20, 60))] = True
        np.save(folder / "has_abnormal.npy", flags)
        mapped = np.load(folder / "has_abnormal.npy", mmap_mode="r")
        books = [rng.normal(size=(k, d)).astype(np.float32) for _ in range(2)]
        eng = _engine(db, books, None, grid, has_abnormal=mapped, threads=threads)
        queries = [eng.query_from_rows(int(r)) for r in rng.integers(0, n, repeats)]
        for mode in ("normal", "sum"):
            for context in (False, True):
                base = 0.0
                for lesion in LESION_FILTERS:
                    search: dict[str, Any] = {"mode": mode, "context": context, "lesion": lesion}
                    hits = eng.search(queries[0], **search)  # warm, and check what comes back
                    assert lesion == "any" or all(flags[h.row] == (lesion == "with") for h in hits)
                    it = iter(queries)
                    times = _timeit(lambda s=search, it=it: eng.search(next(it), **s), len(queries))[:, 0]
                    med = float(np.median(times))
                    base = med if lesion == "any" else base
                    rows.append(
                        {
                            "mode": mode,
                            "context": context,
                            "lesion": lesion,
                            "median_ms": round(med, 1),
                            "p95_ms": round(float(np.percentile(times, 95)), 1),
                            "x_any": round(med / base, 2),
                        }
                    )
        print(f"{n:,} slices, {flags.mean():.1%} flagged, {eng.backend} on {threads} threads, Euclidean")
    return rows


def main(argv: list[str] | None = None) -> int:
    """Print the quality table (``--db``) and/or the speed table (``--sizes``)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", type=Path, help="database of a labelled phantom cohort")
    ap.add_argument("--model", type=Path, help="its model bundle")
    ap.add_argument("--distances", nargs="+", default=["euclidean", "learned"])
    ap.add_argument("--sizes", type=int, nargs="*", default=[], help="synthetic database sizes to time")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if args.db is None and not args.sizes:
        ap.error("give --db and --model, or --sizes")
    if args.db is not None:
        if args.model is None:
            ap.error("--db needs --model")
        rows = quality_rows(args.db, args.model, tuple(args.distances))
        print("\n| distance | references | results showing a tumour | anatomy Dice to the query |")
        print("|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['distance']} | {r['lesion']} | {r['with_tumour']} of {r['results']} | "
                f"{r['anatomy_dice']:.3f} |"
            )
    for n in args.sizes:
        rows = speed_rows(n, args.repeats, args.threads)
        print(
            "\n| mode | axial context | references | median ms | p95 ms | x any |\n|---|---|---|---|---|---|"
        )
        for r in rows:
            ctx = "yes" if r["context"] else "no"
            cols = [r["mode"], ctx, r["lesion"], r["median_ms"], r["p95_ms"], f"{r['x_any']:.2f}"]
            print("| " + " | ".join(str(x) for x in cols) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
