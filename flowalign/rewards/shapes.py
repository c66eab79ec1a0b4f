"""The shapes world's exact compositional verifier: a rule-based, GenEval-like score (Ghosh et al. 2023, "GenEval:
An Object-Focused Framework for Evaluating Text-to-Image Alignment"), registered as ``shapes-geneval``.

GenEval checks an object detector's detections against the prompt; here ``analyse`` detects objects exactly:

1. the background is the median of the border pixels (the renderer keeps every shape off the border), its
   noise their robust spread;
2. each pixel is explained as a blend ``background + a * (palette colour - background)`` for the palette colour
   with the smallest residual; ``a`` is its coverage (zero within two noise deviations of the background), so
   anti-aliased edges count for the fraction they cover. Pixels with ``a >= 0.5`` and a residual under
   ``max_residual`` are foreground of that colour; the rest (background, blends of two objects, colours far from
   every palette colour) are not;
3. 4-connected components (so corners that nearly touch stay apart) of same-colour foreground of at least
   ``min_area`` (a fraction of the image) pixels are objects; each also owns the nearest background pixels up to
   ``fringe`` px out (its soft edge). Its mass (summed coverage) gives a sub-pixel area and centroid;
4. the shape is the nearest of the renderer's templates (circle, axis-aligned square, upright triangle), each
   scaled to the same area and centred on the same centroid, by the area-normalised L1 distance of coverage
   maps; each template is also tried blurred ``blur`` times by a [1, 2, 1] kernel, so soft images (a VAE's
   decodes) match too. A component no template fits within ``max_shape_error`` (0.25) is of shape ``"unknown"``:
   the right template fits ground-truth renders within 0.04 at 32 px; circle and square are 0.15 apart.

``verify`` then applies the rules (``strict=True``, the default, and the reward):

- the detected objects are exactly the caption's, as a multiset of (colour, shape): "a red circle" needs one red
  circle and nothing else, "three green triangles" exactly three green triangles and nothing else; an extra
  object of any kind, an unknown blob included, fails (training images hold nothing else, and allowing extras
  would let a policy hedge by drawing more);
- position: additionally A's centre (``Detection.x, y``) lies in the named direction from B's: the offset along
  that axis exceeds ``margin`` (10% of the image side; the renderer uses 20%) and the offset across it is
  smaller than the offset along it (the dominant axis, as the renderer places them), give or take 2% of the
  side, so only pairs within a few degrees of a diagonal can satisfy two relations.

With ``strict=False`` the rules are GenEval's: extra objects are allowed, except that counting is exact (exactly
``count`` objects of the colour and shape, and no more than ``count`` of that shape in any colour, GenEval's
"exclude" rule), and for position every (A, B) pair of matching objects must satisfy the relation.
"""

from __future__ import annotations

import multiprocessing
import re
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from flowalign.rewards.base import Reward, register
from flowalign.zoo.shapes_data import CATEGORIES, COLORS, NUMBERS, PLURALS, SHAPES, Obj, Spec, _polygon

# ------------------------------------------------------------------------------------------------ captions
_C, _S, _P = "|".join(COLORS), "|".join(SHAPES), "|".join(PLURALS.values())
_OBJ = rf"a ({_C}) ({_S})"
_REL = {"to the left of": "left of", "to the right of": "right of", "above": "above", "below": "below"}
_PATTERNS = {
    "single": re.compile(rf"{_OBJ}"),
    "counting": re.compile(rf"(one) ({_C}) ({_S})|({'|'.join(list(NUMBERS.values())[1:])}) ({_C}) ({_P})"),
    "colors": re.compile(rf"{_OBJ} and {_OBJ}"),
    "position": re.compile(rf"{_OBJ} ({'|'.join(_REL)}) {_OBJ}"),
}
_EXAMPLES = ("'a red circle', 'three green triangles', 'a red circle and a blue square' or "
             "'a blue square to the left of a yellow circle'")


