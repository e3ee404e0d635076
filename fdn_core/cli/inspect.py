"""``fdn inspect DIR``: list the cases of a BraTS or Decathlon cohort and every problem found in it.

Every case is loaded (so NaN/Inf voxels, truncated files and unknown label values are found too). The exit
code is 0 when the cohort is clean and 2 when any problem was found.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from fdn_core.cli.args import add_no_progress
from fdn_core.data.readers import CaseProblem, CaseSummary, detect_layout, validate_cohort
from fdn_core.labels import ABNORMAL_NAMES
from fdn_core.progress import tqdm_progress

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    """Add the ``inspect`` subcommand."""
    p = subparsers.add_parser(
        "inspect",
        help="list the cases of a BraTS / Decathlon folder and check every file",
        description=(
            "Read every case of a BraTS-layout (DIR/<case>/<case>_t1.nii.gz ...) or Medical Segmentation "
            "Decathlon-layout (DIR/imagesTr, labelsTr, imagesTs) folder and report shape, spacing, "
            "modalities, label counts and any problem. Exit code 2 if a problem was found."
        ),
    )
    p.add_argument("dir", type=Path, help="cohort folder")
    p.add_argument("--json", action="store_true", help="print a JSON report on stdout instead of a table")
    p.add_argument("--workers", type=int, default=2, help="cases read in parallel (default 2)")
    add_no_progress(p)
    p.set_defaults(func=run)


def _status(s: CaseSummary) -> str:
    return "unlabelled" if s.diseased is None else ("diseased" if s.diseased else "healthy")


def _table(summaries: list[CaseSummary]) -> str:
    header = [
        "case",
        "layout",
        "shape",
        "spacing (mm)",
        "status",
        "tumour slices",
        *ABNORMAL_NAMES[1:],
        "anatomy",
    ]
    rows = [header]
    for s in summaries:
        counts = s.seg_counts or {}
        anat = "-"
        if s.anat_counts is not None:
            present = sum(1 for name, n in list(s.anat_counts.items())[1:] if n > 0)
            anat = f"{present}/{len(s.anat_counts) - 1} labels"
        rows.append(
            [
                s.case_id,
                s.layout,
                "x".join(str(v) for v in s.shape),
                "x".join(f"{v:g}" for v in s.spacing),
                _status(s),
                "-" if s.n_abnormal_slices is None else f"{s.n_abnormal_slices}/{s.n_slices}",
                *[str(counts[c]) if c in counts else "-" for c in ABNORMAL_NAMES[1:]],
                anat,
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)


def _report(root: Path, summaries: list[CaseSummary], problems: list[CaseProblem]) -> dict[str, Any]:
    return {
        "root": str(root),
        "layout": detect_layout(root),
        "n_cases": len(summaries),
        "n_problems": len(problems),
        "status_counts": {
            k: sum(1 for s in summaries if _status(s) == k) for k in ("healthy", "diseased", "unlabelled")
        },
        "cases": [s.to_dict() for s in summaries],
        "problems": [
            {"case_id": p.case_id, "file": None if p.path is None else str(p.path), "message": p.message}
            for p in problems
        ],
    }


def run(args: argparse.Namespace) -> int:
    """Inspect ``args.dir``; returns 2 if any problem was found, else 0."""
    root: Path = args.dir
    progress = None if args.no_progress else tqdm_progress()
    summaries, problems = validate_cohort(root, progress=progress, workers=args.workers)
    report = _report(root, summaries, problems)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        counts = report["status_counts"]
        print(
            f"{root}: {report['layout']} layout, {len(summaries)} readable case(s) "
            f"({counts['diseased']} diseased, {counts['healthy']} healthy, {counts['unlabelled']} unlabelled)"
        )
        if summaries:
            mods = sorted({", ".join(s.modalities) for s in summaries})
            print(f"channels in file order: {'; '.join(mods)} (read as t1, t1ce, t2, flair)")
            print(_table(summaries))
        if problems:
            print(f"\n{len(problems)} problem(s):", file=sys.stderr)
            for p in problems:
                print(f"  - {p}", file=sys.stderr)
    return 2 if problems else 0
