"""Build the bundled text-to-video world ``shapes-wan`` from fixed seeds: ``flowalign zoo build --only shapes-wan``.

A tiny Wan 2.1 pipeline (a diffusers ``WanPipeline`` folder) trained on clips of moving shapes
(:mod:`flowalign.zoo.shapes_video`), in two stages:

1. a tiny causal ``AutoencoderKLWan`` in the Wan 2.2 residual layout (32x32 px -> 16x16x8 latents, 2x in time:
   9 frames -> 5 latent frames), started as a per-frame autoencoder and trained on batches of single frames of the
   training clips (:func:`train_vae` says why) by MSE and a small KL; per-channel ``latents_mean`` /
   ``latents_std`` from the training clips, as the pipeline reads them. Single frames never train the
   time-upsampling convolutions, which the per-frame start makes pass the latest frame through, so that decoder
   repeats every frame after the first; :func:`train_decoder_time` then trains the decoder's temporal weights
   alone on whole clips, so that its frames differ, and leaves the encoder (hence the latents) as it was;
2. a tiny ``WanTransformer3DModel`` (``wan_patch`` (1, 2, 2): 5 x 8 x 8 = 320 tokens) trained by rectified-flow
   matching with logit-normal timesteps, 10% caption dropout (the empty prompt, the pipeline's default negative
   prompt) and an EMA, conditioned by a frozen, randomly initialised tiny UMT5 encoder whose word-level tokenizer
   is made in code from the caption grammar's vocabulary.

``benchmarks/README.md`` ("Video") records how the VAE layout was chosen and what the build measures.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from flowalign.utils import atomic_save
from flowalign.zoo import WEIGHTS, shapes_video
from flowalign.zoo.build_shapes import _cosine_lr, _ema, _replace

TEXT_LEN = 16  # UMT5 tokens: the longest caption is 13 words plus EOS


@dataclass
class WanBuildConfig:
    seed: int = 0
    size: int = 32
    frames: int = 9
    n_train_clips: int = 12000
    vae_frames: int = 9
    vae_steps: int = 600  # in all, the single-frame steps included
    vae_frame_steps: int = 600  # first steps on batches of single frames (the spatial path; see train_vae)
    vae_frame_batch: int = 32
    vae_batch: int = 2  # whole clips per step after that
    vae_lr: float = 1e-3
    vae_kl: float = 1e-6
    wan_steps: int = 12000
    wan_patch: tuple[int, int, int] = (1, 2, 2)  # (time, height, width) latents per token
    wan_batch: int = 16
    wan_lr: float = 2e-3
    wan_ema: float = 0.995
    caption_dropout: float = 0.1
    guidance_scale: float = 4.0
    flow_shift: float = 1.0
    eval_every: int = 2000  # verifier accuracy of the EMA on held-out prompts during training (0: off)
    eval_per_category: int = 8
    vae_eval_every: int = 200  # held-out round-trip quality during the VAE stage (0: off)
    vae_eval_n: int = 40
    vae_save_every: int = 100  # steps between VAE-stage checkpoints (a killed build resumes from the last)
    wan_save_every: int = 250  # steps between transformer-stage checkpoints (likewise)
    # then the decoder's temporal weights alone, on whole clips (see train_decoder_time)
    decoder_time_steps: int = 200
    decoder_time_batch: int = 2
    decoder_time_lr: float = 1e-4
    decoder_time_warmup: int = 50
    recon_n: int = 120  # held-out clips for the VAE's round-trip verifier accuracy
    threads: int = 2


def tokenizer():
    from flowalign.models.tiny import t5_tokenizer
    from flowalign.zoo.shapes_video import VIDEO_WORDS

    return t5_tokenizer(words=VIDEO_WORDS, model_max_length=TEXT_LEN)


def text_encoder(seed: int):
    """A tiny UMT5 encoder over the caption vocabulary, randomly initialised from ``seed`` and kept frozen."""
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    cfg = UMT5Config(vocab_size=len(tokenizer()), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                     relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return UMT5EncoderModel(cfg).eval().requires_grad_(False)


def shapes_wan_vae(seed: int, base_dim: int = 32, z_dim: int = 8, per_frame_start: bool = True):
    """The Wan 2.2 residual layout (average-pool / duplicate shortcuts around each resampling) at toy width, on
    whole pixels (no 2x2 patches) with one 2x stage in space and time: 32x32 px -> 16x16x8 latents, 9 frames -> 5.
    The shortcuts are what let it train: on single frames, 300 steps of 32 pass 47% of held-out round trips, against
    0% for the Wan 2.1 layout (no shortcuts) and 9% with 2x2 patches plus the 2x stage (8x8 latents), whose video
    round trips kept positions and motion but lost colours and outlines even after 2,000 steps
    (``benchmarks/README.md``, "Video"). With ``per_frame_start`` it starts as a per-frame autoencoder
    (:func:`start_per_frame`)."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=base_dim, z_dim=z_dim, dim_mult=[1, 1], num_res_blocks=1, attn_scales=[],
                           temperal_downsample=[True], is_residual=True, scale_factor_spatial=2,
                           scale_factor_temporal=2)
    return start_per_frame(vae) if per_frame_start else vae


