"""The FlowModel contract that every model family fulfils.

A FlowModel wraps a diffusers pipeline and exposes exactly what samplers, guidance, rewards and
trainers need, in one convention: latents are kept *unpacked* (images ``(B, C, h, w)``, video
``(B, C, f, h, w)``), sigma runs from 1 (noise) to 0 (clean), ``velocity`` returns the CFG-combined
prediction ``eps - x0`` in fp32, and ``decode`` returns differentiable pixels in [0, 1].
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from flowalign.utils import as_prompt_list


@dataclass
class Conditioning:
    """Cached text conditioning of a batch of prompts.

    ``cond`` and ``uncond`` map the transformer's keyword names to tensors whose first dim is the batch
    (``uncond`` is None when CFG is off or the family has no CFG). ``guidance_scale`` is the scale the
    conditioning was prepared for.
    """

    prompts: list[str]
    cond: dict[str, torch.Tensor]
    uncond: dict[str, torch.Tensor] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)

    def index(self, idx: torch.Tensor | list[int] | slice) -> Conditioning:
        """Select rows (a subset of the batch, in the given order)."""
        if isinstance(idx, slice):
            idx = list(range(len(self)))[idx]
        idx_t = torch.as_tensor(idx, dtype=torch.long)

        def pick(d):
            return None if d is None else {k: v[idx_t.to(v.device)] for k, v in d.items()}

        return replace(self, prompts=[self.prompts[i] for i in idx_t.tolist()], cond=pick(self.cond),
                       uncond=pick(self.uncond))

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        """Concatenate batches encoded with the same settings (e.g. rollout chunks)."""
        def join(ds):
            return None if ds[0] is None else {k: torch.cat([d[k] for d in ds]) for k in ds[0]}

        return replace(parts[0], prompts=[p for c in parts for p in c.prompts], cond=join([c.cond for c in parts]),
                       uncond=join([c.uncond for c in parts]))

    def repeat_interleave(self, k: int) -> Conditioning:
        """Each prompt repeated ``k`` times in a row (a group of ``k`` samples per prompt)."""
        return self.index(torch.arange(len(self)).repeat_interleave(k))

    def to(self, device) -> Conditioning:
        def mv(d):
            return None if d is None else {k: v.to(device) for k, v in d.items()}

        return replace(self, cond=mv(self.cond), uncond=mv(self.uncond))

    def detach(self) -> Conditioning:
        def dt(d):
            return None if d is None else {k: v.detach() for k, v in d.items()}

        return replace(self, cond=dt(self.cond), uncond=dt(self.uncond))


class FlowModel:
    """Base class of the model adapters (``models/<family>.py``).

    Subclasses set the class attributes and implement the methods marked abstract. Everything shared
    (argument checking, LoRA, saving) lives here.
    """

    family: str = "base"
    #: whether ``guidance_scale`` is classifier-free guidance (two branches) or an embedding (FLUX)
    uses_cfg: bool = True
    is_video: bool = False
    #: default LoRA target modules for this family (attention projections)
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")

    def __init__(self, pipe, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        self.pipe = pipe
        current = pipe.transformer.dtype
        if device is not None or (dtype is not None and dtype != current):
            pipe.to(device=device, dtype=None if dtype == current else dtype)
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                component.eval()  # modules built from config start in train mode (T5 dropout)
        self.scheduler = copy.deepcopy(pipe.scheduler)

    def configure(self, settings: dict) -> FlowModel:
        """Apply flowalign's saved settings (``flowalign.json``): native size, default CFG, text length."""
        if "native_size" in settings:
            size = list(settings["native_size"]) + [None] * (3 - len(settings["native_size"]))
            self.native_size = tuple(size[:3])
        if "guidance_scale" in settings:
            self.default_guidance_scale = settings["guidance_scale"]
        if "num_steps" in settings:  # a distilled few-step student samples with its own steps and step rule
            self.default_num_steps = int(settings["num_steps"])
        if "sampler" in settings:
            self.default_sampler = settings["sampler"]
            self.default_eta = settings.get("eta")
        if "max_sequence_length" in settings and hasattr(self, "max_sequence_length"):
            self.max_sequence_length = int(settings["max_sequence_length"])
        return self

    def settings(self) -> dict:
        """The settings :meth:`configure` reads, for saving beside the weights."""
        out = {"native_size": list(self.default_size) + [self.default_num_frames],
               "guidance_scale": self.default_guidance_scale}
        if hasattr(self, "max_sequence_length"):
            out["max_sequence_length"] = self.max_sequence_length
        if hasattr(self, "_default_num_steps"):
            out["num_steps"] = self.default_num_steps
        if self.default_sampler != "ode":
            out["sampler"], out["eta"] = self.default_sampler, self.default_eta
        return out

    # ----------------------------------------------------------------- properties
    @property
    def transformer(self) -> torch.nn.Module:
        """The trainable denoiser."""
        return self.pipe.transformer

    @property
    def denoiser(self) -> torch.nn.Module:
        """The module :meth:`velocity` calls: the transformer, or the wrapper a distributed trainer put around it
        (DDP synchronises gradients only through its own forward)."""
        wrapped = getattr(self, "_denoiser", None)
        return self.transformer if wrapped is None else wrapped

    def use_denoiser(self, module: torch.nn.Module | None) -> None:
        """Route :meth:`velocity` through ``module`` (a wrapper of :attr:`transformer`); None restores it."""
        self._denoiser = module

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    @property
    def default_guidance_scale(self) -> float:
        return float(getattr(self, "_default_guidance_scale", 1.0))

    @default_guidance_scale.setter
    def default_guidance_scale(self, value: float) -> None:
        self._default_guidance_scale = float(value)

    @property
    def default_num_steps(self) -> int:
        """Sampling steps when a call names none: 20, or what a distilled student was trained for."""
        return int(getattr(self, "_default_num_steps", 20))

    @default_num_steps.setter
    def default_num_steps(self, value: int) -> None:
        self._default_num_steps = int(value)

    #: the step rule (and its eta; None = the rule's default) when a call names none: "ode", or a distilled
    #: student's own (DMD students re-noise their x0 prediction: "cps" at eta 1)
    default_sampler: str = "ode"
    default_eta: float | None = None

    #: (height, width, num_frames) overriding the pipeline's defaults (set for bundled models)
    native_size: tuple[int, int, int | None] | None = None

    @property
    def default_size(self) -> tuple[int, int]:
        """Native (height, width) of the model."""
        return tuple(self.native_size[:2]) if self.native_size else self.pipeline_default_size()

    @property
    def default_num_frames(self) -> int | None:
        return self.native_size[2] if self.native_size else self.pipeline_default_num_frames()

    def pipeline_default_size(self) -> tuple[int, int]:
        raise NotImplementedError

    def pipeline_default_num_frames(self) -> int | None:
        return None

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this (VAE factor x patch size)."""
        raise NotImplementedError

    # ----------------------------------------------------------------- contract
    def encode(self, prompts: str | list[str], guidance_scale: float | None = None,
               negative_prompt: str | list[str] | None = None) -> Conditioning:
        raise NotImplementedError

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Conditioning,
                 guidance_scale: float | None = None) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def latent_shape(self, batch_size: int, height: int, width: int, num_frames: int | None = None) -> tuple:
        raise NotImplementedError

    def noise(self, batch_size: int, height: int | None = None, width: int | None = None,
              num_frames: int | None = None, generator: torch.Generator | list | None = None) -> torch.Tensor:
        raise NotImplementedError

    def sigmas(self, num_steps: int, height: int | None = None, width: int | None = None,
               num_frames: int | None = None) -> torch.Tensor:
        raise NotImplementedError

    # ----------------------------------------------------------------- shared helpers
    def resolve_size(self, height: int | None, width: int | None, num_frames: int | None = None):
        """Fill defaults and check that sizes fit the VAE and patch grid."""
        dh, dw = self.default_size
        height, width = int(height or dh), int(width or dw)
        m = self.size_multiple
        if height <= 0 or width <= 0 or height % m or width % m:
            raise ValueError(
                f"height and width must be positive multiples of {m} for this {self.family} model "
                f"(VAE factor x patch size); got {height}x{width}. Try {max(m, height - height % m)}x"
                f"{max(m, width - width % m)}."
            )
        if self.is_video:
            num_frames = int(num_frames or self.default_num_frames or 1)
            t = self.temporal_factor
            if num_frames < 1 or (num_frames - 1) % t:
                raise ValueError(f"num_frames must be 1 + a multiple of {t} for {self.family}; got {num_frames}.")
        else:
            if num_frames not in (None, 1):
                raise ValueError(f"{self.family} is an image model; num_frames must be None, got {num_frames}.")
            num_frames = None
        return height, width, num_frames

    temporal_factor: int = 1

    def prepare_prompts(self, prompts) -> list[str]:
        return as_prompt_list(prompts)

    def guidance_or_default(self, guidance_scale: float | None) -> float:
        return self.default_guidance_scale if guidance_scale is None else float(guidance_scale)

    def cfg_scale(self, cond: Conditioning, guidance_scale: float | None) -> tuple[float, bool]:
        """The CFG scale to use and whether CFG is on (scale > 1); the conditioning must carry its uncond half."""
        gs = self.guidance_or_default(guidance_scale)
        if gs > 1 and cond.uncond is None:
            raise ValueError("This conditioning was encoded without CFG; encode with the same guidance_scale (> 1).")
        return gs, gs > 1

    def _set_timesteps(self, num_steps: int, **kwargs) -> torch.Tensor:
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
        sched = self.scheduler
        sched.set_timesteps(num_steps, device="cpu", **kwargs)
        return sched.sigmas.to(torch.float32).clone()

    def timestep(self, sigma: torch.Tensor | float, batch_size: int) -> torch.Tensor:
        """The timestep the transformer expects: ``sigma * num_train_timesteps`` as the pipeline computes it."""
        s = torch.as_tensor(sigma, dtype=torch.float32, device=self.device)
        t = s * self.scheduler.config.num_train_timesteps
        return t.expand(batch_size) if t.ndim == 0 else t

    # ----------------------------------------------------------------- LoRA and saving
    def add_lora(self, rank: int = 32, alpha: float | None = None, target_modules=None, dropout: float = 0.0,
                 adapter_name: str = "default") -> None:
        """Attach a LoRA adapter (peft) to the transformer; only its weights stay trainable."""
        from peft import LoraConfig

        cfg = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, lora_dropout=dropout,
                         init_lora_weights="gaussian", target_modules=list(target_modules or self.lora_targets))
        self.transformer.requires_grad_(False)
        self.transformer.add_adapter(cfg, adapter_name=adapter_name)

    def load_lora(self, directory: str | os.PathLike) -> None:
        """Load a LoRA saved by :meth:`save_lora` (a training run's ``lora/`` folder) into the transformer."""
        path = os.fspath(directory)
        if not os.path.isfile(os.path.join(path, "pytorch_lora_weights.safetensors")):
            raise FileNotFoundError(f"No LoRA at {path!r}: expected pytorch_lora_weights.safetensors (a run's lora/).")
        if not hasattr(self.pipe, "load_lora_weights"):
            raise TypeError(f"{type(self.pipe).__name__} cannot load LoRA weights.")
        self.pipe.load_lora_weights(path)

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(self.transformer)

    def save_lora(self, directory: str | os.PathLike) -> str:
        """Save the LoRA in the diffusers format (``pipe.load_lora_weights(directory)`` loads it)."""
        os.makedirs(directory, exist_ok=True)
        # the adapter metadata carries lora_alpha, without which diffusers would assume alpha == rank
        meta = self.transformer.peft_config["default"].to_dict()
        meta = {k: (sorted(v) if isinstance(v, set) else v) for k, v in meta.items()}
        type(self.pipe).save_lora_weights(str(directory), transformer_lora_layers=self.lora_state_dict(),
                                          transformer_lora_adapter_metadata=meta, safe_serialization=True)
        return str(directory)

    def save_pretrained(self, directory: str | os.PathLike) -> str:
        """Save the full pipeline (diffusers format). An attached LoRA is merged into a copy first."""
        pipe = self.pipe
        if getattr(self.transformer, "peft_config", None):
            from peft.tuners.tuners_utils import BaseTunerLayer

            pipe = copy.deepcopy(self.pipe)
            for module in pipe.transformer.modules():
                if isinstance(module, BaseTunerLayer):
                    module.merge()
            pipe.transformer.unload_lora()
        pipe.save_pretrained(str(directory), safe_serialization=True)
        with open(os.path.join(directory, "flowalign.json"), "w") as f:
            json.dump(self.settings(), f, indent=2)
        return str(directory)

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.transformer.parameters())
        return f"{type(self).__name__}(family={self.family!r}, transformer={n / 1e6:.2f}M params, dtype={self.dtype})"
