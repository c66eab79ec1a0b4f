"""Reproduce the bundled worlds from fixed seeds: ``flowalign zoo build [--only NAME]``.

toy2d (see :mod:`flowalign.zoo.toy2d`, about 2 minutes), then the shapes world in three stages:

1. ``shapes-clip``: a tiny transformers ``CLIPModel`` trained contrastively (symmetric InfoNCE) on renders and
   captions, with the same pixel preprocessing as the CLIP rewards.
2. a tiny ``AutoencoderKL`` (32x32x3 -> 16x16x4), MSE + a small KL; latents scaled to unit variance.
3. ``shapes-sd3``: a tiny ``SD3Transformer2DModel`` (patch 2 on 16x16 latents, 64 tokens) trained by rectified-flow
   matching with logit-normal timesteps (Esser et al. 2024), 10% caption dropout for CFG and an EMA, with
   shapes-clip's frozen text tower as both CLIP text encoders; saved as a ``StableDiffusion3Pipeline`` folder.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from flowalign.zoo import WEIGHTS
from flowalign.zoo import shapes_data as sd

TEXT_LEN = 16  # CLIP tokens: the longest caption is 12 with BOS/EOS


@dataclass
class BuildConfig:
    seed: int = 0
    size: int = 32
    n_train_images: int = 40000
    clip_steps: int = 1000
    clip_batch: int = 128
    clip_lr: float = 1e-3
    vae_steps: int = 600
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_kl: float = 1e-6
    vae_stages: int = 2  # 2x down per stage after the first: 16x16 latents at 32 px
    vae_channels: int = 4
    # Many small steps at a high lr: on 2 cores, batch 16 at lr 2e-3 reaches a lower held-out flow-matching loss
    # per CPU-second than batch 32/64 at lr 5e-4..4e-3 (benchmarks/README.md, "shapes-sd3 recipe"). 32,000 steps
    # (v3) give held-out verifier accuracy 0.47; 11,000 (v2) gave 0.16.
    sd3_steps: int = 32000
    sd3_batch: int = 16
    sd3_lr: float = 2e-3
    sd3_patch: int = 2
    sd3_width: int = 128
    sd3_layers: int = 4
    eval_every: int = 4000  # verifier accuracy of the EMA on held-out prompts during training (0: off)
    eval_per_category: int = 12
    sd3_ema: float = 0.995
    caption_dropout: float = 0.1
    guidance_scale: float = 4.0
    threads: int = 2
    toy2d_steps: int = 4000
    retrieval_n: int = 50  # held-out images per category for the CLIP retrieval report


# ----------------------------------------------------------------------------- shared pieces
def tokenizer():
    from flowalign.models.tiny import clip_tokenizer

    return clip_tokenizer(model_max_length=TEXT_LEN)


def clip_config():
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    from flowalign.models.tiny import clip_vocab_size

    v = clip_vocab_size()
    text = CLIPTextConfig(vocab_size=v, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                          num_attention_heads=4, max_position_embeddings=TEXT_LEN, projection_dim=64,
                          bos_token_id=v - 2, eos_token_id=v - 1, pad_token_id=v - 1)
    vision = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=64, intermediate_size=256,
                              num_hidden_layers=3, num_attention_heads=4, projection_dim=64)
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=64)


def _ema(target: torch.nn.Module, source: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        torch._foreach_lerp_(list(target.parameters()), list(source.parameters()), 1 - decay)


def _cosine_lr(step: int, total: int, warmup: int = 100) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# ----------------------------------------------------------------------------- stage 1: CLIP
def train_clip(cfg: BuildConfig, images: torch.Tensor, captions: list[str], out: Path) -> dict:
    from transformers import CLIPImageProcessor, CLIPModel

    from flowalign.rewards.preprocess import CLIP_MEAN, CLIP_STD, resize_and_normalize

    torch.manual_seed(cfg.seed)
    tok = tokenizer()
    model = CLIPModel(clip_config())
    uniq = sorted(set(captions))
    index = {c: i for i, c in enumerate(uniq)}
    ids = tok(uniq, padding="max_length", max_length=TEXT_LEN, truncation=True, return_tensors="pt")
    cap_idx = torch.tensor([index[c] for c in captions])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.clip_lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, cfg.clip_steps))
    g = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(range(cfg.clip_steps), desc="shapes-clip", leave=False)
    for _ in bar:
        b = torch.randint(len(images), (cfg.clip_batch,), generator=g)
        # in-batch duplicates of a caption are positives for each other, not negatives
        c = cap_idx[b]
        pix = resize_and_normalize(images[b], 32, CLIP_MEAN, CLIP_STD)
        img = F.normalize(model.get_image_features(pixel_values=pix).pooler_output, dim=-1)
        txt = F.normalize(model.get_text_features(input_ids=ids["input_ids"][c],
                                                  attention_mask=ids["attention_mask"][c]).pooler_output, dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T
        same = (c[:, None] == c[None, :]).float()
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (-(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.log_softmax(0)).sum(0).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=list(CLIP_MEAN),
                       image_std=list(CLIP_STD)).save_pretrained(out)
    return {"final_loss": loss.item()}


@torch.no_grad()
def clip_retrieval_accuracy(model_dir: str | Path, split: str = "test", n_per_category: int = 50, seed: int = 123):
    """Top-1 image->caption retrieval among every caption of the split's category (hard negatives)."""
    from transformers import CLIPModel, CLIPTokenizer

    from flowalign.rewards.clip import ClipBackbone

    bb = ClipBackbone.build(model=CLIPModel.from_pretrained(model_dir), tokenizer=CLIPTokenizer.from_pretrained(
        model_dir), processor_path=str(model_dir))
    rng = torch.Generator().manual_seed(seed)
    result = {}
    import numpy as np

    for cat in sd.CATEGORIES:
        pool = sd.specs_for(split, cat)
        caps = [s.caption() for s in pool]
        txt = bb.embed_texts(caps)
        pick = torch.randint(len(pool), (n_per_category,), generator=rng).tolist()
        r = np.random.default_rng(seed)
        imgs = torch.from_numpy(np.stack([sd.render(pool[i], 32, r) for i in pick])).permute(0, 3, 1, 2) / 255
        pred = (bb.embed_images(imgs.float()) @ txt.T).argmax(1)
        result[cat] = (pred == torch.tensor(pick)).float().mean().item()
        result[f"{cat}_chance"] = 1 / len(pool)
    return result


