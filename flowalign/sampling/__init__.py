"""Sampling: the loop and its trajectory record."""

from flowalign.sampling.sampler import (  # noqa: F401
    SAMPLERS,
    GuidanceOutput,
    StepContext,
    Trajectory,
    log_prob,
    sample,
    sde_mask,
)