@lru_cache(maxsize=4096)
def parse_caption(text: str) -> Spec:
    """The ``Spec`` of a caption of the shapes grammar (the inverse of ``Spec.caption``); ValueError otherwise.

    Case, surrounding blanks, repeated spaces and a final full stop are forgiven.
    """
    norm = " ".join(str(text).lower().split()).rstrip(".")
    for category, pattern in _PATTERNS.items():
        m = pattern.fullmatch(norm)
        if m is None:
            continue
        g = [x for x in m.groups() if x is not None]
        if category == "single":
            return Spec("single", (Obj(g[0], g[1]),))
        if category == "counting":
            count = {v: k for k, v in NUMBERS.items()}[g[0]]
            return Spec("counting", (Obj(g[1], {v: k for k, v in PLURALS.items()}.get(g[2], g[2])),), count=count)
        a, b = Obj(g[0], g[1]), Obj(g[-2], g[-1])
        relation = _REL[g[2]] if category == "position" else None
        if a == b:
            raise ValueError(f"Caption {text!r} names the same object twice; the two objects must differ in "
                             f"colour or shape, e.g. {_EXAMPLES}.")
        return Spec(category, (a, b), relation=relation)
    raise ValueError(f"Caption {text!r} is not in the shapes grammar; valid captions look like {_EXAMPLES} "
                     f"(colours: {', '.join(COLORS)}; shapes: {', '.join(SHAPES)}; counts one to four).")


# ------------------------------------------------------------------------------------------------ detection
@dataclass(frozen=True)
class Detection:
    """An object: colour, shape, centre (x, y) (the centroid; for a triangle the renderer's anchor, 0.15 r above
    it), area in pixels, bbox (x0, y0, x1, y1) with exclusive ends, L1 distance to the nearest template, and
    the distance to every template as ((shape, error), ...) in ``SHAPES`` order (empty when not measured)."""

    color: str
    shape: str
    x: float
    y: float
    area: float
    bbox: tuple[int, int, int, int]
    fit_error: float
    template_errors: tuple[tuple[str, float], ...] = ()


_PALETTE = np.array(list(COLORS.values()), dtype=np.float64)
MAX_SHAPE_ERROR = 0.25  # the largest template fit error that still names a shape (module docstring, step 4)
RELATION_MARGIN, RELATION_SLACK = 0.1, 0.02  # position rule, as fractions of the image side (``relation_holds``)


def _unit_polygon(shape: str) -> tuple[np.ndarray, np.ndarray]:
    """The renderer's polygon for ``shape`` scaled to unit area and centred on its centroid, and the offset of
    the renderer's anchor (the centre it places) from that centroid (a triangle's anchor sits above it)."""
    v = np.array(_polygon(shape, 0.0, 0.0, 1.0))
    centroid = v.mean(0)  # the vertex mean is the centroid of a triangle and of a square
    x, y = (v - centroid).T
    scale = np.sqrt(abs(x @ np.roll(y, -1) - y @ np.roll(x, -1)) / 2)
    return (v - centroid) / scale, -centroid / scale


_TEMPLATES = {s: (None, np.zeros(2)) if s == "circle" else _unit_polygon(s) for s in SHAPES}


def _coverage(shape: str, gx: float, gy: float, area: float, x0: int, y0: int, w: int, h: int, k: int = 4):
    """Coverage (h, w) of pixels [x0, x0 + w) x [y0, y0 + h) by ``shape`` of ``area`` with its centroid at
    (gx, gy), from k x k samples per pixel (pixel i spans [i, i + 1], as in the renderer)."""
    off = (np.arange(k) + 0.5) / k
    xs = (x0 + np.arange(w)[:, None] + off).ravel() - gx
    ys = (y0 + np.arange(h)[:, None] + off).ravel() - gy
    px, py = xs[None, :], ys[:, None]
    poly = _TEMPLATES[shape][0]
    if poly is None:
        inside = px**2 + py**2 <= area / np.pi
    else:
        v = poly * np.sqrt(area)
        e = np.roll(v, -1, axis=0) - v
        cross = [e[i, 0] * (py - v[i, 1]) - e[i, 1] * (px - v[i, 0]) for i in range(len(v))]
        sign = np.sign(e[0, 0] * -v[0, 1] - e[0, 1] * -v[0, 0])  # the side the centroid (origin) lies on
        inside = np.all([c * sign >= 0 for c in cross], axis=0)
    return inside.reshape(h, k, w, k).mean((1, 3))


_SHIFTS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]  # the 8 neighbours
_EDGES = [s for s in _SHIFTS if 0 in s]  # the 4 edge neighbours


