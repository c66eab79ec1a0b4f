"""Differentiable image preprocessing for reward models: crop/pad, resize, normalise with tensor ops only.

Reward gradients flow back to the generator's pixels, so nothing here goes through PIL or uint8: resizing is
``F.interpolate`` with antialiasing (which approximates PIL's bicubic resize when downsampling) and the
channel statistics are applied as tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

#: the OpenAI CLIP channel statistics (Radford et al. 2021), shared by most CLIP-based rewards
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _as_hw(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = (int(s) for s in size)
    return h, w


def center_crop_to_aspect(images: torch.Tensor, aspect: float) -> torch.Tensor:
    """Crop (B, C, H, W) around the centre to the largest window with width / height == ``aspect``."""
    h, w = images.shape[-2:]
    if abs(w / h - aspect) < 1e-6:
        return images
    if w / h > aspect:  # too wide: trim the sides
        new_w = max(1, round(h * aspect))
        left = (w - new_w) // 2
        return images[..., :, left:left + new_w]
    new_h = max(1, round(w / aspect))
    top = (h - new_h) // 2
    return images[..., top:top + new_h, :]


def pad_to_aspect(images: torch.Tensor, aspect: float, value: float = 0.0) -> torch.Tensor:
    """Pad (B, C, H, W) symmetrically with ``value`` until width / height == ``aspect`` (a letterbox)."""
    h, w = images.shape[-2:]
    if abs(w / h - aspect) < 1e-6:
        return images
    if w / h > aspect:  # too wide: pad top and bottom
        extra = round(w / aspect) - h
        return F.pad(images, (0, 0, extra // 2, extra - extra // 2), value=value)
    extra = round(h * aspect) - w
    return F.pad(images, (extra // 2, extra - extra // 2, 0, 0), value=value)


def resize(images: torch.Tensor, size: int | Sequence[int], mode: str = "bicubic",
           fit: str = "crop") -> torch.Tensor:
    """Resize (B, C, H, W) to ``size`` keeping the aspect ratio by centre-cropping (``fit="crop"``, what CLIP
    processors do) or by zero-padding the short side (``fit="pad"``, HPSv2's letterbox)."""
    th, tw = _as_hw(size)
    if fit == "crop":
        images = center_crop_to_aspect(images, tw / th)
    elif fit == "pad":
        images = pad_to_aspect(images, tw / th)
    else:
        raise ValueError(f"fit must be 'crop' or 'pad', got {fit!r}.")
    if tuple(images.shape[-2:]) == (th, tw):
        return images
    # without antialias, a large downsample samples a few pixels (aliasing) where PIL and CLIP's processors
    # average them; torch implements it for bilinear and bicubic only
    antialias = mode in ("bilinear", "bicubic")
    return F.interpolate(images, size=(th, tw), mode=mode, align_corners=False if antialias else None,
                         antialias=antialias)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(images - mean) / std`` per channel on (B, C, H, W)."""
    mean_t = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


def resize_and_normalize(images: torch.Tensor, size: int | Sequence[int], mean: Sequence[float] = CLIP_MEAN,
                         std: Sequence[float] = CLIP_STD, mode: str = "bicubic",
                         fit: str = "crop") -> torch.Tensor:
    """Pixels in [0, 1] (B, C, H, W) at any resolution -> a model input of ``size``, differentiably.

    Computes in at least float32 (bf16 resizes are visibly lossy); float64 stays float64 so that
    ``torch.autograd.gradcheck`` can check it. Values are not clamped, so gradients survive at 0 and 1.
    """
    if images.ndim != 4:
        raise ValueError(f"resize_and_normalize expects (B, C, H, W), got shape {tuple(images.shape)}.")
    images = images.to(torch.promote_types(images.dtype, torch.float32))
    return normalize(resize(images, size, mode=mode, fit=fit), mean, std)
