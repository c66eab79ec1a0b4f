"""JPEG (in)compressibility, the rule-based rewards of DDPO (Black et al. 2023, "Training Diffusion Models
with Reinforcement Learning"): the size in kB of each image saved as JPEG at quality 95. Not differentiable.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from flowalign.rewards.base import Reward, register


def jpeg_size_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """Size in kB (1000 bytes, as DDPO) of each (N, 3, H, W) image in [0, 1] encoded as JPEG."""
    u8 = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8)
    u8 = u8.permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for img in u8:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(img)).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


class _JpegSize(Reward):
    differentiable = False
    uses_prompts = False
    sign = 1.0

    def __init__(self, quality: int = 95):
        super().__init__()
        self.quality = quality

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.sign * jpeg_size_kb(images, self.quality)


@register("jpeg-compressibility")
class JpegCompressibility(_JpegSize):
    """``-size_kb``: rewards images that compress well (flat, smooth)."""

    sign = -1.0


@register("jpeg-incompressibility")
class JpegIncompressibility(_JpegSize):
    """``+size_kb``: rewards images that compress badly (detailed, noisy)."""

    sign = 1.0
