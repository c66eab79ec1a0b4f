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
3. the reward term on the one-step prediction ``z0 = f(x_hi, sigma_hi)``, either
   - ``reward_via: direct``: ``- reward_scale * R(decode(z0), prompt)``, the gradient through the VAE decoder and a
     differentiable expert reward (RG-LCD's ``--direct_optim_expert_reward``), or
   - ``reward_via: lrm``: ``- reward_scale * LRM(z0, prompt)``, a latent proxy reward model (a
     :class:`~flowalign.rewards.latent.LatentRewardNet` at sigma 0, fresh or from ``lrm_path``) that is frozen for
     this step and then updated online against the expert reward: for each of ``lrm_batch`` samples the expert
     scores the decoded one-step prediction, the EMA target's prediction and the teacher's sample, and the LRM
     learns that ranking by ``KL(softmax(expert / lrm_temperature) || softmax(LRM))`` (RG-LCD's
     ``distillation`` loss). The expert is never differentiated, so a rule-based verifier can be the expert.

The student samples in ``student_steps`` steps, each predicting x0 and re-noising it with fresh noise (the
``cps`` rule at eta 1; LCM's multistep consistency sampling); the saved student in ``out/student`` carries
these settings.
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
    reward_via: str = field("direct", "direct: the expert reward on the decoded one-step prediction (differentiable "
                                      "reward); lrm: a latent proxy reward model on it, learnt online from the "
                                      "expert's rankings.", choices=("direct", "lrm"))
    lrm_path: str | None = field(None, "reward_via=lrm: start from this trained latent reward (a reward-model run "
                                       "folder or its latent_reward.safetensors); null: a fresh LatentRewardNet.")
    lrm_lr: float = field(1e-4, "reward_via=lrm: the LRM's AdamW learning rate.")
    lrm_batch: int = field(8, "reward_via=lrm: samples per minibatch whose (prediction, target, teacher) triples "
                              "the expert ranks for the LRM update.")
    lrm_temperature: float = field(1.0, "reward_via=lrm: temperature of the expert's softmax over each triple.")
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
        _require(self.lrm_lr > 0, "lrm_lr", self.lrm_lr, "must be > 0", "lrm_lr=1e-4")
        _require(self.lrm_batch >= 1, "lrm_batch", self.lrm_batch, "must be >= 1", "lrm_batch=8")
        _require(self.lrm_temperature > 0, "lrm_temperature", self.lrm_temperature, "must be > 0",
                 "lrm_temperature=1.0")
        _require(self.train_timesteps >= 1, "train_timesteps", self.train_timesteps, "must be >= 1",
                 "train_timesteps=2")


class RGLCD:
    """The RG-LCD epoch on a :class:`~flowalign.trainers.loop.Run`."""

    def __init__(self, cfg: RGLCDConfig):
        self.cfg = cfg

    def setup(self, run) -> None:
        cfg, model = self.cfg, run.model
        self.lrm = self.build_lrm(run) if cfg.reward_via == "lrm" else None
        if cfg.reward_via == "direct" and cfg.reward_scale > 0 and not getattr(run.reward, "differentiable", False):
            raise ConfigError(f"rg-lcd backpropagates through the reward, but {cfg.reward!r} is not differentiable; "
                              f"choose a differentiable reward (e.g. shapes-clip, pickscore), reward_via=lrm "
                              f"or reward_scale=0.")
        self.gs_teacher = model.guidance_or_default(cfg.guidance_scale)
        self.solver_sigmas = model.sigmas(cfg.solver_steps, **run.size()).float()
        self.target = Snapshot(run.params)
        model.configure({"num_steps": cfg.student_steps, "sampler": "cps", "eta": 1.0, "guidance_scale": 1.0})

    def build_lrm(self, run):
        """The latent proxy reward model and its optimizer (RG-LCD's LRM)."""
        from flowalign.rewards.latent import LatentRewardNet, load_latent_reward, text_encoder_from_model

        cfg, model = self.cfg, run.model
        probe = model.noise(1, **{k: v for k, v in run.size().items() if k != "num_frames"})
        if probe.ndim != 4:
            raise ConfigError(f"reward_via=lrm needs image latents (B, C, h, w); {cfg.model!r} has "
                              f"{tuple(probe.shape)}. Use reward_via=direct.")
        if cfg.lrm_path:
            lrm = load_latent_reward(cfg.lrm_path, model=model)
        else:
            encoder = text_encoder_from_model(model)
            torch.manual_seed(cfg.seed)
            lrm = LatentRewardNet(probe.shape[1], text_dim=encoder(["a"]).shape[-1], text_encoder=encoder,
                                  name="rg-lcd-lrm")
        lrm = lrm.to(model.device).float()
        self.lrm_params = lrm.trainable_parameters()
        self.lrm_opt = torch.optim.AdamW(self.lrm_params, lr=cfg.lrm_lr)
        return lrm

    def lrm_scores(self, z0: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The LRM's standardised score of clean latents (sigma 0), differentiable in ``z0``."""
        sigma = torch.zeros(len(z0), device=z0.device)
        return self.lrm.predict(z0.float(), sigma, self.lrm.encode_text(prompts))

    def lrm_step(self, run, triples: list[torch.Tensor], prompts: list[str]) -> tuple[float, float, torch.Tensor]:
        """Update the LRM toward the expert's ranking of each (prediction, target, teacher sample) triple;
        returns (loss, how often the LRM's best of a triple is the expert's, the expert's score of the
        predictions)."""
        n = min(self.cfg.lrm_batch, len(prompts))
        latents = torch.cat([t[:n].detach() for t in triples])
        prompts3 = list(prompts[:n]) * len(triples)
        with torch.no_grad():
            expert = run.reward(run.model.decode(latents), prompts3).float().view(len(triples), n).T
        for p in self.lrm_params:
            p.requires_grad_(True)
        logits = self.lrm_scores(latents, prompts3).view(len(triples), n).T
        target = torch.softmax(expert / self.cfg.lrm_temperature, dim=1)
        loss = torch.nn.functional.kl_div(torch.log_softmax(logits, dim=1), target, reduction="batchmean")
        self.lrm_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.lrm_opt.step()
        agree = (logits.argmax(1) == expert.argmax(1)).float().mean().item()
        return loss.item(), agree, expert[:, 0].cpu()

    def state_dict(self) -> dict:
        state = {"target": self.target.state_dict()}
        if self.lrm is not None:
            state["lrm"] = [p.detach().cpu().clone() for p in self.lrm_params]
            state["lrm_opt"] = self.lrm_opt.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.target.load_state_dict(state["target"])
        if self.lrm is not None:
            with torch.no_grad():
                for p, saved in zip(self.lrm_params, state["lrm"]):
                    p.copy_(saved)
            self.lrm_opt.load_state_dict(state["lrm_opt"])

    def epoch(self, run, epoch: int, shared: torch.Generator, local: torch.Generator) -> dict:
        cfg, model = self.cfg, run.model
        prompts, _ = run.epoch_prompts(shared)
        t0 = time.perf_counter()
        with run.reference():  # the teacher's own CFG samples: the clean latents to distil on
            traj = run.rollout(prompts, local, sampler="ode", guidance_scale=self.gs_teacher)
        # the rollout's conditioning carries both CFG halves: the student reads it at guidance 1 (cond half only)
        x0_all, prompts_all, cond = traj.x0.float(), list(traj.prompts), traj.cond
        t_rollout = time.perf_counter() - t0
        stats: dict[str, list[float]] = {"lcd": [], "reward": [], "grad_norm": [], "lrm_loss": [], "lrm_agree": []}
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
                mb_prompts = [prompts_all[i] for i in mb.tolist()]
                if cfg.reward_scale > 0 and self.lrm is None:
                    r = run.reward(model.decode(pred), mb_prompts).float()
                    loss = loss - cfg.reward_scale * r.mean()
                    rewards.append(r.detach().cpu())
                    stats["reward"].append(r.mean().item())
                elif cfg.reward_scale > 0:  # the LRM is a constant here; only z0 gets its gradient
                    for p in self.lrm_params:
                        p.requires_grad_(False)
                    loss = loss - cfg.reward_scale * self.lrm_scores(pred, mb_prompts).mean()
                run.backward(loss / cfg.train_timesteps)
                stats["lcd"].append(lcd.item())
                if self.lrm is not None:
                    lrm_loss, agree, r = self.lrm_step(run, [pred, target, x0], mb_prompts)
                    rewards.append(r)
                    stats["reward"].append(r.mean().item())
                    stats["lrm_loss"].append(lrm_loss)
                    stats["lrm_agree"].append(agree)
            stats["grad_norm"].append(run.optimizer_step())
            self.target.update(cfg.target_ema)
        all_rewards = torch.cat(rewards) if rewards else torch.zeros(len(x0_all))
        return epoch_metrics(all_rewards, t_rollout, time.perf_counter() - t0 - t_rollout,
                             lcd_loss=mean(stats["lcd"]), onestep_reward=mean(stats["reward"]),
                             grad_norm=mean(stats["grad_norm"]),
                             **({"lrm_loss": mean(stats["lrm_loss"]), "lrm_agree": mean(stats["lrm_agree"])}
                                if self.lrm is not None else {}))

    def export(self, run, folder: Path) -> None:
        run.export_student(folder)


def train_rg_lcd(cfg: RGLCDConfig, model=None, reward=None) -> dict:
    """Run RG-LCD; ``model``/``reward`` objects may replace the names in ``cfg`` (tests, notebooks)."""
    return run_task(cfg, RGLCD(cfg), model=model, reward=reward)


def main(config, overrides=()) -> dict:
    return train_rg_lcd(load_config(RGLCDConfig, config, overrides))
