"""The Trainer: one generator step (after m critic steps), one epoch, validation, and the loop over epochs.

A generator step: the FDN's forward pass under autocast (bf16 on CUDA) through ``forward_model``; with
distribution matching on, ``optimizer.critic_steps`` critic updates on the detached normal codes; the
generator losses in float32 (the critic frozen, so its term reaches only the codes); the gradient norm,
clipped when ``optimizer.grad_clip`` is set; the Adam step, skipped when that norm is not finite.

Under several processes ``forward_model`` is a DistributedDataParallel wrapper of the generator only (see
``fdn_training.distributed``): DDP averages the generator's gradients, the Trainer the critic's.

Around the steps: the generator's learning rate follows ``schedule`` (``fdn_training.schedule``), the code
indices of every step are counted (``fdn_training.usage``: usage per log interval, the last epoch's counts
in checkpoints), and with a wall-clock ``deadline`` the run stops cleanly after the step that passes it.

Fitting the run to the deadline: a learning-rate schedule that decays to the end needs to know where the
end is. With a deadline, the Trainer times ``BUDGET_MEASURE`` steps (after ``BUDGET_SKIP`` warm-up steps,
early in the schedule's warm-up, so the rate so far does not depend on the end) and plans the run's last
step as the one it expects at ``BUDGET_MARGIN`` of the time left (``budget_steps``), unless the run's own
step count comes first. The planned count is saved in checkpoints, so a resumed run keeps the schedule;
the deadline stays a hard stop should the machine slow down.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from fdn_core.device import autocast_for
from fdn_core.errors import FDNError
from fdn_core.evaluation.metrics import dice_from_counts, overlap_counts
from fdn_core.labels import ABNORMAL_CLASSES
from fdn_core.losses import FDNLoss, abnormal_flags
from fdn_core.model import FDN
from fdn_training.checkpoint import Checkpointer, rank_rng_state
from fdn_training.data import TrainData
from fdn_training.distributed import (
    SINGLE_PROCESS,
    DistInfo,
    all_reduce_sum,
    average_gradients,
    wrap_generator,
)
from fdn_training.rng import rng_state, set_rng_state
from fdn_training.runlog import RunLogger
from fdn_training.schedule import lr_factor
from fdn_training.trainconfig import TrainConfig
from fdn_training.usage import UsageTracker

__all__ = [
    "BUDGET_MARGIN",
    "BUDGET_MEASURE",
    "BUDGET_SKIP",
    "MAX_CONSECUTIVE_SKIPS",
    "TrainState",
    "Trainer",
    "budget_steps",
    "is_better",
    "train_step",
]

log = logging.getLogger("fdn_training.train")

#: Training stops with an error after this many generator steps in a row with non-finite gradients.
MAX_CONSECUTIVE_SKIPS = 25
#: Fitting a run to its deadline: steps left untimed first, steps timed, share of the time left planned
#: (the rest absorbs validations, checkpoints and the last validation and export).
BUDGET_SKIP, BUDGET_MEASURE, BUDGET_MARGIN = 5, 20, 0.9


def budget_steps(step: int, total_steps: int, seconds_per_step: float, seconds_left: float) -> int:
    """The last step of a run at ``step`` with ``seconds_left`` on its clock: the steps that fit in
    ``BUDGET_MARGIN`` of that time at ``seconds_per_step``, never past ``total_steps``, at least one more."""
    fit = int(BUDGET_MARGIN * max(seconds_left, 0.0) / max(seconds_per_step, 1e-9))
    return min(total_steps, step + max(fit, 1))


@dataclass
class TrainState:
    """Where a run stands (saved in every checkpoint): steps done, position in the epoch, best validation."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_value: float | None = None
    best_step: int | None = None
    planned_steps: int | None = None  # the run's last step as fitted to a wall-clock budget


def is_better(metric: str, value: float, best: float | None) -> bool:
    """Whether ``value`` of ``metric`` beats ``best`` (lower val_loss, higher Dice; NaN never does)."""
    if math.isnan(value):
        return False
    if best is None:
        return True
    return value < best if metric == "val_loss" else value > best


