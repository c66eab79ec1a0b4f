"""Reward-guided latent consistency distillation (RG-LCD, Li et al. 2024): ``task: rg-lcd``.

A few-step CFG-free consistency **student** (the trained model, LoRA or full; it starts as the teacher) whose
consistency function is its x0 prediction ``f(x, sigma) = x - sigma v(x, sigma)``
(:mod:`flowalign.functional.lcd`). Each epoch:

1. the frozen teacher (the LoRA switched off, or the initial weights) draws ``group_size`` ODE samples per prompt
   with CFG (``num_steps``, ``guidance_scale``): the clean latents the consistency loss noises;
2. for ``train_timesteps`` draws per sample: a pair ``(sigma_hi, sigma_lo)`` ``skip`` steps apart on the
   teacher's ``solver_steps``-step schedule, ``x_hi`` on the forward process, one teacher ODE step with CFG to
   ``x_lo``, the target ``f_target(x_lo, sigma_lo)`` from an EMA of the student (``target_ema``, LCM: 0.95), and
   the pseudo-Huber loss ``L_LCD`` between ``f(x_hi, sigma_hi)`` and it;
3. the reward term: ``- reward_scale * R(decode(f(x_hi, sigma_hi)), prompt)`` on the one-step prediction, with the
   gradient through the VAE decoder and a differentiable reward (RG-LCD's direct expert-reward path).

The student samples in ``student_steps`` steps, each predicting x0 and re-noising it with fresh noise (the
``cps`` rule at eta 1; LCM's multistep consistency sampling); the saved student in ``out/student`` carries
these settings. Not implemented yet: the latent proxy reward model updated online (RG-LCD's LRM path).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from flowalign.config import ConfigError, _require, field, load_config
from flowalign.functional.flow import interpolate, x0_from_velocity
from flowalign.functional.lcd import euler_solver_step, pseudo_huber, skip_pairs
from flowalign.trainers.loop import TrainConfig, epoch_metrics, mean, run_task
from flowalign.trainers.snapshot import Snapshot


@dataclasses.dataclass
class RGLCDConfig(TrainConfig):
    """`flowalign train` (task: rg-lcd): consistency distillation with a reward on the one-step prediction."""

    task: str = field("rg-lcd", "What `flowalign train` runs; this schema is RG-LCD.", choices=("rg-lcd",))
    out: str = field("runs/rg-lcd", "Run folder; the student pipeline is written to out/student.")
    reward: str = field("shapes-clip", "Differentiable reward on the one-step prediction: registered name or "
                                       "'package.module:Class'.")
    student_steps: int = field(4, "Sampling steps of the student (x0 prediction re-noised at every step, no CFG).")
    solver_steps: int = field(50, "Steps of the teacher schedule the skipping-step solver walks (LCM: 50).")
    skip: int = field(1, "Schedule steps per solver step (with solver_steps 50, LCM's skip of 20 in 1000).")
    guidance_scale: float | None = field(None, "CFG of the teacher (samples and solver step); null = the model's "
                                               "default.")
    target_ema: float = field(0.95, "EMA decay of the target network (LCM: 0.95).")
    huber_c: float = field(1e-3, "Pseudo-Huber constant c (LCM: 0.001).")
    reward_scale: float = field(1.0, "Weight of -R on the one-step prediction (0: plain LCD).")
    train_timesteps: int = field(2, "(sigma_hi, sigma_lo) pairs drawn per sample and epoch.")
    eval_steps: int = field(4, "Sampling steps at evaluation (the student's).")
    eval_guidance_scale: float | None = field(1.0, "CFG at evaluation (the student is CFG-free).")
    group_size: int = field(4, "Teacher samples per prompt.")

    def __post_init__(self):
        super().__post_init__()
        _require(self.student_steps >= 1, "student_steps", self.student_steps, "must be >= 1", "student_steps=4")
        _require(1 <= self.skip < self.solver_steps, "skip", self.skip, f"must lie in [1, solver_steps="
                 f"{self.solver_steps})", "skip=1")
        _require(0 <= self.target_ema < 1, "target_ema", self.target_ema, "must lie in [0, 1)", "target_ema=0.95")
        _require(self.huber_c > 0, "huber_c", self.huber_c, "must be > 0", "huber_c=0.001")
        _require(self.reward_scale >= 0, "reward_scale", self.reward_scale, "must be >= 0", "reward_scale=1.0")
        _require(self.train_timesteps >= 1, "train_timesteps", self.train_timesteps, "must be >= 1",
                 "train_timesteps=2")


class RGLCD:
    """The RG-LCD epoch on a :class:`~flowalign.trainers.loop.Run`."""

    def __init__(self, cfg: RGLCDConfig):
        self.cfg = cfg

    def setup(self, run) -> None:
        cfg, model = self.cfg, run.model
        if cfg.reward_scale > 0 and not getattr(run.reward, "differentiable", False):
            raise ConfigError(f"rg-lcd backpropagates through the reward, but {cfg.reward!r} is not differentiable; "
                              f"choose a differentiable reward (e.g. shapes-clip, pickscore) or reward_scale=0.")
        self.gs_teacher = model.guidance_or_default(cfg.guidance_scale)
        self.solver_sigmas = model.sigmas(cfg.solver_steps, **run.size()).float()
        self.target = Snapshot(run.params)
        model.configure({"num_steps": cfg.student_steps, "sampler": "cps", "eta": 1.0, "guidance_scale": 1.0})

    def state_dict(self) -> dict:
        return {"target": self.target.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.target.load_state_dict(state["target"])

    def epoch(self, run, epoch: int, shared: torch.Generator, local: torch.Generator) -> dict:
        cfg, model = self.cfg, run.model
        prompts, _ = run.epoch_prompts(shared)
        t0 = time.perf_counter()
        with run.reference():  # the teacher's own CFG samples: the clean latents to distil on
            traj = run.rollout(prompts, local, sampler="ode", guidance_scale=self.gs_teacher)
        # the rollout's conditioning carries both CFG halves: the student reads it at guidance 1 (cond half only)
        x0_all, prompts_all, cond = traj.x0.float(), list(traj.prompts), traj.cond
        t_rollout = time.perf_counter() - t0
        stats: dict[str, list[float]] = {"lcd": [], "reward": [], "grad_norm": []}
        rewards = []
        per = max(1, cfg.train_batch_size)
        order = torch.randperm(len(x0_all), generator=local)
        for start in range(0, len(order), per):
            mb = order[start:start + per]
            x0, c = x0_all[mb].to(model.device), cond.index(mb)
            for _ in range(cfg.train_timesteps):
                hi, lo = skip_pairs(self.solver_sigmas, len(mb), cfg.skip, local)
                hi, lo = hi.to(model.device), lo.to(model.device)
                eps = torch.randn(x0.shape, generator=local).to(model.device)
                x_hi = interpolate(x0, eps, hi)
                # teacher step and EMA target before the student's forward with gradient (weight swaps)
                with torch.no_grad(), run.unwrapped(), run.autocast():
                    with run.reference():
                        x_lo = euler_solver_step(x_hi, model.velocity(x_hi, hi, c, self.gs_teacher).float(), hi,
                                                 lo)
                    with self.target.swapped_in():
                        target = x0_from_velocity(x_lo, model.velocity(x_lo, lo, c, 1.0).float(), lo)
                with run.autocast():
                    pred = x0_from_velocity(x_hi, model.velocity(x_hi, hi, c, 1.0).float(), hi)
                lcd = pseudo_huber(pred, target, cfg.huber_c)
                loss = lcd
                if cfg.reward_scale > 0:
                    r = run.reward(model.decode(pred), [prompts_all[i] for i in mb.tolist()]).float()
                    loss = loss - cfg.reward_scale * r.mean()
                    rewards.append(r.detach().cpu())
                    stats["reward"].append(r.mean().item())
                run.backward(loss / cfg.train_timesteps)
                stats["lcd"].append(lcd.item())
            stats["grad_norm"].append(run.optimizer_step())
            self.target.update(cfg.target_ema)
        all_rewards = torch.cat(rewards) if rewards else torch.zeros(len(x0_all))
        return epoch_metrics(all_rewards, t_rollout, time.perf_counter() - t0 - t_rollout,
                             lcd_loss=mean(stats["lcd"]), onestep_reward=mean(stats["reward"]),
                             grad_norm=mean(stats["grad_norm"]))

    def export(self, run, folder: Path) -> None:
        run.export_student(folder)


def train_rg_lcd(cfg: RGLCDConfig, model=None, reward=None) -> dict:
    """Run RG-LCD; ``model``/``reward`` objects may replace the names in ``cfg`` (tests, notebooks)."""
    return run_task(cfg, RGLCD(cfg), model=model, reward=reward)


def main(config, overrides=()) -> dict:
    return train_rg_lcd(load_config(RGLCDConfig, config, overrides))
