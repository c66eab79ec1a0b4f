"""The sampling loop: one loop for every step rule, recording what RL needs.

``sample`` integrates from sigma = 1 to 0 with a step rule from :mod:`flowalign.functional.sde`, records every
state and the exact log-prob of every stochastic transition, and lets a guidance object correct the velocity
(Flow-NRG) or shift the SDE mean (Euphonium) at each step. ``log_prob`` rescores a recorded trajectory under
the model's current parameters through the same step function, so on-policy ratios are exactly 1.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from flowalign.functional import sde
from flowalign.models import Conditioning, FlowModel, load_model

SAMPLERS = tuple(sde.RULES)


@dataclass
class Trajectory:
    """A batch of sampled trajectories.

    Attributes:
        latents: ``(B, T+1, ...)`` every state from x_T (noise) to x_0.
        sigmas: ``(T+1,)`` from 1 to 0.
        log_probs: ``(B, T)`` log-prob of each recorded transition (0 on deterministic steps); None for "ode".
        stochastic: ``(T,)`` bool, which steps were stochastic (the SDE window).
        images: decoded pixels in [0, 1], ``(B, C, H, W)`` or ``(B, F, C, H, W)``; None if not decoded.
        guidance_shifts: ``(B, T, ...)`` guided minus plain mean per step, recorded only when the log-probs are
            taken under the guided mean, so that :func:`log_prob` can reproduce them.
    """

    latents: torch.Tensor
    sigmas: torch.Tensor
    log_probs: torch.Tensor | None
    stochastic: torch.Tensor
    cond: Conditioning
    prompts: list[str]
    sampler: str
    eta: float
    guidance_scale: float
    height: int
    width: int
    num_frames: int | None = None
    images: torch.Tensor | None = None
    guidance_shifts: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return self.sigmas.numel() - 1

    @property
    def x0(self) -> torch.Tensor:
        return self.latents[:, -1]

    def index(self, idx: torch.Tensor | list[int]) -> Trajectory:
        """The sub-batch ``idx`` (a training minibatch), with the same settings."""
        idx = torch.as_tensor(idx, dtype=torch.long)

        def pick(t):
            return None if t is None else t[idx.to(t.device)]

        return dataclasses.replace(self, latents=pick(self.latents), log_probs=pick(self.log_probs),
                                   cond=self.cond.index(idx), prompts=[self.prompts[i] for i in idx.tolist()],
                                   images=pick(self.images), guidance_shifts=pick(self.guidance_shifts),
                                   extras=dict(self.extras))

    @staticmethod
    def cat(parts: list[Trajectory]) -> Trajectory:
        """Concatenate batches sampled with the same settings and sigmas (rollout chunks)."""
        def join(name):
            ts = [getattr(p, name) for p in parts]
            return None if ts[0] is None else torch.cat(ts)

        return dataclasses.replace(parts[0], latents=join("latents"), log_probs=join("log_probs"),
                                   cond=Conditioning.cat([p.cond for p in parts]),
                                   prompts=[q for p in parts for q in p.prompts], images=join("images"),
                                   guidance_shifts=join("guidance_shifts"), extras=dict(parts[0].extras))

    def settings(self) -> dict:
        """The sampling settings as plain data (for a run's JSON record)."""
        return {"sampler": self.sampler, "eta": self.eta, "guidance_scale": self.guidance_scale,
                "num_steps": self.num_steps, "height": self.height, "width": self.width,
                "num_frames": self.num_frames, "stochastic_steps": self.stochastic.nonzero().flatten().tolist()}


@dataclass
class StepContext:
    """What a guidance object sees at one step."""

    model: FlowModel
    x: torch.Tensor
    v: torch.Tensor
    sigma: torch.Tensor
    sigma_next: torch.Tensor
    step: int
    num_steps: int
    cond: Conditioning
    guidance_scale: float
    sampler: str
    eta: float


@dataclass
class GuidanceOutput:
    """A guidance correction: a replacement velocity and/or an additive shift of the step's mean."""

    velocity: torch.Tensor | None = None
    mean_shift: torch.Tensor | None = None


class Guidance(Protocol):
    #: score recorded transitions under the guided mean (True) or the plain policy mean (False)
    log_prob_under_guided_mean: bool

    def __call__(self, ctx: StepContext) -> GuidanceOutput | None: ...


def sde_mask(num_steps: int, sampler: str, sde_window: tuple[int, int] | None = None,
             sde_steps: Sequence[int] | None = None) -> torch.Tensor:
    """Which steps are stochastic: all (default), a window ``[start, end)``, or an explicit list.

    Steps outside are ODE steps (the Flow-GRPO-Fast / MixGRPO trick).
    """
    if sampler == "ode":
        return torch.zeros(num_steps, dtype=torch.bool)
    if sde_window is not None and sde_steps is not None:
        raise ValueError("Give either sde_window or sde_steps, not both.")
    mask = torch.ones(num_steps, dtype=torch.bool)
    if sde_window is not None:
        start, end = sde_window
        if not 0 <= start < end <= num_steps:
            raise ValueError(f"sde_window must satisfy 0 <= start < end <= num_steps={num_steps}; got {sde_window}.")
        mask = torch.zeros(num_steps, dtype=torch.bool)
        mask[start:end] = True
    elif sde_steps is not None:
        bad = [s for s in sde_steps if not 0 <= s < num_steps]
        if bad:
            raise ValueError(f"sde_steps {bad} are outside [0, {num_steps}).")
        mask = torch.zeros(num_steps, dtype=torch.bool)
        mask[list(sde_steps)] = True
    return mask


def _check_sampler(sampler: str, eta: float | None) -> float:
    if sampler not in sde.RULES:
        raise ValueError(f"Unknown sampler {sampler!r}; choose one of {list(SAMPLERS)}.")
    eta = sde.DEFAULT_ETA[sampler] if eta is None else float(eta)
    if eta < 0:
        raise ValueError(f"eta must be >= 0 (eta = 0 gives the ODE), got {eta}.")
    return eta


def sample(
    model,
    prompts: str | list[str],
    num_steps: int | None = None,
    sampler: str | None = None,
    eta: float | None = None,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    num_frames: int | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    guidance: Guidance | None = None,
    num_images_per_prompt: int = 1,
    same_noise_per_prompt: bool = False,
    sde_window: tuple[int, int] | None = None,
    sde_steps: Sequence[int] | None = None,
    latents: torch.Tensor | None = None,
    negative_prompt: str | list[str] | None = None,
    cond: Conditioning | None = None,
    decode: bool = True,
    requires_grad: bool = False,
    progress: bool = False,
) -> Trajectory:
    """Sample a batch and record its trajectory.

    Args:
        model: a FlowModel or anything :func:`flowalign.load_model` accepts.
        num_steps: sampling steps; defaults to the model's own (20, or a distilled student's step count).
        sampler: ``"ode"`` (Euler, as diffusers; the default unless the model names its own, as distilled
            students do), ``"flow-sde"`` (Flow-GRPO), ``"dance-sde"`` (DanceGRPO) or
            ``"cps"`` (coefficients-preserving). ``eta`` defaults to 0.7 / 0.3 / 0.8 for the SDEs.
        guidance_scale: CFG scale (FLUX: the guidance embedding); defaults to the model's own.
        num_images_per_prompt: group size K; samples of a prompt are consecutive.
        same_noise_per_prompt: share the initial noise within each prompt group.
        sde_window / sde_steps: make only these steps stochastic (ODE elsewhere).
        latents: start from these initial latents instead of drawing noise.
        cond: reuse an already encoded conditioning (its prompts must match).
        requires_grad: keep the autograd graph (reward backpropagation through sampling).
    """
    model = load_model(model)
    num_steps = model.default_num_steps if num_steps is None else int(num_steps)
    if sampler is None:
        sampler, eta = model.default_sampler, model.default_eta if eta is None else eta
    eta = _check_sampler(sampler, eta)
    if num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}.")
    gs = model.guidance_or_default(guidance_scale)
    height, width, num_frames = model.resolve_size(height, width, num_frames)
    if cond is None:
        cond = model.encode(prompts, guidance_scale=gs, negative_prompt=negative_prompt)
    cond = cond.repeat_interleave(num_images_per_prompt) if num_images_per_prompt > 1 else cond
    batch = len(cond)

    if latents is None:
        n = batch // num_images_per_prompt if same_noise_per_prompt else batch
        latents = model.noise(n, height, width, num_frames, generator=generator)
        if same_noise_per_prompt:
            latents = latents.repeat_interleave(num_images_per_prompt, dim=0)
    expected = tuple(model.latent_shape(batch, height, width, num_frames))
    if tuple(latents.shape) != expected:
        raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {expected} for this size.")

    sigmas = model.sigmas(num_steps, height, width, num_frames)
    mask = sde_mask(num_steps, sampler, sde_window, sde_steps)
    x = latents.float().to(model.device)
    states, log_probs, shifts = [x], [], []
    record_shift = guidance is not None and getattr(guidance, "log_prob_under_guided_mean", False)
    sigma_max = sigmas[1].item() if num_steps > 1 else None
    grad_ctx = torch.enable_grad() if requires_grad else torch.no_grad()
    with grad_ctx:
        for i in tqdm(range(num_steps), disable=not progress, desc=f"sampling ({sampler})", leave=False):
            s, s_next = sigmas[i], sigmas[i + 1]
            v = model.velocity(x, s, cond, gs)
            rule = sampler if mask[i] else "ode"
            out, shift = _guided_step(model, guidance, rule, x, v, s, s_next, i, num_steps, cond, gs, sampler,
                                      eta, sigma_max, generator)
            x = out.x_next
            states.append(x)
            log_probs.append(out.log_prob)
            if record_shift:
                shifts.append(torch.zeros_like(x) if shift is None else shift)
        images = model.decode(x) if decode else None
    return Trajectory(
        latents=torch.stack(states, dim=1), sigmas=sigmas, stochastic=mask,
        log_probs=None if sampler == "ode" else torch.stack(log_probs, dim=1),
        cond=cond.detach(), prompts=list(cond.prompts), sampler=sampler, eta=eta, guidance_scale=gs,
        height=height, width=width, num_frames=num_frames, images=images,
        guidance_shifts=torch.stack(shifts, dim=1) if record_shift else None,
    )


