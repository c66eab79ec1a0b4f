"""The shapes verifier's partial credit with detector confidences, registered as ``shapes-geneval-soft``.

Flow-GRPO's GenEval reward weighs each detection by the detector's confidence, so a sample that is nearly right
scores more than one that is badly wrong even where both fail. ``partial_score`` has no such gradation: it is a
step function of the image, so the small differences between samples from one noise seldom change it and a
policy gradient sees mostly ties. ``soft_score`` replaces each of its yes/no decisions by a logistic of the margin
to the verifier's own boundary:

- shape: ``analyse`` names a detection shape s where s's template fits best and within ``max_shape_error``, so
  the confidence that a detection is an s is ``sigmoid((min(other templates' errors, max_shape_error) - error(s))
  / shape_temperature)``: 0.5 on the boundary, near 1 for a clean render (errors about 0.04 against 0.15+), and
  above 0 for an "unknown" blob or a square taken for a circle, which still says which way is better;
- colour: as detected (each pixel's palette colour is not a close call on the shapes world);
- objects: wanted objects and detections are matched greedily by confidence; the matched confidences are summed
  and divided, like the partial credit, by the larger of the wanted and the detected counts;
- position: the matched pair's two relation margins (``relation_holds``: along the axis beyond ``margin``, across
  it within the along offset) through the same logistic at ``position_temperature`` times the image side, and
  averaged with the objects' credit as in ``partial_score``.

With every margin large it equals ``partial_score``; it never reaches exactly 1, so report accuracy with
``shapes-geneval``. It is a training reward only: the strict verifier stays the measure.
"""

from __future__ import annotations

import math

import numpy as np

from flowalign.rewards.base import register
from flowalign.rewards.shapes import (
    MAX_SHAPE_ERROR,
    RELATION_MARGIN,
    RELATION_SLACK,
    Detection,
    ShapesVerifier,
    analyse,
    image_side,
    parse_caption,
    relation_offsets,
)
from flowalign.zoo.shapes_data import Spec


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(min(z, 60.0), -60.0)))


def shape_confidence(d: Detection, shape: str, temperature: float = 0.03,
                     max_shape_error: float = MAX_SHAPE_ERROR) -> float:
    """How surely ``d`` is a ``shape``: the logistic of the margin by which ``shape``'s template beats the others
    and ``max_shape_error`` (a Detection without ``template_errors`` counts as certain of its own shape)."""
    errors = dict(d.template_errors)
    if not errors:
        return float(d.shape == shape)
    rival = min([e for s, e in errors.items() if s != shape] + [max_shape_error])
    return _sigmoid((rival - errors[shape]) / temperature)


def relation_confidence(a: Detection, b: Detection, relation: str, size: float, temperature: float = 0.03,
                        margin: float = RELATION_MARGIN, slack: float = RELATION_SLACK) -> float:
    """The soft ``relation_holds``: both of its margins through a logistic at ``temperature * size``."""
    along, across = relation_offsets(a, b, relation)
    t = temperature * size
    return _sigmoid((along - margin * size) / t) * _sigmoid((along + slack * size - abs(across)) / t)


def soft_score(image, spec: Spec | str, objects: list[Detection] | None = None, shape_temperature: float = 0.03,
               position_temperature: float = 0.03) -> float:
    """Partial credit in [0, 1) with confidences for every decision (module docstring)."""
    spec = parse_caption(spec) if isinstance(spec, str) else spec
    objects = analyse(image) if objects is None else objects
    wanted = [o for o in spec.objects for _ in range(spec.count)]
    conf = np.array([[shape_confidence(d, w.shape, shape_temperature) if d.color == w.color else 0.0
                      for d in objects] for w in wanted]).reshape(len(wanted), len(objects))
    match = {}  # wanted index -> detection index, greedily by confidence
    while conf.size and conf.max() > 0:
        i, j = np.unravel_index(conf.argmax(), conf.shape)
        match[int(i)] = (int(j), float(conf[i, j]))
        conf[i, :], conf[:, j] = -1.0, -1.0
    score = sum(c for _, c in match.values()) / max(len(wanted), len(objects))
    if spec.category == "position":
        size = image_side(image)
        pair = 0.0
        if 0 in match and 1 in match:
            pair = relation_confidence(objects[match[0][0]], objects[match[1][0]], spec.relation, size,
                                       position_temperature)
        score = (score + pair) / 2
    return float(score)


@register("shapes-geneval-soft")
class ShapesSoftVerifier(ShapesVerifier):
    """:func:`soft_score`, the verifier's partial credit with confidences: a dense training reward whose ties are
    rare. Its ``evaluate`` gives the mean soft score; report accuracy with ``shapes-geneval``."""

    def __init__(self, shape_temperature: float = 0.03, position_temperature: float = 0.03, workers: int = 0):
        super().__init__(strict=True, workers=workers)
        self.shape_temperature, self.position_temperature = shape_temperature, position_temperature

    def judge(self, image: np.ndarray, spec: Spec) -> float:
        return soft_score(image, spec, shape_temperature=self.shape_temperature,
                          position_temperature=self.position_temperature)
