"""D3PO (Yang et al. 2024, "Using Human Feedback to Fine-tune Diffusion Models without Any Reward Model"):
``task: d3po``.

Each epoch (reward preferences): draw ``groups_per_epoch`` prompts and sample ``group_size`` trajectories of each
from one shared initial noise with a stochastic sampler (flow-sde by default), compare every pair of a prompt's
samples by the reward, or by Pareto dominance over several ``rewards`` (ties and non-dominated pairs are skipped),
and take optimizer steps on the per-step DPO loss of :func:`flowalign.functional.d3po.d3po_loss`, with the
policy/reference ratio clamped to ``[1 - eps, 1 + eps]``. The reference is the initial model: the LoRA adapter
switched off (or the initial weights under full fine-tuning), so no second copy is kept.

Human preferences (``labels: FOLDER``): the trajectories come from a folder made by ``flowalign label --prepare``
and the preferences from its labels file (format: :mod:`flowalign.labeling`). An epoch is then one pass over
every labelled pair; nothing is sampled, and the training reward only serves the held-out evaluation.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from flowalign.config import ConfigError, _require, field, load_config
from flowalign.functional.d3po import d3po_loss, preference_pairs
from flowalign.trainers.grpo import sde_window
from flowalign.trainers.loop import TrainConfig, epoch_metrics, mean, run_task

SDE_SAMPLERS = ("flow-sde", "dance-sde", "cps")


@dataclasses.dataclass
class D3POConfig(TrainConfig):
    """`flowalign train` (task: d3po): per-step DPO on pairs of trajectories from the same noise."""

    task: str = field("d3po", "What `flowalign train` runs; this schema is D3PO.", choices=("d3po",))
    out: str = field("runs/d3po", "Run folder.")
    group_size: int = field(2, "Samples per prompt, all from the same initial noise when same_noise is on (D3PO: "
                               "2); every pair of a prompt's samples is compared.")
    train_batch_size: int = field(32, "Samples per optimizer step: train_batch_size // 2 (winner, loser) pairs.")
    sampler: str = field("flow-sde", "Stochastic rollout sampler; its exact per-step log-probs give the ratios.",
                         choices=SDE_SAMPLERS)
    eta: float | None = field(None, "Sampler noise level; null = its default (0.7 flow-sde, 0.3 dance-sde, 0.8 cps).")
    sde_window_size: int = field(0, "Only this many consecutive steps are stochastic and trained, the rest ODE "
                                    "(Flow-GRPO-Fast's window; 0: every step, as D3PO). With same_noise and a "
                                    "window at the start, a pair differs only through the window's steps.")
    sde_window_range: float = field(0.5, "The window starts at random within this leading fraction of the steps.")
    same_noise: bool = field(True, "Start all samples of a prompt from one initial noise (D3PO), so they differ "
                                   "only by the SDE noise.")
    rewards: list[str] = field([], "Several rewards for Pareto preferences: a sample is preferred when it is at "
                                   "least as good in every reward and better in one; other pairs are skipped. "
                                   "Empty: the single `reward`.")
    labels: str | None = field(None, "Human preferences instead of rewards: a folder made by `flowalign label "
                                     "--prepare` (its labels.jsonl) or a labels .jsonl file inside such a folder. "
                                     "Nothing is sampled then: the folder's trajectories and settings are used, and "
                                     "`reward` only serves the evaluation.")
    label_folder: str | None = field(None, "The prepared folder when `labels` is a file kept elsewhere; null = the "
                                           "labels file's folder.")
    beta: float = field(0.1, "DPO temperature beta on the clamped log-ratios (D3PO: 0.1).")
    eps: float = field(0.1, "Ratio clamp: pi/pi_ref per step is clamped to [1 - eps, 1 + eps] (D3PO: 0.1; its "
                            "issue #4: 0.2 collapsed on the aesthetic reward).")
    timestep_fraction: float = field(1.0, "Fraction of the stochastic steps trained per minibatch (drawn at random).")
    inner_epochs: int = field(1, "Passes over each epoch's pairs.")
    max_logprob_gap: float = field(0.05, "Labels mode: the largest allowed mean |recorded - recomputed| step log-prob "
                                         "of the prepared trajectories under the initial model (they must come from "
                                         "the model being trained).")

    def __post_init__(self):
        super().__post_init__()
        _require(self.group_size >= 2, "group_size", self.group_size, "must be >= 2 (a preference needs a pair)",
                 "group_size=2")
        _require(self.beta > 0, "beta", self.beta, "must be > 0", "beta=0.1")
        _require(0 < self.eps < 1, "eps", self.eps, "must lie in (0, 1)", "eps=0.1")
        _require(0 < self.timestep_fraction <= 1, "timestep_fraction", self.timestep_fraction, "must lie in (0, 1]",
                 "timestep_fraction=0.5")
        _require(self.inner_epochs >= 1, "inner_epochs", self.inner_epochs, "must be >= 1", "inner_epochs=1")
        _require(0 <= self.sde_window_size <= self.num_steps, "sde_window_size", self.sde_window_size,
                 f"must lie in [0, num_steps={self.num_steps}]", "sde_window_size=2")
        _require(self.eta is None or self.eta > 0, "eta", self.eta, "must be > 0 (D3PO needs a stochastic sampler)",
                 "eta=0.7")
        _require(len(set(self.rewards)) == len(self.rewards), "rewards", self.rewards, "must not repeat a reward",
                 "rewards=[shapes-clip,jpeg-compressibility]")
        _require(self.max_logprob_gap > 0, "max_logprob_gap", self.max_logprob_gap, "must be > 0",
                 "max_logprob_gap=0.05")
        _require(not (self.labels and self.sde_window_size), "sde_window_size", self.sde_window_size,
                 "must be 0 when `labels` gives human preferences (the labelled trajectories keep the steps they "
                 "were sampled with)", "sde_window_size=0")
        _require(not (self.labels and self.rewards), "rewards", self.rewards, "must be empty when `labels` gives "
                 "human preferences", "rewards=[]")


class D3PO:
    """The D3PO epoch on a :class:`~flowalign.trainers.loop.Run`."""

    def __init__(self, cfg: D3POConfig):
        self.cfg = cfg
        self.rewards: dict = {}
        self.labelled = None  # labels mode: (trajectory, winners, losers, {step: reference log-probs})

    def setup(self, run) -> None:
        import flowalign as fa

        cfg = self.cfg
        if cfg.labels:
            self._setup_labels(run)
            return
        for name in cfg.rewards or [cfg.reward]:
            self.rewards[name] = run.reward if name == cfg.reward else fa.rewards.load(name).to(run.model.device)

    def _setup_labels(self, run) -> None:
        from flowalign.labeling import load_labelled

        cfg = self.cfg
        data = load_labelled(cfg.labels, cfg.label_folder)
        m = data.manifest
        differs = [f"{k} {getattr(cfg, k)} -> {m[k]}" for k in ("num_steps", "sampler", "eta", "guidance_scale")
                   if getattr(cfg, k) is not None and getattr(cfg, k) != m[k]]
        if differs and run.is_main:
            print(f"d3po: training on the labelled trajectories of {data.folder}, sampled with their own settings "
                  f"({'; '.join(differs)}).")
        traj = data.trajectory(run.model)
        steps = traj.stochastic.nonzero().flatten().tolist()
        ref = self.reference_log_probs(run, traj, steps)
        gap = (ref - traj.log_probs[:, steps]).abs().mean().item()
        if gap > cfg.max_logprob_gap:
            raise ConfigError(f"The trajectories in {data.folder} do not come from this model: their recorded step "
                              f"log-probs differ from the recomputed ones by {gap:.3g} on average (allowed "
                              f"max_logprob_gap={cfg.max_logprob_gap}). Prepare the folder with the model you train "
                              f"(manifest model: {m.get('model')!r}), or raise max_logprob_gap.")
        self.labelled = (traj, data.winners, data.losers, dict(zip(steps, ref.unbind(1))))
        if run.is_main:
            print(f"d3po: {len(data.winners)} preferred pairs from {len(data.prompt_indices)} labelled prompts in "
                  f"{data.labels_path}.")

    # ------------------------------------------------------------------ pieces
    @torch.no_grad()
    def reference_log_probs(self, run, traj, steps: list[int]) -> torch.Tensor:
        """``(B, len(steps))`` step log-probs of the recorded transitions under the reference policy (no gradient),
        in minibatches of train_batch_size."""
        from flowalign.sampling.sampler import log_prob

        out = []
        with run.reference(), run.autocast():
            for start in range(0, len(traj.prompts), self.cfg.train_batch_size):
                sub = traj.index(torch.arange(start, min(start + self.cfg.train_batch_size, len(traj.prompts))))
                out.append(log_prob(run.model, sub, steps=steps).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def score(self, run, traj) -> torch.Tensor:
        """``(B, R)`` scores of every preference reward."""
        return torch.stack([r(traj.images, traj.prompts).float().cpu() for r in self.rewards.values()], dim=1)

    def _pad(self, run, winners: torch.Tensor, losers: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Pairs and weights padded (weight 0) to the largest pair count over processes, so that every process
        takes the same number of backward passes (DDP)."""
        weights = torch.ones(len(winners))
        if run.accelerator.num_processes == 1:
            return winners, losers, weights
        most = int(run.gather(torch.tensor([len(winners)])).max())
        extra = most - len(winners)
        if extra > 0:
            fill_w = winners[:1] if len(winners) else torch.zeros(1, dtype=torch.long)
            fill_l = losers[:1] if len(losers) else torch.ones(1, dtype=torch.long)
            winners = torch.cat([winners, fill_w.repeat(extra)])
            losers = torch.cat([losers, fill_l.repeat(extra)])
            weights = torch.cat([weights, torch.zeros(extra)])
        return winners, losers, weights

    def train_pairs(self, run, traj, winners, losers, weights, ref: dict, gen) -> dict[str, list[float]]:
        """Optimizer steps over the pairs: per minibatch (train_batch_size // 2 pairs), the D3PO loss of a random
        ``timestep_fraction`` of the stochastic steps, averaged over those steps. ``ref`` caches the reference
        log-probs of every sample per step; a step's are computed the first time it is trained."""
        from flowalign.sampling.sampler import log_prob

        cfg = self.cfg
        per = max(1, cfg.train_batch_size // 2)
        steps = traj.stochastic.nonzero().flatten().tolist()
        n_train = max(1, round(cfg.timestep_fraction * len(steps)))
        stats: dict[str, list[float]] = {k: [] for k in ("loss", "accuracy", "margin", "clip_frac", "ratio_dev",
                                                         "grad_norm")}
        for _ in range(cfg.inner_epochs):
            order = torch.randperm(len(winners), generator=gen)
            for start in range(0, len(order), per):
                mb = order[start:start + per]
                m = len(mb)
                rows = torch.cat([winners[mb], losers[mb]])
                # a sample in several pairs (group_size > 2) is scored once per step
                uniq, inv = torch.unique(rows, return_inverse=True)
                sub = traj.index(uniq)
                cols = torch.randperm(len(steps), generator=gen)[:n_train].tolist()
                for c in cols:
                    j = steps[c]
                    if j not in ref:  # before the policy's forward: a full-fine-tuning reference swaps weights
                        ref[j] = self.reference_log_probs(run, traj, [j])[:, 0]
                    with run.autocast():
                        lp = log_prob(run.model, sub, steps=[j])[inv.to(run.model.device), 0]
                    r = ref[j][rows].to(lp.device)
                    loss, info = d3po_loss(lp[:m], lp[m:], r[:m], r[m:], cfg.beta, cfg.eps, weights[mb].to(lp.device))
                    run.backward(loss / len(cols))
                    stats["loss"].append(loss.item())
                    for k in ("accuracy", "margin", "clip_frac", "ratio_dev"):
                        stats[k].append(info[k].item())
                stats["grad_norm"].append(run.optimizer_step())
        return stats

    # ------------------------------------------------------------------ the epoch
    def epoch(self, run, epoch: int, shared: torch.Generator, local: torch.Generator) -> dict:
        return self._labels_epoch(run, local) if self.labelled is not None else self._reward_epoch(run, shared, local)

    def _reward_epoch(self, run, shared, local) -> dict:
        cfg = self.cfg
        prompts, groups = run.epoch_prompts(shared)
        t0 = time.perf_counter()
        traj = run.rollout(prompts, local, sampler=cfg.sampler, eta=cfg.eta, sde_window=sde_window(cfg, shared),
                           same_noise_per_prompt=cfg.same_noise)
        scores = self.score(run, traj)
        t_rollout = time.perf_counter() - t0
        winners, losers = preference_pairs(scores, groups.repeat_interleave(cfg.group_size))
        n_pairs = len(winners)
        winners, losers, weights = self._pad(run, winners, losers)
        stats = self.train_pairs(run, traj, winners, losers, weights, {}, local) if len(winners) else {}
        all_scores = run.gather(scores)
        extra = {f"reward/{name}": all_scores[:, i].mean().item() for i, name in enumerate(self.rewards)} \
            if len(self.rewards) > 1 else {}
        return {**epoch_metrics(all_scores[:, 0], t_rollout, time.perf_counter() - t0 - t_rollout,
                                pairs=run.gather(torch.tensor([float(n_pairs)])).sum().item(), **self._summary(stats)),
                **extra}

    def _labels_epoch(self, run, local) -> dict:
        traj, winners, losers, ref = self.labelled
        t0 = time.perf_counter()
        world, rank = run.accelerator.num_processes, run.accelerator.process_index
        mine = torch.arange(len(winners))[rank::world]  # each process its share; train_pairs shuffles
        w, lo, weights = self._pad(run, winners[mine], losers[mine])
        stats = self.train_pairs(run, traj, w, lo, weights, ref, local)
        return {"time/train_s": time.perf_counter() - t0, "train/pairs": float(len(winners)), **{
            f"train/{k}": v for k, v in self._summary(stats).items()}}

    @staticmethod
    def _summary(stats: dict[str, list[float]]) -> dict:
        if not stats:  # no preferred pair anywhere this epoch: nothing was trained
            return {"grad_norm": 0.0}
        return {"loss": mean(stats["loss"]), "accuracy": mean(stats["accuracy"]), "margin": mean(stats["margin"]),
                "clip_frac": mean(stats["clip_frac"]), "ratio_dev": max(stats["ratio_dev"]),
                "first_ratio_dev": stats["ratio_dev"][0], "grad_norm": mean(stats["grad_norm"])}


def train_d3po(cfg: D3POConfig, model=None, reward=None) -> dict:
    """Run D3PO; ``model``/``reward`` objects may replace the names in ``cfg`` (tests, notebooks)."""
    return run_task(cfg, D3PO(cfg), model=model, reward=reward)


def main(config, overrides=()) -> dict:
    return train_d3po(load_config(D3POConfig, config, overrides))
