"""Guided sampling and search on the shapes world: verifier accuracy, proxy reward, model evaluations, time.

Held-out prompts of the shapes test split, 20 steps, fixed seeds. Compared at equal steps: unguided ODE, Flow-NRG
(ODE) and Euphonium (flow-sde) with the shapes-clip gradient, and, at a budget of 4x the NFE, best-of-N and
noise-aware pruning (both selecting by shapes-clip; the verifier is never used for selection).

With ``--latent RUN`` (a folder written by ``flowalign train configs/reward/shapes-clip-latent.yaml``), also Flow-NRG
with the noise-aware latent reward (no VAE decode in the gradient) and pruning scored by it.

Usage: python benchmarks/bench_guidance.py [--per-category 25] [--steps 20] [--latent runs/shapes-clip-latent]
Writes benchmarks/results/guidance_shapes.json and .png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import flowalign as fa
from flowalign.evaluation import shapes_prompts

RESULTS = Path(__file__).parent / "results"


def accuracy(verifier, images, prompts, cats) -> dict:
    ok = verifier(images, prompts)
    out = {"overall": ok.mean().item()}
    for c in dict.fromkeys(cats):
        out[c] = ok[[i for i, k in enumerate(cats) if k == c]].mean().item()
    return out


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    model = fa.load_model("shapes-sd3")
    verifier, proxy = fa.rewards.load("shapes-geneval"), fa.rewards.load("shapes-clip")
    prompts, cats = shapes_prompts("test", args.per_category, args.seed)
    steps = args.steps
    methods = {
        "unguided (ode)": dict(sampler="ode"),
        "unguided (flow-sde)": dict(sampler="flow-sde"),
    }
    for s in args.nrg_scales:
        methods[f"flow-nrg ode, scale {s}"] = dict(sampler="ode", guidance=fa.guidance.RewardGuidance(
            proxy, scale=s, mode="nrg", normalize=True))
    latent = None
    if args.latent:
        latent = fa.rewards.load("latent", path=args.latent, model=model)
        for s in args.nrg_scales:
            guide = fa.guidance.RewardGuidance(latent, scale=s, mode="nrg", normalize=True)
            methods[f"flow-nrg ode, latent reward, scale {s}"] = dict(sampler="ode", guidance=guide)
    for s in args.euph_scales:
        methods[f"euphonium flow-sde, scale {s}"] = dict(sampler="flow-sde", guidance=fa.guidance.RewardGuidance(
            proxy, scale=s, mode="euphonium", normalize=True))
    rows = {}
    for name, kw in methods.items():
        t0 = time.perf_counter()
        traj = fa.sample(model, prompts, num_steps=steps, generator=torch.Generator().manual_seed(args.seed), **kw)
        sec = time.perf_counter() - t0
        rows[name] = {"accuracy": accuracy(verifier, traj.images, prompts, cats),
                      "shapes_clip": proxy(traj.images, prompts).mean().item(), "nfe": steps, "seconds": sec}
        print(name, json.dumps(rows[name]))
    budget = 4 * steps
    searches = [("best-of-4 (shapes-clip)", fa.search.best_of_n, {}),
                ("pruning (shapes-clip, 4x budget)", fa.search.prune_search, {})]
    if latent is not None:
        searches.append(("pruning (latent proxy, 4x budget)", fa.search.prune_search, {"proxy": latent}))
    for name, fn, kw in searches:
        t0 = time.perf_counter()
        res = fn(model, prompts, proxy, num_steps=steps, budget=budget, generator=torch.Generator().manual_seed(
            args.seed), **kw)
        sec = time.perf_counter() - t0
        rows[name] = {"accuracy": accuracy(verifier, res.images, prompts, cats),
                      "shapes_clip": res.scores.mean().item(), "nfe": res.nfe, "seconds": sec,
                      "num_candidates": res.num_candidates}
        print(name, json.dumps(rows[name]))
    base = rows["unguided (ode)"]["seconds"]
    for r in rows.values():
        r["time_ratio_vs_unguided_ode"] = r["seconds"] / base
    return {"prompts": len(prompts), "steps": steps, "seed": args.seed, "rows": rows}


def plot(result: dict, path: Path) -> None:
    """Verifier accuracy and proxy reward against model evaluations per prompt, one point per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, key, label in ((axes[0], "accuracy", "verifier accuracy (shapes test split)"),
                           (axes[1], "shapes_clip", "shapes-clip (proxy)")):
        for name, r in rows.items():
            y = r[key]["overall"] if key == "accuracy" else r[key]
            ax.scatter(r["nfe"], y, s=40)
            ax.annotate(name, (r["nfe"], y), fontsize=6, xytext=(4, 2), textcoords="offset points")
        ax.set_xlabel("model evaluations (velocity calls) per prompt")
        ax.set_ylabel(label)
    fig.suptitle(f"shapes-sd3, {result['prompts']} held-out prompts, {result['steps']} steps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-category", type=int, default=25)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--nrg-scales", type=float, nargs="*", default=[1.0, 3.0])
    p.add_argument("--euph-scales", type=float, nargs="*", default=[1.0, 3.0])
    p.add_argument("--latent", help="run folder of a trained latent reward (adds latent-reward rows)")
    args = p.parse_args()
    result = run(args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "guidance_shapes.json").write_text(json.dumps(result, indent=2))
    plot(result, RESULTS / "guidance_shapes.png")


if __name__ == "__main__":
    main()
