"""The generator's learning-rate schedule (``ScheduleConfig``): a function of the step alone.

``lr_factor(step, total_steps, schedule)`` is the multiplier of ``optimizer.lr`` for generator step
``step`` (0-based: the step about to be taken). Being stateless, the schedule needs nothing in the
checkpoint: a resumed run recomputes the same rate for every step.
"""

from __future__ import annotations

import math

from fdn_training.trainconfig import ScheduleConfig

__all__ = ["lr_factor"]


def lr_factor(step: int, total_steps: int, schedule: ScheduleConfig) -> float:
    """Multiplier of the base learning rate at 0-based generator step ``step`` of a ``total_steps`` run.

    Linear warm-up ``(step + 1) / warmup_steps`` over the first ``warmup_steps`` steps; then 1 (constant) or
    a cosine from 1 down to ``min_lr_ratio``, reached at the last step (``total_steps - 1``).
    """
    if step < schedule.warmup_steps:
        return (step + 1) / schedule.warmup_steps
    if schedule.kind == "constant":
        return 1.0
    span = max(total_steps - 1 - schedule.warmup_steps, 1)
    progress = min(max((step - schedule.warmup_steps) / span, 0.0), 1.0)
    low = schedule.min_lr_ratio
    return low + (1.0 - low) * 0.5 * (1.0 + math.cos(math.pi * progress))
