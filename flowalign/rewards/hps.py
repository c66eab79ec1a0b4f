"""HPSv2 (Wu et al. 2023, "Human Preference Score v2: A Solid Benchmark for Evaluating Human Preferences of
Text-to-Image Synthesis"): an open_clip ViT-H-14 fine-tuned on HPD v2, scored as ``hpsv2.score`` does: the
diagonal of normalised image features @ normalised text features, i.e. a cosine (no logit scale)."""

from __future__ import annotations

from flowalign.rewards.base import register
from flowalign.rewards.clip import CLIPScore, load_state_dict_file

#: checkpoint file per HPS version in the ``xswu/HPSv2`` hub repo (as the hpsv2 package maps them)
CHECKPOINTS = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}


@register("hps")
class HPSv2(CLIPScore):
    """HPSv2 / HPSv2.1; typical scores lie around 0.2-0.35.

    Args:
        model, tokenizer: an already-built open_clip model (+ tokenizer; default open_clip's for ``arch``).
        checkpoint: HPS state dict (.pt or .safetensors); default: fetched from hub ``xswu/HPSv2``.
        version: ``"v2.1"`` (default) or ``"v2.0"``.
        arch: the open_clip architecture the checkpoint belongs to.

    Non-square images are letterboxed (longest side fitted, zero padding) like HPSv2's eval transform.
    """

    def __init__(self, model=None, tokenizer=None, checkpoint: str | None = None, version: str = "v2.1",
                 arch: str = "ViT-H-14"):
        if model is None:
            import open_clip

            if checkpoint is None:
                if version not in CHECKPOINTS:
                    raise ValueError(f"Unknown HPS version {version!r}; choose one of {sorted(CHECKPOINTS)}.")
                from huggingface_hub import hf_hub_download

                checkpoint = hf_hub_download("xswu/HPSv2", CHECKPOINTS[version])
            # the HPS checkpoint holds the whole CLIP, so the LAION base weights need not be fetched first
            model = open_clip.create_model(arch, pretrained=None)
            model.load_state_dict(load_state_dict_file(checkpoint))
        super().__init__(model=model, tokenizer=tokenizer, arch=arch, scale=1.0, fit="pad")
