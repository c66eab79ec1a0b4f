"""toy2d: GRPO and CRD against the exact optimum p* of KL-regularised reward maximisation.

    python benchmarks/bench_toy2d_alignment.py [--epochs 30] [--n 2000]

Trains ``configs/grpo/toy2d.yaml`` and ``configs/crd/toy2d.yaml`` (frozen reference), and CRD with the paper's
trailing old snapshot and KL anchor (class "8gaussians", reward ``toy2d-linear``,
r = y) and compares ODE samples of the base and the aligned models with p* ∝ p_base exp(r / beta_eff), drawn by
importance resampling of 20,000 base samples.

CRD matches ``beta * center(r_theta)`` to the centred ``R = A / 10 + 0.5`` with ``A = (r - mean) / std`` the
group-standardised reward, i.e. to ``(r - mean) / (10 std)``; read as a log-density ratio, that is a tilt of the
raw reward at temperature ``beta_eff = 10 * std_base(r) * beta`` (``std_base`` measured on the base samples).
The implicit reward is an adaptively weighted velocity-error difference, not an exact log-likelihood ratio,
and the old snapshot moves, so this is the optimum CRD aims at, not one it must hit exactly; the table also
gives the distance at half and twice that temperature. Writes ``results/toy2d_alignment.json|png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
CLASS = "8gaussians"


def ode_samples(model, n: int, seed: int) -> torch.Tensor:
    import flowalign as fa

    gen = torch.Generator().manual_seed(seed)
    traj = fa.sample(model, [CLASS], num_steps=50, num_images_per_prompt=n, generator=gen)
    return traj.x0.float()


def p_star_samples(base: torch.Tensor, reward, beta: float, n: int, seed: int) -> torch.Tensor:
    from flowalign.zoo.toy2d import importance_weights

    w = importance_weights(base, lambda x: reward(x, None), beta)
    idx = torch.multinomial(w.float(), n, replacement=True, generator=torch.Generator().manual_seed(seed))
    return base[idx]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--crd-beta", type=float, help="CRD's beta (default: the config's 1.0); smaller = a stronger tilt")
    args = ap.parse_args()

    import flowalign as fa
    from flowalign.config import load_config
    from flowalign.trainers import CRDConfig, GRPOConfig, train_crd, train_grpo
    from flowalign.zoo.toy2d import energy_distance, plot

    torch.set_num_threads(1)
    reward = fa.rewards.load("toy2d-linear")
    base_model = fa.load_model("toy2d")
    pool = ode_samples(base_model, 20000, seed=1)
    base = ode_samples(base_model, args.n, seed=2)
    std_r = reward(pool, None).std().item()
    trained = {}
    moving = ["old_decay=0-0.25-0.005-0.999", "kl_beta=0.1"]  # the paper's trailing old snapshot and KL anchor
    for name, schema, train, extra in (("grpo", GRPOConfig, train_grpo, []), ("crd", CRDConfig, train_crd, []),
                                       ("crd (moving old snapshot)", CRDConfig, train_crd, moving)):
        cfg = load_config(schema, str(ROOT / "configs" / name.split()[0] / "toy2d.yaml"),
                          [f"epochs={args.epochs}", f"out={ROOT / 'runs' / f'bench-toy2d-{name.split()[0]}'}",
                           "progress=false", *extra,
                           *([f"beta={args.crd_beta}"] if args.crd_beta and name.startswith("crd") else [])])
        model = fa.load_model("toy2d")
        train(cfg, model=model)
        trained[name] = (cfg, ode_samples(model, args.n, seed=2))
    crd_cfg = trained["crd"][0]
    beta_eff = 10 * std_r * crd_cfg.beta
    out = {"reward_std_base": std_r, "beta_eff": beta_eff, "epochs": args.epochs, "n": args.n, "rows": {}}
    samples = {"base": base, **{k: v[1] for k, v in trained.items()}}
    for mult in (0.5, 1.0, 2.0):
        target = p_star_samples(pool, reward, beta_eff * mult, args.n, seed=3)
        out["rows"][f"beta_eff x{mult}"] = {
            "p_star_mean_reward": reward(target, None).mean().item(),
            **{f"ED({k}, p*)": energy_distance(v, target) for k, v in samples.items()}}
        if mult == 1.0:
            samples_plot = {**samples, "p* (importance)": target}
    out["mean_reward"] = {k: reward(v, None).mean().item() for k, v in samples.items()}
    RESULTS.mkdir(exist_ok=True)
    tag = f"_beta{args.crd_beta:g}" if args.crd_beta else ""
    (RESULTS / f"toy2d_alignment{tag}.json").write_text(json.dumps(out, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(samples_plot), figsize=(3.2 * len(samples_plot), 3.4))
    for ax, (name, pts) in zip(axes, samples_plot.items()):
        plot(pts, ax=ax, title=f"{name}: mean r {reward(pts, None).mean().item():.2f}")
    fig.tight_layout()
    fig.savefig(RESULTS / f"toy2d_alignment{tag}.png", dpi=110)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
