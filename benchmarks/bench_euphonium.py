"""Euphonium vs Flow-GRPO: optimizer steps and wall time to reach a fixed held-out score, over several seeds.

    python benchmarks/bench_euphonium.py --world toy2d                    # ~5 min on one core
    python benchmarks/bench_euphonium.py --world shapes [--seeds 0 1 2] [--epochs 40] [key=value ...]

Euphonium's headline (the paper: "accelerating training convergence by 1.66x") at our scale. For each seed, runs
``configs/grpo/<world>.yaml`` and ``configs/euphonium/<world>.yaml`` (the shared ``key=value`` overrides apply to
both), one fresh subprocess per run, one after the other. The score is measured on **unguided** ODE samples of
held-out prompts by the loop's periodic evaluation (fixed prompts and noise): on shapes the exact verifier's
accuracy (``eval/shapes-geneval``), on toy2d the mean reward ``y`` of 512 samples (``eval/toy2d-linear``). Wall time
is the sum of the epochs' rollout + training time (evaluations excluded). For each algorithm: the first evaluated
step (and its wall time) at which the score reaches ``--threshold``, per seed, then mean and spread.

After training, each Euphonium run also scores, on the same prompts and noise: the **base model with Euphonium's
reward guidance** (the config's process reward, scale and normalisation, every step guided; flow-sde and ODE) and
the **trained model without guidance** (flow-sde and ODE), for the claim "the trained model needs no reward model
at inference".

Writes ``results/euphonium_vs_grpo[_toy2d][_TAG].json`` and ``.png`` (score against optimizer steps and against wall
time: mean over seeds, min-max band).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"

WORLDS = {
    # metric, default threshold, overrides that make the loop evaluate what we measure
    "toy2d": {"metric": "eval/toy2d-linear", "threshold": 1.0, "sweep": [0.25, 0.5, 1.0],
              "overrides": ["eval_every=1", "eval_num=512", "eval_steps=10", "threads=1"]},
    # the verifier is the outcome reward (exact, 0/1), shapes-clip the process reward (euphonium only); both run
    # at the base's CFG 4 in rollouts and evaluation
    "shapes": {"metric": "eval/shapes-geneval", "threshold": 0.2, "sweep": [0.15, 0.2, 0.25],
               "overrides": ["reward=shapes-geneval", "eval_every=5", "eval_num=80", "eval_steps=20", "threads=2"]},
}
ALGOS = ("grpo", "euphonium")


# ----------------------------------------------------------------------------- one run (child process)
def child(cfg_path: str, post: bool, overrides: list[str]) -> None:
    import torch
    import yaml

    from flowalign.config import load_config
    from flowalign.trainers import TASKS
    from flowalign.trainers.euphonium import Euphonium
    from flowalign.trainers.grpo import GRPO
    from flowalign.trainers.loop import Run

    task = yaml.safe_load(open(cfg_path))["task"]
    cfg = load_config(TASKS[task][0], cfg_path, overrides)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run = Run(cfg, {"grpo": GRPO, "euphonium": Euphonium}[task](cfg))
    t = time.perf_counter()
    summary = run.train()
    result = {"seconds": time.perf_counter() - t, "summary": summary}
    if post and task == "euphonium":
        result["post"] = post_eval(run)
    print("RESULT", json.dumps(result))


def post_eval(run) -> dict:
    """Held-out score of the base with Euphonium guidance and of the trained model without it (same noise)."""
    import torch

    import flowalign as fa

    cfg, algo = run.cfg, run.algorithm
    metric = [n for n in run.eval_rewards() if n in ("shapes-geneval", cfg.reward)][0]
    reward = run.eval_rewards()[metric]
    guide = None
    if algo.guide is not None and cfg.guide_scale > 0:
        import copy

        guide = copy.copy(algo.guide)
        guide.window, guide.history, guide.record = None, [], False

    def score(base: bool, sampler: str, guidance) -> dict:
        gen = torch.Generator().manual_seed(cfg.seed + 12345)
        weights = run.reference() if base else run.ema_weights()
        images = []
        t = time.perf_counter()
        with weights, run.unwrapped():
            for i in range(0, len(run.eval_prompts), cfg.rollout_batch_size):
                traj = fa.sample(run.model, run.eval_prompts[i:i + cfg.rollout_batch_size], num_steps=cfg.eval_steps,
                                 sampler=sampler, eta=cfg.eta if sampler != "ode" else None, generator=gen,
                                 guidance=guidance, **run.size(),
                                 guidance_scale=cfg.eval_guidance_scale if cfg.eval_guidance_scale is not None
                                 else cfg.guidance_scale)
                images.append(traj.images.float())
        s = reward(torch.cat(images), run.eval_prompts).float().mean().item()
        return {"score": s, "seconds": time.perf_counter() - t}

    out = {"metric": metric, "n": len(run.eval_prompts), "eval_steps": cfg.eval_steps}
    for name, base, sampler, g in [("base/ode", True, "ode", None), ("base/sde", True, cfg.sampler, None),
                                   ("base+guidance/ode", True, "ode", guide),
                                   ("base+guidance/sde", True, cfg.sampler, guide),
                                   ("trained/ode", False, "ode", None), ("trained/sde", False, cfg.sampler, None)]:
        if g is None and "guidance" in name:
            continue
        if g is not None and sampler == "ode" and g.beta is not None:
            continue  # the KL form c = g^2 / (2 beta) is 0 without sampler noise: no ODE counterpart
        out[name] = score(base, sampler, g)
    return out


# ----------------------------------------------------------------------------- the comparison
def run_one(world: str, algo: str, seed: int, epochs: int | None, overrides: list[str], root: Path) -> dict:
    out = root / f"{algo}-seed{seed}"
    spec = WORLDS[world]
    extra = list(spec["overrides"])
    if world == "toy2d":  # 512 held-out samples of the training class
        prompts = root / "toy2d_eval_prompts.txt"
        prompts.write_text("8gaussians\n" * 512)
        extra.append(f"eval_prompts={prompts}")
    if epochs:
        extra.append(f"epochs={epochs}")
    cmd = [sys.executable, __file__, "--child", str(ROOT / "configs" / algo / f"{world}.yaml"), "--",
           f"out={out}", f"seed={seed}", "progress=false", "log_with=none", "save_every=0", *extra, *overrides]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{algo} seed {seed} failed:\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT "):])
    history = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    elapsed = 0.0
    curve = []
    for r in history:
        elapsed += r.get("time/epoch_s", 0.0)
        if spec["metric"] in r:
            curve.append({"epoch": r["epoch"], "step": r["step"], "train_s": elapsed, "score": r[spec["metric"]]})
    result.update({"curve": curve, "process_s": time.perf_counter() - t, "run": str(out),
                   "rollout_reward": [r["reward/mean"] for r in history if "reward/mean" in r]})
    print(f"  {algo} seed {seed}: {curve[0]['score']:.3f} -> {curve[-1]['score']:.3f} in {elapsed:.0f} s "
          f"({result['process_s']:.0f} s with evaluations)", flush=True)
    return result


def first_reach(curve: list[dict], threshold: float) -> dict | None:
    for c in curve:
        if c["score"] >= threshold:
            return {"step": c["step"], "epoch": c["epoch"], "train_s": c["train_s"]}
    return None


def summarise(runs: dict, threshold: float) -> dict:
    """Per algorithm: seeds that reach ``threshold``, mean and spread of their steps and wall time, final scores.
    A seed that never reaches it counts as its last evaluation in the ``*_censored`` means (a lower bound), and the
    speedups (GRPO / Euphonium) are exact when every seed reaches it, else lower bounds (``speedup_is_bound``)."""
    import statistics as st

    out = {}
    for algo, seeds in runs.items():
        reach = [first_reach(r["curve"], threshold) for r in seeds.values()]
        hit = [x for x in reach if x is not None]
        last = [r["curve"][-1] for r in seeds.values()]
        censored = [x if x is not None else {"step": c["step"], "train_s": c["train_s"]} for x, c in zip(reach, last)]
        finals = [c["score"] for c in last]
        out[algo] = {
            "seeds": len(reach), "reached": len(hit), "per_seed": reach,
            "steps_mean": st.mean(x["step"] for x in hit) if hit else None,
            "steps_std": st.pstdev([x["step"] for x in hit]) if hit else None,
            "train_s_mean": st.mean(x["train_s"] for x in hit) if hit else None,
            "train_s_std": st.pstdev([x["train_s"] for x in hit]) if hit else None,
            "steps_censored_mean": st.mean(x["step"] for x in censored),
            "train_s_censored_mean": st.mean(x["train_s"] for x in censored),
            "final_mean": st.mean(finals), "final_min": min(finals), "final_max": max(finals),
            "train_s_per_step": st.mean(c["train_s"] / max(1, c["step"]) for c in last),
        }
    g, e = out.get("grpo"), out.get("euphonium")
    if g and e and e["reached"] == e["seeds"]:
        out["speedup_steps"] = g["steps_censored_mean"] / e["steps_censored_mean"]
        out["speedup_wall"] = g["train_s_censored_mean"] / e["train_s_censored_mean"]
        out["speedup_is_bound"] = g["reached"] < g["seeds"]
    return out


def post_summary(runs: dict) -> dict:
    import statistics as st

    posts = [r["post"] for r in runs.get("euphonium", {}).values() if "post" in r]
    if not posts:
        return {}
    keys = [k for k in posts[0] if isinstance(posts[0][k], dict)]
    out = {k: {"mean": st.mean(p[k]["score"] for p in posts), "per_seed": [p[k]["score"] for p in posts]}
           for k in keys}
    if "base+guidance/sde" in out:
        best_guided = max(out[k]["mean"] for k in ("base+guidance/sde", "base+guidance/ode") if k in out)
        out["claim_trained_unguided_ge_base_guided"] = {
            "trained/ode": out["trained/ode"]["mean"] >= best_guided,
            "trained/sde": out["trained/sde"]["mean"] >= best_guided,
            "per_seed_ode_vs_same_sampler": [p["trained/ode"]["score"] >= p["base+guidance/ode"]["score"]
                                             for p in posts if "base+guidance/ode" in p],
            "per_seed_sde_vs_same_sampler": [p["trained/sde"]["score"] >= p["base+guidance/sde"]["score"]
                                             for p in posts]}
    return out


def plot(runs: dict, threshold: float, metric: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for algo, color in zip(ALGOS, ("tab:blue", "tab:orange")):
        seeds = list(runs.get(algo, {}).values())
        if not seeds:
            continue
        n = min(len(r["curve"]) for r in seeds)
        steps = np.array([c["step"] for c in seeds[0]["curve"][:n]])
        y = np.array([[c["score"] for c in r["curve"][:n]] for r in seeds])
        t = np.array([[c["train_s"] for c in r["curve"][:n]] for r in seeds])
        for ax, x in ((axes[0], steps), (axes[1], t.mean(0))):
            ax.plot(x, y.mean(0), color=color, label=f"{algo} (mean of {len(seeds)} seeds)")
            ax.fill_between(x, y.min(0), y.max(0), color=color, alpha=0.2)
    top = max(max(line.get_ydata().max() for line in ax.get_lines()) for ax in axes if ax.get_lines())
    for ax, xl in zip(axes, ("optimizer steps", "wall time, s (rollouts + training)")):
        if top > 5 * abs(threshold) > 0:  # a run that runs away (toy2d's unbounded reward): keep the threshold visible
            ax.set_yscale("symlog", linthresh=abs(threshold))
        ax.axhline(threshold, color="gray", ls="--", lw=1, label=f"threshold {threshold:g}")
        ax.set_xlabel(xl)
        ax.set_ylabel(f"{metric} (unguided ODE, held out)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    if "--child" in sys.argv:
        i = sys.argv.index("--child")
        cfg_path, rest = sys.argv[i + 1], sys.argv[i + 2:]
        rest = rest[1:] if rest and rest[0] == "--" else rest
        post = "--post" in rest
        child(cfg_path, post, [a for a in rest if a != "--post"])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", choices=list(WORLDS), default="shapes")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=None, help="epochs of every run (default: the configs')")
    ap.add_argument("--threshold", type=float, default=None, help="score to reach (default: per world)")
    ap.add_argument("--algos", nargs="+", default=list(ALGOS), choices=ALGOS)
    ap.add_argument("--runs-dir", default=None, help="run folders (default: /tmp/bench-euphonium-<world><tag>)")
    ap.add_argument("--results-dir", default=str(RESULTS), help="where the JSON and PNG go")
    ap.add_argument("--tag", default="", help="suffix of the result files and run folders")
    ap.add_argument("--from-json", default=None, help="recompute the summary and the plot of an earlier result file")
    ap.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    args = ap.parse_args()
    if args.from_json:
        path = Path(args.from_json)
        result = json.loads(path.read_text())
        runs = {a: {int(k): r for k, r in rs.items()} for a, rs in result["runs"].items()}
        spec, threshold = WORLDS[result["world"]], result["threshold"]
        result.update(summary=summarise(runs, threshold), after_training=post_summary(runs),
                      sweep={str(x): summarise(runs, x) for x in spec["sweep"]})
        path.write_text(json.dumps(result, indent=1))
        plot(runs, threshold, spec["metric"], path.with_suffix(".png"),
             f"{result['world']}: Euphonium vs Flow-GRPO, {len(result['seeds'])} seeds")
        print(json.dumps({"summary": result["summary"], "after_training": result["after_training"]}, indent=1))
        return
    spec = WORLDS[args.world]
    threshold = spec["threshold"] if args.threshold is None else args.threshold
    suffix = ("" if args.world == "shapes" else f"_{args.world}") + (f"_{args.tag}" if args.tag else "")
    root = Path(args.runs_dir or f"/tmp/bench-euphonium-{args.world}{'-' + args.tag if args.tag else ''}")
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    runs: dict[str, dict[int, dict]] = {a: {} for a in args.algos}
    for seed in args.seeds:  # interleaved, so a busy machine slows both algorithms alike
        for algo in args.algos:
            over = list(args.overrides) + (["--post"] if algo == "euphonium" else [])
            runs[algo][seed] = run_one(args.world, algo, seed, args.epochs, over, root)
    result = {"world": args.world, "metric": spec["metric"], "threshold": threshold, "seeds": args.seeds,
              "epochs": args.epochs, "overrides": spec["overrides"] + list(args.overrides),
              "total_s": time.perf_counter() - t0, "summary": summarise(runs, threshold),
              "sweep": {str(x): summarise(runs, x) for x in spec["sweep"]},
              "after_training": post_summary(runs),
              "runs": {a: {str(s): r for s, r in rs.items()} for a, rs in runs.items()}}
    res_dir = Path(args.results_dir)
    res_dir.mkdir(parents=True, exist_ok=True)
    path = res_dir / f"euphonium_vs_grpo{suffix}.json"
    path.write_text(json.dumps(result, indent=1))
    plot(runs, threshold, spec["metric"], path.with_suffix(".png"),
         f"{args.world}: Euphonium vs Flow-GRPO, {len(args.seeds)} seeds")
    print(json.dumps({"summary": result["summary"], "after_training": result["after_training"]}, indent=1))
    print(f"wrote {path} and {path.with_suffix('.png')} ({result['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
