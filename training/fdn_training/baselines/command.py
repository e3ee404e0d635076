"""``fdn train-baseline``: train a retrieval baseline (SimSiam or Y-Net) on a cohort, on the FDN's slices.

Registered through the entry-point group ``fdn.commands`` (``training/pyproject.toml``).
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from fdn_core.cli.args import add_data, add_device, add_no_progress

__all__ = ["command_line", "register", "run"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``train-baseline`` subcommand."""
    parser = subparsers.add_parser(
        "train-baseline",
        help="train a retrieval baseline (SimSiam self-supervised, or Y-Net hash codes)",
        description="Train SimSiam (seed 003: self-supervised, MR view augmentation, cosine retrieval) or "
        "Y-Net (seed 004: segmentation + classification + circle-loss hash codes, Hamming retrieval) on the "
        "FDN's preprocessed slices of a cohort. Writes config.yaml, train_log.csv, val_log.csv and the "
        "bundle (RUN/bundle: model.safetensors + baseline.json) for fdn eval-retrieval --embeddings.",
    )
    parser.add_argument("method", choices=("simsiam", "ynet"), help="which baseline")
    parser.add_argument(
        "--config", default="cpu", help="config file, or a shipped name: cpu (default), tiny (tests)"
    )
    add_data(parser)
    parser.add_argument("--out", required=True, type=Path, help="run folder")
    parser.add_argument("--cache", type=Path, default=None, help="slice cache folder (default RUN/cache)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a shared machine)")
    parser.add_argument("--max-steps", type=int, default=None, help="override run.max_steps")
    parser.add_argument("--max-minutes", type=float, default=None, help="override run.max_minutes")
    add_device(parser)
    add_no_progress(parser)
    parser.set_defaults(func=run)


def command_line(args: argparse.Namespace) -> str:
    """The ``fdn train-baseline`` command line that reproduces ``args`` (recorded in the bundle)."""
    parts = ["fdn", "train-baseline", args.method, "--config", str(args.config), "--data", str(args.data)]
    parts += ["--out", str(args.out)]
    for flag, value in (
        ("--cache", args.cache),
        ("--threads", args.threads),
        ("--max-steps", args.max_steps),
        ("--max-minutes", args.max_minutes),
    ):
        if value is not None:
            parts += [flag, str(value)]
    if args.device != "auto":
        parts += ["--device", str(args.device)]
    return " ".join(shlex.quote(p) for p in parts)


def run(args: argparse.Namespace) -> int:
    """Run ``fdn train-baseline``."""
    from fdn_core.device import select_device
    from fdn_core.progress import tqdm_progress
    from fdn_training.baselines.config import load_train_config
    from fdn_training.baselines.loop import train_baseline

    cfg = load_train_config(args.method, args.config)
    command = command_line(args)
    result = train_baseline(
        cfg,
        Path(args.data),
        Path(args.out),
        cache_dir=args.cache,
        device=select_device(args.device),
        threads=args.threads,
        progress=tqdm_progress(disable=args.no_progress),
        command=command,
        max_steps=args.max_steps,
        max_minutes=args.max_minutes,
    )
    val = ", ".join(f"{k} {v:.4g}" for k, v in result.validation.items())
    print(
        f"{args.method}: {result.steps} steps, {result.slices_seen} slices in {result.minutes:.1f} min; "
        f"validation {val}; bundle {result.bundle}"
    )
    return 0
