"""Where a run's numbers go: ``metrics.jsonl`` always, plus TensorBoard (default) or Weights & Biases."""

from __future__ import annotations

import json
import warnings
from pathlib import Path


class Tracker:
    """Log scalar records ``{"epoch", "step", name: value}``; only the main process writes."""

    def __init__(self, out: str | Path, backend: str = "tensorboard", enabled: bool = True, config: dict | None = None):
        self.out, self.enabled, self.backend = Path(out), enabled, backend
        self.writer = self.wandb = None
        if not enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        if backend == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.out / "tensorboard"))
            except ImportError:
                warnings.warn("TensorBoard is not installed (`pip install tensorboard`); logging to metrics.jsonl "
                              "only.", stacklevel=2)
        elif backend == "wandb":
            try:
                import wandb
            except ImportError:
                raise ImportError("log_with=wandb needs Weights & Biases: pip install 'flowalign[wandb]'.") from None
            self.wandb = wandb.init(project="flowalign", dir=str(self.out), config=config, resume="allow")

    def rewrite(self, history: list[dict]) -> None:
        """Make metrics.jsonl hold exactly ``history`` (a resumed run drops what a killed run wrote after its
        last checkpoint)."""
        if not self.enabled:
            return
        path = self.out / "metrics.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in history))
        tmp.replace(path)

    def log(self, record: dict, step: int) -> None:
        if not self.enabled:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items() if k not in ("epoch", "step") and isinstance(v, (int, float))}
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def log_image(self, tag: str, image, step: int) -> None:
        """A sample grid ``(C, H, W)`` in [0, 1] (TensorBoard image / W&B image)."""
        if not self.enabled or image is None:
            return
        if self.writer is not None:
            self.writer.add_image(tag, image.clamp(0, 1), step)
            self.writer.flush()
        if self.wandb is not None:
            import wandb

            self.wandb.log({tag: wandb.Image(image.clamp(0, 1).permute(1, 2, 0).numpy())}, step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
