"""Alignment on the shapes world: held-out verifier accuracy and reward against optimizer steps and wall time.

    python benchmarks/bench_alignment.py [--algos grpo crd] [--epochs N] [key=value ...]

Runs each algorithm's ``configs/<algo>/shapes.yaml`` (extra ``key=value`` overrides apply to all), one after
the other in this process, then writes ``results/alignment_shapes[-TAG].json`` and ``.png``:
evaluation curves per epoch and per second, rollout and training throughput (samples/s) and the peak resident
memory of each run (a fresh subprocess per run, so peaks do not mix).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"

RUNNER = r"""
import json, os, resource, sys, threading, time
parent = os.getppid()
def orphaned():  # stop when the benchmark that started this run is killed
    while os.getppid() == parent:
        time.sleep(2)
    os._exit(1)
threading.Thread(target=orphaned, daemon=True).start()
from flowalign.config import load_config
from flowalign.trainers import TASKS
import importlib
cfg_path, overrides = sys.argv[1], sys.argv[2:]
import yaml
task = yaml.safe_load(open(cfg_path))["task"]
schema, entry = TASKS[task]
cfg = load_config(schema, cfg_path, overrides)
module, fn = entry.split(":")
train = getattr(importlib.import_module(module), "train_" + task)
t = time.perf_counter()
summary = train(cfg)
print("RESULT", json.dumps({"seconds": time.perf_counter() - t,
                            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                            "summary": summary}))
"""


def run(algo: str, overrides: list[str], tag: str = "") -> dict:
    out = ROOT / "runs" / f"bench-{algo}{tag}"
    cmd = [sys.executable, "-c", RUNNER, str(ROOT / "configs" / algo / "shapes.yaml"), f"out={out}",
           "progress=false", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{algo} failed:\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT "):])
    history = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    cfg = json.loads(json.dumps(__import__("yaml").safe_load((out / "config.yaml").read_text())))
    n = cfg["groups_per_epoch"] * cfg["group_size"]
    epochs = [r for r in history if "time/epoch_s" in r]
    result.update({"history": history, "samples_per_epoch": n,
                   "samples_per_s": n * len(epochs) / sum(r["time/epoch_s"] for r in epochs),
                   "rollout_samples_per_s": n * len(epochs) / sum(r["time/rollout_s"] for r in epochs),
                   "train_samples_per_s": n * len(epochs) / sum(r["time/train_s"] for r in epochs),
                   "optimizer_steps": history[-1]["step"], "run": str(out.relative_to(ROOT)), "overrides": overrides})
    return result


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for algo, res in results.items():
        ev = [r for r in res["history"] if "eval/shapes-geneval" in r]
        t = [r.get("time/total_s", 0.0) for r in ev]
        axes[0].plot([r["step"] for r in ev], [r["eval/shapes-geneval"] for r in ev], marker="o", label=algo)
        axes[1].plot(t, [r["eval/shapes-geneval"] for r in ev], marker="o", label=algo)
        axes[2].plot([r["step"] for r in ev], [r["eval/shapes-clip"] for r in ev], marker="o", label=algo)
    axes[0].set(xlabel="optimizer steps", ylabel="held-out verifier accuracy")
    axes[1].set(xlabel="wall time (s, training only)", ylabel="held-out verifier accuracy")
    axes[2].set(xlabel="optimizer steps", ylabel="held-out shapes-clip")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--algos", nargs="+", default=["grpo", "crd"])
    ap.add_argument("--tag", default="", help="suffix for the run folders and result files (e.g. verifier)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    args = ap.parse_args()
    tag = f"-{args.tag}" if args.tag else ""
    results = {a: run(a, args.overrides, tag) for a in args.algos}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"alignment_shapes{tag}.json"
    # runs of other algorithms under the same tag (say, --algos crd after --algos grpo) are kept, not overwritten
    merged = {**(json.loads(path.read_text()) if path.exists() else {}), **results}
    path.write_text(json.dumps(merged, indent=2))
    plot(merged, path.with_suffix(".png"))
    for algo, res in results.items():
        s = res["summary"]
        print(f"{algo}: {res['seconds']:.0f} s, {res['optimizer_steps']} steps, {res['samples_per_s']:.1f} samples/s "
              f"(rollout {res['rollout_samples_per_s']:.1f}, training {res['train_samples_per_s']:.1f}), "
              f"peak RSS {res['peak_rss_mib']:.0f} MiB")
        for k in s.get("after", {}):
            if k.startswith("eval/"):
                print(f"  {k[5:]:<28} {s['before'].get(k, float('nan')):.3f} -> {s['after'][k]:.3f}")


if __name__ == "__main__":
    main()
