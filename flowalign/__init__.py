"""flowalign: align diffusion/flow generators (SD3, FLUX, Wan) with rewards."""

from flowalign import functional, pipelines, rewards, sampling, trainers
from flowalign.models import FlowModel, load_model
from flowalign.sampling import Trajectory, guidance, log_prob, sample, search

__version__ = "0.1.0"

__all__ = [
    "functional", "guidance", "pipelines", "rewards", "sampling", "search", "trainers", "FlowModel", "Trajectory",
    "load_model", "log_prob", "sample", "__version__",
]
