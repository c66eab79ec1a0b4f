"""The verifier's partial credit with confidences (``shapes-geneval-soft``): close to the partial credit on clean
renders, graded where the partial credit is a step, and a clear error on bad input like the verifier."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import flowalign.rewards as fr
from flowalign.rewards.shapes import Detection, analyse, partial_score, verify
from flowalign.rewards.shapes_soft import ShapesSoftVerifier, relation_confidence, shape_confidence, soft_score
from flowalign.zoo import shapes_data as sd
from flowalign.zoo.shapes_data import Obj, Spec


def morph(w: float, seed: int = 3) -> np.ndarray:
    """A red square blended with weight ``w`` into a red circle drawn at the same place."""
    sq, ci = (sd.render(Spec("single", (Obj("red", s),)), 32, np.random.default_rng(seed)).astype(float)
              for s in ("square", "circle"))
    return ((1 - w) * sq + w * ci).round().astype(np.uint8)


def test_soft_score_follows_the_partial_credit_on_renders():
    specs = sd.sample_specs(150, "test", seed=1)
    rng = np.random.default_rng(0)
    images = [sd.render(s, 32, rng) for s in specs]
    wrong = [sd.sample_specs(1, "test", seed=100 + i)[0] for i in range(len(specs))]
    for captions in (specs, wrong):
        found = [analyse(x) for x in images]
        soft = np.array([soft_score(x, c, objects=o) for x, c, o in zip(images, captions, found)])
        part = np.array([partial_score(x, c, objects=o) for x, c, o in zip(images, captions, found)])
        assert ((soft >= 0) & (soft < 1)).all()
        assert np.abs(soft - part).mean() < 0.05, np.abs(soft - part).mean()
    assert soft_score(images[0], specs[0]) > 0.8


def test_soft_score_is_graded_where_the_partial_credit_steps():
    """From a square to a circle the partial credit for "a red square" drops from 1 to 0 in one step; the soft
    score falls through intermediate values, strictly, and crosses 0.5 next to the verifier's flip."""
    ws = np.linspace(0, 1, 11)
    soft = np.array([soft_score(morph(w), "a red square") for w in ws])
    part = np.array([partial_score(morph(w), "a red square") for w in ws])
    passed = np.array([verify(morph(w), "a red square") for w in ws])
    assert set(part) == {0.0, 1.0} and (part == passed).all()
    assert (np.diff(soft) < 0).all()
    assert ((soft > 0.1) & (soft < 0.9)).sum() >= 3
    flip = np.argmin(passed)  # the first blend the verifier rejects
    assert soft[flip - 1] > 0.5 > soft[flip]


def test_confidences_are_logistic_margins():
    def det(errors, x=10.0, y=10.0):
        errors = dict(errors)
        shape = min(errors, key=errors.get)
        return Detection("red", shape, x, y, 20.0, (0, 0, 1, 1), errors[shape], tuple(errors.items()))

    tie = det({"circle": 0.1, "square": 0.1, "triangle": 0.4})
    assert shape_confidence(tie, "square") == pytest.approx(0.5)
    assert shape_confidence(det({"circle": 0.2, "square": 0.05, "triangle": 0.4}), "square") > 0.99
    assert shape_confidence(det({"circle": 0.30, "square": 0.27, "triangle": 0.4}), "square") < 0.5  # > 0.25
    bare = Detection("red", "square", 0.0, 0.0, 20.0, (0, 0, 1, 1), 0.0)  # no template errors: its own shape
    assert shape_confidence(bare, "square") == 1.0 and shape_confidence(bare, "circle") == 0.0
    a, b = det({"circle": 0.0}, x=10.0, y=16.0), det({"circle": 0.0}, x=13.2, y=16.0)  # 0.1 * 32 apart
    assert relation_confidence(a, b, "left of", 32) == pytest.approx(0.5, abs=0.01)
    far = det({"circle": 0.0}, x=26.0, y=16.0)
    assert relation_confidence(a, far, "left of", 32) > 0.99 and relation_confidence(a, far, "right of", 32) < 1e-6


def test_soft_reward_is_registered_and_rejects_bad_input():
    reward = fr.load("shapes-geneval-soft")
    assert isinstance(reward, ShapesSoftVerifier) and reward.name == "shapes-geneval-soft"
    x = torch.from_numpy(np.stack([morph(0.0), morph(0.45), morph(1.0)])).permute(0, 3, 1, 2).float() / 255
    scores = reward(x, ["a red square"] * 3)
    assert scores[0] > scores[1] > scores[2]
    x[1, 0, 4, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        reward(x, ["a red square"] * 3)
    with pytest.raises(ValueError, match="shapes grammar"):
        reward(x[:1], ["a purple dodecahedron"])
