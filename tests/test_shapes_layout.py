"""``shapes-layout``, the differentiable colour-and-position score: near 0 on renders of their own caption and far
below it on a wrong one, a gradient that moves colour mass the way the caption asks, and a clear error on
captions outside the world."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import flowalign.rewards as fr
from flowalign.rewards.shapes_layout import colour_membership
from flowalign.zoo import shapes_data as sd
from flowalign.zoo.shapes_data import COLORS, Obj, Spec

FLIP = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def test_renders_score_near_zero_and_above_wrong_captions():
    pixels, captions, specs = sd.dataset(200, "train", seed=11)
    reward = fr.load("shapes-layout")
    own = reward(pixels, captions)
    assert own.shape == (200,) and torch.isfinite(own).all()
    assert own.mean() > -0.4 and (own <= 0).all()
    other = reward(pixels, [captions[i] for i in np.random.default_rng(0).permutation(200)])
    assert (own > other).float().mean() > 0.85
    pos = [i for i, s in enumerate(specs) if s.category == "position"]
    flipped = [Spec("position", s.objects, relation=FLIP[s.relation]).caption() for s in (specs[i] for i in pos)]
    assert (own[pos] > reward(pixels[pos], flipped)).float().mean() > 0.85


def test_membership_finds_the_object_colour():
    image = sd.render(Spec("single", (Obj("blue", "circle"),)), 32, np.random.default_rng(1))
    m = colour_membership(torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 255)
    mass = m.sum((-2, -1))[0]
    assert mass.argmax().item() == list(COLORS).index("blue")
    assert mass[list(COLORS).index("blue")] > 5 * mass.sort(descending=True).values[1]


def test_gradient_moves_an_object_the_way_the_caption_asks():
    """A render of "a red circle to the left of a blue square", scored against the flipped caption: a few
    gradient steps on the pixels raise the score and move the red mass right relative to the blue."""
    spec = Spec("position", (Obj("red", "circle"), Obj("blue", "square")), relation="left of")
    image = sd.render(spec, 32, np.random.default_rng(4))
    x = (torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 255).requires_grad_(True)
    caption = Spec("position", spec.objects, relation="right of").caption()
    reward = fr.load("shapes-layout")

    def red_minus_blue_x(img):
        m = colour_membership(img.detach())[0]
        xs = torch.arange(32, dtype=torch.float32) + 0.5
        cx = (m.sum(-2) * xs).sum(-1) / m.sum((-2, -1))
        return (cx[list(COLORS).index("red")] - cx[list(COLORS).index("blue")]).item()

    start_score, start_dx = reward(x, [caption]).item(), red_minus_blue_x(x)
    for _ in range(50):
        x.grad = None
        reward(x, [caption]).sum().backward()
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
        with torch.no_grad():
            x += 0.05 * x.grad / x.grad.abs().max()
            x.clamp_(0, 1)
    assert reward(x, [caption]).item() > start_score + 0.1
    assert red_minus_blue_x(x) > start_dx + 1.0


def test_captions_outside_the_world_are_a_clear_error():
    with pytest.raises(ValueError, match="caption"):
        fr.load("shapes-layout")(torch.rand(1, 3, 32, 32), ["a photo of a cat"])


def test_shapes_position_scores_only_the_relation():
    pixels, captions, specs = sd.dataset(60, "train", seed=12)
    scores = fr.load("shapes-position")(pixels, captions)
    other = [i for i, s in enumerate(specs) if s.category != "position"]
    assert other and (scores[other] == 0).all()
    wrong = [Spec("position", s.objects, relation=FLIP[s.relation]).caption() if s.category == "position"
             else "a red circle" for s in specs]
    pos = [i for i, s in enumerate(specs) if s.category == "position"]
    assert (scores[pos] > fr.load("shapes-position")(pixels[pos], [wrong[i] for i in pos])).float().mean() > 0.85
