"""Benchmark of indexing on Ray (``fdn index build --ray``, fdn_core/ray_index.py) against one process.

A small phantom cohort (default 16 full-size cases, 240x240x155, generator 2.0; kept in ``--work`` and
reused) is indexed with the shipped demo model (``--model``) three ways, each into a fresh database:

- single process: ``build_index`` as ``fdn index build`` runs it (``--threads`` loader threads read ahead
  of the encoder, which runs in the main thread),
- Ray, 1 worker: a local Ray of 2 CPUs, one CPU encoder actor (1 thread) and read tasks of 1 CPU,
- Ray, 2 workers: a local Ray of 3 logical CPUs (2 encoder actors + 1 read task at a time), which on a
  2-core machine oversubscribes the cores by one process.

Printed side by side: cases/s over the whole run (Ray: its start-up, actors loading the model, included)
and over the second half of the cases (the steady rate, from the progress callback's timestamps, once
the cases read ahead while the encoder actors started are used up), and whether the
database equals the single-process one bit for bit (codes, slice indices, flags, case order).
Run: ``python bench/bench_ray.py`` (about 3-4 minutes on 2 cores, the first time 1 more for the cohort);
``--cases 8 --shape 120 120 78`` for a quick look. Needs the ray extra (pip install 'fdn-retrieval[ray]').
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["main"]

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = ROOT / "fdn_core" / "resources" / "models" / "demo"


def _same(a: Any, b: Any) -> bool:
    if a.cases != b.cases:
        return False
    names = ("normal_codes", "abnormal_codes", "slice_indices", "has_abnormal", "case_starts")
    return all(np.array_equal(np.asarray(getattr(a, n)), np.asarray(getattr(b, n))) for n in names)


def _timed(run: Any) -> tuple[Any, float, float]:
    """(result, cases/s over the whole run, cases/s over its second half: the steady rate, once cases read
    ahead while the encoders started are used up)."""
    from fdn_core.progress import Progress

    stamps: list[float] = []

    def tick(done: int, total: int, message: str) -> None:
        if done > len(stamps):
            stamps.append(time.perf_counter())

    t0 = time.perf_counter()
    result = run(Progress(tick))
    total = time.perf_counter() - t0
    n, half = len(stamps), len(stamps) // 2
    span = stamps[-1] - stamps[half - 1] if half >= 1 else 0.0
    return result, n / total, (n - half) / span if span > 0 else float("nan")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=16)
    parser.add_argument("--shape", type=int, nargs=3, default=(240, 240, 155))
    parser.add_argument("--seed", type=int, default=4242)
    parser.add_argument("--model", type=Path, default=DEMO_MODEL)
    parser.add_argument("--threads", type=int, default=2, help="loader threads of the single-process run")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "fdn_bench_ray")
    args = parser.parse_args(argv)

    from fdn_core.data.phantom import generate_cohort
    from fdn_core.model.bundle import load_bundle
    from fdn_core.ray_index import RayEncoder, require_ray
    from fdn_core.retrieval import build_index

    ray = require_ray()
    shape = tuple(args.shape)
    cohort = args.work / f"cohort_{args.cases}_{'x'.join(map(str, shape))}_{args.seed}"
    if not (cohort / "cohort.json").is_file():
        print(f"generating {args.cases} phantom cases of {shape} in {cohort} ...", file=sys.stderr)
        generate_cohort(cohort, n_cases=args.cases, seed=args.seed, shape=shape, workers=2, overwrite=True)
    bundle = load_bundle(args.model, device="cpu")
    dbs = args.work / "dbs"
    shutil.rmtree(dbs, ignore_errors=True)

    def build(name: str, **kwargs: Any) -> Any:
        return lambda progress: (
            build_index(bundle, cohort, dbs / name, progress=progress, fit_hamming=False, **kwargs).database
        )

    rows = []
    ref, whole, steady = _timed(build("single", workers=args.threads))
    rows.append((f"single process ({args.threads} loader threads)", whole, steady, "reference"))
    for workers, cpus in ((1, 2), (2, 3)):
        encoder = RayEncoder(workers=workers, num_cpus=cpus)
        db, whole, steady = _timed(build(f"ray{workers}", encoder=encoder))
        assert not ray.is_initialized()
        label = f"Ray, {workers} worker{'s' * (workers > 1)} (local Ray, {cpus} CPUs)"
        rows.append((label, whole, steady, "yes" if _same(db, ref) else "NO"))
    shutil.rmtree(dbs, ignore_errors=True)

    slices = int(np.asarray(ref.case_starts)[-1])
    print(
        f"\n{args.cases} phantom cases {shape} ({slices} slices), model {args.model.name} "
        f"(image size {bundle.config.image_size}); {platform.node()}, {os.cpu_count()} CPUs, "
        f"ray {ray.__version__}\n"
    )
    print("| run | cases/s (whole run) | cases/s (second half) | same database |")
    print("|---|---|---|---|")
    for label, whole, steady, same in rows:
        print(f"| {label} | {whole:.2f} | {steady:.2f} | {same} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
