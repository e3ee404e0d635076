"""Codebook usage during training: how many codes each quantiser selects, per log interval and per epoch.

Every generator step adds the code indices of its batch to per-process counts (``count``; an
``index_add_`` on the device, no synchronisation). ``flush`` sums those counts over the processes
(all-reduce under DDP) into the interval and epoch totals; the Trainer flushes on the same steps on every
rank (log rows, ends of epochs, checkpoints), so the totals are identical everywhere. What is reported:

- per log interval (``interval_stats``): the share of codes selected at least once over the interval and
  the perplexity ``exp(entropy)`` of the selection histogram, per codebook, plus the dead-code restarts of
  the interval (``FP32EMAQuantizer.restarts``);
- in checkpoints and, through ``fdn export``, in the bundle metadata (``window``): the counts of the last
  full epoch, or of the epoch under way when none has finished yet (a short run).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from fdn_core.model import FDN
from fdn_training.distributed import DistInfo, all_reduce_sum

__all__ = ["CODEBOOKS", "UsageTracker", "recorded_usage", "usage_stats"]

#: The two codebooks, in the order of the tracker's rows.
CODEBOOKS = ("normal", "abnormal")


def usage_stats(counts: torch.Tensor) -> tuple[float, float]:
    """(share of codes with a non-zero count, perplexity ``exp(-sum p log p)``) of a (K,) histogram."""
    total = float(counts.sum())
    if total <= 0:
        return 0.0, 0.0
    p = counts[counts > 0].double() / total
    return float((counts > 0).double().mean()), float(math.exp(-float((p * p.log()).sum())))


def recorded_usage(state: dict[str, Any]) -> dict[str, Any]:
    """The usage a checkpoint records (``state``: ``UsageTracker.state_dict()``, as saved under
    ``code_usage``): the counts of the last full epoch, or of the epoch under way when none has finished,
    as plain lists (what ``fdn export`` writes to the bundle metadata), with the window they cover and the
    restarts so far."""
    if state["last_epoch"] is not None:
        counts, complete = state["last_epoch"], True
        epoch, steps = state["last_epoch_index"], state["last_epoch_steps"]
    else:
        counts, complete, epoch, steps = state["epoch_counts"], False, None, state["epoch_steps"]
    return {
        "normal": [int(v) for v in counts[0].tolist()],
        "abnormal": [int(v) for v in counts[1].tolist()],
        "window": {"epoch": epoch, "complete_epoch": complete, "steps": int(steps)},
        "restarts": {name: int(n) for name, n in zip(CODEBOOKS, state["restarts"], strict=True)},
    }


class UsageTracker:
    """Selection counts of both codebooks of ``model`` (rows: ``CODEBOOKS``), see the module docstring."""

    def __init__(self, model: FDN, device: torch.device, dist: DistInfo) -> None:
        self.model, self.dist = model, dist
        k = int(model.config.num_codes)
        self.pending = torch.zeros(2, k, dtype=torch.int64, device=device)
        self.interval = torch.zeros(2, k, dtype=torch.int64)
        self.epoch_counts = torch.zeros(2, k, dtype=torch.int64)
        self.epoch_steps = 0
        self.last_epoch: torch.Tensor | None = None
        self.last_epoch_index: int | None = None
        self.last_epoch_steps = 0
        self.restarts_logged = [0, 0]

    def quantizers(self) -> tuple[Any, Any]:
        """The normal and abnormal quantisers."""
        return self.model.vq_normal, self.model.vq_abnormal

    def count(self, idx_normal: torch.Tensor, idx_abnormal: torch.Tensor) -> None:
        """Add one step's code indices (any shape, int64) of this process."""
        for row, idx in enumerate((idx_normal, idx_abnormal)):
            flat = idx.detach().reshape(-1)
            self.pending[row].index_add_(0, flat, torch.ones_like(flat))
        self.epoch_steps += 1

    def flush(self) -> None:
        """Sum the pending counts over the processes into the interval and epoch totals (a collective
        under DDP: every rank calls it on the same steps)."""
        pending = all_reduce_sum(self.pending.to("cpu", copy=True), self.dist)
        self.interval += pending
        self.epoch_counts += pending
        self.pending.zero_()

    def end_epoch(self, epoch: int) -> None:
        """Epoch ``epoch`` (0-based) has finished: its counts become the recorded window."""
        self.flush()
        self.last_epoch = self.epoch_counts.clone()
        self.last_epoch_index, self.last_epoch_steps = epoch, self.epoch_steps
        self.epoch_counts.zero_()
        self.epoch_steps = 0

    def interval_stats(self) -> dict[str, float]:
        """Usage share and perplexity of each codebook over the interval since the last call, and the
        restarts in it; starts a new interval. Call after ``flush``."""
        out: dict[str, float] = {}
        for row, name in enumerate(CODEBOOKS):
            share, perplexity = usage_stats(self.interval[row])
            out[f"usage_{name}"] = share
            out[f"perplexity_{name}"] = perplexity
        for row, (name, q) in enumerate(zip(CODEBOOKS, self.quantizers(), strict=True)):
            out[f"restarts_{name}"] = float(q.restarts - self.restarts_logged[row])
            self.restarts_logged[row] = int(q.restarts)
        self.interval.zero_()
        return out

    def window(self) -> dict[str, Any]:
        """``recorded_usage`` of the current state (call after ``flush``)."""
        return recorded_usage(self.state_dict())

    # ------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs (call after ``flush``: nothing pending); tensors and plain types."""
        return {
            "interval": self.interval.clone(),
            "epoch_counts": self.epoch_counts.clone(),
            "epoch_steps": self.epoch_steps,
            "last_epoch": None if self.last_epoch is None else self.last_epoch.clone(),
            "last_epoch_index": self.last_epoch_index,
            "last_epoch_steps": self.last_epoch_steps,
            "restarts": [int(q.restarts) for q in self.quantizers()],
            "restarts_logged": list(self.restarts_logged),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict`` (the quantisers' restart counters included)."""
        self.interval = state["interval"].clone()
        self.epoch_counts = state["epoch_counts"].clone()
        self.epoch_steps = int(state["epoch_steps"])
        last = state["last_epoch"]
        self.last_epoch = None if last is None else last.clone()
        self.last_epoch_index = state["last_epoch_index"]
        self.last_epoch_steps = int(state["last_epoch_steps"])
        for q, n in zip(self.quantizers(), state["restarts"], strict=True):
            q.restarts = int(n)
        self.restarts_logged = [int(v) for v in state["restarts_logged"]]
        self.pending.zero_()