# ----------------------------------------------------------------------------- stage 2: VAE
def shapes_vae(size: int = 32, stages: int = 2, latent_channels: int = 4):
    """shapes-sd3's VAE, freshly initialised: ``stages`` resolution levels (2: 2x down, 16x16x4 latents at 32 px)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32,) + (64,) * (stages - 1),
                         layers_per_block=1, latent_channels=latent_channels, norm_num_groups=16,
                         down_block_types=("DownEncoderBlock2D",) * stages,
                         up_block_types=("UpDecoderBlock2D",) * stages,
                         use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False,
                         sample_size=size)


def train_vae(cfg: BuildConfig, images: torch.Tensor):
    torch.manual_seed(cfg.seed)
    vae = shapes_vae(cfg.size, cfg.vae_stages, cfg.vae_channels)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, cfg.vae_steps))
    g = torch.Generator().manual_seed(cfg.seed + 1)
    bar = tqdm(range(cfg.vae_steps), desc="vae", leave=False)
    for _ in bar:
        x = images[torch.randint(len(images), (cfg.vae_batch,), generator=g)] * 2 - 1
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=None)).sample
        loss = F.mse_loss(rec, x) + cfg.vae_kl * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(mse=f"{F.mse_loss(rec, x).item():.4f}")
    vae.eval()
    with torch.no_grad():
        n = min(len(images), 4096)
        z = torch.cat([vae.encode(images[i:i + 512] * 2 - 1).latent_dist.mode() for i in range(0, n, 512)])
    shift, scale = z.mean().item(), 1 / z.std().item()
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    return vae, {"final_mse": F.mse_loss(rec, x).item(), "shift_factor": shift, "scaling_factor": scale,
                 "recon_verifier_test": reconstruction_accuracy(vae, cfg.size)}


@torch.no_grad()
def reconstruction_accuracy(vae, size: int, n: int = 200, seed: int = 7) -> float:
    """Verifier accuracy on held-out renders after an encode/decode round trip: the ceiling the VAE sets."""
    from flowalign.rewards.shapes import ShapesVerifier

    images, captions, _ = sd.dataset(n, "test", seed=seed, size=size)
    rec = vae.decode(vae.encode(images * 2 - 1).latent_dist.mode()).sample
    return ShapesVerifier()((rec / 2 + 0.5).clamp(0, 1), captions).mean().item()


# ----------------------------------------------------------------------------- stage 3: SD3 transformer
def text_encoder_from_clip(clip_dir: Path):
    """shapes-clip's text tower (with its projection) as a ``CLIPTextModelWithProjection``."""
    from transformers import CLIPModel, CLIPTextModelWithProjection

    clip = CLIPModel.from_pretrained(clip_dir)
    te = CLIPTextModelWithProjection(clip.config.text_config)
    te.text_model.load_state_dict(clip.text_model.state_dict())
    te.text_projection.load_state_dict(clip.text_projection.state_dict())
    return te.eval()


