"""Writing samples to disk: PNGs, image grids, GIF/MP4 videos and animated video grids."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def to_uint8(images: torch.Tensor):
    """(..., C, H, W) in [0, 1] -> numpy uint8 (..., H, W, C)."""
    x = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return x.movedim(-3, -1).cpu().numpy()


def _default_nrow(b: int) -> int:
    """One row up to 4 pictures, else about square."""
    return b if b <= 4 else int(b**0.5 + 0.999)


def grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> torch.Tensor:
    """Tile (B, C, H, W) images into one (C, H', W') picture, ``nrow`` per row."""
    from torchvision.utils import make_grid

    if nrow is None:
        nrow = _default_nrow(images.shape[0])
    return make_grid(images.detach().float().cpu(), nrow=nrow, padding=pad, pad_value=1.0)


def video_grid(videos: torch.Tensor, nrow: int | None = None, pad: int = 2) -> torch.Tensor:
    """Tile (B, F, C, H, W) videos frame by frame into one (F, C, H', W') video, ``nrow`` per row.

    Frame ``t`` of the result is :func:`grid` of frame ``t`` of every video, so the tiles play in sync.
    """
    if not torch.is_tensor(videos) or videos.ndim != 5:
        shape = tuple(videos.shape) if torch.is_tensor(videos) else type(videos).__name__
        raise ValueError(f"video_grid: videos must be a (B, F, C, H, W) tensor, got {shape}; tile images with grid.")
    if videos.shape[0] == 0 or videos.shape[1] == 0:
        raise ValueError(f"video_grid: videos must hold at least one video of one frame, got shape "
                         f"{tuple(videos.shape)}.")
    if nrow is None:
        nrow = _default_nrow(videos.shape[0])
    return torch.stack([grid(videos[:, t], nrow=nrow, pad=pad) for t in range(videos.shape[1])])


def save_image(image: torch.Tensor, path: str | os.PathLike, scale: int = 1) -> str:
    """Save one (C, H, W) image in [0, 1] as PNG, optionally upscaled (nearest) for small images."""
    from PIL import Image

    img = Image.fromarray(to_uint8(image))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return str(path)


def save_video(frames: torch.Tensor, path: str | os.PathLike, fps: int = 8, scale: int = 1) -> str:
    """Save (F, C, H, W) frames as GIF (Pillow) or MP4 (needs the ``video`` extra), optionally upscaled
    (nearest) for small videos."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if scale > 1:
        frames = frames.detach().float().repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    arr = to_uint8(frames)
    if path.suffix == ".mp4":
        from flowalign.utils import require

        imageio = require("imageio", "video")
        imageio.mimwrite(path, list(arr), fps=fps)
    else:
        pil = [Image.fromarray(f) for f in arr]
        pil[0].save(path, save_all=True, append_images=pil[1:], duration=int(1000 / fps), loop=0)
    return str(path)


def save_samples(images: torch.Tensor, out: str | os.PathLike, prefix: str = "sample", video_format: str = "gif",
                 scale: int = 1) -> list[str]:
    """Save a batch: PNG per image or GIF/MP4 per video, plus ``grid.png`` (first frames for video) and, for video,
    the animated ``grid.gif`` (:func:`video_grid`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    video = images.ndim == 5
    for i, item in enumerate(images):
        if video:
            paths.append(save_video(item, out / f"{prefix}_{i:03d}.{video_format}", scale=scale))
        else:
            paths.append(save_image(item, out / f"{prefix}_{i:03d}.png", scale=scale))
    firsts = images[:, 0] if video else images
    save_image(grid(firsts), out / "grid.png", scale=scale)
    if video:
        save_video(video_grid(images), out / "grid.gif", scale=scale)
    return paths