def _guided_step(model, guidance, rule, x, v, s, s_next, i, num_steps, cond, gs, sampler, eta, sigma_max,
                 generator):
    """One step, with the guidance correction; returns the step output and the recorded mean shift."""
    noise = None
    if rule != "ode":
        noise = _randn(x, generator)
    step_eta = eta if rule != "ode" else 0.0
    if guidance is None:
        return sde.step(rule, x, v, s, s_next, step_eta, noise=noise, sigma_max=sigma_max), None
    g = guidance(StepContext(model, x, v, s, s_next, i, num_steps, cond, gs, sampler, eta)) or GuidanceOutput()
    plain_mean, _ = sde.get_rule(rule)(x, v, s, s_next, eta=step_eta, sigma_max=sigma_max)
    v_g = v if g.velocity is None else g.velocity.float()
    guided_mean, _ = sde.get_rule(rule)(x, v_g, s, s_next, eta=step_eta, sigma_max=sigma_max)
    shift = guided_mean - plain_mean
    if g.mean_shift is not None:
        shift = shift + g.mean_shift.float()
    under_guided = getattr(guidance, "log_prob_under_guided_mean", False)
    out = sde.step(rule, x, v, s, s_next, step_eta, noise=noise, mean_shift=shift,
                   log_prob_under_shifted_mean=under_guided, sigma_max=sigma_max)
    return out, shift.detach()


