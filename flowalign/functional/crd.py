"""Centered Reward Distillation (CRD): implicit reward from velocity errors, centred within prompt groups.

CRD trains on clean samples through the forward process, ``x_t = (1 - sigma) x0 + sigma eps`` with target
``u = eps - x0``. The model's implicit reward of a sample is how much better it predicts ``u`` than a slowly
moving old snapshot does, each error divided by its own (no-grad) mean absolute error, DiffusionNFT's adaptive
weight:

    r_theta = -( ||v_theta - u||^2 / w_theta - ||v_old - u||^2 / w_old ),   w = mean|v - u|

CRD regresses the centred implicit reward onto the centred external reward: centring within each prompt group
cancels the intractable per-prompt normaliser of the reward-tilted target ``p* ∝ p_ref exp(R / beta)``.
"""

from __future__ import annotations

import torch


def adaptive_error(v: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``||v - u||^2 / w`` per sample with ``w = mean|v - u|`` held constant (no gradient); ``(B,)``."""
    err = (v.float() - target.float()).flatten(1)
    w = err.abs().mean(1).detach().clamp_min(1e-6)
    return (err ** 2).mean(1) / w


def implicit_reward(v: torch.Tensor, v_old: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CRD's implicit reward ``r_theta`` per sample (higher when the model beats the old snapshot); ``(B,)``."""
    return -(adaptive_error(v, target) - adaptive_error(v_old, target).detach())


def group_center(x: torch.Tensor, groups: torch.Tensor, weights: torch.Tensor | None = None,
                 detach_mean: bool = False) -> torch.Tensor:
    """``x - sum_g p x`` within each group (uniform ``p`` unless ``weights`` are given, normalised per group)."""
    _, inv = torch.unique(groups, return_inverse=True)
    k = int(inv.max()) + 1
    p = torch.ones_like(x) if weights is None else weights.to(x.dtype)
    norm = torch.zeros(k, dtype=x.dtype, device=x.device).index_add(0, inv, p)
    mean = torch.zeros(k, dtype=x.dtype, device=x.device).index_add(0, inv, p * x) / norm
    mean = mean[inv]
    return x - (mean.detach() if detach_mean else mean)


def crd_loss(r_theta: torch.Tensor, reward01: torch.Tensor, groups: torch.Tensor, beta: float) -> torch.Tensor:
    """``mean((beta * center(r_theta) - center(R))^2) * 5 / beta``: the centred implicit reward matches the
    centred external reward ``R`` in [0, 1]. The mean of ``r_theta`` is a stop-gradient baseline."""
    rc = group_center(r_theta, groups, detach_mean=True)
    target = group_center(reward01.to(rc.dtype), groups)
    return ((beta * rc - target) ** 2).mean() * 5.0 / beta


def adaptive_kl_weight(reward01: torch.Tensor, min_coef: float) -> torch.Tensor:
    """CRD's reward-adaptive KL strength per sample, ``min_coef + R (1 - min_coef)``."""
    return min_coef + reward01 * (1 - min_coef)
