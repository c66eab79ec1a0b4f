"""The moving-shapes video world's data: a caption grammar, a procedural clip renderer and train/test splits.

A clip is ``frames`` (9 by default, any number >= 2) RGB frames of ``size`` px (32 by default) on one plain
low-saturation background (the image world's ``background``), showing shapes of the image world's colours and
shapes that move in a straight line at constant velocity along one axis and stay fully inside the canvas, with a
1 px margin, in every frame (the verifier reads the background off the border). Captions have three categories:

- ``motion``: "a red circle moving left" (left, right, up or down; the speed is drawn at random and not
  captioned: a total displacement over the clip uniform in 15-60% of the canvas side);
- ``speed``:  "a red circle moving slowly to the right", "a red circle moving quickly up": "slowly" moves
  15-25% of the canvas side over the clip and "quickly" 45-60% (``SPEED_RANGES``), so a threshold of 35% (the
  verifier's) separates them with a margin of 10% of the side either way;
- ``pair``:   "a red circle moving left and a blue square moving up": two objects that differ in colour, in
  shape and in direction, each at a random uncaptioned speed, never overlapping (their circumscribed circles
  stay at least ``PAIR_GAP`` px apart in every frame).

Object radii span the image world's range for small objects, ``[max(3, 0.09 size), 0.15 size]`` px (3-4.8 px
at 32 px), so the quickest object fits on the canvas.

Frame ``t`` of ``F`` shows an object at ``start + displacement * t / (F - 1)``: the displacement is over the
whole clip whatever ``frames`` is, so the speed classes do not depend on the frame count.

The test split holds compositions never rendered for training: a fixed, hash-chosen fifth (the image world's
``crc32`` rule) of the (colour, shape, direction) triples, held out of ``motion`` and ``speed`` alike, and of the
unordered pairs of (object, direction) of ``pair``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from flowalign.zoo.shapes_data import COLORS, SHAPES, SPLITS, Obj, _draw, _held_out, _polygon, all_objects, background

VIDEO_CATEGORIES = ("motion", "speed", "pair")
DIRECTIONS = ("left", "right", "up", "down")
#: unit step (dx, dy) of each direction in image coordinates (y grows downwards)
DIRECTION_VECTORS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
SPEEDS = ("slow", "quick")
ADVERBS = {"slow": "slowly", "quick": "quickly"}
#: total displacement over the clip, as a fraction of the canvas side, of each speed class
SPEED_RANGES = {"slow": (0.15, 0.25), "quick": (0.45, 0.60)}
#: the displacement range of an uncaptioned speed (``motion`` and ``pair``)
ANY_SPEED = (0.15, 0.60)
PAIR_GAP = 1.5
DEFAULT_WEIGHTS = {"motion": 0.3, "speed": 0.3, "pair": 0.4}
MIN_SIZE = 24
_DIRECTION_PHRASES = {"left": "to the left", "right": "to the right", "up": "up", "down": "down"}

#: every word a caption of the grammar can hold (a tokenizer's vocabulary)
VIDEO_WORDS: tuple[str, ...] = ("a", "and", "moving", "slowly", "quickly", "to", "the", *DIRECTIONS, *COLORS,
                                *SHAPES)


@dataclass(frozen=True)
class VideoSpec:
    """What a clip should show: a category, its objects, each object's direction and speed class.

    ``speeds`` holds "slow" or "quick" per object for ``speed`` and None (a random, uncaptioned speed) otherwise;
    left empty it defaults to None for every object. Invalid combinations raise ValueError.
    """

    category: str
    objects: tuple[Obj, ...]
    directions: tuple[str, ...]
    speeds: tuple[str | None, ...] = ()

    def __post_init__(self):
        for name in ("objects", "directions", "speeds"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if not self.speeds:
            object.__setattr__(self, "speeds", (None,) * len(self.objects))
        if self.category not in VIDEO_CATEGORIES:
            raise ValueError(f"VideoSpec category {self.category!r} is unknown; choose one of {VIDEO_CATEGORIES}.")
        n = 2 if self.category == "pair" else 1
        if not (len(self.objects) == len(self.directions) == len(self.speeds) == n):
            raise ValueError(f"A {self.category!r} VideoSpec needs {n} object(s) with one direction and one speed "
                             f"each; got objects={self.objects}, directions={self.directions}, "
                             f"speeds={self.speeds}.")
        for o in self.objects:
            if not isinstance(o, Obj) or o.color not in COLORS or o.shape not in SHAPES:
                raise ValueError(f"VideoSpec objects must be Obj(colour in {tuple(COLORS)}, shape in {SHAPES}); "
                                 f"got {o!r}.")
        bad = [d for d in self.directions if d not in DIRECTIONS]
        if bad:
            raise ValueError(f"VideoSpec directions {bad} are unknown; choose from {DIRECTIONS}.")
        allowed = SPEEDS if self.category == "speed" else (None,)
        if any(s not in allowed for s in self.speeds):
            raise ValueError(f"A {self.category!r} VideoSpec takes speeds from {allowed}; got {self.speeds}.")
        if n == 2:
            (a, b), (da, db) = self.objects, self.directions
            if a.color == b.color or a.shape == b.shape or da == db:
                raise ValueError(f"The two objects of a 'pair' VideoSpec must differ in colour, in shape and in "
                                 f"direction; got {a.phrase()} moving {da} and {b.phrase()} moving {db}.")

    def caption(self) -> str:
        if self.category == "speed":
            (o,), (d,), (s,) = self.objects, self.directions, self.speeds
            return f"{o.phrase()} moving {ADVERBS[s]} {_DIRECTION_PHRASES[d]}"
        return " and ".join(f"{o.phrase()} moving {d}" for o, d in zip(self.objects, self.directions))


# ------------------------------------------------------------------------------------------------ captions
_OBJ = rf"a ({'|'.join(COLORS)}) ({'|'.join(SHAPES)})"
_MOVE = rf"{_OBJ} moving ({'|'.join(DIRECTIONS)})"
_PATTERNS = {
    "motion": re.compile(_MOVE),
    "speed": re.compile(rf"{_OBJ} moving ({'|'.join(ADVERBS.values())}) ({'|'.join(_DIRECTION_PHRASES.values())})"),
    "pair": re.compile(rf"{_MOVE} and {_MOVE}"),
}
_EXAMPLES = ("'a red circle moving left', 'a red circle moving slowly to the right', 'a red circle moving quickly "
             "up' or 'a red circle moving left and a blue square moving up'")


@lru_cache(maxsize=4096)
def parse_video_caption(text: str) -> VideoSpec:
    """The ``VideoSpec`` of a caption of the video grammar (the inverse of ``VideoSpec.caption``); ValueError
    otherwise. Case, surrounding blanks, repeated spaces and a final full stop are forgiven."""
    norm = " ".join(str(text).lower().split()).rstrip(".")
    for category, pattern in _PATTERNS.items():
        m = pattern.fullmatch(norm)
        if m is None:
            continue
        g = m.groups()
        if category == "motion":
            return VideoSpec("motion", (Obj(g[0], g[1]),), (g[2],))
        if category == "speed":
            speed = {v: k for k, v in ADVERBS.items()}[g[2]]
            direction = {v: k for k, v in _DIRECTION_PHRASES.items()}[g[3]]
            return VideoSpec("speed", (Obj(g[0], g[1]),), (direction,), (speed,))
        try:
            return VideoSpec("pair", (Obj(g[0], g[1]), Obj(g[3], g[4])), (g[2], g[5]))
        except ValueError as e:
            raise ValueError(f"Caption {text!r} is not in the video grammar: {e} Valid captions look like "
                             f"{_EXAMPLES}.") from None
    raise ValueError(f"Caption {text!r} is not in the video grammar; valid captions look like {_EXAMPLES} "
                     f"(colours: {', '.join(COLORS)}; shapes: {', '.join(SHAPES)}; directions: "
                     f"{', '.join(DIRECTIONS)}; speeds: slowly, quickly).")


# ------------------------------------------------------------------------------------------------ splits
def split_of(spec: VideoSpec) -> str:
    """'test' for held-out compositions, else 'train'."""
    if spec.category == "pair":
        key = "pair-motion:" + "|".join(sorted(f"{o.phrase()} moving {d}" for o, d in zip(spec.objects,
                                                                                        spec.directions)))
    else:
        (o,), (d,) = spec.objects, spec.directions
        key = f"motion:{o.color}:{o.shape}:{d}"
    return "test" if _held_out(key) else "train"


def all_video_specs(category: str | None = None) -> list[VideoSpec]:
    """Every composition of the grammar (optionally of one category), in a fixed order."""
    if category is not None and category not in VIDEO_CATEGORIES:
        raise ValueError(f"Unknown video category {category!r}; choose one of {VIDEO_CATEGORIES}.")
    objs = all_objects()
    specs: list[VideoSpec] = []
    if category in (None, "motion"):
        specs += [VideoSpec("motion", (o,), (d,)) for o in objs for d in DIRECTIONS]
    if category in (None, "speed"):
        specs += [VideoSpec("speed", (o,), (d,), (s,)) for s in SPEEDS for o in objs for d in DIRECTIONS]
    if category in (None, "pair"):
        specs += [VideoSpec("pair", (a, b), (da, db)) for a in objs for b in objs
                  if a.color != b.color and a.shape != b.shape for da in DIRECTIONS for db in DIRECTIONS if da != db]
    return specs


def specs_for(split: str, category: str | None = None) -> list[VideoSpec]:
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; choose one of {SPLITS}.")
    return [s for s in all_video_specs(category) if split_of(s) == split]


def sample_specs(n: int, split: str = "train", seed: int = 0,
                 weights: dict[str, float] | None = None) -> list[VideoSpec]:
    """``n`` specs drawn with fixed category proportions (``DEFAULT_WEIGHTS`` unless given) from a split."""
    weights = weights or DEFAULT_WEIGHTS
    unknown = set(weights) - set(VIDEO_CATEGORIES)
    if unknown:
        raise ValueError(f"Unknown categories {sorted(unknown)} in weights; choose from {VIDEO_CATEGORIES}.")
    rng = np.random.default_rng(seed)
    pools = {c: specs_for(split, c) for c in weights}
    cats = rng.choice(list(weights), size=n, p=np.array(list(weights.values())) / sum(weights.values()))
    return [pools[c][rng.integers(len(pools[c]))] for c in cats]


def eval_prompts(split: str = "test", per_category: int = 25, seed: int = 0) -> list[VideoSpec]:
    """A fixed, balanced list of prompts for evaluation: exactly ``per_category`` per category, distinct where
    the category's pool is large enough; a smaller pool (the test split holds 19 ``motion`` compositions) is
    used whole, as evenly as it divides, and topped up by a random subset of it."""
    if per_category < 1:
        raise ValueError(f"per_category must be at least 1, got {per_category}.")
    rng = np.random.default_rng(seed)
    out: list[VideoSpec] = []
    for c in VIDEO_CATEGORIES:
        pool = specs_for(split, c)
        repeats, rest = divmod(per_category, len(pool))
        idx = [*range(len(pool))] * repeats + [*rng.choice(len(pool), size=rest, replace=False)]
        out += [pool[i] for i in sorted(idx)]
    return out


# ------------------------------------------------------------------------------------------------ layout
@dataclass(frozen=True)
class Track:
    """One object's straight path: at frame t of F its renderer anchor is ``start + displacement * t/(F-1)``."""

    obj: Obj
    start: tuple[float, float]
    displacement: tuple[float, float]
    radius: float

    def positions(self, frames: int) -> np.ndarray:
        """(frames, 2) anchor positions (x, y) in px."""
        t = np.linspace(0.0, 1.0, frames)[:, None]
        return np.asarray(self.start) + t * np.asarray(self.displacement)


