"""Flow-DPO (Diffusion-DPO in flow-matching form): ``task: dpo``.

Diffusion-DPO (Wallace et al. 2024, "Diffusion Model Alignment Using Direct Preference Optimization") and its
flow-matching form Flow-DPO (Liu et al. 2025, "Improving Video Generation with Human Feedback") train on pairs of
clean latents of one prompt, a chosen ``x_w`` and a rejected ``x_l``. Per pair and noise level, one sigma and one
noise are shared by the pair; the policy's and the frozen reference's flow-matching errors on both give

    L = -log sigmoid(-beta/2 * [(err_w - ref_err_w) - (err_l - ref_err_l)])

(:func:`flowalign.functional.dpo.flow_dpo_loss`), with a constant ``beta``. The reference is the model with its
LoRA adapter switched off (the initial weights under full fine-tuning): no second copy.

Pairs come from one of two sources:

- **online** (``pairs: null``): each epoch samples ``group_size`` images per prompt with the policy (the ODE or an
  SDE), scores them with the training reward and pairs them within each prompt group: best against worst, or
  every ordered pair, kept when the reward gap exceeds ``pair_margin``;
- **offline** (``pairs: FILE.jsonl``): a file of human or AI preferences, one JSON object per line::

      {"prompt": "two red circles", "chosen": "imgs/0001_a.png", "rejected": "imgs/0001_b.png"}

  Image paths are relative to the file's folder (or absolute); images are resized to the training
  ``height x width`` and encoded with ``model.encode_images`` (the VAE posterior mode). Each epoch draws
  ``pairs_per_epoch`` pairs at random. Blank lines are skipped; any other bad line is an error naming it.

Not implemented: flow_grpo's periodic copy of the policy into the reference (``ref_update_step``).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from flowalign.config import SAMPLERS, ConfigError, _require, field, load_config
from flowalign.functional.dpo import (
    PAIRINGS,
    SIGMA_SAMPLINGS,
    flow_dpo_loss,
    flow_matching_error,
    preference_pairs,
    sample_sigmas,
)
from flowalign.functional.flow import interpolate, velocity_target
from flowalign.trainers.loop import TrainConfig, epoch_metrics, mean, run_task

PAIR_KEYS = ("prompt", "chosen", "rejected")
EXAMPLE_LINE = '{"prompt": "two red circles", "chosen": "a.png", "rejected": "b.png"}'


@dataclasses.dataclass
class ForwardConfig(TrainConfig):
    """Settings shared by the forward-process trainers (Flow-DPO, Flow-RWR): rollouts with any sampler, then
    flow-matching losses on the clean samples at freshly drawn noise levels."""

    sampler: str = field("ode", "Rollout sampler: ode (deterministic Euler) or an SDE (flow-sde, dance-sde, cps) for "
                                "more diverse groups; the loss never needs its log-probs.", choices=SAMPLERS)
    eta: float | None = field(None, "Noise level of an SDE sampler; null = its default.")
    train_timesteps: int = field(1, "Noise levels (each with fresh noise) per sample and optimizer step; their "
                                    "gradients are averaged.")
    sigma_sampling: str = field("logit-normal", "Training noise levels: logit-normal = sigmoid(N(logit_mean, "
                                                "logit_std)) (SD3 pretraining, flow_grpo's Flow-DPO) or uniform "
                                                "(Diffusion-DPO).", choices=SIGMA_SAMPLINGS)
    logit_mean: float = field(0.0, "Mean of the logit-normal noise levels (SD3: 0).")
    logit_std: float = field(1.0, "Std of the logit-normal noise levels (SD3: 1).")
    train_guidance_scale: float = field(1.0, "CFG scale of the training forward passes: 1 = the conditional "
                                             "velocity alone, as in pretraining and Diffusion-DPO; > 1 trains the "
                                             "CFG-combined velocity.")

    def __post_init__(self):
        super().__post_init__()
        _require(self.train_timesteps >= 1, "train_timesteps", self.train_timesteps, "must be >= 1",
                 "train_timesteps=1")
        _require(self.logit_std > 0, "logit_std", self.logit_std, "must be > 0", "logit_std=1.0")
        _require(self.train_guidance_scale >= 1, "train_guidance_scale", self.train_guidance_scale,
                 "must be >= 1 (1 = no CFG)", "train_guidance_scale=1.0")
        _require(self.eta is None or self.eta >= 0, "eta", self.eta, "must be >= 0 or null", "eta=0.7")


@dataclasses.dataclass
class DPOConfig(ForwardConfig):
    """`flowalign train` (task: dpo): Flow-DPO on online (best vs worst of a group) or offline preference pairs."""

    task: str = field("dpo", "What `flowalign train` runs; this schema is Flow-DPO.", choices=("dpo",))
    out: str = field("runs/dpo", "Run folder.")
    beta: float = field(100.0, "DPO temperature (constant): the loss is -log sigmoid(-beta/2 * [(err_w - ref_err_w) "
                               "- (err_l - ref_err_l)]); larger keeps the policy closer to the reference. Flow-DPO "
                               "on SD3.5: 100 (flow_grpo); Diffusion-DPO on SD1.5 (eps errors): 5000.")
    pairs: str | None = field(None, "Offline preference pairs: a JSONL file with one {\"prompt\", \"chosen\", "
                                    "\"rejected\"} object per line (image paths relative to the file); null = online "
                                    "pairs from the policy's own rollouts scored by `reward`.")
    pairs_per_epoch: int = field(32, "Offline: pairs drawn (with replacement) per epoch, over all processes.")
    pairing: str = field("best-worst", "Online: best-worst = one pair per prompt group (its best vs its worst "
                                       "sample); all = every ordered pair of the group.", choices=PAIRINGS)
    pair_margin: float = field(0.0, "Online: a pair is kept only when its reward gap exceeds this (ties never "
                                    "pair).")
    train_batch_size: int = field(16, "Pairs per optimizer step (each pair costs two samples' forward passes "
                                      "through the policy and the reference).")

    def __post_init__(self):
        super().__post_init__()
        _require(self.beta > 0, "beta", self.beta, "must be > 0", "beta=100")
        _require(self.pair_margin >= 0, "pair_margin", self.pair_margin, "must be >= 0", "pair_margin=0.0")
        _require(self.pairs_per_epoch >= 1, "pairs_per_epoch", self.pairs_per_epoch, "must be >= 1",
                 "pairs_per_epoch=32")
        _require(self.group_size >= 2 or self.pairs is not None, "group_size", self.group_size,
                 "must be >= 2 for online pairs (a pair needs two samples of a prompt)", "group_size=8")
        _require(self.pairs is None or Path(self.pairs).is_file(), "pairs", self.pairs,
                 "must name an existing JSONL file of preference pairs (or be null for online pairs)",
                 "pairs=data/pairs.jsonl")


# ----------------------------------------------------------------------------- offline pairs
@dataclasses.dataclass(frozen=True)
class Pair:
    prompt: str
    chosen: Path
    rejected: Path
    line: int


def load_pairs(path: str | Path) -> list[Pair]:
    """Read and check a preference-pair file (see the module doc); errors name the file and line."""
    path = Path(path)
    pairs = []
    for n, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not text.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); each line must be one object "
                             f"like {EXAMPLE_LINE}.") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object with keys {list(PAIR_KEYS)}, got {type(obj).__name__}.")
        unknown = sorted(set(obj) - set(PAIR_KEYS))
        missing = [k for k in PAIR_KEYS if k not in obj]
        if unknown or missing:
            what = "; ".join(s for s in (f"unknown field(s) {unknown}" if unknown else "",
                                         f"missing field(s) {missing}" if missing else "") if s)
            raise ValueError(f"{where}: {what}. Each line holds exactly the keys {list(PAIR_KEYS)}.")
        bad = [k for k in PAIR_KEYS if not isinstance(obj[k], str) or not obj[k]]
        if bad:
            raise ValueError(f"{where}: {bad} must be non-empty strings (a prompt and two image paths).")
        images = {k: (path.parent / obj[k]) for k in ("chosen", "rejected")}
        for k, p in images.items():
            if not p.is_file():
                raise FileNotFoundError(f"{where}: the {k} image {obj[k]!r} does not exist (looked for {p}); paths "
                                        f"are relative to the pairs file's folder.")
        pairs.append(Pair(obj["prompt"], images["chosen"], images["rejected"], n))
    if not pairs:
        raise ValueError(f"{path} holds no preference pairs.")
    return pairs


def load_image(path: Path, height: int, width: int, where: str) -> torch.Tensor:
    """An RGB image as ``(3, height, width)`` in [0, 1], resized (bilinear, antialiased) when its size differs."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            pixels = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{where}: cannot read the image {path} ({e}).") from None
    if pixels.shape[1:] != (height, width):
        pixels = torch.nn.functional.interpolate(pixels[None], size=(height, width), mode="bilinear",
                                                 antialias=True, align_corners=False)[0].clamp(0, 1)
    return pixels


