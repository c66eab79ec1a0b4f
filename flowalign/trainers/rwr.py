"""Flow-RWR (reward-weighted regression for flow models): ``task: rwr``.

Flow-RWR (Liu et al. 2025, "Improving Video Generation with Human Feedback"; after RWR, Peters & Schaal 2007, and
its use for text-to-image by Lee et al. 2023) is "standard flow matching training but uses the reward as the
weight for the loss" (the authors, VideoAlign issue #7). Each epoch:

1. sample ``group_size`` images per prompt with the policy (the ODE by default, or an SDE), score them, and
   standardise the rewards within each prompt group (statistics over all processes, clipped at ``adv_clip``);
2. turn them into weights, by default ``w = K softmax_group(A / temperature)``
   (:func:`flowalign.functional.dpo.rwr_weights`): the self-normalised importance weight toward
   ``p* ∝ p_old exp(r / tau)``, averaging 1 per group so the loss keeps plain flow matching's scale;
3. minimise ``mean_i w_i ||v_theta(x_t, sigma) - (eps - x0_i)||^2`` over fresh noise levels and noise.

The paper leaves the weight's form open (the raw reward or an exponential; VideoAlign issue #7 asks and is not
answered); the softmax form is the one whose effective learning rate does not depend on the reward's units.
With ``rollout_policy: policy`` (the default) the rollouts come from the current policy: online RWR, which tilts
again by ``exp(r / tau)`` every epoch and has no anchor but fitting its own samples. ``rollout_policy: reference``
draws them from the frozen initial model (the LoRA switched off) every epoch instead: offline RWR, as on a fixed
dataset of the base's samples, whose fixed point is the KL-regularised optimum
``p* ∝ p_ref exp(r / beta_eff)`` with ``beta_eff = tau * std_ref(r)`` (the rewards are standardised per group).

``pretrain_weight: beta`` adds Lee et al.'s (2023) pretraining-loss term: every optimizer step also fits the
conditional velocity (CFG 1, as in pretraining) to as many real images as samples, weighted by ``beta``, so the
policy is anchored to real data rather than to its own samples. On the shapes world the real images are fresh
ground-truth renders of the training prompts each epoch (``pretrain_data: renders``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

import torch

from flowalign.config import _require, field, load_config
from flowalign.functional.dpo import RWR_WEIGHTINGS, flow_matching_error, rwr_weights
from flowalign.trainers.discriminator import real_pool
from flowalign.trainers.dpo import ForwardConfig, noised, train_conditioning
from flowalign.trainers.loop import epoch_metrics, mean, run_task


@dataclasses.dataclass
class RWRConfig(ForwardConfig):
    """`flowalign train` (task: rwr): Flow-RWR, flow matching on the policy's samples weighted by their reward."""

    task: str = field("rwr", "What `flowalign train` runs; this schema is Flow-RWR.", choices=("rwr",))
    out: str = field("runs/rwr", "Run folder.")
    temperature: float = field(1.0, "tau in the weights softmax_group(A / tau), A the group-standardised reward: "
                                    "smaller concentrates the fit on each group's best samples; large tends to plain "
                                    "flow matching on the samples.")
    weighting: str = field("softmax", "softmax: w = K softmax over the prompt group (mean weight 1 per group); exp: "
                                      "w = exp(A / tau) unnormalised (AWR-style; scales the effective learning "
                                      "rate).", choices=RWR_WEIGHTINGS)
    adv_clip: float = field(5.0, "Group-standardised rewards are clipped to +-adv_clip before weighting.")
    global_std: bool = field(False, "Standardise by the whole batch's std instead of each group's.")
    rollout_policy: str = field("policy", "Who draws the rollouts: policy = the model being trained (online RWR, "
                                          "re-tilted every epoch); reference = the frozen initial model (offline "
                                          "RWR, whose fixed point is p_ref exp(r / (tau std_ref(r))): no drift from "
                                          "fitting its own samples; the logged rollout reward is then the base's).",
                                choices=("policy", "reference"))
    pretrain_weight: float = field(0.0, "beta of the pretraining-loss term (Lee et al. 2023): each optimizer step "
                                        "adds beta x plain flow matching of the conditional velocity on as many "
                                        "real images as samples; 0 = off.")
    pretrain_data: str = field("renders", "Real images of the pretraining term: renders = fresh ground-truth "
                                          "renders of the training prompts each epoch (shapes world only).",
                               choices=("renders",))

    def __post_init__(self):
        super().__post_init__()
        _require(self.pretrain_weight >= 0, "pretrain_weight", self.pretrain_weight, "must be >= 0 (0 = off)",
                 "pretrain_weight=1.0")
        _require(self.temperature > 0, "temperature", self.temperature, "must be > 0", "temperature=1.0")
        _require(self.adv_clip > 0, "adv_clip", self.adv_clip, "must be > 0", "adv_clip=5.0")