def _pad(a: np.ndarray, value) -> np.ndarray:  # np.pad costs more than the rest on these small arrays
    out = np.full((a.shape[0] + 2, a.shape[1] + 2), value, dtype=a.dtype)
    out[1:-1, 1:-1] = a
    return out


def _blur(a: np.ndarray) -> np.ndarray:  # [1, 2, 1] / 4 in x and y, zero outside
    p = _pad(a, 0.0)
    p = (p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]) / 4
    return (p[:-2] + 2 * p[1:-1] + p[2:]) / 4


def _components(label: np.ndarray) -> np.ndarray:
    """4-connected components of equal non-negative labels: each pixel gets the smallest flat index of its
    component (-1 where label < 0), by min-propagation with pointer jumping."""
    (h, w), pad = label.shape, _pad(label, -1)
    comp = np.where(label >= 0, np.arange(h * w).reshape(h, w), h * w)
    same = [(pad[1 + dy:1 + dy + h, 1 + dx:1 + dx + w] == label) & (label >= 0) for dy, dx in _EDGES]
    while True:
        big = _pad(comp, h * w)
        new = comp
        for (dy, dx), s in zip(_EDGES, same):
            new = np.where(s, np.minimum(new, big[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]), new)
        flat = np.append(new.ravel(), h * w)
        new = flat[new]  # pointer jumping: adopt the label of the pixel one's label points to
        if np.array_equal(new, comp):
            return np.where(label >= 0, comp, -1)
        comp = new


def _as_rgb255(image) -> np.ndarray:
    """(H, W, 3) float64 in [0, 255] from a (3, H, W) tensor in [0, 1] or an (H, W, 3) array (uint8 or [0, 1])."""
    if torch.is_tensor(image):
        image = image.detach().float().cpu()
        image = (image.movedim(0, -1) if image.ndim == 3 and image.shape[0] == 3 else image).numpy()
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"Expected one (3, H, W) tensor or (H, W, 3) array image, got shape {arr.shape}.")
    if not np.isfinite(arr).all():
        raise ValueError("The image has NaN or infinite pixels; the shapes verifier cannot score it.")
    return arr.astype(np.float64) if arr.dtype == np.uint8 else np.clip(arr.astype(np.float64), 0, 1) * 255


def analyse(image, min_area: float = 0.004, max_residual: float = 60.0, max_shape_error: float = MAX_SHAPE_ERROR,
            blur: int = 2, fringe: int = 2) -> list[Detection]:
    """The objects in ``image``, a (3, H, W) tensor in [0, 1] or an (H, W, 3) array; the steps and knobs are in
    the module docstring (``max_residual`` is an RGB distance on the 0-255 scale)."""
    img = _as_rgb255(image)
    h, w, _ = img.shape
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg = np.median(border, axis=0)
    noise = 1.4826 * np.median(np.abs(border - bg))  # robust std of the background, per channel
    d = _PALETTE - bg  # (6, 3)
    diff = img - bg
    alpha = np.clip(diff @ d.T / (d**2).sum(1), 0, 1)  # (h, w, 6)
    alpha[alpha < 2 * noise / np.linalg.norm(d, axis=1)] = 0  # coverage within the background's noise is none
    resid = np.linalg.norm(diff[:, :, None, :] - alpha[..., None] * d, axis=-1)
    best = resid.argmin(-1)
    a_best = np.take_along_axis(alpha, best[..., None], -1)[..., 0]
    label = np.where((a_best >= 0.5) & (resid.min(-1) <= max_residual), best, -1)
    comp = _components(label)
    sizes = np.bincount(comp[comp >= 0], minlength=h * w)
    comp = np.where(sizes[np.maximum(comp, 0)] >= max(min_area * h * w, 1), comp, -1)  # smaller ones are noise
    owner = comp
    for _ in range(fringe):  # each object also owns the background pixels nearest to it, up to `fringe` px out
        p = _pad(owner, -1)
        owner = np.where(owner < 0, np.max([p[1 + dy:h + 1 + dy, 1 + dx:w + 1 + dx] for dy, dx in _SHIFTS], 0), owner)
    out = []
    for root in np.unique(comp[comp >= 0]):
        ys, xs = np.nonzero(owner == root)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        color = int(label.flat[root])
        mine = (owner[y0:y1, x0:x1] == root) & (resid[y0:y1, x0:x1, color] <= max_residual)
        a = np.where(mine, alpha[y0:y1, x0:x1, color], 0.0)  # the object's coverage, in a window around it
        mass = a.sum()
        gx = x0 + (a.sum(0) @ (np.arange(x1 - x0) + 0.5)) / mass
        gy = y0 + (a.sum(1) @ (np.arange(y1 - y0) + 0.5)) / mass
        errors = {}
        for shape in SHAPES:
            cov, errors[shape] = _coverage(shape, gx, gy, mass, x0, y0, x1 - x0, y1 - y0), np.inf
            for _ in range(1 + blur):
                err = (np.abs(a - cov).sum() + max(mass - cov.sum(), 0.0)) / mass  # + the mass off the window
                errors[shape], cov = min(errors[shape], err), _blur(cov)
        shape = min(errors, key=errors.get)
        err, shape = errors[shape], (shape if errors[shape] <= max_shape_error else "unknown")
        ox, oy = _TEMPLATES[shape][1] * np.sqrt(mass) if shape != "unknown" else (0.0, 0.0)
        ys, xs = np.nonzero(comp == root)
        bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        out.append(Detection(list(COLORS)[color], shape, float(gx + ox), float(gy + oy), float(mass), bbox, float(err),
                             tuple((s, float(e)) for s, e in errors.items())))
    return out


