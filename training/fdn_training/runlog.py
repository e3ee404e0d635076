"""What a run reports while it trains: ``train_log.csv``, ``val_log.csv``, TensorBoard scalars, a tqdm bar
and a ``Progress`` (Slicer's progress dialog, with its Cancel button). Only rank 0 writes; the other ranks
only honour cancellation.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any

import numpy as np

from fdn_core.errors import ConfigError
from fdn_core.fileio import atomic_path
from fdn_core.progress import Progress
from fdn_training.distributed import DistInfo

__all__ = ["TRAIN_FIELDS", "VAL_FIELDS", "CsvLog", "RunLogger", "open_tensorboard"]

TRAIN_FIELDS = ["step", "epoch", "elapsed_s", "slices_per_s", "total", "critic", "grad_norm", "lr"]
TRAIN_FIELDS += ["usage_normal", "usage_abnormal", "perplexity_normal", "perplexity_abnormal"]
TRAIN_FIELDS += ["restarts_normal", "restarts_abnormal", "empty_share"]
VAL_FIELDS = ["step", "epoch", "val_loss", "val_dice", "val_dice_ncr_net", "val_dice_ed", "val_dice_et"]
VAL_FIELDS += ["is_best"]
#: Loss terms shown beside the progress bar.
BAR_TERMS = ("total", "rec", "seg", "critic")
#: Interval figures shown beside the progress bar (short name: row key), the usage shares in percent.
BAR_INTERVAL = {"use_n": "usage_normal", "use_a": "usage_abnormal", "rst": "restarts"}


class CsvLog:
    """Append-only CSV log. The header is the fixed fields plus the keys of the first row; on resume the
    existing header is kept and rows past the resumed step are dropped."""

    def __init__(self, path: Path, fields: list[str], resume_step: int | None) -> None:
        self.path, self.fields = path, list(fields)
        self.started = False
        if resume_step is not None and path.exists():
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                header = list(reader.fieldnames or [])
                rows = [r for r in reader if r.get("step") and int(float(r["step"])) <= resume_step]
            if header:
                self.fields, self.started = header, True
                with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
                    writer = csv.DictWriter(f, fieldnames=header)
                    writer.writeheader()
                    writer.writerows(rows)
        elif path.exists():
            path.unlink()

    def write(self, row: dict[str, Any]) -> None:
        """Append one row (floats with 6 significant digits; keys outside the header are dropped)."""
        if not self.started:
            self.fields += sorted(k for k in row if k not in self.fields)
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
            if not self.started:
                writer.writeheader()
                self.started = True
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def open_tensorboard(run_dir: Path, purge_step: int | None) -> Any:
    """A TensorBoard SummaryWriter on ``run_dir/tensorboard`` (events past ``purge_step`` are dropped)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ConfigError(
            "run.tensorboard is true but the tensorboard package is not installed; "
            "pip install tensorboard (extra 'train') or set run.tensorboard: false"
        ) from exc
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge_step)


class RunLogger:
    """Rank 0's record of a run. A training row is written when the trainer passes ``row`` (every
    ``run.log_every`` steps and at the last one): the step terms averaged since the previous row, plus the
    interval figures of ``row`` as they are (codebook usage, perplexity, restarts); a validation row is
    written per validation.

    ``resume_step``: the step a resumed run continues from (logs past it are dropped), None for a new run.
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        dist: DistInfo,
        log_every: int,
        total_steps: int,
        tensorboard: bool,
        resume_step: int | None,
        progress: Progress | None = None,
        show_progress_bar: bool = False,
    ) -> None:
        self.active = dist.is_main
        self.log_every, self.total_steps, self.progress = log_every, total_steps, progress
        self.window: dict[str, list[float]] = {}
        self.t_start = self.t_window = time.perf_counter()
        self.n_window = 0
        self.bar_interval: dict[str, str] = {}
        self.writer = self.bar = None
        if not self.active:
            return
        self.train_csv = CsvLog(run_dir / "train_log.csv", TRAIN_FIELDS, resume_step)
        self.val_csv = CsvLog(run_dir / "val_log.csv", VAL_FIELDS, resume_step)
        if tensorboard:
            self.writer = open_tensorboard(run_dir, resume_step)
        if show_progress_bar:
            from tqdm.auto import tqdm

            initial = resume_step or 0
            self.bar = tqdm(
                total=total_steps, initial=initial, desc="training", unit="step", dynamic_ncols=True
            )

    def log_step(
        self,
        step: int,
        epoch: int,
        logs: dict[str, float],
        n_slices: int,
        row: dict[str, float] | None = None,
    ) -> None:
        """Record the loss terms of generator step ``step`` (``n_slices``: its global batch size); with
        ``row`` (the interval figures) write a training row."""
        if not self.active:
            if self.progress is not None:
                self.progress.check()
            return
        for k, v in logs.items():
            self.window.setdefault(k, []).append(v)
        self.n_window += n_slices
        if row is not None:
            self._remember_interval(row)
        if self.bar is not None:
            self.bar.update(1)
            postfix = {k: f"{v:.4g}" for k, v in logs.items() if k in BAR_TERMS}
            self.bar.set_postfix({**postfix, **self.bar_interval})
        if self.progress is not None:
            self.progress.update(step, self.total_steps, "training")
        if row is not None:
            self._write_train_row(step, epoch, row)

    def _remember_interval(self, row: dict[str, float]) -> None:
        """The interval figures shown beside the progress bar until the next row."""
        shown = {}
        for short, key in BAR_INTERVAL.items():
            if key == "restarts":
                if "restarts_normal" in row:
                    shown[short] = f"{row['restarts_normal']:.0f}/{row['restarts_abnormal']:.0f}"
            elif key in row:
                shown[short] = f"{100 * row[key]:.0f}%"
        self.bar_interval = shown

    def _write_train_row(self, step: int, epoch: int, extra: dict[str, float]) -> None:
        now = time.perf_counter()
        row: dict[str, Any] = {k: float(np.mean(v)) for k, v in self.window.items()}
        row.update(extra)
        row.update(
            step=step,
            epoch=epoch,
            elapsed_s=now - self.t_start,
            slices_per_s=self.n_window / (now - self.t_window),
        )
        self.train_csv.write(row)
        self._scalars("train", row, step)
        self.window, self.t_window, self.n_window = {}, now, 0

    def log_validation(self, step: int, epoch: int, results: dict[str, float], is_best: bool) -> None:
        """Record the validation results at ``step``."""
        if not self.active:
            return
        self.val_csv.write({"step": step, "epoch": epoch, **results, "is_best": int(is_best)})
        self._scalars("val", results, step)

    def _scalars(self, group: str, values: dict[str, Any], step: int) -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            if k not in ("step", "epoch"):
                self.writer.add_scalar(f"{group}/{k}", v, step)

    def close(self) -> None:
        """Close the progress bar and the TensorBoard writer."""
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
