"""Discriminators for the adversarial terms of DMD2 (diffusion-GAN) and Flash-DMD (low-noise GAN), and the pool of
"real" samples they compare the student against.

Two kinds, both a frozen feature extractor with small trainable heads (so only the heads are trained and saved):

- ``critic`` (DMD2, ``cls_pred_branch``): features of the critic (the fake-score transformer) at its middle block,
  on inputs noised to a random level (the diffusion-GAN), in latent space; works for every model family. The
  critic's weights are constants here: the discriminator loss trains the heads, and the generator's adversarial
  gradient flows through the critic into the student's sample.
- ``clip`` (Flash-DMD's pixel-space discriminator: a frozen SAM image encoder with multi-level heads; here a frozen
  CLIP vision tower, by default the shapes world's, whose hidden states at a few evenly spaced layers feed one head
  each) on decoded images.

A head maps every token (``(B, N, D)``, or ``(B, D)`` for toy2d) to a logit and averages them (a patch-wise
discriminator). Real samples come from the teacher (its CFG samples: the distribution the student should match),
or from ground-truth renders on the shapes world (DMD2 uses real images, which lets a student surpass its teacher).
"""

from __future__ import annotations

import torch
from torch import nn

from flowalign.config import ConfigError
from flowalign.functional.flow import interpolate

DISCRIMINATORS = ("critic", "clip")
REAL_SOURCES = ("teacher", "renders")


