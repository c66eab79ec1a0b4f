"""Consistency over long streaming rollouts on the bundled shapes-wan: EMA-Sink against a plain attention sink,
a plain sliding window and the unbounded cache.

Each held-out motion prompt is streamed for ``--chunks`` chunks of ``--chunk`` latent frames (far longer than the
5 latent frames shapes-wan was trained on) with the same noise under every cache setting. Reported per setting:

- identity persistence: the fraction of decoded frames in which the shapes-video verifier's frame analysis finds
  an object of the captioned colour and shape (the subject survives the rollout);
- late persistence: the same over the last third of the frames;
- temporal consistency (``temporal-consistency`` reward, higher is steadier) and motion (``motion`` reward);
- frames per second and the cache bound.

    python benchmarks/bench_streaming_consistency.py [--prompts 12] [--chunks 12]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import flowalign as fa
from flowalign.io import save_video, video_grid
from flowalign.rewards.shapes_video import analyse_clip
from flowalign.rewards.video import MotionReward, TemporalConsistency
from flowalign.sampling.streaming import stream
from flowalign.zoo.shapes_video import eval_prompts, parse_video_caption

RESULTS = Path(__file__).parent / "results"


def persistence(video: torch.Tensor, caption: str) -> torch.Tensor:
    """(F,) 1 where the frame shows an object of the caption's (first) colour and shape."""
    want = parse_video_caption(caption).objects[0]
    found = analyse_clip(video)
    return torch.tensor([float(any(o.color == want.color and o.shape == want.shape for o in f)) for f in found])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="shapes-wan")
    p.add_argument("--prompts", type=int, default=12, help="held-out motion prompts")
    p.add_argument("--chunks", type=int, default=12)
    p.add_argument("--chunk", type=int, default=1, help="latent frames per chunk")
    p.add_argument("--window", type=int, default=3)
    p.add_argument("--sinks", type=int, default=1)
    p.add_argument("--alpha", type=float, default=0.9)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS / "streaming_consistency.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = fa.load_model(args.model)
    specs = [s for s in eval_prompts("test", args.prompts, seed=0) if s.category == "motion"][:args.prompts]
    prompts = [s.caption() for s in specs]
    h, w = model.default_size
    shape = (len(prompts), model.transformer.config.in_channels, args.chunks * args.chunk,
             h // model.vae_scale_factor_spatial, w // model.vae_scale_factor_spatial)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    settings = {
        f"EMA-Sink (S={args.sinks}, W={args.window}, alpha={args.alpha})":
            dict(window=args.window, sinks=args.sinks, sink_ema=args.alpha),
        f"plain sink (S={args.sinks}, W={args.window})": dict(window=args.window, sinks=args.sinks, sink_ema=1.0),
        f"sliding window (S=0, W={args.window + args.sinks})": dict(window=args.window + args.sinks, sinks=0),
        "unbounded cache": dict(window=None, sinks=0),
    }
    motion, consistency = MotionReward(), TemporalConsistency()
    rows, grids = {}, []
    for name, kw in settings.items():
        t0 = time.perf_counter()
        res = stream(model, prompts, num_chunks=args.chunks, chunk_frames=args.chunk, num_steps=args.steps,
                     noise=noise.clone(), **kw)
        secs = time.perf_counter() - t0
        vids = res.images
        per = torch.stack([persistence(v, c) for v, c in zip(vids, prompts)])  # (B, F)
        late = per[:, -max(1, per.shape[1] // 3):]
        rows[name] = {"persistence": per.mean().item(), "late_persistence": late.mean().item(),
                      "temporal_consistency": consistency(vids).mean().item(), "motion": motion(vids).mean().item(),
                      "frames": vids.shape[1], "fps": vids.shape[0] * vids.shape[1] / secs,
                      "max_context_frames": max(res.context_frames)}
        grids.append(vids[:6])
        print(f"{name:44s} persistence {rows[name]['persistence']:.3f} (last third "
              f"{rows[name]['late_persistence']:.3f})  consistency {rows[name]['temporal_consistency']:.3f}  "
              f"motion {rows[name]['motion']:.3f}  {rows[name]['fps']:.1f} fps", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "prompts": prompts, "chunks": args.chunks, "chunk": args.chunk,
                               "steps": args.steps, "settings": rows}, indent=2))
    save_video(video_grid(torch.cat(grids), nrow=6), out.with_suffix(".gif"), scale=3)
    print(f"wrote {out} and {out.with_suffix('.gif')}")
    return rows


if __name__ == "__main__":
    main()
