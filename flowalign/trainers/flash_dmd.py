"""Flash-DMD (arXiv 2511.20549, "Flash-DMD: Towards High-Fidelity Few-Step Image Generation with Efficient
Distillation and Joint Reinforcement Learning"): ``task: flash-dmd``.

DMD (:mod:`flowalign.trainers.dmd`) made cheaper by splitting the student's steps by noise level:

1. **Timestep-aware distillation.** The DM loss trains only the student's steps from *high-noise* states
   (``sigma >= dm_sigma_min``, backward-simulated as in DMD2); its *low-noise* steps are trained by an adversarial
   loss alone: the student's finished sample is re-noised to a low level of its schedule, the student denoises
   it, and a discriminator (Flash-DMD: a frozen image encoder with multi-level heads in pixel space; here
   ``disc: clip``, a frozen CLIP vision tower) scores the result against real samples with the non-saturating
   GAN losses.
2. **A critic that tracks the student.** The critic (fake score) still learns by flow matching on student samples,
   but only ``ttur`` (default 1) times per student update, and after each student update it is pulled toward the
   student's weights, ``psi <- lambda psi + (1 - lambda) theta`` (``critic_ema``), which is where the training
   cost saving over DMD2's 5-10 critic updates comes from.
3. **Joint RL** (``rl_every > 0``): every ``rl_every`` student updates, one step-level DPO update: from a
   high-noise state the student draws ``rl_candidates`` next states with its stochastic step rule, the reward
   ranks them (a latent reward scores the noisy candidates directly; a pixel reward scores the student's x0
   prediction from each), and the best and the worst form a pair for the step-level DPO loss
   ``-log sigmoid(rl_beta * [log pi/pi_ref (w) - log pi/pi_ref (l)])``
   (:func:`~flowalign.functional.dmd.step_dpo_loss`),
   ``pi_ref`` the frozen teacher under the same step rule. The paper alternates RL and distillation 5:1 (it
   tested 1:1 to 10:1); it does not say which way round, nor its noise threshold, beta, lambda or the latent
   reward model, so those defaults are ours.

Flash-DMD has no public code; this follows the paper's description (see shared notes) and DMD2's losses.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from flowalign.config import ConfigError, _require, field, load_config
from flowalign.functional.dmd import dm_loss, step_dpo_loss
from flowalign.functional.flow import interpolate
from flowalign.functional.sde import step as sde_step
from flowalign.trainers.dmd import DMD, DMDConfig
from flowalign.trainers.loop import run_task


@dataclasses.dataclass
class FlashDMDConfig(DMDConfig):
    """`flowalign train` (task: flash-dmd): timestep-split DMD + GAN with an EMA-tracked critic, and joint RL."""

    task: str = field("flash-dmd", "What `flowalign train` runs; this schema is Flash-DMD.", choices=("flash-dmd",))
    out: str = field("runs/flash-dmd", "Run folder; the student pipeline is written to out/student.")
    ttur: int = field(1, "Critic updates per student update (Flash-DMD: 1-2; DMD2: 5-10).")
    dm_sigma_min: float = field(0.5, "The DM loss trains the student's steps from states with sigma >= this; its "
                                     "steps below get the adversarial loss only (the paper's threshold is not "
                                     "published).")
    critic_ema: float = field(0.99, "After each student update the critic moves toward the student, psi <- "
                                    "critic_ema psi + (1 - critic_ema) theta (1: off).")
    gan_weight: float = field(0.01, "Weight of the adversarial generator loss on the low-noise steps.")
    disc: str = field("clip", "Discriminator: clip = heads on a frozen CLIP image tower's layers (Flash-DMD's pixel "
                              "discriminator); critic = a head on the critic's features (DMD2).",
                      choices=("clip", "critic"))
    rl_every: int = field(0, "Joint RL: one step-level DPO update every this many student updates (0: off; the "
                             "paper's best ratio is 5 distillation updates to 1 RL update).")
    rl_candidates: int = field(4, "Joint RL: next states drawn from each high-noise state; the best and the worst "
                                  "by the reward form the pair.")
    rl_beta: float = field(1000.0, "Joint RL: DPO beta on the per-element mean log-prob ratios.")
    rl_weight: float = field(1.0, "Joint RL: weight of the DPO loss.")

    def __post_init__(self):
        super().__post_init__()
        _require(0 <= self.dm_sigma_min <= 1, "dm_sigma_min", self.dm_sigma_min, "must lie in [0, 1]",
                 "dm_sigma_min=0.5")
        _require(0 < self.critic_ema <= 1, "critic_ema", self.critic_ema, "must lie in (0, 1]", "critic_ema=0.99")
        _require(self.rl_every >= 0, "rl_every", self.rl_every, "must be >= 0", "rl_every=5")
        _require(self.rl_candidates >= 2, "rl_candidates", self.rl_candidates, "must be >= 2", "rl_candidates=4")
        _require(self.rl_beta > 0, "rl_beta", self.rl_beta, "must be > 0", "rl_beta=1000")
        if self.rl_every and (self.student_sampler == "ode" or self.student_eta == 0):
            raise ConfigError("rl_every > 0 needs a stochastic student step (student_sampler=cps with "
                              "student_eta > 0) to draw candidates with log-probs.")


class FlashDMD(DMD):
    """The Flash-DMD epoch: critic update(s), one timestep-split student update, the discriminator, the critic's
    EMA toward the student, and every ``rl_every`` epochs a step-level DPO update."""

    def setup(self, run) -> None:
        super().setup(run)
        sigmas = run.model.sigmas(self.cfg.student_steps, **run.size())[:-1]
        self.high = [k for k, s in enumerate(sigmas.tolist()) if s >= self.cfg.dm_sigma_min] or [0]
        self.low = [k for k in range(len(sigmas)) if k not in self.high]
        student = dict(run.model.transformer.named_parameters())
        missing = [n for n in self.critic_params if n not in student]
        if missing:
            raise ConfigError(f"critic_ema needs the critic's parameters in the student; {missing[0]!r} is not.")
        self.student_of_critic = {n: student[n] for n in self.critic_params}

    @torch.no_grad()
    def critic_toward_student(self) -> None:
        lam = self.cfg.critic_ema
        if lam < 1:
            for n, p in self.critic_params.items():
                p.lerp_(self.student_of_critic[n].detach().to(p.dtype), 1 - lam)

    def epoch(self, run, epoch: int, shared: torch.Generator, local: torch.Generator) -> dict:
        cfg = self.cfg
        prompts, cond = self.encode_epoch(run, shared)
        record = self.critic_steps(run, cond, local)
        t0 = time.perf_counter()
        xk, sigma_k, _, traj = self.backward_simulated(run, cond, local, steps=self.high)
        with torch.no_grad(), run.unwrapped():
            x_ng = self.predict_x0(run, xk, sigma_k, cond)
        grad = self.dm_targets(run, x_ng, cond, local)
        low_state = None
        if self.low and self.disc is not None:  # re-noise the finished sample to a low level of the schedule
            k = torch.tensor(self.low)[torch.randint(len(self.low), (len(xk),), generator=local)]
            sigma_low = traj.sigmas[k].to(xk.device)
            eps = torch.randn(xk.shape, generator=local).to(xk.device)
            low_state = (interpolate(traj.latents[:, -1].to(xk.device), eps, sigma_low), sigma_low)
        x = self.predict_x0(run, xk, sigma_k, cond)
        loss = dm_loss(x, grad)
        record |= {"train/dm_loss": loss.item(), "train/dm_grad": grad.abs().mean().item()}
        fake = x if low_state is None else self.predict_x0(run, *low_state, cond)
        record |= self.student_update(run, loss, fake, cond, local)
        self.critic_toward_student()
        record["time/student_s"] = time.perf_counter() - t0
        if cfg.rl_every and (epoch + 1) % cfg.rl_every == 0:
            t1 = time.perf_counter()
            record |= self.rl_step(run, prompts, cond, local)
            record["time/rl_s"] = time.perf_counter() - t1
        return record

    @torch.no_grad()
    def _rank(self, run, candidates: torch.Tensor, sigma_next: torch.Tensor, prompts, cond) -> torch.Tensor:
        """(K, B) rewards of K candidate next states of B samples."""
        reward, scores = run.reward, []
        for c in candidates:
            if getattr(reward, "space", "pixel") == "latent":
                scores.append(reward(c, prompts, sigma=sigma_next).float())
            else:
                with run.unwrapped():
                    scores.append(reward(run.model.decode(self.predict_x0(run, c, sigma_next, cond)), prompts).float())
        return torch.stack(scores)

    def rl_step(self, run, prompts: list[str], cond, gen: torch.Generator) -> dict:
        """One step-level DPO update on best/worst next states drawn from backward-simulated high-noise states."""
        cfg, model = self.cfg, run.model
        xk, sigma_k, k, traj = self.backward_simulated(run, cond, gen, steps=self.high)
        sigma_next = traj.sigmas[k + 1].to(sigma_k.device)

        def step_of(v, x_next=None, noise=None):
            return sde_step(cfg.student_sampler, xk, v, sigma_k, sigma_next, eta=cfg.student_eta, noise=noise,
                            x_next=x_next)

        with torch.no_grad(), run.unwrapped(), run.autocast():
            v_old = model.velocity(xk, sigma_k, cond, 1.0)
            noise = torch.randn((cfg.rl_candidates, *xk.shape), generator=gen).to(xk.device)
            candidates = torch.stack([step_of(v_old, noise=n).x_next for n in noise])
        rewards = self._rank(run, candidates, sigma_next, prompts, cond)
        idx = torch.arange(len(xk))
        win, lose = candidates[rewards.argmax(0), idx], candidates[rewards.argmin(0), idx]
        with torch.no_grad(), run.reference(), run.autocast():  # before the policy's forward (full fine-tuning)
            v_ref = model.velocity(xk, sigma_k, cond, 1.0)
            ref_w, ref_l = step_of(v_ref, x_next=win).log_prob, step_of(v_ref, x_next=lose).log_prob
        with run.autocast():
            v = model.velocity(xk, sigma_k, cond, 1.0)
        lp_w, lp_l = step_of(v, x_next=win).log_prob, step_of(v, x_next=lose).log_prob
        loss = step_dpo_loss(lp_w, lp_l, ref_w, ref_l, cfg.rl_beta)
        run.backward(cfg.rl_weight * loss)
        norm = run.optimizer_step()
        self.critic_toward_student()
        gap = (rewards.max(0).values - rewards.min(0).values).mean()
        return {"rl/dpo_loss": loss.item(), "rl/reward_mean": rewards.mean().item(), "rl/reward_gap": gap.item(),
                "rl/margin": ((lp_w - ref_w) - (lp_l - ref_l)).mean().item(), "rl/grad_norm": norm}


def train_flash_dmd(cfg: FlashDMDConfig, model=None, reward=None) -> dict:
    """Run Flash-DMD; ``model``/``reward`` objects may replace the names in ``cfg`` (tests, notebooks)."""
    return run_task(cfg, FlashDMD(cfg), model=model, reward=reward)


def main(config, overrides=()) -> dict:
    return train_flash_dmd(load_config(FlashDMDConfig, config, overrides))
