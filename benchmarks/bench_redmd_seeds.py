"""Re-DMD (motion reward) against DMD on shapes-wan over several seeds.

Trains ``configs/dmd/shapes-wan.yaml`` and ``configs/re-dmd/shapes-wan.yaml`` for every seed, one thread each,
the two methods side by side (two lanes on two cores), into ``runs/seeds/<method>-s<seed>``; then summarises:
the runs' held-out ``motion`` and verifier at every evaluation (48 prompts), and, on 24 prompts, the students'
frame-level scores from ``bench_shapes_wan_base.py`` (``motion``, frames showing the caption, temporal
consistency). ``--summarise`` skips training and reads existing runs.

    python benchmarks/bench_redmd_seeds.py [--seeds 0 1 2] [--summarise]

Results: ``benchmarks/results/redmd_seeds.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
METHODS = ("dmd", "re-dmd")


def lane(method: str, seeds: list[int], runs: Path) -> subprocess.Popen:
    """One method's seeds, one after another, single-threaded."""
    cmds = [f"{sys.executable} -m flowalign.cli train {ROOT}/configs/{method}/shapes-wan.yaml threads=1 seed={s} "
            f"out={runs}/{method}-s{s}" for s in seeds]
    return subprocess.Popen(["bash", "-c", " && ".join(cmds)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def eval_curve(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{"epoch": r["epoch"], "motion": round(r["eval/motion"], 4), "verifier": r["eval/shapes-video"]}
            for r in rows if "eval/motion" in r]


def summarise(seeds: list[int], runs: Path) -> dict:
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_shapes_wan_base import main as frame_scores

    out: dict = {"seeds": seeds, "runs": {}}
    for method in METHODS:
        for s in seeds:
            run = runs / f"{method}-s{s}"
            student = frame_scores(["--model", str(run / "student"), "--out", str(run / "student_frames.json")])
            out["runs"][f"{method}-s{s}"] = {"curve": eval_curve(run), "student": student}
    for method in METHODS:
        final = [out["runs"][f"{method}-s{s}"]["curve"][-1]["motion"] for s in seeds]
        student = [out["runs"][f"{method}-s{s}"]["student"]["motion_reward"] for s in seeds]
        out[method] = {"final_eval_motion": final, "mean": round(statistics.mean(final), 4),
                       "student_motion_24": student, "student_mean": round(statistics.mean(student), 4)}
    out["re-dmd_minus_dmd_per_seed"] = [round(a - b, 4) for a, b in zip(out["re-dmd"]["final_eval_motion"],
                                                                        out["dmd"]["final_eval_motion"])]
    plot(out, RESULTS / "redmd_seeds.png")
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, colour in zip(METHODS, ("tab:blue", "tab:orange")):
        for i, s in enumerate(result["seeds"]):
            curve = result["runs"][f"{method}-s{s}"]["curve"]
            ax.plot([c["epoch"] for c in curve], [c["motion"] for c in curve], color=colour, alpha=0.8,
                    label=method if i == 0 else None)
    ax.set_xlabel("epoch")
    ax.set_ylabel("held-out motion (48 prompts)")
    ax.set_title("Re-DMD (motion) vs DMD on shapes-wan, one line per seed")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--runs", default=str(ROOT / "runs" / "seeds"))
    p.add_argument("--summarise", action="store_true", help="only summarise existing runs")
    args = p.parse_args(argv)
    runs = Path(args.runs)
    if not args.summarise:
        lanes = [lane(m, args.seeds, runs) for m in METHODS]
        if any(lane_.wait() for lane_ in lanes):
            raise SystemExit("a training run failed; see its run folder")
    result = summarise(args.seeds, runs)
    (RESULTS / "redmd_seeds.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({m: result[m] for m in METHODS}, indent=1))
    return result


if __name__ == "__main__":
    main()
