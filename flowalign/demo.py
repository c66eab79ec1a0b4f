"""``make demo`` / ``flowalign demo``: the first thing a new user runs.

It samples the bundled shapes-sd3 model on held-out prompts of the shapes world with every sampler, scores
the samples with the exact verifier (``shapes-geneval``) and the CLIP proxy (``shapes-clip``), checks the
on-policy log-prob invariant of the stochastic samplers, and writes grids and a summary to ``runs/demo``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch


def run_demo(out: str = "runs/demo", num_steps: int = 20, model_name: str = "shapes-sd3", per_category: int = 8,
             seed: int = 0) -> dict:
    import flowalign as fa
    from flowalign.evaluation import format_table, shapes_prompts
    from flowalign.io import grid, save_image

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = fa.load_model(model_name)
    verifier, proxy = fa.rewards.load("shapes-geneval"), fa.rewards.load("shapes-clip")
    prompts, cats = shapes_prompts("test", per_category, seed)
    print(f"flowalign demo: {model_name} ({model}), {len(prompts)} held-out prompts of the shapes world")
    summary = {"model": model_name, "num_steps": num_steps, "prompts": prompts, "samplers": {}}
    for sampler in fa.sampling.SAMPLERS:
        t0 = time.perf_counter()
        traj = fa.sample(model, prompts, num_steps=num_steps, sampler=sampler,
                         generator=torch.Generator().manual_seed(seed))
        seconds = time.perf_counter() - t0
        ok = verifier(traj.images, prompts)
        acc = {"overall": ok.mean().item()}
        for c in dict.fromkeys(cats):
            acc[c] = ok[[i for i, k in enumerate(cats) if k == c]].mean().item()
        entry = {"seconds": round(seconds, 2), "eta": traj.eta, "verifier_accuracy": acc,
                 "shapes_clip_mean": proxy(traj.images, prompts).mean().item()}
        if traj.log_probs is not None:
            ratio = torch.exp(fa.log_prob(model, traj) - traj.log_probs[:, traj.stochastic])
            entry["on_policy_max_abs_ratio_minus_1"] = (ratio - 1).abs().max().item()
        save_image(grid(traj.images, nrow=per_category), out_dir / f"{sampler}.png", scale=3)
        summary["samplers"][sampler] = entry
        print(f"\n[{sampler}] {seconds:.1f}s -> {out_dir / (sampler + '.png')}  (rows: " + ", ".join(
            dict.fromkeys(cats)) + ")")
        print(format_table(acc))
        if "on_policy_max_abs_ratio_minus_1" in entry:
            print(f"on-policy |ratio - 1| = {entry['on_policy_max_abs_ratio_minus_1']:.1e}")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nwrote {out_dir / 'summary.json'}")
    return summary