@torch.no_grad()
def start_per_frame(vae):
    """Make a causal Wan VAE start as a per-frame autoencoder, the way video models are inflated from image
    models: every 3x3x3 causal convolution's weights over the two earlier frames are zeroed (it sees only the
    current frame), and the time convolutions of the resampling stages pass the latest frame through (the
    upsampling one for both of its output frames). Training on single frames then trains the whole spatial path
    (no weight it leaves at zero is ever used on one frame), and the first steps on clips start from a model that
    already reconstructs every frame: on held-out clips, 200 steps of single frames give a round-trip verifier
    score of 0.28 this way, against 0.00 from the random temporal weights. Returns ``vae``."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanResample

    for m in vae.modules():
        if isinstance(m, WanResample) and hasattr(m, "time_conv"):
            w = m.time_conv.weight  # (channels * k, channels, 3, 1, 1): k output frames per input frame
            w.zero_()
            m.time_conv.bias.zero_()
            c = w.shape[1]
            for j in range(w.shape[0] // c):
                w[j * c:(j + 1) * c, :, -1, 0, 0] = torch.eye(c)
        elif isinstance(m, WanCausalConv3d) and tuple(m.kernel_size[:2]) == (3, 3):
            m.weight[:, :, :-1] = 0
    return vae


def shapes_wan_transformer(seed: int, patch: tuple[int, int, int] = (1, 4, 4)):
    """4 blocks of width 128 (4 heads of 32: RoPE splits each head 12 / 10 / 10 over time / height / width); patch
    (1, 4, 4) on 5 x 16 x 16 latents gives 5 x 4 x 4 = 80 tokens, (1, 2, 2) gives 320."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=tuple(patch), num_attention_heads=4, attention_head_dim=32, in_channels=8,
                                 out_channels=8, text_dim=64, freq_dim=64, ffn_dim=512, num_layers=4,
                                 cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


def settings(cfg: WanBuildConfig) -> dict:
    return {"native_size": [cfg.size, cfg.size, cfg.frames], "guidance_scale": cfg.guidance_scale,
            "max_sequence_length": TEXT_LEN}


