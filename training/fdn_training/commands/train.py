"""``fdn train``: train an FDN on a cohort (single process, or one process per GPU under torchrun)."""

from __future__ import annotations

import argparse
from pathlib import Path

from fdn_core.cli.args import add_data, add_device, add_no_progress

__all__ = ["add_train_arguments", "register", "run"]


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``fdn train`` (shared with ``python -m fdn_training.train`` under torchrun)."""
    parser.add_argument(
        "--config",
        help="training config: a YAML/JSON file or a shipped name (cpu_recipe, gpu_paper, fdn8x8_256, "
        "demo_cpu, tiny_test, ...); optional with --resume (the run's own config is used)",
    )
    add_data(parser)
    parser.add_argument("--out", required=True, type=Path, help="run folder (checkpoints, logs, bundle)")
    add_device(parser)
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last checkpoint"
    )
    parser.add_argument(
        "--max-steps", type=int, default=None, help="stop after this many generator steps in total"
    )
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="wall-clock budget: after timing its first steps the run plans its step count (and so the "
        "learning-rate schedule) to end within it, and stops cleanly (validate, save, export) should it "
        "run over",
    )
    parser.add_argument(
        "--cache", type=Path, default=None, help="preprocessed-slice cache folder (default RUN/cache)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's choice; use 1 when other jobs share the cores)",
    )
    parser.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="warm start: begin a new run from another run's checkpoint (weights only, same architecture)",
    )
    parser.add_argument(
        "--allow-data-change",
        action="store_true",
        help="with --resume: continue even though --data holds another case list than the run started on",
    )
    parser.add_argument("--no-export", action="store_true", help="do not export RUN/bundle at the end")
    add_no_progress(parser)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``train`` subcommand."""
    parser = subparsers.add_parser(
        "train",
        help="train the feature decomposing network",
        description="Train an FDN (checkpoints, CSV/TensorBoard logs, inference bundle in RUN/bundle). "
        "Multi-GPU: torchrun --standalone --nproc_per_node=N -m fdn_training.train <same arguments>.",
    )
    add_train_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``fdn train``."""
    from fdn_training.train import run_from_args

    return run_from_args(args)
