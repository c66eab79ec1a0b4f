"""Can the shapes-wan VAE learn distinct frames? Train only its temporal weights on clips.

The build's VAE stage trains on single frames from a per-frame start, which leaves its time-upsampling
convolutions passing the latest frame through: that decoder repeats every frame after the first. Here a VAE in that
state is trained on whole clips with everything but the temporal weights frozen
(:func:`flowalign.zoo.build_shapes_wan.temporal_parameters`): ``--part decoder`` (the build's
``train_decoder_time`` stage; the encoder, hence the latents, do not change) or ``--part both`` (the encoder's
temporal weights too, which changes the latents a transformer was trained on). A fresh AdamW with a linear
warm-up (``--warmup``) starts at the switch to clips.

Before and after, on ``--eval-n`` held-out clips: round-trip MSE, the ``shapes-video`` verifier on the round
trips, the fraction of frames showing every captioned object, and ``pair_change``: the mean absolute difference
between decoded frames 2k-1 and 2k (0 when frames repeat; ``truth_pair_change`` is the same on the clips).

    python benchmarks/bench_wan_vae_temporal.py [--part decoder|both] [--steps 200] [--lr 1e-4] [--batch 2]
    python benchmarks/bench_wan_vae_temporal.py --write   # the build's stage on a single-frame VAE, saved to
                                                           # the bundled shapes-wan (see --help)

Results: ``benchmarks/results/wan_vae_temporal_<part>.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from flowalign.zoo import build_shapes_wan as bw
from flowalign.zoo import path, shapes_video
from flowalign.zoo.build_shapes import _cosine_lr

RESULTS = Path(__file__).parent / "results"


def evaluate(vae, clips, captions) -> dict:
    vae.eval()
    with torch.no_grad():
        quality, rec = bw.round_trip_quality(vae, clips, captions)
    return {**quality, "pair_change": round(bw.frame_pair_change(rec), 4)}


def write_bundled(vae_dir: Path) -> dict:
    """Run the build's ``train_decoder_time`` stage (its settings, clips and seed) on the single-frame VAE in
    ``vae_dir`` and save the result there: what ``flowalign zoo build --only shapes-wan`` now produces from the
    same single-frame VAE, without retraining the transformer (the encoder, hence its latents, are unchanged)."""
    from diffusers import AutoencoderKLWan

    cfg = bw.WanBuildConfig()
    torch.set_num_threads(cfg.threads)
    vae = AutoencoderKLWan.from_pretrained(vae_dir)
    probe, probe_captions, _ = shapes_video.dataset(4, "test", seed=7, size=cfg.size, frames=cfg.frames)
    if evaluate(vae, probe, probe_captions)["pair_change"] > 0:
        raise SystemExit(f"{vae_dir}'s decoder already gives distinct frames; start from a single-frame VAE.")
    clips, _, _ = shapes_video.dataset(cfg.n_train_clips, "train", seed=cfg.seed, size=cfg.size, frames=cfg.frames)
    info = bw.train_decoder_time(cfg, vae, clips)
    vae.save_pretrained(vae_dir, safe_serialization=True)
    config = json.loads((vae_dir / "config.json").read_text())
    config.pop("_name_or_path", None)  # this machine's path has no place in the bundle
    (vae_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return info


def main(argv=None) -> dict:
    from diffusers import AutoencoderKLWan

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("decoder", "both"), default="decoder")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--train-clips", type=int, default=2000)
    p.add_argument("--eval-n", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vae", default=str(Path(path("shapes-wan")) / "vae"), help="a single-frame shapes-wan VAE")
    p.add_argument("--write", action="store_true", help="run the build's stage on --vae and save it there")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.write:
        return write_bundled(Path(args.vae))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vae = AutoencoderKLWan.from_pretrained(args.vae)
    clips, _, _ = shapes_video.dataset(args.train_clips, "train", seed=1, size=32, frames=9)
    test, test_captions, _ = shapes_video.dataset(args.eval_n, "test", seed=7, size=32, frames=9)
    rows = [{"step": 0, **evaluate(vae, test, test_captions)}]
    print(json.dumps(rows[-1]), flush=True)
    params = bw.temporal_parameters(vae if args.part == "both" else vae.decoder)
    opt = torch.optim.AdamW([p for p, _ in params], lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, args.steps, warmup=args.warmup))
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    vae.train()
    for step in tqdm(range(args.steps), desc=f"temporal weights ({args.part})"):
        x = bw._windows(clips, args.batch, 9, g)
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
    result = {"args": vars(args), "truth_pair_change": round(bw.frame_pair_change(test), 4), "rows": rows}
    out = Path(args.out or RESULTS / f"wan_vae_temporal_{args.part}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
