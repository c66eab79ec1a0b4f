"""Test-time search over initial noises under a budget of model evaluations: best-of-N and noise-aware pruning.

Cost is counted in **NFE = velocity evaluations per prompt**: one call of ``model.velocity`` on one candidate at
one step counts 1, whatever the family does inside (with classifier-free guidance the transformer runs both
branches, i.e. 2 forward passes per NFE; ``SearchResult.forward_passes`` reports that). Reward calls are counted
separately (``SearchResult.reward_evals``: images or latents scored per prompt), as is any extra work a guidance
object does (``grad_through_model``), which is not in ``nfe``.

- :func:`best_of_n`: draw N candidates per prompt, denoise all fully, keep the one the reward likes best.
  NFE = N x num_steps.
- :func:`prune_search`: the TTSnap idea (Yu et al. 2025, "TTSnap: Test-Time Scaling of Diffusion Models via
  Noise-Aware Pruning"): start N candidates, score the partially denoised ones at chosen steps (by default
  the final reward on the decoded clean estimate ``x0_hat = x - sigma v``, which reuses that step's velocity and
  costs no extra NFE; or a noise-aware latent reward, :class:`~flowalign.sampling.guidance.LatentReward`), keep
  the top fraction and finish only those. For the same NFE budget it explores more seeds than best-of-N; whether
  that pays depends on how well early scores rank the final ones (TTSnap trains noise-aware rewards for this).
  With ``budget`` the largest N whose NFE fits is chosen.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from flowalign.functional.flow import x0_from_velocity
from flowalign.models import load_model
from flowalign.rewards.base import Reward, check_scores, load
from flowalign.sampling.sampler import _check_sampler, _guided_step, sde_mask
from flowalign.utils import as_prompt_list


@dataclass
class SearchResult:
    """The best sample per prompt and what the search cost.

    Attributes:
        images: ``(P, ...)`` decoded pixels of the chosen candidate per prompt.
        scores: ``(P,)`` final reward of the chosen candidates.
        prompts: the P prompts.
        nfe: velocity evaluations per prompt (the budget unit; see the module docstring).
        latents: ``(P, ...)`` final latents x_0 of the chosen candidates.
        candidate_scores: ``(P, M)`` final rewards of the M candidates denoised to the end.
        candidate_latents: ``(P, M, ...)`` their final latents.
        num_candidates: N, the candidates started per prompt.
        survivors: candidates alive per prompt after each pruning stage (``[N]`` without pruning).
        reward_evals: samples scored per prompt (intermediate and final).
        forward_passes: transformer passes per prompt (``nfe`` x 2 with classifier-free guidance).
    """

    images: torch.Tensor
    scores: torch.Tensor
    prompts: list[str]
    nfe: int
    latents: torch.Tensor
    candidate_scores: torch.Tensor
    candidate_latents: torch.Tensor
    num_candidates: int
    survivors: list[int]
    reward_evals: int
    forward_passes: int
    extras: dict = field(default_factory=dict)

    @property
    def nfe_total(self) -> int:
        """Velocity evaluations over all prompts."""
        return self.nfe * len(self.prompts)


def pruning_nfe(n: int, num_steps: int, prune_at: Sequence[int] = (), keep: float | Sequence[float] = 0.25) -> int:
    """NFE per prompt of :func:`prune_search`: every alive candidate costs one velocity call per step, and the
    candidates scored at step k are pruned after that step's velocity call (their x0_hat reuses it)."""
    stages = _stages(prune_at, keep, num_steps)
    nfe, alive, prev = 0, n, 0
    for k, frac in stages:
        nfe += alive * (k + 1 - prev)
        alive, prev = _kept(alive, frac), k + 1
    return nfe + alive * (num_steps - prev)


def _kept(alive: int, frac: float) -> int:
    return max(1, math.ceil(alive * frac - 1e-9))


