"""``make demo`` / ``flowalign demo``: the first thing a new user runs.

Until the bundled shapes world lands, the demo samples the tiny random SD3 pipeline with every sampler,
checks the on-policy log-prob invariant, and writes the pictures and a summary. The pictures of a random
network are coloured noise; what the demo shows is the machinery, end to end, offline.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

PROMPTS = ["a red circle", "two blue squares", "a green triangle above a yellow star"]


def run_demo(out: str = "runs/demo", num_steps: int = 12, model_name: str = "tiny-sd3") -> dict:
    import flowalign as fa
    from flowalign.io import save_samples

    out_dir = Path(out)
    model = fa.load_model(model_name)
    print(f"flowalign demo: {model} on {model.device}")
    summary = {"model": model_name, "prompts": PROMPTS, "num_steps": num_steps, "samplers": {}}
    for sampler in fa.sampling.SAMPLERS:
        t0 = time.perf_counter()
        traj = fa.sample(model, PROMPTS, num_steps=num_steps, sampler=sampler,
                         generator=torch.Generator().manual_seed(0), progress=True)
        entry = {"seconds": round(time.perf_counter() - t0, 3), "eta": traj.eta}
        if traj.log_probs is not None:
            ratio = torch.exp(fa.log_prob(model, traj) - traj.log_probs[:, traj.stochastic])
            entry["mean_log_prob"] = traj.log_probs.sum(1).mean().item()
            entry["max_abs_ratio_minus_1"] = (ratio - 1).abs().max().item()
        save_samples(traj.images, out_dir / sampler, scale=4)
        summary["samplers"][sampler] = entry
        extra = f", on-policy |ratio-1| = {entry['max_abs_ratio_minus_1']:.1e}" if "mean_log_prob" in entry else ""
        print(f"  {sampler:9s} {entry['seconds']:.2f}s -> {out_dir / sampler / 'grid.png'}{extra}")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {out_dir / 'summary.json'}")
    return summary
