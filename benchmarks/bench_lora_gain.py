"""Is an aligned LoRA better than the base on held-out shapes? A paired comparison on the same prompts and noise.

    python benchmarks/bench_lora_gain.py RUN/lora [RUN2/lora ...] [--seeds 0 1] [--cfg 4] [--threads 2] [--tag T]
                                         [--guided-base SCALE [--guide-reward R] [--guide-window START END]]
                                         [--proxy [REWARD]] [--prompts FILE [--repeat N]]

Samples every held-out test-split prompt (118) once per noise seed with the base model and with each LoRA loaded,
from the same initial noise, at 20 ODE steps, and scores them with the exact verifier. Because base and aligned
samples share prompt and noise, the per-sample difference (-1, 0 or +1) gives the gain and its standard error
(std of the differences / sqrt(n)), overall and per category; a gain of two standard errors or more is what
benchmarks/README.md calls a clear margin. ``--proxy [REWARD]`` also scores the same samples with a training
reward (default the shapes-clip proxy; for example ``shapes-geneval-soft``), paired the same way, which shows
whether a run raised the reward it trained on and whether the verifier followed. ``--guided-base SCALE`` also
samples the base with Euphonium guidance (the gradient of ``--guide-reward``, shapes-clip by default or a latent
reward model, normalised, at that scale, on every step of a 20-step flow-sde or on ``--guide-window``'s) from the
same initial noise, compares it with the unguided ODE and flow-sde, and compares each LoRA, sampled without
guidance, with it: does the trained model reach the guided base without the reward model? ``--prompts FILE``
scores the file's captions, each ``--repeat`` times per seed, instead of the split (runs trained on those captions).
Writes ``results/lora_gain[_TAG].json``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def scores(model, prompts: list[str], seed: int, cfg: float | None, proxy=None, **sample_kwargs
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The verifier's scores of one noise seed's samples, and the proxy's (empty without one)."""
    import flowalign as fa
    from flowalign.evaluation import evaluate

    res = evaluate(model, fa.rewards.load("shapes-geneval"), prompts, num_steps=20, guidance_scale=cfg, seed=seed,
                   progress=False, return_images=True, **sample_kwargs)
    if proxy is None:
        return res["scores"], torch.empty(0)
    with torch.no_grad():
        return res["scores"], proxy(res["images"], prompts).float().cpu()


def score_seeds(model, prompts: list[str], seeds: list[int], cfg: float | None, proxy, **sample_kwargs
                ) -> tuple[torch.Tensor, ...]:
    """Verifier and proxy scores over every noise seed, concatenated in seed order."""
    verifier, clip = zip(*(scores(model, prompts, s, cfg, proxy, **sample_kwargs) for s in seeds))
    return torch.cat(verifier), torch.cat(clip)


def report(name: str, result: dict) -> None:
    print(name)
    for cat, r in result.items():
        print(f"  {cat:9s} {r['base']:.3f} -> {r['aligned']:.3f}  gain {r['gain']:+.3f} +- {r['se']:.3f}  (n={r['n']})")


