"""The image-VAE conventions shared by SD3 and FLUX (``AutoencoderKL`` with scaling and shift factors)."""

from __future__ import annotations

import torch


def decode_kl(vae, latents: torch.Tensor) -> torch.Tensor:
    """Model latents -> pixels in [0, 1], differentiably (as the pipelines' decode + postprocess)."""
    z = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
    image = vae.decode(z, return_dict=False)[0]
    return (image.float() / 2 + 0.5).clamp(0, 1)


def encode_kl(vae, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pixels in [0, 1] -> model latents (the posterior mode, or a sample when a generator is given)."""
    dist = vae.encode((pixels * 2 - 1).to(vae.device, vae.dtype)).latent_dist
    z = dist.mode() if generator is None else dist.sample(generator)
    return ((z - vae.config.shift_factor) * vae.config.scaling_factor).float()
