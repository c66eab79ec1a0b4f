"""Forward-process preference and reward-weighted losses for flow models: Flow-DPO and Flow-RWR.

Both train on clean latents ``x0`` through the rectified-flow interpolation ``x_t = (1 - sigma) x0 + sigma eps``
and the flow-matching error ``||v(x_t, sigma) - (eps - x0)||^2`` (:mod:`flowalign.functional.flow`), i.e. the
per-sample ELBO surrogate of ``-log p(x0)`` that Diffusion-DPO uses in place of the intractable likelihood.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

PAIRINGS = ("best-worst", "all")
RWR_WEIGHTINGS = ("softmax", "exp")
SIGMA_SAMPLINGS = ("logit-normal", "uniform")


def flow_matching_error(v: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample flow-matching error ``mean((v - u)^2)`` over the non-batch dims, in fp32; ``(B,)``.

    The mean (not the sum) over dims is what Diffusion-DPO (``(pred - target).pow(2).mean([1, 2, 3])``) and
    flow_grpo's Flow-DPO script use, so their published ``beta`` values carry over at any resolution.
    """
    return (v.float() - target.float()).flatten(1).pow(2).mean(1)


def flow_dpo_loss(err_w: torch.Tensor, err_l: torch.Tensor, ref_err_w: torch.Tensor, ref_err_l: torch.Tensor,
                  beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Diffusion-DPO's loss in flow-matching form (Flow-DPO), averaged over pairs.

    Diffusion-DPO (Wallace et al. 2024, eq. 14) replaces DPO's log-likelihood ratios with denoising errors at a
    noise level and noise shared by the pair::

        L = -log sigmoid(-beta/2 * [(err_w - ref_err_w) - (err_l - ref_err_l)])

    where ``err`` is the policy's and ``ref_err`` the frozen reference's per-sample error on the chosen (w) and
    rejected (l) sample. The ``-1/2`` is Diffusion-DPO's ``scale_term = -0.5 * beta_dpo`` (the Gaussian
    log-likelihood is ``-err / 2`` up to constants): the loss falls when the policy denoises the chosen sample
    better, and the rejected one worse, than the reference does. Flow-DPO (Liu et al. 2025, "Improving Video
    Generation with Human Feedback"; flow_grpo's ``train_sd3_dpo.py``) keeps the formula with the velocity error
    and a constant ``beta`` (100 on SD3.5 there; 5000 in Diffusion-DPO's eps-prediction SD1.5 runs).

    Args:
        err_w, err_l, ref_err_w, ref_err_l: ``(P,)`` errors from :func:`flow_matching_error`.

    Returns:
        The mean loss and diagnostics: ``implicit_acc`` (fraction of pairs whose implicit reward ranks the chosen
        sample first; 0 at the start, when policy == reference), ``margin`` (mean of the sigmoid's argument) and
        the policy's and reference's mean errors.
    """
    inside = -0.5 * beta * ((err_w - ref_err_w) - (err_l - ref_err_l))
    loss = -F.logsigmoid(inside).mean()
    with torch.no_grad():
        info = {"implicit_acc": (inside > 0).float().mean(), "margin": inside.mean(),
                "err": 0.5 * (err_w + err_l).mean(), "ref_err": 0.5 * (ref_err_w + ref_err_l).mean()}
    return loss, info


def preference_pairs(rewards: torch.Tensor, groups: torch.Tensor, pairing: str = "best-worst",
                     margin: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Online preference pairs within prompt groups: ``(chosen, rejected)`` index tensors.

    - ``"best-worst"``: one pair per group, its highest- against its lowest-scored sample (flow_grpo's ``dpo``
      advantage mode: +1 on the max, -1 on the min); the first sample wins ties of the max, the last of the min.
    - ``"all"``: every ordered pair ``(i, j)`` of a group with ``r_i > r_j`` (D3PO's all-pairs comparison).

    Either way a pair is kept only when ``r_chosen - r_rejected > margin``: a group whose rewards tie (all
    verifier scores 0, say) gives no pair rather than a random preference.
    """
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}.")
    chosen, rejected = [], []
    for g in torch.unique(groups).tolist():
        idx = (groups == g).nonzero().flatten()
        r = rewards[idx].double()
        if pairing == "best-worst":
            hi, lo = int(torch.argmax(r)), len(r) - 1 - int(torch.argmin(r.flip(0)))
            pairs = [(hi, lo)]
        else:
            pairs = [(i, j) for i in range(len(r)) for j in range(len(r)) if i != j]
        for i, j in pairs:
            if r[i] - r[j] > margin:
                chosen.append(int(idx[i]))
                rejected.append(int(idx[j]))
    return torch.tensor(chosen, dtype=torch.long), torch.tensor(rejected, dtype=torch.long)


def rwr_weights(advantages: torch.Tensor, groups: torch.Tensor, temperature: float,
                weighting: str = "softmax") -> torch.Tensor:
    """Flow-RWR sample weights from group-standardised rewards ``A`` (:func:`~flowalign.functional.advantages.
    group_advantages`).

    Reward-weighted regression (Peters & Schaal 2007; Flow-RWR in Liu et al. 2025: "standard flow matching
    training but uses the reward as the weight for the loss", VideoAlign issue #7) fits the policy to its own
    samples weighted toward the KL-regularised optimum ``p*(x|c) ∝ p_old(x|c) exp(r(x, c) / tau)``; the importance
    weight of a sample of ``p_old`` is ``exp(r / tau) / Z(c)``.

    - ``"softmax"`` (default): ``w_i = K softmax_{j in group}(A_j / tau)_i``, the self-normalised estimate of that
      weight with ``Z(c)`` taken from the prompt's own K samples. The weights average 1 within every group, so the
      loss keeps the scale of plain flow matching whatever ``tau`` and the reward's units (a raw ``exp`` rescales
      the learning rate, as Re-DMD's weights do), and a group whose rewards tie gets weight 1 everywhere.
    - ``"exp"``: ``w = exp(A / tau)`` unnormalised (AWR, Peng et al. 2019, before its weight clipping); its mean
      grows with ``1 / tau``.

    Standardising ``r`` within the group first makes ``tau`` unit-free: ``tau = 1`` weighs a sample one group-std
    above the mean ``e`` times one at the mean.

    Args:
        advantages: ``(N,)`` group-standardised rewards.
        groups: ``(N,)`` integer prompt-group ids (need not be contiguous).
        temperature: ``tau > 0``; large ``tau`` tends to plain flow matching on the samples (SFT).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    if weighting not in RWR_WEIGHTINGS:
        raise ValueError(f"weighting must be one of {RWR_WEIGHTINGS}, got {weighting!r}.")
    z = advantages.double() / temperature
    if weighting == "exp":
        return z.exp().float()
    _, inv = torch.unique(groups, return_inverse=True)
    k = int(inv.max()) + 1 if inv.numel() else 0
    # log-sum-exp per group, shifted by the group max so that exp never overflows
    gmax = torch.full((k,), -math.inf, dtype=z.dtype).scatter_reduce(0, inv, z, "amax")
    e = (z - gmax[inv]).exp()
    total = torch.zeros(k, dtype=z.dtype).index_add_(0, inv, e)
    count = torch.zeros(k, dtype=z.dtype).index_add_(0, inv, torch.ones_like(z))
    return (count[inv] * e / total[inv]).float()


def sample_sigmas(n: int, gen: torch.Generator, sampling: str = "logit-normal", mean: float = 0.0,
                  std: float = 1.0) -> torch.Tensor:
    """Training noise levels in (0, 1): ``sigmoid(N(mean, std))`` (SD3's logit-normal, Esser et al. 2024, which
    flow_grpo's Flow-DPO script uses) or ``U(0, 1)`` (Diffusion-DPO's uniform timesteps); ``(n,)``."""
    if sampling == "logit-normal":
        return torch.sigmoid(mean + std * torch.randn(n, generator=gen))
    if sampling == "uniform":
        return torch.rand(n, generator=gen)
    raise ValueError(f"sigma sampling must be one of {SIGMA_SAMPLINGS}, got {sampling!r}.")
