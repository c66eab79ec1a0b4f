"""The base model on a GRPO run's own rollouts: the same prompts, SDE windows and noise, the LoRA at zero.

    python benchmarks/replay_base_rollouts.py RUN_DIR [--epochs 1 40] [--every 1] [--threads 1]

A run's rollout reward per epoch (``reward/mean`` in metrics.jsonl) mixes the policy's progress with the draw of
that epoch's prompts, which moves it by several hundredths from epoch to epoch. Every draw of an epoch is a
function of the seed and the epoch (``Run.generators``), so the base model can replay the epoch exactly: same
prompts, same SDE window, same noise. The difference per epoch, run minus base, is then the training effect on
the training prompts. Epoch 1 is rolled out with the LoRA still zero, so there the two must agree exactly (the
script checks it). Writes ``RUN_DIR/base_rollouts.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="A grpo run folder (config.yaml and metrics.jsonl).")
    ap.add_argument("--epochs", type=int, nargs=2, default=None, metavar=("FIRST", "LAST"),
                    help="Epochs to replay, 1-based and inclusive (default: every epoch the run logged).")
    ap.add_argument("--every", type=int, default=1, help="Replay every this many epochs (from FIRST).")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    from tqdm.auto import tqdm

    from flowalign.config import load_config
    from flowalign.trainers.grpo import GRPO, GRPOConfig
    from flowalign.trainers.loop import Run

    run_dir = Path(args.run)
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    logged = {r["epoch"]: r["reward/mean"] for r in records if "reward/mean" in r}
    first, last = args.epochs or (min(logged), max(logged))
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(GRPOConfig, str(run_dir / "config.yaml"),
                          [f"out={tmp}", "eval_prompts=null", f"threads={args.threads}", "log_with=none",
                           "progress=false", "resume=null"])
        algo = GRPO(cfg)
        run = Run(cfg, algo)
        rows = []
        for epoch in tqdm(range(first, last + 1, args.every), desc="base rollouts"):
            shared, local = run.generators(epoch - 1)
            _, _, traj = algo.draw(run, shared, local)
            base = run.score(traj).mean().item()
            rows.append({"epoch": epoch, "run": logged.get(epoch), "base": base})
    if rows[0]["epoch"] == 1 and rows[0]["run"] is not None and not math.isclose(rows[0]["run"], rows[0]["base"],
                                                                                 abs_tol=1e-6):
        raise SystemExit(f"Epoch 1 does not replay: the run logged {rows[0]['run']}, the replay gives "
                         f"{rows[0]['base']}. The run's code or settings differ from this checkout's.")
    diffs = [r["run"] - r["base"] for r in rows if r["run"] is not None]
    out = {"run": str(run_dir), "epochs": rows, "mean_gain": sum(diffs) / max(1, len(diffs))}
    (run_dir / "base_rollouts.json").write_text(json.dumps(out, indent=1))
    k = max(1, 10 // args.every)  # blocks of about 10 epochs
    for i in range(0, len(rows), k):
        block = [r for r in rows[i:i + k] if r["run"] is not None]
        if block:
            run_mean, base_mean = (sum(r[key] for r in block) / len(block) for key in ("run", "base"))
            print(f"epochs {block[0]['epoch']:4d}-{block[-1]['epoch']:4d}: run {run_mean:.3f}  base {base_mean:.3f}"
                  f"  gain {run_mean - base_mean:+.3f}")


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    main()
