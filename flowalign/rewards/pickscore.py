"""PickScore (Kirstain et al. 2023, "Pick-a-Pic: An Open Dataset of User Preferences for Text-to-Image
Generation"): a CLIP-H fine-tuned on human preferences, scored as ``logit_scale * cos(image, text)``."""

from __future__ import annotations

import torch

from flowalign.rewards.base import register
from flowalign.rewards.clip import CLIPScore

MODEL_ID = "yuvalkirstain/PickScore_v1"
PROCESSOR_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


@register("pickscore")
class PickScore(CLIPScore):
    """PickScore: a transformers ``CLIPModel``; typical scores lie around 17-24.

    Args:
        model, tokenizer: an already-built ``CLIPModel`` and its tokenizer (then nothing is downloaded).
        path: the PickScore checkpoint, local dir or hub id (default ``yuvalkirstain/PickScore_v1``).
        processor_path: image processor + tokenizer (default the LAION CLIP-ViT-H-14 ones PickScore uses;
            read only when the model is loaded from ``path`` or when passed explicitly).
        normalize: divide by 26 as Flow-GRPO does, to put the reward roughly in [0, 1]. Off by default so the
            numbers match the paper's.
    """

    def __init__(self, model=None, tokenizer=None, path: str = MODEL_ID, processor_path: str | None = None,
                 normalize: bool = False):
        if model is None and processor_path is None:
            processor_path = PROCESSOR_ID
        super().__init__(model=model, tokenizer=tokenizer, path=None if model is not None else path,
                         processor_path=processor_path, scale="logit")
        self.normalize = normalize

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        s = super().score(images, prompts)
        return s / 26.0 if self.normalize else s
