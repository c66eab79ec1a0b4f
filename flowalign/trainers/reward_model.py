"""Distil a pixel reward into a noise-aware latent reward model: ``flowalign train configs/reward/<name>.yaml``.

Flow-NRG's reward guidance needs a reward model that "must be noise-aware", i.e. scores ``(x_t, t)``
(VideoAlign issue #17); PRFL / PAVRM (arXiv 2511.21541) build one from the first DiT blocks of the frozen
generator plus a small head. This recipe makes one from any pixel reward:

1. draw ``num_samples`` generator samples (``group_size`` per prompt) with :func:`flowalign.sample`;
2. score the clean images with the pixel reward and standardise the scores (mean/std are saved with the
   model, whose outputs are therefore in the pixel reward's units);
3. train on ``x_t = (1 - sigma) x0 + sigma eps`` with ``sigma ~ U(0, 1)`` (or logit-normal): regression (MSE on
   the standardised reward) and/or Bradley-Terry on pairs of samples of the same prompt,
   ``-log sigmoid(r_i - r_j)`` for the better ``i`` (the pairs share sigma and, by default, the noise, as
   Flow-DPO's chosen and rejected do);
4. report the Spearman rank correlation between the latent model's score and the pixel reward on held-out
   samples at each ``eval_sigmas`` (``metrics.json``, ``spearman.png``), beside the untrained model's and, as
   the baseline latent rewards must beat, the pixel reward on the one-step denoised ``decode(x0_hat)``;
5. save ``latent_reward.safetensors`` (+ ``.json``) into ``out``.

The generator samples are cached in ``out/samples.safetensors`` and training checkpoints every ``save_every``
steps to ``out/checkpoint.pt``; a rerun with the same ``out`` resumes. Every file is written beside its target
and renamed into place.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from flowalign.config import DTYPES, SAMPLERS, _require, check_choices, field, load_config, save_config
from flowalign.utils import atomic_save

__all__ = ["RewardModelConfig", "main", "pair_accuracy", "spearman", "train_reward_model"]

ARCHS = ("net", "backbone")
LOSSES = ("regression", "bt", "both")
SIGMA_SAMPLING = ("uniform", "logit-normal")
SHAPES_PROMPTS = ("shapes-train", "shapes-test")


@dataclasses.dataclass
class RewardModelConfig:
    """`flowalign train` (task: reward-model): distil a pixel reward into a noise-aware latent reward model."""

    task: str = field("reward-model", "What `flowalign train` runs; this schema is the reward-model task.",
                      choices=("reward-model",))
    model: str = field("shapes-sd3", "Generator whose latents the reward model scores (bundled name, diffusers "
                                     "directory or hub id).")
    reward: str = field("shapes-clip", "Pixel reward to distil: registered name or 'package.module:Class'.")
    arch: str = field("net", "net: small standalone conv net with sigma FiLM and prompt features (any family); "
                             "backbone: the generator's first `backbone_blocks` blocks (frozen) + an attention-"
                             "pooling head (SD3 only; PRFL/PAVRM).", choices=ARCHS)
    backbone_blocks: int = field(2, "arch=backbone: how many of the generator's transformer blocks to run (K).")
    head_dim: int = field(128, "arch=backbone: width of the attention-pooling head.")
    net_width: int = field(64, "arch=net: channels of the conv trunk.")
    net_depth: int = field(3, "arch=net: FiLM residual blocks (each halves the resolution while it is above 4).")
    net_text: bool = field(True, "arch=net: condition on the generator's pooled prompt features (False: prompt-free).")
    prompts: str = field("shapes-train", "shapes-train / shapes-test (shapes world captions) or a text file with "
                                         "one prompt per line (cycled to fill num_samples).")
    num_samples: int = field(2048, "Generator samples to draw (held-out ones included).")
    group_size: int = field(4, "Samples per prompt; Bradley-Terry pairs are formed within a group.")
    num_steps: int = field(20, "Sampling steps for the generator samples.")
    sampler: str = field("ode", "Sampler for the generator samples.", choices=SAMPLERS)
    guidance_scale: float | None = field(None, "CFG scale for the samples; null = the model's default.")
    sample_batch_size: int = field(64, "Samples drawn per sampling batch.")
    samples_from: str | None = field(None, "Reuse the cached samples.safetensors of this earlier run folder (same "
                                           "model, reward, prompts and sampling settings), e.g. to compare archs.")
    eval_fraction: float = field(0.125, "Fraction of the prompt groups held out for the Spearman evaluation.")
    loss: str = field("both", "regression (MSE on the standardised reward), bt (Bradley-Terry on same-prompt "
                              "pairs) or both (their sum, bt weighted by bt_weight).", choices=LOSSES)
    bt_weight: float = field(1.0, "Weight of the Bradley-Terry term when loss=both.")
    sigma_sampling: str = field("uniform", "Training noise levels: uniform U(0,1), or logit-normal "
                                           "(sigmoid of N(0,1), SD3's timestep density).", choices=SIGMA_SAMPLING)
    noise_draws: int = field(1, "Noise draws (sigma, eps) of each clean sample in a batch.")
    shared_noise: bool = field(True, "Samples of one prompt group share sigma and eps within a draw (as Flow-DPO "
                                     "pairs do); False: independent eps.")
    lr: float = field(1e-3, "AdamW learning rate.")
    weight_decay: float = field(0.0, "AdamW weight decay.")
    batch_size: int = field(64, "Clean samples per training step (whole prompt groups; x noise_draws).")
    train_steps: int = field(1500, "Optimisation steps.")
    eval_sigmas: list[float] = field([0.0, 0.1, 0.25, 0.5, 0.75, 0.9], "Noise levels of the evaluation.")
    eval_x0_baseline: bool = field(True, "Also score decode(x0_hat) with the pixel reward at each sigma (one "
                                         "velocity call per sample): the baseline a latent reward must beat.")
    save_every: int = field(500, "Checkpoint every this many steps (0: only at the end); a rerun resumes.")
    seed: int = field(0, "Seed for prompts, samples, initialisation, batches and noise.")
    out: str = field("runs/reward-latent", "Run folder: samples cache, checkpoint, weights, metrics, plot.")
    device: str | None = field(None, "Torch device; null = cuda if available, else cpu.")
    dtype: str = field("float32", "Generator weight dtype (the reward head trains in fp32).", choices=DTYPES)
    progress: bool = field(True, "Show progress bars.")

    def __post_init__(self):
        check_choices(self)
        for key, example in (("num_samples", 2048), ("group_size", 4), ("num_steps", 20), ("sample_batch_size", 64),
                             ("batch_size", 64), ("train_steps", 1500), ("noise_draws", 1), ("backbone_blocks", 2),
                             ("head_dim", 128), ("net_width", 64), ("net_depth", 1)):
            _require(getattr(self, key) >= 1, key, getattr(self, key), "must be >= 1", f"{key}={example}")
        _require(self.num_samples >= 2 * self.group_size, "num_samples", self.num_samples,
                 f"must hold at least two prompt groups (2 x group_size = {2 * self.group_size})", "num_samples=2048")
        _require(self.loss == "regression" or self.group_size >= 2, "group_size", self.group_size,
                 "must be >= 2 for Bradley-Terry pairs (loss=bt/both)", "group_size=4")
        _require(0 < self.eval_fraction < 1, "eval_fraction", self.eval_fraction, "must be in (0, 1)",
                 "eval_fraction=0.125")
        _require(self.lr > 0, "lr", self.lr, "must be > 0", "lr=1e-3")
        _require(self.bt_weight >= 0, "bt_weight", self.bt_weight, "must be >= 0", "bt_weight=1.0")
        _require(self.save_every >= 0, "save_every", self.save_every, "must be >= 0", "save_every=500")
        _require(bool(self.eval_sigmas) and all(0 <= s <= 1 for s in self.eval_sigmas), "eval_sigmas",
                 self.eval_sigmas, "must be a non-empty list of values in [0, 1]", "eval_sigmas=[0,0.5,0.9]")
        _require(self.prompts in SHAPES_PROMPTS or os.path.isfile(self.prompts), "prompts", self.prompts,
                 f"must be one of {', '.join(SHAPES_PROMPTS)} or an existing text file", "prompts=shapes-train")
        _require(bool(self.out), "out", self.out, "must be a non-empty path", "out=runs/reward-latent")


# ----------------------------------------------------------------------------- rank statistics
def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 with ties given their average rank (scipy.stats.rankdata - 1)."""
    x = x.flatten().double()
    ranks = torch.empty_like(x)
    ranks[x.argsort()] = torch.arange(x.numel(), dtype=torch.float64)
    _, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    sums = torch.zeros(counts.numel(), dtype=torch.float64).index_add_(0, inverse, ranks)
    return (sums / counts)[inverse]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation (Pearson correlation of the tie-averaged ranks); nan if either is constant."""
    if a.numel() != b.numel() or a.numel() < 2:
        raise ValueError(f"spearman needs two equally long vectors of >= 2 values, got {a.numel()} and {b.numel()}.")
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.norm() * rb.norm()).item()
    return float("nan") if denom == 0 else float((ra @ rb).item() / denom)


def pair_accuracy(pred: torch.Tensor, target: torch.Tensor, group_size: int) -> float:
    """Fraction of same-group pairs with distinct targets that ``pred`` orders like ``target``."""
    p, t = pred.reshape(-1, group_size).double(), target.reshape(-1, group_size).double()
    dt = t[:, :, None] - t[:, None, :]
    dp = p[:, :, None] - p[:, None, :]
    mask = dt > 0
    return float("nan") if not mask.any() else float((dp[mask] > 0).double().mean().item())


# ----------------------------------------------------------------------------- data
def _prompts(cfg: RewardModelConfig, n_groups: int) -> list[str]:
    if cfg.prompts in SHAPES_PROMPTS:
        from flowalign.zoo.shapes_data import sample_specs

        return [s.caption() for s in sample_specs(n_groups, split=cfg.prompts.split("-")[1], seed=cfg.seed)]
    lines = [line.strip() for line in Path(cfg.prompts).read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"The prompts file {cfg.prompts!r} has no prompts (one per line).")
    return [lines[i % len(lines)] for i in range(n_groups)]


def _sample_key(cfg: RewardModelConfig, prompts: list[str]) -> str:
    keys = ("model", "reward", "num_samples", "group_size", "num_steps", "sampler", "guidance_scale", "seed", "dtype")
    return json.dumps({**{k: getattr(cfg, k) for k in keys}, "prompts": prompts}, sort_keys=True)


def _draw_samples(cfg, model, reward, prompts: list[str], out: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean latents (N, ...) and pixel rewards (N,) of ``group_size`` samples per prompt, cached in ``out``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    import flowalign as fa

    path, key = out / "samples.safetensors", _sample_key(cfg, prompts)
    if cfg.samples_from:
        src = Path(cfg.samples_from) / "samples.safetensors"
        if not src.exists():
            raise FileNotFoundError(f"samples_from={cfg.samples_from!r}: no samples.safetensors there.")
        with safe_open(str(src), framework="pt") as fh:
            if (fh.metadata() or {}).get("key") != key:
                raise ValueError(f"samples_from={cfg.samples_from!r}: those samples were drawn with other settings "
                                 "(model, reward, prompts, num_samples, group_size, num_steps, sampler, "
                                 "guidance_scale, seed or dtype differ); set them alike or drop samples_from.")
            return fh.get_tensor("latents"), fh.get_tensor("rewards")
    if path.exists():
        with safe_open(str(path), framework="pt") as fh:
            if (fh.metadata() or {}).get("key") == key:
                return fh.get_tensor("latents"), fh.get_tensor("rewards")
    gen = torch.Generator().manual_seed(cfg.seed)
    per_batch = max(1, cfg.sample_batch_size // cfg.group_size)
    latents, rewards = [], []
    bar = tqdm(range(0, len(prompts), per_batch), desc="sampling", disable=not cfg.progress, leave=False)
    for i in bar:
        batch = prompts[i:i + per_batch]
        with torch.no_grad():
            traj = fa.sample(model, batch, num_steps=cfg.num_steps, sampler=cfg.sampler,
                             guidance_scale=cfg.guidance_scale, num_images_per_prompt=cfg.group_size, generator=gen)
            rewards.append(reward(traj.images, traj.prompts).float().cpu())
        latents.append(traj.x0.float().cpu())
    latents_t, rewards_t = torch.cat(latents)[:cfg.num_samples], torch.cat(rewards)[:cfg.num_samples]
    save_file({"latents": latents_t.contiguous(), "rewards": rewards_t.contiguous()}, str(path) + ".tmp",
              metadata={"key": key})
    os.replace(str(path) + ".tmp", path)
    return latents_t, rewards_t


def _noisy(x0: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    s = sigma.view(-1, *[1] * (x0.ndim - 1))
    return (1 - s) * x0 + s * eps


def _draw_sigma(n: int, how: str, gen: torch.Generator) -> torch.Tensor:
    if how == "uniform":
        return torch.rand(n, generator=gen)
    return torch.sigmoid(torch.randn(n, generator=gen))


# ----------------------------------------------------------------------------- model
def _build(cfg: RewardModelConfig, model, in_channels: int, text_dim: int | None, mean: float, std: float):
    from flowalign.rewards.latent import BackboneLatentReward, LatentRewardNet, text_encoder_from_model

    common = {"name": f"latent-{Path(cfg.reward.split(':')[-1]).name}", "mean": mean, "std": std,
              "base_model": cfg.model, "source_reward": cfg.reward}
    torch.manual_seed(cfg.seed)
    if cfg.arch == "backbone":
        return BackboneLatentReward(model, num_blocks=cfg.backbone_blocks, hidden=cfg.head_dim, **common)
    encoder = text_encoder_from_model(model) if cfg.net_text else None
    # channels of the unpacked latents (FLUX's transformer sees 4x as many, packed)
    return LatentRewardNet(in_channels, text_dim=text_dim if cfg.net_text else 0,
                           width=cfg.net_width, depth=cfg.net_depth, text_encoder=encoder, **common)


def _predict_batched(lm, latents, sigma, text, idx, bs: int) -> torch.Tensor:
    out = []
    for i in range(0, latents.shape[0], bs):
        j = idx[i:i + bs]
        out.append(lm.predict(latents[i:i + bs], sigma[i:i + bs], {k: v[j] for k, v in text.items()}).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def _evaluate(cfg, lm, model, reward, x0, rewards, prompts_per_sample, text, group_idx, device,
              x0_baseline: bool) -> dict:
    """Spearman / pair accuracy of the latent model (and optionally of reward(decode(x0_hat))) at each sigma."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    eps = torch.randn(x0.shape, generator=gen)
    res = {"spearman": [], "pair_accuracy": []}
    if x0_baseline:
        res["spearman_x0_hat"] = []
    gs = model.guidance_or_default(cfg.guidance_scale)
    for s in cfg.eval_sigmas:
        sig = torch.full((x0.shape[0],), float(s))
        xt = _noisy(x0, sig, eps).to(device)
        pred = _predict_batched(lm, xt, sig.to(device), text, group_idx.to(device), cfg.batch_size)
        res["spearman"].append(spearman(pred, rewards))
        res["pair_accuracy"].append(pair_accuracy(pred, rewards, cfg.group_size))
        if x0_baseline:
            scores = []
            for i in range(0, xt.shape[0], cfg.sample_batch_size):
                batch_prompts = prompts_per_sample[i:i + cfg.sample_batch_size]
                x = xt[i:i + cfg.sample_batch_size]
                v = model.velocity(x, torch.tensor(float(s)), model.encode(batch_prompts, guidance_scale=gs), gs)
                scores.append(reward(model.decode(x - float(s) * v), batch_prompts).float().cpu())
            res["spearman_x0_hat"].append(spearman(torch.cat(scores), rewards))
    return res


