"""Sampling: the loop and its trajectory record."""

from flowalign.sampling import guidance, search  # noqa: E402, F401
from flowalign.sampling.guidance import RewardGuidance  # noqa: E402, F401
from flowalign.sampling.sampler import (  # noqa: F401
    SAMPLERS,
    GuidanceOutput,
    StepContext,
    Trajectory,
    log_prob,
    sample,
    sde_mask,
)
from flowalign.sampling.search import SearchResult, best_of_n, prune_search  # noqa: E402, F401
from flowalign.sampling.streaming import StreamResult, stream  # noqa: F401
