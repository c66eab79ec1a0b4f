"""D3PO (Yang et al. 2024, "Using Human Feedback to Fine-tune Diffusion Models without Any Reward Model").

D3PO treats each denoising step as an action and applies DPO per step to two trajectories of one prompt that
start from the same noise: with the preferred (w) and the dispreferred (l) trajectory's step log-probs under the
policy and under the frozen reference,

    rho = clamp(pi_theta(x_{t-1} | x_t) / pi_ref(x_{t-1} | x_t), 1 - eps, 1 + eps)
    L   = -log sigmoid(beta * (log rho_w - log rho_l))

(yk7333/d3po, ``scripts/train_with_rm.py``: beta 0.1, eps 0.1). The clamp is a trust region: once a step's ratio
leaves ``[1 - eps, 1 + eps]`` it stops pulling (the ratio's gradient is zero there). Its issue #4 reports
aesthetic training collapsing with eps 0.2 and fixed by 0.1.

Preferences come from humans or from reward vectors compared by Pareto dominance (D3PO's ``compare``): one
sample is preferred when it is at least as good in every reward and better in one; otherwise the pair is a tie
and is skipped.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def clamped_log_ratio(log_prob: torch.Tensor, ref_log_prob: torch.Tensor, eps: float) -> torch.Tensor:
    """``log(clamp(exp(logp - logp_ref), 1 - eps, 1 + eps))``, computed without the exp (no overflow): clamping
    the log-ratio to ``[log(1 - eps), log(1 + eps)]`` gives the same value and the same (zero outside) gradient."""
    if not 0 < eps < 1:
        raise ValueError(f"eps must lie in (0, 1), got {eps}.")
    diff = log_prob.float() - ref_log_prob.float()
    return diff.clamp(math.log1p(-eps), math.log1p(eps))


def d3po_loss(log_prob_w: torch.Tensor, log_prob_l: torch.Tensor, ref_log_prob_w: torch.Tensor,
              ref_log_prob_l: torch.Tensor, beta: float, eps: float, weight: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """D3PO's per-step DPO loss over ``(P,)`` pairs of step log-probs (see the module doc).

    ``weight`` (``(P,)``, e.g. 0 for padding pairs) makes the loss a weighted mean. Returns the loss and
    diagnostics: ``accuracy`` (fraction of pairs whose unclamped implicit reward ``log pi/pi_ref`` already prefers
    w: the clamp would count pairs with both ratios clamped as ties), ``margin`` (mean clamped
    ``log rho_w - log rho_l``, what the loss sees), ``clip_frac`` (fraction of ratios outside the clamp) and
    ``ratio_dev`` (largest ``|pi / pi_ref - 1|``; 0 before the first update).
    """
    lw = clamped_log_ratio(log_prob_w, ref_log_prob_w, eps)
    ll = clamped_log_ratio(log_prob_l, ref_log_prob_l, eps)
    margin = lw - ll
    per_pair = -F.logsigmoid(beta * margin)
    if weight is None:
        weight = torch.ones_like(per_pair)
    weight = weight.to(per_pair)
    total = weight.sum().clamp_min(1e-12)
    loss = (weight * per_pair).sum() / total
    with torch.no_grad():
        raw = torch.stack([log_prob_w.float() - ref_log_prob_w.float(), log_prob_l.float() - ref_log_prob_l.float()])
        clipped = ((raw < math.log1p(-eps)) | (raw > math.log1p(eps))).float()
        info = {"accuracy": (weight * (raw[0] > raw[1]).float()).sum() / total,
                "margin": (weight * margin).sum() / total,
                "clip_frac": (weight * clipped.mean(0)).sum() / total,
                "ratio_dev": (raw.exp() - 1).abs().max() if raw.numel() else raw.new_zeros(())}
    return loss, info


def pareto_compare(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Which of two reward vectors is preferred, row by row: ``+1`` a, ``-1`` b, ``0`` neither (equal, or each
    better in some reward). ``a``, ``b``: ``(P,)`` (one reward) or ``(P, R)``."""
    a, b = a.float(), b.float()
    if a.ndim == 1:
        a, b = a[:, None], b[:, None]
    a_wins = (a >= b).all(1) & (a > b).any(1)
    b_wins = (b >= a).all(1) & (b > a).any(1)
    return a_wins.long() - b_wins.long()


def preference_pairs(rewards: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every preferred pair within each group: ``(winners, losers)`` sample indices.

    ``rewards`` is ``(B,)`` or ``(B, R)`` (several rewards: Pareto dominance, :func:`pareto_compare`); ``groups``
    ``(B,)`` holds each sample's prompt id. All ``C(k, 2)`` pairs of a group of ``k`` are compared (D3PO's human
    variant compares all pairs of its 7 images); ties and non-dominated pairs are skipped. Pairs come in a fixed
    order (group by first appearance, then ``i < j``).
    """
    groups = groups.flatten()
    if rewards.shape[0] != groups.numel():
        raise ValueError(f"rewards has {rewards.shape[0]} rows but groups has {groups.numel()} entries.")
    firsts, seen = [], set()
    for g in groups.tolist():
        if g not in seen:
            seen.add(g)
            firsts.append(g)
    ii, jj = [], []
    for g in firsts:
        members = (groups == g).nonzero().flatten()
        if len(members) < 2:
            continue
        i, j = torch.triu_indices(len(members), len(members), offset=1)
        ii.append(members[i])
        jj.append(members[j])
    if not ii:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty
    i, j = torch.cat(ii), torch.cat(jj)
    h = pareto_compare(rewards[i], rewards[j])
    keep = h != 0
    i, j, h = i[keep], j[keep], h[keep]
    return torch.where(h > 0, i, j), torch.where(h > 0, j, i)