def _randn(like: torch.Tensor, generator) -> torch.Tensor:
    from diffusers.utils.torch_utils import randn_tensor

    return randn_tensor(like.shape, generator=generator, device=like.device, dtype=torch.float32)


def log_prob(model, traj: Trajectory, steps: Sequence[int] | None = None, cond: Conditioning | None = None,
             guidance_scale: float | None = None, with_mean: bool = False):
    """Log-probs of the recorded transitions under the model's current parameters (differentiable).

    Args:
        steps: step indices to score; default: the trajectory's stochastic steps.
        with_mean: also return the step means ``(B, S, ...)`` and stds (for KL terms).

    Returns:
        ``(B, S)`` log-probs, through the same step function as sampling (ratio exactly 1 on-policy).
    """
    model = load_model(model)
    if traj.sampler == "ode":
        raise ValueError("An ODE trajectory has no log-probs; sample with a stochastic sampler (e.g. 'flow-sde').")
    steps = traj.stochastic.nonzero().flatten().tolist() if steps is None else list(steps)
    cond = traj.cond if cond is None else cond
    gs = traj.guidance_scale if guidance_scale is None else guidance_scale
    sig = traj.sigmas
    sigma_max = sig[1].item() if traj.num_steps > 1 else None
    lps, means, stds = [], [], []
    for j in steps:
        if not 0 <= j < traj.num_steps:
            raise ValueError(f"step {j} is outside [0, {traj.num_steps}).")
        x = traj.latents[:, j].to(model.device)
        v = model.velocity(x, sig[j], cond, gs)
        shift = None if traj.guidance_shifts is None else traj.guidance_shifts[:, j].to(model.device)
        rule = traj.sampler if traj.stochastic[j] else "ode"
        out = sde.step(rule, x, v, sig[j], sig[j + 1], traj.eta if rule != "ode" else 0.0,
                       x_next=traj.latents[:, j + 1].to(model.device), mean_shift=shift, sigma_max=sigma_max)
        lps.append(out.log_prob)
        if with_mean:
            means.append(out.mean)
            stds.append(torch.broadcast_to(out.std, out.mean.shape))
    lp = torch.stack(lps, dim=1)
    return (lp, torch.stack(means, 1), torch.stack(stds, 1)) if with_mean else lp