def _stages(prune_at, keep, num_steps) -> list[tuple[int, float]]:
    steps = [int(k) for k in prune_at]
    if sorted(set(steps)) != steps:
        raise ValueError(f"prune_at must be strictly increasing step indices, got {list(prune_at)}.")
    bad = [k for k in steps if not 0 <= k < num_steps]
    if bad:
        raise ValueError(f"prune_at steps {bad} are outside [0, num_steps={num_steps}).")
    fracs = [float(keep)] * len(steps) if isinstance(keep, (int, float)) else [float(f) for f in keep]
    if len(fracs) != len(steps):
        raise ValueError(f"keep has {len(fracs)} fractions for {len(steps)} pruning steps; give one per step or a "
                         "single fraction.")
    if any(not 0 < f <= 1 for f in fracs):
        raise ValueError(f"keep fractions must be in (0, 1], got {fracs}.")
    return list(zip(steps, fracs))


def _largest_n(budget: int, num_steps: int, prune_at, keep) -> int:
    if pruning_nfe(1, num_steps, prune_at, keep) > budget:
        raise ValueError(f"A budget of {budget} NFE per prompt cannot denoise even one candidate in {num_steps} "
                         f"steps (needs {num_steps}); raise the budget or lower num_steps.")
    lo, hi = 1, max(1, int(budget))
    while lo < hi:  # NFE is non-decreasing in N
        mid = (lo + hi + 1) // 2
        if pruning_nfe(mid, num_steps, prune_at, keep) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _score(reward: Reward, samples: torch.Tensor, prompts: list[str], sigma=None) -> torch.Tensor:
    with torch.no_grad():
        s = reward(samples, prompts, sigma=sigma) if reward.space == "latent" else reward(samples, prompts)
    return check_scores(s, samples.shape[0], reward.name).float().cpu()


