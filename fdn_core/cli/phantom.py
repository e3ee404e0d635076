"""``fdn phantom``: write a synthetic glioma cohort (BraTS 2019 layout, with normal-anatomy labels)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from fdn_core.data.phantom import DEFAULT_SHAPE, generate_cohort
from fdn_core.progress import tqdm_progress

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    """Add the ``phantom`` subcommand."""
    parser = subparsers.add_parser(
        "phantom",
        help="generate a phantom glioma cohort from the MNI152 template",
        description=(
            "Write N synthetic cases (t1, t1ce, t2, flair, seg, anat NIfTI files per case, BraTS 2019 "
            "layout) and cohort.json to --out. About one case in four is healthy. The same seed gives "
            "identical files. Needs nilearn (pip install 'fdn-retrieval[phantom]')."
        ),
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder (must be new or empty)")
    parser.add_argument("--cases", required=True, type=int, help="number of cases")
    parser.add_argument("--seed", required=True, type=int, help="random seed (non-negative)")
    parser.add_argument(
        "--shape",
        nargs=3,
        type=int,
        metavar=("X", "Y", "Z"),
        default=list(DEFAULT_SHAPE),
        help="volume size in voxels; the 240x240x155 mm field of view is kept (default: 240 240 155, 1 mm)",
    )
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    parser.add_argument("--montage", type=Path, default=None, help="also draw a PNG montage of a few cases")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Generate the cohort, optionally draw the montage, print a summary."""
    out: Path = args.out
    start = time.perf_counter()
    cohort = generate_cohort(
        out,
        n_cases=args.cases,
        seed=args.seed,
        shape=tuple(args.shape),
        workers=args.workers,
        progress=tqdm_progress(),
        overwrite=args.overwrite,
    )
    elapsed = time.perf_counter() - start
    n = cohort["n_cases"]
    healthy = cohort["n_healthy"]
    print(
        f"Wrote {n} cases to {out} in {elapsed:.1f} s ({elapsed / n:.1f} s per case): "
        f"{healthy} healthy, {n - healthy} with tumour; shape {tuple(cohort['shape'])}, "
        f"spacing {tuple(round(s, 3) for s in cohort['spacing'])} mm, seed {cohort['seed']}."
    )
    if args.montage is not None:
        from fdn_core.report.montage import draw_cohort_montage

        path = draw_cohort_montage(out, args.montage)
        print(f"Montage: {path}")
    return 0
