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
    "model_folder",
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


def model_folder(text: str) -> Path:
    """An argparse type: a bundle folder, or the name of a model shipped with fdn_core (``demo``) when no
    such folder exists here."""
    from fdn_core.resources import MODELS_DIR, shipped_model_dir

    path = Path(text)
    if path.exists() or text in ("", ".") or "/" in text or "\\" in text:
        return path
    shipped = sorted(p.name for p in MODELS_DIR.iterdir() if (p / "bundle.json").is_file())
    if text in shipped:
        return shipped_model_dir(text)
    raise argparse.ArgumentTypeError(
        f"{text!r} is neither a folder nor a shipped model; give a bundle folder (bundle.json + "
        f"model.safetensors) or one of the shipped models: {', '.join(shipped)}"
    )


def add_model(parser: argparse.ArgumentParser, required: bool = True, **kwargs: Any) -> None:
    """``--model``: an inference bundle folder, or a shipped model's name."""
    help_text = kwargs.pop("help", "inference bundle folder (bundle.json + model.safetensors)")
    help_text += "; or the name of a shipped model (demo: the FDN shipped with fdn_core)"
    parser.add_argument("--model", required=required, type=model_folder, help=help_text, **kwargs)


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
