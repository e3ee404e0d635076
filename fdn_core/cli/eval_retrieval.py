"""``fdn eval-retrieval``: the paper's retrieval evaluation (Table 2 protocol, oracle, mAP@k)."""

from __future__ import annotations

import argparse
from pathlib import Path

from fdn_core.cli.args import add_batch_size, add_data, add_db, add_device, add_model, add_no_progress

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``eval-retrieval`` subcommand."""
    from fdn_core.cli.args import positive_int
    from fdn_core.evaluation.ranking import BASELINES
    from fdn_core.labels import DISTANCES

    parser = subparsers.add_parser(
        "eval-retrieval",
        help="evaluate retrieval as in the paper's Table 2 (Dice of retrieved slices, oracle, mAP@k)",
        description=(
            "Query the database with the largest-tumour slice of each query volume (default: every case "
            "of --data that is not in the database; --leave-one-out: every database volume against all the "
            "others), retrieve the volume-wise top-k (own volume excluded) for each distance and similarity, "
            "and score the results by the Dice of their ground-truth labels against the query's, beside "
            "trivial baselines (random, level prior, pooled pixels), trained baselines (--embeddings: "
            "SimSiam, Y-Net hash codes) and the oracle that maximises that Dice directly; mAP@k, P@k and "
            "mP@1..k under "
            "several relevance definitions. Writes retrieval_eval.json and retrieval_eval.md."
        ),
    )
    add_db(parser, help="code database of the reference volumes")
    add_data(
        parser,
        required=False,
        help="labelled cohort folder (queries and references); optional with --leave-one-out",
    )
    add_model(parser, help="inference bundle the database was built with")
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--queries", nargs="+", default=None, help="query case ids (default: cases not in --db)"
    )
    which.add_argument(
        "--leave-one-out",
        action="store_true",
        help="query with every tumour volume of the database against all the other volumes",
    )
    parser.add_argument("--out", required=True, type=Path, help="folder for retrieval_eval.json / .md")
    parser.add_argument("--top", type=int, default=10, help="k of the volume-wise top-k (paper: 10)")
    parser.add_argument(
        "--distances",
        nargs="+",
        choices=DISTANCES,
        default=None,
        help="distances to evaluate (default: euclidean, angular, hamming, and learned when the model has a "
        "retrieval embedding)",
    )
    parser.add_argument(
        "--baselines",
        nargs="*",
        choices=BASELINES,
        default=list(BASELINES),
        help="trivial baselines scored beside the FDN (default: all; give none to skip them)",
    )
    parser.add_argument(
        "--embeddings",
        nargs="*",
        default=[],
        metavar="NAME|FOLDER",
        help="trained baselines ranked on the same queries and references: the shipped simsiam and ynet, "
        "baseline bundle folders (fdn train-baseline ... RUN/bundle), or KEY=FOLDER",
    )
    parser.add_argument(
        "--level-tolerance",
        type=float,
        default=0.05,
        help="relative axial distance within which a slice is at the query's level (relevance 'level')",
    )
    parser.add_argument(
        "--no-context",
        action="store_true",
        help="leave out the rows of each distance searched with axial context (the normal term over the "
        "query's neighbouring slices)",
    )
    parser.add_argument("--draws", type=positive_int, default=10, help="seeded draws of random baselines")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random baselines")
    add_device(parser)
    add_batch_size(parser)
    add_no_progress(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``fdn eval-retrieval``."""
    from fdn_core.baselines.methods import load_embedding_methods
    from fdn_core.data.provenance import warn_training_overlap
    from fdn_core.errors import ConfigError
    from fdn_core.evaluation.retrieval_eval import evaluate_retrieval, markdown_report, write_retrieval_report
    from fdn_core.model.bundle import load_bundle
    from fdn_core.progress import tqdm_progress

    if args.top < 1:
        raise ConfigError(f"--top {args.top}: must be >= 1")
    if args.data is None and not args.leave_one_out:
        raise ConfigError("--data is required (the query cohort), unless --leave-one-out")
    if args.out.exists() and not args.out.is_dir():
        raise ConfigError(f"--out {args.out}: is a file; give a folder for the reports (made if missing)")
    bundle = load_bundle(args.model, device=args.device)
    methods = load_embedding_methods(args.embeddings, device=args.device) if args.embeddings else []
    result = evaluate_retrieval(
        bundle,
        args.db,
        args.data,
        queries=args.queries,
        top=args.top,
        distances=None if args.distances is None else list(dict.fromkeys(args.distances)),
        progress=tqdm_progress(disable=args.no_progress),
        batch_size=args.batch_size,
        leave_one_out=args.leave_one_out,
        baselines=args.baselines,
        draws=args.draws,
        seed=args.seed,
        methods=methods,
        level_tolerance=args.level_tolerance,
        context=not args.no_context,
    )
    overlap = warn_training_overlap(bundle.metadata, result.cases.values(), "fdn eval-retrieval")
    if overlap is not None:
        result.notes.append(overlap)
    for m in methods:
        overlap = warn_training_overlap(
            m.bundle.metadata, result.cases.values(), f"fdn eval-retrieval ({m.key})"
        )
        if overlap is not None:
            result.notes.append(f"{m.key}: {overlap}")
    json_path, md_path = write_retrieval_report(result, args.out)
    print(markdown_report(result))
    print(f"wrote {json_path} and {md_path}")
    return 0
