"""Euphonium (zerzerzerz/Euphonium, "Steering Video Flow Matching via Process Reward Gradient Guided Stochastic
Dynamics"): ``task: euphonium``, Flow-GRPO with process-reward-guided rollouts and dual rewards.

Each epoch, as Flow-GRPO (:mod:`flowalign.trainers.grpo`, whose config, SDE window, PPO clip and KL this reuses):

1. **Guided rollouts.** The SDE rollouts add the process reward's gradient to every guided step's mean,
   ``mu <- mu + c * grad_x r_PRM`` (:class:`~flowalign.sampling.guidance.RewardGuidance`, ``mode="euphonium"``:
   ``c = guide_scale`` or the KL form ``g^2 / (2 guide_beta)``, times ``dt`` with ``guide_delta_t``; the
   gradient divided by its norm with ``guide_normalize``). Log-probs are recorded under the **unguided** mean by
   default (``log_prob_under_guided_mean: false``, the script's default), so the policy is scored on the guided
   moves as if it had made them and PPO pulls it towards them.
2. **Dual rewards** (rl_guidance.md b5, ``grpo_training/trainer.py``): outcome advantages ``A_r``, one per pixel
   reward, group-standardised (ORA); process advantages ``A_proc[t]``, the process reward's score at each step,
   group-standardised per step (PRA). The loss of a trained step is
   ``sum_r c_ORA w_r PPO(A_r) + c_PRA PPO(A_proc[t]) + beta KL`` (:func:`~flowalign.functional.euphonium.
   dual_reward_ppo_loss`; each term averaged over the trained steps as in Flow-GRPO).
3. **Guidance distillation** (flowalign's explicit form of the paper's "distillation objective that internalises
   the guidance"; the public script has none, see ``functional/euphonium.py``): on guided trained steps,
   ``distill_weight * ||mu_theta(x_t) - sg(mu_target(x_t) + shift_t)||^2 / (2 std^2)`` (``distill_weighting: kl``;
   ``drift`` divides by ``2 dt^2`` instead), the policy's unguided mean regressed onto a guided mean, so the
   trained model samples without the reward model. ``distill_target: rollout`` (default) is the mean the rollout
   took, the rollout policy's plus the shift: the policy learns to make the guided move itself. The target moves
   with the policy, so iterated it keeps climbing the process reward; with the KL-form guidance and ``kl``
   weighting its gradient is reward-gradient ascent through the step mean with weight
   ``distill_weight / (2 guide_beta)``, bounded only by ``beta`` (toy2d's unbounded r = y with ``beta: 0`` grows
   without limit). ``reference`` is the reference (base) model's mean plus the shift, a fixed target, the guided
   base (with the KL ``beta`` the optimum is ``mu_ref + shift * distill_weight / (beta + distill_weight)``).

Process advantages exist on the guided stochastic steps only (the script records the process score only where it
guides; elsewhere the advantage is 0).

The process reward is a latent (noise-aware) reward ``r(x_t, sigma, prompt)`` (``process_rewards:
{"latent:RUN_DIR": 1}``, trained by ``configs/reward/*.yaml``) or any differentiable pixel reward, scored on
``decode(x0_hat)`` with ``x0_hat = x_t - sigma v`` (the default: the training ``reward``).

With ``guide_scale: 0``, ``process_weight: 0`` and ``distill_weight: 0`` an epoch is exactly Flow-GRPO's
(tests/test_euphonium.py checks the gradients).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time

import torch

from flowalign.config import _require, field, load_config
from flowalign.functional.euphonium import PROCESS_FORMS, dual_reward_ppo_loss, guidance_distillation_loss
from flowalign.functional.policy import gaussian_mean_kl
from flowalign.trainers.grpo import GRPO, GRPOConfig, sde_window
from flowalign.trainers.loop import epoch_metrics, mean, run_task

GUIDE_SCHEDULES = ("constant", "sigma", "sigma_sq", "linear")  # flowalign.sampling.guidance.SCHEDULES
DISTILL_TARGETS = ("reference", "rollout")


@dataclasses.dataclass
class EuphoniumConfig(GRPOConfig):
    """`flowalign train` (task: euphonium): GRPO with process-reward-gradient guided SDE rollouts, outcome + process
    advantages, and guidance distillation. Every Flow-GRPO key applies (sampler, eta, SDE window, clip, KL ...)."""

    task: str = field("euphonium", "What `flowalign train` runs; this schema is Euphonium.", choices=("euphonium",))
    out: str = field("runs/euphonium", "Run folder.")
    outcome_rewards: dict[str, float] = field(
        {}, "ORA: pixel (outcome) rewards and their weights w_r, {name: weight}; each gets its own group "
            "advantage and PPO term. Empty: {reward: 1}. When given it must contain `reward` (the reward logged as "
            "reward/mean and evaluated).")
    outcome_weight: float = field(1.0, "c_ORA, the weight of the outcome PPO terms (Euphonium script: 1.0).")
    process_rewards: dict[str, float] = field(
        {}, "The process reward {name: weight} whose gradient guides the rollouts and whose per-step score gives "
            "the PRA: a latent reward 'latent:RUN_DIR' (configs/reward/) scores x_t; a differentiable pixel reward "
            "is scored on decode(x0_hat). Empty: {reward: 1}.")
    process_weight: float = field(1.0, "c_PRA, the weight of the process-advantage PPO term (script: 1.0; 0: off).")
    process_advantage: str = field(
        "next", "Which process score gives step t's advantage: next = the state x_{t+1} the step produces "
                "(default, [guess]), state = its input x_t (the public script's pairing; the step's action cannot "
                "change it), delta = their difference.", choices=PROCESS_FORMS)
    guide_scale: float = field(0.01, "Guidance coefficient c of mu <- mu + c grad r (script: 0.01; 0: unguided). "
                                     "With guide_beta it multiplies the KL form g^2 / (2 guide_beta).")
    guide_beta: float | None = field(None, "KL form c = guide_scale * g^2 / (2 guide_beta), g the sampler's "
                                           "diffusion coefficient (script: beta 3.125 at eta 0.25); null: c = "
                                           "guide_scale.")
    guide_normalize: bool = field(False, "Divide each sample's reward gradient by its norm (script: false).")
    guide_delta_t: bool = field(True, "Multiply c by dt = sigma - sigma_next (script: true).")
    guide_schedule: str = field("constant", "Strength over the trajectory: constant, sigma, sigma_sq, linear.",
                                choices=GUIDE_SCHEDULES)
    guide_window: list[int] | None = field(
        None, "Guided steps [start, end) (negative: from the end; script: [12, 16] of 16); null: the epoch's "
              "stochastic steps (the SDE window in fast mode, else every step).")
    guide_interval: int = field(1, "Guide every this many steps of the window (script: 1).")
    guide_through_model: bool = field(False, "Pixel process rewards: backpropagate through the transformer in "
                                             "x0_hat (costly); false holds v constant.")
    log_prob_under_guided_mean: bool = field(False, "Record and recompute log-probs under the guided mean instead "
                                                    "of the policy's own (script: false).")
    distill_weight: float = field(1.0, "Guidance distillation: weight of ||mu_theta - sg(mu_guided)||^2/(2 std^2) on "
                                       "guided trained steps ([guess]: flowalign's explicit form; 0: off).")
    distill_target: str = field("rollout", "The guided mean distilled: rollout = the mean the rollout took (the "
                                           "rollout policy's + the guidance shift; moves with the policy, so it keeps "
                                           "climbing unless beta > 0); reference = the reference (base) model's mean "
                                           "+ the shift (a fixed target: the guided base).",
                                choices=DISTILL_TARGETS)
    distill_weighting: str = field("kl", "Per-step weight of the distillation error ||mu - mu_g||^2: kl = / (2 std^2), "
                                         "the Gaussian KL, i.e. the NLL of the guided step (with the KL-form guidance "
                                         "its gradient is reward-gradient ascent through the mean with weight "
                                         "distill_weight / (2 guide_beta)); drift = / (2 dt^2), the squared error of "
                                         "the SDE drift, every noise level alike (better with a constant guide_scale "
                                         "on flow-sde, whose std -> 0 at low noise). Equal up to a constant for "
                                         "dance-sde.", choices=("kl", "drift"))

    def __post_init__(self):
        super().__post_init__()
        for key in ("outcome_weight", "process_weight", "guide_scale", "distill_weight"):
            value = getattr(self, key)
            _require(math.isfinite(value) and value >= 0, key, value, "must be a finite number >= 0", f"{key}=1.0")
        _require(self.outcome_weight > 0 or self.process_weight > 0 or self.distill_weight > 0, "outcome_weight",
                 self.outcome_weight, "or process_weight or distill_weight must be > 0 (nothing to learn otherwise)",
                 "outcome_weight=1.0")
        _require(self.guide_beta is None or self.guide_beta > 0, "guide_beta", self.guide_beta, "must be > 0 or null",
                 "guide_beta=3.125")
        _require(self.guide_interval >= 1, "guide_interval", self.guide_interval, "must be >= 1", "guide_interval=1")
        if self.guide_window is not None:
            w = [s + self.num_steps if s < 0 else s for s in self.guide_window]
            ok = len(w) == 2 and 0 <= w[0] < w[1] <= self.num_steps
            _require(ok, "guide_window", self.guide_window, f"must be [start, end) within num_steps={self.num_steps} "
                     "with start < end", f"guide_window=[{max(0, self.num_steps - 4)},{self.num_steps}]")
        for key in ("outcome_rewards", "process_rewards"):
            for name, w in getattr(self, key).items():
                _require(math.isfinite(w), key, getattr(self, key), f"weights must be finite ({name}: {w})",
                         f"{key}={{{name}: 1.0}}")
        if self.outcome_rewards:
            _require(self.reward in self.outcome_rewards, "outcome_rewards", self.outcome_rewards,
                     f"must contain the training reward {self.reward!r} (reward=...)",
                     f"outcome_rewards={{{self.reward}: 1.0}}")


class _GuidedRollout:
    """The guidance hook of the rollouts: forwards :class:`RewardGuidance`'s correction and records, per chunk of
    ``fa.sample``, the process score of each needed state and, for distillation, the velocity and mean shift of
    each guided step. Scores the guidance computed anyway (with its gradient) are reused."""

    def __init__(self, guide, need: torch.Tensor, pra_steps: torch.Tensor, moves: bool, velocities: bool):
        self.guide, self.need, self.pra_steps = guide, need, pra_steps
        self.moves, self.velocities = moves, velocities
        self.log_prob_under_guided_mean = guide.log_prob_under_guided_mean
        self.chunks: list[dict] = []

    def __call__(self, ctx):
        if ctx.step == 0:
            self.chunks.append({"scores": {}, "v": {}, "shift": {}})
        rec = self.chunks[-1]
        seen = len(self.guide.history)
        out = self.guide(ctx)
        if self.moves and out is not None and out.mean_shift is not None:
            if self.velocities:
                rec["v"][ctx.step] = ctx.v.detach().float()
            rec["shift"][ctx.step] = out.mean_shift.detach().float()
        if self.need[ctx.step]:
            if len(self.guide.history) > seen:
                scores = self.guide.history[-1]["rewards"]
                rec["scores"][ctx.step] = sum(self.guide.weights[n] * s.float() for n, s in scores.items())
            else:
                rec["scores"][ctx.step] = self._score(ctx.model, ctx.x, ctx.v, ctx.sigma, list(ctx.cond.prompts))
        return out

    @torch.no_grad()
    def _score(self, model, x, v, sigma, prompts, images=None) -> torch.Tensor:
        """``sum_k w_k r_k`` of a state (CPU, ``(B,)``): latent rewards on ``x_t``, pixel rewards on
        ``decode(x0_hat)`` with ``x0_hat = x - sigma v`` (or on ``images`` when given: the final, clean state)."""
        from flowalign.functional.flow import x0_from_velocity

        total = torch.zeros(x.shape[0])
        for name, r in self.guide.components.items():
            w = self.guide.weights[name]
            if w == 0:
                continue
            if r.space == "latent":
                s = r(x.float(), prompts, sigma=sigma)
            else:
                if images is None:
                    images = model.decode(x0_from_velocity(x.float(), v.float(), sigma))
                s = r(images, prompts)
            total = total + w * s.float().cpu()
        return total

    def collect(self, model, traj) -> tuple[torch.Tensor | None, dict[int, dict[str, torch.Tensor]]]:
        """Per-state scores ``(B, T+1)`` (0 where not needed) and ``{step: {"v", "shift"}}`` of the guided steps."""
        scores = None
        if bool(self.need.any()):
            scores = torch.zeros(len(traj.prompts), traj.num_steps + 1)
            for t in self.need[:-1].nonzero().flatten().tolist():
                scores[:, t] = torch.cat([c["scores"][t].float().cpu() for c in self.chunks])
            if self.need[-1]:  # the clean sample x_T: x0_hat = x_T, its pixels are the decoded images
                images = traj.images if traj.images is not None else model.decode(traj.x0.float())
                scores[:, -1] = self._score(model, traj.x0, None, traj.sigmas[-1], traj.prompts, images=images)
        moves = {}
        for t in sorted(self.chunks[0]["shift"]) if self.chunks else []:
            moves[t] = {k: torch.cat([c[k][t] for c in self.chunks]) for k in ("v", "shift") if t in self.chunks[0][k]}
        return scores, moves


class Euphonium(GRPO):
    """The Euphonium epoch on a :class:`~flowalign.trainers.loop.Run` (see the module docstring)."""

    cfg: EuphoniumConfig

    def setup(self, run) -> None:
        import flowalign as fa

        cfg = self.cfg
        cache = {cfg.reward: run.reward}

        def get(name: str):
            if name not in cache:
                kw = {"model": run.model} if name.startswith("latent:") else {}
                cache[name] = fa.rewards.load(name, **kw).to(run.model.device)
            return cache[name]

        self.outcome_weights = dict(cfg.outcome_rewards) or {cfg.reward: 1.0}
        self.outcome = {n: get(n) for n in self.outcome_weights}
        self.guide = None
        if cfg.guide_scale > 0 or cfg.process_weight > 0 or cfg.process_rewards:
            from flowalign.sampling.guidance import RewardGuidance

            process = dict(cfg.process_rewards) or {cfg.reward: 1.0}
            try:
                self.guide = RewardGuidance(
                    {get(n): w for n, w in process.items()}, scale=cfg.guide_scale, mode="euphonium",
                    schedule=cfg.guide_schedule, normalize=cfg.guide_normalize, interval=cfg.guide_interval,
                    grad_through_model=cfg.guide_through_model, beta=cfg.guide_beta,
                    delta_t_scaling=cfg.guide_delta_t, log_prob_under_guided_mean=cfg.log_prob_under_guided_mean,
                    record=True)
            except ValueError as e:
                raise ValueError(f"process_rewards={process}: {e} Set process_rewards to a differentiable pixel "
                                 "reward (e.g. {shapes-clip: 1.0}) or a latent reward ({'latent:RUN_DIR': 1.0}), "
                                 "or guide_scale=0 process_weight=0 for plain GRPO.") from e

    def _hook(self, stochastic: torch.Tensor, window: tuple[int, int] | None) -> _GuidedRollout | None:
        cfg = self.cfg
        if self.guide is None:
            return None
        guide = copy.copy(self.guide)  # this epoch's window; the reward modules are shared
        guide.history = []
        if cfg.guide_window is not None:
            guide.window = (int(cfg.guide_window[0]), int(cfg.guide_window[1]))
        else:
            guide.window = window
        # process advantages on the guided stochastic steps (the script scores the PRM only where it guides)
        pra = torch.tensor([bool(stochastic[t]) and guide.is_active(t, cfg.num_steps) for t in range(cfg.num_steps)])
        need = torch.zeros(cfg.num_steps + 1, dtype=torch.bool)
        if cfg.process_weight > 0:
            steps = pra.nonzero().flatten()
            if cfg.process_advantage in ("state", "delta"):
                need[steps] = True
            if cfg.process_advantage in ("next", "delta"):
                need[steps + 1] = True
        return _GuidedRollout(guide, need, pra, moves=cfg.distill_weight > 0 and cfg.guide_scale > 0,
                              velocities=cfg.distill_target == "rollout")

    def epoch(self, run, epoch: int, shared: torch.Generator, local: torch.Generator) -> dict:
        from flowalign.functional.advantages import group_advantages
        from flowalign.functional.euphonium import process_advantages, process_step_scores
        from flowalign.sampling.sampler import log_prob, sde_mask

        cfg = self.cfg
        # the same draws, in the same order, as Flow-GRPO's epoch (the guidance draws nothing)
        prompts, groups = run.epoch_prompts(shared)
        t0 = time.perf_counter()
        window = sde_window(cfg, shared)
        hook = self._hook(sde_mask(cfg.num_steps, cfg.sampler, window), window)
        traj = run.rollout(prompts, local, sampler=cfg.sampler, eta=cfg.eta, sde_window=window, guidance=hook,
                           same_noise_per_prompt=cfg.same_noise)
        rewards = run.score(traj)
        extra = {}
        with torch.no_grad():
            for name, r in self.outcome.items():
                if name != cfg.reward:
                    extra[name] = r(traj.images, traj.prompts).float().cpu()
        state_scores, moves = hook.collect(run.model, traj) if hook is not None else (None, {})
        t_rollout = time.perf_counter() - t0

        group_ids = groups.repeat_interleave(cfg.group_size)
        adv, all_rewards = run.advantages(rewards, group_ids, epoch, cfg.global_std, cfg.adv_clip)
        outcome = {}
        metrics: dict[str, float] = {}
        all_groups = run.gather(group_ids)
        for name in self.outcome_weights:
            if name == cfg.reward:
                outcome[name] = adv
                continue
            gathered = run.gather(extra[name])
            outcome[name] = run.local_slice(group_advantages(gathered, all_groups, global_std=cfg.global_std,
                                                             clip=cfg.adv_clip), len(rewards))
            metrics[f"reward/{name}"] = gathered.mean().item()
        proc_adv = None
        if cfg.process_weight > 0 and state_scores is not None:
            all_scores = run.gather(state_scores)
            proc_adv = run.local_slice(process_advantages(all_scores, all_groups, cfg.process_advantage,
                                                          cfg.global_std, cfg.adv_clip), len(rewards))
            proc_adv[:, ~hook.pra_steps] = 0.0
            used = hook.pra_steps.nonzero().flatten()
            metrics["process/score"] = process_step_scores(all_scores, cfg.process_advantage)[:, used].mean().item()
        if hook is not None and hook.guide.history:
            metrics["guide/grad_norm"] = torch.cat([h["grad_norm"] for h in hook.guide.history]).mean().item()
            metrics["guide/steps"] = float(len({h["step"] for h in hook.guide.history}))

        steps = traj.stochastic.nonzero().flatten()
        n_train = max(1, round(cfg.timestep_fraction * len(steps)))
        stats: dict[str, list[float]] = {"loss": [], "pra": [], "distill": [], "kl": [], "ratio_dev": [],
                                         "clip_frac": [], "grad_norm": []}
        first_ratio_dev = None
        for _ in range(cfg.inner_epochs):
            order = torch.randperm(len(rewards), generator=local)
            for start in range(0, len(order), cfg.train_batch_size):
                mb = order[start:start + cfg.train_batch_size]
                sub = traj.index(mb)
                train_steps = steps[torch.randperm(len(steps), generator=local)[:n_train]].tolist()
                for j in train_steps:
                    ref_mean = None
                    distill_here = cfg.distill_weight > 0 and j in moves
                    if cfg.beta > 0 or (distill_here and cfg.distill_target == "reference"):
                        # before the policy's forward: a full-fine-tuning reference swaps weights
                        with torch.no_grad(), run.reference(), run.autocast():
                            _, ref_mean, _ = log_prob(run.model, sub, steps=[j], with_mean=True)
                    with run.autocast():
                        lp, step_mean, std = log_prob(run.model, sub, steps=[j], with_mean=True)
                    dev = lp.device
                    loss, info = dual_reward_ppo_loss(
                        lp[:, 0], sub.log_probs[:, j].to(dev), {n: a[mb].to(dev) for n, a in outcome.items()},
                        self.outcome_weights, cfg.clip_range,
                        process_advantage=None if proc_adv is None else proc_adv[mb, j].to(dev),
                        outcome_coef=cfg.outcome_weight, process_coef=cfg.process_weight)
                    kl = torch.zeros((), device=dev)
                    if ref_mean is not None and cfg.beta > 0:
                        kl = gaussian_mean_kl(step_mean[:, 0], ref_mean[:, 0], std[:, 0]).mean()
                    total = loss + cfg.beta * kl
                    distill = None
                    if distill_here:
                        distill = self._distill(sub, j, mb, moves[j], step_mean[:, 0], std[:, 0],
                                                None if ref_mean is None else ref_mean[:, 0])
                        total = total + cfg.distill_weight * distill
                    run.backward(total / len(train_steps))
                    if first_ratio_dev is None:
                        first_ratio_dev = info["ratio_dev"].item()
                    stats["loss"].append(loss.item())
                    if "pra" in info:
                        stats["pra"].append(info["pra"].item())
                    if distill is not None:
                        stats["distill"].append(distill.item())
                    stats["kl"].append(kl.item())
                    stats["ratio_dev"].append(info["ratio_dev"].item())
                    stats["clip_frac"].append(info["clip_frac"].item())
                stats["grad_norm"].append(run.optimizer_step())
        out = epoch_metrics(all_rewards, t_rollout, time.perf_counter() - t0 - t_rollout,
                            loss=mean(stats["loss"]), kl=mean(stats["kl"]), ratio_dev=max(stats["ratio_dev"]),
                            onpolicy_ratio_dev=first_ratio_dev, clip_frac=mean(stats["clip_frac"]),
                            grad_norm=mean(stats["grad_norm"]))
        if stats["pra"]:
            out["train/pra_loss"] = mean(stats["pra"])
        if stats["distill"]:
            out["train/distill"] = mean(stats["distill"])
        return {**out, **metrics}

    def _distill(self, sub, j: int, mb: torch.Tensor, move: dict, step_mean: torch.Tensor, std: torch.Tensor,
                 ref_mean: torch.Tensor | None) -> torch.Tensor:
        """Guidance distillation at step ``j``: the policy's unguided mean against a guided mean, the reference's
        (``distill_target: reference``) or the rollout's (``rollout``), plus the recorded guidance shift."""
        from flowalign.functional import sde

        dev = step_mean.device
        shift = move["shift"][mb.to(move["shift"].device)].to(dev)
        traj_shift = 0.0  # log-probs under the guided mean: log_prob's means include the recorded shift
        if sub.guidance_shifts is not None:
            traj_shift = sub.guidance_shifts[:, j].to(dev).float()
        if self.cfg.distill_target == "reference":
            plain = ref_mean.float() - traj_shift
        else:
            v_old = move["v"][mb.to(move["v"].device)].to(dev)
            sig = sub.sigmas
            rule = sub.sampler if sub.stochastic[j] else "ode"
            plain, _ = sde.get_rule(rule)(sub.latents[:, j].to(dev).float(), v_old, sig[j], sig[j + 1],
                                          eta=sub.eta if rule != "ode" else 0.0,
                                          sigma_max=sig[1].item() if sub.num_steps > 1 else None)
        if self.cfg.distill_weighting == "drift":
            std = torch.full_like(std, float(sub.sigmas[j] - sub.sigmas[j + 1]))  # ||d mu||^2 / (2 dt^2)
        return guidance_distillation_loss(step_mean.float() - traj_shift, plain + shift, std).mean()


def train_euphonium(cfg: EuphoniumConfig, model=None, reward=None) -> dict:
    """Run Euphonium; ``model``/``reward`` objects may replace the names in ``cfg`` (tests, notebooks)."""
    return run_task(cfg, Euphonium(cfg), model=model, reward=reward)


def main(config, overrides=()) -> dict:
    return train_euphonium(load_config(EuphoniumConfig, config, overrides))
