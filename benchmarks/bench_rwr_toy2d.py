"""toy2d: online and offline Flow-RWR against the exact optimum p* they aim at.

    python benchmarks/bench_rwr_toy2d.py [--seeds 0 1 2] [--epochs 25 50 100 200 300]

Trains ``configs/rwr/toy2d.yaml`` (class "8gaussians", reward r = y) with ``rollout_policy: reference`` (offline:
every epoch's samples come from the frozen base) and ``rollout_policy: policy`` (online: from the model being
trained), at temperatures 0.25, 0.5 and 1, for each number of epochs. Weights ``K softmax_group(A / tau)`` of the
group-standardised reward tilt the base by ``exp(r / beta_eff)`` with ``beta_eff = tau * std_base(r)``, so offline
RWR's fixed point is p* ∝ p_base exp(r / beta_eff); online RWR tilts its own samples again every epoch and has
none. p*'s mean reward is exact up to importance sampling over 20,000 base samples; the energy distance to p*
compares 2,000 ODE samples with 2,000 drawn from p* by importance resampling. Writes
``results/rwr_toy2d.{json,png}``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
CLASS = "8gaussians"
TEMPERATURES = (0.25, 0.5, 1.0)


def ode_samples(model, n: int, seed: int) -> torch.Tensor:
    import flowalign as fa

    gen = torch.Generator().manual_seed(seed)
    traj = fa.sample(model, [CLASS], num_steps=10, num_images_per_prompt=n, generator=gen)
    return traj.x0.float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, nargs="+", default=[25, 50, 100, 200, 300])
    ap.add_argument("--replot", action="store_true", help="Only redraw the PNG from the JSON.")
    args = ap.parse_args()
    if args.replot:
        plot_runs(json.loads((RESULTS / "rwr_toy2d.json").read_text()), RESULTS / "rwr_toy2d.png")
        return

    import flowalign as fa
    from flowalign.config import load_config
    from flowalign.trainers.rwr import RWRConfig, train_rwr
    from flowalign.zoo.toy2d import energy_distance, importance_weights

    torch.set_num_threads(1)
    reward = fa.rewards.load("toy2d-linear")

    def r(x):
        return reward(x, None)

    pool = ode_samples(fa.load_model("toy2d"), 20000, seed=3)
    r_pool, std = r(pool), r(pool).std().item()
    out = {"base_mean": r_pool.mean().item(), "base_std": std, "epochs": args.epochs, "seeds": args.seeds, "runs": {}}
    for tau in TEMPERATURES:
        w = importance_weights(pool, r, tau * std).float()
        target = pool[torch.multinomial(w, 2000, replacement=True, generator=torch.Generator().manual_seed(5))]
        p_star = {"mean": (w / w.sum() * r_pool).sum().item(), "ED_base": energy_distance(pool[:2000], target)}
        out["runs"][str(tau)] = {"beta_eff": tau * std, "p_star": p_star}
        for policy in ("reference", "policy"):
            rows = []
            for epochs in args.epochs:
                means, eds = [], []
                for seed in args.seeds:
                    with tempfile.TemporaryDirectory() as tmp:
                        cfg = load_config(RWRConfig, str(ROOT / "configs/rwr/toy2d.yaml"),
                                          [f"out={tmp}", f"rollout_policy={policy}", f"temperature={tau}",
                                           f"epochs={epochs}", f"seed={seed}", "save_every=0", "progress=false"])
                        model = fa.load_model("toy2d")
                        train_rwr(cfg, model=model)
                    x = ode_samples(model, 2000, seed=7)
                    means.append(r(x).mean().item())
                    eds.append(energy_distance(x, target))
                rows.append({"epochs": epochs, "mean_reward": means, "ED_p_star": eds})
                print(f"tau {tau} {policy:9s} {epochs:4d} epochs: mean reward {sum(means) / len(means):7.3f} "
                      f"(p* {p_star['mean']:.3f}), ED to p* {sum(eds) / len(eds):.4f} (base {p_star['ED_base']:.4f})")
            out["runs"][str(tau)][policy] = rows
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "rwr_toy2d.json").write_text(json.dumps(out, indent=1))
    plot_runs(out, RESULTS / "rwr_toy2d.png")
    print(f"wrote {RESULTS / 'rwr_toy2d.json'} and .png")


def plot_runs(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(TEMPERATURES), figsize=(4 * len(TEMPERATURES), 6.4), sharex=True)
    for col, tau in enumerate(TEMPERATURES):
        run = out["runs"][str(tau)]
        for policy, colour in (("reference", "tab:blue"), ("policy", "tab:red")):
            ep = [row["epochs"] for row in run[policy]]
            label = "offline (base rollouts)" if policy == "reference" else "online (own rollouts)"
            for ax, key in zip(axes[:, col], ("mean_reward", "ED_p_star")):
                v = torch.tensor([row[key] for row in run[policy]])
                ax.plot(ep, v.mean(1), "o-", color=colour, label=label)
                ax.fill_between(ep, v.min(1).values, v.max(1).values, color=colour, alpha=0.2)
        top, bottom = axes[0, col], axes[1, col]
        top.axhline(run["p_star"]["mean"], color="k", ls="--", label="p* (exact)")
        top.axhline(out["base_mean"], color="grey", ls=":", label="base")
        top.set_ylim(-1, 8)
        top.set(title=f"tau {tau} (beta_eff {run['beta_eff']:.2f})", ylabel="mean reward r = y (clipped view)")
        bottom.axhline(run["p_star"]["ED_base"], color="grey", ls=":", label="base")
        bottom.set_yscale("log")
        bottom.set(xlabel="epochs", ylabel="energy distance to p*")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