# ------------------------------------------------------------------------------------------------ rules
def relation_holds(a: Detection, b: Detection, relation: str, size: float, margin: float = RELATION_MARGIN,
                   slack: float = RELATION_SLACK) -> bool:
    """Whether ``a`` is ``relation`` ("left of", "right of", "above", "below") ``b``: the offset of the centres
    along the named axis exceeds ``margin * size`` and the offset across it is smaller, give or take
    ``slack * size`` (the renderer draws on a quarter-pixel grid, so a centre is known to about 0.1 px)."""
    along, across = relation_offsets(a, b, relation)
    return along > margin * size and abs(across) < along + slack * size


def relation_offsets(a: Detection, b: Detection, relation: str) -> tuple[float, float]:
    """The offset of ``a``'s centre from ``b``'s along ``relation``'s direction (positive where it holds) and
    across it."""
    return relation_axes(a.x - b.x, a.y - b.y, relation)


def relation_axes(dx, dy, relation: str):
    """``(along, across)``: the offset ``(dx, dy)`` of A's centre from B's (image axes, y down; floats or tensors)
    along ``relation``'s direction, positive where it holds, and across it."""
    return {"left of": (-dx, dy), "right of": (dx, dy), "above": (-dy, dx), "below": (dy, dx)}[relation]


def verify(image, spec: Spec | str, strict: bool = True, objects: list[Detection] | None = None) -> bool:
    """Whether ``image`` shows ``spec`` (a Spec or a caption) under the rules of the module docstring.
    ``objects`` reuses an earlier ``analyse(image)``."""
    spec = parse_caption(spec) if isinstance(spec, str) else spec
    objects = analyse(image) if objects is None else objects
    have, want = _multisets(spec, objects)
    if strict:
        ok = have == want
    elif spec.category == "counting":
        (color, shape), n = next(iter(want.items()))
        ok = have[color, shape] == n and sum(v for (_, s), v in have.items() if s == shape) <= n
    else:
        ok = all(have[k] >= n for k, n in want.items())
    if ok and spec.category == "position":
        ok = all(_pairs_in_relation(image, spec, objects))
    return bool(ok)


def _multisets(spec: Spec, objects: list[Detection]) -> tuple[Counter, Counter]:
    """(detected, wanted) multisets of (colour, shape)."""
    have = Counter((o.color, o.shape) for o in objects)
    want = Counter((o.color, o.shape) for o in spec.objects for _ in range(spec.count))
    return have, want


def _pairs_in_relation(image, spec: Spec, objects: list[Detection]) -> list[bool]:
    """For every (A, B) pair of objects matching the position caption's two objects: whether A is in the relation."""
    size = image_side(image)
    a, b = ([o for o in objects if (o.color, o.shape) == (t.color, t.shape)] for t in spec.objects)
    return [relation_holds(p, q, spec.relation, size) for p in a for q in b]