def outer_radius(shape: str) -> float:
    """The radius, in units of the renderer's ``r``, of the smallest circle about the anchor that holds the shape."""
    v = _polygon(shape, 0.0, 0.0, 1.0)
    return 1.0 if v is None else max(math.hypot(x, y) for x, y in v)


def _check_size(size: int, frames: int | None = None) -> None:
    if not isinstance(size, (int, np.integer)) or size < MIN_SIZE:
        raise ValueError(f"size must be an integer of at least {MIN_SIZE} px (the quickest object must fit), "
                         f"got {size!r}.")
    if frames is not None and (not isinstance(frames, (int, np.integer)) or frames < 2):
        raise ValueError(f"frames must be an integer of at least 2 (motion needs two frames), got {frames!r}.")


def clip_layout(spec: VideoSpec, size: int = 32, rng: np.random.Generator | None = None) -> list[Track]:
    """One ``Track`` per object of ``spec``: radius, direction, speed (its class's range, or ``ANY_SPEED``) and a
    start such that the shape (inside the square of side 2r about its anchor) stays 1 px off the border over the
    whole path; for ``pair`` the two paths keep their circumscribed circles ``PAIR_GAP`` px apart at every
    instant (a quadratic in time, checked exactly), so no frame count makes them overlap."""
    _check_size(size)
    rng = rng if rng is not None else np.random.default_rng()
    r_hi = 0.15 * size
    r_lo = max(3.0, 0.6 * r_hi)
    for _ in range(1000):
        tracks = []
        for obj, direction, speed in zip(spec.objects, spec.directions, spec.speeds):
            r = rng.uniform(r_lo, r_hi)
            dist = rng.uniform(*SPEED_RANGES.get(speed, ANY_SPEED)) * size
            ux, uy = DIRECTION_VECTORS[direction]
            lo, hi = r + 1, size - r - 1
            start = []
            for u in (ux, uy):  # along the motion the start leaves room for the whole path
                a, b = (lo + dist * max(-u, 0), hi - dist * max(u, 0))
                start.append(rng.uniform(a, b) if b > a else np.nan)
            tracks.append(Track(obj, (float(start[0]), float(start[1])), (ux * dist, uy * dist), float(r)))
        if any(np.isnan(t.start).any() for t in tracks):
            continue
        if len(tracks) == 1 or _apart(*tracks, PAIR_GAP):
            return tracks
    raise RuntimeError(f"could not lay out {spec.caption()!r} on a {size}px canvas")


