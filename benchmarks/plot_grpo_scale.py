"""GRPO on shapes-geneval-soft at CPU scale (32 prompt groups per epoch) and at GPU scale (512 per epoch), with CRD
for reference: held-out verifier accuracy against the prompt groups a run has seen.

    python benchmarks/plot_grpo_scale.py

Left: each run's own evaluation (the training log's ``eval/shapes-geneval``: held-out prompts on fixed noise,
so the change from epoch 0 is paired, but one draw). Right: paired held-out gains (``bench_lora_gain.py``, 118
prompts x noise seeds 0-3, +- one standard error). Reads the committed files in ``results/``; writes
``results/grpo_scale.png`` and ``.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
CURVES = {  # label: (metrics file, prompt groups per epoch)
    **{f"GRPO, 512 groups/epoch, seed {s} (GPU)": (f"alignment_v3/grpo_gpu_seed{s}_metrics.jsonl", 512)
       for s in (0, 1, 2)},
    "GRPO, 32 groups/epoch, seed 0 (CPU)": ("alignment_v3/grpo_soft_same_noise_w0_seed0_metrics.jsonl", 32),
    **{f"CRD, 32 groups/epoch, seed {s} (CPU)": (f"alignment_v3/crd_soft_seed{s}_metrics.jsonl", 32) for s in (0, 1)},
}
GAINS = {  # label: [(gain file, LoRA key ending, prompt groups seen)]
    "GRPO, 512 groups/epoch (GPU)": [("lora_gain_grpo_gpu_e75.json", f"gpu_s{s}_e75", 75 * 512) for s in (0, 1, 2)]
    + [("lora_gain_grpo_gpu_e95.json", f"gpu_s{s}_e95", 95 * 512) for s in (0, 1, 2)],
    "GRPO, 32 groups/epoch (CPU)": [("lora_gain_soft_grpo_crd_seed0.json", "epoch-0050/lora", 50 * 32),
                                    ("lora_gain_soft_grpo_crd_seed0.json", "grpo_soft_seed0/lora", 100 * 32)],
    "CRD, 32 groups/epoch (CPU)": [("lora_gain_soft_grpo_crd_seed0.json", "crd_soft_seed0/lora", 60 * 32),
                                   ("lora_gain_crd_soft_seed1_seeds0-3.json", "crd_soft_seed1/lora", 60 * 32)],
}


def curve(path: Path, groups_per_epoch: int) -> list[tuple[int, float]]:
    """(prompt groups seen, held-out verifier accuracy - its value at epoch 0) at each evaluation after epoch 0."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    evals = [(r["epoch"] * groups_per_epoch, r["eval/shapes-geneval"]) for r in rows if "eval/shapes-geneval" in r]
    (_, base), *later = evals
    return [(n, acc - base) for n, acc in later]


def gain(path: Path, key_end: str, score: str = "loras") -> tuple[float, float]:
    """The paired overall gain and its standard error of the LoRA whose path ends with ``key_end`` in a
    bench_lora_gain.py result: the verifier's (``score="loras"``) or the proxy's (``score="proxy"``)."""
    loras = json.loads(path.read_text())[score]
    (overall,) = [v["overall"] for k, v in loras.items() if k.endswith(key_end)]
    return overall["gain"], overall["se"]


def save(fig, name: str, record: dict) -> None:
    """Write a plot script's figure and data: ``results/<name>.png`` and ``results/<name>.json``."""
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=110)
    (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=1))


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {label: curve(RESULTS / f, g) for label, (f, g) in CURVES.items()}
    gains = {label: [(n, *gain(RESULTS / f, key)) for f, key, n in points] for label, points in GAINS.items()}
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, points in curves.items():
        x, y = zip(*points)
        left.plot(x, y, "o-" if "GPU" in label else "s--", ms=3, label=label)
    left.set(xscale="log", xlabel="prompt groups seen", ylabel="held-out verifier accuracy - epoch 0's (one draw)",
             title="Each run's own evaluation")
    left.legend(fontsize=7)
    for label, points in gains.items():
        x, y, e = zip(*points)
        right.errorbar(x, y, yerr=e, fmt="o", capsize=3, label=label)
    right.set(xscale="log", xlabel="prompt groups seen", ylabel="paired held-out verifier gain (+- 1 s.e.)",
              title="Paired gain over the base (472 samples)")
    right.legend(fontsize=7)
    for ax in (left, right):
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks([1e3, 3e3, 1e4, 3e4], ["1,000", "3,000", "10,000", "30,000"])
        ax.minorticks_off()
    save(fig, "grpo_scale", {"curves": curves, "gains": gains})
    print(json.dumps(gains, indent=1))


if __name__ == "__main__":
    main()
