"""Rectified-flow interpolation and conversions.

Convention (SD3, FLUX, Wan): ``x_sigma = (1 - sigma) * x0 + sigma * eps`` with sigma running from
1 (pure noise) to 0 (clean data); the network predicts the velocity ``v = eps - x0``.
"""

from __future__ import annotations

import torch


def _bcast(sigma: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar or per-sample (B,) sigma against ``like`` (B, ...)."""
    s = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    if s.ndim == 1 and like.ndim > 1:
        s = s.view(-1, *([1] * (like.ndim - 1)))
    return s


def interpolate(x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """Forward process: ``x_sigma = (1 - sigma) x0 + sigma eps``."""
    s = _bcast(sigma, x0)
    return (1 - s) * x0 + s * eps


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Flow-matching regression target ``u = eps - x0``."""
    return eps - x0


def x0_from_velocity(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """Clean-sample estimate ``x0_hat = x - sigma v``."""
    return x - _bcast(sigma, x) * v


def eps_from_velocity(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """Noise estimate ``eps_hat = x + (1 - sigma) v``."""
    return x + (1 - _bcast(sigma, x)) * v


def velocity_from_x0(x: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """Inverse of :func:`x0_from_velocity` (sigma > 0)."""
    return (x - x0) / _bcast(sigma, x)


def score_from_velocity(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """Score of the marginal, ``grad log p_sigma(x) = -eps_hat / sigma = -(x - (1 - sigma) x0_hat) / sigma^2``."""
    s = _bcast(sigma, x)
    return -(x - (1 - s) * x0_from_velocity(x, v, s)) / s**2


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3 time shift ``shift * s / (1 + (shift - 1) s)`` (Esser et al. 2024, eq. 23)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)
