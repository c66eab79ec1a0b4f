"""How much signal one optimizer step carries: the signal-to-noise ratio of a trainer's gradient at the base.

    python benchmarks/gradient_snr.py [--algo grpo|crd|d3po|dpo] [--draws 4] [--threads 1] [--tag NAME] [KEY=VALUE ...]

The KEY=VALUE overrides go to ``configs/grpo/shapes.yaml`` (``--algo grpo``; for example ``reward=shapes-geneval-partial
guidance_scale=4.0 groups_per_epoch=32 same_noise=true sde_window_range=0.1``) or ``configs/crd/shapes-verifier.yaml``
(``--algo crd``). For ``--draws`` epochs' worth of rollouts from the base model (the LoRA at zero, the trainer's
own draws of prompts, windows and noise), every prompt group k gives one gradient g_k of the trainer's objective
over its samples:

- grpo: at the base the policy is the reference and the old policy, so the ratio is 1, the KL's gradient is 0 and
  g_k is the plain policy gradient -mean_i A_i grad log p(step_i) over the trained SDE steps;
- crd: the old snapshot and the KL reference equal the base, so the KL's gradient is 0 and g_k is the gradient of
  CRD's centred regression of the implicit reward (velocity errors on forward-noised samples, ``train_timesteps``
  noise levels) onto the centred reward;
- d3po (``configs/d3po/shapes.yaml``): every ratio is 1, inside the clamp, so g_k is -beta/2 times the difference of
  the preferred and the other sample's step log-prob gradients (a policy gradient with advantages +-1 per pair);
- dpo (``configs/dpo/shapes.yaml``): the policy's errors equal the reference's, so g_k is beta/4 times the
  difference of the chosen and the rejected samples' flow-matching-error gradients, summed over the group's pairs.

Groups are independent draws, so with K of them:

- ``signal``: |E g|^2, estimated without bias as |mean g|^2 - tr(Cov g) / K;
- ``noise``: tr(Cov g), the spread of one group's gradient;
- ``groups_for_snr_1``: noise / signal, the number of groups an optimizer step must average for its gradient's
  expected direction to be as large as its noise;
- ``half_cosine``: the cosine between the mean gradients of two disjoint halves of the groups (mean over random
  splits). Near 0, the two halves point in unrelated directions. ``half_cosine_null`` (mean, std) is the same
  with every group's gradient given a random sign, which keeps the noise and removes any common direction.

A training step of the shapes runs averages ``train_batch_size / group_size`` groups, so
``snr_per_step`` = that many groups times signal / noise. Writes
``benchmarks/results/gradient_snr_<algo>_<tag>.json``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"


def flat_grad(loss, params) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])


def zeros(params) -> torch.Tensor:
    """The gradient of a group whose samples all scored alike (zero advantages), without a backward pass."""
    return torch.zeros(sum(p.numel() for p in params))


def grpo_group_gradients(run, algo, epoch: int) -> tuple[list[torch.Tensor], list[float]]:
    """One epoch of GRPO rollouts: the policy gradient of each prompt group, and the rewards."""
    from flowalign.sampling.sampler import log_prob

    cfg = algo.cfg
    shared, local = run.generators(epoch)
    _, groups, traj = algo.draw(run, shared, local)
    r = run.score(traj)
    adv, _ = run.advantages(r, groups.repeat_interleave(cfg.group_size), epoch + 1, cfg.global_std, cfg.adv_clip)
    steps = traj.stochastic.nonzero().flatten().tolist()
    out = []
    for k in range(cfg.groups_per_epoch):
        idx = torch.arange(k * cfg.group_size, (k + 1) * cfg.group_size)
        if not adv[idx].any():
            out.append(zeros(run.params))
            continue
        lp = log_prob(run.model, traj.index(idx), steps=steps)  # (group, len(steps))
        out.append(flat_grad(-(adv[idx].view(-1, 1) * lp).mean(), run.params))
    return out, r.tolist()


def crd_group_gradients(run, algo, epoch: int) -> tuple[list[torch.Tensor], list[float]]:
    """One epoch of CRD's ODE rollouts: the gradient of each prompt group's CRD loss, and the rewards."""
    from flowalign.functional.advantages import advantage_to_unit
    from flowalign.functional.crd import crd_loss, implicit_reward
    from flowalign.trainers.crd import shifted_sigmas

    cfg, model = algo.cfg, run.model
    shared, local = run.generators(epoch)
    prompts, groups = run.epoch_prompts(shared)
    traj = run.rollout(prompts, local, sampler="ode")
    r = run.score(traj)
    sample_groups = groups.repeat_interleave(cfg.group_size)
    adv, _ = run.advantages(r, sample_groups, epoch + 1, cfg.global_std, cfg.adv_clip)
    r01 = advantage_to_unit(adv, cfg.adv_clip)
    gs = model.guidance_or_default(cfg.guidance_scale if cfg.train_guidance_scale is None
                                   else cfg.train_guidance_scale)
    out = []
    for k in range(len(prompts)):  # every group draws its noise, so the draws stay those of the recorded results
        idx = torch.arange(k * cfg.group_size, (k + 1) * cfg.group_size)
        x0, cond = traj.index(idx).x0, traj.cond.index(idx)
        loss = 0.0
        for _ in range(cfg.train_timesteps):
            sigma = shifted_sigmas(len(idx), cfg.timestep_shift, local)
            eps = torch.randn(x0.shape, generator=local)
            s = sigma.view(-1, *([1] * (x0.ndim - 1)))
            v = model.velocity((1 - s) * x0 + s * eps, sigma, cond, gs)
            # the old snapshot is the base here, so its velocity is this one's value
            loss = loss + crd_loss(implicit_reward(v, v.detach(), eps - x0), r01[idx], sample_groups[idx],
                                   cfg.beta) / cfg.train_timesteps
        out.append(flat_grad(loss, run.params))
    return out, r.tolist()


def d3po_group_gradients(run, algo, epoch: int) -> tuple[list[torch.Tensor], list[float]]:
    """One epoch of D3PO's rollouts (``group_size`` samples per prompt from one noise): the gradient of each prompt
    group's D3PO loss over its preferred pairs, each minibatch's ``timestep_fraction`` of the steps drawn per group.
    At the base the policy is the reference, so every ratio is 1 (inside the clamp)."""
    from flowalign.functional.d3po import d3po_loss, preference_pairs
    from flowalign.sampling.sampler import log_prob

    cfg = algo.cfg
    shared, local = run.generators(epoch)
    prompts, groups = run.epoch_prompts(shared)
    traj = run.rollout(prompts, local, sampler=cfg.sampler, eta=cfg.eta, same_noise_per_prompt=cfg.same_noise)
    r = run.score(traj)
    steps = traj.stochastic.nonzero().flatten().tolist()
    n_train = max(1, round(cfg.timestep_fraction * len(steps)))
    out = []
    for k in range(len(prompts)):
        idx = torch.arange(k * cfg.group_size, (k + 1) * cfg.group_size)
        w, lo = preference_pairs(r[idx], torch.zeros(len(idx), dtype=torch.long))
        if not len(w):
            out.append(zeros(run.params))
            continue
        cols = [steps[c] for c in torch.randperm(len(steps), generator=local)[:n_train].tolist()]
        lp = log_prob(run.model, traj.index(idx), steps=cols)  # (group, len(cols))
        loss = sum(d3po_loss(lp[w, c], lp[lo, c], lp[w, c].detach(), lp[lo, c].detach(), cfg.beta, cfg.eps)[0]
                   for c in range(len(cols))) / len(cols)
        out.append(flat_grad(loss, run.params))
    return out, r.tolist()


def dpo_group_gradients(run, algo, epoch: int) -> tuple[list[torch.Tensor], list[float]]:
    """One epoch of Flow-DPO's online rollouts: the gradient of each prompt group's DPO loss over its pairs
    (``pairing``, ``pair_margin``), one shared noise level and noise per pair. At the base the policy's errors are
    the reference's, so the loss is log 2 and its gradient is beta/4 (grad err_w - grad err_l)."""
    from flowalign.functional.dpo import flow_dpo_loss, flow_matching_error, preference_pairs
    from flowalign.trainers.dpo import noised, train_conditioning

    cfg, model = algo.cfg, run.model
    shared, local = run.generators(epoch)
    prompts, groups = run.epoch_prompts(shared)
    traj = run.rollout(prompts, local, sampler=cfg.sampler, eta=cfg.eta)
    r = run.score(traj)
    cond = train_conditioning(model, traj.cond, traj.prompts, cfg.train_guidance_scale)
    out = []
    for k in range(len(prompts)):
        idx = torch.arange(k * cfg.group_size, (k + 1) * cfg.group_size)
        w, lo = preference_pairs(r[idx], torch.zeros(len(idx), dtype=torch.long), cfg.pairing, cfg.pair_margin)
        if not len(w):
            out.append(zeros(run.params))
            continue
        w, lo = idx[w], idx[lo]
        x0, sub = traj.x0[torch.cat([w, lo])], cond.index(torch.cat([w, lo]))
        p = len(w)  # the trainer averages over pairs, so a group weighs as many pairs as it has
        loss = 0.0
        for _ in range(cfg.train_timesteps):
            xt, sigma, target = noised(cfg, x0, local, n=p)
            err = flow_matching_error(model.velocity(xt, sigma, sub, cfg.train_guidance_scale), target)
            loss = loss + p * flow_dpo_loss(err[:p], err[p:], err[:p].detach(), err[p:].detach(), cfg.beta)[0] \
                / cfg.train_timesteps
        out.append(flat_grad(loss, run.params))
    return out, r.tolist()