# ----------------------------------------------------------------------------- stage 1: VAE
def train_vae(cfg: WanBuildConfig, clips: torch.Tensor, checkpoint: Path | None = None) -> tuple[torch.nn.Module, dict]:
    """``clips``: (N, F, 3, H, W) in [0, 1]. The first ``vae_frame_steps`` steps train the per-frame start
    (:func:`start_per_frame`) on batches of single frames, the rest on random ``vae_frames``-long windows of whole
    clips. By default every step is on single frames: the per-frame start then stays a causal video VAE whose
    latent frames each hold one frame (the resampling shortcut averages in the other), which passes 45% of
    held-out clip round trips after 400 steps; :func:`train_decoder_time` then trains the decoder's temporal
    weights on clips. Clip steps here, on the whole VAE, have not helped: from the start (two scenes per
    batch where single frames give 32), round trips were still colourless blobs after 72,000 frames; after 400
    single-frame steps, 200 clip steps took the held-out verifier from 0.45 to 0.00, most likely because Adam
    meets the temporal weights, which had no gradient until then, with empty second moments and moves them all at
    once by about the learning rate. Every ``vae_eval_every`` steps it scores held-out round trips
    (:func:`round_trip_quality`). With ``checkpoint``, the stage saves its whole state there every
    ``vae_save_every`` steps and resumes from it (when it was written with the same VAE settings), so a killed
    build loses at most that many steps."""
    vae = shapes_wan_vae(cfg.seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, cfg.vae_steps))
    g = torch.Generator().manual_seed(cfg.seed + 1)
    stateful = {"vae": vae, "opt": opt, "sched": sched}
    state = _resume(checkpoint, {"key": _vae_key(cfg), "step": 0, "curve": [], "mse": float("nan")}, g, stateful)
    test, test_captions, _ = shapes_video.dataset(cfg.vae_eval_n, "test", seed=7, size=cfg.size, frames=cfg.frames)
    bar = tqdm(range(state["step"], cfg.vae_steps), initial=state["step"], total=cfg.vae_steps,
               desc="shapes-wan vae", leave=False)
    for step in bar:
        x = (_windows(clips, cfg.vae_frame_batch, 1, g) if step < cfg.vae_frame_steps
             else _windows(clips, cfg.vae_batch, cfg.vae_frames, g))
        post = vae.encode(x).latent_dist
        # decode the posterior mean: with the encoder's initial log-variance (about 0), sampled latents carry unit
        # noise that drowns the small initial means and the autoencoder collapses to the clip mean; the KL term
        # still keeps the means near the prior's scale
        rec = vae.decode(post.mode()).sample
        mse = F.mse_loss(rec, x)
        loss = mse + cfg.vae_kl * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        state.update(step=step + 1, mse=mse.item())
        bar.set_postfix(mse=f"{state['mse']:.4f}")
        if cfg.vae_eval_every and (step + 1) % cfg.vae_eval_every == 0:
            state["curve"].append({"step": step + 1, **round_trip_quality(vae, test, test_captions)[0]})
            tqdm.write(f"shapes-wan vae step {step + 1}: {json.dumps(state['curve'][-1])}")
        if checkpoint is not None and ((step + 1) % cfg.vae_save_every == 0 or step + 1 == cfg.vae_steps):
            _save(checkpoint, state, g, stateful)
    vae.eval().requires_grad_(False)
    z = encode_clips(vae, clips[:1024])
    mean = z.mean(dim=(0, 2, 3, 4))
    std = z.std(dim=(0, 2, 3, 4))
    vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
    return vae, {"final_mse": state["mse"], "curve": state["curve"]}


def _resume(checkpoint: Path | None, state: dict, g: torch.Generator, stateful: dict) -> dict:
    """The training state to start from: ``state`` (whose ``key`` names the settings), or the one saved in
    ``checkpoint`` by :func:`_save` when it was written with the same key, restoring ``stateful`` (name -> module,
    optimizer or scheduler) and the generator ``g`` in place."""
    if checkpoint is None or not checkpoint.exists():
        return state
    saved = torch.load(checkpoint, weights_only=False)
    if saved["key"] != state["key"]:
        tqdm.write(f"{checkpoint} was written with other settings; starting afresh")
        return state
    for name, obj in stateful.items():
        obj.load_state_dict(saved[name])
    g.set_state(saved["generator"])
    tqdm.write(f"resuming from step {saved['step']} ({checkpoint})")
    return {k: saved[k] for k in state}


