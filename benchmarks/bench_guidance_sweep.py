"""Which guidance settings raise the shapes verifier? A paired sweep on the bundled base (v3).

    python benchmarks/bench_guidance_sweep.py SETTINGS_JSON [--steps 20] [--sde-window START END] [--seeds 0 1]
                                              [--threads 1] [--tag T]

SETTINGS_JSON is a list of guidance settings, each a dict of keywords of
:class:`flowalign.sampling.guidance.RewardGuidance` plus ``reward`` (a registered differentiable reward, default
``shapes-layout``), ``reward_kwargs`` and ``sampler`` (default ``flow-sde``; ``ode`` for Flow-NRG), for example::

    '[{"reward": "shapes-position", "mode": "euphonium", "normalize": true, "scale": 30, "window": [0, 8]}]'

Every held-out prompt of ``eval_prompts("test")`` (330: 262 position, 36 colours, 18 single, 14 counting) is
sampled once per noise seed, unguided with the ODE and with the stochastic sampler (on ``--sde-window``'s steps
when given, as in Flow-GRPO's fast mode), and with each setting from the same noise. The verifier's per-sample
differences give paired gains (+- one standard error) against both, overall and per category. Writes
``results/guidance_sweep[_TAG].json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_lora_gain import paired  # noqa: E402  (paired per-sample gains and their standard errors)

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("settings", help="JSON list of guidance settings (module docstring)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sde-window", type=int, nargs=2, default=None, metavar=("START", "END"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import flowalign as fa
    from flowalign.evaluation import evaluate
    from flowalign.zoo import shapes_data

    model = fa.load_model("shapes-sd3")
    verifier = fa.rewards.load("shapes-geneval")
    specs = shapes_data.eval_prompts("test", per_category=1000)
    prompts, cats = [s.caption() for s in specs], [s.category for s in specs] * len(args.seeds)
    window = {"sde_window": tuple(args.sde_window)} if args.sde_window else {}

    def scores(**kwargs) -> torch.Tensor:
        return torch.cat([evaluate(model, verifier, prompts, num_steps=args.steps, seed=seed, progress=False,
                                   return_images=True, **kwargs)["scores"] for seed in args.seeds])

    ode = scores()
    sde = scores(sampler="flow-sde", **window)
    print(f"unguided: ode {ode.mean():.3f}, flow-sde {sde.mean():.3f} ({len(ode)} samples)", flush=True)
    results = {"steps": args.steps, "sde_window": args.sde_window, "seeds": args.seeds, "n": len(ode),
               "ode": ode.mean().item(), "flow_sde": sde.mean().item(), "settings": []}
    for setting in json.loads(args.settings):
        kw = dict(setting)
        reward = fa.rewards.load(kw.pop("reward", "shapes-layout"), **kw.pop("reward_kwargs", {}))
        sampler = kw.pop("sampler", "flow-sde")
        if kw.get("window") is not None:
            kw["window"] = tuple(kw["window"])
        guide = fa.guidance.RewardGuidance(reward, **kw)
        guided = scores(sampler=sampler, guidance=guide, **(window if sampler != "ode" else {}))
        same = sde if sampler != "ode" else ode
        row = {"setting": setting, "accuracy": guided.mean().item(), "vs_ode": paired(ode, guided, cats),
               "vs_unguided_same_sampler": paired(same, guided, cats)}
        results["settings"].append(row)
        per_cat = " ".join(f"{c} {row['vs_ode'][c]['gain']:+.3f}" for c in ("colors", "counting", "position", "single"))
        vs_ode, vs_same = row["vs_ode"]["overall"], row["vs_unguided_same_sampler"]["overall"]
        print(f"{json.dumps(setting)}: {row['accuracy']:.3f}, vs ode {vs_ode['gain']:+.3f} +- {vs_ode['se']:.3f}, "
              f"vs unguided {vs_same['gain']:+.3f} ({per_cat})", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"guidance_sweep{'_' + args.tag if args.tag else ''}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
