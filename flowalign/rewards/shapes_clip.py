"""``shapes-clip``: the bundled shapes world's tiny CLIP as a differentiable PickScore-style reward.

It is the hackable proxy of the shapes world (the exact verifier ``shapes-geneval`` is the ground truth):
``logit_scale * cos(image, caption)`` from the same CLIP whose text tower conditions shapes-sd3.
"""

from __future__ import annotations

from flowalign.rewards.base import register
from flowalign.rewards.clip import CLIPScore


@register("shapes-clip")
class ShapesClip(CLIPScore):
    """PickScore-style score of the bundled shapes CLIP (``flowalign.zoo.path("shapes-clip")``)."""

    def __init__(self, path: str | None = None):
        from flowalign import zoo

        path = path or zoo.path("shapes-clip")
        super().__init__(path=path, processor_path=path, scale="logit")
