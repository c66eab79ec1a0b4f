"""Short shapes-sd3 builds with another transformer or VAE: held-out verifier accuracy at equal steps.

Trains a transformer with the build's recipe (``train_sd3``: batch 16, lr 2e-3, cosine schedule, EMA 0.995) for
``--steps`` steps on the build's 40,000 renders, with the bundled VAE or, with ``--vae-stages``/``--vae-channels``,
a VAE trained first by the build's ``train_vae`` (whose round-trip verifier accuracy on held-out renders is
reported: the ceiling it sets). Then scores the EMA on every held-out prompt (118, noise seeds 0 and 1; 20 ODE
steps, CFG 4) and on the single-object prompts with 8 noise seeds, the category where shape fidelity shows first.

    python benchmarks/bench_sd3_arch.py --steps 2500 --threads 1                    # the bundled architecture
    python benchmarks/bench_sd3_arch.py --steps 2500 --threads 1 --patch 1 --width 64  # 256 tokens, same FLOPs
    python benchmarks/bench_sd3_arch.py --steps 0 --vae-stages 3 --vae-channels 8       # an 8x8x8-latent VAE only

Results: ``benchmarks/results/sd3_arch_<tag>.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def held_out_accuracy(pipe_dir: Path) -> dict:
    import flowalign as fa
    from flowalign.evaluation import evaluate, shapes_prompts
    from flowalign.rewards.shapes import ShapesVerifier

    model = fa.load_model(str(pipe_dir))
    prompts, cats = shapes_prompts("test", 50, seed=0)
    runs = [evaluate(model, ShapesVerifier(), prompts, cats, num_steps=20, seed=s, batch_size=64, progress=False)
            for s in (0, 1)]
    out = {k: round((runs[0][k] + runs[1][k]) / 2, 3) for k in ("overall", "single", "counting", "colors", "position")}
    single = [t for t, c in zip(prompts, cats) if c == "single"]
    out["single_8_seeds"] = round(sum(evaluate(model, ShapesVerifier(), single, num_steps=20, seed=s, batch_size=64,
                                               progress=False)["overall"] for s in range(8)) / 8, 3)
    return out


def main(argv=None) -> dict:
    from diffusers import AutoencoderKL

    from flowalign.zoo import path
    from flowalign.zoo import shapes_data as sd
    from flowalign.zoo.build_shapes import BuildConfig, train_sd3, train_vae

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--patch", type=int, default=2)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vae-stages", type=int, default=None, help="train a VAE with this many stages (default: bundled)")
    p.add_argument("--vae-channels", type=int, default=4)
    p.add_argument("--n-images", type=int, default=BuildConfig.n_train_images)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tag", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = replace(BuildConfig(), sd3_steps=args.steps, sd3_patch=args.patch, sd3_width=args.width,
                  sd3_layers=args.layers, eval_every=0, threads=args.threads, n_train_images=args.n_images)
    images, captions, _ = sd.dataset(cfg.n_train_images, "train", seed=cfg.seed, size=cfg.size)
    result: dict = {"args": vars(args)}
    if args.vae_stages is None:
        vae = AutoencoderKL.from_pretrained(path("shapes-sd3"), subfolder="vae")
    else:
        cfg = replace(cfg, vae_stages=args.vae_stages, vae_channels=args.vae_channels)
        t = time.perf_counter()
        vae, result["vae"] = train_vae(cfg, images)
        result["vae"]["seconds"] = round(time.perf_counter() - t)
        print("vae:", json.dumps(result["vae"]), flush=True)
    if args.steps:
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            info = train_sd3(cfg, images, captions, vae, Path(path("shapes-clip")), Path(tmp) / "pipe")
            result["sd3"] = {"final_loss_avg50": round(info["final_loss_avg50"], 4),
                             "params_transformer": info["params_transformer"],
                             "seconds": round(time.perf_counter() - t)}
            result["held_out"] = held_out_accuracy(Path(tmp) / "pipe")
    print(json.dumps(result), flush=True)
    tag = args.tag or (f"p{args.patch}w{args.width}l{args.layers}_s{args.steps}"
                       + (f"_vae{args.vae_stages}x{args.vae_channels}" if args.vae_stages else ""))
    out = RESULTS / f"sd3_arch_{tag}.json"
    out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
