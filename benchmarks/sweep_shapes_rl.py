"""Run several shapes RL recipes side by side under one wall-clock budget and compare their held-out curves.

    python benchmarks/sweep_shapes_rl.py --sweep batch [--budget-s 480] [--threads 2] [--device cuda] [--out DIR]

Each run of the named sweep is ``flowalign train configs/<task>/shapes.yaml`` with its overrides, in its own
process, all started at once and stopped when the budget runs out (the metrics stream to each run's
metrics.jsonl, so a stopped run keeps its curve). Every run optimises the exact verifier (``shapes-geneval``; the
``partial`` and ``prefs`` sweeps its partial credit, ``shapes-geneval-partial``) at the base's CFG and evaluates
all 118 held-out test prompts (``eval_num=200`` takes the whole split) with the strict verifier and one fixed
noise seed. On a GPU machine the runs share the device; on 2 CPU cores run one or two at a time.

Writes ``DIR/sweep_<name>.json`` (per run: the overrides, epochs done, seconds per epoch, the evaluation curve and
the rollout reward per epoch) and ``DIR/sweep_<name>.png`` (held-out accuracy against optimizer steps and against
epochs).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"

COMMON = ["reward=shapes-geneval", "guidance_scale=4.0", "eval_num=200", "eval_every=10", "epochs=1000",
          "save_every=0", "log_with=none", "progress=false"]
BIG = ["groups_per_epoch=32", "rollout_batch_size=128", "train_batch_size=128"]

SWEEPS = {
    # does a bigger batch per optimizer step (more prompts per epoch) make GRPO and CRD learn the verifier?
    "batch": {
        "grpo_b64": ("grpo", []),
        "grpo_b256": ("grpo", BIG),
        "grpo_b256_seed1": ("grpo", BIG + ["seed=1"]),
        "grpo_b256_lr3e-3": ("grpo", BIG + ["lr=3e-3"]),
        "grpo_b256_clip1e-2": ("grpo", BIG + ["clip_range=1e-2", "beta=0.04"]),
        "grpo_b256_all_steps": ("grpo", BIG + ["sde_window_size=0", "timestep_fraction=0.4"]),
        "grpo_g16x16": ("grpo", ["groups_per_epoch=16", "group_size=16", "rollout_batch_size=128",
                                 "train_batch_size=128"]),
        "crd_b64": ("crd", []),
        "crd_b256": ("crd", BIG),
        "crd_b256_lr2e-3": ("crd", BIG + ["lr=2e-3"]),
        "euphonium_b64": ("euphonium", []),
        "euphonium_b256": ("euphonium", BIG),
    },
    # 2 CPU cores, one thread each: 256 rollouts per epoch (32 prompts x 8) in optimizer steps of 32 samples
    "cpu": {
        "grpo_32groups": ("grpo", ["groups_per_epoch=32", "lr=2e-3", "clip_range=1e-2", "beta=0.04"]),
        "grpo_32groups_same_noise": ("grpo", ["groups_per_epoch=32", "lr=2e-3", "clip_range=1e-2", "beta=0.04",
                                              "same_noise=true"]),
        # branching at the first step: the window always starts at step 0, where a group's samples still diverge
        "grpo_32groups_same_noise_w0": ("grpo", ["groups_per_epoch=32", "lr=2e-3", "clip_range=1e-2", "beta=0.04",
                                                 "same_noise=true", "sde_window_range=0.1"]),
        "grpo_32groups_lr3e-3": ("grpo", ["groups_per_epoch=32", "lr=3e-3", "clip_range=1e-2", "beta=0.04"]),
        "crd_32groups": ("crd", ["groups_per_epoch=32", "train_guidance_scale=4.0"]),
    },
    # the preference and reweighting recipes on the verifier's partial credit, 256 rollouts per epoch
    "prefs": {
        "rwr_partial": ("rwr", ["groups_per_epoch=32", "reward=shapes-geneval-partial"]),
        "dpo_partial": ("dpo", ["groups_per_epoch=32", "reward=shapes-geneval-partial", "pairing=all",
                                "pair_margin=0.25"]),
        "d3po_partial": ("d3po", ["groups_per_epoch=64", "reward=shapes-geneval-partial"]),
    },
    # GRPO trained on the verifier's partial credit (shapes-geneval-partial), still judged by the strict verifier
    "partial": {
        "grpo_partial": ("grpo", ["groups_per_epoch=32", "lr=3e-3", "clip_range=1e-2", "beta=0.04",
                                  "reward=shapes-geneval-partial"]),
        "grpo_partial_same_noise_w0": ("grpo", ["groups_per_epoch=32", "lr=3e-3", "clip_range=1e-2", "beta=0.04",
                                                "reward=shapes-geneval-partial", "same_noise=true",
                                                "sde_window_range=0.1"]),
        "grpo_partial_same_noise_w0_lr1e-3": ("grpo", ["groups_per_epoch=32", "lr=1e-3", "clip_range=1e-2",
                                                       "beta=0.04", "reward=shapes-geneval-partial",
                                                       "same_noise=true", "sde_window_range=0.1"]),
    },
}

TRAIN = "import sys; from flowalign.cli import main; sys.exit(main(sys.argv[1:]))"


def launch(name: str, task: str, overrides: list[str], out: Path, threads: int, device: str | None) -> subprocess.Popen:
    run_dir = out / name
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-c", TRAIN, "train", str(ROOT / "configs" / task / "shapes.yaml"), f"out={run_dir}",
           f"threads={threads}", *([f"device={device}"] if device else []), *COMMON, *overrides]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    log = open(run_dir / "train.log", "w")
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def summarise(task: str, overrides: list[str], run_dir: Path, returncode: int | None) -> dict:
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []
    epochs = [r for r in rows if "time/epoch_s" in r]
    evals = [r for r in rows if "eval/shapes-geneval" in r]
    cfg_path = run_dir / "config.yaml"
    config = __import__("yaml").safe_load(cfg_path.read_text()) if cfg_path.exists() else None
    return {
        "task": task, "overrides": overrides, "config": config, "returncode": returncode, "epochs_done": len(epochs),
        "s_per_epoch": sum(r["time/epoch_s"] for r in epochs) / max(1, len(epochs)),
        "rollout_reward": [r["reward/mean"] for r in epochs],
        "eval": [{k: v for k, v in r.items() if k in ("epoch", "step", "time/total_s") or k.startswith("eval/")}
                 for r in evals],
        "log_tail": (run_dir / "train.log").read_text()[-1500:] if returncode else "",
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for name, res in results.items():
        ev = res["eval"]
        if not ev:
            continue
        axes[0].plot([r["step"] for r in ev], [r["eval/shapes-geneval"] for r in ev], marker=".", label=name)
        axes[1].plot([r["epoch"] for r in ev], [r["eval/shapes-geneval"] for r in ev], marker=".", label=name)
        rr = res["rollout_reward"]
        k = 10
        smooth = [sum(rr[max(0, i - k + 1):i + 1]) / len(rr[max(0, i - k + 1):i + 1]) for i in range(len(rr))]
        axes[2].plot(range(1, len(rr) + 1), smooth, label=name)
    axes[0].set(xlabel="optimizer steps", ylabel="held-out verifier accuracy (118 prompts)")
    axes[1].set(xlabel="epochs", ylabel="held-out verifier accuracy")
    axes[2].set(xlabel="epochs", ylabel="rollout reward (10-epoch mean)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", default="batch", choices=sorted(SWEEPS))
    ap.add_argument("--only", nargs="*", help="Run only these runs of the sweep.")
    ap.add_argument("--budget-s", type=float, default=480.0, help="Wall-clock budget; runs still going are stopped.")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads per run.")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available).")
    ap.add_argument("--out", default=str(ROOT / "runs" / "sweep"), help="Folder for the runs.")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="Overrides applied to every run last.")
    ap.add_argument("--results", default=str(RESULTS), help="Folder for the summary JSON and PNG.")
    ap.add_argument("--collect", action="store_true", help="Launch nothing: summarise the sweep's run folders "
                                                           "already under --out (runs done one at a time).")
    args = ap.parse_args()

    runs = {k: v for k, v in SWEEPS[args.sweep].items() if not args.only or k in args.only}
    out = Path(args.out) / args.sweep
    if args.collect:
        runs = {k: v for k, v in runs.items() if (out / k / "metrics.jsonl").exists()}
    procs = {} if args.collect else {name: launch(name, task, ov + args.set, out, args.threads, args.device)
                                     for name, (task, ov) in runs.items()}
    t0 = time.time()
    while time.time() - t0 < args.budget_s and any(p.poll() is None for p in procs.values()):
        time.sleep(5)
    for p in procs.values():
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    time.sleep(3)
    for p in procs.values():
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    codes = {name: p.returncode if p.returncode not in (-signal.SIGTERM, -signal.SIGKILL) else None
             for name, p in procs.items()}
    results = {name: summarise(task, ov + args.set, out / name, codes.get(name))
               for name, (task, ov) in runs.items()}
    results_dir = Path(args.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    meta = {"sweep": args.sweep, "set": args.set, "budget_s": args.budget_s, "device": args.device,
            "threads": args.threads, "common_overrides": COMMON}
    (results_dir / f"sweep_{args.sweep}.json").write_text(json.dumps({"meta": meta, "runs": results}, indent=1))
    plot(results, results_dir / f"sweep_{args.sweep}.png")
    for name, res in results.items():
        ev = res["eval"]
        curve = " ".join(f"{r['eval/shapes-geneval']:.3f}" for r in ev)
        print(f"{name:22s} epochs {res['epochs_done']:4d}  {res['s_per_epoch']:.2f} s/epoch  eval: {curve}")
        if res["log_tail"]:
            print("   FAILED:", res["log_tail"][-600:])


if __name__ == "__main__":
    main()
