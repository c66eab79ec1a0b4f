"""Pure maths on video clips (fp32, any leading dims): grey, blur, frame motion, temporal flicker measures and
per-frame score aggregation. Used by :mod:`flowalign.rewards.video`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: ITU-R BT.601 luma weights: grey = 0.299 R + 0.587 G + 0.114 B
LUMA = (0.299, 0.587, 0.114)
AGGREGATES = ("mean", "min", "first", "last")


def to_grey(frames: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) RGB -> (..., 1, H, W) luma."""
    w = torch.tensor(LUMA, dtype=frames.dtype, device=frames.device).view(3, 1, 1)
    return (frames * w).sum(-3, keepdim=True)


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, C, H, W) with std ``sigma`` pixels (radius ceil(3 sigma), reflect padding,
    clamped to what the image allows); ``sigma <= 0`` returns the input."""
    if sigma <= 0:
        return images
    h, w = images.shape[-2:]
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = images.shape[1]
    ry, rx = min(radius, h - 1), min(radius, w - 1)  # reflect padding needs pad < size
    ky, kx = k[radius - ry:radius + ry + 1], k[radius - rx:radius + rx + 1]
    x = F.pad(images, (0, 0, ry, ry), mode="reflect") if ry > 0 else images
    x = F.conv2d(x, (ky / ky.sum()).view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    x = F.pad(x, (rx, rx, 0, 0), mode="reflect") if rx > 0 else x
    return F.conv2d(x, (kx / kx.sum()).view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)


def shrink(images: torch.Tensor, size: int | None) -> torch.Tensor:
    """(N, C, H, W) downsampled (antialiased bilinear) so the longer side is at most ``size``; None: unchanged."""
    h, w = images.shape[-2:]
    if size is None or max(h, w) <= size:
        return images
    s = size / max(h, w)
    return F.interpolate(images, size=(max(1, round(h * s)), max(1, round(w * s))), mode="bilinear",
                         align_corners=False, antialias=True)


def prepare_frames(video: torch.Tensor, grey: bool, size: int | None, blur: float) -> torch.Tensor:
    """(B, F, 3, H, W) in [0, 1] -> (B, F, C', H', W') fp32: optionally grey, downsampled, then blurred."""
    b, f = video.shape[:2]
    x = video.float().flatten(0, 1)
    x = to_grey(x) if grey else x
    x = gaussian_blur(shrink(x, size), blur)
    return x.view(b, f, *x.shape[1:])


def soft_abs(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Charbonnier ``sqrt(x^2 + eps^2) - eps``: |x| for |x| >> eps, 0 at 0, smooth (a gradient everywhere)."""
    return torch.sqrt(x * x + eps * eps) - eps


def frame_motion(frames: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """(B, F, ...) -> (B,): mean over the F-1 consecutive pairs of the mean ``soft_abs(x[t+1] - x[t])``."""
    return soft_abs(frames[:, 1:] - frames[:, :-1], eps).flatten(1).mean(1)


def second_difference(x: torch.Tensor) -> torch.Tensor:
    """(B, F, ...) -> (B, F-2, ...): ``x[t+1] - 2 x[t] + x[t-1]``, zero wherever x changes linearly in time."""
    return x[:, 2:] - 2 * x[:, 1:-1] + x[:, :-2]


def temporal_reversal(x: torch.Tensor) -> torch.Tensor:
    """(B, F, ...) -> (B, F-2, ...): ``|d0| + |d1| - |d0 + d1|`` with ``d0 = x[t] - x[t-1]``,
    ``d1 = x[t+1] - x[t]``; equals ``2 min(|d0|, |d1|)`` where the change reverses sign, else 0 (never < 0)."""
    d = x[:, 1:] - x[:, :-1]
    d0, d1 = d[:, :-1], d[:, 1:]
    return d0.abs() + d1.abs() - (d0 + d1).abs()


def frame_indices(num_frames: int, every: int) -> list[int]:
    """Frames ``0, every, 2 every, ...`` and always the last one."""
    idx = list(range(0, num_frames, every))
    return idx if idx[-1] == num_frames - 1 else idx + [num_frames - 1]


def aggregate_frames(scores: torch.Tensor, how: str) -> torch.Tensor:
    """(B, F) per-frame scores -> (B,) by ``how`` in :data:`AGGREGATES`."""
    if how == "mean":
        return scores.mean(1)
    if how == "min":
        return scores.amin(1)
    return scores[:, 0] if how == "first" else scores[:, -1]