def _save(checkpoint: Path, state: dict, g: torch.Generator, stateful: dict) -> None:
    atomic_save({**state, **{name: obj.state_dict() for name, obj in stateful.items()}, "generator": g.get_state()},
                checkpoint)


def _vae_key(cfg: WanBuildConfig) -> dict:
    """The settings a VAE checkpoint must share with the build that resumes it."""
    return {k: v for k, v in asdict(cfg).items()
            if k.startswith("vae_") and k not in ("vae_eval_every", "vae_save_every")
            or k in ("seed", "size", "frames", "n_train_clips")}


@torch.no_grad()
def round_trip_quality(vae, clips: torch.Tensor, captions: list[str]) -> tuple[dict, torch.Tensor]:
    """Encode/decode (N, F, 3, H, W) clips: the MSE in [0, 1], the ``shapes-video`` verifier's accuracy on the
    round trips and the fraction of their frames that show every captioned object (colour and shape), with the
    reconstructions."""
    from flowalign.rewards.shapes_video import ShapesVideoVerifier, analyse_clip

    rec = torch.cat([vae.decode(vae.encode(to_vae(clips[i:i + 20])).latent_dist.mode()).sample
                     for i in range(0, len(clips), 20)])
    rec = (rec / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)
    ok = []
    for clip, caption in zip(rec, captions):
        want = {(o.color, o.shape) for o in shapes_video.parse_video_caption(caption).objects}
        ok += [want <= {(o.color, o.shape) for o in found} for found in analyse_clip(clip)]
    return {"mse": round(F.mse_loss(rec, clips).item(), 5),
            "verifier": round(ShapesVideoVerifier()(rec, captions).mean().item(), 3),
            "frames_ok": round(sum(ok) / len(ok), 3)}, rec


def _windows(clips: torch.Tensor, batch: int, frames: int, g: torch.Generator) -> torch.Tensor:
    """``batch`` random ``frames``-long windows of random clips, as the VAE's (B, 3, F, H, W) in [-1, 1]."""
    idx = torch.randint(len(clips), (batch,), generator=g)
    start = torch.randint(clips.shape[1] - frames + 1, (batch,), generator=g)
    x = torch.stack([clips[i, s:s + frames] for i, s in zip(idx.tolist(), start.tolist())])
    return to_vae(x)


@torch.no_grad()
def encode_clips(vae, clips: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Raw (unnormalised) posterior modes of (N, F, 3, H, W) clips: (N, z, f, h, w)."""
    return torch.cat([vae.encode(to_vae(clips[i:i + batch])).latent_dist.mode() for i in range(0, len(clips), batch)])


def to_vae(clips: torch.Tensor) -> torch.Tensor:
    """(N, F, 3, H, W) in [0, 1] -> the VAE's contiguous (N, 3, F, H, W) in [-1, 1] (a permuted, non-contiguous
    input sends the 3-D convolutions down a path several times slower on CPU)."""
    return (clips * 2 - 1).permute(0, 2, 1, 3, 4).contiguous()


def temporal_parameters(module) -> list[tuple[torch.nn.Parameter, torch.Tensor | None]]:
    """``(parameter, gradient mask or None)`` for every temporal weight in ``module`` (a Wan VAE or a part of
    it): the resampling time convolutions, and the 3x3x3 causal convolutions' weights over the two earlier frames
    (the mask keeps their current-frame weights, which single-frame training set, as they are). Every other
    parameter of ``module`` is frozen."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanResample

    module.requires_grad_(False)
    out = []
    for m in module.modules():
        if isinstance(m, WanResample) and hasattr(m, "time_conv"):
            out += [(p.requires_grad_(True), None) for p in m.time_conv.parameters()]
        elif isinstance(m, WanCausalConv3d) and tuple(m.kernel_size) == (3, 3, 3):
            mask = torch.ones_like(m.weight)
            mask[:, :, -1] = 0
            out.append((m.weight.requires_grad_(True), mask))
    return out


