"""Reward-gradient guidance: steer a flow sampler with the gradient of one or more differentiable rewards.

Guidance wraps the model's velocity (as k-diffusion's guided samplers wrap the denoiser) instead of forking
the sampler: :func:`flowalign.sample` calls the guidance object once per step with a
:class:`~flowalign.sampling.StepContext` and applies the :class:`~flowalign.sampling.GuidanceOutput` it returns.

Two modes:

- ``"nrg"`` — **Flow-NRG**, noisy reward guidance (Liu et al. 2025, "Improving Video Generation with Human
  Feedback", VideoAlign, Sec. 4.4): ``v <- v_cfg - lambda(sigma) * grad_x sum_k w_k r_k``, applied after
  classifier-free guidance (the authors' answer in VideoAlign issue #17: CFG first, then reward guidance, no
  CFG retuning), usable with every sampler, the ODE included. The per-objective weights ``w_k`` are chosen at
  inference (:meth:`RewardGuidance.with_weights`), which is the paper's point.
- ``"euphonium"`` — **Euphonium** (process-reward-gradient guided SDE, zerzerzerz/Euphonium
  ``grpo_sampling/flux_step.py``): ``mean <- mean + c * grad_x r``, with ``c = scale`` or the KL form
  ``c = g^2 / (2 beta)`` (``g`` the sampler's diffusion coefficient at this step), optionally times
  ``dt = sigma - sigma_next`` (``delta_t_scaling``, on in the paper's script). It is meant for SDE rollouts
  (``flow-sde``, ``dance-sde``, ``cps``); with the ODE it shifts the Euler mean. Recorded log-probs are taken
  under the unguided mean by default (``log_prob_under_guided_mean=False``, the script's default), so the
  policy is scored without the guidance and RL can internalise the guided moves.

**Sign convention.** sigma runs from 1 (noise) to 0 (clean), ``dt = sigma_next - sigma < 0`` and the Euler step
is ``x_next = x + dt * v``. Subtracting ``lambda * grad r`` from ``v`` therefore moves ``x`` by
``+|dt| * lambda * grad r``: uphill on the reward. Adding ``c * grad r`` to the SDE mean moves it uphill too.
A positive ``scale`` always increases the reward.

**Where the gradient comes from.** A pixel reward (``reward.space == "pixel"``) and a toy2d point reward
(``"point"``; toy2d's ``decode`` is the identity) score the clean estimate ``x0_hat = x - sigma * v`` through the
differentiable ``model.decode``. With ``grad_through_model=False`` (default) ``v`` is held constant, so the
gradient is ``d r(decode(x0_hat)) / d x0_hat`` (cheap: no backward pass through the transformer); with
``grad_through_model=True`` ``v`` is recomputed with autograd on and the gradient flows through the transformer
too (``d x0_hat / d x = I - sigma dv/dx``; costs one extra forward and a backward per guided step, optionally
with gradient checkpointing). A latent (noise-aware, "process") reward (:class:`LatentReward`,
``space == "latent"``) scores the noisy latent itself, ``r(x_t, sigma, prompt)`` — what the VideoAlign authors
recommend ("the RM must be noise-aware") and what Euphonium's latent PRM is.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Callable, Mapping

import torch

from flowalign.functional import sde
from flowalign.functional.flow import x0_from_velocity
from flowalign.rewards.base import MultiReward, Reward, check_scores, load
from flowalign.sampling.sampler import GuidanceOutput, StepContext

MODES = ("nrg", "euphonium")
#: lambda(sigma, step) / scale: "constant" 1, "sigma" sigma, "sigma_sq" sigma^2, "linear" 1 - step / num_steps
SCHEDULES = ("constant", "sigma", "sigma_sq", "linear")


def _parse_rewards(rewards) -> tuple[dict[str, Reward], dict[str, float]]:
    if isinstance(rewards, MultiReward):
        return dict(rewards.components), dict(rewards.weights)
    if isinstance(rewards, (Reward, str)):
        rewards = {rewards: 1.0}
    if not isinstance(rewards, Mapping) or not rewards:
        raise TypeError("rewards must be a Reward, a registered name, or a non-empty {reward or name: weight} dict; "
                        f"got {rewards!r}.")
    comps: dict[str, Reward] = {}
    weights: dict[str, float] = {}
    for r, w in rewards.items():
        r = load(r)
        if r.name in comps:
            raise ValueError(f"Two rewards are named {r.name!r}; give one a distinct `.name` first.")
        w = float(w)
        if not math.isfinite(w):
            raise ValueError(f"The weight of reward {r.name!r} must be finite, got {w}.")
        comps[r.name], weights[r.name] = r, w
    for name, r in comps.items():
        if not r.differentiable:
            raise ValueError(
                f"Reward {name!r} is not differentiable, so it cannot guide sampling through its gradient. Use a "
                "differentiable reward (or a latent reward) for guidance, or search over samples by score instead "
                "(flowalign.sampling.search.best_of_n / prune_search need no gradient).")
        if r.space not in ("pixel", "point", "latent"):
            raise ValueError(f"Reward {name!r} has space {r.space!r}; guidance supports 'pixel', 'point' "
                             "(scored through x0_hat and model.decode) and 'latent' (scored on the noisy latent).")
    return comps, weights


class RewardGuidance:
    """Reward-gradient guidance for :func:`flowalign.sample` (Flow-NRG or Euphonium); see the module docstring.

    Args:
        rewards: a Reward, a registered name, a :class:`~flowalign.rewards.MultiReward`, or
            ``{reward or name: weight}``; the guided objective is ``sum_k w_k r_k``. Every reward must be
            differentiable. Weights can be changed at inference with :meth:`with_weights`.
        scale: the guidance strength lambda (``"nrg"``) or c (``"euphonium"``); 0 switches guidance off exactly.
            With ``normalize=True`` it is the step length along the per-sample unit gradient.
        mode: ``"nrg"`` (replace the velocity, Flow-NRG) or ``"euphonium"`` (shift the SDE mean).
        schedule: how the strength varies over the trajectory: ``"constant"``, ``"sigma"`` (``scale * sigma``:
            strong at high noise, off at the end), ``"sigma_sq"`` (``scale * sigma^2``), ``"linear"``
            (``scale * (1 - step / num_steps)``), or a callable ``(sigma: float, step, num_steps) -> factor``.
        normalize: divide each sample's gradient by its L2 norm (Euphonium's ``normalize``), so ``scale`` sets
            the length of the move independently of the reward's units.
        window: guide only at steps ``[start, end)`` (``end`` None = to the last step; negative indices count from
            the end), e.g. Euphonium's script guides steps 12-15 of 16.
        interval: guide every ``interval``-th step of the window (Euphonium's ``interval``).
        grad_through_model: differentiate through the transformer (``x0_hat = x - sigma v(x)`` with ``v`` live)
            instead of holding ``v`` constant. Only pixel/point rewards use ``v``.
        gradient_checkpointing: with ``grad_through_model``, turn on the transformer's gradient checkpointing
            (diffusers ``enable_gradient_checkpointing``) during the guidance pass, and restore it after.
        beta: Euphonium's KL form: ``c = scale * g^2 / (2 beta)`` with ``g^2 = std^2 / dt`` the step's diffusion
            coefficient (``eta^2`` for dance-sde, as in the paper; ``eta^2 sigma / (1 - sigma)`` for flow-sde).
            Needs a stochastic sampler (eta > 0); ``mode="euphonium"`` only. For reference, the Doob h-transform
            towards ``p_base exp(r / beta')`` adds ``g^2 grad log h_t`` with ``log h_t ~ r(x0_hat) / beta'``, so
            the paper's 1/2 reads as ``beta' = 2 beta``; reaching that p* exactly would also need tilted initial
            noise (or a memoryless noise level), so treat beta as a strength knob, not a calibrated KL weight.
        delta_t_scaling: Euphonium: multiply ``c`` by ``dt = sigma - sigma_next`` (Euler-Maruyama drift term;
            ``use_delta_t_for_gradient_scaling``, on in the paper's script).
        log_prob_under_guided_mean: score recorded transitions under the guided mean (True; the sampler then
            records the shifts so :func:`flowalign.log_prob` reproduces them) or the plain policy mean (False,
            Euphonium's default).
        record: append per-step diagnostics to :attr:`history` (a list of dicts with ``step``, ``sigma``,
            ``coef`` (the multiplier applied to the gradient), ``grad_norm`` (B,) of the raw weighted gradient, and
            ``rewards`` ``{name: (B,)}`` at ``x0_hat`` (latent rewards: at ``x_t``)), e.g. for plotting.

    Example::

        guide = fa.guidance.RewardGuidance({"shapes-clip": 1.0, brightness: 0.5}, scale=2.0, normalize=True)
        traj = fa.sample(model, prompts, num_steps=20, guidance=guide)
        traj = fa.sample(model, prompts, num_steps=20, guidance=guide.with_weights({"shapes-clip": 0.0}))
    """

    def __init__(
        self,
        rewards,
        scale: float = 1.0,
        mode: str = "nrg",
        *,
        schedule: str | Callable[[float, int, int], float] = "constant",
        normalize: bool = False,
        window: tuple[int, int | None] | None = None,
        interval: int = 1,
        grad_through_model: bool = False,
        gradient_checkpointing: bool = False,
        beta: float | None = None,
        delta_t_scaling: bool = True,
        log_prob_under_guided_mean: bool = False,
        record: bool = False,
    ):
        if mode not in MODES:
            raise ValueError(f"Unknown guidance mode {mode!r}; choose one of {list(MODES)}.")
        scale = float(scale)
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite, got {scale}.")
        if not callable(schedule) and schedule not in SCHEDULES:
            raise ValueError(f"Unknown schedule {schedule!r}; choose one of {list(SCHEDULES)} or pass a callable "
                             "(sigma, step, num_steps) -> factor.")
        if int(interval) != interval or interval < 1:
            raise ValueError(f"interval must be a positive integer, got {interval}.")
        if window is not None:
            if len(window) != 2:
                raise ValueError(f"window must be (start, end) with end None for 'to the last step'; got {window}.")
        if beta is not None:
            if mode != "euphonium":
                raise ValueError("beta (the KL form c = g^2 / (2 beta)) is Euphonium's; use mode='euphonium', or "
                                 "set the Flow-NRG strength with scale.")
            if not beta > 0:
                raise ValueError(f"beta must be > 0, got {beta}.")
        self.components, self.weights = _parse_rewards(rewards)
        self.scale = scale
        self.mode = mode
        self.schedule = schedule
        self.normalize = bool(normalize)
        self.window = None if window is None else (int(window[0]), None if window[1] is None else int(window[1]))
        self.interval = int(interval)
        self.grad_through_model = bool(grad_through_model)
        self.gradient_checkpointing = bool(gradient_checkpointing)
        self.beta = None if beta is None else float(beta)
        self.delta_t_scaling = bool(delta_t_scaling)
        self.log_prob_under_guided_mean = bool(log_prob_under_guided_mean)
        self.record = bool(record)
        self.history: list[dict] = []
        self._warned_ckpt = False

    # ------------------------------------------------------------------------------------------ configuration
    @property
    def names(self) -> list[str]:
        return list(self.components)

    def with_weights(self, weights: Mapping) -> RewardGuidance:
        """A copy with some or all per-objective weights replaced (Flow-NRG: weights chosen at inference).

        ``weights`` maps reward names (or the Reward objects) to new weights; unnamed rewards keep theirs. The
        copy shares the reward modules and starts with an empty :attr:`history`.
        """
        new = {}
        for k, w in weights.items():
            name = k.name if isinstance(k, Reward) else k
            if name not in self.weights:
                raise ValueError(f"Unknown reward {name!r} in weights; this guidance has rewards {self.names}.")
            w = float(w)
            if not math.isfinite(w):
                raise ValueError(f"The weight of reward {name!r} must be finite, got {w}.")
            new[name] = w
        out = copy.copy(self)
        out.weights = {**self.weights, **new}
        out.history = []
        return out

    def with_scale(self, scale: float) -> RewardGuidance:
        """A copy with another strength (shares the rewards; empty :attr:`history`)."""
        if not math.isfinite(float(scale)):
            raise ValueError(f"scale must be finite, got {scale}.")
        out = copy.copy(self)
        out.scale = float(scale)
        out.history = []
        return out

    def is_active(self, step: int, num_steps: int) -> bool:
        """Whether guidance acts at ``step`` of ``num_steps`` (window and interval)."""
        start, end = (0, None) if self.window is None else self.window
        start = start + num_steps if start < 0 else start
        end = num_steps if end is None else (end + num_steps if end < 0 else end)
        return start <= step < end and (step - start) % self.interval == 0

    def schedule_factor(self, sigma: float, step: int, num_steps: int) -> float:
        if callable(self.schedule):
            return float(self.schedule(sigma, step, num_steps))
        if self.schedule == "constant":
            return 1.0
        if self.schedule == "sigma":
            return sigma
        if self.schedule == "sigma_sq":
            return sigma**2
        return 1.0 - step / num_steps  # "linear"

    # ------------------------------------------------------------------------------------------ the hook
    def __call__(self, ctx: StepContext) -> GuidanceOutput | None:
        if self.scale == 0 or not self.is_active(ctx.step, ctx.num_steps):
            return None
        if all(w == 0 for w in self.weights.values()):
            return None
        sigma = float(ctx.sigma)
        coef = self.scale * self.schedule_factor(sigma, ctx.step, ctx.num_steps)
        if self.mode == "euphonium":
            if self.beta is not None:
                coef = coef * self._diffusion_sq(ctx) / (2 * self.beta)
            if self.delta_t_scaling:
                coef = coef * (sigma - float(ctx.sigma_next))
        if coef == 0:
            return None
        grad, scores = self.reward_gradient(ctx)
        norms = grad.flatten(1).norm(dim=1)
        direction = grad
        if self.normalize:
            direction = grad / norms.clamp_min(1e-12).view(-1, *([1] * (grad.ndim - 1)))
        if self.record:
            self.history.append({"step": ctx.step, "sigma": sigma, "coef": coef, "grad_norm": norms.cpu(),
                                 "rewards": {k: v.cpu() for k, v in scores.items()}})
        if self.mode == "nrg":
            return GuidanceOutput(velocity=ctx.v.float() - coef * direction)
        return GuidanceOutput(mean_shift=coef * direction)

    def _diffusion_sq(self, ctx: StepContext) -> float:
        """``g^2 = std^2 / dt`` of the sampler's step (Euphonium's eta^2 for dance-sde)."""
        if ctx.sampler == "ode" or ctx.eta == 0:
            raise ValueError("Euphonium's KL form (beta) scales the gradient by the sampler's noise g^2 / (2 beta), "
                             "which is 0 for the ODE (or eta = 0); sample with a stochastic sampler "
                             "('flow-sde', 'dance-sde', 'cps') and eta > 0, or give scale without beta.")
        s, sn = float(ctx.sigma), float(ctx.sigma_next)
        x = ctx.x[:1].float()
        _, std = sde.get_rule(ctx.sampler)(x, ctx.v[:1].float(), s, sn, eta=ctx.eta, sigma_max=sn)
        return float(std.flatten()[0]) ** 2 / (s - sn)

    # ------------------------------------------------------------------------------------------ gradients
    def reward_gradient(self, ctx: StepContext, only: str | None = None
                        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``grad_x sum_k w_k r_k`` at the step's ``x`` (fp32, detached) and each reward's (B,) scores.

        Works under ``torch.no_grad`` (the sampler's default): autograd is switched on here. ``only`` restricts
        the sum to one reward (used to name the reward behind a non-finite gradient).
        """
        model = ctx.model
        prompts = list(ctx.cond.prompts)
        active = [(n, r, self.weights[n]) for n, r in self.components.items()
                  if (only is None and self.weights[n] != 0) or n == only]
        b = ctx.x.shape[0]
        scores: dict[str, torch.Tensor] = {}
        with torch.enable_grad():
            x = ctx.x.detach().float().requires_grad_(True)
            images = None
            if any(r.space != "latent" for _, r, _ in active):
                if self.grad_through_model:
                    with self._checkpointing(model):
                        v = model.velocity(x, ctx.sigma, ctx.cond, ctx.guidance_scale)
                else:
                    v = ctx.v.detach().float()
                images = model.decode(x0_from_velocity(x, v, ctx.sigma))
                if not bool(torch.isfinite(images).all()):
                    raise ValueError(f"Reward guidance at step {ctx.step} (sigma={float(ctx.sigma):.4g}): decoding "
                                     "x0_hat = x - sigma * v gave non-finite pixels; check the model's dtype "
                                     "(fp16 VAEs overflow) and the latents.")
            total = x.new_zeros(())
            for name, r, w in active:
                s = r(x, prompts, sigma=ctx.sigma) if r.space == "latent" else r(images, prompts)
                s = check_scores(s, b, name)
                if not s.requires_grad:
                    raise ValueError(f"Reward {name!r} returned scores that do not depend differentiably on its "
                                     "input (no autograd graph); it cannot guide sampling. Make its score "
                                     "differentiable (no .detach(), no torch.no_grad, no rounding) or use search.")
                scores[name] = s.detach()
                total = total + (w if only is None else 1.0) * s.float().sum()
            (grad,) = torch.autograd.grad(total, x, allow_unused=True)
        if grad is None:
            grad = torch.zeros_like(x)
        grad = grad.detach()
        if not bool(torch.isfinite(grad).all()):
            self._raise_non_finite(ctx, grad, [n for n, _, _ in active] if only is None else [only])
        return grad, scores

    def _raise_non_finite(self, ctx: StepContext, grad: torch.Tensor, names: list[str]):
        bad_rows = (~torch.isfinite(grad.flatten(1))).any(1).nonzero().flatten().tolist()
        culprits = list(names)
        if len(names) > 1:  # failure path only: recompute each reward's gradient alone to name the culprit
            culprits = []
            for n in names:
                try:
                    self.reward_gradient(ctx, only=n)
                except ValueError:
                    culprits.append(n)
        who = (f"reward {culprits[0]!r}" if len(culprits) == 1 else
               f"rewards {culprits}" if culprits else f"the weighted sum of rewards {names}")
        raise ValueError(f"Reward guidance at step {ctx.step} (sigma={float(ctx.sigma):.4g}): the gradient of {who} "
                         f"wrt the latents is not finite (NaN/inf) for batch indices {bad_rows}. Check the reward's "
                         "differentiability at these inputs (sqrt/log at 0, division by a norm), or run the reward "
                         "and decoder in fp32.")

    @contextlib.contextmanager
    def _checkpointing(self, model):
        net = model.transformer
        if not self.gradient_checkpointing:
            yield
            return
        supported = hasattr(net, "enable_gradient_checkpointing") and getattr(
            net, "_supports_gradient_checkpointing", True)
        if not supported:
            if not self._warned_ckpt:
                warnings.warn(f"{type(net).__name__} does not support gradient checkpointing; guiding without it.",
                              stacklevel=3)
                self._warned_ckpt = True
            yield
            return
        was_on = bool(getattr(net, "is_gradient_checkpointing", False))
        if not was_on:
            net.enable_gradient_checkpointing()
        try:
            yield
        finally:
            if not was_on:
                net.disable_gradient_checkpointing()

    def __repr__(self) -> str:
        w = ", ".join(f"{n!r}: {self.weights[n]:g}" for n in self.components)
        extra = f", beta={self.beta:g}" if self.beta is not None else ""
        return (f"RewardGuidance({{{w}}}, scale={self.scale:g}, mode={self.mode!r}, schedule={self.schedule!r}, "
                f"normalize={self.normalize}, window={self.window}, interval={self.interval}, "
                f"grad_through_model={self.grad_through_model}{extra})")
