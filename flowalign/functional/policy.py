"""Policy-gradient losses over per-step Gaussian transitions (Flow-GRPO)."""

from __future__ import annotations

import torch


def ppo_clip_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                  clip_range: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate, ``mean(max(-A r, -A clip(r, 1 - e, 1 + e)))`` with ``r = exp(logp - logp_old)``.

    Flow-GRPO (Liu et al. 2025) applies it per denoising step, with the prompt-group advantage broadcast over
    steps and a tiny ``clip_range`` (1e-4 for SD3.5; 1e-3 for Wan). Returns the loss and diagnostics: the ratio's
    largest deviation from 1 (exactly 0 on-policy), the clipped fraction and the approximate KL
    ``0.5 mean((logp - logp_old)^2)``.
    """
    diff = log_prob - old_log_prob
    ratio = torch.exp(diff)
    adv = advantages.reshape(advantages.shape + (1,) * (ratio.ndim - advantages.ndim))
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        info = {"ratio_dev": (ratio - 1).abs().max(), "clip_frac": ((ratio - 1).abs() > clip_range).float().mean(),
                "approx_kl": 0.5 * (diff ** 2).mean()}
    return loss, info


def gaussian_mean_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL between two Gaussian steps that share ``std``: ``||mu - mu_ref||^2 / (2 std^2)``, averaged over the
    non-batch dims as the log-probs are (Flow-GRPO's KL to the reference policy). Returns ``(B,)``; 0 where
    ``std == 0`` (deterministic steps)."""
    var = std.float() ** 2
    kl = torch.where(var > 0, (mean.float() - ref_mean.float()) ** 2 / (2 * var.clamp_min(1e-20)),
                     torch.zeros_like(var))
    return kl.flatten(1).mean(1)