def _losses(cfg, pred: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, dict]:
    logs = {}
    total = pred.new_zeros(())
    if cfg.loss in ("regression", "both"):
        mse = F.mse_loss(pred, z)
        total, logs["mse"] = total + mse, mse.item()
    if cfg.loss in ("bt", "both"):
        p, t = pred.view(-1, cfg.group_size), z.view(-1, cfg.group_size)
        better = (t[:, :, None] - t[:, None, :]) > 1e-6
        if better.any():
            bt = F.softplus(-(p[:, :, None] - p[:, None, :])[better]).mean()  # -log sigmoid(r_i - r_j)
            total, logs["bt"] = total + (cfg.bt_weight if cfg.loss == "both" else 1.0) * bt, bt.item()
    return total, logs


def _resume_key(cfg: RewardModelConfig) -> dict:
    """The settings a checkpoint must share with a run that resumes it (it may train longer, elsewhere)."""
    return {k: v for k, v in dataclasses.asdict(cfg).items()
            if k not in ("train_steps", "save_every", "device", "progress", "eval_x0_baseline", "samples_from")}


def _finite_or_none(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite_or_none(v) for v in obj]
    return obj


def _plot(metrics: dict, path: Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    s = metrics["sigmas"]
    ax.plot(s, metrics["spearman"], "o-", label=f"latent RM ({metrics['arch']}, trained)")
    ax.plot(s, metrics["spearman_init"], "x--", c="gray", label="latent RM (untrained)")
    if "spearman_x0_hat" in metrics:
        ax.plot(s, metrics["spearman_x0_hat"], "s:", label="pixel reward on decode(x0_hat)")
    ax.set_xlabel("sigma (noise level of x_t)")
    ax.set_ylabel("Spearman vs pixel reward")
    ax.set_ylim(-0.2, 1.02)
    ax.axhline(0, lw=0.5, c="k")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"{metrics['reward']} on {metrics['model']} latents (n={metrics['num_eval']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(str(path) + ".tmp.png", dpi=120)
    plt.close(fig)
    os.replace(str(path) + ".tmp.png", path)
    return True


# ----------------------------------------------------------------------------- the recipe
def train_reward_model(cfg: RewardModelConfig, model=None, reward=None) -> dict:
    """Run the recipe of the module docstring; returns the metrics also written to ``out/metrics.json``.

    ``model`` / ``reward``: use these built objects (e.g. in a notebook, or a custom pixel reward) instead of
    loading ``cfg.model`` / ``cfg.reward``; the names in ``cfg`` are still what the saved model records.
    """
    import flowalign as fa

    if not isinstance(cfg, RewardModelConfig):
        cfg = load_config(RewardModelConfig, cfg)
    t_start = time.perf_counter()
    out = Path(cfg.out)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    ckpt_path = out / "checkpoint.pt"
    ckpt = torch.load(ckpt_path, map_location=device, weights_only=False) if ckpt_path.exists() else None
    if ckpt is not None and ckpt.get("config") != _resume_key(cfg):  # checked first: a wrong rerun touches nothing
        diff = sorted(k for k, v in _resume_key(cfg).items() if ckpt.get("config", {}).get(k) != v)
        raise ValueError(f"{ckpt_path} is a checkpoint of a run with other settings ({', '.join(diff)} differ); "
                         "resume with the same settings, or choose another `out` (the checkpoint is kept).")
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    if model is None:
        model = fa.load_model(cfg.model, device=device, dtype=cfg.dtype)
        model.transformer.requires_grad_(False)  # frozen: only the reward model trains
    reward = fa.rewards.load(cfg.reward if reward is None else reward).to(device)

    # 1-2. samples and standardised pixel rewards
    n_groups = math.ceil(cfg.num_samples / cfg.group_size)
    group_prompts = _prompts(cfg, n_groups)
    x0, r = _draw_samples(cfg, model, reward, group_prompts, out)
    n_groups = x0.shape[0] // cfg.group_size  # whole groups only
    x0, r = x0[:n_groups * cfg.group_size], r[:n_groups * cfg.group_size]
    group_idx = torch.arange(n_groups).repeat_interleave(cfg.group_size)
    n_eval = min(n_groups - 1, max(1, round(cfg.eval_fraction * n_groups)))
    n_train = n_groups - n_eval
    train_rows = n_train * cfg.group_size
    mean, std = r[:train_rows].mean().item(), r[:train_rows].std().item()
    if not std > 0:
        raise ValueError(f"The pixel reward {cfg.reward!r} gave the same score to every training sample ({mean}); "
                         "nothing to distil. Use more samples or another reward.")
    z = (r - mean) / std
    t_data = time.perf_counter() - t_start

    # the latent reward model and each prompt's features, computed once
    text_dim = None
    if cfg.arch == "net" and cfg.net_text:
        from flowalign.rewards.latent import text_encoder_from_model

        text_dim = text_encoder_from_model(model)(group_prompts[:1]).shape[-1]
    lm = _build(cfg, model, x0.shape[1], text_dim, mean, std).to(device)
    with torch.no_grad():
        text = {k: v.to(device) for k, v in lm.encode_text(group_prompts[:n_groups]).items()}
    eval_sl = slice(train_rows, None)
    eval_prompts = [group_prompts[g] for g in group_idx[eval_sl].tolist()]

    def evaluate(x0_baseline=False):
        return _evaluate(cfg, lm, model, reward, x0[eval_sl], r[eval_sl], eval_prompts, text, group_idx[eval_sl],
                         device, x0_baseline)

    # 3. training (resumable)
    params = lm.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    start, history, init = 0, [], None
    if ckpt is not None:
        lm.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        start, history, init = ckpt["step"], ckpt["history"], ckpt["init"]
    if init is None:
        init = evaluate()
    groups_per_step = max(1, cfg.batch_size // cfg.group_size)
    bar = tqdm(range(start, cfg.train_steps), desc=f"latent reward ({cfg.arch})", disable=not cfg.progress,
               initial=start, total=cfg.train_steps, leave=False)
    t_train = time.perf_counter()
    for step in bar:
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)  # per-step: resumes draw the same batches
        groups = torch.randint(n_train, (groups_per_step,), generator=gen).repeat(cfg.noise_draws)
        rows = (groups[:, None] * cfg.group_size + torch.arange(cfg.group_size)).flatten()
        n = groups.numel()
        sigma = _draw_sigma(n, cfg.sigma_sampling, gen)
        if cfg.shared_noise:
            eps = torch.randn(n, *x0.shape[1:], generator=gen).repeat_interleave(cfg.group_size, 0)
        else:
            eps = torch.randn(rows.numel(), *x0.shape[1:], generator=gen)
        sigma = sigma.repeat_interleave(cfg.group_size)
        xt = _noisy(x0[rows], sigma, eps).to(device)
        pred = lm.predict(xt, sigma.to(device), {k: v[groups.repeat_interleave(cfg.group_size).to(device)]
                                                 for k, v in text.items()}).float()
        loss, logs = _losses(cfg, pred, z[rows].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append({"step": step + 1, "loss": loss.item(), **logs})
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.train_steps:
            atomic_save({"step": step + 1, "model": lm.state_dict(), "optimizer": opt.state_dict(),
                          "history": history, "init": init, "config": _resume_key(cfg)}, ckpt_path)
    t_train = time.perf_counter() - t_train

    # 4-5. evaluation, weights, metrics, plot
    final = evaluate(x0_baseline=cfg.eval_x0_baseline)
    lm.extra = {"spearman": dict(zip(map(str, cfg.eval_sigmas), final["spearman"])), "train_steps": cfg.train_steps,
                "loss": cfg.loss, "num_samples": int(x0.shape[0])}
    lm.save(out)
    last = history[-min(len(history), 50):] if history else []
    metrics = {
        "model": cfg.model, "reward": cfg.reward, "arch": cfg.arch, "loss": cfg.loss, "sigmas": list(cfg.eval_sigmas),
        **final, "spearman_init": init["spearman"], "pair_accuracy_init": init["pair_accuracy"],
        "num_train": train_rows, "num_eval": int(x0.shape[0]) - train_rows, "group_size": cfg.group_size,
        "reward_mean": mean, "reward_std": std, "train_steps": cfg.train_steps, "resumed_from": start,
        "trainable_params": sum(p.numel() for p in params),
        "loss_first": history[0]["loss"] if history else None,
        "loss_last50": sum(h["loss"] for h in last) / len(last) if last else None,
        "seconds": {"data": round(t_data, 1), "train": round(t_train, 1),
                    "total": round(time.perf_counter() - t_start, 1)},
        "device": str(device),
    }
    (out / "metrics.json.tmp").write_text(json.dumps(_finite_or_none(metrics), indent=2))
    os.replace(out / "metrics.json.tmp", out / "metrics.json")
    metrics["plot"] = str(out / "spearman.png") if _plot(metrics, out / "spearman.png") else None
    if ckpt_path.exists():
        ckpt_path.unlink()  # the run is complete; the saved weights supersede it
    return metrics


def format_metrics(metrics: dict) -> str:
    """A table of Spearman (and pair accuracy) vs sigma."""
    cols = [("sigma", metrics["sigmas"]), ("spearman", metrics["spearman"]), ("untrained", metrics["spearman_init"])]
    if "spearman_x0_hat" in metrics:
        cols.append(("x0_hat pixel", metrics["spearman_x0_hat"]))
    cols.append(("pair acc", metrics["pair_accuracy"]))
    lines = ["  ".join(f"{name:>12}" for name, _ in cols)]
    for i in range(len(metrics["sigmas"])):
        lines.append("  ".join(f"{vals[i]:>12.3f}" for _, vals in cols))
    return "\n".join(lines)


def main(config_path=None, overrides=()) -> dict:
    """``flowalign train CONFIG key=value ...`` for ``task: reward-model`` configs."""
    cfg = load_config(RewardModelConfig, config_path, list(overrides))
    metrics = train_reward_model(cfg)
    print(format_metrics(metrics))
    print(f"wrote {Path(cfg.out) / 'latent_reward.safetensors'}, metrics.json"
          f"{' and spearman.png' if metrics.get('plot') else ''} to {cfg.out} ({metrics['seconds']['total']}s)")
    return metrics