def float_output(out: Any) -> Any:
    """The model output with every floating tensor cast to float32 (losses run outside autocast)."""
    changes = {}
    for f in dataclasses.fields(out):
        v = getattr(out, f.name)
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != torch.float32:
            changes[f.name] = v.float()
    return dataclasses.replace(out, **changes) if changes else out


def move_batch(batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, seg) of a loader batch on ``device`` (channels-last images on CUDA)."""
    non_blocking = device.type == "cuda"
    x = batch["image"].to(device, non_blocking=non_blocking)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    seg = batch["seg"].to(device, non_blocking=non_blocking)
    return x, seg


class Trainer:
    """Trains one FDN: ``train_step`` (one batch), ``train_epoch``, ``validate`` and ``fit`` (the whole run).

    ``forward_model`` defaults to ``model`` in a single process and to a DDP wrapper of its generator under
    several. ``logger`` and ``checkpoints`` are what ``train_epoch`` / ``fit`` report to and save through;
    without them those only train. ``deadline`` (a ``time.perf_counter()`` value): ``fit`` stops after the
    first step that ends past it (``stopped_by_time``), validates and saves as at a normal end.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        model: FDN,
        loss_fn: FDNLoss,
        opt_g: torch.optim.Optimizer,
        opt_c: torch.optim.Optimizer,
        device: torch.device,
        dist: DistInfo = SINGLE_PROCESS,
        *,
        forward_model: nn.Module | None = None,
        logger: RunLogger | None = None,
        checkpoints: Checkpointer | None = None,
        deadline: float | None = None,
    ) -> None:
        self.cfg, self.model, self.loss_fn = cfg, model, loss_fn
        self.opt_g, self.opt_c = opt_g, opt_c
        self.device, self.dist = device, dist
        self.forward_model = (
            forward_model if forward_model is not None else wrap_generator(model, device, dist)
        )
        self.logger, self.checkpoints = logger, checkpoints
        self.state = TrainState()
        self.last_logs: dict[str, float] = {}
        self.skipped_total = self.skipped_in_a_row = 0
        self.validated_at = -1
        self.usage = UsageTracker(model, device, dist)
        self.deadline = deadline
        self.stopped_by_time = False
        self._budget_clock: tuple[int, float] | None = None  # (step, time) where the timing started

    # ------------------------------------------------------------------------------------ one step
    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        """One generator step, preceded by ``optimizer.critic_steps`` critic steps when DM is on.

        Returns the loss terms as floats, plus ``grad_norm`` (before clipping) and ``skipped`` (1.0 when a
        non-finite gradient was not applied). A non-finite loss raises FDNError.
        """
        x, seg = move_batch(batch, self.device)
        self.model.train()
        with autocast_for(self.device):
            out = self.forward_model(x)
        out = float_output(out)
        self.usage.count(out.idx_normal, out.idx_abnormal)
        flags = abnormal_flags(seg)
        brain = (x != 0).any(dim=1).flatten(1).float().mean(dim=1)
        logs: dict[str, float] = {
            "empty_share": float((brain < self.cfg.sampling.min_brain_fraction).float().mean())
        }
        if self.loss_fn.distribution_matching:
            logs.update(self._critic_steps(out.z_q_normal.detach(), flags))
        logs.update(self._generator_backward(out, x, seg, flags))
        if not all(math.isfinite(v) for v in logs.values()):
            raise FDNError(
                f"training diverged: non-finite loss {logs}; lower optimizer.lr, set optimizer.grad_clip "
                "or check the input data for NaNs"
            )
        logs.update(self._apply_generator_gradients())
        return logs

    def _critic_steps(self, z_normal: torch.Tensor, flags: torch.Tensor) -> dict[str, float]:
        """The critic updates of one step; returns the last one's terms. Gradients are averaged over the
        processes that have both healthy and diseased slices (the others contribute zeros)."""
        params = list(self.model.critic_parameters())
        terms: dict[str, float] = {}
        for _ in range(self.cfg.optimizer.critic_steps):
            loss, terms = self.loss_fn.critic(self.model.critic, z_normal, flags)
            active = float(all_reduce_sum(torch.tensor([terms["dm_active"]]), self.dist)[0])
            if active == 0.0:
                break  # no process has both healthy and diseased slices: nothing to learn from
            self.opt_c.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            average_gradients(params, self.dist, divisor=active)
            self.opt_c.step()
        return {k: v for k, v in terms.items() if k != "dm_active"}

    def _generator_backward(
        self, out: Any, x: torch.Tensor, seg: torch.Tensor, flags: torch.Tensor
    ) -> dict[str, float]:
        """Generator losses and their backward pass; the critic is frozen meanwhile."""
        critic_params = list(self.model.critic_parameters())
        for p in critic_params:
            p.requires_grad_(False)  # the generator term flows through the critic into the codes only
        try:
            total, terms = self.loss_fn.generator(out, x, seg, critic=self.model.critic, abnormal=flags)
            self.opt_g.zero_grad(set_to_none=True)
            total.backward()  # type: ignore[no-untyped-call]
        finally:
            for p in critic_params:
                p.requires_grad_(True)
        return terms

    def _apply_generator_gradients(self) -> dict[str, float]:
        """Clip and apply the generator's gradients, unless their norm is not finite.

        Such a step is skipped, as torch.amp's GradScaler does: applying it would turn every weight into
        NaN. ``train_epoch`` counts skipped steps and gives up when they keep coming.
        """
        params = list(self.model.generator_parameters())
        clip = self.cfg.optimizer.grad_clip if self.cfg.optimizer.grad_clip is not None else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(params, clip, error_if_nonfinite=False))
        if math.isfinite(norm):
            self.opt_g.step()
            return {"grad_norm": norm, "skipped": 0.0}
        self.opt_g.zero_grad(set_to_none=True)
        return {"grad_norm": norm, "skipped": 1.0}

    # ---------------------------------------------------------------------------------- validation
    @torch.no_grad()
    def validate(self, dataset: Dataset[Any], indices: list[int], batch_size: int) -> dict[str, float]:
        """Validation loss (generator loss without the adversarial term) and pooled Dice of the abnormal
        classes. Sums are all-reduced over the processes, so every rank gets the same numbers."""
        self.model.eval()
        loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False, num_workers=0)
        sums: dict[str, float] = {"count": 0.0}
        overlap = np.zeros((3, len(ABNORMAL_CLASSES)), dtype=np.int64)  # intersection, predicted, reference
        with torch.random.fork_rng(devices=[]):
            for batch in loader:
                x, seg = move_batch(batch, self.device)
                with autocast_for(self.device):
                    out = self.model(x)
                out = float_output(out)
                total, terms = self.loss_fn.generator(out, x, seg, critic=None)
                b = x.shape[0]
                sums["count"] += b
                for k, v in {**terms, "loss": float(total)}.items():
                    if k not in ("total", "reg", "dm_active"):
                        sums[k] = sums.get(k, 0.0) + float(v) * b
                pred = out.seg_logits.argmax(1)
                overlap += overlap_counts(pred.cpu().numpy(), seg.cpu().numpy(), ABNORMAL_CLASSES)
        return self._pool_validation(sums, overlap)

    def _pool_validation(self, sums: dict[str, float], overlap: np.ndarray) -> dict[str, float]:
        """All-reduce the per-process validation sums and overlap counts; means and Dice from them."""
        keys = sorted(k for k in sums if k != "count")
        packed = torch.tensor([sums["count"]] + [sums[k] for k in keys], dtype=torch.float64)
        packed = all_reduce_sum(packed, self.dist)
        pooled = all_reduce_sum(torch.from_numpy(overlap).to(torch.float64), self.dist).numpy()
        n = max(float(packed[0]), 1.0)
        result = {f"val_{k}": float(packed[i + 1]) / n for i, k in enumerate(keys)}
        per_class = dice_from_counts(pooled)
        for name, d in zip(("ncr_net", "ed", "et"), per_class, strict=True):
            result[f"val_dice_{name}"] = float(d)
        present = per_class[~np.isnan(per_class)]
        result["val_dice"] = float(present.mean()) if present.size else float("nan")
        result["val_slices"] = n
        return result

    def validate_and_keep_best(self, data: TrainData) -> None:
        """Validate now; log it, and save ``best.pt`` when ``save.best_metric`` improved."""
        s, metric = self.state, self.cfg.save.best_metric
        res = self.validate(data.val_set, data.val_indices, data.local_batch)
        improved = is_better(metric, res[metric], s.best_value)
        if improved:
            s.best_value, s.best_step = res[metric], s.step
            self._save("best")
        if self.logger is not None:
            self.logger.log_validation(s.step, s.epoch, res, improved)
        if self.dist.is_main:
            log.info(
                "step %d validation: %s=%.5g%s", s.step, metric, res[metric], " (best)" if improved else ""
            )
        self.validated_at = s.step

    # -------------------------------------------------------------------------------- epochs, runs
    def set_learning_rate(self, step: int, total_steps: int) -> float:
        """Set the generator's learning rate for 0-based step ``step`` of ``total_steps``; returns it."""
        lr = self.cfg.optimizer.lr * lr_factor(step, total_steps, self.cfg.schedule)
        for group in self.opt_g.param_groups:
            group["lr"] = lr
        return lr

    def out_of_time(self) -> bool:
        """Whether the wall-clock deadline has passed (on any process: all of them then stop together)."""
        if self.deadline is None:
            return False
        late = torch.tensor([float(time.perf_counter() >= self.deadline)])
        return float(all_reduce_sum(late, self.dist)[0]) > 0

    def _plan_budget(self, total_steps: int, first_step: int) -> None:
        """Time steps and, once ``BUDGET_MEASURE`` are timed, plan the run's last step (see the module
        docstring). Rank 0's plan is everyone's."""
        s = self.state
        if self.deadline is None or s.planned_steps is not None:
            return
        now = time.perf_counter()
        if s.step == first_step + BUDGET_SKIP:
            self._budget_clock = (s.step, now)
        if self._budget_clock is None or s.step < self._budget_clock[0] + BUDGET_MEASURE:
            return
        start, t0 = self._budget_clock
        planned = budget_steps(s.step, total_steps, (now - t0) / (s.step - start), self.deadline - now)
        shared = torch.tensor([float(planned) if self.dist.is_main else 0.0], dtype=torch.float64)
        s.planned_steps = int(all_reduce_sum(shared, self.dist)[0])
        if self.dist.is_main:
            log.info(
                "fitted to the wall-clock budget: %.3f s/step over %d steps, %.0f s left: the run ends at "
                "step %d (of %d)",
                (now - t0) / (s.step - start),
                s.step - start,
                self.deadline - now,
                s.planned_steps,
                total_steps,
            )

    def effective_total(self, total_steps: int) -> int:
        """The run's last step: ``total_steps``, or earlier when fitted to a wall-clock budget."""
        planned = self.state.planned_steps
        return total_steps if planned is None else min(total_steps, planned)

    def train_epoch(self, data: TrainData, total_steps: int) -> None:
        """Train from the current position to the end of its epoch, or to ``total_steps`` (or the deadline,
        or the step planned for it); log, validate and save ``last.pt`` on the config's schedule."""
        s, run = self.state, self.cfg.run
        data.set_epoch(s.epoch, s.batch_in_epoch)
        first_step = s.step
        for batch in data.loader:
            total_steps = self.effective_total(total_steps)
            lr = self.set_learning_rate(s.step, total_steps)
            logs = self.train_step(batch)
            self._count_skipped(logs)
            s.step += 1
            s.batch_in_epoch += 1
            end_of_epoch = s.batch_in_epoch >= data.steps_per_epoch
            if end_of_epoch:
                s.epoch, s.batch_in_epoch = s.epoch + 1, 0
                self.usage.end_epoch(s.epoch - 1)
            self._plan_budget(total_steps, first_step)
            total_steps = self.effective_total(total_steps)
            self.stopped_by_time = s.step < total_steps and self.out_of_time()
            last = s.step >= total_steps or self.stopped_by_time
            self.last_logs = logs
            row = None
            if s.step % run.log_every == 0 or last:  # the same steps on every rank: flush is collective
                self.usage.flush()
                row = {"lr": lr, **self.usage.interval_stats()}  # the rate of the row's step
                if self.device.type == "cuda":
                    row["gpu_mem_mib"] = torch.cuda.max_memory_allocated(self.device) / 2**20
            if self.logger is not None:
                self.logger.log_step(s.step, s.epoch, logs, self.cfg.dataset.batch_size, row)
            if (run.val_every and s.step % run.val_every == 0) or (not run.val_every and end_of_epoch):
                self.validate_and_keep_best(data)
            if s.step % self.cfg.save.checkpoint_every == 0 and not last:
                self._save("last")
            if last or end_of_epoch:
                break

    def _save(self, name: str) -> None:
        """Save checkpoint ``name`` (every rank calls this: the usage counts are all-reduced first)."""
        if self.checkpoints is None:
            return
        self.usage.flush()
        self.checkpoints.save(name, self.state_dict())

    def _count_skipped(self, logs: dict[str, float]) -> None:
        """Count steps whose gradient was not applied; raise FDNError when too many come in a row."""
        if not logs["skipped"]:
            self.skipped_in_a_row = 0
            return
        self.skipped_total += 1
        self.skipped_in_a_row += 1
        if self.dist.is_main and self.skipped_total in (1, 10, 100, 1000):
            log.warning(
                "step %d: non-finite gradient norm, generator update skipped (%d so far)",
                self.state.step + 1,
                self.skipped_total,
            )
        if self.skipped_in_a_row >= MAX_CONSECUTIVE_SKIPS:
            raise FDNError(
                f"training diverged: {self.skipped_in_a_row} consecutive steps had non-finite gradients; "
                "lower optimizer.lr, set optimizer.grad_clip or check the input data"
            )

    def fit(self, data: TrainData, total_steps: int) -> None:
        """Train epochs until ``total_steps`` (or the deadline); validate at the end (unless just done) and
        save ``last.pt``."""
        while self.state.step < self.effective_total(total_steps) and not self.stopped_by_time:
            self.train_epoch(data, total_steps)
        if self.stopped_by_time and self.dist.is_main:
            log.warning(
                "wall-clock budget reached: stopping at step %d of %d (fdn train --resume continues)",
                self.state.step,
                self.effective_total(total_steps),
            )
        if self.validated_at != self.state.step:
            self.validate_and_keep_best(data)
        if self.skipped_total and self.dist.is_main:
            log.warning("%d generator step(s) had non-finite gradients and were skipped", self.skipped_total)
        self._save("last")

    # --------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Model, optimisers, progress, best validation and this process's RNG states."""
        s = self.state
        return {
            "model": self.model.state_dict(),
            "optimizer": self.opt_g.state_dict(),
            "critic_optimizer": self.opt_c.state_dict(),
            "step": s.step,
            "epoch": s.epoch,
            "batch_in_epoch": s.batch_in_epoch,
            "best": {"metric": self.cfg.save.best_metric, "value": s.best_value, "step": s.best_step},
            "rng": rng_state(),
            "code_usage": self.usage.state_dict(),
            "planned_steps": s.planned_steps,
        }

    def load_state_dict(self, payload: dict[str, Any]) -> None:
        """Continue from a checkpoint: weights, optimisers, progress and this rank's RNG states."""
        self.model.load_state_dict(payload["model"])
        self.opt_g.load_state_dict(payload["optimizer"])
        self.opt_c.load_state_dict(payload["critic_optimizer"])
        self.state = TrainState(
            step=int(payload["step"]),
            epoch=int(payload["epoch"]),
            batch_in_epoch=int(payload["batch_in_epoch"]),
            best_value=payload["best"]["value"],
            best_step=payload["best"]["step"],
            planned_steps=payload.get("planned_steps"),
        )
        if "code_usage" in payload:  # checkpoints before usage tracking: counts start afresh
            self.usage.load_state_dict(payload["code_usage"])
        set_rng_state(rank_rng_state(payload, self.dist.rank))


def train_step(
    cfg: TrainConfig,
    model: FDN,
    forward_model: nn.Module,
    loss_fn: FDNLoss,
    opt_g: torch.optim.Optimizer,
    opt_c: torch.optim.Optimizer,
    batch: dict[str, Any],
    device: torch.device,
    dist: DistInfo = SINGLE_PROCESS,
) -> dict[str, float]:
    """``Trainer.train_step`` as a function (benchmarks, tests): one step of ``model`` on ``batch``.

    ``forward_model`` is ``model`` or its generator's DistributedDataParallel wrapper.
    """
    trainer = Trainer(cfg, model, loss_fn, opt_g, opt_c, device, dist, forward_model=forward_model)
    return trainer.train_step(batch)
