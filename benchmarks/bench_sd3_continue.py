"""Does more training lift the bundled shapes-sd3? Continue its transformer and track held-out accuracy.

Starts from the bundled EMA weights, re-encodes the build's 40,000 training renders (seed 0) and continues
flow-matching training with the build's loss (batch 16, logit-normal sigmas, 10% caption dropout, EMA 0.995) at
``--lr`` with a cosine schedule over ``--steps``. Before and at every third of the run it scores the EMA with the
``shapes-geneval`` verifier on every held-out test-split prompt (``flowalign eval``'s ``--n 50`` set, 118 prompts)
at 20 ODE steps and CFG 4, twice (noise seeds 0 and 1). Nothing is written to the bundle.

    python benchmarks/bench_sd3_continue.py [--steps 3000] [--lr 5e-4] [--batch 16] [--logit-mean 0] [--threads 2]

Results: ``benchmarks/results/sd3_continue.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import flowalign as fa
from flowalign.evaluation import evaluate, shapes_prompts
from flowalign.rewards.shapes import ShapesVerifier
from flowalign.zoo import path, shapes_data
from flowalign.zoo.build_shapes import BuildConfig, _cosine_lr, _ema, _settings, encode_dataset, flow_matching_loss

RESULTS = Path(__file__).parent / "results"


def held_out_accuracy(pipe, weights) -> dict:
    training, pipe.transformer = pipe.transformer, weights
    try:
        model = fa.load_model(pipe).configure(_settings(BuildConfig()))
        prompts, cats = shapes_prompts("test", 50, seed=0)
        runs = [evaluate(model, ShapesVerifier(), prompts, cats, num_steps=20, seed=s, batch_size=64, progress=False)
                for s in (0, 1)]
    finally:
        pipe.transformer = training
    return {k: round(sum(r[k] for r in runs) / len(runs), 3) for k in runs[0] if k not in ("n", "seconds")}


def main(argv=None) -> list[dict]:
    from diffusers import StableDiffusion3Pipeline

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--logit-mean", type=float, default=0.0,
                   help="location of the logit-normal sigmas (negative: more weight on low noise levels)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS / "sd3_continue.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = StableDiffusion3Pipeline.from_pretrained(path("shapes-sd3"), text_encoder_3=None, tokenizer_3=None)
    images, captions, _ = shapes_data.dataset(40000, "train", seed=0, size=32)
    lat, embs, pooled, cap_idx, empty = encode_dataset(pipe, images, captions)
    transformer = pipe.transformer.train().requires_grad_(True)
    ema = copy.deepcopy(transformer).requires_grad_(False)
    opt = torch.optim.AdamW(transformer.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, args.steps, warmup=100))
    g = torch.Generator().manual_seed(123)
    rows = [{"step": 0, **held_out_accuracy(pipe, ema)}]
    print(json.dumps(rows[-1]), flush=True)
    losses, t0 = [], time.perf_counter()
    for step in range(args.steps):
        loss = flow_matching_loss(transformer, lat, embs, pooled, cap_idx, empty, args.batch, 0.1, g,
                                  logit_mean=args.logit_mean)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        sched.step()
        _ema(ema, transformer, 0.995)
        losses.append(loss.item())
        if (step + 1) % max(1, args.steps // 3) == 0:
            tail = losses[-250:]
            rows.append({"step": step + 1, "train_loss": round(sum(tail) / len(tail), 4),
                         "seconds": round(time.perf_counter() - t0), **held_out_accuracy(pipe, ema)})
            print(json.dumps(rows[-1]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
