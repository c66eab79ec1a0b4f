"""Euphonium's dual-reward GRPO maths (process advantages, the dual PPO objective) and guidance distillation.

Euphonium (zerzerzerz/Euphonium, "Steering Video Flow Matching via Process Reward Gradient Guided Stochastic
Dynamics") samples its GRPO rollouts with a process-reward-gradient guided SDE and trains on two kinds of
advantage (reference notes: rl_guidance.md b5, read from ``grpo_training/trainer.py``):

- **ORA**, outcome reward advantages: one group-standardised advantage ``A_r`` per pixel (outcome) reward ``r``;
- **PRA**, process reward advantages: the process reward model's score at each denoising step, group-standardised
  per step, ``A_proc[t]``.

The loss of one trained step ``t`` is ``sum_r c_ORA w_r PPO(A_r) + c_PRA PPO(A_proc[t])``: one PPO clipped
surrogate per advantage, sharing the same ratio (:func:`dual_reward_ppo_loss`).

The guidance distillation term (:func:`guidance_distillation_loss`) is flowalign's explicit form of "internalising
the guidance" (the paper's abstract; the public script has no separate loss, it only scores the guided rollouts
under the unguided mean): regress the policy's *unguided* step mean onto a *guided* step mean.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from flowalign.functional.advantages import group_advantages
from flowalign.functional.policy import gaussian_mean_kl, ppo_clip_loss

#: how a step's process advantage is read off the per-state process scores S[:, 0..T] (S[:, t] scores x_t, the
#: input of step t): "next" S[t+1] (the state the step produces), "state" S[t] (the step's input, as the public
#: script pairs them), "delta" S[t+1] - S[t] (the change across the step)
PROCESS_FORMS = ("next", "state", "delta")


def process_step_scores(state_scores: torch.Tensor, form: str = "next") -> torch.Tensor:
    """Per-step process rewards ``(N, T)`` from per-state scores ``(N, T+1)`` (states x_0 = noise .. x_T = clean).

    ``"next"``: ``S[:, t+1]``; ``"state"``: ``S[:, t]``; ``"delta"``: ``S[:, t+1] - S[:, t]``.
    """
    if form not in PROCESS_FORMS:
        raise ValueError(f"Unknown process advantage form {form!r}; choose one of {list(PROCESS_FORMS)}.")
    if state_scores.ndim != 2 or state_scores.shape[1] < 2:
        raise ValueError(f"state_scores must be (N, T+1) with T >= 1, got shape {tuple(state_scores.shape)}.")
    if form == "next":
        return state_scores[:, 1:]
    if form == "state":
        return state_scores[:, :-1]
    return state_scores[:, 1:] - state_scores[:, :-1]


def process_advantages(state_scores: torch.Tensor, groups: torch.Tensor, form: str = "next",
                       global_std: bool = False, clip: float | None = 5.0, eps: float = 1e-4) -> torch.Tensor:
    """Euphonium's PRA: each step's process reward standardised within its prompt group, step by step; ``(N, T)``.

    ``A_proc[i, t] = (p[i, t] - mean_{j in g(i)} p[j, t]) / (std_{j in g(i)} p[j, t] + eps)`` with
    ``p = process_step_scores(state_scores, form)``, the same per-group statistics (and clipping) as the outcome
    advantages (:func:`~flowalign.functional.advantages.group_advantages`). A step whose scores are equal within a
    group (e.g. a step the process reward did not score, filled with a constant) gets advantage 0.
    """
    p = process_step_scores(state_scores.float(), form)
    cols = [group_advantages(p[:, t], groups, global_std=global_std, eps=eps, clip=clip) for t in range(p.shape[1])]
    return torch.stack(cols, dim=1)


def dual_reward_ppo_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor,
                         outcome_advantages: Mapping[str, torch.Tensor], outcome_weights: Mapping[str, float],
                         clip_range: float, process_advantage: torch.Tensor | None = None,
                         outcome_coef: float = 1.0, process_coef: float = 1.0
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Euphonium's dual-reward surrogate for one step: ``sum_r c_ORA w_r PPO(A_r) + c_PRA PPO(A_proc)``.

    Each ``PPO(A)`` is :func:`~flowalign.functional.policy.ppo_clip_loss` (Flow-GRPO's clipped surrogate, averaged
    over the batch) with the same log-prob ratio; terms with a zero coefficient are skipped. Returns the loss and
    ``{"ora/<name>": PPO(A_r), "pra": PPO(A_proc), "ratio_dev", "clip_frac"}`` (detached diagnostics).
    """
    total = None
    info: dict[str, torch.Tensor] = {}
    terms = [(f"ora/{n}", outcome_coef * outcome_weights[n], a) for n, a in outcome_advantages.items()]
    if process_advantage is not None:
        terms.append(("pra", process_coef, process_advantage))
    for name, coef, adv in terms:
        if coef == 0:
            continue
        loss, stats = ppo_clip_loss(log_prob, old_log_prob, adv, clip_range)
        term = loss if coef == 1 else coef * loss
        total = term if total is None else total + term
        info[name] = loss.detach()
        info.setdefault("ratio_dev", stats["ratio_dev"])
        info.setdefault("clip_frac", stats["clip_frac"])
    if total is None:
        total = (log_prob * 0).sum()  # every coefficient is 0: a zero loss that still backpropagates
        with torch.no_grad():
            ratio = torch.exp(log_prob - old_log_prob)
            info.update(ratio_dev=(ratio - 1).abs().max(), clip_frac=((ratio - 1).abs() > clip_range).float().mean())
    return total, info


def guidance_distillation_loss(policy_mean: torch.Tensor, guided_mean: torch.Tensor, std: torch.Tensor
                               ) -> torch.Tensor:
    """Internalise the guidance: ``||mu_theta(x_t) - sg(mu_guided)||^2 / (2 std^2)``, averaged over dims; ``(B,)``.

    ``policy_mean`` is the policy's *unguided* step mean, ``guided_mean`` a guided step mean held fixed: a model's
    mean at the same state plus the reward-gradient shift ``c * grad r`` (the reference model's: the guided base, a
    fixed target; or the rollout policy's: the move the rollout made). This is the KL between the guided and the
    policy's step Gaussians (they share ``std``), i.e. the expected negative log-likelihood of guided transitions
    under the unguided policy up to a constant, without the sampling noise: Euphonium's "log-probs under the
    unguided mean", turned into a supervised target (flowalign's choice; the public script has no separate
    term). Minimised, the policy's own drift moves where the guidance moves it, so inference needs no reward
    model. 0 where ``std == 0`` (deterministic steps).
    """
    return gaussian_mean_kl(policy_mean, guided_mean.detach(), std)
