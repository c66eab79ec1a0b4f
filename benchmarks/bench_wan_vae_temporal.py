"""Can the bundled shapes-wan VAE learn distinct frames? Train only its temporal weights on clips.

The build trains the VAE on single frames from a per-frame start, so its time-upsampling convolutions still pass
the latest frame through and the decoder repeats every frame after the first. Here the bundled VAE is trained on
whole clips with everything but the temporal weights frozen: the 3x3x3 causal convolutions' weights over the two
earlier frames (their current-frame weights keep their values) and the resampling time convolutions. A fresh
AdamW with a linear warm-up (``--warmup``) starts at the switch to clips.

Before and after, on ``--eval-n`` held-out clips: round-trip MSE, the ``shapes-video`` verifier on the round
trips, the fraction of frames showing every captioned object, and ``pair_change``: the mean absolute difference
between decoded frames 2k-1 and 2k (0 when frames repeat; ``truth_pair_change`` is the same on the clips).

    python benchmarks/bench_wan_vae_temporal.py [--steps 200] [--lr 1e-4] [--batch 2]

Results: ``benchmarks/results/wan_vae_temporal.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from flowalign.zoo import path, shapes_video
from flowalign.zoo.build_shapes import _cosine_lr
from flowalign.zoo.build_shapes_wan import _windows, round_trip_quality

RESULTS = Path(__file__).parent / "results"


def temporal_parameters(vae) -> list[tuple[torch.nn.Parameter, torch.Tensor | None]]:
    """(parameter, gradient mask or None) for every temporal weight; freezes every other parameter."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanResample

    vae.requires_grad_(False)
    out = []
    for m in vae.modules():
        if isinstance(m, WanResample) and hasattr(m, "time_conv"):
            for p in m.time_conv.parameters():
                out.append((p.requires_grad_(True), None))
        elif isinstance(m, WanCausalConv3d) and tuple(m.kernel_size) == (3, 3, 3):
            mask = torch.ones_like(m.weight)
            mask[:, :, -1] = 0  # the current frame's weights stay as single-frame training left them
            out.append((m.weight.requires_grad_(True), mask))
    return out


def pair_change(clips: torch.Tensor) -> float:
    """Mean |x[2k] - x[2k-1]| over (N, F, 3, H, W) clips."""
    return (clips[:, 2::2] - clips[:, 1:-1:2]).abs().mean().item()


def evaluate(vae, clips, captions) -> dict:
    vae.eval()
    with torch.no_grad():
        quality, rec = round_trip_quality(vae, clips, captions)
    return {**quality, "pair_change": round(pair_change(rec), 4)}


def main(argv=None) -> dict:
    from diffusers import AutoencoderKLWan

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--train-clips", type=int, default=2000)
    p.add_argument("--eval-n", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS / "wan_vae_temporal.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vae = AutoencoderKLWan.from_pretrained(Path(path("shapes-wan")) / "vae")
    clips, _, _ = shapes_video.dataset(args.train_clips, "train", seed=1, size=32, frames=9)
    test, test_captions, _ = shapes_video.dataset(args.eval_n, "test", seed=7, size=32, frames=9)
    rows = [{"step": 0, **evaluate(vae, test, test_captions)}]
    print(json.dumps(rows[-1]), flush=True)
    params = temporal_parameters(vae)
    opt = torch.optim.AdamW([p for p, _ in params], lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, args.steps, warmup=args.warmup))
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    vae.train()
    for step in tqdm(range(args.steps), desc="temporal weights"):
        x = _windows(clips, args.batch, 9, g)
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
        loss = F.mse_loss(rec, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for p_, mask in params:
            if mask is not None and p_.grad is not None:
                p_.grad.mul_(mask)
        opt.step()
        sched.step()
        if (step + 1) % max(1, args.steps // 2) == 0:
            rows.append({"step": step + 1, "seconds": round(time.perf_counter() - t0),
                         **evaluate(vae, test, test_captions)})
            print(json.dumps(rows[-1]), flush=True)
            vae.train()
    result = {"args": vars(args), "truth_pair_change": round(pair_change(test), 4), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
