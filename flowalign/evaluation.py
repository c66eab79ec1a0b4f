"""Evaluate a model on prompts with a reward: per-category scores and a sample grid.

Used by ``flowalign eval`` and by trainers' periodic evaluation. On the shapes world the prompts are the
held-out compositions of the test split and the reward is the exact verifier, so the numbers are accuracies.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import torch
from tqdm.auto import tqdm


def shapes_prompts(split: str = "test", per_category: int = 25, seed: int = 0) -> tuple[list[str], list[str]]:
    """Balanced prompts of the shapes world and their categories."""
    from flowalign.zoo import shapes_data

    specs = shapes_data.eval_prompts(split, per_category, seed)
    return [s.caption() for s in specs], [s.category for s in specs]


def shapes_video_prompts(split: str = "test", per_category: int = 25, seed: int = 0) -> tuple[list[str], list[str]]:
    """Balanced prompts of the moving-shapes video world and their categories."""
    from flowalign.zoo import shapes_video

    specs = shapes_video.eval_prompts(split, per_category, seed)
    return [s.caption() for s in specs], [s.category for s in specs]


@torch.no_grad()
def evaluate(model, reward, prompts: list[str], categories: list[str] | None = None, num_steps: int | None = None,
             sampler: str | None = None, guidance_scale: float | None = None, seed: int = 0, batch_size: int = 32,
             progress: bool = True, return_images: bool = False, **sample_kwargs) -> dict:
    """Sample every prompt once (fixed seeds) and score it; returns overall and per-category mean scores."""
    import flowalign as fa

    model = fa.load_model(model)
    categories = categories or ["all"] * len(prompts)
    scores, images = [], []
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for i in tqdm(range(0, len(prompts), batch_size), disable=not progress, desc="eval", leave=False):
        batch = prompts[i:i + batch_size]
        traj = fa.sample(model, batch, num_steps=num_steps, sampler=sampler, guidance_scale=guidance_scale,
                         generator=gen, **sample_kwargs)
        scores.append(reward(traj.images, batch).float().cpu())
        images.append(traj.images.cpu())
    scores_t = torch.cat(scores)
    per_cat: dict[str, list[float]] = defaultdict(list)
    for c, s in zip(categories, scores_t.tolist()):
        per_cat[c].append(s)
    out = {"overall": scores_t.mean().item(), **{c: sum(v) / len(v) for c, v in per_cat.items()},
           "n": len(prompts), "seconds": time.perf_counter() - t0}
    if return_images:
        out["images"] = torch.cat(images)
        out["scores"] = scores_t
    return out


def write_report(result: dict, prompts: list[str], out: str | Path, title: str = "") -> Path:
    """Save the sample grid (first 64; for video the animated ``grid.gif`` and its first frame as ``grid.png``) and
    the numbers as JSON."""
    from flowalign.io import grid, save_image, save_video, video_grid

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    imgs = result.get("images")
    if imgs is not None and imgs.ndim == 5:
        frames = video_grid(imgs[:64], nrow=8)
        save_video(frames, out / "grid.gif", scale=3)
        save_image(frames[0], out / "grid.png", scale=3)
    elif imgs is not None:
        save_image(grid(imgs[:64], nrow=8), out / "grid.png", scale=3)
    record = {k: v for k, v in result.items() if k not in ("images", "scores")}
    record["title"] = title
    if "scores" in result:
        record["samples"] = [{"prompt": p, "score": s} for p, s in zip(prompts, result["scores"].tolist())]
    (out / "eval.json").write_text(json.dumps(record, indent=2))
    return out


def format_table(result: dict) -> str:
    keys = [k for k in result if k not in ("images", "scores", "n", "seconds")]
    width = max(len(k) for k in keys)
    return "\n".join(f"{k:<{width}}  {result[k]:.3f}" for k in keys)
