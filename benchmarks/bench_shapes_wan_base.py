"""How close is shapes-wan to its captions, below the strict verifier? Frame-level scores of held-out samples.

Samples ``--per-category`` held-out moving-shapes prompts per category (the model's own steps, sampler and CFG:
20 ODE steps at CFG 4 for shapes-wan, a distilled student's own; noise seed 0) and reports, besides the
``shapes-video`` verifier and the ``motion`` reward that Re-DMD weights by:

- ``frames``: the fraction of frames whose detections are exactly the captioned objects (colour and shape);
- ``colours``: the fraction of frames whose detections have exactly the captioned colours;
- ``tracked_motion``: the verifier's tracked motion (canvas fractions per clip; 0 where no object is tracked);
- ``temporal_consistency``: the ``temporal-consistency`` reward (minus the flicker; 0 for a clip whose frames never
  reverse a change, which includes one whose frames repeat in pairs).

``per_clip`` keeps the verifier, ``motion`` and tracked motion of every clip (the same prompts and noise for every
model), for paired comparisons between models.

It also saves every frame of the first 16 clips as a PNG, one clip per row.

    python benchmarks/bench_shapes_wan_base.py [--model shapes-wan|runs/re-dmd-shapes-wan/student] [--per-category 8]

Results: ``benchmarks/results/shapes_wan_base.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch
from torchvision.utils import save_image

import flowalign as fa
from flowalign.rewards.shapes_video import ShapesVideoVerifier, analyse_clip, clip_motion
from flowalign.rewards.video import MotionReward, TemporalConsistency
from flowalign.zoo import shapes_video

RESULTS = Path(__file__).parent / "results"


def frame_scores(clip: torch.Tensor, caption: str) -> dict[str, float]:
    """``frames``, ``colours`` and ``motion`` (module docstring) of one (F, 3, H, W) clip."""
    objects = shapes_video.parse_video_caption(caption).objects
    want = Counter((o.color, o.shape) for o in objects)
    want_colours = Counter(o.color for o in objects)
    found = analyse_clip(clip)
    return {"frames": sum(Counter((o.color, o.shape) for o in d) == want for d in found) / len(found),
            "colours": sum(Counter(o.color for o in d) == want_colours for d in found) / len(found),
            "tracked_motion": clip_motion(clip, found)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="shapes-wan")
    p.add_argument("--per-category", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS / "shapes_wan_base.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = fa.load_model(args.model)
    captions = [s.caption() for s in shapes_video.eval_prompts("test", args.per_category, seed=0)]
    clips = fa.sample(model, captions, generator=torch.Generator().manual_seed(0)).images
    rows = [frame_scores(c, t) for c, t in zip(clips, captions)]
    per_clip = {"verifier": ShapesVideoVerifier()(clips, captions).tolist(),
                "motion_reward": MotionReward()(clips, captions).tolist(),
                "tracked_motion": [r["tracked_motion"] for r in rows]}
    result = {"model": args.model, "n": len(captions),
              "verifier": round(sum(per_clip["verifier"]) / len(rows), 3),
              "motion_reward": round(sum(per_clip["motion_reward"]) / len(rows), 4),
              "temporal_consistency": round(TemporalConsistency()(clips, captions).mean().item(), 4),
              **{k: round(sum(r[k] for r in rows) / len(rows), 3) for k in rows[0]},
              "per_clip": {k: [round(v, 4) for v in vs] for k, vs in per_clip.items()}}
    print(json.dumps({k: v for k, v in result.items() if k != "per_clip"}))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    first = clips[:16]
    save_image(first.reshape(-1, *first.shape[2:]), out.with_suffix(".png"), nrow=first.shape[1])
    return result


if __name__ == "__main__":
    main()