def train_decoder_time(cfg: WanBuildConfig, vae, clips: torch.Tensor, encoder_too: bool = False,
                       callback=None) -> dict:
    """Train the decoder's temporal weights (:func:`temporal_parameters`) on whole ``vae_frames``-long clips by
    round-trip MSE, with everything else frozen, so that the decoded frames within each latent frame differ.
    The encoder stays as single-frame training left it, so the latents (and a transformer trained on them) do not
    change; ``encoder_too`` trains the encoder's temporal weights as well (a comparison in
    ``benchmarks/bench_wan_vae_temporal.py``). A fresh AdamW with a linear warm-up: training the whole VAE on clips
    after single frames collapsed the round trips (held-out verifier 0.45 -> 0.00), most likely because Adam met
    the temporal weights, which had no gradient until then, with empty second moments and moved them all at once.
    ``callback(step)`` runs after each step. ``vae`` is trained in place and left in eval mode."""
    params = temporal_parameters(vae if encoder_too else vae.decoder)
    opt = torch.optim.AdamW([p for p, _ in params], lr=cfg.decoder_time_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: _cosine_lr(s, cfg.decoder_time_steps, warmup=cfg.decoder_time_warmup))
    g = torch.Generator().manual_seed(cfg.seed + 4)
    mse = torch.tensor(float("nan"))
    bar = tqdm(range(cfg.decoder_time_steps), desc="shapes-wan decoder (time)", leave=False)
    for step in bar:
        vae.train()
        x = _windows(clips, cfg.decoder_time_batch, cfg.vae_frames, g)
        with torch.set_grad_enabled(encoder_too):
            z = vae.encode(x).latent_dist.mode()
        mse = F.mse_loss(vae.decode(z).sample, x)
        opt.zero_grad(set_to_none=True)
        mse.backward()
        for p, mask in params:
            if mask is not None and p.grad is not None:
                p.grad.mul_(mask)
        opt.step()
        sched.step()
        bar.set_postfix(mse=f"{mse.item():.4f}")
        if callback is not None:
            callback(step + 1)
    vae.eval().requires_grad_(False)
    return {"final_mse": mse.item()}


def frame_pair_change(clips: torch.Tensor) -> float:
    """Mean absolute change between frames 2k-1 and 2k of (N, F, 3, H, W) clips: 0 when a decoder repeats each
    frame of a latent frame."""
    return (clips[:, 2::2] - clips[:, 1:-1:2]).abs().mean().item()


# ----------------------------------------------------------------------------- stage 2: transformer
def make_pipeline(cfg: WanBuildConfig, vae, transformer):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    return WanPipeline(tokenizer=tokenizer(), text_encoder=text_encoder(cfg.seed + 3), vae=vae,
                       transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=cfg.flow_shift))


@torch.no_grad()
def encode_captions(pipe, captions: list[str]):
    """Every distinct caption's UMT5 embeddings (plus the empty prompt, for CFG), exactly as the pipeline encodes
    them: ``(embeds, caption index, empty index)``."""
    uniq = sorted(set(captions)) + [""]
    embs = torch.cat([pipe.encode_prompt(uniq[i:i + 256], do_classifier_free_guidance=False,
                                         max_sequence_length=TEXT_LEN, device="cpu")[0]
                      for i in range(0, len(uniq), 256)])
    index = {c: i for i, c in enumerate(uniq)}
    return embs, torch.tensor([index[c] for c in captions]), index[""]


