"""Centered Reward Distillation (CRD, "Diffusion Reinforcement Learning via Centered Reward Distillation"):
``task: crd``.

A forward-process method: rollouts are plain ODE samples (any solver), and training happens on their clean
latents through ``x_t = (1 - sigma) x0 + sigma eps``. Each epoch:

1. sample ``group_size`` images per prompt with the **sampling snapshot** (a copy of the weights decoupled from
   the moving reference, so the implicit-reward signal does not collapse), score them, and turn the
   group-standardised rewards into ``R = clip(A, +-5) / 10 + 0.5`` in [0, 1];
2. for ``train_timesteps`` noise levels per sample, compute the implicit reward ``r_theta`` (velocity error of
   the model against the **old snapshot**, each divided by its own mean absolute error;
   :mod:`flowalign.functional.crd`) and regress its within-prompt centred value onto the centred ``R``
   (``beta * center(r_theta) ~ center(R)``: centring cancels the intractable normaliser of
   ``p* ∝ p_ref exp(R / beta)``);
3. add the KL anchor ``kl_beta * w(R) * ||v_theta - v_ref^CFG||^2`` to the pretrained model's **CFG-guided**
   velocity (the LoRA switched off), with the reward-adaptive weight ``w(R) = min_coef + R (1 - min_coef)``;
   ``v_theta`` (and ``v_old``) are the velocity the rollouts sample with: the conditional one for CFG-free
   rollouts (the paper's setting), the CFG-combined one for rollouts at CFG g (training the conditional
   velocity there would let the KL pull it toward the guided reference, and sampling would guide it again);
4. after each optimizer step move the old and sampling snapshots toward the weights with their decay schedules.

Batches hold whole prompt groups so that centring stays within a prompt.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from flowalign.config import _require, field, load_config
from flowalign.functional.advantages import advantage_to_unit
from flowalign.functional.crd import adaptive_kl_weight, crd_loss, implicit_reward
from flowalign.trainers.loop import TrainConfig, epoch_metrics, mean, run_task
from flowalign.trainers.snapshot import DecaySchedule, Snapshot


@dataclasses.dataclass
class CRDConfig(TrainConfig):
    """`flowalign train` (task: crd): Centered Reward Distillation on ODE rollouts."""

    task: str = field("crd", "What `flowalign train` runs; this schema is CRD.", choices=("crd",))
    out: str = field("runs/crd", "Run folder.")
    beta: float = field(1.0, "KL-regularisation temperature of the reward-matching target (beta in p* ∝ "
                             "p_ref exp(R / beta)); the loss is scaled by 5 / beta.")
    kl_beta: float = field(0.1, "Weight of the KL anchor to the CFG-guided pretrained velocity (0: off).")
    kl_min_coef: float = field(0.1, "Reward-adaptive KL: per-sample weight min_coef + R (1 - min_coef).")
    kl_guidance_scale: float | None = field(None, "CFG scale of the KL reference; null = the model's default.")
    train_guidance_scale: float | None = field(None, "CFG scale of the trained velocity (implicit reward and KL); "
                                                     "null = the rollouts' guidance_scale, so that the policy "
                                                     "trained is the one sampled (CFG-free rollouts, the paper's: "
                                                     "the conditional velocity).")
    train_timesteps: int = field(4, "Noise levels drawn per sample and epoch.")
    timestep_shift: float = field(3.0, "Training sigmas: shift * t / (1 + (shift - 1) t) with t ~ U(0, 1) "
                                       "(the SD3 time shift; CRD uses 3).")
    old_decay: str = field("0-0.25-0.005-0.999", "Old snapshot's decay schedule 'start-initial-rate-maximum' "
                                                 "(per optimizer step).")
    sampling_decay: str = field("75-0.0-0.0075-0.999", "Sampling snapshot's decay schedule; before `start` it "
                                                       "equals the current weights.")
    adv_clip: float = field(5.0, "Advantages are clipped to +-adv_clip before the [0, 1] mapping.")
    global_std: bool = field(False, "Standardise by the whole batch's std instead of each group's.")

    def __post_init__(self):
        super().__post_init__()
        _require(self.beta > 0, "beta", self.beta, "must be > 0", "beta=1.0")
        _require(self.kl_beta >= 0, "kl_beta", self.kl_beta, "must be >= 0", "kl_beta=0.1")
        _require(0 <= self.kl_min_coef <= 1, "kl_min_coef", self.kl_min_coef, "must lie in [0, 1]", "kl_min_coef=0.1")
        _require(self.train_guidance_scale is None or self.train_guidance_scale >= 1, "train_guidance_scale",
                 self.train_guidance_scale, "must be >= 1 (or null)", "train_guidance_scale=null")
        _require(self.train_timesteps >= 1, "train_timesteps", self.train_timesteps, "must be >= 1",
                 "train_timesteps=4")
        _require(self.timestep_shift > 0, "timestep_shift", self.timestep_shift, "must be > 0", "timestep_shift=3")
        _require(self.train_batch_size % self.group_size == 0, "train_batch_size", self.train_batch_size,
                 f"must be a multiple of group_size={self.group_size} (centring needs whole prompt groups)",
                 f"train_batch_size={4 * self.group_size}")
        for key in ("old_decay", "sampling_decay"):
            try:
                DecaySchedule.parse(getattr(self, key))
            except ValueError as e:
                _require(False, key, getattr(self, key), str(e), f"{key}=0-0.25-0.005-0.999")


def shifted_sigmas(n: int, shift: float, gen: torch.Generator) -> torch.Tensor:
    t = torch.rand(n, generator=gen)
    return shift * t / (1 + (shift - 1) * t)


class CRD:
    """The CRD epoch on a :class:`~flowalign.trainers.loop.Run`."""

    def __init__(self, cfg: CRDConfig):
        self.cfg = cfg
        self.old_schedule = DecaySchedule.parse(cfg.old_decay)
        self.sampling_schedule = DecaySchedule.parse(cfg.sampling_decay)

    def setup(self, run) -> None:
        self.old = Snapshot(run.params)
        self.sampling = Snapshot(run.params)

    def state_dict(self) -> dict:
        return {"old": self.old.state_dict(), "sampling": self.sampling.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.old.load_state_dict(state["old"])
        self.sampling.load_state_dict(state["sampling"])

    def epoch(self, run, epoch: int, shared: torch.Generator, local: torch.Generator) -> dict:
        cfg, model = self.cfg, run.model
        prompts, groups = run.epoch_prompts(shared)
        t0 = time.perf_counter()
        with self.sampling.swapped_in():
            traj = run.rollout(prompts, local, sampler="ode")
        rewards = run.score(traj)
        t_rollout = time.perf_counter() - t0
        sample_groups = groups.repeat_interleave(cfg.group_size)
        adv, all_rewards = run.advantages(rewards, sample_groups, epoch, cfg.global_std, cfg.adv_clip)
        r01 = advantage_to_unit(adv, cfg.adv_clip)
        kl_gs = model.guidance_or_default(cfg.kl_guidance_scale)
        train_gs = model.guidance_or_default(cfg.guidance_scale if cfg.train_guidance_scale is None
                                             else cfg.train_guidance_scale)
        cond = traj.cond
        need_cfg = max(train_gs, kl_gs if cfg.kl_beta > 0 else 1.0)
        if need_cfg > 1 and traj.guidance_scale <= 1:  # CFG-free rollouts carry no uncond half; CFG > 1 needs it
            with torch.no_grad():
                cond = model.encode(prompts, guidance_scale=need_cfg).repeat_interleave(cfg.group_size)
        n_groups = len(prompts)
        per_batch = cfg.train_batch_size // cfg.group_size
        stats: dict[str, list[float]] = {"crd": [], "kl": [], "implicit": [], "grad_norm": []}
        order = torch.randperm(n_groups, generator=local)  # shuffle whole groups, never split one
        for start in range(0, n_groups, per_batch):
            gidx = order[start:start + per_batch]
            mb = (gidx[:, None] * cfg.group_size + torch.arange(cfg.group_size)).flatten()
            sub, sub_cond = traj.index(mb), cond.index(mb)
            x0 = sub.x0.to(model.device)
            r_mb, g_mb = r01[mb].to(model.device), sample_groups[mb].to(model.device)
            for _ in range(cfg.train_timesteps):
                sigma = shifted_sigmas(len(mb), cfg.timestep_shift, local).to(model.device)
                eps = torch.randn(x0.shape, generator=local).to(model.device)
                s = sigma.view(-1, *([1] * (x0.ndim - 1)))
                xt, target = (1 - s) * x0 + s * eps, eps - x0
                # the snapshots and the reference run before the model's own forward: swapping weights after it
                # would invalidate the saved tensors of its backward
                with torch.no_grad(), run.unwrapped(), run.autocast():
                    with self.old.swapped_in():
                        v_old = model.velocity(xt, sigma, sub_cond, train_gs)
                    v_ref = None
                    if cfg.kl_beta > 0:
                        with run.reference():
                            v_ref = model.velocity(xt, sigma, sub_cond, kl_gs)
                with run.autocast():
                    v = model.velocity(xt, sigma, sub_cond, train_gs)
                r_theta = implicit_reward(v, v_old, target)
                loss = crd_loss(r_theta, r_mb, g_mb, cfg.beta)
                kl = torch.zeros((), device=loss.device)
                if v_ref is not None:
                    per = (v.float() - v_ref.float()).flatten(1).pow(2).mean(1)
                    kl = (adaptive_kl_weight(r_mb, cfg.kl_min_coef) * per).mean()
                run.backward((loss + cfg.kl_beta * kl) / cfg.train_timesteps)
                stats["crd"].append(loss.item())
                stats["kl"].append(kl.item())
                stats["implicit"].append(r_theta.detach().mean().item())
            stats["grad_norm"].append(run.optimizer_step())
            self.old.update(self.old_schedule(run.step))
            self.sampling.update(self.sampling_schedule(run.step))
        return epoch_metrics(all_rewards, t_rollout, time.perf_counter() - t0 - t_rollout,
                             crd_loss=mean(stats["crd"]), kl=mean(stats["kl"]), implicit_reward=mean(stats["implicit"]),
                             grad_norm=mean(stats["grad_norm"]))


def train_crd(cfg: CRDConfig, model=None, reward=None) -> dict:
    """Run CRD; ``model``/``reward`` objects may replace the names in ``cfg`` (tests, notebooks)."""
    return run_task(cfg, CRD(cfg), model=model, reward=reward)


def main(config, overrides=()) -> dict:
    return train_crd(load_config(CRDConfig, config, overrides))
