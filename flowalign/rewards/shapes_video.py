"""The moving-shapes world's exact video verifier, registered as ``shapes-video``: whether a clip shows its caption
(objects, directions and, for ``speed``, the speed class). Non-differentiable; it scores whole clips.

Per clip of F frames, of height H and width W:

1. every frame is analysed by the image verifier's ``analyse`` (background from the border, palette-colour
   segmentation, connected components, template fitting: :mod:`flowalign.rewards.shapes`); detections are
   matched across frames by (colour, shape);
2. a frame *shows* the caption when its detections are exactly the caption's objects as a multiset of
   (colour, shape), as the image verifier's strict rule demands: a missing object, a second copy or any other
   object (an unknown blob included) makes the frame miss. At most ``floor(max_missing * F)`` frames may miss
   (``max_missing = 0.2``: one frame in five; none for clips of under five frames), so a decoded clip may
   flicker once;
3. each captioned object's track is its (unique) centre in the frames that show the caption; its displacement
   over the clip is the least-squares slope of x and of y against the frame index, times F - 1, over W and H
   (canvas fractions per clip; the renderer's ``displacement`` exactly, for a straight constant-speed path);
4. the direction holds when the displacement along the named axis has the named sign, is at least
   ``min_displacement`` (0.08 of the side: about half the slowest rendered motion, 0.15) and exceeds the
   displacement across it (the dominant axis);
5. for ``speed``, "slowly" needs the displacement along the axis below ``speed_threshold`` (0.35) and "quickly"
   at or above it: the midpoint of the renderer's slow (0.15-0.25) and quick (0.45-0.60) ranges.

``motion(videos)`` measures how much things move without a caption: per clip, the mean over the tracks of every
(colour, shape) seen exactly once in all but ``floor(max_missing * F)`` frames of the magnitude of its
displacement (canvas fractions per clip); 0 where no object is tracked. It is also a reward of its own,
``shapes-video-motion`` (:class:`ShapesVideoMotion`): motion that flicker and broken shapes cannot earn.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from flowalign.rewards.base import Reward, check_scores, register
from flowalign.rewards.shapes import Detection, analyse
from flowalign.zoo.shapes_video import DIRECTION_VECTORS, VIDEO_CATEGORIES, VideoSpec, parse_video_caption

MAX_MISSING = 0.2
MIN_DISPLACEMENT = 0.08
SPEED_THRESHOLD = 0.35


def _as_frames(video) -> np.ndarray:
    """(F, H, W, 3) float in [0, 1] from a (F, 3, H, W) tensor in [0, 1] or an (F, H, W, 3) array (uint8 or
    [0, 1])."""
    if torch.is_tensor(video):
        video = video.detach().float().cpu()
        video = (video.movedim(1, -1) if video.ndim == 4 and video.shape[1] == 3 else video).numpy()
    arr = np.asarray(video)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"Expected one clip as a (F, 3, H, W) tensor or an (F, H, W, 3) array, got shape "
                         f"{arr.shape}.")
    if arr.shape[0] < 2:
        raise ValueError(f"A clip needs at least 2 frames to show motion, got {arr.shape[0]}.")
    return arr


def analyse_clip(video) -> list[list[Detection]]:
    """The image verifier's detections in each frame of ``video`` (see ``_as_frames`` for the layouts)."""
    return [analyse(frame) for frame in _as_frames(video)]


def allowed_misses(frames: int, max_missing: float = MAX_MISSING) -> int:
    """How many of ``frames`` frames may fail to show the caption (or lose a tracked object)."""
    return int(np.floor(max_missing * frames + 1e-9))


def displacement(ts, xs, ys, frames: int) -> tuple[float, float]:
    """Least-squares (dx, dy) over a clip of ``frames`` frames of a track seen at frame indices ``ts``: the slopes
    of x and y against t, times ``frames - 1``. Needs two distinct frame indices."""
    t = np.asarray(ts, dtype=np.float64)
    tc = t - t.mean()
    var = tc @ tc
    if len(t) < 2 or var == 0:
        raise ValueError(f"A track needs at least two distinct frames, got frame indices {list(ts)}.")
    return (float(tc @ np.asarray(xs) / var * (frames - 1)), float(tc @ np.asarray(ys) / var * (frames - 1)))


