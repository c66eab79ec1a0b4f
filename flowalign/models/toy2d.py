"""toy2d: a 2-D flow model (an MLP velocity field) with class-name "prompts".

The embedded world where the optimum of KL-regularised reward maximisation is known (see
:mod:`flowalign.zoo.toy2d`). It fulfils the :class:`~flowalign.models.base.FlowModel` contract with no diffusers
pipeline, so samplers, guidance, rewards and trainers run on it unchanged:

- latents are points ``(B, 2)``; ``decode`` and ``encode_images`` are the identity, so for toy2d the
  "images" of a trajectory are points ``(B, 2)`` too (rewards for toy2d take points);
- prompts are class names (``model.class_names``); ``""`` is the null class, which the network learns as the
  unconditional law (classifier-free guidance, Ho & Salimans 2022), and CFG is combined as in SD3,
  ``v_u + s (v_c - v_u)``;
- there is no image size: ``height``, ``width`` and ``num_frames`` must stay None;
- the schedule is rectified flow's uniform ``sigmas = linspace(1, 0, N + 1)`` (no shift).

The velocity network is a diffusers ``ModelMixin`` with ``PeftAdapterMixin``, so ``add_lora`` and the adapter
API (``disable_adapters``, ``set_adapter``, ``save_lora_adapter``) work as for the real families.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import os

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders.peft import PeftAdapterMixin
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from flowalign.models.base import Conditioning, FlowModel

#: the prompt of the null (unconditional) class
NULL_PROMPT = ""


def sigma_embedding(sigma: torch.Tensor, dim: int, max_freq: float = 1000.0) -> torch.Tensor:
    """Sinusoidal features of sigma in [0, 1]: ``[sin(f_k sigma), cos(f_k sigma)]`` with geometric ``f_k``."""
    half = dim // 2
    freqs = torch.exp(torch.linspace(0.0, math.log(max_freq), half, device=sigma.device, dtype=torch.float32))
    arg = sigma.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1)


class Toy2DBlock(nn.Module):
    """``h + SiLU(linear(h) + emb(e))``: a residual MLP layer with the sigma/class embedding added."""

    def __init__(self, hidden: int, emb_dim: int):
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)
        self.emb = nn.Linear(emb_dim, hidden)

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return h + nn.functional.silu(self.linear(h) + self.emb(e))


class Toy2DVelocity(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """MLP velocity field ``v(x, sigma, class)`` on 2-D points.

    Args:
        class_names: the class ("prompt") names; index ``len(class_names)`` is the null class.
        hidden: width of the hidden layers.
        num_layers: number of residual hidden blocks.
        emb_dim: width of the sigma and class embeddings.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, class_names: tuple[str, ...] = ("a", "b"), hidden: int = 128, num_layers: int = 3,
                 emb_dim: int = 64, dim: int = 2):
        super().__init__()
        self.class_embed = nn.Embedding(len(class_names) + 1, emb_dim)
        self.time_proj = nn.Linear(emb_dim, emb_dim)
        self.in_proj = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(Toy2DBlock(hidden, emb_dim) for _ in range(num_layers))
        self.out_proj = nn.Linear(hidden, dim)

    @property
    def null_class(self) -> int:
        return len(self.config.class_names)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        e = nn.functional.silu(self.time_proj(sigma_embedding(sigma, self.config.emb_dim).to(x.dtype)))
        e = nn.functional.silu(e + self.class_embed(class_labels))
        h = self.in_proj(x)
        for block in self.blocks:
            h = block(h, e)
        return self.out_proj(h)