class RWR:
    """The Flow-RWR epoch on a :class:`~flowalign.trainers.loop.Run`."""

    def __init__(self, cfg: RWRConfig):
        self.cfg = cfg

    def epoch(self, run, epoch: int, shared: torch.Generator, local: torch.Generator) -> dict:
        cfg, model = self.cfg, run.model
        prompts, groups = run.epoch_prompts(shared)
        t0 = time.perf_counter()
        with run.reference() if cfg.rollout_policy == "reference" else contextlib.nullcontext():
            traj = run.rollout(prompts, local, sampler=cfg.sampler, eta=cfg.eta)
        rewards = run.score(traj)
        t_rollout = time.perf_counter() - t0
        sample_groups = groups.repeat_interleave(cfg.group_size)
        adv, all_rewards = run.advantages(rewards, sample_groups, epoch, cfg.global_std, cfg.adv_clip)
        # a process samples whole prompt groups, so each group's softmax is complete locally
        weights = rwr_weights(adv, sample_groups, cfg.temperature, cfg.weighting)
        cond = train_conditioning(model, traj.cond, traj.prompts, cfg.train_guidance_scale)
        x0_all = traj.x0
        real, real_cond = self.real_batch(run, len(rewards), local)
        stats: dict[str, list[float]] = {"loss": [], "fm_err": [], "pretrain_err": [], "grad_norm": []}
        order = torch.randperm(len(rewards), generator=local)
        for start in range(0, len(order), cfg.train_batch_size):
            mb = order[start:start + cfg.train_batch_size]
            x0, sub_cond, w = x0_all[mb].to(model.device), cond.index(mb), weights[mb].to(model.device)
            for _ in range(cfg.train_timesteps):
                xt, sigma, target = noised(cfg, x0, local)
                with run.autocast():
                    err = flow_matching_error(model.velocity(xt, sigma, sub_cond, cfg.train_guidance_scale), target)
                loss = (w * err).mean()
                if real is not None:
                    xt_r, sigma_r, target_r = noised(cfg, real[mb].to(model.device), local)
                    with run.autocast():
                        err_r = flow_matching_error(model.velocity(xt_r, sigma_r, real_cond.index(mb), 1.0),
                                                    target_r)
                    loss = loss + cfg.pretrain_weight * err_r.mean()
                    stats["pretrain_err"].append(err_r.detach().mean().item())
                run.backward(loss / cfg.train_timesteps)
                stats["loss"].append(loss.item())
                stats["fm_err"].append(err.detach().mean().item())
            stats["grad_norm"].append(run.optimizer_step())
        # effective sample size of the weights, as a fraction of the samples (1: uniform weights)
        pretrain = {"pretrain_err": mean(stats["pretrain_err"])} if real is not None else {}
        ess = (weights.sum() ** 2 / (len(weights) * (weights ** 2).sum())).item()
        return epoch_metrics(all_rewards, t_rollout, time.perf_counter() - t0 - t_rollout, loss=mean(stats["loss"]),
                             fm_err=mean(stats["fm_err"]), **pretrain, weight_max=weights.max().item(), weight_ess=ess,
                             grad_norm=mean(stats["grad_norm"]))

    def real_batch(self, run, n: int, gen: torch.Generator):
        """``n`` real latents and their conditioning for the pretraining term (``(None, None)`` when it is off)."""
        if self.cfg.pretrain_weight == 0:
            return None, None
        seed = int(torch.randint(2**31 - 1, (1,), generator=gen))
        latents, prompts = real_pool(run, self.cfg.pretrain_data, n, 1.0, run.cfg.num_steps, seed)
        with torch.no_grad():
            return latents, run.model.encode(prompts, guidance_scale=1.0)


def train_rwr(cfg: RWRConfig, model=None, reward=None) -> dict:
    """Run Flow-RWR; ``model``/``reward`` objects may replace the names in ``cfg`` (tests, notebooks)."""
    return run_task(cfg, RWR(cfg), model=model, reward=reward)


def main(config, overrides=()) -> dict:
    return train_rwr(load_config(RWRConfig, config, overrides))