def _track(detections: list[list[Detection]], key: tuple[str, str], frame_ok) -> tuple[list, list, list]:
    """Frame indices and centres of the one detection of ``key`` in each frame where ``frame_ok(t)`` holds."""
    ts, xs, ys = [], [], []
    for t, found in enumerate(detections):
        hits = [o for o in found if (o.color, o.shape) == key]
        if frame_ok(t) and len(hits) == 1:
            ts.append(t), xs.append(hits[0].x), ys.append(hits[0].y)
    return ts, xs, ys


def direction_holds(dx: float, dy: float, direction: str, min_displacement: float = MIN_DISPLACEMENT) -> bool:
    """Whether a displacement (dx, dy) (canvas fractions, y down) moves ``direction``: along the named axis with
    its sign by at least ``min_displacement``, and more along that axis than across it."""
    ux, uy = DIRECTION_VECTORS[direction]
    along, across = dx * ux + dy * uy, abs(dx * uy) + abs(dy * ux)
    return along >= min_displacement and along > across


def verify_clip(video, spec: VideoSpec | str, detections: list[list[Detection]] | None = None,
                max_missing: float = MAX_MISSING, min_displacement: float = MIN_DISPLACEMENT,
                speed_threshold: float = SPEED_THRESHOLD) -> bool:
    """Whether ``video`` (one clip; see ``_as_frames``) shows ``spec`` (a VideoSpec or a caption) under the rules
    of the module docstring. ``detections`` reuses an earlier ``analyse_clip(video)``."""
    spec = parse_video_caption(spec) if isinstance(spec, str) else spec
    frames = _as_frames(video)
    f, h, w = frames.shape[:3]
    if detections is not None and len(detections) != f:
        raise ValueError(f"detections cover {len(detections)} frames but the clip has {f}.")
    want = Counter((o.color, o.shape) for o in spec.objects)
    found_so_far, shows = [], []
    for t in range(f):  # frame by frame, so a clip that misses too often stops costing analysis early
        found = analyse(frames[t]) if detections is None else detections[t]
        found_so_far.append(found)
        shows.append(Counter((o.color, o.shape) for o in found) == want)
        if t + 1 - sum(shows) > allowed_misses(f, max_missing):
            return False
    detections = found_so_far
    for obj, direction, speed in zip(spec.objects, spec.directions, spec.speeds):
        ts, xs, ys = _track(detections, (obj.color, obj.shape), lambda t: shows[t])
        dx, dy = displacement(ts, xs, ys, f)
        dx, dy = dx / w, dy / h
        if not direction_holds(dx, dy, direction, min_displacement):
            return False
        if speed is not None:
            ux, uy = DIRECTION_VECTORS[direction]
            quick = dx * ux + dy * uy >= speed_threshold
            if quick != (speed == "quick"):
                return False
    return True


def clip_motion(video, detections: list[list[Detection]] | None = None, max_missing: float = MAX_MISSING) -> float:
    """The mean displacement magnitude (canvas fractions per clip) of the tracked objects of one clip (module
    docstring); 0.0 when none is tracked."""
    frames = _as_frames(video)
    f, h, w = frames.shape[:3]
    detections = analyse_clip(frames) if detections is None else detections
    keys = {(o.color, o.shape) for found in detections for o in found if o.shape != "unknown"}
    moves = []
    for key in sorted(keys):
        ts, xs, ys = _track(detections, key, lambda t: True)
        if len(ts) >= max(2, f - allowed_misses(f, max_missing)):
            dx, dy = displacement(ts, xs, ys, f)
            moves.append(np.hypot(dx / w, dy / h))
    return float(np.mean(moves)) if moves else 0.0


def clip_pixels(videos: torch.Tensor, name: str) -> np.ndarray:
    """(B, F, H, W, 3) float pixels of (B, F, 3, H, W) video in [0, 1]; clear errors naming reward ``name``
    otherwise (an image batch, a single frame, NaN or infinite pixels)."""
    if videos.ndim != 5:
        raise ValueError(f"Reward {name!r} scores whole clips: pass video as (B, F, 3, H, W), got shape "
                         f"{tuple(videos.shape)} (add a frame axis; a single image cannot show motion).")
    if videos.shape[1] < 2:
        raise ValueError(f"Reward {name!r}: clips need at least 2 frames to show motion, got shape "
                         f"{tuple(videos.shape)}.")
    finite = torch.isfinite(videos.detach()).flatten(1).all(1)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten().tolist()
        raise ValueError(f"Reward {name!r}: videos at batch indices {bad} have NaN or infinite pixels.")
    return videos.detach().float().clamp(0, 1).permute(0, 1, 3, 4, 2).cpu().numpy()


