"""Few-step distillation: DMD and Re-DMD students against their teacher, on toy2d and on shapes.

    python benchmarks/bench_distill.py --world toy2d [--epochs 200]
    python benchmarks/bench_distill.py --world shapes [--epochs 60] [--per-category 24] [--tasks dmd,re-dmd,rg-lcd]

toy2d (class "8gaussians"): 1-step and 4-step DMD students, a 1-step Re-DMD student (reward ``toy2d-linear``,
r = y), and 1-step LCD and RG-LCD (the same reward on the one-step prediction) students, all from the bundled
teacher. Energy distance of 4,000 student samples to 4,000 teacher samples (50
ODE steps), next to the teacher-vs-teacher noise floor (two independent teacher sample sets), the teacher run
at the student's step count (Euler), and the student at initialisation (the teacher with the student's step
rule); the mean reward shows whether Re-DMD tilts the student.

shapes: 4-step DMD, Re-DMD and RG-LCD (both with reward ``shapes-clip``) students of shapes-sd3
(``configs/{dmd,re-dmd,rg-lcd}/shapes.yaml``), against the teacher at 20 steps and at 4 steps (CFG 4; the students are
CFG-free): verifier accuracy per category on held-out prompts, shapes-clip reward, Fréchet distance of
shapes-clip image features to ground-truth renders of the same prompts, model evaluations and sampling wall
time per image (ratios measured in this script). Quality against training epochs and wall time come from each
run's periodic evaluation. Writes ``results/distill_<world>.json|png``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
CLASS = "8gaussians"


def _points(model, n: int, seed: int, steps: int | None = None, **kw) -> torch.Tensor:
    import flowalign as fa

    gen = torch.Generator().manual_seed(seed)
    return fa.sample(model, [CLASS], num_steps=steps, num_images_per_prompt=n, generator=gen, **kw).images.float()


def toy2d(args) -> dict:
    import flowalign as fa
    from flowalign.config import load_config
    from flowalign.zoo.toy2d import LinearReward, energy_distance, plot

    n, reward = args.n, LinearReward()
    teacher = fa.load_model("toy2d")
    ref, ref2 = _points(teacher, n, 1, 50), _points(teacher, n, 2, 50)
    path = RESULTS / "distill_toy2d.json"
    out = {"n": n, "epochs": args.epochs, "noise_floor": energy_distance(ref2, ref),
           "teacher_reward": reward(ref, [CLASS] * n).mean().item(),
           "runs": json.loads(path.read_text())["runs"] if args.merge and path.exists() else {}}
    base = {"model": "toy2d", "reward": "toy2d-linear", "prompts": f"toy2d:{CLASS}", "eval_prompts": None,
            "epochs": args.epochs, "groups_per_epoch": 1, "group_size": 256, "lr": 1e-3, "finetune": "full",
            "save_every": 0, "log_with": "none", "progress": False, "threads": args.threads}
    lcd = {"task": "rg-lcd", "student_steps": 1, "num_steps": 20, "solver_steps": 20, "rollout_batch_size": 256,
           "train_batch_size": 32, "train_timesteps": 1, "epochs": args.epochs // 5}  # 8 updates an epoch
    flash = {"task": "flash-dmd", "student_steps": 4, "disc": "critic", "gan_real": "teacher", "real_pool": 1024}
    runs = {"dmd-1step": {"task": "dmd", "student_steps": 1}, "dmd-4step": {"task": "dmd", "student_steps": 4},
            "flash-dmd-4step": {**flash, "ttur": 2, "critic_ema": 1.0},
            "flash-dmd-4step-critic-pull": {**flash, "ttur": 2, "critic_ema": 0.99},
            "flash-dmd-4step-rl": {**flash, "ttur": 2, "critic_ema": 1.0, "rl_every": 5},
            "re-dmd-1step": {"task": "re-dmd", "student_steps": 1, "reward_beta": 1.0},
            "lcd-1step": {**lcd, "reward_scale": 0.0}, "rg-lcd-1step": {**lcd, "reward_scale": 0.3}}
    if args.runs:
        runs = {k: v for k, v in runs.items() if k in args.runs.split(",")}
    samples = {"teacher (50 steps)": ref}
    for name, kw in runs.items():
        folder = Path(args.out) / name
        schema, train = _trainer(kw["task"])
        t0 = time.perf_counter()
        train(load_config(schema, {**base, **kw, "out": str(folder)}))
        seconds = time.perf_counter() - t0
        student = fa.load_model(str(folder / "student"))
        k = kw["student_steps"]
        xs, xt = _points(student, n, 3), _points(teacher, n, 4, k)
        x_init = _points(teacher, n, 5, k, sampler=student.default_sampler, eta=student.default_eta)
        out["runs"][name] = {"steps": k, "epochs": kw.get("epochs", args.epochs), "train_seconds": seconds,
                             "student_vs_teacher": energy_distance(xs, ref),
                             f"teacher_{k}step_vs_teacher": energy_distance(xt, ref),
                             "student_at_init_vs_teacher": energy_distance(x_init, ref),
                             "student_reward": reward(xs, [CLASS] * n).mean().item()}
        print(name, json.dumps(out["runs"][name]), flush=True)
        if k == 1 or args.runs:
            samples[f"{name} student"] = xs
    if not args.runs:
        samples["teacher at 1 step"] = _points(teacher, n, 4, 1)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(samples), figsize=(3.2 * len(samples), 3.2))
    for ax, (label, pts) in zip(axes, samples.items()):
        plot(pts[:2000], ax=ax, title=label)
    fig.tight_layout()
    fig.savefig(RESULTS / ("distill_toy2d_more.png" if args.runs else "distill_toy2d.png"), dpi=90)
    return out


def _features(reward, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([reward.backbone.embed_images(images[i:i + 256]) for i in range(0, len(images), 256)])


def _score(model, prompts, cats, steps, cfg, verifier, clip, renders_feat) -> dict:
    from flowalign.evaluation import evaluate
    from flowalign.functional.metrics import frechet_distance

    res = evaluate(model, verifier, prompts, cats, num_steps=steps, guidance_scale=cfg, progress=False,
                   return_images=True, batch_size=64)
    images = res.pop("images")
    res.pop("scores")
    t0 = time.perf_counter()  # sampling time alone (evaluate's includes the verifier)
    import flowalign as fa

    with torch.no_grad():
        for i in range(0, len(prompts), 64):
            fa.sample(model, prompts[i:i + 64], num_steps=steps, guidance_scale=cfg,
                      generator=torch.Generator().manual_seed(0))
    sample_s = (time.perf_counter() - t0) / len(prompts)
    return {"verifier": {k: v for k, v in res.items() if k not in ("n", "seconds")},
            "shapes_clip": clip(images, prompts).mean().item(),
            "frechet_clip_vs_renders": frechet_distance(_features(clip, images), renders_feat),
            "nfe": steps * (2 if cfg > 1 else 1), "seconds_per_image": sample_s}


def shapes(args) -> dict:
    import flowalign as fa
    from flowalign.config import load_config
    from flowalign.evaluation import shapes_prompts
    from flowalign.rewards.shapes import ShapesVerifier
    from flowalign.rewards.shapes_clip import ShapesClip
    from flowalign.zoo import shapes_data

    torch.set_num_threads(args.threads)
    prompts, cats = shapes_prompts("test", args.per_category, seed=0)
    specs = shapes_data.eval_prompts("test", args.per_category, seed=0)
    import numpy as np

    rng = np.random.default_rng(7)
    renders = torch.from_numpy(np.stack([shapes_data.render(s, 32, rng) for s in specs])).permute(0, 3, 1, 2)
    verifier, clip = ShapesVerifier(), ShapesClip()
    renders_feat = _features(clip, renders.float() / 255)
    path = RESULTS / "distill_shapes.json"
    out = json.loads(path.read_text()) if args.merge and path.exists() else {
        "prompts": len(prompts), "threads": args.threads, "models": {}, "curves": {}}
    if not isinstance(out.get("epochs"), dict):  # epochs per student
        out["epochs"] = {t: out["epochs"] for t in out["curves"]} if "epochs" in out else {}
    teacher = fa.load_model("shapes-sd3")
    for steps in (20, 4):
        if f"teacher {steps} steps" not in out["models"]:
            out["models"][f"teacher {steps} steps"] = _score(teacher, prompts, cats, steps, 4.0, verifier, clip,
                                                             renders_feat)
            print(f"teacher {steps}", json.dumps(out["models"][f"teacher {steps} steps"]), flush=True)
    for task in args.tasks.split(","):
        schema, train = _trainer(task)
        tags = [*args.set, *([f"{args.epochs} epochs"] if args.epochs != 60 else [])]
        name = task + (f" ({', '.join(tags)})" if tags else "")
        folder = Path(args.out) / (task + "".join("_" + t.replace("=", "-").replace(" ", "-") for t in tags))
        cfg = load_config(schema, ROOT / "configs" / task / "shapes.yaml",
                          [f"out={folder}", f"epochs={args.epochs}", f"threads={args.threads}", "progress=false",
                           *args.set])
        t0 = time.perf_counter()
        train(cfg)
        seconds = time.perf_counter() - t0
        student = fa.load_model(str(folder / "student"))
        res = _score(student, prompts, cats, cfg.student_steps, 1.0, verifier, clip, renders_feat)
        res["train_seconds"] = seconds
        out["models"][f"{name} student {cfg.student_steps} steps"] = res
        if task == "rg-lcd":  # RG-LCD trains independently of the step count: its 2-step sampling too (the paper's
            two = _score(student, prompts, cats, 2, 1.0, verifier, clip, renders_feat)  # headline student)
            out["models"][f"{name} student 2 steps"] = {**two, "train_seconds": seconds}
            print(name, "2 steps", json.dumps(two), flush=True)
        out["epochs"][name] = args.epochs
        print(name, json.dumps(res), flush=True)
        rec = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        out["curves"][name] = [{k: r[k] for k in ("epoch", "step", "time/total_s", "eval/shapes-geneval",
                                                   "eval/shapes-clip") if k in r}
                               for r in rec if "eval/shapes-geneval" in r]
    _plot_shapes(out)
    return out


def _trainer(task: str):
    from flowalign.trainers.dmd import DMDConfig, train_dmd
    from flowalign.trainers.flash_dmd import FlashDMDConfig, train_flash_dmd
    from flowalign.trainers.rg_lcd import RGLCDConfig, train_rg_lcd

    return {"rg-lcd": (RGLCDConfig, train_rg_lcd), "flash-dmd": (FlashDMDConfig, train_flash_dmd)}.get(
        task, (DMDConfig, train_dmd))


def _plot_shapes(out: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(13, 3.4))
    for task, curve in out["curves"].items():
        ep = [c["epoch"] for c in curve]
        wall = [c.get("time/total_s", 0.0) for c in curve]
        ax[0].plot(ep, [c["eval/shapes-geneval"] for c in curve], marker="o", label=task)
        ax[1].plot(wall, [c["eval/shapes-geneval"] for c in curve], marker="o", label=task)
        ax[2].plot(ep, [c["eval/shapes-clip"] for c in curve], marker="o", label=task)
    for name, m in out["models"].items():
        if name.startswith("teacher"):
            ax[0].axhline(m["verifier"]["overall"], ls="--", color="gray" if "20" in name else "silver", label=name)
            ax[2].axhline(m["shapes_clip"], ls="--", color="gray" if "20" in name else "silver", label=name)
    ax[0].set(xlabel="epoch (dmd: 5 critic + 1 student update; rg-lcd: 8 updates)",
              ylabel="verifier accuracy (48 held out)")
    ax[1].set(xlabel="training wall time (s)", ylabel="verifier accuracy (48 held out)")
    ax[2].set(xlabel="epoch", ylabel="shapes-clip")
    ax[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "distill_shapes.png", dpi=90)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", choices=["toy2d", "shapes"], default="toy2d")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--n", type=int, default=4000)
    p.add_argument("--per-category", type=int, default=24)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tasks", default="dmd,re-dmd,rg-lcd",
                   help="shapes: students to train (configs/<task>/shapes.yaml)")
    p.add_argument("--set", nargs="*", default=[], help="shapes: config overrides for the students, e.g. "
                                                             "student_steps=2 (the run is labelled with them)")
    p.add_argument("--runs", default=None, help="toy2d: comma-separated run names to train (default: all)")
    p.add_argument("--merge", action="store_true", help="add to results/distill_<world>.json (shapes: its teacher "
                                                         "rows are reused; toy2d: other runs are kept)")
    p.add_argument("--out", default=None, help="run folders (default runs/bench-distill-<world>)")
    args = p.parse_args()
    args.out = args.out or str(ROOT / "runs" / f"bench-distill-{args.world}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.world == "toy2d":
        args.epochs = args.epochs or 200
        torch.set_num_threads(args.threads)
        result = toy2d(args)
    else:
        args.epochs = args.epochs or 60
        result = shapes(args)
    (RESULTS / f"distill_{args.world}.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {RESULTS / f'distill_{args.world}.json'}")


if __name__ == "__main__":
    main()
