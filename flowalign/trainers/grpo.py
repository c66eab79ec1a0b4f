"""Flow-GRPO (Liu et al. 2025, "Flow-GRPO: Training Flow Matching Models via Online RL"): ``task: grpo``.

Each epoch: draw ``groups_per_epoch`` prompts, sample ``group_size`` trajectories of each with a stochastic
sampler (flow-sde by default) recording every step's log-prob, score the images, standardise the rewards
within each prompt group (statistics gathered over all processes), then take optimizer steps on PPO's clipped
surrogate per denoising step, plus ``beta`` times the KL between the policy's and the reference policy's step
Gaussians (the reference is the model with its LoRA adapter switched off: no second copy).

Fast mode (Flow-GRPO-Fast / MixGRPO): ``sde_window_size > 0`` makes only a window of that many consecutive steps
stochastic, placed at random within the first ``sde_window_range`` of the schedule each epoch; the other steps
are ODE steps and only the window is trained. With ``same_noise`` the samples of a group start from one noise and
branch at the window's first step (Flow-GRPO-Fast's branching), so their rewards differ only through the noise of
the steps being trained.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from flowalign.config import _require, field, load_config
from flowalign.functional.policy import gaussian_mean_kl, ppo_clip_loss
from flowalign.trainers.loop import TrainConfig, epoch_metrics, mean, run_task

SDE_SAMPLERS = ("flow-sde", "dance-sde", "cps")


@dataclasses.dataclass
class GRPOConfig(TrainConfig):
    """`flowalign train` (task: grpo): Flow-GRPO with per-prompt group advantages, PPO clipping and a KL."""

    task: str = field("grpo", "What `flowalign train` runs; this schema is Flow-GRPO.", choices=("grpo",))
    out: str = field("runs/grpo", "Run folder.")
    sampler: str = field("flow-sde", "Stochastic rollout sampler (its exact per-step log-probs drive the ratio).",
                         choices=SDE_SAMPLERS)
    eta: float | None = field(None, "Sampler noise level; null = its default (0.7 flow-sde, 0.3 dance-sde, 0.8 cps).")
    sde_window_size: int = field(0, "Fast mode: only this many consecutive steps are stochastic and trained "
                                    "(0: every step).")
    sde_window_range: float = field(0.5, "Fast mode: the window starts at random within this leading fraction "
                                         "of the steps.")
    same_noise: bool = field(False, "Start the samples of a prompt group from one initial noise, so that they share "
                                    "the ODE steps before the first stochastic one and differ only by the "
                                    "stochastic steps' noise, the actions that are trained (Flow-GRPO-Fast's "
                                    "branching).")
    timestep_fraction: float = field(1.0, "Fraction of the stochastic steps trained per minibatch (drawn at random).")
    clip_range: float = field(1e-4, "PPO ratio clipping epsilon (Flow-GRPO: 1e-4 for SD3.5, 1e-3 for Wan).")
    beta: float = field(0.04, "KL weight to the reference policy (Flow-GRPO: 0.04 GenEval/OCR, 0.01 PickScore).")
    adv_clip: float = field(5.0, "Advantages are clipped to +-adv_clip.")
    global_std: bool = field(False, "Standardise by the whole batch's std instead of each group's.")
    inner_epochs: int = field(1, "Passes over each epoch's rollouts.")

    def __post_init__(self):
        super().__post_init__()
        _require(0 < self.timestep_fraction <= 1, "timestep_fraction", self.timestep_fraction, "must lie in (0, 1]",
                 "timestep_fraction=0.5")
        _require(0 <= self.sde_window_size <= self.num_steps, "sde_window_size", self.sde_window_size,
                 f"must lie in [0, num_steps={self.num_steps}]", "sde_window_size=2")
        _require(self.clip_range > 0, "clip_range", self.clip_range, "must be > 0", "clip_range=1e-4")
        _require(self.beta >= 0, "beta", self.beta, "must be >= 0", "beta=0.04")
        _require(self.inner_epochs >= 1, "inner_epochs", self.inner_epochs, "must be >= 1", "inner_epochs=1")


def sde_window(cfg, gen: torch.Generator) -> tuple[int, int] | None:
    """Fast mode's stochastic window ``[start, start + size)`` for one epoch, or None (every step); ``cfg`` is any
    config with ``num_steps``, ``sde_window_size`` and ``sde_window_range`` (GRPO's, D3PO's)."""
    if cfg.sde_window_size == 0:
        return None
    last_start = max(0, min(cfg.num_steps - cfg.sde_window_size, int(cfg.sde_window_range * cfg.num_steps) - 1))
    start = int(torch.randint(last_start + 1, (1,), generator=gen))
    return start, start + cfg.sde_window_size


class GRPO:
    """The Flow-GRPO epoch on a :class:`~flowalign.trainers.loop.Run`."""

    def __init__(self, cfg: GRPOConfig):
        self.cfg = cfg

    def draw(self, run, shared: torch.Generator, local: torch.Generator):
        """The epoch's prompts, their group ids and the rollouts: a function of the epoch's generators and the
        weights alone (``benchmarks/replay_base_rollouts.py`` replays it with the base weights)."""
        cfg = self.cfg
        prompts, groups = run.epoch_prompts(shared)
        traj = run.rollout(prompts, local, sampler=cfg.sampler, eta=cfg.eta, sde_window=sde_window(cfg, shared),
                           same_noise_per_prompt=cfg.same_noise)
        return prompts, groups, traj

    def epoch(self, run, epoch: int, shared: torch.Generator, local: torch.Generator) -> dict:
        from flowalign.sampling.sampler import log_prob

        cfg = self.cfg
        t0 = time.perf_counter()
        _, groups, traj = self.draw(run, shared, local)
        rewards = run.score(traj)
        t_rollout = time.perf_counter() - t0
        adv, all_rewards = run.advantages(rewards, groups.repeat_interleave(cfg.group_size), epoch, cfg.global_std,
                                          cfg.adv_clip)
        steps = traj.stochastic.nonzero().flatten()
        n_train = max(1, round(cfg.timestep_fraction * len(steps)))
        stats: dict[str, list[float]] = {"loss": [], "kl": [], "ratio_dev": [], "clip_frac": [], "grad_norm": []}
        first_ratio_dev = None
        for _ in range(cfg.inner_epochs):
            order = torch.randperm(len(rewards), generator=local)
            for start in range(0, len(order), cfg.train_batch_size):
                mb = order[start:start + cfg.train_batch_size]
                sub = traj.index(mb)
                train_steps = steps[torch.randperm(len(steps), generator=local)[:n_train]].tolist()
                for j in train_steps:
                    ref_mean = None
                    if cfg.beta > 0:  # before the policy's forward: a full-fine-tuning reference swaps weights
                        with torch.no_grad(), run.reference(), run.autocast():
                            _, ref_mean, _ = log_prob(run.model, sub, steps=[j], with_mean=True)
                    with run.autocast():
                        lp, step_mean, std = log_prob(run.model, sub, steps=[j], with_mean=True)
                    loss, info = ppo_clip_loss(lp[:, 0], sub.log_probs[:, j].to(lp.device), adv[mb].to(lp.device),
                                               cfg.clip_range)
                    kl = torch.zeros((), device=lp.device)
                    if ref_mean is not None:
                        kl = gaussian_mean_kl(step_mean[:, 0], ref_mean[:, 0], std[:, 0]).mean()
                    run.backward((loss + cfg.beta * kl) / len(train_steps))
                    if first_ratio_dev is None:
                        first_ratio_dev = info["ratio_dev"].item()
                    stats["loss"].append(loss.item())
                    stats["kl"].append(kl.item())
                    stats["ratio_dev"].append(info["ratio_dev"].item())
                    stats["clip_frac"].append(info["clip_frac"].item())
                stats["grad_norm"].append(run.optimizer_step())
        return epoch_metrics(all_rewards, t_rollout, time.perf_counter() - t0 - t_rollout,
                             loss=mean(stats["loss"]), kl=mean(stats["kl"]), ratio_dev=max(stats["ratio_dev"]),
                             onpolicy_ratio_dev=first_ratio_dev, clip_frac=mean(stats["clip_frac"]),
                             grad_norm=mean(stats["grad_norm"]))


def train_grpo(cfg: GRPOConfig, model=None, reward=None) -> dict:
    """Run Flow-GRPO; ``model``/``reward`` objects may replace the names in ``cfg`` (tests, notebooks)."""
    return run_task(cfg, GRPO(cfg), model=model, reward=reward)


def main(config, overrides=()) -> dict:
    return train_grpo(load_config(GRPOConfig, config, overrides))
