"""Noise-aware (process) rewards on a generator's noisy latents: ``(x_t, sigma, prompt) -> (B,)``.

Used by reward-gradient guidance (Flow-NRG, Euphonium's latent process reward) and by noise-aware search: they
score partially denoised states directly, with no VAE decoding.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from flowalign.rewards.base import Reward, check_scores, register


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
        return latents, self.broadcast_prompts(prompts, latents.shape[0], "latents")

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


# ----------------------------------------------------------------------------------------------
# Trainable latent reward models: a standalone network and a head on the generator's first blocks
# ----------------------------------------------------------------------------------------------
#
# Both are distilled from a pixel reward by flowalign.trainers.reward_model (``flowalign train
# configs/reward/shapes-clip-latent.yaml``). They predict the *standardised* pixel reward ``z`` and return
# ``mean + std * z``, so their scores are in the pixel reward's units; ``predict`` gives ``z`` itself.
# Saved as ``latent_reward.safetensors`` (weights; the config is also in its metadata) plus a readable
# ``latent_reward.json``; load with ``flowalign.rewards.load("latent", path=..., model=...)`` or
# ``TrainableLatentReward.from_pretrained(path, model)``.

WEIGHTS_NAME = "latent_reward.safetensors"
CONFIG_NAME = "latent_reward.json"
FORMAT_VERSION = 1


def sigma_embedding(sigma: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``(B, dim)`` of the noise level, on the transformer's timestep scale ``1000 * sigma``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=sigma.dtype, device=sigma.device) / half)
    args = (1000.0 * sigma)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.nn.functional.pad(emb, (0, dim - 2 * half))


def text_encoder_from_model(model):
    """``prompts -> (B, D)`` pooled text features from a FlowModel's own text encoders (no CFG branch).

    SD3/FLUX: the ``pooled_projections`` the transformer receives; Wan (no pooled embedding): the mean over
    the sequence of ``encoder_hidden_states``. Runs without gradients; the result is float32.
    """

    def encode(prompts: list[str]) -> torch.Tensor:
        cond = model.encode(list(prompts), guidance_scale=1.0).cond
        feats = cond.get("pooled_projections")
        if feats is None:
            feats = cond["encoder_hidden_states"].float().mean(1)
        return feats.detach().float()

    return encode


def _as_sigma(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigma.to(device=like.device, dtype=like.dtype if like.is_floating_point() else torch.float32)


class TrainableLatentReward(LatentReward):
    """Shared machinery of the trainable latent rewards: standardisation, text caching, save and load.

    Subclasses implement ``encode_text(prompts) -> {name: (B, ...)}`` (what the model needs from the prompts,
    computed once per prompt and cacheable) and ``predict(latents, sigma, text) -> (B,)``, the standardised
    score. ``score`` composes them and maps back to the pixel reward's units with the stored mean and std.
    """

    arch: str = ""

    def __init__(self, name: str = "latent", mean: float = 0.0, std: float = 1.0, base_model: str | None = None,
                 source_reward: str | None = None, extra: dict | None = None):
        super().__init__()
        if not std > 0:
            raise ValueError(f"std must be > 0 (the pixel reward's standard deviation), got {std}.")
        self.name = name
        self.mean, self.std = float(mean), float(std)
        self.base_model, self.source_reward = base_model, source_reward
        self.extra = dict(extra or {})  # free-form provenance (training metrics, config) saved with the weights

    # -- to implement
    # (abstract: LatentRewardNet and BackboneLatentReward implement these three)
    def encode_text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must implement encode_text(prompts) -> dict of tensors.")

    def predict(self, latents: torch.Tensor, sigma: torch.Tensor, text: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement predict(latents, sigma, text) -> (B,).")

    def arch_config(self) -> dict:
        raise NotImplementedError(f"{type(self).__name__} must implement arch_config() -> its constructor keywords.")

    # -- shared
    def score(self, latents, sigma, prompts):
        z = self.predict(latents, _as_sigma(sigma, latents), self.encode_text(prompts))
        return self.mean + self.std * z

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def config(self) -> dict:
        return {"format": FORMAT_VERSION, "arch": self.arch, "name": self.name, "mean": self.mean, "std": self.std,
                "base_model": self.base_model, "source_reward": self.source_reward, **self.arch_config(),
                "extra": self.extra}

    def save(self, path) -> str:
        """Write ``latent_reward.safetensors`` and ``latent_reward.json`` into the folder ``path``.

        Each file is written beside its target and renamed into place, so an interrupted save never leaves a
        half-written model. The safetensors metadata carries the config too (the JSON is for people).
        """
        from safetensors.torch import save_file

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        cfg = json.dumps(self.config(), indent=2)
        state = {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
        tmp = folder / (WEIGHTS_NAME + ".tmp")
        save_file(state, str(tmp), metadata={"flowalign": cfg})
        os.replace(tmp, folder / WEIGHTS_NAME)
        tmp = folder / (CONFIG_NAME + ".tmp")
        tmp.write_text(cfg)
        os.replace(tmp, folder / CONFIG_NAME)
        return str(folder)

    @staticmethod
    def read(path) -> tuple[dict, dict[str, torch.Tensor]]:
        """(config, state dict) of a saved latent reward: a folder or its ``.safetensors`` file."""
        from safetensors import safe_open

        f = os.path.join(path, WEIGHTS_NAME) if os.path.isdir(path) else str(path)
        if not os.path.isfile(f):
            raise FileNotFoundError(f"No latent reward at {str(path)!r}: expected a folder holding {WEIGHTS_NAME} "
                                    "(written by `flowalign train configs/reward/...yaml`) or the file itself.")
        with safe_open(f, framework="pt") as fh:
            meta = fh.metadata() or {}
            state = {k: fh.get_tensor(k) for k in fh.keys()}
        if "flowalign" not in meta:
            raise ValueError(f"{f} has no flowalign latent reward config in its metadata; was it saved by "
                             "TrainableLatentReward.save?")
        return json.loads(meta["flowalign"]), state

    @classmethod
    def from_pretrained(cls, path, model=None, text_encoder=None, device=None) -> TrainableLatentReward:
        """Load a saved latent reward of either architecture.

        Args:
            path: the run folder (or its ``latent_reward.safetensors``).
            model: the generator (FlowModel or name) — needed by ``BackboneLatentReward`` and, for the prompt
                features, by a prompt-conditioned ``LatentRewardNet``; default: the saved ``base_model``.
            text_encoder: ``prompts -> (B, D)`` for a ``LatentRewardNet``, instead of the model's encoder.
        """
        cfg, state = cls.read(path)
        archs = {"net": LatentRewardNet, "backbone": BackboneLatentReward}
        if cfg.get("arch") not in archs:
            raise ValueError(f"Unknown latent reward arch {cfg.get('arch')!r} in {path}; expected one of "
                             f"{list(archs)}.")
        target = archs[cfg["arch"]]
        if cls is not TrainableLatentReward and not issubclass(target, cls):
            raise TypeError(f"{path} holds a {target.__name__} (arch {cfg['arch']!r}), not a {cls.__name__}; load "
                            "it with TrainableLatentReward.from_pretrained.")
        needs_model = target is BackboneLatentReward or (cfg.get("text_dim", 0) and text_encoder is None)
        if needs_model and model is None:
            if not cfg.get("base_model"):
                raise ValueError(f"The latent reward at {path} needs its generator: pass model=...")
            model = cfg["base_model"]
        if model is not None:
            from flowalign.models import load_model

            model = load_model(model, device=device) if isinstance(model, str) else model
        reward = target.from_config(cfg, model=model, text_encoder=text_encoder)
        missing, unexpected = reward.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"The weights at {path} do not fit a {target.__name__} built from its config: missing "
                             f"{missing}, unexpected {unexpected}.")
        return reward.to(device or (model.device if model is not None else "cpu"))


def load_latent_reward(path=None, model=None, text_encoder=None, device=None) -> TrainableLatentReward:
    """``flowalign.rewards.load("latent", path=RUN_DIR, model=model)``: a trained latent reward model."""
    if path is None:
        raise ValueError("The 'latent' reward is a trained latent reward model: load it with "
                         "flowalign.rewards.load('latent', path='runs/<run>', model=model).")
    return TrainableLatentReward.from_pretrained(path, model=model, text_encoder=text_encoder, device=device)


register("latent")(load_latent_reward)


class _FiLMResBlock(torch.nn.Module):
    """GroupNorm -> FiLM(cond) -> SiLU -> conv3x3, residual (the conditioning of DDPM / ADM ResBlocks)."""

    def __init__(self, width: int, emb_dim: int):
        super().__init__()
        self.norm = torch.nn.GroupNorm(_groups(width), width)
        self.film = torch.nn.Linear(emb_dim, 2 * width)
        self.conv = torch.nn.Conv2d(width, width, 3, padding=1)
        torch.nn.init.zeros_(self.film.weight)
        torch.nn.init.zeros_(self.film.bias)

    def forward(self, h, emb):
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        return h + self.conv(torch.nn.functional.silu(self.norm(h) * (1 + scale) + shift))


def _groups(width: int) -> int:
    return next(g for g in (8, 4, 2, 1) if width % g == 0)


class LatentRewardNet(TrainableLatentReward):
    """(b) A small standalone noise-aware reward network on latents ``x_t`` (Flow-NRG's noisy RM, standalone).

    Conv trunk of ``depth`` FiLM residual blocks (halving the resolution after each while it is above 4),
    global average pooling, and an MLP head. The conditioning ``emb = MLP(sinusoid(sigma)) + Linear(text)``
    modulates every block, so the prompt interacts with the image features. Video latents
    ``(B, C, f, h, w)`` are folded into frames and pooled over frames too (one score per video).

    Args:
        in_channels: latent channels of the generator (``model.transformer.config.in_channels``).
        text_dim: size of the prompt features, 0 for a prompt-free reward.
        text_encoder: ``prompts -> (B, text_dim)``, e.g. :func:`text_encoder_from_model`; required iff
            ``text_dim > 0``. Prompt features are cached (up to 4096 prompts).
    """

    arch = "net"

    def __init__(self, in_channels: int, text_dim: int = 0, width: int = 64, depth: int = 3, emb_dim: int = 128,
                 text_encoder=None, **kwargs):
        super().__init__(**kwargs)
        if text_dim and text_encoder is None:
            raise ValueError("LatentRewardNet with text_dim > 0 needs text_encoder=prompts -> (B, text_dim), e.g. "
                             "flowalign.rewards.latent.text_encoder_from_model(model).")
        self.in_channels, self.text_dim, self.width, self.depth, self.emb_dim = (
            int(in_channels), int(text_dim), int(width), int(depth), int(emb_dim))
        self.uses_prompts = self.text_dim > 0
        self.text_encoder = text_encoder
        self._text_cache: dict[str, torch.Tensor] = {}
        self.sigma_mlp = torch.nn.Sequential(torch.nn.Linear(emb_dim, emb_dim), torch.nn.SiLU(),
                                             torch.nn.Linear(emb_dim, emb_dim))
        self.text_proj = torch.nn.Linear(text_dim, emb_dim) if text_dim else None
        self.stem = torch.nn.Conv2d(in_channels, width, 3, padding=1)
        self.blocks = torch.nn.ModuleList(_FiLMResBlock(width, emb_dim) for _ in range(depth))
        self.out_norm = torch.nn.GroupNorm(_groups(width), width)
        self.head = torch.nn.Sequential(torch.nn.Linear(width + emb_dim, emb_dim), torch.nn.SiLU(),
                                        torch.nn.Linear(emb_dim, 1))

    def arch_config(self) -> dict:
        return {"in_channels": self.in_channels, "text_dim": self.text_dim, "width": self.width, "depth": self.depth,
                "emb_dim": self.emb_dim}

    @classmethod
    def from_config(cls, cfg: dict, model=None, text_encoder=None) -> LatentRewardNet:
        if cfg.get("text_dim", 0) and text_encoder is None:
            text_encoder = text_encoder_from_model(model)
        keys = ("in_channels", "text_dim", "width", "depth", "emb_dim", "name", "mean", "std", "base_model",
                "source_reward", "extra")
        return cls(**{k: cfg[k] for k in keys if k in cfg}, text_encoder=text_encoder)

    def encode_text(self, prompts):
        if not self.text_dim:
            return {}
        new = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if new:
            with torch.no_grad():
                feats = torch.as_tensor(self.text_encoder(new)).float()
            if tuple(feats.shape) != (len(new), self.text_dim):
                raise ValueError(f"{self.name}: text_encoder returned shape {tuple(feats.shape)} for {len(new)} "
                                 f"prompts; this reward was built for (B, {self.text_dim}) prompt features.")
            if len(self._text_cache) + len(new) > 4096:
                self._text_cache.clear()
            self._text_cache.update({p: f.cpu() for p, f in zip(new, feats)})
        return {"text": torch.stack([self._text_cache[p] for p in prompts])}

    def predict(self, latents, sigma, text):
        b = latents.shape[0]
        frames = 1
        if latents.ndim == 5:  # video (B, C, f, h, w): every frame through the trunk, pooled over frames
            frames = latents.shape[2]
            latents = latents.transpose(1, 2).reshape(b * frames, *latents.shape[1:2], *latents.shape[3:])
        if latents.ndim != 4 or latents.shape[1] != self.in_channels:
            raise ValueError(f"{self.name}: expected latents (B, {self.in_channels}, h, w) or (B, {self.in_channels}, "
                             f"f, h, w), got {tuple(latents.shape)}.")
        dtype = self.stem.weight.dtype
        emb = self.sigma_mlp(sigma_embedding(sigma.to(dtype), self.emb_dim))
        if self.text_proj is not None:
            emb = emb + self.text_proj(text["text"].to(device=latents.device, dtype=dtype))
        emb_f = emb.repeat_interleave(frames, dim=0) if frames > 1 else emb
        h = self.stem(latents.to(dtype))
        for block in self.blocks:
            h = block(h, emb_f)
            if min(h.shape[-2:]) > 4:
                h = torch.nn.functional.avg_pool2d(h, 2)
        h = torch.nn.functional.silu(self.out_norm(h)).mean((-2, -1))
        h = h.reshape(b, frames, -1).mean(1)
        return self.head(torch.cat([h, emb], dim=-1)).squeeze(-1)


class _AttentionPoolHead(torch.nn.Module):
    """Multi-head attention pooling of tokens by a learned, timestep-conditioned query, then an MLP (PAVRM-style)."""

    def __init__(self, dim: int, temb_dim: int, hidden: int = 128, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.hidden = hidden - hidden % heads
        self.norm = torch.nn.LayerNorm(dim)
        self.query = torch.nn.Parameter(torch.randn(self.hidden) * 0.02)
        self.q_cond = torch.nn.Linear(temb_dim, self.hidden)
        self.kv = torch.nn.Linear(dim, 2 * self.hidden)
        self.temb_proj = torch.nn.Linear(temb_dim, self.hidden)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(2 * self.hidden, self.hidden), torch.nn.SiLU(),
                                       torch.nn.Linear(self.hidden, 1))

    def forward(self, tokens, temb):
        b, n, _ = tokens.shape
        d = self.hidden // self.heads
        k, v = self.kv(self.norm(tokens)).view(b, n, 2, self.heads, d).unbind(2)
        q = (self.query + self.q_cond(temb)).view(b, self.heads, d)
        attn = torch.einsum("bhd,bnhd->bhn", q, k).mul(d ** -0.5).softmax(-1)
        pooled = torch.einsum("bhn,bnhd->bhd", attn, v).reshape(b, self.hidden)
        return self.mlp(torch.cat([pooled, self.temb_proj(temb)], dim=-1)).squeeze(-1)


class BackboneLatentReward(TrainableLatentReward):
    """(a) A trainable head on the first ``num_blocks`` blocks of the frozen generator (PRFL / PAVRM, VideoAlign).

    Runs the SD3 MMDiT exactly as ``SD3Transformer2DModel.forward`` does up to block ``num_blocks`` (patch +
    position embedding, timestep + pooled text embedding, context embedder, joint blocks) and pools the image
    tokens with :class:`_AttentionPoolHead`, conditioned on the transformer's own timestep embedding. The
    generator is not a submodule: ``state_dict``/``save`` hold only the head, and the generator's parameters are
    never trained here. An attached LoRA is switched off for the backbone pass (``base_weights=True``), so the
    reward stays the one it was trained as while the generator is fine-tuned.

    Gradients reach the backbone only when the latents require grad (guidance); training the head alone runs the
    backbone without a graph.
    """

    arch = "backbone"

    def __init__(self, model, num_blocks: int = 2, hidden: int = 128, heads: int = 4, base_weights: bool = True,
                 **kwargs):
        if getattr(model, "family", None) != "sd3":
            raise NotImplementedError(
                f"BackboneLatentReward supports SD3 generators only (got family {getattr(model, 'family', None)!r}); "
                "use LatentRewardNet (arch='net'), which works for every family.")
        super().__init__(**kwargs)
        tr = model.transformer
        n_layers = len(tr.transformer_blocks)
        if not 1 <= num_blocks <= n_layers:
            raise ValueError(f"num_blocks must be in [1, {n_layers}] for this transformer, got {num_blocks}.")
        object.__setattr__(self, "model", model)  # not a submodule: never saved, moved or trained with the head
        self.num_blocks, self.hidden, self.heads = int(num_blocks), int(hidden), int(heads)
        self.base_weights = bool(base_weights)
        self.token_dim = tr.config.num_attention_heads * tr.config.attention_head_dim
        self.head = _AttentionPoolHead(self.token_dim, self.token_dim, hidden=hidden, heads=heads)
        self._text_cache: dict[str, dict[str, torch.Tensor]] = {}

    def arch_config(self) -> dict:
        return {"num_blocks": self.num_blocks, "hidden": self.hidden, "heads": self.heads, "token_dim": self.token_dim,
                "base_weights": self.base_weights}

    @classmethod
    def from_config(cls, cfg: dict, model=None, text_encoder=None) -> BackboneLatentReward:
        if model is None:
            raise ValueError("BackboneLatentReward needs its generator: pass model=...")
        keys = ("num_blocks", "hidden", "heads", "base_weights", "name", "mean", "std", "base_model",
                "source_reward", "extra")
        reward = cls(model, **{k: cfg[k] for k in keys if k in cfg})
        if reward.token_dim != cfg.get("token_dim", reward.token_dim):
            raise ValueError(f"This latent reward was trained on a transformer of width {cfg['token_dim']} "
                             f"({cfg.get('base_model')}); the given model's width is {reward.token_dim}.")
        return reward

    def encode_text(self, prompts):
        new = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if new:
            cond = self.model.encode(new, guidance_scale=1.0).cond
            if len(self._text_cache) + len(new) > 1024:
                self._text_cache.clear()
            for i, p in enumerate(new):
                self._text_cache[p] = {k: v[i].detach() for k, v in cond.items()}
        return {k: torch.stack([self._text_cache[p][k] for p in prompts]) for k in ("encoder_hidden_states",
                                                                                    "pooled_projections")}

    def features(self, latents, sigma, text) -> tuple[torch.Tensor, torch.Tensor]:
        """Image tokens after the first ``num_blocks`` blocks ``(B, N, D)`` and the timestep embedding ``(B, D)``."""
        model, tr = self.model, self.model.transformer
        if latents.ndim != 4:
            raise ValueError(f"{self.name}: expected image latents (B, C, h, w), got {tuple(latents.shape)}.")
        dtype = model.dtype
        with _adapters_off(tr, self.base_weights):
            h = tr.pos_embed(latents.to(dtype)).contiguous()
            t = (sigma.to(torch.float32) * model.scheduler.config.num_train_timesteps).to(latents.device)
            temb = tr.time_text_embed(t, text["pooled_projections"].to(latents.device, dtype))
            enc = tr.context_embedder(text["encoder_hidden_states"].to(latents.device, dtype))
            for block in tr.transformer_blocks[:self.num_blocks]:
                enc, h = block(hidden_states=h, encoder_hidden_states=enc, temb=temb)
        return h, temb

    def predict(self, latents, sigma, text):
        grad = torch.is_grad_enabled() and latents.requires_grad
        with torch.set_grad_enabled(grad):
            h, temb = self.features(latents, sigma, text)
        dtype = self.head.kv.weight.dtype
        return self.head(h.to(dtype), temb.to(dtype))


class _adapters_off:
    """Switch off the LoRA layers of ``module`` that are on, and restore exactly those afterwards."""

    def __init__(self, module, active: bool = True):
        self.module, self.active, self.layers = module, active, []

    def __enter__(self):
        if self.active and getattr(self.module, "peft_config", None):
            from peft.tuners.tuners_utils import BaseTunerLayer

            self.layers = [m for m in self.module.modules() if isinstance(m, BaseTunerLayer) and not m.disable_adapters]
            for m in self.layers:  # the flag the LoRA forward reads; enable_adapters() would also flip requires_grad
                m._disable_adapters = True
        return self

    def __exit__(self, *exc):
        for m in self.layers:
            m._disable_adapters = False
        self.layers = []
        return False
