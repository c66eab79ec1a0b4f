"""Why the bundled base fails position and colour prompts: what the verifier found in each failing sample.

    python benchmarks/position_failures.py [--n 200] [--seed 0] [--threads 2]

Samples the first ``n`` position and colour prompts of ``eval_prompts("test")`` with the base (20-step ODE, CFG 4)
and sorts every sample into: pass; right objects (the caption's colour-shape multiset) in the wrong relation,
split by how (A on the opposite side of B, off the dominant axis, or on the right side but within the verifier's
margin); right colours with a wrong shape or an extra object; wrong colours. Prints the counts and writes
``results/position_failures.json``.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import flowalign as fa
    from flowalign.rewards.shapes import RELATION_MARGIN, _multisets, analyse, image_side, relation_offsets, verify
    from flowalign.zoo import shapes_data

    model = fa.load_model("shapes-sd3")
    specs = [s for s in shapes_data.eval_prompts("test", per_category=1000)
             if s.category in ("position", "colors")][:args.n]
    images = fa.sample(model, [s.caption() for s in specs], num_steps=20, sampler="ode",
                       generator=torch.Generator().manual_seed(args.seed)).images
    counts = Counter()
    for image, spec in zip(images, specs):
        pixels = (image.permute(1, 2, 0).float().numpy() * 255).round().astype(np.uint8)
        found = analyse(pixels)
        wanted, got = _multisets(spec, found)
        if verify(pixels, spec, objects=found):
            kind = "pass"
        elif wanted == got:
            a, b = ([d for d in found if (d.color, d.shape) == (o.color, o.shape)][0] for o in spec.objects)
            along, across = relation_offsets(a, b, spec.relation)
            kind = ("right objects, A on the opposite side" if along < 0 else
                    "right objects, within the margin" if along < RELATION_MARGIN * image_side(pixels) else
                    "right objects, off the dominant axis")
        elif Counter(o.color for o in spec.objects) == Counter(d.color for d in found):
            kind = "right colours, a wrong shape or an extra object"
        else:
            kind = "wrong colours"
        counts[f"{spec.category}: {kind}"] += 1
    for key, value in sorted(counts.items()):
        print(f"{key:60s} {value}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "position_failures.json").write_text(json.dumps({"n": len(specs), "seed": args.seed,
                                                                "counts": dict(sorted(counts.items()))}, indent=1))


if __name__ == "__main__":
    main()