@register("shapes-video")
class ShapesVideoVerifier(Reward):
    """1.0 where a clip shows its caption (rules: module docstring), else 0.0. Not differentiable.

    Takes whole clips, (B, F, 3, H, W) in [0, 1] with one caption of the video grammar per clip (a single
    string is repeated), and returns (B,): unlike the base class it does not score frames one by one.
    ``evaluate(videos, prompts)`` gives the accuracy overall and per category present; ``motion(videos)`` the
    measured displacement per clip.
    """

    differentiable = False

    def __init__(self, max_missing: float = MAX_MISSING, min_displacement: float = MIN_DISPLACEMENT,
                 speed_threshold: float = SPEED_THRESHOLD):
        super().__init__()
        if not 0 <= max_missing < 1:
            raise ValueError(f"max_missing must be in [0, 1), got {max_missing}.")
        if not 0 < min_displacement < speed_threshold:
            raise ValueError(f"Need 0 < min_displacement < speed_threshold, got min_displacement={min_displacement}"
                             f" and speed_threshold={speed_threshold}.")
        self.max_missing, self.min_displacement, self.speed_threshold = max_missing, min_displacement, speed_threshold

    def score(self, videos: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """(B,) 0/1 scores of (B, F, 3, H, W) clips against their captions."""
        specs = [parse_video_caption(p) for p in prompts]  # parse first: a bad caption fails before any work
        clips = clip_pixels(videos, self.name)
        return torch.tensor([float(verify_clip(c, s, None, self.max_missing, self.min_displacement,
                                               self.speed_threshold)) for c, s in zip(clips, specs)])

    def forward(self, videos: torch.Tensor, prompts: str | list[str] | None = None) -> torch.Tensor:
        """Score whole clips: (B, F, 3, H, W) in [0, 1] and one caption per clip -> (B,) float32 of 0/1."""
        videos, prompts = self.check_inputs(videos, prompts)
        with torch.no_grad():
            out = check_scores(self.score(videos, prompts), videos.shape[0], self.name)
        return out.float().to(videos.device)

    def motion(self, videos: torch.Tensor) -> torch.Tensor:
        """(B,) mean displacement of the tracked objects of each clip, in canvas fractions per clip (the
        ``shapes-video-motion`` reward)."""
        return ShapesVideoMotion(self.max_missing)(videos)

    @torch.no_grad()
    def evaluate(self, videos: torch.Tensor, prompts: str | list[str]) -> dict[str, float]:
        """``{"overall": accuracy, <category>: accuracy, ...}`` over the categories present in ``prompts``."""
        scores = self(videos, prompts).cpu()
        prompts = [prompts] * len(scores) if isinstance(prompts, str) else prompts
        cats = np.array([parse_video_caption(p).category for p in prompts])
        return {"overall": float(scores.mean()), **{c: float(scores[cats == c].mean()) for c in VIDEO_CATEGORIES
                                                     if (cats == c).any()}}


@register("shapes-video-motion")
class ShapesVideoMotion(Reward):
    """How far the objects of a moving-shapes clip travel, as the verifier's tracker sees it: per clip, the mean
    over the tracked objects of the magnitude of their displacement (``clip_motion``: canvas fractions per clip;
    the renderer's slow motion is 0.15-0.25, quick 0.45-0.60), and 0 where no object is tracked.

    Unlike ``motion`` (the mean pixel change), flicker earns nothing here, and neither do fragmented or
    duplicated shapes, which the tracker cannot follow: it rewards clips whose shapes hold together and move.
    Re-DMD on shapes-wan can weight by it (``configs/re-dmd/shapes-wan-tracked.yaml``).
    Takes (B, F, 3, H, W) clips in [0, 1]; prompts are unused. Non-differentiable.
    """

    differentiable = False
    uses_prompts = False

    def __init__(self, max_missing: float = MAX_MISSING):
        super().__init__()
        if not 0 <= max_missing < 1:
            raise ValueError(f"max_missing must be in [0, 1), got {max_missing}.")
        self.max_missing = max_missing

    @torch.no_grad()
    def forward(self, videos: torch.Tensor, prompts: str | list[str] | None = None) -> torch.Tensor:
        """(B, F, 3, H, W) clips -> (B,) float32 tracked displacement."""
        videos, _ = self.check_inputs(videos, prompts)
        clips = clip_pixels(videos, self.name)
        out = torch.tensor([clip_motion(c, None, self.max_missing) for c in clips], dtype=torch.float32)
        return check_scores(out, len(clips), self.name).to(videos.device)
