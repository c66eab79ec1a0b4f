"""Distribution matching distillation (DMD, DMD2) for flow models, and its reward-weighted form (Re-DMD).

A few-step student ``G`` maps noise to clean samples ``x``. DMD moves them along the difference of two scores
at a random noise level: the frozen teacher with CFG (the "real" score) and a critic trained by flow matching on
the student's own samples (the "fake" score). In x0 form, with ``x_sigma = (1 - sigma) x + sigma eps``:

    g = (x0_fake(x_sigma) - x0_real(x_sigma)) / mean|x - x0_real(x_sigma)|
    L_DM = 0.5 * ||x - sg(x - g)||^2          (so dL/dx = g)

The normaliser is DMD2's per-sample mean absolute error of the real prediction. Re-DMD (Reward Forcing)
weights each sample's loss by ``exp(beta * r_hat)``, ``r_hat`` the batch-standardised reward (or the raw reward).

The adversarial terms (DMD2's diffusion-GAN; Flash-DMD's low-noise GAN) are the non-saturating losses, and
Flash-DMD's joint RL is a step-level DPO on pairs of next states drawn from the same state.
"""

from __future__ import annotations

import torch

CFG_CONVENTIONS = ("uncond", "cond")


def cfg_combine(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float, convention: str = "uncond"
                ) -> torch.Tensor:
    """Classifier-free guidance in either published convention: ``"uncond"`` is ``u + s (c - u)`` (DMD2,
    diffusers), ``"cond"`` is ``c + s (c - u)`` (Self-Forcing / Reward Forcing; equal to the first with s + 1)."""
    if convention == "uncond":
        return v_uncond + scale * (v_cond - v_uncond)
    if convention == "cond":
        return v_cond + scale * (v_cond - v_uncond)
    raise ValueError(f"Unknown CFG convention {convention!r}; choose from {CFG_CONVENTIONS}.")


def dm_gradient(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """DMD2's normalised distribution-matching direction ``(x0_fake - x0_real) / mean|x - x0_real|`` per sample
    (fp32, no gradient; non-finite entries become 0)."""
    x, real, fake = x.detach().float(), x0_real.detach().float(), x0_fake.detach().float()
    norm = (x - real).abs().flatten(1).mean(1).clamp_min(eps).view(-1, *([1] * (x.ndim - 1)))
    return torch.nan_to_num((fake - real) / norm)


def dm_loss(x: torch.Tensor, grad: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """``0.5 * ||x - sg(x - grad)||^2`` averaged over elements (its gradient in ``x`` is ``grad / numel``), each
    sample optionally weighted (Re-DMD); the weights are constants."""
    per = 0.5 * (x.float() - (x.detach().float() - grad)).pow(2).flatten(1).mean(1)
    if weights is not None:
        per = per * weights.detach().to(per)
    return per.mean()


def reward_weights(rewards: torch.Tensor, beta: float, standardize: bool = True) -> torch.Tensor:
    """Re-DMD's sample weights ``exp(beta * r_hat)``: ``r_hat`` standardised over the batch (default), or the
    raw reward as in Reward Forcing (which rescales the effective learning rate)."""
    r = rewards.detach().float()
    if standardize:
        r = (r - r.mean()) / r.std(unbiased=False).clamp_min(1e-6) if r.numel() > 1 else torch.zeros_like(r)
    return torch.exp(beta * r)


def shifted_uniform_sigmas(n: int, shift: float, generator: torch.Generator, low: float = 0.02,
                           high: float = 0.98) -> torch.Tensor:
    """Noise levels for the DM loss and the critic: ``tau ~ U[0, 1]`` mapped by the time shift
    ``shift tau / (1 + (shift - 1) tau)`` and clamped to ``[low, high]`` (Reward Forcing: shift 5, [0.02, 0.98])."""
    tau = torch.rand(n, generator=generator)
    return (shift * tau / (1 + (shift - 1) * tau)).clamp(low, high)


def gan_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss ``softplus(-D(fake))`` (DMD2's ``gen_cls_loss``, Flash-DMD's low-noise
    adversarial term), averaged over the batch."""
    return torch.nn.functional.softplus(-logits_fake.float()).mean()


def gan_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator loss ``softplus(D(fake)) + softplus(-D(real))`` (DMD2), each averaged over its batch."""
    softplus = torch.nn.functional.softplus
    return softplus(logits_fake.float()).mean() + softplus(-logits_real.float()).mean()


def step_dpo_loss(lp_win: torch.Tensor, lp_lose: torch.Tensor, ref_win: torch.Tensor, ref_lose: torch.Tensor,
                  beta: float) -> torch.Tensor:
    """Step-level DPO (Flash-DMD's joint RL, of the LPO kind): for a preferred and a rejected next state drawn
    from the same state, ``-log sigmoid(beta * [(log p(w) - log p_ref(w)) - (log p(l) - log p_ref(l))])``,
    averaged over the batch; the reference log-probs are constants."""
    margin = (lp_win.float() - ref_win.detach().float()) - (lp_lose.float() - ref_lose.detach().float())
    return -torch.nn.functional.logsigmoid(beta * margin).mean()
