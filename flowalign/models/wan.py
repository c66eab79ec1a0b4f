"""Wan 2.1 text-to-video (``WanPipeline``): a 3-D DiT with a UMT5 text encoder and real CFG (two passes).

Latents are ``(B, C, f, h, w)`` with ``f = (num_frames - 1) // 4 + 1``; noise is drawn in fp32 as the pipeline does.
Decoded videos are ``(B, F, 3, H, W)`` in [0, 1], the layout of ``postprocess_video(..., output_type="pt")``.

Scheduler: the released Wan 2.1 checkpoints ship a ``UniPCMultistepScheduler`` (``flow_prediction`` with
``flow_shift``). flowalign's samplers are Euler-type step rules over a sigma grid, so for those checkpoints the model
uses a ``FlowMatchEulerDiscreteScheduler`` with the same ``flow_shift``: the ODE is then Euler over FlowMatch Euler's
shifted grid (``shift(linspace(1, shift(1/1000), N))``), which is close to but not the same grid as UniPC's flow
sigmas (``shift(linspace(1, 1/1000, N + 1)[:-1])``), and not UniPC's multistep predictor-corrector, so samples
differ from the stock pipeline's at equal step counts. Pipelines that already use FlowMatch Euler (the tiny
pipeline, or ``pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=...)``) match the pipeline exactly.
"""

from __future__ import annotations

import logging

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

from flowalign.models.base import Conditioning, FlowModel

logger = logging.getLogger(__name__)


