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
reward, as published). The weights choose which samples the student fits hardest, not where DMD converges: once
the student matches the teacher, every sample's DM direction is zero whatever its weight. So Re-DMD can tilt the
student toward the reward only where and while it cannot match the teacher (measured in benchmarks/README.md).

The optional adversarial term (``gan_weight > 0``; DMD2's diffusion-GAN) adds ``gan_weight * softplus(-D(x))`` to
the student's loss, ``D`` a head on the critic's middle-block features of noised samples (``disc: critic``) or on a
frozen CLIP image tower (``disc: clip``), trained once per student update against a pool of real samples (the
teacher's CFG samples, or ground-truth renders on the shapes world); see :mod:`flowalign.trainers.discriminator`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from pathlib import Path

import torch

from flowalign.config import ConfigError, _require, field, load_config
from flowalign.functional.dmd import (
    CFG_CONVENTIONS,
    dm_gradient,
    dm_loss,
    gan_discriminator_loss,
    gan_generator_loss,
    reward_weights,
    shifted_uniform_sigmas,
)
from flowalign.functional.flow import interpolate, velocity_target, x0_from_velocity
from flowalign.trainers.discriminator import DISCRIMINATORS, REAL_SOURCES, build_discriminator, real_pool
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
    gan_weight: float = field(0.0, "Weight of the adversarial generator loss (0: off; DMD2: 5e-3 SDXL, 1e-3 SD1.5).")
    disc: str = field("critic", "Discriminator: critic = a head on the critic's middle-block features of noised "
                                "latents (DMD2's diffusion-GAN); clip = heads on a frozen CLIP image tower's layers "
                                "(Flash-DMD's pixel discriminator).", choices=DISCRIMINATORS)
    disc_backbone: str = field("shapes-clip", "disc=clip: the CLIP reward whose vision tower is the frozen encoder.")
    disc_lr: float | None = field(None, "Discriminator heads' learning rate; null = critic_lr or lr.")
    gan_real: str = field("teacher", "Real samples of the adversarial loss: teacher = the teacher's CFG samples (the "
                                     "model's default steps) of training prompts; renders = ground-truth renders of "
                                     "the shapes world's captions (real data, as DMD2 uses).", choices=REAL_SOURCES)
    real_pool: int = field(256, "How many real samples are drawn once at the start (seeded; redrawn on resume).")
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
        _require(self.gan_weight >= 0, "gan_weight", self.gan_weight, "must be >= 0", "gan_weight=0.01")
        _require(self.real_pool >= 1, "real_pool", self.real_pool, "must be >= 1", "real_pool=256")
        if self.task == "re-dmd":
            _require(self.reward_beta > 0, "reward_beta", self.reward_beta, "must be > 0 for task re-dmd",
                     "reward_beta=1.0")


class DMD:
    """The DMD / Re-DMD epoch on a :class:`~flowalign.trainers.loop.Run`."""

    def __init__(self, cfg: DMDConfig):
        self.cfg = cfg

    def setup(self, run) -> None:
        cfg, model = self.cfg, run.model
        # the teacher's settings, resolved before the student's defaults replace the model's
        self.gs_real = model.guidance_or_default(cfg.guidance_scale)
        self.teacher_steps = model.default_num_steps
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
        self.disc = None
        if cfg.gan_weight > 0:
            self.setup_gan(run)

    def setup_gan(self, run) -> None:
        """The discriminator (its heads train, its features are frozen or the critic's) and the real pool."""
        cfg, model = self.cfg, run.model
        self.real, real_prompts = real_pool(run, cfg.gan_real, cfg.real_pool, self.gs_eff, self.teacher_steps,
                                               cfg.seed + 7919)
        with torch.no_grad():
            self.real_cond = model.encode(real_prompts, guidance_scale=1.0)
        self.disc = build_discriminator(cfg.disc, self.critic, cfg.disc_backbone).to(model.device)
        self.disc.build(model, self.real[:1].to(model.device), self.real_cond)
        self.disc_params = list(self.disc.head.parameters())
        self.disc_opt = torch.optim.AdamW(self.disc_params, lr=cfg.disc_lr or cfg.critic_lr or cfg.lr,
                                          betas=(0.0, 0.99), weight_decay=cfg.weight_decay)

    def discriminate(self, run, x: torch.Tensor, cond, gen: torch.Generator) -> torch.Tensor:
        """The discriminator's logits of clean latents ``x`` (the critic's weights are frozen for it)."""
        with run.autocast():
            return self.disc(run.model, x, cond, gen)

    def discriminator_step(self, run, fake: torch.Tensor, fake_cond, gen: torch.Generator) -> tuple[float, float]:
        """One update of the heads: real pool samples against the student's (detached) samples; returns
        (loss, accuracy of telling them apart)."""
        idx = torch.randint(len(self.real), (len(fake),), generator=gen)
        real = self.real[idx].to(fake.device)
        critic_grad = [p.requires_grad for p in self.critic_params.values()]
        for p in self.critic_params.values():
            p.requires_grad_(False)  # only the heads learn here
        try:
            logits_real = self.discriminate(run, real, self.real_cond.index(idx), gen)
            logits_fake = self.discriminate(run, fake.detach(), fake_cond, gen)
        finally:
            for p, g in zip(self.critic_params.values(), critic_grad):
                p.requires_grad_(g)
        loss = gan_discriminator_loss(logits_real, logits_fake)
        self.disc_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.disc_opt.step()
        acc = 0.5 * ((logits_real > 0).float().mean() + (logits_fake < 0).float().mean())
        return loss.item(), acc.item()

    def generator_gan_loss(self, run, x: torch.Tensor, cond, gen: torch.Generator) -> torch.Tensor:
        """``softplus(-D(x))`` with gradient into the student's sample only (heads and critic untouched)."""
        frozen = [p for p in [*self.disc_params, *self.critic_params.values()] if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        try:
            return gan_generator_loss(self.discriminate(run, x, cond, gen))
        finally:
            for p in frozen:
                p.requires_grad_(True)

    def state_dict(self) -> dict:
        state = {"critic": {n: p.detach().cpu().clone() for n, p in self.critic_params.items()},
                 "critic_opt": self.critic_opt.state_dict()}
        if self.disc is not None:
            state["disc"] = [p.detach().cpu().clone() for p in self.disc_params]
            state["disc_opt"] = self.disc_opt.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if list(state["critic"]) != list(self.critic_params):
            raise ValueError("The checkpoint's critic holds other trainable parameters (critic_finetune changed?).")
        with torch.no_grad():
            for n, p in self.critic_params.items():
                p.copy_(state["critic"][n])
        self.critic_opt.load_state_dict(state["critic_opt"])
        if self.disc is not None:
            if "disc" not in state:
                raise ValueError("The checkpoint has no discriminator (gan_weight was 0 when it was written).")
            with torch.no_grad():
                for p, saved in zip(self.disc_params, state["disc"]):
                    p.copy_(saved)
            self.disc_opt.load_state_dict(state["disc_opt"])

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

    def backward_simulated(self, run, cond, gen: torch.Generator, steps: list[int] | None = None):
        """Backward simulation: per sample a step ``k`` of the student's schedule (drawn from ``steps``, default
        all) and the state ``x_k`` its own sampler reaches there (no gradient); returns ``(x_k, sigma_k, k, traj)``
        with per-sample sigmas and the whole trajectory (its last state is the student's sample)."""
        traj = self.student_trajectory(run, cond, gen)
        steps = torch.tensor(steps if steps is not None else range(self.cfg.student_steps))
        k = steps[torch.randint(len(steps), (len(traj.latents),), generator=gen)]
        xk = traj.latents[torch.arange(len(k)), k].to(run.model.device)
        return xk, traj.sigmas[k].to(run.model.device), k, traj

    def predict_x0(self, run, x: torch.Tensor, sigma: torch.Tensor, cond) -> torch.Tensor:
        """The student's x0 prediction (CFG-free), with gradient when enabled."""
        with run.autocast():
            return x0_from_velocity(x, run.model.velocity(x, sigma, cond, 1.0).float(), sigma)

    @torch.no_grad()
    def dm_targets(self, run, x: torch.Tensor, cond, gen: torch.Generator) -> torch.Tensor:
        """The normalised DM direction of samples ``x``: noised to a shifted-uniform level, the teacher's CFG x0
        and the critic's x0 there (no gradient)."""
        model = run.model
        sigma = shifted_uniform_sigmas(len(x), self.cfg.timestep_shift, gen).to(model.device)
        eps = torch.randn(x.shape, generator=gen).to(model.device)
        xt = interpolate(x, eps, sigma)
        with run.unwrapped(), run.autocast():
            with run.reference():
                x0_real = x0_from_velocity(xt, model.velocity(xt, sigma, cond, self.gs_eff).float(), sigma)
            with self.critic_on(model):
                x0_fake = x0_from_velocity(xt, model.velocity(xt, sigma, cond, 1.0).float(), sigma)
        return dm_gradient(x, x0_real, x0_fake)

    def critic_step(self, run, cond, gen: torch.Generator) -> tuple[float, float]:
        """One flow-matching update of the critic on fresh student outputs (x0 predictions at backward-simulated
        states, the samples the student update moves); returns (loss, grad norm)."""
        model = run.model
        xk, sigma_k, _, _ = self.backward_simulated(run, cond, gen)
        with torch.no_grad(), run.unwrapped():
            x = self.predict_x0(run, xk, sigma_k, cond)
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

    def encode_epoch(self, run, shared: torch.Generator) -> tuple[list[str], object]:
        """The epoch's prompts (group_size copies each) and their conditioning with both CFG halves (the teacher
        uses both, the student and the critic only the conditional one)."""
        prompts, _ = run.epoch_prompts(shared)
        prompts = [p for p in prompts for _ in range(self.cfg.group_size)]
        with torch.no_grad():
            return prompts, run.model.encode(prompts, guidance_scale=self.gs_eff)

    @property
    def gs_eff(self) -> float:
        """The teacher's CFG scale in the ``u + s (c - u)`` form: ``c + s (c - u) = u + (s + 1)(c - u)``."""
        return self.gs_real + (1.0 if self.cfg.cfg_convention == "cond" else 0.0)

    def critic_steps(self, run, cond, gen: torch.Generator) -> dict:
        t0 = time.perf_counter()
        critic = [self.critic_step(run, cond, gen) for _ in range(self.cfg.ttur)]
        seconds = time.perf_counter() - t0
        return {"time/critic_s": seconds,
                "throughput/critic_samples_per_s": self.cfg.ttur * len(cond) / max(seconds, 1e-9),
                "train/critic_loss": mean([c[0] for c in critic]),
                "train/critic_grad_norm": mean([c[1] for c in critic])}

    def epoch(self, run, epoch: int, shared: torch.Generator, local: torch.Generator) -> dict:
        cfg, model = self.cfg, run.model
        prompts, cond = self.encode_epoch(run, shared)
        record = self.critic_steps(run, cond, local)
        t0 = time.perf_counter()
        # student update at a backward-simulated state of its own schedule; the teacher and the critic run before
        # the student's forward with gradient: swapping in the teacher's weights (full fine-tuning) after it would
        # invalidate the tensors its backward saved
        xk, sigma_k, _, _ = self.backward_simulated(run, cond, local)
        with torch.no_grad(), run.unwrapped():
            x_ng = self.predict_x0(run, xk, sigma_k, cond)
        grad = self.dm_targets(run, x_ng, cond, local)
        x = self.predict_x0(run, xk, sigma_k, cond)  # the same forward again, now with gradient
        weights = None
        if cfg.reward_beta > 0:  # Re-DMD: the reward of the student's x0 prediction weights its DM loss
            with torch.no_grad():
                rewards = run.reward(model.decode(x_ng), prompts).float()
            weights = reward_weights(rewards, cfg.reward_beta, cfg.reward_standardize).to(model.device)
            record |= {"reward/mean": rewards.mean().item(), "reward/std": rewards.std().item(),
                       "train/weight_max": weights.max().item()}
        loss = dm_loss(x, grad, weights)
        record |= {"train/dm_loss": loss.item(), "train/dm_grad": grad.abs().mean().item()}
        record |= self.student_update(run, loss, x, cond, local)
        return record | {"time/student_s": time.perf_counter() - t0}

    def student_update(self, run, loss: torch.Tensor, fake: torch.Tensor, cond, gen: torch.Generator) -> dict:
        """The student's optimizer step on ``loss`` plus, with a discriminator, the adversarial loss of ``fake``
        (student x0 predictions with gradient), then one discriminator update on them."""
        record = {}
        if self.disc is not None:
            gan = self.generator_gan_loss(run, fake, cond, gen)
            loss = loss + self.cfg.gan_weight * gan
            record["train/gan_g_loss"] = gan.item()
        run.backward(loss)
        record["train/grad_norm"] = run.optimizer_step()
        if self.disc is not None:
            d_loss, d_acc = self.discriminator_step(run, fake.detach(), cond, gen)
            record |= {"train/gan_d_loss": d_loss, "train/disc_acc": d_acc}
        return record

    def export(self, run, folder: Path) -> None:
        run.export_student(folder)


def train_dmd(cfg: DMDConfig, model=None, reward=None) -> dict:
    """Run DMD / Re-DMD; ``model``/``reward`` objects may replace the names in ``cfg`` (tests, notebooks)."""
    return run_task(cfg, DMD(cfg), model=model, reward=reward)


def main(config, overrides=()) -> dict:
    return train_dmd(load_config(DMDConfig, config, overrides))