def image_side(image) -> int:
    """The shorter side in pixels of a (3, H, W) tensor or an (H, W, 3) array."""
    return min(image.shape[-2:] if torch.is_tensor(image) else np.shape(image)[-3:-1])


def partial_score(image, spec: Spec | str, objects: list[Detection] | None = None) -> float:
    """Partial credit in [0, 1] for ``image`` against ``spec``, 1.0 exactly where the strict ``verify`` passes.

    Objects: the matched multiset of (colour, shape) over the larger of the wanted and the detected counts, so a
    missing object and an extra one cost alike ("three green triangles" with two of them scores 2/3, with a
    fourth 3/4). Position: the mean of that and the fraction of (A, B) pairs of matching objects in the captioned
    relation (0 without both). A dense training signal for the 0/1 verifier, like GenEval's non-strict reward
    (a group whose samples all fail strictly can still be ranked); the verifier stays the measure."""
    spec = parse_caption(spec) if isinstance(spec, str) else spec
    objects = analyse(image) if objects is None else objects
    have, want = _multisets(spec, objects)
    score = sum((have & want).values()) / max(sum(want.values()), sum(have.values()))
    if spec.category == "position":
        pairs = _pairs_in_relation(image, spec, objects)
        score = (score + (sum(pairs) / len(pairs) if pairs else 0.0)) / 2
    return float(score)


@register("shapes-geneval")
class ShapesVerifier(Reward):
    """1.0 where the image shows its caption (rules: module docstring), else 0.0. Not differentiable.

    ``evaluate(images, prompts)`` gives the accuracy overall and per category present, GenEval-style.
    ``workers > 1`` judges a batch in that many forked processes (the rules run per image in NumPy, about
    2 ms each): for large GPU rollout batches, where the judging would otherwise dominate an epoch.
    """

    differentiable = False

    def __init__(self, strict: bool = True, workers: int = 0):
        super().__init__()
        if workers < 0:
            raise ValueError(f"Reward {self.name!r}: workers must be >= 0, got {workers}.")
        self.strict, self.workers, self._pool = strict, workers, None

    def __getstate__(self):  # sent to the workers without their own pool
        return {**self.__dict__, "_pool": None}

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        specs = [parse_caption(p) for p in prompts]  # parse first: a bad caption fails before any work
        finite = torch.isfinite(images.detach()).flatten(1).all(1)
        if not bool(finite.all()):
            bad = (~finite).nonzero().flatten().tolist()
            raise ValueError(f"Reward {self.name!r}: images at batch indices {bad} have NaN or infinite pixels.")
        arr = images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        if self.workers <= 1 or len(arr) < 2 * self.workers:
            return torch.tensor([self.judge(x, s) for x, s in zip(arr, specs)], device=images.device)
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("fork"))
        chunk = -(-len(arr) // (4 * self.workers))
        return torch.tensor(list(self._pool.map(self.judge, arr, specs, chunksize=chunk)), device=images.device)

    def judge(self, image: np.ndarray, spec: Spec) -> float:
        return float(verify(image, spec, self.strict))

    @torch.no_grad()
    def evaluate(self, images: torch.Tensor, prompts: str | list[str]) -> dict[str, float]:
        """``{"overall": accuracy, <category>: accuracy, ...}`` over the categories present in ``prompts``."""
        scores = self(images, prompts).cpu()
        prompts = [prompts] * len(scores) if isinstance(prompts, str) else prompts
        cats = np.array([parse_caption(p).category for p in prompts])
        return {"overall": float(scores.mean()), **{c: float(scores[cats == c].mean()) for c in CATEGORIES
                                                     if (cats == c).any()}}


@register("shapes-geneval-partial")
class ShapesPartialVerifier(ShapesVerifier):
    """The verifier's partial credit (:func:`partial_score`): 1.0 where the strict verifier passes, a fraction
    for near misses (some objects right, an extra one, the relation wrong). A denser training reward than the 0/1
    ``shapes-geneval``; its ``evaluate`` gives mean partial credit, so report accuracy with ``shapes-geneval``."""

    def __init__(self, workers: int = 0):
        super().__init__(strict=True, workers=workers)

    def judge(self, image: np.ndarray, spec: Spec) -> float:
        return partial_score(image, spec)