def paired(base: torch.Tensor, aligned: torch.Tensor, cats: list[str]) -> dict:
    out = {}
    for name in ["overall", *sorted(set(cats))]:
        m = torch.tensor([name == "overall" or c == name for c in cats])
        d = aligned[m] - base[m]
        se = d.std(unbiased=True).item() / math.sqrt(len(d)) if len(d) > 1 else float("nan")
        out[name] = {"base": base[m].mean().item(), "aligned": aligned[m].mean().item(), "gain": d.mean().item(),
                     "se": se, "n": int(m.sum())}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("loras", nargs="*", help="LoRA folders (a training run's lora/); none: only the base (and the "
                                             "guided base).")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--cfg", type=float, default=None, help="CFG scale (default: the model's own, 4).")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tag", default="")
    ap.add_argument("--proxy", nargs="?", const="shapes-clip", default=None, metavar="REWARD",
                    help="Also score every sample with this reward, paired (default when given: shapes-clip).")
    ap.add_argument("--guided-base", type=float, default=None, metavar="SCALE",
                    help="Also compare each LoRA (unguided) with the base under Euphonium guidance at this scale.")
    ap.add_argument("--guide-reward", default="shapes-clip", metavar="REWARD",
                    help="The guidance's reward: a differentiable pixel reward, or latent:RUN_DIR for a latent reward "
                         "model trained by `flowalign train configs/reward/...` (default: shapes-clip).")
    ap.add_argument("--guide-window", type=int, nargs=2, default=None, metavar=("START", "END"),
                    help="Guide only steps [START, END) of the 20 (default: every step); e.g. 0 8 for the layout.")
    ap.add_argument("--prompts", default=None, help="A text file of captions (one per line) to score instead of the "
                                                    "test split, each --repeat times per seed (own noise each).")
    ap.add_argument("--repeat", type=int, default=12, help="Samples of each --prompts caption per seed (default 12).")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import flowalign as fa
    from flowalign.evaluation import shapes_prompts

    if args.prompts:
        from flowalign.trainers.data import load_prompts

        prompts = [p for p in load_prompts(args.prompts) for _ in range(args.repeat)]
        cats = ["prompts"] * len(prompts)
    else:
        prompts, cats = shapes_prompts("test", 50, seed=0)  # 50 per category: the whole split, 118 prompts
    model = fa.load_model("shapes-sd3")
    proxy = fa.rewards.load(args.proxy) if args.proxy else None
    base, base_clip = score_seeds(model, prompts, args.seeds, args.cfg, proxy)
    all_cats = cats * len(args.seeds)
    results = {"prompts": len(prompts), "seeds": args.seeds, "cfg": args.cfg, "loras": {}}
    guided = None
    if args.guided_base is not None:
        if args.guide_reward.startswith("latent:"):
            guide_reward = fa.rewards.load("latent", path=args.guide_reward.removeprefix("latent:"), model=model)
        else:
            guide_reward = fa.rewards.load(args.guide_reward)
        window = tuple(args.guide_window) if args.guide_window else None
        guide = fa.guidance.RewardGuidance(guide_reward, scale=args.guided_base, mode="euphonium", normalize=True,
                                           window=window)
        guided, _ = score_seeds(model, prompts, args.seeds, args.cfg, None, sampler="flow-sde", guidance=guide)
        sde, _ = score_seeds(model, prompts, args.seeds, args.cfg, None, sampler="flow-sde")
        results["guided_base"] = {"scale": args.guided_base, "reward": args.guide_reward, "window": window,
                                  "verifier": paired(base, guided, all_cats),
                                  "against_unguided_sde": paired(sde, guided, all_cats), "vs_loras": {}}
        name = f"base with Euphonium guidance ({args.guide_reward}, scale {args.guided_base})"
        report(f"{name} against the unguided ODE", results["guided_base"]["verifier"])
        report(f"{name} against the unguided flow-sde (same noise)", results["guided_base"]["against_unguided_sde"])
    if proxy is not None:
        results["proxy"], results["proxy_reward"] = {}, args.proxy
    for lora in args.loras:
        model = fa.load_model("shapes-sd3")
        model.load_lora(lora)
        aligned, aligned_clip = score_seeds(model, prompts, args.seeds, args.cfg, proxy)
        results["loras"][lora] = paired(base, aligned, all_cats)
        report(lora, results["loras"][lora])
        if guided is not None:
            results["guided_base"]["vs_loras"][lora] = paired(guided, aligned, all_cats)
            report(f"{lora} (unguided) against the guided base", results["guided_base"]["vs_loras"][lora])
        if proxy is not None:
            results["proxy"][lora] = paired(base_clip, aligned_clip, all_cats)
            report(f"{lora} ({args.proxy})", results["proxy"][lora])
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"lora_gain{'_' + args.tag if args.tag else ''}.json"
    path.write_text(json.dumps(results, indent=1))
    print("wrote", path)


if __name__ == "__main__":
    main()