# ----------------------------------------------------------------------------- shared forward-process pieces
def train_conditioning(model, cond, prompts: list[str], guidance_scale: float):
    """``cond`` if it serves the training CFG scale, else the prompts re-encoded for it (CFG-free rollouts carry
    no negative branch)."""
    if guidance_scale > 1 and cond.uncond is None:
        with torch.no_grad():
            return model.encode(prompts, guidance_scale=guidance_scale)
    return cond


def noised(cfg: ForwardConfig, x0: torch.Tensor, gen: torch.Generator, n: int | None = None
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_t, sigma, target)`` for clean latents ``x0``: fresh noise levels and noise from ``gen``; with ``n``,
    one (sigma, noise) per row of the first ``n`` and reused, in order, for the rows after (a DPO pair shares
    them)."""
    n = len(x0) if n is None else n
    sigma = sample_sigmas(n, gen, cfg.sigma_sampling, cfg.logit_mean, cfg.logit_std)
    eps = torch.randn((n, *x0.shape[1:]), generator=gen)
    reps = len(x0) // n
    sigma, eps = sigma.repeat(reps).to(x0.device), eps.repeat(reps, *([1] * (x0.ndim - 1))).to(x0.device)
    return interpolate(x0, eps, sigma), sigma, velocity_target(x0, eps)


# ----------------------------------------------------------------------------- the algorithm
class DPO:
    """The Flow-DPO epoch on a :class:`~flowalign.trainers.loop.Run`."""

    def __init__(self, cfg: DPOConfig):
        self.cfg = cfg
        self.pairs: list[Pair] | None = None

    def setup(self, run) -> None:
        if self.cfg.pairs is not None:
            n = run.accelerator.num_processes
            if self.cfg.pairs_per_epoch % n:
                raise ConfigError(f"pairs_per_epoch={self.cfg.pairs_per_epoch} must be a multiple of the number of "
                                  f"processes ({n}).")
            self.pairs = load_pairs(self.cfg.pairs)

    def epoch(self, run, epoch: int, shared: torch.Generator, local: torch.Generator) -> dict:
        return self._offline(run, shared, local) if self.pairs is not None else self._online(run, shared, local)

    # ------------------------------------------------------------------ pair sources
    def _online(self, run, shared, local) -> dict:
        cfg, model = self.cfg, run.model
        prompts, groups = run.epoch_prompts(shared)
        t0 = time.perf_counter()
        traj = run.rollout(prompts, local, sampler=cfg.sampler, eta=cfg.eta)
        rewards = run.score(traj)
        t_rollout = time.perf_counter() - t0
        all_rewards = run.gather(rewards)
        w, l = preference_pairs(rewards, groups.repeat_interleave(cfg.group_size), cfg.pairing, cfg.pair_margin)
        # every process takes the same number of optimizer steps (DDP syncs each backward)
        n = int(run.gather(torch.tensor([len(w)])).min())
        keep = torch.randperm(len(w), generator=local)[:n]
        w, l = w[keep], l[keep]
        cond = train_conditioning(model, traj.cond, traj.prompts, cfg.train_guidance_scale)
        x0 = traj.x0

        def batches():
            for s in range(0, n, cfg.train_batch_size):
                bw, bl = w[s:s + cfg.train_batch_size], l[s:s + cfg.train_batch_size]
                yield x0[bw], x0[bl], cond.index(torch.cat([bw, bl]))

        stats = self._train(run, batches(), local)
        gap = (rewards[w] - rewards[l]).mean().item() if n else 0.0
        return epoch_metrics(all_rewards, t_rollout, time.perf_counter() - t0 - t_rollout, pairs=n, reward_gap=gap,
                             **stats)

    def _offline(self, run, shared, local) -> dict:
        cfg, model = self.cfg, run.model
        t0 = time.perf_counter()
        acc = run.accelerator
        choice = torch.randint(len(self.pairs), (cfg.pairs_per_epoch,), generator=shared)
        per = cfg.pairs_per_epoch // acc.num_processes
        mine = [self.pairs[i] for i in choice[acc.process_index * per:(acc.process_index + 1) * per].tolist()]
        height, width, _ = model.resolve_size(cfg.height, cfg.width, cfg.num_frames)

        def encode(items: list[Pair], key: str) -> torch.Tensor:
            pixels = torch.stack([load_image(getattr(p, key), height, width, f"{cfg.pairs}:{p.line}") for p in items])
            with torch.no_grad():
                return model.encode_images(pixels.to(model.device)).float()

        def batches():
            for s in range(0, len(mine), cfg.train_batch_size):
                items = mine[s:s + cfg.train_batch_size]
                prompts = [p.prompt for p in items]
                with torch.no_grad():
                    cond = model.encode(prompts + prompts, guidance_scale=cfg.train_guidance_scale)
                yield encode(items, "chosen"), encode(items, "rejected"), cond

        stats = self._train(run, batches(), local)
        return {"time/train_s": time.perf_counter() - t0, "train/pairs": len(mine),
                **{f"train/{k}": v for k, v in stats.items()}}

    # ------------------------------------------------------------------ the loss
    def _train(self, run, batches, local) -> dict:
        """One optimizer step per batch of ``(x0_w, x0_l, cond of [w; l])``; returns mean diagnostics."""
        cfg, model = self.cfg, run.model
        gs = cfg.train_guidance_scale
        stats: dict[str, list[float]] = {"loss": [], "implicit_acc": [], "margin": [], "err": [], "ref_err": [],
                                         "grad_norm": []}
        for x0_w, x0_l, cond in batches:
            p = len(x0_w)
            x0 = torch.cat([x0_w, x0_l]).to(model.device)
            for _ in range(cfg.train_timesteps):
                xt, sigma, target = noised(cfg, x0, local, n=p)
                # the reference runs before the policy: a full-fine-tuning reference swaps weights, which would
                # invalidate tensors the policy's backward saved
                with torch.no_grad(), run.reference(), run.autocast():
                    ref_err = flow_matching_error(model.velocity(xt, sigma, cond, gs), target)
                with run.autocast():
                    err = flow_matching_error(model.velocity(xt, sigma, cond, gs), target)
                loss, info = flow_dpo_loss(err[:p], err[p:], ref_err[:p], ref_err[p:], cfg.beta)
                run.backward(loss / cfg.train_timesteps)
                stats["loss"].append(loss.item())
                for k, v in info.items():
                    stats[k].append(v.item())
            stats["grad_norm"].append(run.optimizer_step())
        return {k: mean(v) for k, v in stats.items()}


def train_dpo(cfg: DPOConfig, model=None, reward=None) -> dict:
    """Run Flow-DPO; ``model``/``reward`` objects may replace the names in ``cfg`` (tests, notebooks)."""
    return run_task(cfg, DPO(cfg), model=model, reward=reward)


def main(config, overrides=()) -> dict:
    return train_dpo(load_config(DPOConfig, config, overrides))
