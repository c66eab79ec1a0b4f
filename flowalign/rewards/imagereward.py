"""ImageReward (Xu et al. 2023, "ImageReward: Learning and Evaluating Human Preferences for Text-to-Image
Generation"): a BLIP image-text encoder with an MLP head trained on expert preference rankings.

Wraps the optional ``image-reward`` package (``pip install 'flowalign[image-reward]'``) and scores through its
``score_gard`` path — the one ReFL trains with — so the reward is differentiable in the pixels.
"""

from __future__ import annotations

import torch

from flowalign.rewards.base import Reward, register
from flowalign.rewards.preprocess import CLIP_MEAN, CLIP_STD, resize_and_normalize
from flowalign.utils import require


@register("imagereward")
class ImageReward(Reward):
    """ImageReward, standardised as in the package (about zero-mean, unit-std over its eval set).

    Args:
        model: a built ``ImageReward.ImageReward`` model; otherwise ``ImageReward.load(name_or_path)``.
        name_or_path: a released model name (``"ImageReward-v1.0"``) or a local checkpoint path.
        device: where ``ImageReward.load`` puts the model (move it later with ``.to``).
        download_root, med_config: passed to ``ImageReward.load``.
    """

    def __init__(self, model=None, name_or_path: str = "ImageReward-v1.0", device: str = "cpu",
                 download_root: str | None = None, med_config: str | None = None):
        super().__init__()
        if model is None:
            rm = require("ImageReward", "image-reward")
            extra = {"med_config": med_config} if med_config else {}  # image-reward < 1.3 lacks the argument
            model = rm.load(name_or_path, device=device, download_root=download_root, **extra)
        self.model = model.eval().requires_grad_(False)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        p = next(self.model.parameters())
        # the package preprocesses with CLIP's bicubic 224 resize + centre crop + OpenAI statistics
        x = resize_and_normalize(images, 224, CLIP_MEAN, CLIP_STD).to(device=p.device, dtype=p.dtype)
        tok = self.model.blip.tokenizer(prompts, padding="max_length", truncation=True, max_length=35,
                                        return_tensors="pt")
        # score_gard builds its attention mask on model.device, a plain attribute that .to() does not update
        self.model.device = p.device
        out = self.model.score_gard(tok.input_ids.to(p.device), tok.attention_mask.to(p.device), x)
        return out.reshape(-1)
