"""Reward adapters: ``load(name_or_path, **kwargs)`` gives a ``Reward``, pixels in [0, 1] + prompts -> (B,).

Registered names (``available()``): ``clip``, ``pickscore``, ``hps``, ``aesthetic``, ``imagereward``,
``jpeg-compressibility``, ``jpeg-incompressibility``,
``shapes-clip``, ``shapes-geneval``, ``shapes-geneval-partial``, ``shapes-geneval-soft``,
``shapes-layout``, ``shapes-position``, ``shapes-video``, ``shapes-video-motion``,
``frames``, ``motion``, ``temporal-consistency``, ``videoalign`` (video),
``latent`` (a trained noise-aware latent reward: ``path=RUN_DIR``). Heavy model code is imported when a reward is built.
"""

from flowalign.rewards.aesthetic import AestheticMLP, LaionAesthetic
from flowalign.rewards.base import MultiReward, Reward, available, check_scores, load, register
from flowalign.rewards.clip import ClipBackbone, CLIPScore
from flowalign.rewards.hps import HPSv2
from flowalign.rewards.imagereward import ImageReward
from flowalign.rewards.jpeg import JpegCompressibility, JpegIncompressibility, jpeg_size_kb
from flowalign.rewards.latent import (
    BackboneLatentReward,
    LatentReward,
    LatentRewardNet,
    TrainableLatentReward,
    load_latent_reward,
)
from flowalign.rewards.pickscore import PickScore
from flowalign.rewards.preprocess import resize_and_normalize
from flowalign.rewards.shapes import ShapesPartialVerifier, ShapesVerifier  # noqa: F401  (registers both)
from flowalign.rewards.shapes_clip import ShapesClip
from flowalign.rewards.shapes_layout import ShapesLayout, ShapesPosition
from flowalign.rewards.shapes_soft import ShapesSoftVerifier
from flowalign.rewards.shapes_video import (  # noqa: F401  (registers "shapes-video", "shapes-video-motion")
    ShapesVideoMotion,
    ShapesVideoVerifier,
)
from flowalign.rewards.video import FrameReward, MotionReward, TemporalConsistency, VideoAlignReward, VideoReward

__all__ = [
    "AestheticMLP", "BackboneLatentReward", "CLIPScore", "ClipBackbone", "FrameReward", "HPSv2", "ImageReward",
    "JpegCompressibility", "JpegIncompressibility", "LaionAesthetic", "LatentReward", "LatentRewardNet",
    "MotionReward", "MultiReward", "PickScore", "Reward", "ShapesClip", "ShapesLayout", "ShapesPosition",
    "ShapesSoftVerifier", "ShapesVideoMotion", "ShapesVideoVerifier",
    "TemporalConsistency",
    "TrainableLatentReward", "VideoAlignReward", "VideoReward", "available", "check_scores",
    "jpeg_size_kb", "load", "load_latent_reward", "register", "resize_and_normalize",
]