def prune_search(
    model,
    prompts: str | list[str],
    reward,
    num_steps: int = 20,
    n: int | None = None,
    *,
    budget: int | None = None,
    prune_at: Sequence[int] | None = None,
    keep: float | Sequence[float] = 0.25,
    proxy=None,
    sampler: str = "ode",
    eta: float | None = None,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    num_frames: int | None = None,
    negative_prompt: str | None = None,
    generator: torch.Generator | None = None,
    guidance=None,
) -> SearchResult:
    """Noise-aware pruning (TTSnap): start N candidates per prompt, prune by early scores, finish the best.

    Args:
        reward: the final reward (a Reward or a registered name; pixels + prompts -> (B,)); need not be
            differentiable.
        n: candidates started per prompt; or give ``budget`` (NFE per prompt) and the largest N that fits is used.
        prune_at: step indices at which the alive candidates are scored and pruned (default: one stage at
            ``num_steps // 4``, none below 4 steps); empty means no pruning (best-of-N).
        keep: fraction of alive candidates kept at each stage (one value, or one per stage); at least one is kept.
        proxy: what scores partially denoised candidates: None (``reward`` on ``decode(x0_hat)``), another
            pixel Reward, or a latent (noise-aware) reward scored on ``x_t`` with ``sigma`` (``space == "latent"``).
        sampler, eta, guidance_scale, height, width, num_frames, negative_prompt, generator, guidance: as in
            :func:`flowalign.sample` (the candidates of each prompt run as one batch).

    Returns:
        a :class:`SearchResult`; ``nfe`` equals :func:`pruning_nfe` of the N used, and is ``<= budget``.
    """
    model = load_model(model)
    prompts = as_prompt_list(prompts)
    reward = load(reward)
    proxy = reward if proxy is None else load(proxy)
    if prune_at is None:
        prune_at = (num_steps // 4,) if num_steps >= 4 else ()
    stages = _stages(prune_at, keep, num_steps)
    if n is None and budget is None:
        raise ValueError("Give the number of candidates n or an NFE budget per prompt.")
    if budget is not None:
        n_fit = _largest_n(int(budget), num_steps, prune_at, keep)
        if n is not None and n > n_fit:
            raise ValueError(f"n={n} candidates need {pruning_nfe(n, num_steps, prune_at, keep)} NFE per prompt, over "
                             f"the budget of {budget}; the most that fit is {n_fit}.")
        n = n_fit if n is None else n
    if int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n}.")
    n = int(n)
    eta = _check_sampler(sampler, eta)
    gs = model.guidance_or_default(guidance_scale)
    height, width, num_frames = model.resolve_size(height, width, num_frames)
    sigmas = model.sigmas(num_steps, height, width, num_frames)
    sigma_max = sigmas[1].item() if num_steps > 1 else None
    mask = sde_mask(num_steps, sampler)
    prune = dict(stages)

    best_imgs, best_scores, best_lat, cand_scores, cand_lat = [], [], [], [], []
    nfe = reward_evals = 0
    survivors: list[int] = []
    for prompt in prompts:
        cond = model.encode([prompt], guidance_scale=gs, negative_prompt=negative_prompt).repeat_interleave(n)
        x = model.noise(n, height, width, num_frames, generator=generator).float().to(model.device)
        nfe, reward_evals, survivors = 0, 0, [n]
        with torch.no_grad():
            for i in range(num_steps):
                s, s_next = sigmas[i], sigmas[i + 1]
                v = model.velocity(x, s, cond, gs)
                nfe += x.shape[0]
                if i in prune:
                    m = _kept(x.shape[0], prune[i])
                    if proxy.space == "latent":
                        early = _score(proxy, x, cond.prompts, sigma=s)
                    else:
                        early = _score(proxy, model.decode(x0_from_velocity(x, v, s)), cond.prompts)
                    reward_evals += x.shape[0]
                    idx = torch.topk(early, m).indices.sort().values  # keep the seeds' order
                    x, v, cond = x[idx.to(x.device)], v[idx.to(v.device)], cond.index(idx)
                    survivors.append(m)
                rule = sampler if mask[i] else "ode"
                out, _ = _guided_step(model, guidance, rule, x, v, s, s_next, i, num_steps, cond, gs, sampler, eta,
                                      sigma_max, generator)
                x = out.x_next
            images = model.decode(x)
        if reward.space == "latent":  # a noise-aware reward scores the clean latents at sigma = 0
            final = _score(reward, x, cond.prompts, sigma=0.0)
        else:
            final = _score(reward, images, cond.prompts)
        reward_evals += x.shape[0]
        j = int(final.argmax())
        best_imgs.append(images[j].detach())
        best_scores.append(final[j])
        best_lat.append(x[j].detach())
        cand_scores.append(final)
        cand_lat.append(x.detach())
    return SearchResult(
        images=torch.stack(best_imgs), scores=torch.stack(best_scores), prompts=prompts, nfe=nfe,
        latents=torch.stack(best_lat), candidate_scores=torch.stack(cand_scores),
        candidate_latents=torch.stack(cand_lat), num_candidates=n, survivors=survivors, reward_evals=reward_evals,
        forward_passes=nfe * (2 if model.uses_cfg and gs > 1 else 1),
        extras={"sampler": sampler, "num_steps": num_steps, "prune_at": [k for k, _ in stages],
                "keep": [f for _, f in stages], "budget": budget},
    )


def best_of_n(
    model,
    prompts: str | list[str],
    reward,
    n: int | None = None,
    num_steps: int = 20,
    *,
    budget: int | None = None,
    **kwargs,
) -> SearchResult:
    """Best-of-N: denoise N candidates per prompt fully and keep the highest-reward one.

    NFE per prompt = N x num_steps (with ``budget``: ``N = budget // num_steps``). Takes the keywords of
    :func:`prune_search` except the pruning ones; the candidates are exactly those :func:`flowalign.sample` draws
    with ``num_images_per_prompt=N`` and the same generator, one prompt at a time.
    """
    for key in ("prune_at", "keep", "proxy"):
        if key in kwargs:
            raise TypeError(f"best_of_n does not prune; {key!r} belongs to prune_search.")
    return prune_search(model, prompts, reward, num_steps, n, budget=budget, prune_at=(), **kwargs)
