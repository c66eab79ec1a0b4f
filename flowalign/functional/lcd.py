"""Latent consistency distillation (LCD) on the flow ODE, the base of RG-LCD.

For a flow model the consistency function is the x0 prediction ``f(x, sigma) = x - sigma v(x, sigma)``: it
meets the boundary condition ``f(x, 0) = x`` by construction, so no skip/out scalings are needed. One
skipping-step solver step of the CFG-guided teacher takes ``x`` at ``sigma_hi`` to ``sigma_lo``; the student
at ``(x_hi, sigma_hi)`` regresses onto the EMA target network at ``(x_lo, sigma_lo)`` with a pseudo-Huber loss.
"""

from __future__ import annotations

import torch

from flowalign.functional.flow import _bcast


def euler_solver_step(x: torch.Tensor, v: torch.Tensor, sigma_hi: torch.Tensor, sigma_lo: torch.Tensor
                      ) -> torch.Tensor:
    """The teacher's ODE step from ``sigma_hi`` to ``sigma_lo`` (per-sample sigmas): ``x + (lo - hi) v``."""
    return x + (_bcast(sigma_lo, x) - _bcast(sigma_hi, x)) * v


def pseudo_huber(pred: torch.Tensor, target: torch.Tensor, c: float = 1e-3) -> torch.Tensor:
    """``mean(sqrt((pred - target)^2 + c^2) - c)`` over every element (LCM's Huber loss, c = 0.001)."""
    d = pred.float() - target.float()
    return (torch.sqrt(d * d + c * c) - c).mean()


def skip_pairs(sigmas: torch.Tensor, n: int, skip: int, generator: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random ``(sigma_hi, sigma_lo)`` pairs ``skip`` steps apart on a decreasing schedule (lo may be 0)."""
    if not 1 <= skip < len(sigmas):
        raise ValueError(f"skip must lie in [1, {len(sigmas) - 1}] for a {len(sigmas) - 1}-step schedule; got {skip}.")
    i = torch.randint(len(sigmas) - skip, (n,), generator=generator)
    return sigmas[i], sigmas[i + skip]
