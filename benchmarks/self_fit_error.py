"""How far a model's velocity is from the flow-matching optimum of its own samples (shapes world).

    python benchmarks/self_fit_error.py [--n 256] [--threads 2] [--model shapes-sd3]

Flow matching on a model's own samples (Flow-RWR, SFT on rollouts) moves the velocity toward the flow-matching
optimum of the sample distribution. Where the velocity already is that optimum, the fit has nothing to change
but what the reward weights add; where it is not, the fit carries a systematic gradient of its own. This script
measures the flow-matching error, averaged over 10 noise levels evenly spread in [0.05, 0.95] (the same noise for
every set), of:

- the conditional velocity (CFG 1) on ground-truth renders of the prompts (VAE posterior mode): what pretraining fit;
- the conditional velocity on its own CFG-1 ODE samples;
- the CFG-g velocity (the one Flow-RWR trains with ``train_guidance_scale: g``) on its own CFG-g samples;
- the conditional velocity on the CFG-g samples, and the CFG-g velocity on the renders.

Writes ``results/self_fit_error.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="shapes-sd3")
    ap.add_argument("--n", type=int, default=256, help="prompts (training split), one sample of each per set")
    ap.add_argument("--cfg", type=float, default=4.0, help="the CFG scale g of the guided samples and velocity")
    ap.add_argument("--steps", type=int, default=10, help="ODE steps of the samples (Flow-RWR's rollouts: 10)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import flowalign as fa
    from flowalign.zoo import shapes_data

    t0 = time.perf_counter()
    model = fa.load_model(args.model)
    pixels, captions, _ = shapes_data.dataset(args.n, "train", seed=3)
    g = args.cfg
    with torch.no_grad():
        renders = model.encode_images(pixels)
        own = {scale: fa.sample(model, captions, num_steps=args.steps, guidance_scale=scale, sampler="ode",
                                generator=torch.Generator().manual_seed(1)).x0 for scale in (1.0, g)}
        cond = {scale: model.encode(captions, guidance_scale=scale) for scale in (1.0, g)}
        sets = {"renders @ CFG 1": (renders, 1.0), "own CFG-1 samples @ CFG 1": (own[1.0], 1.0),
                f"own CFG-{g:g} samples @ CFG {g:g}": (own[g], g), f"own CFG-{g:g} samples @ CFG 1": (own[g], 1.0),
                f"renders @ CFG {g:g}": (renders, g)}
        sigmas = torch.linspace(0.05, 0.95, 10).tolist()
        errors = {name: [] for name in sets}
        for sigma in sigmas:
            eps = torch.randn(renders.shape, generator=torch.Generator().manual_seed(5))
            s = torch.full((len(renders),), sigma)
            for name, (x0, scale) in sets.items():
                v = model.velocity((1 - sigma) * x0 + sigma * eps, s, cond[scale], scale)
                errors[name].append(((v - (eps - x0)) ** 2).mean().item())
    out = {"model": args.model, "n": args.n, "cfg": g, "steps": args.steps, "sigmas": sigmas,
           "mean_error": {k: sum(v) / len(v) for k, v in errors.items()}, "error_per_sigma": errors,
           "seconds": time.perf_counter() - t0}
    for k, v in out["mean_error"].items():
        print(f"{k:32s} {v:.3f}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "self_fit_error.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
