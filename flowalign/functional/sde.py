"""Step rules for flow ODE/SDE samplers, with exact per-step Gaussian log-probabilities.

Every rule maps ``(x, v, sigma, sigma_next, eta)`` to the Gaussian transition
``x_next ~ N(mean, std^2)``. :func:`step` draws (or scores) ``x_next`` from it, so sampling and
training go through the same function and an on-policy ratio is exactly 1. Everything is fp32.

Conventions: sigma runs from 1 (noise) to 0 (clean), ``dt = sigma_next - sigma < 0``, and ``v`` is the
predicted velocity ``eps - x0``. ``sigma`` may be a float, a 0-d tensor or a per-sample (B,) tensor.
Log-probs are per-dimension Gaussian log-densities averaged over the non-batch dimensions (the
Flow-GRPO convention, which keeps ratios comparable across resolutions); ``reduction="sum"`` gives the
full log-density. A deterministic transition (std == 0) has log-prob 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from flowalign.functional.flow import _bcast, score_from_velocity, x0_from_velocity


class StepOutput(NamedTuple):
    x_next: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    log_prob: torch.Tensor


MeanStd = tuple[torch.Tensor, torch.Tensor]


def ode_mean_std(x, v, sigma, sigma_next, eta: float = 0.0, sigma_max=None) -> MeanStd:
    """Euler step of the probability-flow ODE, identical to diffusers' FlowMatchEulerDiscreteScheduler."""
    s, sn = _bcast(sigma, x), _bcast(sigma_next, x)
    return x + (sn - s) * v, torch.zeros_like(s)


def flow_sde_mean_std(x, v, sigma, sigma_next, eta: float = 0.7, sigma_max=None) -> MeanStd:
    """Flow-GRPO's reverse SDE (Liu et al. 2025, eq. 9) discretised with Euler-Maruyama.

    ``std_t = eta * sqrt(sigma / (1 - sigma))``; at sigma == 1 the denominator uses ``sigma_max``
    (the second sigma of the schedule), as Flow-GRPO does.
    """
    s, sn = _bcast(sigma, x), _bcast(sigma_next, x)
    dt = sn - s
    denom_sigma = s
    if sigma_max is not None:
        denom_sigma = torch.where(s >= 1, torch.as_tensor(float(sigma_max), dtype=s.dtype, device=s.device), s)
    elif bool((s >= 1).any()):
        raise ValueError("flow-sde at sigma == 1 needs sigma_max (the schedule's second sigma) to avoid 1/0.")
    std_t = eta * torch.sqrt(s / (1 - denom_sigma))
    mean = x * (1 + std_t**2 / (2 * s) * dt) + v * (1 + std_t**2 * (1 - s) / (2 * s)) * dt
    return mean, std_t * torch.sqrt(-dt)


def dance_sde_mean_std(x, v, sigma, sigma_next, eta: float = 0.3, sigma_max=None) -> MeanStd:
    """DanceGRPO's SDE (Xue et al. 2025): ``mean = x + dt v - eta^2/2 * score * dt``, ``std = eta sqrt(-dt)``."""
    s, sn = _bcast(sigma, x), _bcast(sigma_next, x)
    dt = sn - s
    mean = x + dt * v - 0.5 * eta**2 * score_from_velocity(x, v, s) * dt
    return mean, eta * torch.sqrt(-dt)


def cps_mean_std(x, v, sigma, sigma_next, eta: float = 0.8, sigma_max=None) -> MeanStd:
    """Coefficients-preserving sampling (Wang & Yu 2025): the noise level of x_next is exactly sigma_next.

    ``std = sigma_next sin(eta pi / 2)``; ``mean = (1 - sigma_next) x0_hat + sqrt(sigma_next^2 - std^2) eps_hat``.
    The injected noise does not shrink with the step size, so unlike the SDEs above it is not a
    discretisation of a marginal-preserving SDE: it is an exploration sampler for few-step RL rollouts.
    """
    s, sn = _bcast(sigma, x), _bcast(sigma_next, x)
    std = sn * math.sin(eta * math.pi / 2)
    x0 = x0_from_velocity(x, v, s)
    eps = x + (1 - s) * v
    mean = (1 - sn) * x0 + torch.sqrt((sn**2 - std**2).clamp_min(0)) * eps
    return mean, std


RULES: dict[str, Callable[..., MeanStd]] = {
    "ode": ode_mean_std,
    "flow-sde": flow_sde_mean_std,
    "dance-sde": dance_sde_mean_std,
    "cps": cps_mean_std,
}

DEFAULT_ETA = {"ode": 0.0, "flow-sde": 0.7, "dance-sde": 0.3, "cps": 0.8}


def get_rule(name: str) -> Callable[..., MeanStd]:
    """Look up a step rule by name, with an error that lists the valid ones."""
    if name not in RULES:
        raise ValueError(f"Unknown sampler {name!r}; choose one of {sorted(RULES)}.")
    return RULES[name]


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Per-sample log N(x; mean, std^2 I), reduced over non-batch dims; 0 where std == 0."""
    std = torch.broadcast_to(std, x.shape)
    safe = torch.where(std > 0, std, torch.ones_like(std))
    lp = -((x - mean) ** 2) / (2 * safe**2) - torch.log(safe) - 0.5 * math.log(2 * math.pi)
    lp = torch.where(std > 0, lp, torch.zeros_like(lp))
    dims = tuple(range(1, x.ndim))
    if reduction == "mean":
        return lp.mean(dim=dims)
    if reduction == "sum":
        return lp.sum(dim=dims)
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def step(
    rule: str,
    x: torch.Tensor,
    v: torch.Tensor,
    sigma,
    sigma_next,
    eta: float | None = None,
    noise: torch.Tensor | None = None,
    x_next: torch.Tensor | None = None,
    mean_shift: torch.Tensor | None = None,
    log_prob_under_shifted_mean: bool = True,
    sigma_max=None,
    reduction: str = "mean",
) -> StepOutput:
    """One transition of ``rule``, in fp32.

    Args:
        rule: ``"ode" | "flow-sde" | "dance-sde" | "cps"``.
        noise: standard normal noise used to draw ``x_next`` (ignored when ``x_next`` is given).
        x_next: an already recorded next state, to score instead of sampling (training).
        mean_shift: an additive correction to the mean (reward guidance in the drift, Euphonium).
        log_prob_under_shifted_mean: score ``x_next`` under the shifted mean (True) or under the
            plain policy mean (False, Euphonium's default for rollouts).
    """
    rule_fn = get_rule(rule)
    eta = DEFAULT_ETA[rule] if eta is None else float(eta)
    if eta < 0:
        raise ValueError(f"eta must be >= 0 (0 gives the ODE), got {eta}.")
    x32, v32 = x.float(), v.float()
    mean, std = rule_fn(x32, v32, sigma, sigma_next, eta=eta, sigma_max=sigma_max)
    shifted = mean if mean_shift is None else mean + mean_shift.float()
    if x_next is None:
        x_next = shifted if noise is None else shifted + std * noise.float()
    x_next = x_next.float()
    lp_mean = shifted if log_prob_under_shifted_mean else mean
    return StepOutput(x_next, shifted, std, gaussian_log_prob(x_next.detach(), lp_mean, std, reduction))
