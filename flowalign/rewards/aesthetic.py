"""LAION aesthetic predictor v2 (Schuhmann, "improved-aesthetic-predictor", 2022): an MLP on normalised CLIP
ViT-L/14 image embeddings, trained on SAC + LAION-Logos + AVA ratings (1-10). DDPO (Black et al. 2023) uses it
as its aesthetic reward. Prompts are ignored."""

from __future__ import annotations

import torch
from torch import nn

from flowalign.rewards.base import Reward, register
from flowalign.rewards.clip import ClipBackbone, load_state_dict_file


class AestheticMLP(nn.Module):
    """The improved-aesthetic-predictor head: 768-1024-128-64-16-1, linear (no activations), with dropout.

    Keys match the released ``sac+logos+ava1-l14-linearMSE.pth`` (``layers.0`` ... ``layers.7``).
    """

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    @classmethod
    def from_file(cls, path: str) -> AestheticMLP:
        sd = load_state_dict_file(path)
        if "layers.0.weight" not in sd:
            raise ValueError(f"{path!r} is not an aesthetic-predictor head: expected keys layers.0 ... "
                             f"layers.7, got {sorted(sd)[:6]}.")
        head = cls(input_size=sd["layers.0.weight"].shape[1])
        head.load_state_dict(sd)
        return head


@register("aesthetic")
class LaionAesthetic(Reward):
    """Predicted aesthetic rating (about 1-10; SD samples score ~5-6).

    Args:
        model: a built CLIP (transformers ``CLIPModel`` or open_clip) whose image embedding the head expects.
        path: transformers CLIP to load if ``model`` is None (default ``openai/clip-vit-large-patch14``).
        head: a built ``AestheticMLP``; or ``head_path``: its state dict (.pth or .safetensors), e.g.
            ``sac+logos+ava1-l14-linearMSE.pth`` from the improved-aesthetic-predictor GitHub repository.
    """

    uses_prompts = False

    def __init__(self, model=None, head: nn.Module | None = None, head_path: str | None = None,
                 path: str = "openai/clip-vit-large-patch14"):
        super().__init__()
        if head is None and head_path is None:
            raise ValueError("The aesthetic reward needs its MLP head: pass head_path= (e.g. the "
                             "improved-aesthetic-predictor's sac+logos+ava1-l14-linearMSE.pth) or head=.")
        path = None if model is not None else path
        self.backbone = ClipBackbone.build(model=model, path=path, need_text=False)
        head = head if head is not None else AestheticMLP.from_file(head_path)
        self.head = head.eval().requires_grad_(False)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        emb = self.backbone.embed_images(images)
        p = next(self.head.parameters())
        return self.head(emb.to(device=p.device, dtype=p.dtype)).reshape(-1)