def flow_matching_loss(transformer, lat, embs, cap_idx, empty: int, batch: int, caption_dropout: float,
                       g: torch.Generator) -> torch.Tensor:
    """One rectified-flow batch with logit-normal(0, 1) sigmas: the MSE of the velocity against ``eps - x0``."""
    b = torch.randint(len(lat), (batch,), generator=g)
    x0 = lat[b]
    c = cap_idx[b].clone()
    c[torch.rand(len(b), generator=g) < caption_dropout] = empty
    eps = torch.randn(x0.shape, generator=g)
    sigma = torch.sigmoid(torch.randn(len(b), generator=g))
    s = sigma.view(-1, 1, 1, 1, 1)
    xt = (1 - s) * x0 + s * eps
    v = transformer(hidden_states=xt, timestep=sigma * 1000, encoder_hidden_states=embs[c], return_dict=False)[0]
    return F.mse_loss(v, eps - x0)


def train_wan(cfg: WanBuildConfig, clips: torch.Tensor, captions: list[str], vae, out: Path,
              checkpoint: Path | None = None) -> dict:
    """Train the transformer on the VAE's latents of ``clips`` and write the pipeline to ``out``. With
    ``checkpoint``, the stage saves its whole state there every ``wan_save_every`` steps and resumes from it (when
    it was written with the same settings), so a killed build loses at most that many steps."""
    transformer = shapes_wan_transformer(cfg.seed, cfg.wan_patch)
    pipe = make_pipeline(cfg, vae, transformer)
    z = encode_clips(vae, clips)
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    lat = (z - mean) / std
    embs, cap_idx, empty = encode_captions(pipe, captions)
    ema = copy.deepcopy(transformer).requires_grad_(False)
    transformer.train()
    opt = torch.optim.AdamW(transformer.parameters(), lr=cfg.wan_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, cfg.wan_steps, warmup=200))
    g = torch.Generator().manual_seed(cfg.seed + 2)
    stateful = {"transformer": transformer, "ema": ema, "opt": opt, "sched": sched}
    state = _resume(checkpoint, {"key": _wan_key(cfg, vae), "step": 0, "losses": [], "curve": []}, g, stateful)
    losses, curve = state["losses"], state["curve"]
    bar = tqdm(range(state["step"], cfg.wan_steps), initial=state["step"], total=cfg.wan_steps, desc="shapes-wan",
               leave=False)
    for step in bar:
        loss = flow_matching_loss(transformer, lat, embs, cap_idx, empty, cfg.wan_batch, cfg.caption_dropout, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        sched.step()
        _ema(ema, transformer, min(cfg.wan_ema, (1 + step) / (10 + step)))
        losses.append(loss.item())
        state["step"] = step + 1
        bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}",
                        acc=curve[-1]["overall"] if curve else "-")
        if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.wan_steps):
            curve.append({"step": step + 1, "loss_avg50": round(sum(losses[-50:]) / len(losses[-50:]), 4),
                          **verifier_accuracy(cfg, pipe, ema)})
            tqdm.write(f"shapes-wan step {step + 1}: {json.dumps(curve[-1])}")
        if checkpoint is not None and ((step + 1) % cfg.wan_save_every == 0 or step + 1 == cfg.wan_steps):
            _save(checkpoint, state, g, stateful)
    pipe.register_modules(transformer=ema.eval())
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    (out / "flowalign.json").write_text(json.dumps(settings(cfg), indent=2))
    tail = losses[-50:]
    return {"final_loss_avg50": sum(tail) / len(tail), "params_transformer": sum(p.numel() for p in ema.parameters()),
            "verifier_curve": curve}


def _wan_key(cfg: WanBuildConfig, vae) -> dict:
    """The settings a transformer checkpoint must share with the build that resumes it, and the VAE whose latents
    it trains on (identified by its latent statistics, which any retraining changes)."""
    key = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()
           if k.startswith("wan_") and k != "wan_save_every"
           or k in ("seed", "size", "frames", "n_train_clips", "caption_dropout", "flow_shift")}
    return {**key, "vae_latents": [list(vae.config.latents_mean), list(vae.config.latents_std)]}


