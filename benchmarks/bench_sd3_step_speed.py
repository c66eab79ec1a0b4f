"""Time of one shapes-sd3 training step (the build's: batch 16, clipping, AdamW, EMA) with CPU speed-ups.

Variants, each on a fresh transformer of the bundled architecture with random inputs: the v2 build's step (plain
AdamW, an EMA updated parameter by parameter); with a fused AdamW; plus a foreach EMA update (the v3 build's step);
plus ``torch.compile`` of the transformer. Ratios, not absolute times,
are what carry over between machines.

    python benchmarks/bench_sd3_step_speed.py [--steps 40] [--threads 2]

Results: ``benchmarks/results/sd3_step_speed.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from flowalign.zoo.build_shapes import shapes_transformer

RESULTS = Path(__file__).parent / "results"
VARIANTS = {"build": (False, False, False), "fused AdamW": (True, False, False),
            "+ foreach EMA (v3 build)": (True, True, False), "+ torch.compile": (True, True, True)}


def time_step(fused: bool, foreach_ema: bool, compiled: bool, steps: int) -> tuple[float, float]:
    """(seconds per step, seconds of the first 3 steps, compilation included)."""
    torch.manual_seed(0)
    model = shapes_transformer(32)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused or None)
    forward = torch.compile(model) if compiled else model
    x, text, pooled = torch.randn(16, 4, 16, 16), torch.randn(16, 16, 128), torch.randn(16, 128)
    ema_params, params = list(ema.parameters()), list(model.parameters())

    def step():
        v = forward(hidden_states=x, timestep=torch.rand(16) * 1000, encoder_hidden_states=text,
                    pooled_projections=pooled, return_dict=False)[0]
        loss = F.mse_loss(v, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if foreach_ema:
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, params, 0.005)
        else:  # the v2 build's EMA
            with torch.no_grad():
                for e, p in zip(ema_params, params):
                    e.lerp_(p, 0.005)

    t = time.perf_counter()
    for _ in range(3):
        step()
    warm = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t) / steps, warm


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = {}
    for name, flags in VARIANTS.items():
        per_step, warm = time_step(*flags, args.steps)
        rows[name] = {"ms_per_step": round(per_step * 1000, 1), "first_3_steps_s": round(warm, 1)}
        rows[name]["speedup"] = round(rows["build"]["ms_per_step"] / rows[name]["ms_per_step"], 2)
        print(name, json.dumps(rows[name]), flush=True)
    result = {"args": vars(args), "variants": rows}
    (RESULTS / "sd3_step_speed.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
