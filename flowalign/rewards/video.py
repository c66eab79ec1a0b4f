"""Video rewards: clips (B, F, C, H, W) of pixels in [0, 1] + one prompt per clip -> (B,) float32.

``Reward.forward`` scores a video as the mean of its frames; the rewards here score the clip as a whole:

- ``frames`` (:class:`FrameReward`): any image reward, per frame, aggregated by mean / min / first / last;
- ``motion`` (:class:`MotionReward`): how much things move (the quantity Re-DMD prioritises), differentiable;
- ``temporal-consistency`` (:class:`TemporalConsistency`): minus the flicker (temporal second difference),
  differentiable; it is what keeps guidance on ``motion`` from winning by flicker alone;
- ``videoalign`` (:class:`VideoAlignReward`): the VideoReward model of VideoAlign (Liu et al. 2025, "Improving
  Video Generation with Human Feedback"), VQ / MQ / TA heads, from a local checkpoint; an optional extra.

Guidance (reward gradients, Flow-NRG) needs the differentiable ones; trainers (Re-DMD's motion weight,
multi-objective weights via :class:`~flowalign.rewards.MultiReward`) can use all of them.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from flowalign.functional.video import (  # noqa: F401  (re-exported)
    AGGREGATES,
    LUMA,
    aggregate_frames,
    frame_indices,
    frame_motion,
    gaussian_blur,
    prepare_frames,
    second_difference,
    shrink,
    soft_abs,
    temporal_reversal,
    to_grey,
)
from flowalign.rewards.base import Reward, check_scores, load, register
from flowalign.utils import require


# ---------------------------------------------------------------- rewards
class VideoReward(Reward):
    """Base of the rewards that score whole clips: ``score_video(videos (B, F, 3, H, W), prompts) -> (B,)``.

    Unlike :class:`Reward` it does not fold frames into the batch, and it refuses images (B, C, H, W).
    """

    min_frames: int = 2

    def check_inputs(self, images, prompts):
        images, prompts = super().check_inputs(images, prompts)
        if images.ndim != 5:
            raise ValueError(f"Reward {self.name!r} scores video: pass (B, F, C, H, W) clips, got an image batch "
                             f"of shape {tuple(images.shape)}. Use reward 'frames' to score images per frame.")
        if images.shape[1] < self.min_frames:
            raise ValueError(f"Reward {self.name!r} needs at least {self.min_frames} frames, got "
                             f"{images.shape[1]} (shape {tuple(images.shape)}).")
        return images, prompts

    def score(self, images, prompts):
        raise TypeError(f"Reward {self.name!r} scores whole clips; call it on (B, F, C, H, W), not score().")

    def score_video(self, videos: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement score_video(videos, prompts) -> (B,).")

    def forward(self, images: torch.Tensor, prompts: str | list[str] | None = None) -> torch.Tensor:
        """Score clips ``images`` (B, F, 3, H, W) against ``prompts``; returns (B,) float32."""
        images, prompts = self.check_inputs(images, prompts)
        if self.training:
            self.eval()
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.differentiable):
            out = check_scores(self.score_video(images, prompts), images.shape[0], self.name)
        return out.float().to(images.device)


def _positive(name: str, value, allow_none: bool = False, allow_zero: bool = False):
    if value is None and allow_none:
        return None
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        what = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be a finite {what} number{' or None' if allow_none else ''}, got {value!r}.")
    return value


def _size(value):
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 4):
        raise ValueError(f"size must be None or an int >= 4 (longer side in pixels), got {value!r}.")
    return value


@register("frames")
class FrameReward(Reward):
    """An image reward applied to each frame of a clip, aggregated over frames.

    ``r(video) = agg_{t in T} r_img(video[:, t])`` with ``T = {0, k, 2k, ...} + {F-1}`` (``every = k``; the last
    frame is always kept) and ``agg`` in ``mean`` (the default; what ``Reward`` does for any image reward),
    ``min`` (the worst frame: a clip is as good as its worst frame; the gradient reaches only that frame),
    ``first`` or ``last``. Images (B, C, H, W) pass straight to the inner reward.

    Args:
        reward: a built image reward, a registered name or a ``"module:Class"`` path (built with
            ``flowalign.rewards.load(reward, **kwargs)``).
        aggregate: one of ``mean``, ``min``, ``first``, ``last``.
        every: score every k-th frame (and the last), to save compute on long clips.
        name: default ``frames(<inner name>)``.

    Differentiable iff the inner reward is; uses prompts iff the inner reward does.
    """

    def __init__(self, reward, aggregate: str = "mean", every: int = 1, name: str | None = None, **kwargs):
        super().__init__()
        if aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {list(AGGREGATES)}, got {aggregate!r}.")
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every must be an int >= 1 (score every k-th frame), got {every!r}.")
        inner = load(reward, **kwargs)
        if isinstance(inner, VideoReward):
            raise TypeError(f"FrameReward wraps image rewards; {inner.name!r} already scores whole clips.")
        if inner.space != "pixel":
            raise ValueError(f"FrameReward wraps pixel rewards; {inner.name!r} takes {inner.space!r} inputs.")
        self.inner = inner
        self.aggregate, self.every = aggregate, every
        self.name = name or f"frames({inner.name})"
        self.differentiable = inner.differentiable
        self.uses_prompts = inner.uses_prompts

    def forward(self, images: torch.Tensor, prompts: str | list[str] | None = None) -> torch.Tensor:
        images, prompts = self.check_inputs(images, prompts)
        if images.ndim == 4:
            return self.inner(images, prompts)
        b, f = images.shape[:2]
        idx = frame_indices(f, self.every)
        frames = images[:, idx].flatten(0, 1)
        per_frame = self.inner(frames, [p for p in prompts for _ in idx]).view(b, len(idx))
        return check_scores(aggregate_frames(per_frame, self.aggregate), b, self.name).float()


@register("motion")
class MotionReward(VideoReward):
    """How much things move: the mean absolute change between consecutive frames, after smoothing.

    ``m = scale * mean_{t=1..F-1} mean_{c,y,x} soft_abs(G * x[t] - G * x[t-1])``, where ``x`` is each frame (grey
    luma by default), downsampled so its longer side is at most ``size``, ``G *`` a Gaussian blur of std
    ``blur`` pixels (at that size) and ``soft_abs`` the Charbonnier ``sqrt(d^2 + eps^2) - eps`` (|d| for
    |d| >> eps; smooth at 0, so the gradient has no kink where a pixel stops changing). A static clip scores 0.
    With ``saturate = m0`` the score is ``m0 * tanh(m / m0)``: like ``m`` for small motion, capped at
    ``m0``, so guidance gains little past a moderate amount of motion.

    Scale: a shape of full contrast covering 1/16 of the frame that moves a quarter of its width per frame
    changes about 1/32 of the pixels by 1 each step, so ``scale = 32`` gives it about 1 (measured: 0.96 on a
    16x16 clip, 1.00 on 32x32 and 64x64; the blur barely changes the mean absolute change of a moving edge).
    Scores grow with speed until objects move by more than their size per frame. The mean over pixels makes it
    independent of resolution.

    Flicker scores high too: independent noise of std s per frame, pixel and channel scores about
    ``scale * s * 2 / sqrt(pi) * r`` with ``r < 1`` the noise reduction of the grey conversion (0.67) and the
    blur (0.28 at ``blur = 1``), so a reward of motion alone is hacked by flicker; pair it with
    ``temporal-consistency`` (e.g. ``MultiReward({"motion": 1, "temporal-consistency": w})``).
    Differentiable; prompts are unused.
    """

    differentiable = True
    uses_prompts = False

    def __init__(self, scale: float = 32.0, blur: float = 1.0, size: int | None = 64, grey: bool = True,
                 saturate: float | None = None, eps: float = 1e-3):
        super().__init__()
        self.scale = _positive("scale", scale)
        self.blur = _positive("blur", blur, allow_zero=True)
        self.size = _size(size)
        self.grey = bool(grey)
        self.saturate = _positive("saturate", saturate, allow_none=True)
        self.eps = _positive("eps", eps)

    def score_video(self, videos: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        m = self.scale * frame_motion(prepare_frames(videos, self.grey, self.size, self.blur), self.eps)
        return m if self.saturate is None else self.saturate * torch.tanh(m / self.saturate)


@register("temporal-consistency")
class TemporalConsistency(VideoReward):
    """Minus the flicker: ``-scale * mean_{t=1..F-2} mean_{c,y,x} p(x[t-1], x[t], x[t+1])`` per clip.

    Two measures ``p`` of how much a pixel's value goes back and forth over three consecutive frames:

    - ``"reversal"`` (default): ``|d0| + |d1| - |d0 + d1|`` with ``d0 = x[t] - x[t-1]``, ``d1 = x[t+1] - x[t]``,
      i.e. ``2 min(|d0|, |d1|)`` where the change reverses direction and 0 where it is monotone. Zero for static
      clips, fades and constant-velocity translation of shapes that move less than their own width per frame
      (each pixel is crossed by an edge once: a monotone step); large for flicker, which goes up and down.
      Same units as ``motion`` (mean absolute change); default ``scale = 32`` matches it, so equal weights in
      ``MultiReward({"motion": 1, "temporal-consistency": 1})`` make flicker cost more than it gains.
    - ``"second-difference"``: ``(x[t+1] - 2 x[t] + x[t-1])^2``, zero where a pixel changes linearly in time
      (static clips, fades) but not for translation: an edge passing a pixel is a step in time, so sharp moving
      shapes are penalised about as much as frame-wise noise of std 0.1 (measured: 1 px/frame on a 16x16 clip).
      Default ``scale = 1``. A blur (``blur``) smooths edges so slow motion scores nearer 0.

    A static clip scores the maximum, 0. Frames are optionally grey, downsampled to a longer side of at most
    ``size`` and blurred (std ``blur`` pixels; default none, since blurring also hides flicker). Colour is kept
    by default (``grey=False``) so hue flicker counts.

    ``backbone``: optionally measure it in an image feature space: a callable (N, 3, H, W) pixels -> (N, ...)
    features, or an object with ``embed_images`` (e.g. a :class:`~flowalign.rewards.clip.ClipBackbone`). Then
    ``x[t]`` is the frame's flattened feature vector, the mean runs over features, and ``grey``/``size``/``blur``
    are not applied (the backbone sees the raw frames): content that stays the same while it moves costs
    little, content that flickers costs a lot. Differentiable when the backbone is; prompts are unused. Needs 3
    frames.
    """

    differentiable = True
    uses_prompts = False
    min_frames = 3
    MEASURES = {"reversal": 32.0, "second-difference": 1.0}  # measure -> default scale

    def __init__(self, measure: str = "reversal", scale: float | None = None, blur: float = 0.0,
                 size: int | None = 64, grey: bool = False, backbone: Callable | None = None):
        super().__init__()
        if measure not in self.MEASURES:
            raise ValueError(f"measure must be one of {list(self.MEASURES)}, got {measure!r}.")
        self.measure = measure
        self.scale = self.MEASURES[measure] if scale is None else _positive("scale", scale)
        self.blur = _positive("blur", blur, allow_zero=True)
        self.size = _size(size)
        self.grey = bool(grey)
        if backbone is not None and not (callable(backbone) or hasattr(backbone, "embed_images")):
            raise TypeError("backbone must be a callable (N, 3, H, W) -> (N, ...) features or an object with "
                            f"embed_images, got {type(backbone).__name__}.")
        self.backbone = backbone

    def features(self, videos: torch.Tensor) -> torch.Tensor:
        """(B, F, 3, H, W) -> (B, F, D) per-frame backbone features (fp32)."""
        b, f = videos.shape[:2]
        embed = getattr(self.backbone, "embed_images", self.backbone)
        feats = embed(videos.flatten(0, 1))
        if not torch.is_tensor(feats) or feats.ndim < 1 or feats.shape[0] != b * f:
            raise ValueError(f"Reward {self.name!r}: the backbone must return a tensor with one row per frame "
                             f"({b * f}), got {getattr(feats, 'shape', type(feats).__name__)}.")
        return feats.float().reshape(b, f, -1)

    def score_video(self, videos: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if self.backbone is not None:
            x = self.features(videos)
        else:
            x = prepare_frames(videos, self.grey, self.size, self.blur)
        p = temporal_reversal(x) if self.measure == "reversal" else second_difference(x).pow(2)
        return -self.scale * p.flatten(1).mean(1)


#: VideoReward's output keys per head
VIDEOALIGN_HEADS = {"vq": "VQ", "mq": "MQ", "ta": "TA"}


@register("videoalign")
class VideoAlignReward(VideoReward):
    """VideoAlign's VideoReward (Liu et al. 2025): a Qwen2-VL reward model with three heads, VQ (visual
    quality), MQ (motion quality), TA (text alignment); ``overall`` is VQ + MQ + TA.

    The model and its inference code are not part of flowalign: ``path`` is a LOCAL VideoReward checkpoint folder
    (with ``model_config.json``; nothing is downloaded), and the inference class ``VideoVLMRewardInference`` is
    imported from ``module`` (default ``"inference"``: VideoAlign's repository folder on ``PYTHONPATH``), or pass
    a built backend as ``model``. The backend must offer ``reward_from_frames(videos, prompts, use_norm)``
    taking a list of (F, C, H, W) frame tensors (scaled by ``pixel_scale``: 255, i.e. 0..255, unless your copy
    expects [0, 1]) and returning ``{"VQ", "MQ", "TA"}`` -> (B,) scores (z-normalised by the checkpoint's
    statistics when ``use_norm``). ``overall`` is computed here as the sum, whatever the backend calls Overall.

    Not differentiable: it runs under no_grad on detached CPU frames unless ``differentiable=True``, which only
    helps if your backend keeps the graph from the frame tensors to the logits (untested). Only argument
    checking and the frame/head plumbing (with a stub backend) are tested here; the real model is not.
    """

    differentiable = False

    def __init__(self, path: str | None = None, head: str = "overall", model=None, module: str = "inference",
                 device: str = "cpu", dtype: torch.dtype = torch.bfloat16, use_norm: bool = True,
                 pixel_scale: float = 255.0, differentiable: bool = False):
        super().__init__()
        if head not in (*VIDEOALIGN_HEADS, "overall"):
            raise ValueError(f"head must be one of {[*VIDEOALIGN_HEADS, 'overall']}, got {head!r}.")
        self.head, self.use_norm = head, bool(use_norm)
        self.pixel_scale = _positive("pixel_scale", pixel_scale)
        self.differentiable = bool(differentiable)
        self.backend = model if model is not None else self._build(path, module, device, dtype)
        if not callable(getattr(self.backend, "reward_from_frames", None)):
            raise TypeError(f"The VideoAlign backend {type(self.backend).__name__} has no reward_from_frames(videos, "
                            "prompts, use_norm); flowalign scores frame tensors, not video files.")

    @staticmethod
    def _build(path, module: str, device: str, dtype):
        if path is None:
            raise ValueError("VideoAlignReward needs path= (a local VideoReward checkpoint folder holding "
                             "model_config.json) or model= (a built VideoVLMRewardInference); nothing is downloaded.")
        if not (Path(path) / "model_config.json").is_file():
            raise FileNotFoundError(f"VideoAlignReward path={str(path)!r} is not a VideoReward checkpoint folder "
                                    "(no model_config.json there).")
        require("qwen_vl_utils", "videoalign")
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            raise ImportError(f"Cannot import VideoAlign's inference code as module={module!r} ({e}). It is not a "
                              "pip package: add VideoAlign's repository folder to PYTHONPATH, or pass module= the "
                              "import path of the file that defines VideoVLMRewardInference.") from e
        cls = getattr(mod, "VideoVLMRewardInference", None)
        if cls is None:
            raise ImportError(f"Module {module!r} has no VideoVLMRewardInference; pass module= the one that does.")
        return cls(str(path), device=device, dtype=dtype)

    def score_video(self, videos: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        frames = videos.float() * self.pixel_scale
        if not self.differentiable:
            frames = frames.detach().cpu()
        out = self.backend.reward_from_frames(list(frames.unbind(0)), prompts, use_norm=self.use_norm)
        if not isinstance(out, Mapping) or not all(k in out for k in VIDEOALIGN_HEADS.values()):
            keys = sorted(out) if isinstance(out, Mapping) else type(out).__name__
            raise ValueError(f"Reward {self.name!r}: the backend returned {keys}; expected a mapping with keys "
                             f"{sorted(VIDEOALIGN_HEADS.values())}.")
        heads = {k: torch.as_tensor(out[v]).float().reshape(-1).to(videos.device)
                 for k, v in VIDEOALIGN_HEADS.items()}
        return sum(heads.values()) if self.head == "overall" else heads[self.head]
