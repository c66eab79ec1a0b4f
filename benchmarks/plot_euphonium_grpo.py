"""Euphonium against Flow-GRPO on shapes (v3 base, shapes-geneval-soft): held-out verifier accuracy against
optimizer steps and wall time, and paired gains.

    python benchmarks/plot_euphonium_grpo.py

Runs: ``configs/euphonium/shapes-gpu.yaml`` at CPU scale (``groups_per_epoch=32 rollout_batch_size=32
train_batch_size=32``, 8 optimizer steps per epoch, seeds 0-2), ``configs/grpo/shapes-branch.yaml
reward=shapes-geneval-soft`` (the same GRPO settings and scale; one seed, 100 epochs), and the GPU GRPO runs at 16x the
groups per step (``configs/grpo/shapes-gpu.yaml``; also 8 steps per epoch). Left and middle: each run's own
evaluation (118 held-out prompts on the seed's fixed noise, so the change from epoch 0 is paired within a run, but
one draw); the wall-time axis uses the CPU runs' logged time (``time/total_s``). Right: paired held-out gains
(``bench_lora_gain.py``, 118 prompts x noise seeds 0-3, +- one standard error). Reads the committed files in
``results/``; writes ``results/euphonium_grpo_v3.png`` and ``.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

from plot_grpo_scale import gain, save  # a LoRA's paired gain in a bench_lora_gain.py result; figure + data

RESULTS = Path(__file__).parent / "results"
STEPS_PER_EPOCH = 8
RUNS = {  # label: metrics files of its seeds
    "Euphonium, 32 groups/step (CPU)": [f"alignment_v3/euphonium_cpu_seed{s}_metrics.jsonl" for s in (0, 1, 2)],
    "GRPO, 32 groups/step (CPU)": ["alignment_v3/grpo_soft_same_noise_w0_seed0_metrics.jsonl"],
    "GRPO, 512 groups/step (GPU)": [f"alignment_v3/grpo_gpu_seed{s}_metrics.jsonl" for s in (0, 1, 2)],
}
GAINS = {  # label: [(gain file, LoRA key ending, optimizer steps)]
    "Euphonium, 32 groups/step (CPU)": [("lora_gain_euphonium_cpu.json", f"euph_cpu_s{s}/lora", 50 * STEPS_PER_EPOCH)
                                        for s in (0, 1, 2)],
    "GRPO, 32 groups/step (CPU)": [("lora_gain_soft_grpo_crd_seed0.json", key, epochs * STEPS_PER_EPOCH)
                                   for key, epochs in (("epoch-0050/lora", 50), ("grpo_soft_seed0/lora", 100))],
    "GRPO, 512 groups/step (GPU)": [("lora_gain_grpo_gpu_e75.json", f"gpu_s{s}_e75", 75 * STEPS_PER_EPOCH)
                                    for s in (0, 1, 2)]
    + [("lora_gain_grpo_gpu_e95.json", f"gpu_s{s}_e95", 95 * STEPS_PER_EPOCH) for s in (0, 1, 2)],
}


def curve(path: Path) -> list[tuple[int, float, float]]:
    """(optimizer steps, seconds, held-out verifier accuracy - its epoch-0 value) at every evaluation."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    evals = [(r["epoch"] * STEPS_PER_EPOCH, r.get("time/total_s", 0.0), r["eval/shapes-geneval"]) for r in rows
             if "eval/shapes-geneval" in r]
    base = evals[0][2]
    return [(n, t, acc - base) for n, t, acc in evals]


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {label: [curve(RESULTS / f) for f in files if (RESULTS / f).exists()] for label, files in RUNS.items()}
    gains = {label: [(n, *gain(RESULTS / f, key)) for f, key, n in points if (RESULTS / f).exists()]
             for label, points in GAINS.items()}
    fig, (by_step, by_time, paired) = plt.subplots(1, 3, figsize=(16, 4.5))
    for (label, runs), colour in zip(curves.items(), ("tab:purple", "tab:orange", "tab:green")):
        for i, points in enumerate(runs):
            steps, seconds, acc = zip(*points)
            style = dict(color=colour, alpha=0.8, ms=3, label=label if i == 0 else None)
            by_step.plot(steps, acc, "o-", **style)
            if "CPU" in label:
                by_time.plot([s / 60 for s in seconds], acc, "o-", **style)
    by_step.set(xlabel="optimizer steps", ylabel="held-out verifier - epoch 0's (one draw per seed)",
                title="Each run's own evaluation")
    by_time.set(xlabel="wall time, minutes (CPU runs, one core each or less)", title="Against wall time")
    for (label, points), colour in zip(gains.items(), ("tab:purple", "tab:orange", "tab:green")):
        if points:
            x, y, e = zip(*points)
            paired.errorbar(x, y, yerr=e, fmt="o", color=colour, capsize=3, label=label, alpha=0.8)
    paired.set(xlabel="optimizer steps", ylabel="paired held-out verifier gain (+- 1 s.e.)",
               title="Paired gain over the base (472 samples)")
    for ax in (by_step, by_time, paired):
        ax.axhline(0, color="grey", lw=0.8)
        ax.legend(fontsize=7)
    save(fig, "euphonium_grpo_v3", {"curves": curves, "gains": gains})
    print(json.dumps(gains, indent=1))


if __name__ == "__main__":
    main()