class Toy2DModel(FlowModel):
    """The toy2d FlowModel: points ``(B, 2)`` as latents and images, class names as prompts."""

    family = "toy2d"
    uses_cfg = True
    is_video = False
    lora_targets = ("in_proj", "linear", "out_proj")

    def __init__(self, net: Toy2DVelocity, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None):
        # no pipeline: the base __init__ (which moves and copies a diffusers pipe) does not apply
        self.pipe = None
        self.scheduler = None
        if device is not None or dtype is not None:
            net = net.to(device=device, dtype=dtype)
        self.net = net.eval()
        self._default_guidance_scale = 1.0

    # ----------------------------------------------------------------- properties
    @property
    def transformer(self) -> Toy2DVelocity:
        return self.net

    @property
    def class_names(self) -> list[str]:
        return list(self.net.config.class_names)

    @property
    def default_size(self) -> tuple[None, None]:
        return None, None

    @property
    def default_num_frames(self) -> None:
        return None

    @property
    def size_multiple(self) -> int:
        return 1

    def resolve_size(self, height=None, width=None, num_frames=None):
        if height is not None or width is not None or num_frames not in (None, 1):
            raise ValueError(f"toy2d models draw 2-D points and have no image size; leave height, width and "
                             f"num_frames unset (got height={height}, width={width}, num_frames={num_frames}).")
        return None, None, None

    # ----------------------------------------------------------------- contract
    def class_index(self, prompts: str | list[str]) -> torch.Tensor:
        """Class indices of ``prompts`` (``""`` is the null class), with an error naming the valid classes."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        names = self.class_names
        idx = []
        for p in prompts:
            if p == NULL_PROMPT:
                idx.append(self.net.null_class)
            elif p in names:
                idx.append(names.index(p))
            else:
                close = difflib.get_close_matches(str(p), names, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"Unknown toy2d class {p!r}.{hint} The prompts of this model are class names: "
                                 f"{names}, or '' for the unconditional (null) class.")
        return torch.tensor(idx, dtype=torch.long, device=self.device)

    def encode(self, prompts, guidance_scale=None, negative_prompt=None) -> Conditioning:
        prompts = self.prepare_prompts(prompts)
        cond = {"class_labels": self.class_index(prompts)}
        uncond = None
        if self.guidance_or_default(guidance_scale) > 1:
            neg = NULL_PROMPT if negative_prompt is None else negative_prompt
            neg = [neg] * len(prompts) if isinstance(neg, str) else list(neg)
            if len(neg) != len(prompts):
                raise ValueError(f"Got {len(prompts)} prompts but {len(neg)} negative prompts.")
            uncond = {"class_labels": self.class_index(neg)}
        return Conditioning(prompts, cond, uncond)

    def velocity(self, x, sigma, cond: Conditioning, guidance_scale=None) -> torch.Tensor:
        gs, cfg = self.cfg_scale(cond, guidance_scale)
        b = x.shape[0]
        s = torch.as_tensor(sigma, dtype=torch.float32, device=self.device)
        s = s.expand(b) if s.ndim == 0 else s
        xin = x.to(self.device, self.dtype)
        labels = cond.cond["class_labels"].to(self.device)
        if cfg:  # one batched forward, negatives first, as SD3
            xin, s = torch.cat([xin, xin]), torch.cat([s, s])
            labels = torch.cat([cond.uncond["class_labels"].to(self.device), labels])
        out = self.denoiser(xin, s, labels)
        if cfg:
            v_u, v_c = out.chunk(2)
            out = v_u + gs * (v_c - v_u)
        return out.float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Identity: toy2d "images" are the points themselves, ``(B, 2)``."""
        return latents

    def encode_images(self, pixels: torch.Tensor, generator=None) -> torch.Tensor:
        """Identity: data points ``(B, 2)`` are their own latents."""
        if pixels.ndim != 2 or pixels.shape[-1] != 2:
            raise ValueError(f"toy2d data are points of shape (B, 2); got {tuple(pixels.shape)}.")
        return pixels.float()

    def latent_shape(self, batch_size, height=None, width=None, num_frames=None):
        return (batch_size, self.net.config.dim)

    def noise(self, batch_size, height=None, width=None, num_frames=None, generator=None) -> torch.Tensor:
        self.resolve_size(height, width, num_frames)
        return randn_tensor(self.latent_shape(batch_size), generator=generator, device=self.device,
                            dtype=self.dtype).float()

    def sigmas(self, num_steps, height=None, width=None, num_frames=None) -> torch.Tensor:
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
        return torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float32)

    def timestep(self, sigma, batch_size: int) -> torch.Tensor:
        """The network takes sigma itself (in [0, 1])."""
        s = torch.as_tensor(sigma, dtype=torch.float32, device=self.device)
        return s.expand(batch_size) if s.ndim == 0 else s

    # ----------------------------------------------------------------- LoRA and saving
    def save_lora(self, directory: str | os.PathLike) -> str:
        """Save the LoRA adapter (peft weights + metadata); ``model.transformer.load_lora_adapter(dir)`` loads it."""
        os.makedirs(directory, exist_ok=True)
        self.net.save_lora_adapter(str(directory))
        return str(directory)

    def merged_net(self) -> Toy2DVelocity:
        """A copy of the network with any LoRA merged into its weights."""
        net = self.net
        if getattr(net, "peft_config", None):
            from peft.tuners.tuners_utils import BaseTunerLayer

            net = copy.deepcopy(net)
            for module in net.modules():
                if isinstance(module, BaseTunerLayer):
                    module.merge()
            net.unload_lora()
        return net

    def save_pretrained(self, directory: str | os.PathLike) -> str:
        """Save the network (diffusers ``ModelMixin`` format; an attached LoRA is merged into a copy first) and
        flowalign's settings (``flowalign.json``, e.g. a distilled student's step count and step rule).

        ``fa.load_model(directory)`` loads both; ``Toy2DModel.from_pretrained(directory)`` the network.
        """
        self.merged_net().save_pretrained(str(directory), safe_serialization=True)
        with open(os.path.join(directory, "flowalign.json"), "w") as f:
            json.dump(self.settings(), f, indent=2)
        return str(directory)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device=None, dtype=None) -> Toy2DModel:
        """Load a directory written by :meth:`save_pretrained`, or a single ``.safetensors`` file whose metadata
        holds the network config under ``"config"`` (the bundled format)."""
        path = str(path)
        if os.path.isdir(path):
            return cls(Toy2DVelocity.from_pretrained(path), device=device, dtype=dtype)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No toy2d model at {path!r}: expected a directory from save_pretrained or a "
                                    ".safetensors file.")
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        if "config" not in meta:
            raise ValueError(f"{path!r} has no 'config' entry in its safetensors metadata; it is not a toy2d "
                             "weight file (write one with flowalign.zoo.toy2d.save_weights).")
        net = Toy2DVelocity(**json.loads(meta["config"]))
        net.load_state_dict(load_file(path))
        return cls(net, device=device, dtype=dtype)

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.net.parameters())
        return (f"Toy2DModel(classes={self.class_names}, velocity MLP={n / 1e3:.1f}k params, "
                f"dtype={self.dtype})")
