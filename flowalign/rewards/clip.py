"""CLIP score (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision";
as a metric: Hessel et al. 2021, "CLIPScore") and the CLIP backbone shared by the CLIP-based rewards.

``ClipBackbone`` gives one interface over a transformers ``CLIPModel`` and an open_clip model: normalised
image embeddings that are differentiable in the pixels, and normalised text embeddings.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from flowalign.rewards.base import Reward, register
from flowalign.rewards.preprocess import CLIP_MEAN, CLIP_STD, resize_and_normalize

_TEXT_CACHE_MAX = 4096


def load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors or torch file, unwrapping ``{"state_dict": ...}`` and DDP prefixes."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _hw(size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    if isinstance(size, (tuple, list)):
        return int(size[0]), int(size[1])
    h = getattr(size, "height", None) if not isinstance(size, dict) else size.get("height")
    w = getattr(size, "width", None) if not isinstance(size, dict) else size.get("width")
    return int(h), int(w)


def _hf_preprocess(model, processor_path):
    """Input size and channel statistics of a transformers CLIP (from its image processor if it has one)."""
    size, mean, std = _hw(model.config.vision_config.image_size), CLIP_MEAN, CLIP_STD
    if processor_path is None:
        return size, mean, std
    from transformers import CLIPImageProcessor

    try:
        proc = CLIPImageProcessor.from_pretrained(processor_path)
    except OSError:
        # a bare CLIPModel dir has no preprocessor_config.json; CLIPs are trained with OpenAI's statistics
        warnings.warn(f"No image processor config at {processor_path!r}; using the model's image size "
                      f"{size} and the OpenAI CLIP mean/std.", stacklevel=3)
        return size, mean, std
    return _hw(proc.crop_size), tuple(proc.image_mean), tuple(proc.image_std)


class ClipBackbone(nn.Module):
    """A frozen CLIP (transformers or open_clip) that embeds pixels in [0, 1] and prompts.

    Text embeddings are cached per prompt (the text tower is frozen and the same prompts recur at every
    guidance step and every video frame); the cache is dropped when the module moves device or dtype.
    """

    def __init__(self, model: nn.Module, tokenizer=None, *, size, mean=CLIP_MEAN, std=CLIP_STD,
                 fit: str = "crop", max_length: int = 77):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.is_hf = hasattr(model, "get_image_features")
        self.size, self.mean, self.std, self.fit = _hw(size), tuple(mean), tuple(std), fit
        self.max_length = max_length
        self._text_cache: dict[str, torch.Tensor] = {}

    @classmethod
    def build(cls, model=None, tokenizer=None, path=None, processor_path=None, arch=None, pretrained=None,
              need_text: bool = True, fit: str = "crop") -> ClipBackbone:
        """From a built model, a transformers CLIP ``path`` (local dir or hub id) or an open_clip ``arch``."""
        if model is None and arch is not None:
            import open_clip

            model = open_clip.create_model(arch, pretrained=pretrained)
        elif model is None and path is not None:
            from transformers import CLIPModel

            model = CLIPModel.from_pretrained(path)
            processor_path = processor_path or path
        elif model is None:
            raise ValueError("Pass model= (a transformers CLIPModel or an open_clip model), path= (a "
                             "local dir or hub id of a transformers CLIP) or arch= (open_clip architecture).")
        if hasattr(model, "get_image_features"):
            size, mean, std = _hf_preprocess(model, processor_path)
            if tokenizer is None and need_text:
                if processor_path is None:
                    raise ValueError("A transformers CLIPModel needs tokenizer= (e.g. a CLIPTokenizer).")
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(processor_path)
            max_length = model.config.text_config.max_position_embeddings
        elif hasattr(model, "encode_image"):
            import open_clip

            cfg = open_clip.model.get_model_preprocess_cfg(model)
            size, mean, std = cfg.get("size", 224), cfg.get("mean") or CLIP_MEAN, cfg.get("std") or CLIP_STD
            max_length = getattr(model, "context_length", 77)
            if tokenizer is None and need_text:
                tokenizer = (open_clip.get_tokenizer(arch) if arch
                             else open_clip.tokenizer.SimpleTokenizer(context_length=max_length))
        else:
            raise TypeError(f"Expected a transformers or open_clip CLIP model, got {type(model).__name__}.")
        return cls(model, tokenizer, size=size, mean=mean, std=std, fit=fit, max_length=max_length)

    def _apply(self, fn, *args, **kwargs):
        self._text_cache = {}
        return super()._apply(fn, *args, **kwargs)

    @property
    def _param(self) -> torch.Tensor:
        return next(self.model.parameters())

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.detach().exp().float()

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) pixels in [0, 1] at any size -> (N, D) unit-norm float32, differentiable."""
        x = resize_and_normalize(images, self.size, self.mean, self.std, fit=self.fit)
        x = x.to(device=self._param.device, dtype=self._param.dtype)
        feats = self.model.get_image_features(pixel_values=x) if self.is_hf else self.model.encode_image(x)
        feats = getattr(feats, "pooler_output", feats)  # transformers >= 5 returns a ModelOutput
        return F.normalize(feats.float(), dim=-1)

    @torch.no_grad()
    def _encode_text(self, prompts: list[str]) -> torch.Tensor:
        dev = self._param.device
        if self.is_hf:
            length = min(self.max_length, getattr(self.tokenizer, "model_max_length", self.max_length))
            tok = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=length,
                                 return_tensors="pt")
            feats = self.model.get_text_features(input_ids=tok["input_ids"].to(dev),
                                                 attention_mask=tok["attention_mask"].to(dev))
            feats = getattr(feats, "pooler_output", feats)
        else:
            feats = self.model.encode_text(self.tokenizer(prompts).to(dev))
        return F.normalize(feats.float(), dim=-1)

    def embed_texts(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> (N, D) unit-norm float32 (no gradient)."""
        if self.tokenizer is None:
            raise ValueError("This CLIP backbone has no tokenizer; build it with tokenizer= to embed text.")
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if missing:
            if len(self._text_cache) + len(missing) > _TEXT_CACHE_MAX:
                self._text_cache = {}
            self._text_cache.update(zip(missing, self._encode_text(missing)))
        return torch.stack([self._text_cache[p] for p in prompts])


@register("clip")
class CLIPScore(Reward):
    """``scale * cos(image_emb, text_emb)`` with any CLIP.

    Args:
        model, tokenizer: a built transformers ``CLIPModel`` (+ its tokenizer) or open_clip model (+ its
            tokenizer; default open_clip's bundled BPE tokenizer).
        path: transformers CLIP to load (local dir or hub id); default ``openai/clip-vit-large-patch14``.
        processor_path: where to read the image size/mean/std and tokenizer from, if not ``path``.
        arch, pretrained: an open_clip architecture and pretrained tag/file, e.g. ``"ViT-H-14"``.
        scale: a float, or ``"logit"`` for the model's learned logit scale (100 for OpenAI CLIP, so the score
            reads like the common 0-100 CLIPScore without its clamp at 0, which would zero the gradient).
    """

    default_path = "openai/clip-vit-large-patch14"

    def __init__(self, model=None, tokenizer=None, path=None, processor_path=None, arch=None, pretrained=None,
                 scale: float | str = 1.0, fit: str = "crop"):
        super().__init__()
        if model is None and path is None and arch is None:
            path = self.default_path
        if not (isinstance(scale, (int, float)) or scale == "logit"):
            raise ValueError(f"scale must be a number or 'logit', got {scale!r}.")
        self.backbone = ClipBackbone.build(model=model, tokenizer=tokenizer, path=path, arch=arch,
                                           processor_path=processor_path, pretrained=pretrained, fit=fit)
        self.scale = scale

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        cos = (self.backbone.embed_images(images) * self.backbone.embed_texts(prompts)).sum(-1)
        return cos * (self.backbone.logit_scale if self.scale == "logit" else float(self.scale))
