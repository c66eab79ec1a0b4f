"""A run's report: ``report.md`` with reward curves (PNG) and the before/after sample grids (PNG images or
animated GIF videos)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path


def _curves(history: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train = [(r["epoch"], r["reward/mean"]) for r in history if "reward/mean" in r]
    evals = sorted({k for r in history for k in r if k.startswith("eval/") and k.count("/") == 1})
    fig, axes = plt.subplots(1, 1 + len(evals), figsize=(4 * (1 + len(evals)), 3.2), squeeze=False)
    ax = axes[0, 0]
    if train:
        ax.plot(*zip(*train), marker=".")
    ax.set(title="training reward (rollouts)", xlabel="epoch")
    for ax, key in zip(axes[0, 1:], evals):
        pts = [(r["epoch"], r[key]) for r in history if key in r]
        ax.plot(*zip(*pts), marker="o")
        ax.set(title=f"held-out: {key[5:]}", xlabel="epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def summary_of(history: list[dict]) -> dict:
    """First and last evaluation (every eval/* key) of a run."""
    evals = [r for r in history if any(k.startswith("eval/") for k in r)]
    if not evals:
        return {}
    pick = lambda r: {k: r[k] for k in r if k.startswith("eval/")}  # noqa: E731
    return {"before": {"epoch": evals[0]["epoch"], **pick(evals[0])},
            "after": {"epoch": evals[-1]["epoch"], **pick(evals[-1])}}


def sample_grids(folder: Path) -> list[Path]:
    """One grid per evaluation, in epoch order: ``epoch-XXXX.gif`` (video runs, animated) or ``epoch-XXXX.png``
    (image runs); an animation wins if an epoch has both."""
    by_epoch: dict[str, Path] = {}
    for ext in (".png", ".gif"):  # later wins
        for path in folder.glob(f"epoch-*{ext}"):
            by_epoch[path.stem] = path
    return [by_epoch[k] for k in sorted(by_epoch)]


def write_report(out: str | Path, history: list[dict], cfg) -> dict:
    out = Path(out)
    summary = summary_of(history)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    lines = [f"# {cfg.task} on {cfg.model}", "", f"Reward `{cfg.reward}`, prompts `{cfg.prompts}`, {cfg.epochs} "
             f"epochs of {cfg.groups_per_epoch} prompts x {cfg.group_size} samples, {cfg.finetune} fine-tuning.", ""]
    if _curves(history, out / "curves.png"):
        lines += ["![curves](curves.png)", ""]
    if summary:
        keys = [k for k in summary["after"] if k.startswith("eval/")]
        lines += [f"| held-out (ODE, fixed seeds) | epoch {summary['before']['epoch']} | epoch "
                  f"{summary['after']['epoch']} |", "|---|---|---|"]
        lines += [f"| {k[5:]} | {summary['before'].get(k, float('nan')):.3f} | {summary['after'][k]:.3f} |"
                  for k in keys]
        lines.append("")
        grids = sample_grids(out / "samples")
        if len(grids) >= 2:
            lines += ["| before | after |", "|---|---|",
                      f"| ![before](samples/{grids[0].name}) | ![after](samples/{grids[-1].name}) |", ""]
    lines += ["## Config", "", "```yaml", *[f"{k}: {v}" for k, v in dataclasses.asdict(cfg).items()], "```", ""]
    (out / "report.md").write_text("\n".join(lines))
    return summary
