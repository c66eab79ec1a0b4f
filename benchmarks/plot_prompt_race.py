"""Euphonium against Flow-GRPO on a few captions (``benchmarks/prompt_race.sh``): verifier accuracy against
optimizer steps and wall time, each seed and the mean over seeds, and the steps each run needs to reach a threshold.

    python benchmarks/plot_prompt_race.py NAME [RUN_ROOT]

Reads ``RUN_ROOT/{grpo,euphonium}_seed*/metrics.jsonl`` (default: the committed copies,
``results/prompt_race_NAME/{grpo,euphonium}_seed*_metrics.jsonl``) and, for the thresholds, the base and the guided
base on the same samples from ``results/lora_gain_prompt_race_NAME.json`` (``bench_lora_gain.py --prompts PROMPTS
--repeat 96/n --seeds 12345 12346 12347 --guided-base 30 --guide-reward shapes-position --guide-window 0 8``: a
run of seed s evaluates on noise seed s + 12345, so these are its epoch-0 samples). The thresholds were fixed
before the runs: the guided base's accuracy (the issue's "the trained model without guidance reaches the base
with guidance") and halfway from the base to it. A run reaches a threshold at its first evaluation at or above it.
Writes ``results/prompt_race_NAME.png`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from plot_grpo_scale import save  # figure + data

RESULTS = Path(__file__).parent / "results"
METHODS = {"euphonium": "tab:purple", "grpo": "tab:orange"}


def runs(name: str, root: Path | None, method: str) -> list[list[tuple[int, float, float]]]:
    """Each seed's (optimizer steps, training seconds, verifier accuracy) at every evaluation."""
    files = (sorted(root.glob(f"{method}_seed*/metrics.jsonl")) if root else
             sorted((RESULTS / f"prompt_race_{name}").glob(f"{method}_seed*_metrics.jsonl")))
    out = []
    for f in files:
        rows = [json.loads(line) for line in f.read_text().splitlines()]
        out.append([(r["step"], r.get("time/total_s", 0.0), r["eval/shapes-geneval"])
                    for r in rows if "eval/shapes-geneval" in r])
    return out


def first_reach(points: list[tuple[int, float, float]], threshold: float) -> tuple[int, float] | None:
    """(steps, seconds) of the first evaluation at or above ``threshold``; None if never."""
    return next(((n, t) for n, t, acc in points if acc >= threshold - 1e-9), None)


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("name", help="the race's name: one_position, position8, ...")
    ap.add_argument("root", nargs="?", type=Path, help="its run folder (default: the committed copies)")
    args = ap.parse_args()
    name, root = args.name, args.root
    data = {m: runs(name, root, m) for m in METHODS}
    gain_file = RESULTS / f"lora_gain_prompt_race_{name}.json"
    guided = base = None
    if gain_file.exists():
        g = json.loads(gain_file.read_text())["guided_base"]["verifier"]["overall"]
        base, guided = g["base"], g["aligned"]
    thresholds = {} if guided is None else {"guided base": guided, "halfway": (base + guided) / 2}
    record: dict = {"thresholds": thresholds, "base": base, "runs": data, "reached": {}}
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    for method, colour in METHODS.items():
        seeds = data[method]
        for points in seeds:
            steps, seconds, acc = zip(*points)
            style = dict(color=colour, alpha=0.35, lw=1)
            by_step.plot(steps, acc, **style)
            by_time.plot([s / 60 for s in seconds], acc, **style)
        if seeds:
            n = min(len(p) for p in seeds)
            steps = [seeds[0][k][0] for k in range(n)]
            mean = [statistics.mean(p[k][2] for p in seeds) for k in range(n)]
            minutes = [statistics.mean(p[k][1] for p in seeds) / 60 for k in range(n)]
            label = f"{method} (mean of {len(seeds)} seeds)"
            by_step.plot(steps, mean, "o-", color=colour, ms=3, label=label)
            by_time.plot(minutes, mean, "o-", color=colour, ms=3, label=label)
        record["reached"][method] = {key: [first_reach(p, th) for p in seeds] for key, th in thresholds.items()}
    for key, th in thresholds.items():
        for ax in (by_step, by_time):
            ax.axhline(th, color="grey", ls="--" if key == "guided base" else ":", lw=1, label=f"{key} ({th:.3f})")
    by_step.set(xlabel="optimizer steps", ylabel="verifier accuracy, 96 samples, no guidance",
                title=f"Euphonium vs Flow-GRPO on the {name} captions")
    by_time.set(xlabel="training wall time, minutes (one core per run)", title="Against wall time")
    for ax in (by_step, by_time):
        ax.legend(fontsize=7)
    record["ratios"] = ratios(record["reached"], thresholds)
    save(fig, f"prompt_race_{name}", record)
    print(json.dumps(record["ratios"], indent=1))


def ratios(reached: dict, thresholds: dict) -> dict:
    """Per threshold: each method's mean steps and seconds to reach it over the seeds that did, how many did, and
    GRPO's mean over Euphonium's (> 1: Euphonium is faster)."""
    out = {}
    for key in thresholds:
        row = {}
        for method, hits in reached.items():
            done = [h for h in hits[key] if h is not None]
            row[method] = {"reached": f"{len(done)}/{len(hits[key])}",
                           "steps": statistics.mean(h[0] for h in done) if done else None,
                           "seconds": statistics.mean(h[1] for h in done) if done else None}
        e, g = row.get("euphonium", {}), row.get("grpo", {})
        for unit in ("steps", "seconds"):
            if e.get(unit) and g.get(unit):
                row[f"grpo/euphonium {unit}"] = g[unit] / e[unit]
        out[key] = row
    return out


if __name__ == "__main__":
    main()
