"""Which tiny ``AutoencoderKLWan`` layout learns the shapes world? A single-frame study.

Each layout is trained from the same seed on 8,000 single 32x32 shapes images (batch 32, AdamW at ``--lr``, MSE plus
a 1e-6 KL, posterior means decoded) and, every 100 steps, reports the held-out round-trip MSE (in [-1, 1]) and the
``shapes-geneval`` verifier's accuracy on 200 reconstructed held-out renders (ground truth scores 1.00; shapes-sd3's
2-D ``AutoencoderKL`` reaches 0.92 after 600 steps). Layouts, all with base width 32, 8 latent channels, one
residual block per stage and no attention:

- ``v21``: the Wan 2.1 layout (no shortcuts around the resampling), one 2x stage in space and time;
- ``v22``: the Wan 2.2 layout (2x2 pixel patches, average-pool / duplicate shortcuts) with one more 2x stage
  (8x8 latents: the layout the build first used);
- ``v22-patch-only``: 2x2 patches and no further stage (16x16 latents, but no compression in time, which
  ``WanPipeline`` cannot sample: it adds a frame when the temporal factor is 1);
- ``v22-pixels``: the Wan 2.2 residual layout on whole pixels with one 2x stage in space and time (16x16 latents:
  the build's, :func:`flowalign.zoo.build_shapes_wan.shapes_wan_vae`).

    python benchmarks/bench_wan_vae_layouts.py [--layouts v21 v22 v22-patch-only v22-pixels] [--steps 300]

Results: ``benchmarks/results/wan_vae_layouts.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from flowalign.rewards.shapes import ShapesVerifier
from flowalign.zoo import shapes_data

RESULTS = Path(__file__).parent / "results"
LAYOUTS = ("v21", "v22", "v22-patch-only", "v22-pixels")


def make_vae(layout: str):
    from diffusers import AutoencoderKLWan

    from flowalign.zoo.build_shapes_wan import shapes_wan_vae

    torch.manual_seed(0)
    common = dict(base_dim=32, z_dim=8, num_res_blocks=1, attn_scales=[], scale_factor_temporal=2)
    patches = dict(is_residual=True, patch_size=2, in_channels=12, out_channels=12)
    if layout == "v21":
        return AutoencoderKLWan(dim_mult=[1, 1], temperal_downsample=[True], scale_factor_spatial=2, **common)
    if layout == "v22":
        return AutoencoderKLWan(dim_mult=[1, 1], temperal_downsample=[True], scale_factor_spatial=4, **patches,
                                **common)
    if layout == "v22-patch-only":
        return AutoencoderKLWan(dim_mult=[1], temperal_downsample=[], scale_factor_spatial=2, **patches,
                                **{**common, "scale_factor_temporal": 1})
    if layout == "v22-pixels":
        return shapes_wan_vae(0)
    raise ValueError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")


@torch.no_grad()
def round_trip(vae, images: torch.Tensor, captions: list[str]) -> tuple[float, float]:
    x = images[:, :, None] * 2 - 1  # single frames as (N, 3, 1, H, W)
    rec = vae.decode(vae.encode(x).latent_dist.mode()).sample[:, :, 0]
    return F.mse_loss(rec, x[:, :, 0]).item(), ShapesVerifier()((rec / 2 + 0.5).clamp(0, 1), captions).mean().item()


def train(layout: str, steps: int, lr: float, images, test, test_captions) -> list[dict]:
    vae = make_vae(layout)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    rows, t0 = [], time.perf_counter()
    for step in range(steps):
        x = images[torch.randint(len(images), (32,), generator=g)][:, :, None] * 2 - 1
        post = vae.encode(x).latent_dist
        loss = F.mse_loss(vae.decode(post.mode()).sample, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            mse, acc = round_trip(vae, test, test_captions)
            rows.append({"layout": layout, "step": step + 1, "mse": round(mse, 5), "recon_verifier": round(acc, 3),
                         "seconds": round(time.perf_counter() - t0, 1)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS / "wan_vae_layouts.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    images, _, _ = shapes_data.dataset(8000, "train", seed=0, size=32)
    test, test_captions, _ = shapes_data.dataset(200, "test", seed=7, size=32)
    rows = [r for layout in args.layouts for r in train(layout, args.steps, args.lr, images, test, test_captions)]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
