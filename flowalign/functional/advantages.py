"""Group-relative advantages (GRPO) and their [0, 1] reward form (DiffusionNFT / CRD)."""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, groups: torch.Tensor, global_std: bool = False, eps: float = 1e-4,
                     clip: float | None = 5.0) -> torch.Tensor:
    """Per-prompt standardised rewards, ``A = (r - mean_group) / (std + eps)``.

    Flow-GRPO (Liu et al. 2025, ``PerPromptStatTracker``): the mean is always the prompt group's; the std is the
    group's or, with ``global_std``, the whole batch's (stabler for small groups). Samples alone in their group
    get 0. ``clip`` bounds the result to ``[-clip, clip]`` (Flow-GRPO clips at 5).

    Args:
        rewards: ``(N,)`` scores.
        groups: ``(N,)`` integer group ids (the prompt a sample belongs to); groups need not be contiguous.
    """
    r = rewards.double()
    _, inv = torch.unique(groups, return_inverse=True)
    k = int(inv.max()) + 1 if inv.numel() else 0
    count = torch.zeros(k, dtype=r.dtype).index_add_(0, inv, torch.ones_like(r))
    mean = torch.zeros(k, dtype=r.dtype).index_add_(0, inv, r) / count
    centered = r - mean[inv]
    if global_std:
        std = r.std(unbiased=False).expand_as(r)
    else:
        var = torch.zeros(k, dtype=r.dtype).index_add_(0, inv, centered ** 2) / count
        std = var.sqrt()[inv]
    adv = centered / (std + eps)
    adv = torch.where(count[inv] > 1, adv, torch.zeros_like(adv))
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    return adv.to(rewards.dtype if rewards.is_floating_point() else torch.float32)


def advantage_to_unit(adv: torch.Tensor, clip: float = 5.0) -> torch.Tensor:
    """Map advantages to ``[0, 1]``: ``clip(A, +-clip) / (2 clip) + 0.5`` (DiffusionNFT's ``r``, reused by CRD)."""
    return adv.clamp(-clip, clip) / (2 * clip) + 0.5
