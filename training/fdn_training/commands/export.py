"""``fdn export``: write the inference bundle of a training checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``export`` subcommand."""
    parser = subparsers.add_parser(
        "export",
        help="export an inference bundle from a training run",
        description="Export the inference bundle (safetensors weights + configs + hashes) of a checkpoint.",
    )
    parser.add_argument("--run", required=True, type=Path, help="training run folder (fdn train --out)")
    parser.add_argument(
        "--checkpoint",
        default="best",
        help="best (default; last when no validation ran), last, or a .pt path",
    )
    parser.add_argument("--out", required=True, type=Path, help="bundle folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bundle folder")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``fdn export``."""
    from fdn_training.train import export_checkpoint, resolve_checkpoint

    source = resolve_checkpoint(args.run, args.checkpoint)
    out = export_checkpoint(source, args.out, overwrite=args.overwrite)
    print(f"exported {source} -> {out}")
    return 0
