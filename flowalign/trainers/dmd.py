"""Distribution matching distillation for flow models (DMD2-style): ``task: dmd``, and Re-DMD: ``task: re-dmd``.

A few-step **student** (the trained model, LoRA or full; it starts as the teacher) generates samples without
CFG in ``student_steps`` steps of the model's sigma schedule; by default each step predicts x0 and re-noises it
with fresh noise to the next level (DMD2's sampler, the ``cps`` rule at eta 1), so every step's x0 prediction
is trained to be a sample. The saved student carries these settings: ``flowalign sample --model <run>/student``
samples it as trained. Each epoch:

1. ``ttur`` **critic** updates: the critic (a trainable copy of the teacher's transformer, the "fake score") learns
   the student's current distribution by flow matching on fresh student samples at shifted-uniform noise levels;
2. one **student** update. Backward simulation (DMD2): per sample a step ``k`` of the student's schedule is
   drawn, the student runs ``k`` steps without gradient, and its x0 prediction ``x`` from that state is trained
   (the critic learns the distribution of the same x0 predictions). ``x`` is
   noised to a random level; the frozen teacher with CFG (the "real" score; the LoRA switched off, or the
   initial weights) and the critic each predict x0 there, and the student follows the normalised
   distribution-matching direction (:mod:`flowalign.functional.dmd`).

Re-DMD (Reward Forcing) weights each sample's DM loss by ``exp(reward_beta * r_hat)`` with ``r_hat`` the
reward of the student's x0 prediction, standardised over the batch (``reward_standardize: false``: the raw
reward, as published). Not implemented yet: the diffusion-GAN head on critic features.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from pathlib import Path

import torch

from flowalign.config import ConfigError, _require, field, load_config
from flowalign.functional.dmd import CFG_CONVENTIONS, dm_gradient, dm_loss, reward_weights, shifted_uniform_sigmas
from flowalign.functional.flow import interpolate, velocity_target, x0_from_velocity
from flowalign.trainers.loop import TrainConfig, mean, run_task


@dataclasses.dataclass
class DMDConfig(TrainConfig):
    """`flowalign train` (task: dmd | re-dmd): distil the model into a few-step CFG-free student."""

    task: str = field("dmd", "What `flowalign train` runs: dmd, or re-dmd (reward-weighted DMD).",
                      choices=("dmd", "re-dmd"))
    out: str = field("runs/dmd", "Run folder; the student pipeline is written to out/student.")
    student_steps: int = field(4, "Sampling steps of the student (on the model's sigma schedule, no CFG).")
    student_sampler: str = field("cps", "The student's step rule. cps at student_eta 1 is DMD2's multi-step sampler: "
                                        "predict x0, re-noise it with fresh noise to the next level; ode: Euler.",
                                 choices=("cps", "ode"))
    student_eta: float = field(1.0, "eta of the student's step rule (cps: 1 = fresh noise at every step).")
    guidance_scale: float | None = field(None, "CFG scale of the teacher (the real score); null = the model's "
                                               "default.")
    cfg_convention: str = field("uncond", "Teacher CFG: uncond = u + s (c - u) (DMD2), cond = c + s (c - u) "
                                          "(Reward Forcing).", choices=CFG_CONVENTIONS)
    ttur: int = field(5, "Critic updates per student update (two-time-scale update rule; DMD2 uses 5-10).")
    critic_lr: float | None = field(None, "Critic learning rate; null = lr.")
    critic_finetune: str = field("full", "The critic (fake score): full = a trainable full copy of the teacher's "
                                         "transformer (fp32 weights and AdamW state: 16 bytes a parameter); lora = a "
                                         "copy whose LoRA adapter alone trains (lora_rank/lora_alpha; far less "
                                         "memory).", choices=("full", "lora"))
    timestep_shift: float = field(1.0, "Noise levels of the DM loss and the critic: shifted uniform, "
                                       "shift * t / (1 + (shift - 1) t), clamped to [0.02, 0.98] (Reward Forcing: 5).")
    reward_beta: float = field(0.0, "re-dmd: sample weight exp(reward_beta * r_hat) (Reward Forcing: 2.0 on the "
                                    "raw reward).")
    reward_standardize: bool = field(True, "re-dmd: standardise the reward over the batch (false: raw reward).")
    eval_steps: int = field(4, "Sampling steps at evaluation (the student's).")
    eval_guidance_scale: float | None = field(1.0, "CFG at evaluation (the student is CFG-free).")
    group_size: int = field(4, "Samples per prompt.")

    def __post_init__(self):
        super().__post_init__()
        _require(self.student_steps >= 1, "student_steps", self.student_steps, "must be >= 1", "student_steps=4")
        _require(self.ttur >= 1, "ttur", self.ttur, "must be >= 1", "ttur=5")
        _require(self.timestep_shift > 0, "timestep_shift", self.timestep_shift, "must be > 0", "timestep_shift=1")
        _require(self.critic_lr is None or self.critic_lr > 0, "critic_lr", self.critic_lr, "must be > 0",
                 "critic_lr=1e-4")
        if self.task == "re-dmd":
            _require(self.reward_beta > 0, "reward_beta", self.reward_beta, "must be > 0 for task re-dmd",
                     "reward_beta=1.0")


class DMD:
    """The DMD / Re-DMD epoch on a :class:`~flowalign.trainers.loop.Run`."""

    def __init__(self, cfg: DMDConfig):
        self.cfg = cfg

    def setup(self, run) -> None:
        cfg, model = self.cfg, run.model
        self.gs_real = model.guidance_or_default(cfg.guidance_scale)  # resolved before the student's defaults
        # the student's sampling defaults: evaluation, export and `flowalign sample` use them
        model.configure({"num_steps": cfg.student_steps, "sampler": cfg.student_sampler, "eta": cfg.student_eta,
                         "guidance_scale": 1.0})
        if run.accelerator.num_processes > 1:
            raise ConfigError("dmd runs in one process for now (its critic is not wrapped for DDP); launch it "
                              "without accelerate's multi-process settings.")
        self.critic = copy.deepcopy(run.model.transformer)  # starts as the teacher (a fresh LoRA adds nothing)
        if cfg.critic_finetune == "lora":
            from peft import LoraConfig

            self.critic.requires_grad_(False)
            if not getattr(self.critic, "peft_config", None):  # a fully fine-tuned student: give the copy a LoRA
                self.critic.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or 2 * cfg.lora_rank,
                                                   init_lora_weights="gaussian",
                                                   target_modules=list(model.lora_targets)))
            for name, p in self.critic.named_parameters():
                p.requires_grad_("lora_" in name)
        else:
            self.critic.requires_grad_(True)
        self.critic_params = {n: p for n, p in self.critic.named_parameters() if p.requires_grad}
        for p in self.critic_params.values():
            p.data = p.data.float()  # trainable weights in fp32, as the student's
        self.critic_opt = torch.optim.AdamW(list(self.critic_params.values()), lr=cfg.critic_lr or cfg.lr,
                                            weight_decay=cfg.weight_decay)

    def state_dict(self) -> dict:
        return {"critic": {n: p.detach().cpu().clone() for n, p in self.critic_params.items()},
                "critic_opt": self.critic_opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if list(state["critic"]) != list(self.critic_params):
            raise ValueError("The checkpoint's critic holds other trainable parameters (critic_finetune changed?).")
        with torch.no_grad():
            for n, p in self.critic_params.items():
                p.copy_(state["critic"][n])
        self.critic_opt.load_state_dict(state["critic_opt"])

    @contextlib.contextmanager
    def critic_on(self, model):
        """Route the model's velocity through the critic (the fake score)."""
        previous = getattr(model, "_denoiser", None)
        model.use_denoiser(self.critic)
        try:
            yield
        finally:
            model.use_denoiser(previous)

    def student_trajectory(self, run, cond, gen: torch.Generator):
        """The student's samples (no gradient): every state of its ``student_steps`` steps from noise, with its own
        step rule."""
        import flowalign as fa

        with torch.no_grad(), run.unwrapped(), run.autocast():
            return fa.sample(run.model, list(cond.prompts), num_steps=self.cfg.student_steps, guidance_scale=1.0,
                             sampler=self.cfg.student_sampler, eta=self.cfg.student_eta, cond=cond, generator=gen,
                             decode=False, **run.size())

    def backward_simulated(self, run, cond, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Backward simulation: per sample a step ``k`` of the student's schedule and the state ``x_k`` its own
        sampler reaches there (no gradient); returns ``(x_k, sigma_k)`` with per-sample sigmas."""
        traj = self.student_trajectory(run, cond, gen)
        k = torch.randint(self.cfg.student_steps, (len(traj.latents),), generator=gen)
        xk = traj.latents[torch.arange(len(k)), k].to(run.model.device)
        return xk, traj.sigmas[k].to(run.model.device)

    def critic_step(self, run, cond, gen: torch.Generator) -> tuple[float, float]:
        """One flow-matching update of the critic on fresh student outputs (x0 predictions at backward-simulated
        states, the samples the student update moves); returns (loss, grad norm)."""
        model = run.model
        xk, sigma_k = self.backward_simulated(run, cond, gen)
        with torch.no_grad(), run.unwrapped(), run.autocast():
            x = x0_from_velocity(xk, model.velocity(xk, sigma_k, cond, 1.0).float(), sigma_k)
        sigma = shifted_uniform_sigmas(len(x), self.cfg.timestep_shift, gen).to(model.device)
        eps = torch.randn(x.shape, generator=gen).to(model.device)
        with self.critic_on(model), run.autocast():
            v = model.velocity(interpolate(x, eps, sigma), sigma, cond, 1.0)
        loss = (v.float() - velocity_target(x, eps)).pow(2).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"The critic's loss is {loss.item()} at step {run.step}; lower critic_lr.")
        self.critic_opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(list(self.critic_params.values()),
                                              run.cfg.max_grad_norm if run.cfg.max_grad_norm > 0 else float("inf"))
        self.critic_opt.step()
        return loss.item(), float(norm)

    def epoch(self, run, epoch: int, shared: torch.Generator, local: torch.Generator) -> dict:
        cfg, model = self.cfg, run.model
        prompts, _ = run.epoch_prompts(shared)
        prompts = [p for p in prompts for _ in range(cfg.group_size)]
        gs_eff = self.gs_real + (1.0 if cfg.cfg_convention == "cond" else 0.0)  # c + s(c - u) = u + (s + 1)(c - u)
        # both CFG halves: the teacher uses them, the student and the critic (guidance 1) only the cond half
        with torch.no_grad():
            cond = model.encode(prompts, guidance_scale=gs_eff)
        t0 = time.perf_counter()
        critic = [self.critic_step(run, cond, local) for _ in range(cfg.ttur)]
        t_critic = time.perf_counter() - t0

        # student update at a backward-simulated state of its own schedule
        xk, sigma_k = self.backward_simulated(run, cond, local)
        # the teacher and the critic run before the student's forward with gradient: swapping in the teacher's
        # weights (full fine-tuning) after it would invalidate the tensors its backward saved
        with torch.no_grad(), run.unwrapped(), run.autocast():
            x_ng = x0_from_velocity(xk, model.velocity(xk, sigma_k, cond, 1.0).float(), sigma_k)
            sigma = shifted_uniform_sigmas(len(x_ng), cfg.timestep_shift, local).to(model.device)
            eps = torch.randn(x_ng.shape, generator=local).to(model.device)
            xt = interpolate(x_ng, eps, sigma)
            with run.reference():
                x0_real = x0_from_velocity(xt, model.velocity(xt, sigma, cond, gs_eff).float(), sigma)
            with self.critic_on(model):
                x0_fake = x0_from_velocity(xt, model.velocity(xt, sigma, cond, 1.0).float(), sigma)
        with run.autocast():  # the same forward again, now with gradient
            x = x0_from_velocity(xk, model.velocity(xk, sigma_k, cond, 1.0).float(), sigma_k)
        record = {}
        weights = None
        if cfg.reward_beta > 0:  # Re-DMD: the reward of the student's x0 prediction weights its DM loss
            with torch.no_grad():
                rewards = run.reward(model.decode(x_ng), prompts).float()
            weights = reward_weights(rewards, cfg.reward_beta, cfg.reward_standardize).to(model.device)
            record = {"reward/mean": rewards.mean().item(), "reward/std": rewards.std().item(),
                      "train/weight_max": weights.max().item()}
        grad = dm_gradient(x_ng, x0_real, x0_fake)
        loss = dm_loss(x, grad, weights)
        run.backward(loss)
        norm = run.optimizer_step()
        t_student = time.perf_counter() - t0 - t_critic
        return {**record, "time/critic_s": t_critic, "time/student_s": t_student,
                "throughput/critic_samples_per_s": cfg.ttur * len(x) / max(t_critic, 1e-9),
                "train/dm_loss": loss.item(), "train/dm_grad": grad.abs().mean().item(), "train/grad_norm": norm,
                "train/critic_loss": mean([c[0] for c in critic]),
                "train/critic_grad_norm": mean([c[1] for c in critic])}

    def export(self, run, folder: Path) -> None:
        run.export_student(folder)


def train_dmd(cfg: DMDConfig, model=None, reward=None) -> dict:
    """Run DMD / Re-DMD; ``model``/``reward`` objects may replace the names in ``cfg`` (tests, notebooks)."""
    return run_task(cfg, DMD(cfg), model=model, reward=reward)


def main(config, overrides=()) -> dict:
    return train_dmd(load_config(DMDConfig, config, overrides))
