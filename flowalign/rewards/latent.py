"""Noise-aware (process) rewards on a generator's noisy latents: ``(x_t, sigma, prompt) -> (B,)``.

Used by reward-gradient guidance (Flow-NRG, Euphonium's latent process reward) and by noise-aware search: they
score partially denoised states directly, with no VAE decoding.
"""

from __future__ import annotations

import torch

from flowalign.rewards.base import Reward, check_scores


class LatentReward(Reward):
    """A noise-aware (process) reward on the model's noisy latents: ``(latents, sigma, prompts) -> (B,)``.

    Subclasses implement ``score(latents, sigma, prompts)`` where ``latents`` are the model's unpacked latents
    ``x_t`` (e.g. ``(B, C, h, w)``), ``sigma`` is a ``(B,)`` float32 tensor (the noise level of each sample, 1 =
    pure noise, 0 = clean) and ``prompts`` a list of B strings. Call it as ``reward(latents, prompts, sigma=s)``
    (``s`` a float, a 0-d or a (B,) tensor); the scores are checked to be finite, one per sample, like every
    :class:`~flowalign.rewards.Reward`. Examples: a head on the first DiT blocks of the generator (PRFL / PAVRM),
    Euphonium's latent PRM, VideoAlign's noisy reward model for Flow-NRG.
    """

    space = "latent"
    differentiable = True
    uses_prompts = True

    def score(self, latents: torch.Tensor, sigma: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement score(latents, sigma, prompts) -> (B,).")

    def check_inputs(self, latents, prompts):
        if not torch.is_tensor(latents) or not latents.is_floating_point():
            raise TypeError(f"Latent reward {self.name!r}: latents must be a float tensor, got "
                            f"{getattr(latents, 'dtype', type(latents).__name__)}.")
        b = latents.shape[0]
        if prompts is None and not self.uses_prompts:
            prompts = [""] * b
        elif prompts is None:
            raise ValueError(f"Latent reward {self.name!r} needs one prompt per sample.")
        elif isinstance(prompts, str):
            prompts = [prompts] * b
        prompts = list(prompts)
        if len(prompts) != b:
            raise ValueError(f"Latent reward {self.name!r}: got {b} latents but {len(prompts)} prompts.")
        return latents, prompts

    def forward(self, latents: torch.Tensor, prompts: str | list[str] | None = None, *, sigma) -> torch.Tensor:
        latents, prompts = self.check_inputs(latents, prompts)
        if self.training:
            self.eval()
        b = latents.shape[0]
        s = torch.as_tensor(sigma, dtype=torch.float32, device=latents.device)
        if s.ndim == 0:
            s = s.expand(b)
        if tuple(s.shape) != (b,):
            raise ValueError(f"Latent reward {self.name!r}: sigma must be a scalar or ({b},), got {tuple(s.shape)}.")
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.differentiable):
            out = check_scores(self.score(latents, s, prompts), b, self.name)
        return out.float()
