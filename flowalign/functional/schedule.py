"""Learning-rate schedules over epochs: the factor that multiplies the base learning rate in a given epoch.

A schedule depends only on the epoch index, so a run resumed from a checkpoint continues it exactly.
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "cosine", "linear")


def lr_factor(schedule: str, epoch: int, epochs: int, warmup_epochs: int = 0, final: float = 0.0) -> float:
    """The factor for 0-based ``epoch`` of ``epochs``: a linear warm-up over the first ``warmup_epochs``
    (epoch ``i`` gets ``(i + 1) / (warmup_epochs + 1)``), then ``constant`` (1), or ``cosine`` / ``linear``
    decay from 1 at the first epoch after the warm-up to ``final`` at the last epoch."""
    if schedule not in SCHEDULES:
        raise ValueError(f"Unknown lr schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}.")
    if epoch < warmup_epochs:
        return (epoch + 1) / (warmup_epochs + 1)
    if schedule == "constant":
        return 1.0
    span = max(1, epochs - 1 - warmup_epochs)
    progress = min(1.0, (epoch - warmup_epochs) / span)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return final + (1 - final) * shape