ALGOS = {"grpo": ("configs/grpo/shapes.yaml", grpo_group_gradients),
         "crd": ("configs/crd/shapes-verifier.yaml", crd_group_gradients),
         "d3po": ("configs/d3po/shapes.yaml", d3po_group_gradients),
         "dpo": ("configs/dpo/shapes.yaml", dpo_group_gradients)}


def snr(g: torch.Tensor, splits: int = 50, seed: int = 0) -> dict:
    k = len(g)
    mean = g.mean(0)
    noise = ((g - mean) ** 2).sum(1).sum().item() / (k - 1)
    signal = mean.pow(2).sum().item() - noise / k
    gen = torch.Generator().manual_seed(seed)

    def half_cosines(flip: bool) -> torch.Tensor:
        cos = []
        for _ in range(splits):
            perm = torch.randperm(k, generator=gen)
            x = g * (torch.randint(2, (k, 1), generator=gen) * 2 - 1) if flip else g
            a, b = x[perm[: k // 2]].mean(0), x[perm[k // 2:]].mean(0)
            cos.append(torch.nn.functional.cosine_similarity(a, b, dim=0).item())
        return torch.tensor(cos)

    # the null: each group's gradient with a random sign keeps the spread and removes the common direction
    null = half_cosines(flip=True)
    return {"groups": k, "nonzero_groups": int((g.abs().sum(1) > 0).sum()), "signal": signal, "noise": noise,
            "groups_for_snr_1": noise / signal if signal > 0 else float("inf"),
            "half_cosine": half_cosines(flip=False).mean().item(),
            "half_cosine_null": [round(null.mean().item(), 4), round(null.std().item(), 4)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="KEY=VALUE settings for the trainer's shapes config.")
    ap.add_argument("--algo", choices=sorted(ALGOS), default="grpo")
    ap.add_argument("--draws", type=int, default=4, help="Epochs of base rollouts (groups_per_epoch groups each).")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tag", default="default")
    args = ap.parse_args()

    from tqdm.auto import tqdm

    from flowalign.config import load_config
    from flowalign.trainers import TASKS
    from flowalign.trainers.loop import Run

    config, group_gradients = ALGOS[args.algo]
    # each --algo is a training task: its config schema, and its epoch class (GRPO, CRD, D3PO, DPO) in its module
    config_cls = TASKS[args.algo][0]
    algo_cls = getattr(importlib.import_module(f"flowalign.trainers.{args.algo}"), args.algo.upper())
    t0 = time.perf_counter()
    grads, rewards = [], []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(config_cls, str(ROOT / config),
                          [*args.overrides, f"out={tmp}", "eval_prompts=null", f"threads={args.threads}",
                           "log_with=none", "progress=false", "resume=null"])
        algo = algo_cls(cfg)
        run = Run(cfg, algo)
        for epoch in tqdm(range(args.draws), desc=f"{args.algo} group gradients"):
            g, r = group_gradients(run, algo, epoch)
            grads += g
            rewards += r
    g = torch.stack(grads)
    stats = snr(g)
    per_step = cfg.train_batch_size / cfg.group_size
    out = {"algo": args.algo, "config": config, "overrides": args.overrides, "draws": args.draws,
           "group_size": cfg.group_size, "params": g.shape[1], "reward_mean": sum(rewards) / len(rewards), **stats,
           "groups_per_step": per_step, "snr_per_step": per_step * stats["signal"] / stats["noise"],
           "seconds": round(time.perf_counter() - t0, 1)}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"gradient_snr_{args.algo}_{args.tag}.json"
    path.write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    main()
