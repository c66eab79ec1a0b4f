"""Can the shapes-wan VAE learn distinct frames? Train only its temporal weights on clips.

The build's VAE stage trains on single frames from a per-frame start, which leaves its time-upsampling
convolutions passing the latest frame through: that decoder repeats every frame after the first. Here a VAE in that
state (the bundled one with its decoder's temporal weights reset: :func:`single_frame_vae`) is trained on whole
clips with everything but the temporal weights frozen
(:func:`flowalign.zoo.build_shapes_wan.temporal_parameters`): ``--part decoder`` (the build's
``train_decoder_time`` stage; the encoder, hence the latents, do not change) or ``--part both`` (the encoder's
temporal weights too, which changes the latents a transformer was trained on). A fresh AdamW with a linear
warm-up (``--warmup``) starts at the switch to clips.

Before and after, on ``--eval-n`` held-out clips: round-trip MSE, the ``shapes-video`` verifier on the round
trips, the fraction of frames showing every captioned object, and ``pair_change``: the mean absolute difference
between decoded frames 2k-1 and 2k (0 when frames repeat; ``truth_pair_change`` is the same on the clips).

    python benchmarks/bench_wan_vae_temporal.py [--part decoder|both] [--steps 200] [--lr 1e-4] [--batch 2]
    python benchmarks/bench_wan_vae_temporal.py --write   # the build's stage, saved to the bundled shapes-wan

Results: ``benchmarks/results/wan_vae_temporal_<part>.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from flowalign.zoo import build_shapes_wan as bw
from flowalign.zoo import path, shapes_video

RESULTS = Path(__file__).parent / "results"


def evaluate(vae, clips, captions) -> dict:
    vae.eval()
    with torch.no_grad():
        quality, rec = bw.round_trip_quality(vae, clips, captions)
    return {**quality, "pair_change": round(bw.frame_pair_change(rec), 4)}


def single_frame_vae(vae_dir: Path):
    """The VAE in ``vae_dir`` with its decoder's temporal weights reset to the per-frame start: exactly the VAE the
    build's single-frame steps leave (single frames never give those weights a gradient, and the encoder's were
    never trained), whichever temporal decoder ``vae_dir`` holds."""
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(vae_dir)
    bw.start_per_frame(vae.decoder)
    return vae


def write_bundled(vae_dir: Path) -> dict:
    """Run the build's ``train_decoder_time`` stage (its settings, clips and seed) on the single-frame state of the
    VAE in ``vae_dir`` and save the result there: what ``flowalign zoo build --only shapes-wan`` produces from the
    same single-frame VAE, without retraining the transformer (the encoder, hence its latents, are unchanged)."""
    cfg = bw.WanBuildConfig()
    torch.set_num_threads(cfg.threads)
    vae = single_frame_vae(vae_dir)
    clips, _, _ = shapes_video.dataset(cfg.n_train_clips, "train", seed=cfg.seed, size=cfg.size, frames=cfg.frames)
    info = bw.train_decoder_time(cfg, vae, clips)
    vae.save_pretrained(vae_dir, safe_serialization=True)
    config = json.loads((vae_dir / "config.json").read_text())
    config.pop("_name_or_path", None)  # this machine's path has no place in the bundle
    (vae_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return info


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("decoder", "both"), default="decoder")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--train-clips", type=int, default=2000)
    p.add_argument("--eval-n", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vae", default=str(Path(path("shapes-wan")) / "vae"),
                   help="a shapes-wan VAE; its decoder's temporal weights are reset first (single_frame_vae)")
    p.add_argument("--write", action="store_true", help="run the build's stage on --vae and save it there")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.write:
        return write_bundled(Path(args.vae))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vae = single_frame_vae(Path(args.vae))
    clips, _, _ = shapes_video.dataset(args.train_clips, "train", seed=1, size=32, frames=9)
    test, test_captions, _ = shapes_video.dataset(args.eval_n, "test", seed=7, size=32, frames=9)
    rows = [{"step": 0, **evaluate(vae, test, test_captions)}]
    print(json.dumps(rows[-1]), flush=True)
    cfg = bw.WanBuildConfig(decoder_time_steps=args.steps, decoder_time_batch=args.batch, decoder_time_lr=args.lr,
                            decoder_time_warmup=args.warmup)
    t0 = time.perf_counter()

    def evaluate_midway(step: int) -> None:
        if step % max(1, args.steps // 2) == 0:
            seconds = round(time.perf_counter() - t0)
            rows.append({"step": step, "seconds": seconds, **evaluate(vae, test, test_captions)})
            print(json.dumps(rows[-1]), flush=True)

    bw.train_decoder_time(cfg, vae, clips, encoder_too=args.part == "both", callback=evaluate_midway)
    result = {"args": vars(args), "truth_pair_change": round(bw.frame_pair_change(test), 4), "rows": rows}
    out = Path(args.out or RESULTS / f"wan_vae_temporal_{args.part}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