def _apart(a: Track, b: Track, gap: float) -> bool:
    """Whether the circumscribed circles of ``a`` and ``b`` stay ``gap`` apart for every t in [0, 1]."""
    p = np.subtract(a.start, b.start)
    v = np.subtract(a.displacement, b.displacement)
    t = float(np.clip(-(p @ v) / (v @ v), 0.0, 1.0)) if v @ v > 0 else 0.0
    closest = float(np.linalg.norm(p + t * v))
    return closest > outer_radius(a.obj.shape) * a.radius + outer_radius(b.obj.shape) * b.radius + gap


# ------------------------------------------------------------------------------------------------ rendering
def render_clip(spec: VideoSpec, frames: int = 9, size: int = 32, rng: np.random.Generator | None = None,
                supersample: int = 4) -> np.ndarray:
    """Render ``spec`` as a (frames, size, size, 3) uint8 clip (anti-aliased by supersampling). ``rng`` draws
    the background, then ``clip_layout``."""
    from PIL import Image, ImageDraw

    _check_size(size, frames)
    rng = rng if rng is not None else np.random.default_rng()
    big = size * supersample
    canvas = Image.new("RGB", (big, big), background(rng))
    tracks = clip_layout(spec, size, rng)
    paths = [t.positions(frames) for t in tracks]
    out = np.empty((frames, size, size, 3), dtype=np.uint8)
    for f in range(frames):
        img = canvas.copy()
        draw = ImageDraw.Draw(img)
        for track, path in zip(tracks, paths):
            _draw(draw, track.obj, path[f, 0], path[f, 1], track.radius, supersample)
        out[f] = np.asarray(img.resize((size, size), Image.BOX))
    return out


def dataset(n: int, split: str = "train", seed: int = 0, size: int = 32, frames: int = 9):
    """``n`` rendered clips as a float tensor (n, frames, 3, size, size) in [0, 1], with captions and specs."""
    import torch

    _check_size(size, frames)
    specs = sample_specs(n, split, seed)
    rng = np.random.default_rng(seed + 1)
    clips = np.stack([render_clip(s, frames, size, rng) for s in specs])
    videos = torch.from_numpy(clips).permute(0, 1, 4, 2, 3).float() / 255
    return videos, [s.caption() for s in specs], specs