def shapes_transformer(size: int = 32, patch: int = 2, width: int = 128, layers: int = 4, vae_factor: int = 2,
                       latent_channels: int = 4):
    """shapes-sd3's transformer, freshly initialised. The bundled one: patch 2 on the VAE's (size/2)^2 latents
    (64 tokens), 4 joint blocks of width 128 (heads of 32)."""
    from diffusers import SD3Transformer2DModel

    side = size // vae_factor
    return SD3Transformer2DModel(sample_size=side, patch_size=patch, in_channels=latent_channels, num_layers=layers,
                                 attention_head_dim=32, num_attention_heads=width // 32, joint_attention_dim=128,
                                 caption_projection_dim=width, pooled_projection_dim=128,
                                 out_channels=latent_channels, pos_embed_max_size=side // patch)


@torch.no_grad()
def encode_dataset(pipe, images: torch.Tensor, captions: list[str]):
    """Scaled VAE latents of ``images`` and every distinct caption's text embeddings (plus the empty prompt used
    for CFG), encoded once, exactly as the pipeline does: ``(latents, embeds, pooled, caption index, empty index)``."""
    uniq = sorted(set(captions)) + [""]
    embs, pooled = [], []
    for i in range(0, len(uniq), 256):
        e, _, p, _ = pipe.encode_prompt(uniq[i:i + 256], None, None, do_classifier_free_guidance=False,
                                        max_sequence_length=0)
        embs.append(e)
        pooled.append(p)
    vae = pipe.vae
    lat = torch.cat([vae.encode(images[i:i + 512] * 2 - 1).latent_dist.mode() for i in range(0, len(images), 512)])
    lat = (lat - vae.config.shift_factor) * vae.config.scaling_factor
    index = {c: i for i, c in enumerate(uniq)}
    return lat, torch.cat(embs), torch.cat(pooled), torch.tensor([index[c] for c in captions]), index[""]


def flow_matching_loss(transformer, lat, embs, pooled, cap_idx, empty: int, batch: int, caption_dropout: float,
                       g: torch.Generator, logit_mean: float = 0.0) -> torch.Tensor:
    """One rectified-flow batch: ``batch`` latents drawn from ``lat``, captions dropped to ``empty`` at
    ``caption_dropout``, logit-normal(``logit_mean``, 1) sigmas; the MSE of the predicted velocity against
    ``eps - x0``."""
    b = torch.randint(len(lat), (batch,), generator=g)
    x0 = lat[b]
    c = cap_idx[b].clone()
    c[torch.rand(len(b), generator=g) < caption_dropout] = empty
    eps = torch.randn(x0.shape, generator=g)
    sigma = torch.sigmoid(torch.randn(len(b), generator=g) + logit_mean)
    xt = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * eps
    v = transformer(hidden_states=xt, timestep=sigma * 1000, encoder_hidden_states=embs[c],
                    pooled_projections=pooled[c], return_dict=False)[0]
    return F.mse_loss(v, eps - x0)


def train_sd3(cfg: BuildConfig, images: torch.Tensor, captions: list[str], vae, clip_dir: Path, out: Path) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    te = text_encoder_from_clip(clip_dir)
    tok = tokenizer()
    torch.manual_seed(cfg.seed)
    transformer = shapes_transformer(cfg.size, cfg.sd3_patch, cfg.sd3_width, cfg.sd3_layers,
                                     vae_factor=2 ** (len(vae.config.block_out_channels) - 1),
                                     latent_channels=vae.config.latent_channels)
    pipe = StableDiffusion3Pipeline(transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(
        shift=1.0), text_encoder=te, tokenizer=tok, text_encoder_2=copy.deepcopy(te), tokenizer_2=tokenizer(),
        text_encoder_3=None, tokenizer_3=None)
    lat, embs, pooled, cap_idx, empty = encode_dataset(pipe, images, captions)
    ema = copy.deepcopy(transformer).requires_grad_(False)
    transformer.train()
    # fused AdamW: 1.23x the step rate on 2 cores (benchmarks/bench_sd3_step_speed.py)
    opt = torch.optim.AdamW(transformer.parameters(), lr=cfg.sd3_lr, weight_decay=0.0, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, cfg.sd3_steps, warmup=200))
    g = torch.Generator().manual_seed(cfg.seed + 2)
    bar = tqdm(range(cfg.sd3_steps), desc="shapes-sd3", leave=False)
    losses, curve = [], []
    for step in bar:
        loss = flow_matching_loss(transformer, lat, embs, pooled, cap_idx, empty, cfg.sd3_batch, cfg.caption_dropout, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        sched.step()
        _ema(ema, transformer, min(cfg.sd3_ema, (1 + step) / (10 + step)))
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}", acc=curve[-1]["overall"] if curve else "-")
        if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.sd3_steps):
            curve.append({"step": step + 1, **_verifier_accuracy(cfg, pipe, ema)})
            tqdm.write(f"shapes-sd3 step {step + 1}: {json.dumps(curve[-1])}")
    pipe.transformer = ema.eval()
    pipe.register_modules(transformer=ema)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    (out / "flowalign.json").write_text(json.dumps(_settings(cfg), indent=2))
    tail = losses[-50:]
    return {"final_loss_avg50": sum(tail) / len(tail), "params_transformer": sum(p.numel() for p in ema.parameters()),
            "verifier_curve": curve}


