"""``shapes-layout``: a differentiable score of the shapes verifier's colour and position rules, for guidance.

The exact verifier (``shapes-geneval``) and its soft credit detect objects by connected components, which have no
gradient. This reward keeps the verifier's pixel model and drops the components, so every term is a smooth
function of the pixels:

1. the background is the median of the border pixels (held fixed: no gradient flows into it);
2. each pixel is a blend ``background + a (palette colour - background)`` for every palette colour, with ``a`` the
   projection clamped to [0, 1] and the residual the distance to that line; its membership of the colour is
   ``a exp(-(residual / residual_scale)^2)``, so anti-aliased edges count for what they cover;
3. a colour's mass is its summed membership over the image area, and its centre the membership-weighted mean
   pixel position.

The score (0 at best, negative otherwise; in "objects' worth of error") adds three penalties:

- every colour the caption names needs at least ``min_area`` of the image (a render's smallest object covers
  about 2.7% at 32 px): ``relu(min_area - mass) / min_area``;
- every other palette colour should be absent: ``mass / min_area`` each;
- position captions (two different colours): A's centre must lie in the named direction from B's by at least
  ``margin`` of the side along that axis, and more along than across it, as the renderer places them; the
  shortfalls, in units of the side, through a softplus at ``temperature``, divided by ``margin``.

``colour_weight`` and ``position_weight`` weigh the colour penalties and the position one. It says nothing about
shape or count: pair it with ``shapes-clip`` (``MultiReward``) when those matter. It is a guidance and training
signal; accuracy is still reported with ``shapes-geneval``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flowalign.rewards.base import Reward, register
from flowalign.rewards.shapes import parse_caption, relation_axes
from flowalign.zoo.shapes_data import COLORS


def colour_membership(images: torch.Tensor, residual_scale: float = 40.0) -> torch.Tensor:
    """``(B, K, H, W)`` membership of every pixel of ``images`` ``(B, 3, H, W)`` in [0, 1] to each of the K palette
    colours (``COLORS`` order), against the image's border-median background (module docstring, steps 1-2)."""
    x = images.float() * 255
    border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], dim=-1)  # (B, 3, 4W)
    bg = border.median(dim=-1).values.detach()[:, None, :, None, None]  # (B, 1, 3, 1, 1)
    palette = torch.tensor(list(COLORS.values()), dtype=x.dtype, device=x.device)[None, :, :, None, None]
    line = palette - bg  # (B, K, 3, 1, 1)
    offset = x[:, None] - bg  # (B, 1, 3, H, W)
    a = ((offset * line).sum(2) / (line * line).sum(2).clamp_min(1.0)).clamp(0, 1)  # (B, K, H, W)
    residual2 = ((offset - a[:, :, None] * line) ** 2).sum(2)
    return a * torch.exp(-residual2 / residual_scale ** 2)


@register("shapes-layout")
class ShapesLayout(Reward):
    """Differentiable colour-presence, colour-absence and position penalties of the shapes verifier's rules
    (module docstring); 0 at best."""

    name = "shapes-layout"
    differentiable = True

    def __init__(self, min_area: float = 0.02, margin: float = 0.2, temperature: float = 0.02,
                 residual_scale: float = 40.0, colour_weight: float = 1.0, position_weight: float = 1.0):
        super().__init__()
        self.min_area, self.margin, self.temperature = min_area, margin, temperature
        self.colour_weight, self.position_weight = colour_weight, position_weight
        self.residual_scale = residual_scale
        self.colour_index = {c: i for i, c in enumerate(COLORS)}

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        specs = [parse_caption(p) for p in prompts]
        m = colour_membership(images, self.residual_scale)  # (B, K, H, W)
        b, k, h, w = m.shape
        mass = m.sum((-2, -1)) / (h * w)  # (B, K)
        ys = (torch.arange(h, dtype=m.dtype, device=m.device) + 0.5) / h
        xs = (torch.arange(w, dtype=m.dtype, device=m.device) + 0.5) / w
        weight = m.sum((-2, -1)).clamp_min(1e-6)
        cx = (m.sum(-2) * xs).sum(-1) / weight  # (B, K), in units of the side
        cy = (m.sum(-1) * ys).sum(-1) / weight
        wanted = torch.zeros(b, k, dtype=torch.bool, device=m.device)
        for i, spec in enumerate(specs):
            for obj in spec.objects:
                wanted[i, self.colour_index[obj.color]] = True
        missing = (F.relu(self.min_area - mass) / self.min_area * wanted).sum(1)
        extra = (mass / self.min_area * ~wanted).sum(1)
        position = torch.zeros(b, dtype=m.dtype, device=m.device)
        for i, spec in enumerate(specs):
            if spec.category != "position" or spec.objects[0].color == spec.objects[1].color:
                continue
            ia, ib = (self.colour_index[o.color] for o in spec.objects)
            along, across = relation_axes(cx[i, ia] - cx[i, ib], cy[i, ia] - cy[i, ib], spec.relation)
            t = self.temperature
            short = F.softplus((self.margin - along) / t) * t + F.softplus((across.abs() - along) / t) * t
            position[i] = short / self.margin
        return -(self.colour_weight * (missing + extra) + self.position_weight * position)


@register("shapes-position")
class ShapesPosition(ShapesLayout):
    """Only the position penalty of :class:`ShapesLayout` (``colour_weight=0``): on the bundled base most position
    failures have the right objects on the wrong side, and guiding the early steps with this term alone moves
    them."""

    name = "shapes-position"

    def __init__(self, **kwargs):
        super().__init__(**{"colour_weight": 0.0, **kwargs})
