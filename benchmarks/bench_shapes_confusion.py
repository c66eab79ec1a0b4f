"""Which shapes does shapes-sd3 get wrong? The verifier's detections on held-out single-object prompts, by shape.

Samples every held-out single-object prompt ``--repeats`` times (20 ODE steps, the model's CFG, one generator
seeded ``--seed`` for the whole batch) and counts, per captioned shape, what the verifier's ``analyse`` detected.

    python benchmarks/bench_shapes_confusion.py [--repeats 2]

Results: ``benchmarks/results/shapes_confusion.json``.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

import torch

import flowalign as fa
from flowalign.evaluation import shapes_prompts
from flowalign.rewards.shapes import analyse, parse_caption

RESULTS = Path(__file__).parent / "results"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="shapes-sd3")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS / "shapes_confusion.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    prompts, cats = shapes_prompts("test", 25, seed=0)
    single = [t for t, c in zip(prompts, cats) if c == "single"] * args.repeats
    images = fa.sample(fa.load_model(args.model), single, num_steps=20,
                       generator=torch.Generator().manual_seed(args.seed)).images
    counts: dict[str, Counter] = defaultdict(Counter)
    for image, caption in zip(images, single):
        found = sorted(o.shape for o in analyse(image))
        counts[parse_caption(caption).objects[0].shape][" + ".join(found) or "nothing"] += 1
    result = {"model": args.model, "samples": len(single), "detected_by_captioned_shape": counts}
    print(json.dumps(result, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
