"""Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``): MMDiT, three text encoders, true CFG."""

from __future__ import annotations

import torch
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift
from diffusers.utils.torch_utils import randn_tensor

from flowalign.models.base import Conditioning, FlowModel
from flowalign.models.vae import decode_kl, encode_kl


class SD3Model(FlowModel):
    family = "sd3"
    uses_cfg = True
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")

    def __init__(self, pipe, device=None, dtype=None, max_sequence_length: int = 256):
        super().__init__(pipe, device=device, dtype=dtype)
        self.max_sequence_length = max_sequence_length
        self._default_guidance_scale = 7.0  # the pipeline's own default

    @property
    def vae_scale_factor(self) -> int:
        return self.pipe.vae_scale_factor

    @property
    def patch_size(self) -> int:
        return self.transformer.config.patch_size

    @property
    def size_multiple(self) -> int:
        return self.vae_scale_factor * self.patch_size

    def pipeline_default_size(self) -> tuple[int, int]:
        s = self.pipe.default_sample_size * self.vae_scale_factor
        return s, s

    def encode(self, prompts, guidance_scale=None, negative_prompt=None) -> Conditioning:
        prompts = self.prepare_prompts(prompts)
        do_cfg = self.guidance_or_default(guidance_scale) > 1
        with torch.no_grad():
            pe, npe, pp, npp = self.pipe.encode_prompt(
                prompt=prompts, prompt_2=None, prompt_3=None, negative_prompt=negative_prompt,
                do_classifier_free_guidance=do_cfg, device=self.device, max_sequence_length=self.max_sequence_length,
            )
        cond = {"encoder_hidden_states": pe, "pooled_projections": pp}
        uncond = {"encoder_hidden_states": npe, "pooled_projections": npp} if do_cfg else None
        return Conditioning(prompts, cond, uncond)

    def velocity(self, x, sigma, cond: Conditioning, guidance_scale=None) -> torch.Tensor:
        gs, cfg = self.cfg_scale(cond, guidance_scale)
        b = x.shape[0]
        xin = x.to(self.dtype)
        if cfg:
            # one batched forward, negatives first, exactly as the pipeline does
            xin = torch.cat([xin, xin])
            kw = {k: torch.cat([cond.uncond[k], cond.cond[k]]) for k in cond.cond}
        else:
            kw = cond.cond
        t = self.timestep(sigma, b)
        out = self.denoiser(hidden_states=xin, timestep=torch.cat([t, t]) if cfg else t, return_dict=False, **kw)[0]
        if cfg:
            v_u, v_c = out.chunk(2)
            out = v_u + gs * (v_c - v_u)
        return out.float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_kl(self.pipe.vae, latents)

    def encode_images(self, pixels, generator=None) -> torch.Tensor:
        return encode_kl(self.pipe.vae, pixels, generator)

    def latent_shape(self, batch_size, height, width, num_frames=None):
        f = self.vae_scale_factor
        return (batch_size, self.transformer.config.in_channels, height // f, width // f)

    def noise(self, batch_size, height=None, width=None, num_frames=None, generator=None) -> torch.Tensor:
        height, width, _ = self.resolve_size(height, width, num_frames)
        shape = self.latent_shape(batch_size, height, width)
        return randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype).float()

    def sigmas(self, num_steps, height=None, width=None, num_frames=None) -> torch.Tensor:
        kwargs = {}
        cfg = self.scheduler.config
        if cfg.get("use_dynamic_shifting", False):
            height, width, _ = self.resolve_size(height, width)
            seq = (height // self.size_multiple) * (width // self.size_multiple)
            kwargs["mu"] = calculate_shift(seq, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                                           cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.16))
        return self._set_timesteps(num_steps, **kwargs)
