"""Flow-DPO, D3PO and Flow-RWR on shapes (v3 base, shapes-clip as the reward): held-out verifier and proxy against
optimizer steps and wall time, and paired gains.

    python benchmarks/plot_more_rl.py

Runs (benchmarks/README.md, "On the v3 base, at 4x the configs' prompts per epoch" and "Flow-RWR: the CFG field's
self-fit"): ``configs/dpo/shapes.yaml groups_per_epoch=32 epochs=60`` (seeds 0-2), ``configs/d3po/shapes.yaml
groups_per_epoch=64 epochs=60`` at lr 1e-3 and 3e-4, and ``configs/rwr/shapes.yaml groups_per_epoch=32`` online at
CFG 4 with ``pretrain_weight=1`` (stopped once collapsing), offline at CFG 4 (``rollout_policy=reference
pretrain_weight=4``) and offline at CFG 1 (``guidance_scale=1 train_guidance_scale=1 eval_guidance_scale=4
pretrain_weight=1``, and its uniform-weight control). Left and middle: each run's own evaluations (72 held-out
prompts, one noise draw, change from epoch 0); the wall-time axis is the run's logged ``time/total_s`` (one core
each, sharing two cores). Right: paired held-out gains (``bench_lora_gain.py --proxy``, 118 prompts x noise seeds
0-3, +- one standard error). Reads the committed files in ``results/``; writes ``results/more_rl_v3.png`` and
``.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

from plot_grpo_scale import gain, save  # a LoRA's paired gain in a bench_lora_gain.py result; figure + data

RESULTS = Path(__file__).parent / "results"
RUNS = {  # label: (colour, [(metrics file, bench_lora_gain file, LoRA key ending)])
    "Flow-DPO (seeds 0-2)": ("tab:blue", [
        ("dpo_clip_x4_seed0", "lora_gain_dpo_d3po_rwr_clip_x4_v3.json", "dpo_clip_x4/lora"),
        ("dpo_clip_x4_seed1", "lora_gain_dpo_clip_x4_s1_v3.json", "dpo_clip_x4_s1/lora"),
        ("dpo_clip_x4_seed2", "lora_gain_dpo_clip_x4_s2_v3.json", "dpo_clip_x4_s2/lora")]),
    "D3PO, lr 1e-3": ("tab:red", [("d3po_clip_x4_seed0", "lora_gain_dpo_d3po_rwr_clip_x4_v3.json",
                                   "d3po_clip_x4/lora")]),
    "D3PO, lr 3e-4": ("salmon", [("d3po_clip_x4_lr3e-4_seed0", "lora_gain_d3po_clip_x4_lr3e-4_v3.json",
                                  "d3po_clip_x4_lr3e-4/lora")]),
    "RWR online, CFG 4, renders x1 (stopped)": ("black", [("rwr_cfg4_online_pt1", None, None)]),
    "RWR offline, CFG 4, renders x4": ("tab:gray", [("rwr_cfg4_offline_pt4", "lora_gain_rwr_pretrain_EF.json",
                                                      "lora_E")]),
    "RWR offline, CFG 1": ("tab:green", [("rwr_cfg1_offline_pt1", "lora_gain_rwr_pretrain_EF.json", "lora_F"),
                                         ("rwr_cfg1_offline", "lora_gain_rwr_pretrain_GH.json", "lora_H")]),
    "RWR offline, CFG 1, uniform weights": ("yellowgreen", [("rwr_cfg1_offline_uniform",
                                                             "lora_gain_rwr_pretrain_J.json", "lora_J")]),
}
SCORES = (("eval/shapes-geneval", "loras", "verifier"), ("eval/shapes-clip", "proxy", "shapes-clip proxy"))


def curve(path: Path, key: str) -> tuple[list[tuple[int, float, float]], int]:
    """(optimizer steps, minutes, score - its epoch-0 value) at every evaluation, and the run's last step."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    evals = [(r["step"], r.get("time/total_s", 0.0) / 60, r[key]) for r in rows if key in r]
    base = evals[0][2]
    return [(n, t, v - base) for n, t, v in evals], rows[-1]["step"]


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(17, 9))
    record = {}
    for (key, section, name), (by_step, by_time, paired) in zip(SCORES, axes):
        for label, (colour, runs) in RUNS.items():
            for i, (metrics, gain_file, lora) in enumerate(runs):
                points, last = curve(RESULTS / "alignment_v3" / f"{metrics}_metrics.jsonl", key)
                steps, minutes, values = zip(*points)
                style = dict(color=colour, alpha=0.8, ms=3, label=label if i == 0 else None)
                by_step.plot(steps, values, "o-", **style)
                by_time.plot(minutes, values, "o-", **style)
                entry = {"curve": points}
                if gain_file is not None:
                    g, se = gain(RESULTS / gain_file, lora, section)
                    paired.errorbar([last], [g], yerr=[se], fmt="o", color=colour, capsize=3,
                                    label=label if i == 0 else None, alpha=0.8)
                    entry.update(steps=last, gain=g, se=se)
                record.setdefault(name, {})[f"{label} [{metrics}]"] = entry
        by_step.set(xlabel="optimizer steps", ylabel=f"held-out {name} - epoch 0's (one draw)",
                    title=f"{name}: each run's own evaluation")
        by_time.set(xlabel="wall time, minutes (one core each)", title=f"{name} against wall time")
        paired.set(xlabel="optimizer steps", ylabel=f"paired held-out {name} gain (+- 1 s.e.)",
                   title=f"{name}: paired gain over the base (472 samples)")
        for ax in (by_step, by_time, paired):
            ax.axhline(0, color="grey", lw=0.8)
        by_step.legend(fontsize=7)
    save(fig, "more_rl_v3", record)
    for name, runs in record.items():
        for label, entry in runs.items():
            if "gain" in entry:
                print(f"{name:18s} {label:70s} {entry['gain']:+.3f} +- {entry['se']:.3f} ({entry['steps']} steps)")


if __name__ == "__main__":
    main()
