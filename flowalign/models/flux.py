"""FLUX.1 (``FluxPipeline``): guidance-distilled MMDiT over 2x2-packed latents, CLIP + T5 text encoders.

Latents stay unpacked inside flowalign (``(B, C, h, w)``, ``C = in_channels // 4``); :meth:`FluxModel.velocity`
packs them into the ``(B, h/2 * w/2, 4C)`` token sequence the transformer reads and unpacks its output again.
Packing is a permutation and Euler steps are elementwise, so stepping unpacked latents equals the pipeline's
packed stepping. ``guidance_scale`` feeds the distilled guidance embedding (FLUX.1-dev; ignored by schnell),
so ``uses_cfg`` is False; the pipeline's optional "true CFG" with a negative prompt is available through
``true_cfg_scale``.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.utils.torch_utils import randn_tensor

from flowalign.models.base import Conditioning, FlowModel
from flowalign.models.vae import decode_kl, encode_kl


class FluxModel(FlowModel):
    family = "flux"
    uses_cfg = False

    def __init__(self, pipe, device=None, dtype=None, max_sequence_length: int = 512, true_cfg_scale: float = 1.0):
        super().__init__(pipe, device=device, dtype=dtype)
        self.max_sequence_length = max_sequence_length
        #: the pipeline's ``true_cfg_scale``: real CFG against a negative prompt (two passes), on when > 1 and
        #: a negative prompt is given to :meth:`encode`. Off by default, as in the pipeline.
        self.true_cfg_scale = float(true_cfg_scale)
        self._default_guidance_scale = 3.5  # the pipeline's own default (the distilled guidance embedding)

    # ----------------------------------------------------------------- sizes
    @property
    def vae_scale_factor(self) -> int:
        return self.pipe.vae_scale_factor

    @property
    def size_multiple(self) -> int:
        # the VAE factor times the 2x2 packing
        return self.vae_scale_factor * 2

    @property
    def lora_targets(self) -> tuple[str, ...]:
        """Attention projections of both streams, plus the single blocks' MLP/output projections.

        The single blocks' ``proj_out`` is named per block so that the model's final ``proj_out`` stays frozen.
        """
        n_single = len(getattr(self.transformer, "single_transformer_blocks", ()))
        return ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "proj_mlp", *(f"single_transformer_blocks.{i}.proj_out" for i in range(n_single)))

    def pipeline_default_size(self) -> tuple[int, int]:
        s = self.pipe.default_sample_size * self.vae_scale_factor
        return s, s

    def latent_shape(self, batch_size, height, width, num_frames=None):
        m = self.size_multiple
        return (batch_size, self.transformer.config.in_channels // 4, 2 * (height // m), 2 * (width // m))

    @property
    def prompt_dtype(self) -> torch.dtype:
        """The dtype of the text embeddings, which the pipeline also draws its noise in."""
        te = getattr(self.pipe, "text_encoder_2", None)
        return te.dtype if te is not None else self.dtype

    # ----------------------------------------------------------------- contract
    def encode(self, prompts, guidance_scale=None, negative_prompt=None, true_cfg_scale: float | None = None
               ) -> Conditioning:
        """Encode prompts (CLIP pooled + T5 sequence).

        The negative prompt is encoded only for true CFG (``true_cfg_scale > 1``, default ``self.true_cfg_scale``),
        exactly when the pipeline would; the scale is stored in ``cond.extra["true_cfg_scale"]``.
        """
        prompts = self.prepare_prompts(prompts)
        tcfg = self.true_cfg_scale if true_cfg_scale is None else float(true_cfg_scale)
        do_true_cfg = tcfg > 1 and negative_prompt is not None
        with torch.no_grad():
            pe, pp, _ = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, device=self.device,
                                                max_sequence_length=self.max_sequence_length)
            uncond = None
            if do_true_cfg:
                neg = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
                if len(neg) != len(prompts):
                    raise ValueError(f"negative_prompt has {len(neg)} entries but there are {len(prompts)} prompts; "
                                     "give one string or one per prompt.")
                npe, npp, _ = self.pipe.encode_prompt(prompt=neg, prompt_2=None, device=self.device,
                                                      max_sequence_length=self.max_sequence_length)
                uncond = {"encoder_hidden_states": npe, "pooled_projections": npp}
        cond = {"encoder_hidden_states": pe, "pooled_projections": pp}
        return Conditioning(prompts, cond, uncond, extra={"true_cfg_scale": tcfg if do_true_cfg else 1.0})

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, h, w)`` -> ``(B, h/2 * w/2, 4C)``, the pipeline's ``_pack_latents``."""
        b, c, h, w = x.shape
        return type(self.pipe)._pack_latents(x, b, c, h, w)

    @staticmethod
    def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """``(B, h/2 * w/2, 4C)`` -> ``(B, C, h, w)``: the inverse of :meth:`pack`."""
        b, _, d = tokens.shape
        x = tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, d // 4, h, w)

    def velocity(self, x, sigma, cond: Conditioning, guidance_scale=None) -> torch.Tensor:
        gs = self.guidance_or_default(guidance_scale)
        b, _, h, w = x.shape
        dtype = self.dtype
        tokens = self.pack(x.to(dtype).contiguous())
        img_ids = type(self.pipe)._prepare_latent_image_ids(b, h // 2, w // 2, x.device, dtype)
        # as the pipeline computes it: t = sigma * 1000 in fp32, cast to the latents' dtype, then / 1000
        timestep = self.timestep(sigma, b).to(dtype) / 1000
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full([1], gs, device=x.device, dtype=torch.float32).expand(b)

        def run(kw):
            seq = kw["encoder_hidden_states"].shape[1]
            txt_ids = torch.zeros(seq, 3, device=x.device, dtype=kw["encoder_hidden_states"].dtype)
            return self.denoiser(hidden_states=tokens, timestep=timestep, guidance=guidance, txt_ids=txt_ids,
                                    img_ids=img_ids, return_dict=False, **kw)[0]

        out = run(cond.cond)
        tcfg = float(cond.extra.get("true_cfg_scale", 1.0))
        if cond.uncond is not None and tcfg > 1:
            neg = run(cond.uncond)  # cond first, then uncond, as the pipeline does
            out = neg + tcfg * (out - neg)
        return self.unpack(out, h, w).float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_kl(self.pipe.vae, latents)

    def encode_images(self, pixels, generator=None) -> torch.Tensor:
        return encode_kl(self.pipe.vae, pixels, generator)

    def noise(self, batch_size, height=None, width=None, num_frames=None, generator=None) -> torch.Tensor:
        # the same draw as FluxPipeline.prepare_latents (before packing), so one generator gives one sample
        height, width, _ = self.resolve_size(height, width, num_frames)
        shape = self.latent_shape(batch_size, height, width)
        return randn_tensor(shape, generator=generator, device=self.device, dtype=self.prompt_dtype).float()

    def sigmas(self, num_steps, height=None, width=None, num_frames=None) -> torch.Tensor:
        """The pipeline's schedule: ``linspace(1, 1/N, N)`` time-shifted by ``mu(packed sequence length)``."""
        height, width, _ = self.resolve_size(height, width, num_frames)
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
        cfg = self.scheduler.config
        sig = None if cfg.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / num_steps, num_steps)
        seq = (height // self.size_multiple) * (width // self.size_multiple)
        mu = calculate_shift(seq, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                             cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        if sig is None:
            return self._set_timesteps(num_steps, mu=mu)
        return self._set_timesteps(num_steps, sigmas=sig, mu=mu)
