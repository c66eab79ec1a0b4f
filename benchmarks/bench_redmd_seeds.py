"""Re-DMD against DMD on shapes-wan over several seeds.

Trains each method's config for every seed, one thread each, the methods side by side (one lane per method; keep
the lanes at most the number of cores), into ``runs/seeds/<method>-s<seed>``; then summarises:

- the runs' held-out evaluations at every ``eval_every`` (48 prompts): ``motion`` (pixel change), the tracked
  motion ``shapes-video-motion`` where the run reported it, and the ``shapes-video`` verifier;
- every final student sampled on the same ``3 * --per-category`` held-out prompts with the same noise
  (``bench_shapes_wan_base.py``): verifier, ``motion``, tracked motion, frames showing the caption, temporal
  consistency (kept in ``<run>/student_frames.json`` and reused); and, per Re-DMD method, its paired difference
  from DMD (the same prompt and noise for both students of a seed): the mean, per seed, and its standard error
  over clips and over seeds.

Methods: ``dmd`` (``configs/dmd/shapes-wan.yaml``), ``re-dmd`` (``configs/re-dmd/shapes-wan.yaml``: the
pixel-change ``motion``, batch-standardised, beta 1) and ``re-dmd-tracked``
(``configs/re-dmd/shapes-wan-tracked.yaml``: the tracked motion ``shapes-video-motion``, raw, beta 4).
``--summarise`` skips training and reads existing runs.

    python benchmarks/bench_redmd_seeds.py [--methods dmd re-dmd re-dmd-tracked] [--seeds 0 1 2] [--summarise]

Results: ``benchmarks/results/redmd_seeds.json`` and ``.png`` (``--out`` elsewhere).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_shapes_wan_base import main as frame_scores  # noqa: E402  (a sibling script)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
CONFIGS = {"dmd": "dmd/shapes-wan.yaml", "re-dmd": "re-dmd/shapes-wan.yaml",
           "re-dmd-tracked": "re-dmd/shapes-wan-tracked.yaml"}
PAIRED = ("verifier", "tracked_motion", "motion_reward")


def lane(method: str, seeds: list[int], runs: Path) -> subprocess.Popen:
    """One method's seeds, one after another, single-threaded."""
    cmds = [f"{sys.executable} -m flowalign.cli train {ROOT}/configs/{CONFIGS[method]} threads=1 seed={s} "
            f"out={runs}/{method}-s{s}" for s in seeds]
    return subprocess.Popen(["bash", "-c", " && ".join(cmds)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def eval_curve(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    names = {"motion": "eval/motion", "tracked_motion": "eval/shapes-video-motion", "verifier": "eval/shapes-video"}
    return [{"epoch": r["epoch"], **{k: round(r[v], 4) for k, v in names.items() if v in r}}
            for r in rows if "eval/shapes-video" in r]


def paired(a: list[list[float]], b: list[list[float]]) -> dict:
    """Differences ``a - b`` of clip-by-clip scores, one list per seed: the mean, its standard error over clips
    (``se_clips``: the sampling noise of the evaluation alone), the per-seed mean differences and their standard
    error over seeds (``se_seeds``: includes the spread between training runs; the one to judge by)."""
    per_seed = [[x - y for x, y in zip(sa, sb, strict=True)] for sa, sb in zip(a, b, strict=True)]
    d = [x for seed in per_seed for x in seed]
    seeds = [statistics.mean(seed) for seed in per_seed]
    return {"mean": round(statistics.mean(d), 4), "se_clips": round(statistics.stdev(d) / math.sqrt(len(d)), 4),
            "per_seed": [round(x, 4) for x in seeds],
            "se_seeds": round(statistics.stdev(seeds) / math.sqrt(len(seeds)), 4) if len(seeds) > 1 else None}


def student_scores(run: Path, per_category: int, threads: int) -> dict:
    """``bench_shapes_wan_base.py`` on the run's student, kept in ``<run>/student_frames.json`` and reused from
    there when it already holds the same prompts' clip-by-clip scores and is newer than the student."""
    path = run / "student_frames.json"
    if path.exists() and path.stat().st_mtime >= (run / "student").stat().st_mtime:
        kept = json.loads(path.read_text())
        if kept.get("n") == 3 * per_category and "per_clip" in kept:
            return kept
    return frame_scores(["--model", str(run / "student"), "--per-category", str(per_category),
                         "--threads", str(threads), "--out", str(path)])


def summarise(methods: list[str], seeds: list[int], runs: Path, per_category: int, threads: int = 2,
              plot_path: Path = RESULTS / "redmd_seeds.png") -> dict:
    out: dict = {"seeds": seeds, "prompts": 3 * per_category, "runs": {}}
    for method in methods:
        for s in seeds:
            run = runs / f"{method}-s{s}"
            out["runs"][f"{method}-s{s}"] = {"curve": eval_curve(run),
                                             "student": student_scores(run, per_category, threads)}
    for method in methods:
        students = [out["runs"][f"{method}-s{s}"]["student"] for s in seeds]
        out[method] = {"final_eval_motion": [out["runs"][f"{method}-s{s}"]["curve"][-1]["motion"] for s in seeds],
                       **{k: [st[k] for st in students] for k in (*PAIRED, "frames")},
                       "mean": {k: round(statistics.mean(st[k] for st in students), 4) for k in (*PAIRED, "frames")}}
        if method != "dmd" and "dmd" in methods:
            clips = {k: ([st["per_clip"][k] for st in students],
                         [out["runs"][f"dmd-s{s}"]["student"]["per_clip"][k] for s in seeds]) for k in PAIRED}
            out[method]["minus_dmd"] = {k: paired(*clips[k]) for k in PAIRED}
    for run in out["runs"].values():
        run["student"].pop("per_clip")
    plot(out, methods, plot_path)
    return out


def plot(result: dict, methods: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("motion", "held-out motion (pixel change)"), ("verifier", "held-out verifier")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colours = dict(zip(CONFIGS, ("tab:blue", "tab:orange", "tab:green")))
    for ax, (key, label) in zip(axes, keys):
        for method in methods:
            for i, s in enumerate(result["seeds"]):
                curve = result["runs"][f"{method}-s{s}"]["curve"]
                ax.plot([c["epoch"] for c in curve], [c[key] for c in curve], color=colours[method], alpha=0.8,
                        label=method if i == 0 else None)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{label}, 48 prompts")
        ax.legend()
    fig.suptitle("Re-DMD vs DMD on shapes-wan, one line per seed")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", choices=list(CONFIGS), default=["dmd", "re-dmd"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--per-category", type=int, default=25, help="final students: held-out prompts per category")
    p.add_argument("--threads", type=int, default=2, help="threads for scoring the final students")
    p.add_argument("--runs", default=str(ROOT / "runs" / "seeds"))
    p.add_argument("--summarise", action="store_true", help="only summarise existing runs")
    p.add_argument("--out", default=str(RESULTS / "redmd_seeds.json"), help="result JSON (the plot beside it)")
    args = p.parse_args(argv)
    runs = Path(args.runs)
    if not args.summarise:
        lanes = [lane(m, args.seeds, runs) for m in args.methods]
        if any(lane_.wait() for lane_ in lanes):
            raise SystemExit("a training run failed; see its run folder")
    out = Path(args.out)
    result = summarise(args.methods, args.seeds, runs, args.per_category, args.threads, out.with_suffix(".png"))
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({m: result[m] for m in args.methods}, indent=1))
    return result


if __name__ == "__main__":
    main()
