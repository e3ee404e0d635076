"""Arguments shared by several ``fdn`` commands, declared once (same flag, same help, same checks)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = [
    "add_batch_size",
    "add_data",
    "add_db",
    "add_device",
    "add_model",
    "add_no_progress",
    "positive_int",
]


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (argparse prints the error, naming the flag)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def add_model(parser: argparse.ArgumentParser, required: bool = True, **kwargs: Any) -> None:
    """``--model``: an inference bundle folder."""
    help_text = kwargs.pop("help", "inference bundle folder (bundle.json + model.safetensors)")
    parser.add_argument("--model", required=required, type=Path, help=help_text, **kwargs)


def add_db(
    parser: argparse.ArgumentParser, required: bool = True, help: str = "code database folder"
) -> None:
    """``--db``: a code database folder."""
    parser.add_argument("--db", required=required, type=Path, help=help)


def add_data(
    parser: argparse.ArgumentParser,
    required: bool = True,
    help: str = "cohort folder (BraTS, Decathlon or phantom layout)",
) -> None:
    """``--data``: a cohort folder."""
    parser.add_argument("--data", required=required, type=Path, help=help)


def add_device(parser: argparse.ArgumentParser) -> None:
    """``--device``: where the network runs."""
    parser.add_argument(
        "--device", default="auto", help="auto (CUDA, then MPS, then CPU), cuda, cuda:N, mps or cpu"
    )


def add_batch_size(parser: argparse.ArgumentParser, default: int | None = None) -> None:
    """``--batch-size``: slices per forward pass."""
    what = "by device" if default is None else str(default)
    parser.add_argument(
        "--batch-size", type=positive_int, default=default, help=f"slices per forward pass (default: {what})"
    )


def add_no_progress(parser: argparse.ArgumentParser) -> None:
    """``--no-progress``: no progress bars (logs, CI)."""
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
