"""Flow-NRG reward guidance on video: does it raise the chosen objective, and at what cost?

On the bundled ``shapes-wan`` (held-out moving-shapes prompts, 20 ODE steps, fixed seeds), one guidance object over
two differentiable video objectives, ``motion`` (how much things move) and ``temporal-consistency`` (minus the
flicker), is run with different per-objective weights chosen at inference (``RewardGuidance.with_weights``) and
compared with unguided sampling. Reported per setting: both objectives, the verifier's accuracy (``shapes-video``,
which never guides), the verifier's measured motion of the tracked shapes (canvas fractions per clip) and the
time ratio against unguided sampling in the same run.

    python benchmarks/bench_video_guidance.py [--per-category 8] [--scale 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import flowalign as fa
from flowalign.evaluation import shapes_video_prompts
from flowalign.io import save_video, video_grid
from flowalign.rewards.shapes_video import ShapesVideoVerifier
from flowalign.rewards.video import MotionReward, TemporalConsistency

RESULTS = Path(__file__).parent / "results"


def run(model, prompts, guidance, batch: int, steps: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    out, t0 = [], time.perf_counter()
    for i in range(0, len(prompts), batch):
        traj = fa.sample(model, prompts[i:i + batch], num_steps=steps, generator=gen, guidance=guidance)
        out.append(traj.images.detach().float())
    return torch.cat(out), time.perf_counter() - t0


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="shapes-wan")
    p.add_argument("--per-category", type=int, default=8)
    p.add_argument("--scale", type=float, default=10.0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS / "video_guidance.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = fa.load_model(args.model)
    prompts, cats = shapes_video_prompts("test", args.per_category, seed=args.seed)
    motion, consistency, verifier = MotionReward(), TemporalConsistency(), ShapesVideoVerifier()
    guide = fa.guidance.RewardGuidance(fa.rewards.MultiReward({motion: 1.0, consistency: 1.0}), scale=args.scale,
                                       mode="nrg", normalize=True)
    settings = {
        "unguided": None,
        "motion only (w = 1, 0)": guide.with_weights({"motion": 1.0, "temporal-consistency": 0.0}),
        "motion + consistency (w = 1, 1)": guide.with_weights({"motion": 1.0, "temporal-consistency": 1.0}),
        "consistency only (w = 0, 1)": guide.with_weights({"motion": 0.0, "temporal-consistency": 1.0}),
    }
    rows, videos = {}, {}
    for name, g in settings.items():
        vids, secs = run(model, prompts, g, args.batch, args.steps, args.seed)
        with torch.no_grad():
            row = {"motion": motion(vids).mean().item(), "temporal-consistency": consistency(vids).mean().item(),
                   "verifier": verifier(vids, prompts).mean().item(),
                   "measured_motion": verifier.motion(vids).mean().item(), "seconds": secs}
        acc = verifier(vids, prompts)
        row["verifier_by_category"] = {c: acc[[k for k, x in enumerate(cats) if x == c]].mean().item()
                                       for c in sorted(set(cats))}
        rows[name], videos[name] = row, vids
        print(f"{name:34s} motion {row['motion']:.3f}  consistency {row['temporal-consistency']:.3f}  verifier "
              f"{row['verifier']:.3f}  measured motion {row['measured_motion']:.3f}  {secs:.0f} s", flush=True)
    base = rows["unguided"]["seconds"]
    for row in rows.values():
        row["time_ratio"] = row["seconds"] / base
    result = {"model": args.model, "prompts": len(prompts), "steps": args.steps, "scale": args.scale,
              "threads": args.threads, "settings": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    # one row per setting, the same 8 prompts in each
    pick = torch.arange(0, len(prompts), max(1, len(prompts) // 8))[:8]
    grid = video_grid(torch.cat([v[pick] for v in videos.values()]), nrow=len(pick))
    save_video(grid, out.with_suffix(".gif"), scale=3)
    print(f"wrote {out} and {out.with_suffix('.gif')}")
    return result


if __name__ == "__main__":
    main()
