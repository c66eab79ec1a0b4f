"""The training loop every generator trainer shares; an algorithm supplies only what one epoch does.

``Run`` owns what is common: Hugging Face accelerate (one process, or DDP with ``accelerate launch``; mixed
precision), the model with a LoRA adapter or fully trainable, the optimizer and its learning-rate schedule over
epochs, an EMA of the trainable weights,
prompts, grouped rollouts (K samples per prompt, group statistics gathered across processes), periodic
evaluation on held-out prompts with the ODE sampler, logging (metrics.jsonl, TensorBoard, optionally Weights &
Biases), a progress bar, atomic checkpoints, ``resume=latest``, and the final LoRA/weights and report.

An algorithm (``flowalign.trainers.grpo``, ``flowalign.trainers.crd``) implements::

    epoch(run, epoch, shared, local) -> dict  # rollouts and optimizer steps; returns scalar metrics
    setup(run)                                # optional: snapshots, critics, reference settings
    state_dict() / load_state_dict(d)         # optional: the algorithm's own state for checkpoints
    export(run, folder)                       # optional: e.g. a distilled student saved as a pipeline

Every random draw of an epoch comes from generators seeded by ``(seed, epoch)``, so a run resumed from a
checkpoint continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from flowalign.config import DTYPES, ConfigError, _require, field, save_config
from flowalign.functional.schedule import SCHEDULES, lr_factor

FINETUNE = ("lora", "full")
PRECISION = ("no", "bf16", "fp16")
TRACKERS = ("tensorboard", "wandb", "none")


@dataclasses.dataclass
class TrainConfig:
    """Settings shared by every generator trainer (`flowalign train`)."""

    task: str = field("grpo", "What `flowalign train` runs (grpo, crd, ...).")
    model: str = field("shapes-sd3", "Generator: bundled name, diffusers directory or hub id.")
    reward: str = field("shapes-geneval", "Training reward: registered name or 'package.module:Class'.")
    reward_kwargs: dict[str, Any] = field({}, "Keywords for the training reward's constructor, e.g. {workers: 8}: "
                                              "the shapes verifiers judge a batch in 8 processes.")
    prompts: str = field("shapes-train", "Training prompts: shapes-train / shapes-test (images), shapes-video-train / "
                                         "shapes-video-test (video), a .txt file (one per line) or a .jsonl file "
                                         "({\"prompt\": ...} per line).")
    eval_prompts: str | None = field("shapes-test", "Held-out prompts for periodic evaluation (null: none).")
    eval_rewards: list[str] = field([], "Rewards reported at evaluation (default: the training reward; image "
                                        "models on shapes captions also shapes-geneval and shapes-clip, video "
                                        "models on moving-shapes captions also shapes-video).")
    eval_every: int = field(5, "Evaluate every this many epochs (0: only before and after training).")
    eval_num: int = field(48, "Held-out prompts per evaluation (balanced over categories on shapes).")
    eval_steps: int = field(20, "ODE steps at evaluation.")
    eval_guidance_scale: float | None = field(None, "CFG scale at evaluation; null = guidance_scale.")
    epochs: int = field(20, "Epochs; each draws fresh rollouts and takes one or more optimizer steps.")
    groups_per_epoch: int = field(8, "Prompts per epoch (over all processes); each gets group_size samples.")
    group_size: int = field(8, "Samples per prompt (K); advantages are computed within these groups.")
    num_steps: int = field(10, "Sampling steps of the rollouts.")
    guidance_scale: float | None = field(None, "CFG scale of rollouts and training; null = the model's default.")
    height: int | None = field(None, "Image height of rollouts and evaluation; null = the model's native size.")
    width: int | None = field(None, "Image width; null = the model's native size.")
    num_frames: int | None = field(None, "Frames per video (Wan); null = the model's default.")
    rollout_batch_size: int = field(32, "Samples generated per sampling call.")
    train_batch_size: int = field(32, "Samples per optimizer step (keep equal to rollout_batch_size so that "
                                      "recomputed log-probs match the recorded ones bitwise).")
    lr: float = field(3e-4, "AdamW learning rate.")
    lr_schedule: str = field("constant", "Learning rate over epochs: constant, cosine or linear (decay to "
                                         "lr_final x lr at the last epoch; a resumed run keeps "
                                         "it only with the same epochs).", choices=SCHEDULES)
    lr_warmup_epochs: int = field(0, "Epochs of linear learning-rate warm-up before the schedule.")
    lr_final: float = field(0.0, "Fraction of lr a cosine or linear schedule ends at.")
    weight_decay: float = field(0.0, "AdamW weight decay.")
    max_grad_norm: float = field(1.0, "Gradient-norm clipping (0: off).")
    finetune: str = field("lora", "lora: train a LoRA adapter (the reference policy is the adapter switched off); "
                                  "full: train every transformer weight.", choices=FINETUNE)
    lora_rank: int = field(32, "LoRA rank.")
    lora_alpha: float | None = field(None, "LoRA alpha; null = 2 x rank (Flow-GRPO: r32, alpha 64).")
    ema_decay: float = field(0.0, "EMA of the trainable weights used for evaluation and export (0: off).")
    gradient_checkpointing: bool = field(False, "Recompute transformer activations in backward (less memory).")
    mixed_precision: str = field("no", "Autocast precision on GPU: no, bf16 or fp16.", choices=PRECISION)
    dtype: str = field("float32", "Weight dtype of the frozen model parts.", choices=DTYPES)
    device: str | None = field(None, "cpu, cuda, cuda:1 ...; null = cuda if available (accelerate decides).")
    threads: int | None = field(None, "CPU threads for torch (null: torch's default).")
    seed: int = field(0, "Seed; with the same seed and settings a run is reproducible, also across resumes.")
    out: str = field("runs/train", "Run folder: checkpoints, LoRA, metrics.jsonl, TensorBoard events, report.")
    resume: str | None = field(None, "latest (the run folder's newest checkpoint) or a checkpoint folder.")
    save_every: int = field(5, "Checkpoint every this many epochs (0: only at the end).")
    keep_checkpoints: int = field(2, "Checkpoints kept (the oldest are deleted once a newer one is complete).")
    log_with: str = field("tensorboard", "Tracker besides metrics.jsonl: tensorboard, wandb or none.",
                          choices=TRACKERS)
    save_rollout_stats: bool = field(False, "Save each epoch's rewards, group ids and advantages per process to "
                                            "out/rollouts/ (to audit advantages across processes).")
    progress: bool = field(True, "Show progress bars.")

    def __post_init__(self):
        for key in ("epochs", "groups_per_epoch", "group_size", "num_steps", "rollout_batch_size",
                    "train_batch_size", "eval_num", "eval_steps", "lora_rank"):
            _require(getattr(self, key) >= 1, key, getattr(self, key), "must be >= 1", f"{key}=8")
        for key in ("eval_every", "save_every"):
            _require(getattr(self, key) >= 0, key, getattr(self, key), "must be >= 0", f"{key}=5")
        _require(self.keep_checkpoints >= 1, "keep_checkpoints", self.keep_checkpoints, "must be >= 1",
                 "keep_checkpoints=2")
        _require(0 <= self.ema_decay < 1, "ema_decay", self.ema_decay, "must lie in [0, 1)", "ema_decay=0.9")
        _require(self.lr > 0, "lr", self.lr, "must be > 0", "lr=3e-4")
        _require(self.lr_warmup_epochs >= 0, "lr_warmup_epochs", self.lr_warmup_epochs, "must be >= 0",
                 "lr_warmup_epochs=0")
        _require(0 <= self.lr_final <= 1, "lr_final", self.lr_final, "must lie in [0, 1]", "lr_final=0.1")


# ----------------------------------------------------------------------------- checkpoints
CKPT_DIR = "checkpoints"


def latest_checkpoint(out: str | Path) -> Path | None:
    """The newest complete checkpoint of a run folder (the ``latest`` pointer), or None."""
    pointer = Path(out) / CKPT_DIR / "latest"
    if not pointer.exists():
        return None
    path = Path(out) / CKPT_DIR / pointer.read_text().strip()
    return path if (path / "state.pt").exists() else None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _resume_key(cfg: TrainConfig) -> dict:
    """Settings a resumed run must share with its checkpoint (it may run longer, log or evaluate differently)."""
    free = {"epochs", "resume", "out", "progress", "log_with", "eval_every", "eval_num", "eval_steps",
            "eval_guidance_scale", "eval_prompts", "eval_rewards", "save_every", "keep_checkpoints", "threads",
            "device", "save_rollout_stats"}
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in free}


# ----------------------------------------------------------------------------- the run
class Run:
    """One training run: model, optimizer, rewards, prompts, logging and checkpoints (see the module doc)."""

    def __init__(self, cfg: TrainConfig, algorithm, model=None, reward=None):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        import flowalign as fa
        from flowalign.trainers.data import load_prompts

        self.cfg, self.algorithm = cfg, algorithm
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        cpu = cfg.device == "cpu" or (cfg.device is None and not torch.cuda.is_available())
        self.accelerator = Accelerator(cpu=cpu, mixed_precision=cfg.mixed_precision,
                                       kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
        acc = self.accelerator
        if cfg.groups_per_epoch % acc.num_processes:
            raise ConfigError(f"groups_per_epoch={cfg.groups_per_epoch} must be a multiple of the number of "
                              f"processes ({acc.num_processes}).")
        self.out = Path(cfg.out)
        self.prompts = load_prompts(cfg.prompts)
        self.eval_prompts, self.eval_categories, self.eval_world = self._eval_prompt_set()
        device = cfg.device if cfg.device and not cfg.device.startswith("cuda") else acc.device
        dtype = None if cfg.dtype == "float32" else getattr(torch, cfg.dtype)  # fp32 is how weights load
        self.model = fa.load_model(model if model is not None else cfg.model, device=device, dtype=dtype)
        reward = reward if reward is not None else fa.rewards.load(cfg.reward, **cfg.reward_kwargs)
        self.reward = reward.to(self.model.device)
        self._eval_rewards = None
        transformer = self.model.transformer
        if cfg.finetune == "lora":
            with torch.random.fork_rng(devices=[]):  # the adapter's initial weights follow cfg.seed only
                torch.manual_seed(cfg.seed)
                self.model.add_lora(rank=cfg.lora_rank, alpha=cfg.lora_alpha)
        else:
            transformer.requires_grad_(True)
        if cfg.gradient_checkpointing and hasattr(transformer, "enable_gradient_checkpointing"):
            transformer.enable_gradient_checkpointing()
        self.param_names = [n for n, p in transformer.named_parameters() if p.requires_grad]
        self.params = [p for p in transformer.parameters() if p.requires_grad]
        for p in self.params:
            p.data = p.data.float()  # trainable weights (LoRA or all) stay fp32; frozen ones keep cfg.dtype
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        if acc.num_processes > 1:
            self.model.use_denoiser(acc.prepare_model(transformer))
        from flowalign.trainers.snapshot import Snapshot

        self.ema = Snapshot(self.params) if cfg.ema_decay > 0 else None
        self._reference = Snapshot(self.params) if cfg.finetune == "full" else None
        self.epoch = 0
        self.step = 0
        self.last_grid = None  # the latest evaluation's sample grid (C, H, W); for video its first frame
        self.history: list[dict] = []
        if hasattr(self.algorithm, "setup"):  # the optional hooks: setup, state_dict/load_state_dict, export
            self.algorithm.setup(self)

    # ------------------------------------------------------------------ helpers for algorithms
    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def generators(self, epoch: int) -> tuple[torch.Generator, torch.Generator]:
        """(shared, local) generators of an epoch: the shared one draws the same on every process (prompt
        choice), the local one is this process's own (noise, shuffles, timesteps)."""
        base = (self.cfg.seed * 1_000_003 + epoch) * 1009
        shared = torch.Generator().manual_seed(base)
        local = torch.Generator().manual_seed(base + 1 + self.accelerator.process_index)
        return shared, local

    def epoch_prompts(self, shared: torch.Generator) -> tuple[list[str], torch.Tensor]:
        """This process's prompts of the epoch and the global group id of each (the prompt's slot in the epoch)."""
        g = self.cfg.groups_per_epoch
        choice = torch.randint(len(self.prompts), (g,), generator=shared)
        per = g // self.accelerator.num_processes
        mine = torch.arange(g)[self.accelerator.process_index * per:(self.accelerator.process_index + 1) * per]
        return [self.prompts[i] for i in choice[mine].tolist()], mine

    def rollout(self, prompts: list[str], gen: torch.Generator, **sample_kwargs):
        """K = group_size samples per prompt (consecutive), in chunks of rollout_batch_size, with no gradient."""
        import flowalign as fa
        from flowalign.sampling.sampler import Trajectory

        k = self.cfg.group_size
        chunk = max(1, self.cfg.rollout_batch_size // k)
        sample_kwargs = {"num_steps": self.cfg.num_steps, "guidance_scale": self.cfg.guidance_scale, **sample_kwargs}
        parts = []
        with self.unwrapped(), self.autocast():
            for i in range(0, len(prompts), chunk):
                parts.append(fa.sample(self.model, prompts[i:i + chunk], num_images_per_prompt=k, generator=gen,
                                       **self.size(), **sample_kwargs))
        return Trajectory.cat(parts)

    def size(self) -> dict:
        return {"height": self.cfg.height, "width": self.cfg.width, "num_frames": self.cfg.num_frames}

    @torch.no_grad()
    def score(self, traj) -> torch.Tensor:
        """The training reward of each sample (the reward's own checks name it on NaN or a wrong shape)."""
        return self.reward(traj.images, traj.prompts).float().cpu()

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate a per-process tensor over processes, in process order."""
        if self.accelerator.num_processes == 1:
            return t
        return self.accelerator.gather(t.to(self.accelerator.device)).cpu()

    def local_slice(self, full: torch.Tensor, n_local: int) -> torch.Tensor:
        i = self.accelerator.process_index
        return full[i * n_local:(i + 1) * n_local]

    def advantages(self, rewards: torch.Tensor, groups: torch.Tensor, epoch: int, global_std: bool, clip: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Advantages of this process's samples, standardised over every process's samples of each prompt group;
        returns ``(local advantages, all rewards)`` and, with save_rollout_stats, writes them to out/rollouts/."""
        from flowalign.functional.advantages import group_advantages

        all_rewards, all_groups = self.gather(rewards), self.gather(groups)
        adv = self.local_slice(group_advantages(all_rewards, all_groups, global_std=global_std, clip=clip),
                               len(rewards))
        if self.cfg.save_rollout_stats:
            path = self.out / "rollouts" / f"epoch-{epoch:04d}-rank{self.accelerator.process_index}.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"rewards": rewards, "groups": groups, "advantages": adv, "all_rewards": all_rewards,
                        "all_groups": all_groups}, path)
        return adv, all_rewards

    def backward(self, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss):
            raise FloatingPointError(f"The training loss is {loss.item()} at step {self.step}; lower the learning "
                                     f"rate or check the reward. The last checkpoint is untouched.")
        self.accelerator.backward(loss)

    def set_lr(self, epoch: int) -> None:
        """The learning rate of ``epoch`` under ``lr_schedule`` (a function of the epoch alone: resumes exactly)."""
        cfg = self.cfg
        lr = cfg.lr * lr_factor(cfg.lr_schedule, epoch, cfg.epochs, cfg.lr_warmup_epochs, cfg.lr_final)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def optimizer_step(self) -> float:
        """Clip, step, zero the gradients; returns the gradient norm before clipping."""
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item() if grads else 0.0
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return norm

    def autocast(self):
        return self.accelerator.autocast() if self.cfg.mixed_precision != "no" else contextlib.nullcontext()

    @contextlib.contextmanager
    def unwrapped(self):
        """Forward passes without the DDP wrapper (rollouts, references, evaluation: no gradient to sync)."""
        wrapped = getattr(self.model, "_denoiser", None)
        self.model.use_denoiser(None)
        try:
            yield
        finally:
            self.model.use_denoiser(wrapped)

    @contextlib.contextmanager
    def reference(self):
        """The reference (initial) policy: the LoRA adapter switched off, or the initial weights swapped in."""
        with self.unwrapped():
            if self._reference is not None:
                with self._reference.swapped_in():
                    yield
                return
            transformer = self.model.transformer
            transformer.disable_adapters()
            try:
                yield
            finally:
                transformer.enable_adapters()

    # ------------------------------------------------------------------ evaluation
    def _eval_prompt_set(self) -> tuple[list[str], list[str] | None, str | None]:
        """The held-out prompts, their categories and the embedded world they belong to (None: neither)."""
        from flowalign.evaluation import shapes_prompts
        from flowalign.trainers.data import load_prompts, world_of

        cfg = self.cfg
        if not cfg.eval_prompts:
            return [], None, None
        if cfg.eval_prompts in ("shapes-test", "shapes-train"):
            per = max(1, math.ceil(cfg.eval_num / 4))
            prompts, cats = shapes_prompts(cfg.eval_prompts.split("-")[1], per, seed=cfg.seed)
            return (prompts[:cfg.eval_num] if len(prompts) > cfg.eval_num else prompts, cats[:cfg.eval_num],
                    "shapes")
        if cfg.eval_prompts in ("shapes-video-test", "shapes-video-train"):
            from flowalign.zoo.shapes_video import VIDEO_CATEGORIES, eval_prompts

            per = max(1, math.ceil(cfg.eval_num / len(VIDEO_CATEGORIES)))
            specs = eval_prompts(cfg.eval_prompts.rsplit("-", 1)[1], per, seed=cfg.seed)[:cfg.eval_num]
            return [s.caption() for s in specs], [s.category for s in specs], "shapes-video"
        prompts = load_prompts(cfg.eval_prompts, cfg.eval_num)
        world, cats = world_of(prompts)
        return prompts, cats, world

    def eval_rewards(self) -> dict:
        if self._eval_rewards is None:
            import flowalign as fa

            names = list(self.cfg.eval_rewards) or default_eval_rewards(self.cfg.reward, self.eval_world,
                                                                        self.model.is_video)
            self._eval_rewards = {n: (self.reward if n == self.cfg.reward else fa.rewards.load(n).to(
                self.model.device)) for n in names}
        return self._eval_rewards

    @torch.no_grad()
    def evaluate(self) -> dict:
        """ODE samples of the held-out prompts (fixed seed; EMA weights when on), scored by every eval reward.
        Writes one grid of (the first 64) samples: ``samples/epoch-XXXX.png`` for images, the animated
        ``samples/epoch-XXXX.gif`` for video (tiled frame by frame); returns ``{"eval/<reward>[/<category>]":
        value}``."""
        import flowalign as fa

        if not self.eval_prompts:
            return {}
        gen = torch.Generator().manual_seed(self.cfg.seed + 12345)
        images = []
        with self.ema_weights(), self.unwrapped(), self.autocast():
            for i in range(0, len(self.eval_prompts), self.cfg.rollout_batch_size):
                traj = fa.sample(self.model, self.eval_prompts[i:i + self.cfg.rollout_batch_size],
                                 num_steps=self.cfg.eval_steps, generator=gen, **self.size(),
                                 guidance_scale=self.cfg.eval_guidance_scale if self.cfg.eval_guidance_scale
                                 is not None else self.cfg.guidance_scale)
                images.append(traj.images.float().cpu())
        images = torch.cat(images)
        out = {}
        for name, reward in self.eval_rewards().items():
            s = reward(images.to(self.model.device), self.eval_prompts).float().cpu()
            out[f"eval/{name}"] = s.mean().item()
            if self.eval_categories is not None:
                for c in sorted(set(self.eval_categories)):
                    m = torch.tensor([x == c for x in self.eval_categories])
                    out[f"eval/{name}/{c}"] = s[m].mean().item()
        self._save_eval_grid(images)
        return out

    def _save_eval_grid(self, images: torch.Tensor) -> None:
        """``samples/epoch-XXXX.png`` (images) or ``.gif`` (videos, frames tiled in sync); toy2d points: nothing."""
        from flowalign.io import grid, save_image, save_video, video_grid

        video = images.ndim == 5 and images.shape[2] in (1, 3)
        if not (video or (images.ndim == 4 and images.shape[1] in (1, 3))):
            return
        folder = self.out / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        if video:
            videos = _thumbnails(images[:64], EVAL_GIF_SIDE)
            frames = video_grid(videos, nrow=8)
            self.last_grid = frames[0]
            save_video(frames, folder / f"epoch-{self.epoch:04d}.gif", scale=max(1, 128 // videos.shape[-1]))
        else:
            self.last_grid = grid(images[:64], nrow=8)
            save_image(self.last_grid, folder / f"epoch-{self.epoch:04d}.png",
                       scale=max(1, 128 // images.shape[-1]))

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "config": _resume_key(self.cfg),
                "params": {n: p.detach().cpu().clone() for n, p in zip(self.param_names, self.params)},
                "optimizer": self.optimizer.state_dict(), "history": self.history,
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "reference": self._reference.state_dict() if self._reference is not None else None,
                "algorithm": self.algorithm.state_dict() if hasattr(self.algorithm, "state_dict") else {}}

    def load_state_dict(self, state: dict, where: Path) -> None:
        if state.get("config") != _resume_key(self.cfg):
            diff = sorted(k for k, v in _resume_key(self.cfg).items() if state.get("config", {}).get(k) != v)
            raise ConfigError(f"Cannot resume from {where}: it was trained with different settings ({', '.join(diff)})"
                              f". Resume with the same settings, or use another `out` (the checkpoint is kept).")
        names = state["params"].keys()
        if list(names) != self.param_names:
            raise ValueError(f"The checkpoint {where} holds other trainable parameters than this model has.")
        with torch.no_grad():
            for n, p in zip(self.param_names, self.params):
                p.copy_(state["params"][n])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        if self._reference is not None and state.get("reference") is not None:
            self._reference.load_state_dict(state["reference"])
        if hasattr(self.algorithm, "load_state_dict"):
            self.algorithm.load_state_dict(state["algorithm"])
        self.epoch, self.step, self.history = state["epoch"], state["step"], list(state["history"])

    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoints/epoch-XXXX`` atomically (a temporary folder renamed into place, then the
        ``latest`` pointer); on failure (a full disk) the previous checkpoint stays intact and usable."""
        self.accelerator.wait_for_everyone()
        if not self.is_main:
            return None
        root = self.out / CKPT_DIR
        root.mkdir(parents=True, exist_ok=True)
        name = f"epoch-{self.epoch:04d}"
        final, tmp = root / name, root / (name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir()
            torch.save(self.state_dict(), tmp / "state.pt")
            self._export(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _write_atomic(root / "latest", name)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            prev = latest_checkpoint(self.out)
            raise OSError(e.errno, f"Writing checkpoint {final} failed ({e}); the previous checkpoint "
                          f"{prev if prev else '(none)'} is intact. Free disk space and resume with "
                          f"resume=latest.") from e
        done = sorted(p for p in root.glob("epoch-*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in done[:-self.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def _export(self, folder: Path) -> None:
        """The trained weights in the diffusers format (EMA when on): ``lora/`` or ``transformer/``."""
        with self.ema_weights():
            if self.cfg.finetune == "lora":
                self.model.save_lora(folder / "lora")
            else:
                self.model.transformer.save_pretrained(folder / "transformer", safe_serialization=True)

    def export_student(self, folder: Path) -> Path:
        """A distilled student as a full pipeline in ``folder/student`` (EMA weights when on). The model's settings
        go with it (the student's step count, step rule and CFG, set by the algorithm), so loading the folder by
        path samples it as trained."""
        with self.ema_weights():
            return Path(self.model.save_pretrained(folder / "student"))

    def ema_weights(self):
        """The EMA weights swapped in, when an EMA is kept."""
        return self.ema.swapped_in() if self.ema is not None else contextlib.nullcontext()

    def resume(self) -> None:
        if not self.cfg.resume:
            return
        where = latest_checkpoint(self.out) if self.cfg.resume == "latest" else Path(self.cfg.resume)
        pointer = self.out / CKPT_DIR / "latest"
        if where is None and pointer.exists():
            raise FileNotFoundError(f"resume=latest: {pointer} names {pointer.read_text().strip()!r}, which holds no "
                                    f"state.pt. Point resume= at an intact checkpoint folder in {pointer.parent}.")
        if where is None:
            if self.is_main:
                print(f"resume=latest: no checkpoint in {self.out / CKPT_DIR}; starting from scratch.")
            return
        if not (where / "state.pt").exists():
            raise FileNotFoundError(f"resume={self.cfg.resume!r}: {where} holds no state.pt.")
        self.load_state_dict(torch.load(where / "state.pt", map_location="cpu", weights_only=False), where)
        if self.is_main:
            print(f"Resumed from {where} (epoch {self.epoch}, step {self.step}).")

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict:
        from flowalign.trainers.tracking import Tracker

        cfg = self.cfg
        self.resume()
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
        tracker = Tracker(self.out, cfg.log_with, enabled=self.is_main, config=dataclasses.asdict(cfg))
        tracker.rewrite(self.history)  # a resumed run's metrics.jsonl holds exactly the checkpoint's history
        if self.epoch == 0 and self.is_main and self.eval_prompts:
            self._log(tracker, {"epoch": 0, "step": 0, **self.evaluate()})
        bar = tqdm(range(self.epoch, cfg.epochs), initial=self.epoch, total=cfg.epochs, desc=f"{cfg.task}",
                   disable=not (cfg.progress and self.is_main))
        t_start = time.perf_counter()
        for epoch in bar:
            t0 = time.perf_counter()
            self.set_lr(epoch)
            shared, local = self.generators(epoch)
            metrics = self.algorithm.epoch(self, epoch, shared, local)
            if self.ema is not None:
                self.ema.update(cfg.ema_decay)
            self.epoch = epoch + 1
            record = {"epoch": self.epoch, "step": self.step, "train/lr": self.optimizer.param_groups[0]["lr"],
                      **{k: _num(v) for k, v in metrics.items()},
                      "time/epoch_s": time.perf_counter() - t0, "time/total_s": time.perf_counter() - t_start}
            last = self.epoch == cfg.epochs
            if self.is_main and self.eval_prompts and (last or (cfg.eval_every and self.epoch % cfg.eval_every == 0)):
                record.update(self.evaluate())
            self._log(tracker, record)
            bar.set_postfix({k.split("/")[-1]: f"{v:.3f}" for k, v in record.items() if k in (
                "reward/mean", f"eval/{cfg.reward}")})
            if last or (cfg.save_every and self.epoch % cfg.save_every == 0):
                self.save_checkpoint()
        tracker.close()
        summary = {}
        if self.is_main:
            self._export(self.out)
            if hasattr(self.algorithm, "export"):  # e.g. a distilled student saved as a pipeline
                self.algorithm.export(self, self.out)
            from flowalign.trainers.report import write_report

            summary = write_report(self.out, self.history, cfg)
        self.accelerator.wait_for_everyone()
        return summary

    def _log(self, tracker, record: dict) -> None:
        self.history.append(record)
        tracker.log(record, step=record["step"])
        if any(k.startswith("eval/") for k in record):
            tracker.log_image("eval/samples", self.last_grid, step=record["step"])


#: longer side (pixels) of each video in an evaluation's GIF grid; larger videos are downscaled (area) for it
EVAL_GIF_SIDE = 256


def _thumbnails(videos: torch.Tensor, side: int) -> torch.Tensor:
    """(B, F, C, H, W) videos downscaled (area) so that the longer side is at most ``side``."""
    h, w = videos.shape[-2:]
    if max(h, w) <= side:
        return videos
    size = (max(1, round(h * side / max(h, w))), max(1, round(w * side / max(h, w))))
    small = torch.nn.functional.interpolate(videos.flatten(0, 1).float(), size=size, mode="area")
    return small.unflatten(0, videos.shape[:2])


def default_eval_rewards(reward: str, world: str | None, is_video: bool) -> list[str]:
    """The rewards an evaluation reports when ``eval_rewards`` is empty: the training ``reward``, plus the
    embedded world's judges when every held-out prompt is a caption of that world (``world``, from
    :func:`flowalign.trainers.data.world_of`) and the model makes that world's kind of sample. Image models on
    shapes captions: ``shapes-geneval`` and ``shapes-clip``; video models on moving-shapes captions:
    ``shapes-video`` and ``shapes-video-motion`` (the tracked motion). Any other pairing (a video model on image
    captions) adds nothing: the image verifier would judge each frame as a still."""
    if world == "shapes" and not is_video:
        extra = ["shapes-geneval", "shapes-clip"]
    elif world == "shapes-video" and is_video:
        extra = ["shapes-video", "shapes-video-motion"]
    else:
        extra = []
    return [reward] + [n for n in extra if n != reward]


def mean(values: list[float]) -> float:
    return sum(values) / max(1, len(values))


def epoch_metrics(all_rewards: torch.Tensor, t_rollout: float, t_train: float, **train: float) -> dict:
    """The record every algorithm's epoch returns: rollout reward, phase times, throughput, ``train/<name>``."""
    n = len(all_rewards)
    return {"reward/mean": all_rewards.mean().item(), "reward/std": all_rewards.std().item(),
            "time/rollout_s": t_rollout, "time/train_s": t_train,
            "throughput/rollout_samples_per_s": n / max(t_rollout, 1e-9),
            "throughput/train_samples_per_s": n / max(t_train, 1e-9), **{f"train/{k}": v for k, v in train.items()}}


def _num(v: Any) -> float:
    return v.item() if torch.is_tensor(v) else float(v)


def run_task(cfg: TrainConfig, algorithm, model=None, reward=None) -> dict:
    """Build a :class:`Run` and train; returns the report's summary (first and last evaluation)."""
    return Run(cfg, algorithm, model=model, reward=reward).train()
