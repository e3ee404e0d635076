"""The segmentation's size rule against its alternatives: per minimum lesion size, how many healthy cases
still show false tumour (and how much), and the whole-tumour Dice of the cases with a tumour.

Encodes every case of a labelled cohort once with the model, then applies ``remove_small_lesions`` at each
size to the same predictions (scored on the re-stacked volumes, as ``fdn eval-model`` scores them). This is
how ``labels.MIN_LESION_ML`` was chosen, on the validation cohort 9201:

    python bench/lesion_size.py --model fdn_core/resources/models/demo --data COHORT_9201
    python bench/lesion_size.py --model M --data C --sizes 0 1 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from fdn_core.data.preprocess import slices_to_volume, volume_to_slices
from fdn_core.data.readers import find_cases, load_case
from fdn_core.errors import DataError
from fdn_core.evaluation.metrics import dice
from fdn_core.model.bundle import load_bundle
from fdn_core.model.lesions import check_min_lesion_ml, remove_small_lesions

__all__ = ["main", "size_table"]

SIZES = (0.0, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0)


def size_table(
    model: Path, data: Path, sizes: tuple[float, ...], batch_size: int = 64
) -> list[dict[str, Any]]:
    """One row per size: healthy cases with false tumour, their false volume (mean, max mL), and the
    whole-tumour Dice (mean, min) over the cases with a tumour."""
    bundle = load_bundle(model)
    cases = []
    for files in find_cases(data):
        case = load_case(files)
        if case.seg is None:
            raise DataError(f"{files.case_id}: no abnormal labels; the size study needs a labelled cohort")
        stack = volume_to_slices(case, bundle.preprocess)
        assert stack.voxel_ml is not None
        seg = bundle.encode_slices(stack.images, batch_size=batch_size).seg
        cases.append((stack, seg, case.seg > 0))
    rows = []
    for size in sizes:
        false_ml: list[float] = []
        scores: list[float] = []
        for stack, seg, truth in cases:
            assert stack.voxel_ml is not None
            kept, cleanup = remove_small_lesions(seg, stack.voxel_ml, size)
            if truth.any():
                scores.append(dice(slices_to_volume(kept, stack.geometry) > 0, truth))
            else:
                false_ml.append(cleanup.kept_ml)
        rows.append(
            {
                "min_lesion_ml": size,
                "healthy_cases": len(false_ml),
                "healthy_with_false_tumour": int(sum(v > 0 for v in false_ml)),
                "false_tumour_ml_mean": float(np.mean(false_ml)) if false_ml else float("nan"),
                "false_tumour_ml_max": float(np.max(false_ml)) if false_ml else float("nan"),
                "tumour_cases": len(scores),
                "whole_tumour_dice_mean": float(np.mean(scores)) if scores else float("nan"),
                "whole_tumour_dice_min": float(np.min(scores)) if scores else float("nan"),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    """Print the table (and write it as JSON with ``--json``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="inference bundle folder")
    p.add_argument("--data", type=Path, required=True, help="labelled cohort (with healthy cases)")
    p.add_argument("--sizes", type=float, nargs="+", default=list(SIZES), help="minimum sizes in mL")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = p.parse_args(argv)
    for size in args.sizes:
        try:
            check_min_lesion_ml(size)
        except DataError as exc:
            p.error(f"--sizes: {exc}")
    rows = size_table(args.model, args.data, tuple(args.sizes))
    print("| min lesion mL | healthy cases with false tumour | false tumour mL mean / max | "
          "whole-tumour Dice, tumour cases: mean / min |")  # fmt: skip
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['min_lesion_ml']:g} | {r['healthy_with_false_tumour']} of {r['healthy_cases']} | "
            f"{r['false_tumour_ml_mean']:.2f} / {r['false_tumour_ml_max']:.2f} | "
            f"{r['whole_tumour_dice_mean']:.3f} / {r['whole_tumour_dice_min']:.3f} (n {r['tumour_cases']}) |"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
