"""What the learned distance D_L is fitted to: the Dice of the label maps pooled to the code grid (as
shipped), to a finer grid, or of the label maps themselves (the score the retrieval evaluation reports).

Encodes the training cohort once, learns one retrieval embedding per target grid with the settings of
``fdn train-embedding`` (``learn_embedding``), writes each into a copy of the bundle and runs the retrieval
evaluation on a validation database with it (leave-one-out, D_L with and without axial context):

    python bench/dl_targets.py --model fdn_core/resources/models/demo --train-data data/train120 \\
        --db DB_9201 --grids 8 64 --out OUT

A grid equal to the model's image size keeps the label maps (one-hot, ``map_dice``); a smaller one averages
them over its cells (``pooled_dice``, whose memory grows with the grid: 16 needs about 0.4 GB per step).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fdn_core.errors import ConfigError
from fdn_core.evaluation.retrieval_eval import evaluate_retrieval
from fdn_core.labels import CODE_TYPES
from fdn_core.model.bundle import load_bundle, save_retrieval_embedding
from fdn_training.embedding import EmbeddingSettings, collect_cells, learn_embedding, map_dice, pooled_dice

__all__ = ["main", "pool_fractions"]

SIMILARITIES = ("S_normal", "S_abnormal", "S_sum")


def pool_fractions(maps: np.ndarray, size: int, grid: int) -> np.ndarray:
    """Label fractions (n, C, size*size) at the image size, averaged over the cells of a ``grid`` x ``grid``
    grid: (n, C, grid*grid) float32."""
    if size % grid:
        raise ConfigError(f"--grids: {grid} does not divide the model's image size {size}")
    n, c, _ = maps.shape
    f = size // grid
    cells = maps.reshape(n, c, grid, f, grid, f).mean(axis=(3, 5), dtype=np.float64)
    out: np.ndarray = cells.reshape(n, c, grid * grid).astype(np.float32)
    return out


def main(argv: list[str] | None = None) -> int:
    """Learn D_L per target grid and evaluate each; print and write the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--train-data", type=Path, required=True, help="the model's labelled training cohort")
    ap.add_argument("--db", type=Path, required=True, help="database of a labelled validation cohort")
    ap.add_argument("--grids", type=int, nargs="+", default=[8, 64], help="target grids (8: the code grid)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=EmbeddingSettings.steps)
    ap.add_argument("--queries", type=int, default=EmbeddingSettings.queries)
    ap.add_argument("--references", type=int, default=EmbeddingSettings.references)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--context",
        choices=("no", "normal"),
        default=["no"],
        nargs="+",
        help="normal: learn the normal term with the axial-context similarity the search uses with "
        "--context (labels.AXIAL_CONTEXT); give both to compare",
    )
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    bundle = load_bundle(args.model, device="cpu")
    size = int(bundle.preprocess.image_size)
    for g in args.grids:
        if g < 1 or size % g:
            raise ConfigError(f"--grids: {g} must be a positive divisor of the model's image size {size}")
    cells = collect_cells(bundle, args.train_data, workers=2, label_grid=(size, size))
    books = dict(zip(CODE_TYPES, bundle.codebooks(), strict=True))
    settings = EmbeddingSettings(
        steps=args.steps, queries=args.queries, references=args.references, seed=args.seed
    )
    rows: list[dict[str, Any]] = []
    for g, ctx in [(g, c) for g in args.grids for c in args.context]:
        name = f"grid_{g}" + ("" if ctx == "no" else "_context")
        copy = args.out / name / "bundle"
        if copy.exists():
            shutil.rmtree(copy)
        shutil.copytree(bundle.path, copy, ignore=shutil.ignore_patterns("eval"))
        emb: dict[str, np.ndarray] = {}
        info: dict[str, Any] = {}
        for t in CODE_TYPES:
            maps = cells.fractions[t]
            if maps is None:
                raise ConfigError(f"{args.train_data}: no anatomy labels; this study needs them")
            fr = maps if g == size else pool_fractions(maps, size, g)
            dice = map_dice if g == size else pooled_dice
            emb[t], info[t] = learn_embedding(
                cells.codes[t],
                fr,
                cells.case,
                books[t],
                settings,
                label=t,
                dice=dice,
                context=ctx == "normal" and t == "normal",
            )
            print(f"grid {g} {t}: {info[t]}", flush=True)
        save_retrieval_embedding(copy, emb["normal"], emb["abnormal"], {"bench": f"target grid {g}", **info})
        result = evaluate_retrieval(
            load_bundle(copy, device="cpu"), args.db, leave_one_out=True, distances=["learned"], baselines=()
        )
        summary = result.summary()
        row: dict[str, Any] = {
            "grid": g,
            "context": ctx,
            "learn_seconds": sum(info[t]["seconds"] for t in CODE_TYPES),
        }
        for key, name in (("learned", "D_L"), ("learned+context", "D_L + context")):
            row[name] = {s: round(summary[key][s]["ratio_to_oracle"], 4) for s in SIMILARITIES}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\nratio to the oracle on {args.db} (leave-one-out), S_normal / S_abnormal / S_sum")
    print("| target grid | D_L | D_L + axial context | learning (s) |\n|---|---|---|---|")
    for row in rows:
        cols = [" / ".join(f"{row[m][s]:.3f}" for s in SIMILARITIES) for m in ("D_L", "D_L + context")]
        label = f"{row['grid']} (the label maps)" if row["grid"] == size else str(row["grid"])
        label += ", normal term learned with axial context" if row["context"] == "normal" else ""
        print(f"| {label} | {cols[0]} | {cols[1]} | {row['learn_seconds']:.0f} |")
    (args.out / "dl_targets.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