class TokenHead(nn.Module):
    """``LayerNorm -> Linear -> SiLU -> Linear`` on every token, averaged to one logit per sample."""

    def __init__(self, dim: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = self.net(tokens.float()).squeeze(-1)
        return logits.flatten(1).mean(1) if logits.ndim > 1 else logits


def _blocks(module: nn.Module) -> nn.ModuleList:
    """The transformer's block list (SD3/FLUX ``transformer_blocks``, Wan and toy2d ``blocks``)."""
    for name in ("transformer_blocks", "blocks", "layers"):
        blocks = getattr(module, name, None)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return blocks
    raise ConfigError(f"disc=critic needs a transformer with a block list; {type(module).__name__} has none. "
                      "Use disc=clip (pixel space) instead.")


class CriticDiscriminator(nn.Module):
    """DMD2's diffusion-GAN: a head on the critic's middle-block features of ``x`` noised to a random level."""

    space = "latent"

    def __init__(self, critic: nn.Module, hidden: int = 256):
        super().__init__()
        self.critic = [critic]  # not a submodule: its weights belong to the critic's optimizer
        blocks = _blocks(critic)
        self.block = [blocks[len(blocks) // 2]]  # a plain list: the block stays the critic's
        self.head: TokenHead | None = None
        self.hidden = hidden
        self._features = None

    def _hook(self, module, args, output):
        # SD3/FLUX blocks return (encoder_hidden_states, hidden_states): the image tokens are the last tensor
        out = output
        if isinstance(output, (tuple, list)):
            out = [o for o in output if isinstance(o, torch.Tensor)][-1]
        self._features = out

    def build(self, model, sample: torch.Tensor, cond) -> None:
        """Create the head once the feature width is known (one forward of the critic)."""
        with torch.no_grad():
            feats = self.features(model, sample[:1], torch.full((1,), 0.5, device=sample.device), cond.index([0]))
        self.head = TokenHead(feats.shape[-1], self.hidden).to(sample.device)

    def features(self, model, x: torch.Tensor, sigma: torch.Tensor, cond) -> torch.Tensor:
        handle = self.block[0].register_forward_hook(self._hook)
        previous = getattr(model, "_denoiser", None)
        model.use_denoiser(self.critic[0])
        try:
            model.velocity(x, sigma, cond, 1.0)
        finally:
            model.use_denoiser(previous)
            handle.remove()
        feats, self._features = self._features, None
        return feats

    def forward(self, model, x: torch.Tensor, cond, generator: torch.Generator) -> torch.Tensor:
        sigma = torch.rand(len(x), generator=generator).clamp(0.02, 0.98).to(x.device)
        eps = torch.randn(x.shape, generator=generator).to(x)
        return self.head(self.features(model, interpolate(x, eps, sigma), sigma, cond))


class ClipDiscriminator(nn.Module):
    """Flash-DMD's pixel discriminator: a frozen CLIP vision tower with a head on each of a few hidden layers."""

    space = "pixel"

    def __init__(self, backbone, num_heads: int = 3, hidden: int = 256):
        super().__init__()
        self.backbone = backbone.requires_grad_(False)
        if not getattr(backbone, "is_hf", False):
            raise ConfigError("disc=clip needs a transformers CLIP reward (e.g. disc_backbone=shapes-clip).")
        vision = backbone.model.config.vision_config
        n = vision.num_hidden_layers
        self.layers = sorted({max(1, round(n * (i + 1) / num_heads)) for i in range(num_heads)})
        self.heads = nn.ModuleList(TokenHead(vision.hidden_size, hidden) for _ in self.layers)
        self.head = self.heads

    def build(self, model, sample, cond) -> None:
        self.heads.to(sample.device)

    def forward(self, model, x: torch.Tensor, cond, generator: torch.Generator) -> torch.Tensor:
        from flowalign.rewards.preprocess import resize_and_normalize

        bb = self.backbone
        pixels = resize_and_normalize(model.decode(x), bb.size, bb.mean, bb.std, fit=bb.fit)
        out = bb.model.vision_model(pixel_values=pixels.to(bb._param), output_hidden_states=True)
        return sum(head(out.hidden_states[i]) for head, i in zip(self.heads, self.layers))


def build_discriminator(kind: str, critic: nn.Module, backbone_reward: str, hidden: int = 256) -> nn.Module:
    if kind == "critic":
        return CriticDiscriminator(critic, hidden)
    if kind == "clip":
        import flowalign as fa

        reward = fa.rewards.load(backbone_reward)
        backbone = getattr(reward, "backbone", None)
        if backbone is None:
            raise ConfigError(f"disc_backbone={backbone_reward!r} is not a CLIP reward; use e.g. shapes-clip or clip.")
        return ClipDiscriminator(backbone, hidden=hidden)
    raise ConfigError(f"Unknown discriminator {kind!r}; choose one of {DISCRIMINATORS}.")


def real_pool(run, source: str, size: int, guidance_scale: float, num_steps: int, seed: int
              ) -> tuple[torch.Tensor, list[str]]:
    """``size`` real latents and their prompts: the teacher's CFG samples in ``num_steps`` ODE steps, or (shapes
    world only) ground-truth renders of the training captions encoded by the VAE (its posterior mode)."""
    gen = torch.Generator().manual_seed(seed)
    prompts = [run.prompts[i] for i in torch.randint(len(run.prompts), (size,), generator=gen).tolist()]
    model = run.model
    if source == "teacher":
        import flowalign as fa

        parts = []
        with torch.no_grad(), run.reference(), run.autocast():
            for i in range(0, size, 64):
                parts.append(fa.sample(model, prompts[i:i + 64], num_steps=num_steps, guidance_scale=guidance_scale,
                                       sampler="ode",
                                       generator=gen, decode=False, **run.size()).latents[:, -1].float())
        return torch.cat(parts), prompts
    if source == "renders":
        import numpy as np

        from flowalign.zoo import shapes_data

        specs = {s.caption(): s for s in shapes_data.all_specs()}
        missing = [p for p in prompts if p not in specs]
        if missing:
            raise ConfigError(f"gan_real=renders needs shapes-world captions; {missing[0]!r} is not one. Use "
                              "gan_real=teacher.")
        rng = np.random.default_rng(seed)
        size_px, _, _ = model.resolve_size(run.cfg.height, run.cfg.width, None)
        images = np.stack([shapes_data.render(specs[p], size_px, rng) for p in prompts])
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255).to(model.device)
        with torch.no_grad():
            # the posterior mode, as the model was trained on: a posterior sample adds noise the teacher's samples
            # lack (on shapes-sd3 it raises the flow-matching error at sigma 0.1 thirty-fold)
            latents = torch.cat([model.encode_images(pixels[i:i + 64]) for i in range(0, size, 64)])
        return latents.float(), prompts
    raise ConfigError(f"Unknown gan_real {source!r}; choose one of {REAL_SOURCES}.")
