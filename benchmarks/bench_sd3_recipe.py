"""Which batch size and learning rate train shapes-sd3 fastest on a CPU (the recipe `flowalign zoo build` uses).

    python benchmarks/bench_sd3_recipe.py [--samples 25600] [--recipes 64:5e-4 32:1e-3 16:2e-3 ...]

Each recipe trains a fresh transformer of the bundled architecture on the same 40,000 renders (encoded once by
the bundled VAE and text encoders) for the same number of training samples, single-threaded, with the build's
cosine schedule (warmup 1/16 of the steps), gradient clipping and an EMA of decay 0.99. It reports the EMA's
flow-matching loss on a fixed held-out set (test-split renders, fixed noise and logit-normal sigmas), overall
and by sigma band, four times per run, and writes ``results/sd3_recipe.json``. Run two at a time on two cores
(``--jobs 2``): each is one thread.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
DATA = RESULTS / ".sd3_recipe_data.pt"


def prepare(path: Path = DATA) -> None:
    from diffusers import StableDiffusion3Pipeline

    from flowalign.zoo import path as zoo_path
    from flowalign.zoo import shapes_data as sd
    from flowalign.zoo.build_shapes import encode_dataset

    pipe = StableDiffusion3Pipeline.from_pretrained(zoo_path("shapes-sd3"), text_encoder_3=None, tokenizer_3=None)
    out = {}
    for split, n, seed in (("train", 40000, 0), ("test", 1024, 5)):
        images, captions, _ = sd.dataset(n, split, seed=seed, size=32)
        lat, embs, pooled, cap, empty = encode_dataset(pipe, images, captions)
        out[split] = {"lat": lat, "embs": embs, "pooled": pooled, "cap": cap, "empty": empty}
    torch.save(out, path)


def train(batch: int, lr: float, samples: int, seed: int = 0) -> dict:
    from flowalign.zoo.build_shapes import _cosine_lr, _ema, flow_matching_loss, shapes_transformer

    torch.set_num_threads(1)
    data = torch.load(DATA)
    tr, te = data["train"], data["test"]
    torch.manual_seed(seed)
    model = shapes_transformer(32)
    ema = copy.deepcopy(model).requires_grad_(False)
    steps = samples // batch
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, steps, warmup=max(20, steps // 16)))
    g, gv, n = torch.Generator().manual_seed(2), torch.Generator().manual_seed(9), 512
    vx0, vc = te["lat"][:n], te["cap"][:n]
    veps, vs = torch.randn(vx0.shape, generator=gv), torch.sigmoid(torch.randn(n, generator=gv))

    @torch.no_grad()
    def held_out_loss() -> dict:
        losses = []
        for i in range(0, n, 128):
            s, x0, e, c = vs[i:i + 128, None, None, None], vx0[i:i + 128], veps[i:i + 128], vc[i:i + 128]
            v = ema(hidden_states=(1 - s) * x0 + s * e, timestep=s.flatten() * 1000,
                    encoder_hidden_states=te["embs"][c], pooled_projections=te["pooled"][c], return_dict=False)[0]
            losses.append(((v - (e - x0)) ** 2).mean((1, 2, 3)))
        loss = torch.cat(losses)
        bands = {"all": torch.ones_like(vs, dtype=torch.bool), "sigma<0.35": vs < 0.35,
                 "0.35-0.65": (vs >= 0.35) & (vs < 0.65), "sigma>=0.65": vs >= 0.65}
        return {k: round(loss[m].mean().item(), 4) for k, m in bands.items()}

    t0, log = time.perf_counter(), []
    for step in range(steps):
        loss = flow_matching_loss(model, tr["lat"], tr["embs"], tr["pooled"], tr["cap"], tr["empty"], batch, 0.1, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        _ema(ema, model, min(0.99, (1 + step) / (10 + step)))
        if (step + 1) % max(1, steps // 4) == 0 or step + 1 == steps:
            log.append({"step": step + 1, "samples": (step + 1) * batch, "seconds": round(time.perf_counter() - t0),
                        "held_out_loss": held_out_loss()})
    return {"batch": batch, "lr": lr, "samples": samples, "curve": log}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=25600)
    ap.add_argument("--recipes", nargs="+", default=["64:5e-4", "32:1e-3", "16:1e-3", "32:2e-3", "16:2e-3",
                                                    "32:4e-3"], help="batch:lr pairs")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        b, lr = args.one.split(":")
        print("RESULT", json.dumps(train(int(b), float(lr), args.samples)))
        return
    if not DATA.exists():
        prepare()
    pending, running, results = list(args.recipes), [], []
    while pending or running:
        while pending and len(running) < args.jobs:
            r = pending.pop(0)
            running.append(subprocess.Popen([sys.executable, __file__, "--one", r, "--samples", str(args.samples)],
                                            stdout=subprocess.PIPE, text=True))
        done = running.pop(0)
        out = done.communicate()[0]
        results.append(json.loads([ln for ln in out.splitlines() if ln.startswith("RESULT ")][-1][7:]))
        print(json.dumps({k: results[-1][k] for k in ("batch", "lr")}), results[-1]["curve"][-1], flush=True)
    (RESULTS / "sd3_recipe.json").write_text(json.dumps({"samples": args.samples, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
