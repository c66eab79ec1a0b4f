"""The shapes world's data: a caption grammar, a procedural renderer and train/test splits.

Images are small RGB canvases (32x32 by default) with one to four coloured shapes on a plain background of
any low-saturation colour. Captions follow a GenEval-like grammar with four categories:

- ``single``:    "a red circle"
- ``counting``:  "three green triangles" (1 to 4 objects of one kind)
- ``colors``:    "a red circle and a blue square" (two objects, colour attribution)
- ``position``:  "a blue square to the left of a yellow circle" (left of / right of / above / below)

The test split holds compositions never rendered for training: a fixed, hash-chosen fifth of the
(count, colour, shape) triples, of the unordered object pairs, and of the (object, relation, object)
triples. Single objects are the vocabulary and appear in both splits.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 225),
    "yellow": (235, 215, 40), "purple": (150, 60, 200), "cyan": (40, 200, 215),
}
SHAPES = ("circle", "square", "triangle")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles"}
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
RELATIONS = ("left of", "right of", "above", "below")
CATEGORIES = ("single", "counting", "colors", "position")
SPLITS = ("train", "test")


@dataclass(frozen=True)
class Obj:
    color: str
    shape: str

    def phrase(self) -> str:
        return f"a {self.color} {self.shape}"


@dataclass(frozen=True)
class Spec:
    """What an image should show: a category and its objects (and count or relation)."""

    category: str
    objects: tuple[Obj, ...]
    count: int = 1
    relation: str | None = None

    def caption(self) -> str:
        o = self.objects
        if self.category == "single":
            return o[0].phrase()
        if self.category == "counting":
            if self.count == 1:
                return f"one {o[0].color} {o[0].shape}"
            return f"{NUMBERS[self.count]} {o[0].color} {PLURALS[o[0].shape]}"
        if self.category == "colors":
            return f"{o[0].phrase()} and {o[1].phrase()}"
        rel = self.relation if self.relation in ("above", "below") else f"to the {self.relation}"
        return f"{o[0].phrase()} {rel} {o[1].phrase()}"


def all_objects() -> list[Obj]:
    return [Obj(c, s) for c in COLORS for s in SHAPES]


def _held_out(key: str) -> bool:
    return zlib.crc32(key.encode()) % 5 == 0


def split_of(spec: Spec) -> str:
    """'test' for held-out compositions, else 'train' (single objects are in both)."""
    if spec.category == "single":
        return "both"
    if spec.category == "counting":
        key = f"count:{spec.count}:{spec.objects[0].color}:{spec.objects[0].shape}"
    elif spec.category == "colors":
        key = "pair:" + "|".join(sorted(o.phrase() for o in spec.objects))
    else:
        a, b = spec.objects
        key = f"pos:{a.phrase()}:{spec.relation}:{b.phrase()}"
    return "test" if _held_out(key) else "train"


def all_specs(category: str | None = None) -> list[Spec]:
    """Every composition of the grammar (optionally of one category), in a fixed order."""
    objs = all_objects()
    specs: list[Spec] = []
    if category in (None, "single"):
        specs += [Spec("single", (o,)) for o in objs]
    if category in (None, "counting"):
        specs += [Spec("counting", (o,), count=n) for n in NUMBERS for o in objs]
    if category in (None, "colors"):
        specs += [Spec("colors", (a, b)) for a in objs for b in objs if a.color != b.color and a.shape != b.shape]
    if category in (None, "position"):
        specs += [Spec("position", (a, b), relation=r) for r in RELATIONS for a in objs for b in objs
                  if a != b]
    return specs


def specs_for(split: str, category: str | None = None) -> list[Spec]:
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; choose one of {SPLITS}.")
    return [s for s in all_specs(category) if split_of(s) in (split, "both")]


def sample_specs(n: int, split: str = "train", seed: int = 0,
                 weights: dict[str, float] | None = None) -> list[Spec]:
    """``n`` specs drawn with fixed category proportions from a split."""
    weights = weights or {"single": 0.2, "counting": 0.3, "colors": 0.25, "position": 0.25}
    rng = np.random.default_rng(seed)
    pools = {c: specs_for(split, c) for c in CATEGORIES}
    cats = rng.choice(list(weights), size=n, p=np.array(list(weights.values())) / sum(weights.values()))
    return [pools[c][rng.integers(len(pools[c]))] for c in cats]


# --------------------------------------------------------------------------- rendering
def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        h = r * 0.86
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * 1.08 * math.sin(a) + r * 0.15)
                for a in (-math.pi / 2, -math.pi / 2 + 2 * math.pi / 3, -math.pi / 2 + 4 * math.pi / 3)]
    return None


def _draw(draw, obj: Obj, cx: float, cy: float, r: float, ss: int) -> None:
    color = COLORS[obj.color]
    poly = _polygon(obj.shape, cx * ss, cy * ss, r * ss)
    if poly is None:
        draw.ellipse([(cx - r) * ss, (cy - r) * ss, (cx + r) * ss, (cy + r) * ss], fill=color)
    else:
        draw.polygon(poly, fill=color)


def background(rng: np.random.Generator) -> tuple[int, int, int]:
    """A plain background of low saturation (any lightness), so object colours stay distinct."""
    grey = rng.uniform(20, 235)
    tint = rng.uniform(-12, 12, size=3)
    return tuple(int(np.clip(grey + t, 0, 255)) for t in tint)


def _layout(spec: Spec, size: int, rng: np.random.Generator) -> list[tuple[Obj, float, float, float]]:
    """Object placements (obj, cx, cy, radius) with gaps between shapes and the relation respected."""
    n = spec.count if spec.category == "counting" else len(spec.objects)
    objs = [spec.objects[0]] * n if spec.category == "counting" else list(spec.objects)
    r_hi = {1: 0.3, 2: 0.2, 3: 0.17, 4: 0.15}[n] * size
    r_lo = max(3.0, 0.6 * r_hi)
    for _ in range(500):
        placed: list[tuple[Obj, float, float, float]] = []
        for obj in objs:
            r = rng.uniform(r_lo, r_hi)
            cx, cy = rng.uniform(r + 1, size - r - 1, size=2)
            if all(math.hypot(cx - x, cy - y) > r + q + 2.5 for _, x, y, q in placed):
                placed.append((obj, cx, cy, r))
        if len(placed) == n and (spec.category != "position" or _relation_holds(placed, spec.relation, size)):
            return placed
    raise RuntimeError(f"could not lay out {spec.caption()!r} on a {size}px canvas")


def _relation_holds(placed, relation: str, size: int) -> bool:
    (_, ax, ay, _), (_, bx, by, _) = placed
    dx, dy = ax - bx, ay - by
    margin = size * 0.2
    if relation in ("left of", "right of"):
        along, across = (-dx if relation == "left of" else dx), abs(dy)
    else:
        along, across = (-dy if relation == "above" else dy), abs(dx)
    return along > margin and across < along


def render(spec: Spec, size: int = 32, rng: np.random.Generator | None = None, supersample: int = 4) -> np.ndarray:
    """Render ``spec`` as an (size, size, 3) uint8 image (anti-aliased by supersampling)."""
    from PIL import Image, ImageDraw

    rng = rng if rng is not None else np.random.default_rng()
    big = size * supersample
    img = Image.new("RGB", (big, big), background(rng))
    draw = ImageDraw.Draw(img)
    for obj, cx, cy, r in _layout(spec, size, rng):
        _draw(draw, obj, cx, cy, r, supersample)
    return np.asarray(img.resize((size, size), Image.BOX))


def dataset(n: int, split: str = "train", seed: int = 0, size: int = 32):
    """``n`` rendered images as a float tensor (n, 3, size, size) in [0, 1], with captions and specs."""
    import torch

    specs = sample_specs(n, split, seed)
    rng = np.random.default_rng(seed + 1)
    images = np.stack([render(s, size, rng) for s in specs])
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    return pixels, [s.caption() for s in specs], specs


def eval_prompts(split: str = "test", per_category: int = 25, seed: int = 0) -> list[Spec]:
    """A fixed, balanced list of prompts for evaluation (``per_category`` per category)."""
    rng = np.random.default_rng(seed)
    out: list[Spec] = []
    for c in CATEGORIES:
        pool = specs_for(split, c)
        idx = rng.choice(len(pool), size=min(per_category, len(pool)), replace=False)
        out += [pool[i] for i in sorted(idx)]
    return out
