"""How long must the shapes-wan VAE train? Round-trip quality of the tiny ``AutoencoderKLWan`` against steps.

Trains the build's VAE (``flowalign.zoo.build_shapes_wan.shapes_wan_vae``) on whole clips only, unlike the
build, which trains on single frames (MSE + a small KL on whole 9-frame clips, posterior means decoded, AdamW
with a cosine schedule over ``--steps``) and, every ``--eval-every`` steps,
reports the held-out reconstruction MSE, the ``shapes-video`` verifier's accuracy on reconstructed held-out clips
(the ceiling the VAE sets for shapes-wan) and the fraction of reconstructed frames that show every captioned
object. Results: ``benchmarks/results/wan_vae.json`` (rewritten at every evaluation) and a picture of the last
evaluation's reconstructions.

    python benchmarks/bench_wan_vae.py [--steps 6000] [--eval-every 1000] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from flowalign.io import grid, save_image
from flowalign.zoo import build_shapes_wan as bw
from flowalign.zoo import shapes_video

RESULTS = Path(__file__).parent / "results"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--eval-every", type=int, default=1000)
    p.add_argument("--clips", type=int, default=12000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--base-dim", type=int, default=32, help="VAE width (the build's: 32)")
    p.add_argument("--z-dim", type=int, default=8, help="latent channels (the build's: 8)")
    p.add_argument("--out", default=str(RESULTS / "wan_vae.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = bw.WanBuildConfig(vae_steps=args.steps, n_train_clips=args.clips)
    clips, _, _ = shapes_video.dataset(cfg.n_train_clips, "train", seed=cfg.seed, size=cfg.size, frames=cfg.frames)
    test, test_caps, _ = shapes_video.dataset(60, "test", seed=7, size=cfg.size, frames=cfg.frames)
    vae = bw.shapes_wan_vae(cfg.seed, base_dim=args.base_dim, z_dim=args.z_dim)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: bw._cosine_lr(s, cfg.vae_steps))
    g = torch.Generator().manual_seed(cfg.seed + 1)
    curve, t0 = [], time.perf_counter()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for step in tqdm(range(1, cfg.vae_steps + 1), desc="wan vae"):
        x = bw._windows(clips, cfg.vae_batch, cfg.vae_frames, g)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.mode()).sample
        loss = F.mse_loss(rec, x) + cfg.vae_kl * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % args.eval_every == 0 or step == cfg.vae_steps:
            vae.eval()
            res, recon = bw.round_trip_quality(vae, test, test_caps)
            vae.train()
            curve.append({"step": step, "seconds": time.perf_counter() - t0, **res})
            tqdm.write(json.dumps(curve[-1]))
            config = {"steps": args.steps, "batch": cfg.vae_batch, "frames": cfg.vae_frames, "lr": cfg.vae_lr,
                      "clips": cfg.n_train_clips, "base_dim": args.base_dim, "z_dim": args.z_dim}
            out.write_text(json.dumps({"config": config, "curve": curve}, indent=2))
            save_image(grid(torch.cat([test[:6, ::2].flatten(0, 1), recon[:6, ::2].flatten(0, 1)]), nrow=10),
                       out.with_suffix(".png"), scale=3)
    return {"curve": curve}


if __name__ == "__main__":
    main()