class WanModel(FlowModel):
    family = "wan"
    uses_cfg = True
    is_video = True
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")  # self (attn1) and cross (attn2) attention

    def __init__(self, pipe, device=None, dtype=None, max_sequence_length: int = 512):
        if getattr(pipe, "transformer_2", None) is not None or getattr(pipe, "transformer", None) is None:
            raise NotImplementedError(
                "Two-expert Wan 2.2 pipelines (transformer_2 / boundary_ratio) are not supported yet; "
                "use a single-transformer Wan pipeline (Wan 2.1 T2V or Wan 2.2 TI2V-5B)."
            )
        super().__init__(pipe, device=device, dtype=dtype)
        self.max_sequence_length = max_sequence_length  # the pipeline's __call__ default
        self._default_guidance_scale = 5.0  # the pipeline's own default
        if not isinstance(self.scheduler, FlowMatchEulerDiscreteScheduler):
            cfg = self.scheduler.config
            shift = cfg.get("flow_shift", None) or 3.0
            logger.info("Wan: replacing %s by FlowMatchEulerDiscreteScheduler(shift=%s) for Euler-type sampling "
                        "(see flowalign.models.wan).", type(self.scheduler).__name__, shift)
            self.scheduler = FlowMatchEulerDiscreteScheduler(
                num_train_timesteps=cfg.get("num_train_timesteps", 1000), shift=shift)

    # ----------------------------------------------------------------- sizes
    @property
    def vae_scale_factor_spatial(self) -> int:
        return self.pipe.vae_scale_factor_spatial

    @property
    def temporal_factor(self) -> int:
        return self.pipe.vae_scale_factor_temporal

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return tuple(self.transformer.config.patch_size)

    @property
    def size_multiple(self) -> int:
        return self.vae_scale_factor_spatial * self.patch_size[1]

    def pipeline_default_size(self) -> tuple[int, int]:
        return 480, 832

    def pipeline_default_num_frames(self) -> int:
        return 81

    def latent_shape(self, batch_size, height, width, num_frames=None):
        f = self.vae_scale_factor_spatial
        frames = (int(num_frames or self.default_num_frames) - 1) // self.temporal_factor + 1
        return (batch_size, self.transformer.config.in_channels, frames, height // f, width // f)

    # ----------------------------------------------------------------- contract
    def encode(self, prompts, guidance_scale=None, negative_prompt=None) -> Conditioning:
        """UMT5 embeddings; the negative prompt defaults to "" as in the pipeline, encoded only when CFG is on."""
        prompts = self.prepare_prompts(prompts)
        do_cfg = self.guidance_or_default(guidance_scale) > 1
        if isinstance(negative_prompt, str):
            negative_prompt = [negative_prompt] * len(prompts)
        with torch.no_grad():
            pe, npe = self.pipe.encode_prompt(prompt=prompts, negative_prompt=negative_prompt,
                                              do_classifier_free_guidance=do_cfg, device=self.device,
                                              max_sequence_length=self.max_sequence_length)
        cond = {"encoder_hidden_states": pe.to(self.dtype)}
        uncond = {"encoder_hidden_states": npe.to(self.dtype)} if do_cfg else None
        return Conditioning(prompts, cond, uncond)

    def _timestep(self, sigma, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        t = self.timestep(sigma, b)
        if self.pipe.config.get("expand_timesteps", False):
            # Wan 2.2 TI2V: one timestep per (frame, h/2, w/2) token, as the pipeline's mask[0][0][:, ::2, ::2] * t
            n = x.shape[2] * x[0, 0, 0, ::2, ::2].numel()
            t = t[:, None].expand(b, n)
        return t

    def velocity(self, x, sigma, cond: Conditioning, guidance_scale=None) -> torch.Tensor:
        gs, cfg = self.cfg_scale(cond, guidance_scale)
        xin = x.to(self.dtype)
        t = self._timestep(sigma, x)
        out = self.denoiser(hidden_states=xin, timestep=t, return_dict=False, **cond.cond)[0]
        if cfg:
            # two separate passes, cond then uncond, exactly as the pipeline does
            out_u = self.denoiser(hidden_states=xin, timestep=t, return_dict=False, **cond.uncond)[0]
            out = out_u + gs * (out - out_u)
        return out.float()

    def _latents_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(latents_mean, 1 / latents_std)`` shaped for broadcasting, as the pipeline builds them."""
        cfg = self.pipe.vae.config
        mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(like.device, like.dtype)
        inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(like.device, like.dtype)
        return mean, inv_std

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, C, f, h, w)`` latents -> ``(B, F, 3, H, W)`` pixels in [0, 1] (differentiable)."""
        vae = self.pipe.vae
        z = latents.to(vae.device, vae.dtype)
        mean, inv_std = self._latents_stats(z)
        video = vae.decode(z / inv_std + mean, return_dict=False)[0]
        return (video.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4).contiguous()

    def encode_images(self, pixels, generator=None) -> torch.Tensor:
        """``(B, F, 3, H, W)`` video (or ``(B, 3, H, W)`` images, as one frame) in [0, 1] -> normalised latents."""
        vae = self.pipe.vae
        if pixels.ndim == 4:
            pixels = pixels.unsqueeze(1)
        video = (pixels * 2 - 1).permute(0, 2, 1, 3, 4).to(vae.device, vae.dtype)
        dist = vae.encode(video).latent_dist
        z = dist.mode() if generator is None else dist.sample(generator)
        mean, inv_std = self._latents_stats(z)
        return ((z - mean) * inv_std).float()

    def noise(self, batch_size, height=None, width=None, num_frames=None, generator=None) -> torch.Tensor:
        # WanPipeline.prepare_latents draws in fp32 whatever the model dtype
        height, width, num_frames = self.resolve_size(height, width, num_frames)
        shape = self.latent_shape(batch_size, height, width, num_frames)
        return randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)

    def sigmas(self, num_steps, height=None, width=None, num_frames=None) -> torch.Tensor:
        """``scheduler.set_timesteps(N)``, as the pipeline calls it (no custom sigmas, no dynamic shift)."""
        kwargs = {}
        cfg = self.scheduler.config
        if cfg.get("use_dynamic_shifting", False):
            raise ValueError("WanPipeline does not pass mu; a Wan scheduler with use_dynamic_shifting=True cannot "
                             "be used. Set a FlowMatchEulerDiscreteScheduler with a fixed shift.")
        return self._set_timesteps(num_steps, **kwargs)
