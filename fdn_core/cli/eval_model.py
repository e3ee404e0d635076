"""``fdn eval-model``: reconstruction, segmentation, codebook, binarisation and leakiness metrics (paper
4.4.1-4.4.5)."""

from __future__ import annotations

import argparse
from pathlib import Path

from fdn_core.cli.args import add_batch_size, add_data, add_device, add_model, add_no_progress
from fdn_core.labels import MIN_LESION_ML

__all__ = ["register", "run"]


def _lesion_ml(text: str) -> float:
    """argparse type: a lesion size in mL (``check_min_lesion_ml``)."""
    from fdn_core.errors import DataError
    from fdn_core.model.lesions import check_min_lesion_ml

    try:
        value = float(text)
        check_min_lesion_ml(value)
    except DataError as exc:  # a ValueError too: caught first
        raise argparse.ArgumentTypeError(str(exc)) from None
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of mL") from None
    return value


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``eval-model`` subcommand."""
    parser = subparsers.add_parser(
        "eval-model",
        help="evaluate a trained model (reconstruction, Dice, compactness, leakiness)",
        description="Evaluate an inference bundle on labelled cases; writes model_eval.json and .md.",
    )
    add_model(parser)
    add_data(parser, help="cohort folder with abnormal labels")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--cases", nargs="+", default=None, help="case ids to evaluate (default: all)")
    which.add_argument(
        "--held-out",
        action="store_true",
        help="evaluate the validation cases recorded in the bundle by fdn train (never trained on)",
    )
    parser.add_argument("--out", required=True, type=Path, help="folder for model_eval.json / model_eval.md")
    add_device(parser)
    add_batch_size(parser, default=32)
    parser.add_argument(
        "--train-data",
        type=Path,
        default=None,
        help="the cohort the model was trained on: the leakiness classifier then learns from "
        "reconstructions of the bundle's training cases found there and is tested on the evaluated cases "
        "(the paper's protocol); without it the evaluated cases are split case-wise",
    )
    parser.add_argument(
        "--leak-epochs",
        type=int,
        default=40,
        help="most epochs of the leakiness classifier (it stops early on a validation share of its "
        "training cases)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the leakiness split and classifier")
    parser.add_argument(
        "--no-binarize", action="store_true", help="skip fitting and reporting the binary codes"
    )
    parser.add_argument(
        "--min-lesion-ml",
        type=_lesion_ml,
        default=MIN_LESION_ML,
        help="score the segmentation without predicted lesions (3D connected tumour components) smaller "
        f"than this many mL, as the interfaces show it (default {MIN_LESION_ML:g}; 0 keeps all); the "
        "unprocessed prediction is scored too",
    )
    add_no_progress(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``fdn eval-model``."""
    from fdn_core.data.provenance import cases_of, warn_training_overlap
    from fdn_core.errors import ConfigError
    from fdn_core.evaluation.model_eval import (
        LeakinessSettings,
        evaluate_model,
        markdown_report,
        write_model_eval,
    )
    from fdn_core.model.bundle import load_bundle
    from fdn_core.progress import tqdm_progress

    try:
        settings = LeakinessSettings(epochs=args.leak_epochs, seed=args.seed)
    except ValueError as exc:
        raise ConfigError(f"--leak-epochs/--seed: {exc}") from exc
    if args.out.exists() and not args.out.is_dir():
        raise ConfigError(f"--out {args.out}: is a file; give a folder for the reports (made if missing)")
    bundle = load_bundle(args.model, device=args.device)
    cases = args.cases
    if args.held_out:
        cases = bundle.metadata.get("val_cases")
        if not cases:
            raise ConfigError(
                f"{args.model}: the bundle records no validation cases (not exported by fdn train); "
                "pass --cases instead"
            )
    warn_training_overlap(bundle.metadata, cases_of(args.data, cases), "fdn eval-model")
    progress = tqdm_progress(disable=args.no_progress)
    results = evaluate_model(
        bundle,
        args.data,
        cases,
        train_data=args.train_data,
        leak=settings,
        batch_size=args.batch_size,
        binarize=not args.no_binarize,
        min_lesion_ml=args.min_lesion_ml,
        progress=progress,
    )
    json_path, md_path = write_model_eval(results, args.out)
    print(markdown_report(results))
    print(f"wrote {json_path} and {md_path}")
    return 0