def _settings(cfg: BuildConfig) -> dict:
    return {"native_size": [cfg.size, cfg.size], "guidance_scale": cfg.guidance_scale, "max_sequence_length": 0}


def _verifier_accuracy(cfg: BuildConfig, pipe, ema) -> dict:
    """Held-out verifier accuracy of the EMA weights at 20 ODE steps (the number the issue targets)."""
    import flowalign as fa
    from flowalign.evaluation import evaluate, shapes_prompts
    from flowalign.rewards.shapes import ShapesVerifier

    training = pipe.transformer
    pipe.transformer = ema
    try:
        model = fa.load_model(pipe).configure(_settings(cfg))
        prompts, cats = shapes_prompts("test", cfg.eval_per_category, seed=cfg.seed)
        res = evaluate(model, ShapesVerifier(), prompts, cats, num_steps=20, batch_size=64, progress=False)
    finally:
        pipe.transformer = training
    return {k: round(v, 3) for k, v in res.items() if k not in ("n",)}


# ----------------------------------------------------------------------------- driver
ARTEFACTS = ("shapes-clip", "shapes-sd3", "toy2d")


def build(only: str | None = None, cfg: BuildConfig | None = None, out_root: Path = WEIGHTS) -> dict:
    """Build every bundled artefact, or ``only`` one of :data:`ARTEFACTS` (shapes-sd3 needs shapes-clip)."""
    cfg = cfg or BuildConfig()
    if only not in (None, *ARTEFACTS):
        raise ValueError(f"--only must be one of {', '.join(ARTEFACTS)}; got {only!r}.")
    torch.set_num_threads(cfg.threads)
    report: dict = {"config": asdict(cfg)}
    t0 = time.perf_counter()
    if only in (None, "toy2d"):
        from flowalign.zoo import toy2d

        t = time.perf_counter()
        model = toy2d.train_toy2d(steps=cfg.toy2d_steps, seed=cfg.seed)
        dest = out_root / "toy2d_model.safetensors" if out_root != WEIGHTS else Path(toy2d.WEIGHTS)
        dest.parent.mkdir(parents=True, exist_ok=True)
        toy2d.save_weights(model, str(dest))
        report["toy2d"] = {"seconds": time.perf_counter() - t, "path": str(dest)}
        if only == "toy2d":
            return report
    images, captions, _ = sd.dataset(cfg.n_train_images, "train", seed=cfg.seed, size=cfg.size)
    report["render_seconds"] = time.perf_counter() - t0
    clip_dir = out_root / "shapes-clip"
    if only in (None, "shapes-clip"):
        t = time.perf_counter()
        tmp = out_root / "shapes-clip.tmp"
        report["clip"] = train_clip(cfg, images, captions, tmp)
        _replace(tmp, clip_dir)
        report["clip"]["seconds"] = time.perf_counter() - t
        report["clip"]["retrieval_test"] = clip_retrieval_accuracy(clip_dir, n_per_category=cfg.retrieval_n)
        print("shapes-clip:", json.dumps(report["clip"]))
    if only in (None, "shapes-sd3"):
        if not (clip_dir / "config.json").exists():
            raise FileNotFoundError("shapes-sd3 needs shapes-clip's text tower; build it first (--only shapes-clip).")
        t = time.perf_counter()
        vae, report["vae"] = train_vae(cfg, images)
        report["vae"]["seconds"] = time.perf_counter() - t
        print("vae:", json.dumps(report["vae"]))
        t = time.perf_counter()
        tmp = out_root / "shapes-sd3.tmp"
        report["sd3"] = train_sd3(cfg, images, captions, vae, clip_dir, tmp)
        _replace(tmp, out_root / "shapes-sd3")
        report["sd3"]["seconds"] = time.perf_counter() - t
        print("shapes-sd3:", json.dumps(report["sd3"]))
    report["total_seconds"] = time.perf_counter() - t0
    (out_root / f"build_report{'_' + only if only else ''}.json").write_text(json.dumps(report, indent=2))
    return report


def _replace(tmp: Path, final: Path) -> None:
    """Swap a finished artefact into place, so an interrupted build never leaves a half-written one."""
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