def verifier_accuracy(cfg: WanBuildConfig, pipe, weights, per_category: int | None = None) -> dict:
    """Held-out ``shapes-video`` accuracy of ``weights`` (a transformer) at 20 ODE steps."""
    import flowalign as fa
    from flowalign.evaluation import evaluate
    from flowalign.rewards.shapes_video import ShapesVideoVerifier

    training = pipe.transformer
    pipe.transformer = weights
    try:
        model = fa.load_model(pipe).configure(settings(cfg))
        specs = shapes_video.eval_prompts("test", per_category or cfg.eval_per_category, seed=cfg.seed)
        res = evaluate(model, ShapesVideoVerifier(), [s.caption() for s in specs], [s.category for s in specs],
                       num_steps=20, batch_size=32, progress=False)
    finally:
        pipe.transformer = training
    return {k: round(v, 3) for k, v in res.items() if k != "n"}


# ----------------------------------------------------------------------------- driver
def build(cfg: WanBuildConfig | None = None, out_root: Path = WEIGHTS, vae_from: Path | None = None) -> dict:
    """Render, train the VAE (resumable: ``out_root/shapes-wan.vae.pt``), train the transformer (resumable:
    ``out_root/shapes-wan.transformer.pt``), and swap the pipeline into ``out_root/shapes-wan``; the checkpoints
    are removed once the build succeeds. ``vae_from`` (a shapes-wan pipeline folder) skips the VAE stage and
    trains the transformer on that pipeline's VAE."""
    cfg = cfg or WanBuildConfig()
    torch.set_num_threads(cfg.threads)
    report: dict = {"config": asdict(cfg)}
    t0 = time.perf_counter()
    clips, captions, _ = shapes_video.dataset(cfg.n_train_clips, "train", seed=cfg.seed, size=cfg.size,
                                              frames=cfg.frames)
    report["render_seconds"] = time.perf_counter() - t0
    t = time.perf_counter()
    out_root.mkdir(parents=True, exist_ok=True)
    checkpoint = out_root / "shapes-wan.vae.pt"
    if vae_from is not None:
        vae = load_vae(Path(vae_from))
        report["vae"] = {"from": str(vae_from)}
    else:
        vae, report["vae"] = train_vae(cfg, clips, checkpoint)
        report["vae"]["decoder_time"] = train_decoder_time(cfg, vae, clips)
    report["vae"]["seconds"] = time.perf_counter() - t
    test, test_captions, _ = shapes_video.dataset(cfg.recon_n, "test", seed=7, size=cfg.size, frames=cfg.frames)
    quality, rec = round_trip_quality(vae, test, test_captions)
    report["vae"]["recon_test"] = {**quality, "pair_change": round(frame_pair_change(rec), 4),
                                   "truth_pair_change": round(frame_pair_change(test), 4)}
    print("shapes-wan vae:", json.dumps(report["vae"]))
    t = time.perf_counter()
    tmp = out_root / "shapes-wan.tmp"
    wan_checkpoint = out_root / "shapes-wan.transformer.pt"
    report["wan"] = train_wan(cfg, clips, captions, vae, tmp, wan_checkpoint)
    _replace(tmp, out_root / "shapes-wan")
    checkpoint.unlink(missing_ok=True)
    wan_checkpoint.unlink(missing_ok=True)
    report["wan"]["seconds"] = time.perf_counter() - t
    print("shapes-wan:", json.dumps(report["wan"]))
    report["total_seconds"] = time.perf_counter() - t0
    (out_root / "build_report_shapes-wan.json").write_text(json.dumps(report, indent=2))
    return report


def load_vae(folder: Path):
    """The VAE of a shapes-wan pipeline folder, frozen."""
    from diffusers import AutoencoderKLWan

    if not (folder / "vae").is_dir():
        raise FileNotFoundError(f"{folder} holds no VAE folder (expected a shapes-wan pipeline folder with vae/).")
    return AutoencoderKLWan.from_pretrained(folder / "vae").eval().requires_grad_(False)
