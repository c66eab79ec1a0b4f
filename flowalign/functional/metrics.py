"""Distances between sets of feature vectors."""

from __future__ import annotations

import torch


def _sqrtm_psd(c: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(c)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to the rows of ``a`` (N, D) and ``b`` (M, D), as FID computes
    it on Inception features: ``|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2)`` (float64)."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"frechet_distance needs two (N, D) feature sets of equal D; got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}.")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("frechet_distance needs at least 2 samples per set.")
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    c_a, c_b = torch.cov(a.T), torch.cov(b.T)
    s = _sqrtm_psd(c_a)
    cross = _sqrtm_psd(s @ c_b @ s)
    return float((mu_a - mu_b).pow(2).sum() + torch.trace(c_a) + torch.trace(c_b) - 2 * torch.trace(cross))
