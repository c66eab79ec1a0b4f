"""The moving-shapes video world: caption grammar, splits, renderer (paths inside the canvas, as captioned), and
the ``shapes-video`` verifier (exact on ground truth of both splits and any background, rejects noise, static,
reversed and wrong-speed clips, tolerates one missing frame in five) with clear errors on bad input."""

from __future__ import annotations

import math
from collections import Counter
from typing import NamedTuple

import numpy as np
import pytest
import torch

from flowalign.rewards.base import load
from flowalign.rewards.shapes_video import (
    ShapesVideoMotion,
    ShapesVideoVerifier,
    analyse_clip,
    clip_motion,
    direction_holds,
    displacement,
    verify_clip,
)
from flowalign.zoo import shapes_video as sv
from flowalign.zoo.shapes_data import COLORS, SHAPES, SPLITS, Obj
from flowalign.zoo.shapes_video import VIDEO_CATEGORIES, VideoSpec, parse_video_caption


class Render(NamedTuple):
    clip: np.ndarray  # (F, H, W, 3) uint8
    spec: VideoSpec
    background: tuple[int, int, int]
    tracks: list


def renders(specs, seed: int, frames: int = 9, size: int = 32) -> list[Render]:
    """Clips as ``render_clip`` draws them from one generator, with the background and tracks replayed from a
    copy of its state (render_clip draws the background, then the layout)."""
    rng, out = np.random.default_rng(seed), []
    for spec in specs:
        replay = np.random.default_rng()
        replay.bit_generator.state = rng.bit_generator.state
        clip = sv.render_clip(spec, frames, size, rng)
        out.append(Render(clip, spec, sv.background(replay), sv.clip_layout(spec, size, replay)))
    return out


def per_category(split: str, n: int, seed: int) -> list[VideoSpec]:
    return [s for c in VIDEO_CATEGORIES for s in sv.sample_specs(n, split, seed, weights={c: 1.0})]


def as_videos(clips) -> torch.Tensor:
    """(B, F, 3, H, W) float in [0, 1] from (F, H, W, 3) uint8 clips."""
    return torch.from_numpy(np.stack(clips)).permute(0, 1, 4, 2, 3).float() / 255


def with_speed(spec: VideoSpec, speed: str) -> VideoSpec:
    return VideoSpec("speed", spec.objects, spec.directions, (speed,))


@pytest.fixture(scope="module")
def gt():
    """20 ground-truth clips per category and split, with each clip's detections (analysed once)."""
    out = {}
    for i, split in enumerate(SPLITS):
        data = renders(per_category(split, 20, seed=20 + i), seed=30 + i)
        out[split] = [(r, analyse_clip(r.clip)) for r in data]
    return out


# ------------------------------------------------------------------------------------------------ grammar
def test_captions_round_trip_and_use_only_the_vocabulary():
    specs = sv.all_video_specs()
    assert Counter(s.category for s in specs) == {"motion": 72, "speed": 144, "pair": 2160}
    assert all(parse_video_caption(s.caption()) == s for s in specs)
    words = {w for s in specs for w in s.caption().split()}
    assert words == set(sv.VIDEO_WORDS) and len(sv.VIDEO_WORDS) == len(set(sv.VIDEO_WORDS))
    assert parse_video_caption("  A Red  Circle moving LEFT. ") == VideoSpec("motion", (Obj("red", "circle"),),
                                                                             ("left",))
    assert VideoSpec("speed", (Obj("red", "circle"),), ("right",), ("slow",)).caption() == \
        "a red circle moving slowly to the right"
    quick_up = VideoSpec("speed", (Obj("red", "circle"),), ("up",), ("quick",))
    assert quick_up.caption() == "a red circle moving quickly up"
    pair = VideoSpec("pair", (Obj("red", "circle"), Obj("blue", "square")), ("left", "up"))
    assert pair.caption() == "a red circle moving left and a blue square moving up" and pair.speeds == (None, None)


@pytest.mark.parametrize("caption", [
    "", "a red circle", "a pink circle moving left", "a red hexagon moving up", "a red circle moving sideways",
    "a red circle moving to the left", "a red circle moving slowly left", "a red circle moving quickly to the up",
    "a red circle moving left and a red square moving up", "a red circle moving left and a blue circle moving up",
    "a red circle moving left and a blue square moving left", "two red circles moving left"])
def test_captions_outside_the_grammar_are_clear_errors(caption):
    with pytest.raises(ValueError, match="not in the video grammar") as e:
        parse_video_caption(caption)
    assert repr(caption) in str(e.value) and "a red circle moving left" in str(e.value)


def test_invalid_specs_are_clear_errors():
    red, blue = Obj("red", "circle"), Obj("blue", "square")
    with pytest.raises(ValueError, match="category 'colors'"):
        VideoSpec("colors", (red,), ("left",))
    with pytest.raises(ValueError, match="speeds"):
        VideoSpec("speed", (red,), ("left",))  # a speed caption needs its speed class
    with pytest.raises(ValueError, match="speeds"):
        VideoSpec("motion", (red,), ("left",), ("slow",))
    with pytest.raises(ValueError, match="directions"):
        VideoSpec("motion", (red,), ("north",))
    with pytest.raises(ValueError, match="differ in colour, in shape and in direction"):
        VideoSpec("pair", (red, blue), ("up", "up"))
    with pytest.raises(ValueError, match="needs 2 object"):
        VideoSpec("pair", (red,), ("up",))


# ------------------------------------------------------------------------------------------------ splits
def test_splits_are_disjoint_compositions_with_a_fifth_held_out():
    def composition(s: VideoSpec):  # what a split holds out: the (object, direction) set, order and speed aside
        return frozenset(zip(s.objects, s.directions))

    for category in VIDEO_CATEGORIES:
        train, test = (sv.specs_for(split, category) for split in SPLITS)
        assert {composition(s) for s in train}.isdisjoint(composition(s) for s in test)
        assert len(train) + len(test) == len(sv.all_video_specs(category))
        assert 0.1 <= len(test) / (len(train) + len(test)) <= 0.3, (category, len(test))
    held = {composition(s) for s in sv.specs_for("test", "motion")}  # one held-out triple set for both categories
    assert held == {composition(s) for s in sv.specs_for("test", "speed")}
    with pytest.raises(ValueError, match="split 'val'"):
        sv.specs_for("val")


def test_sampling_keeps_its_proportions_and_its_split():
    specs = sv.sample_specs(3000, "test", seed=1)
    assert specs == sv.sample_specs(3000, "test", seed=1) and specs != sv.sample_specs(3000, "test", seed=2)
    assert all(sv.split_of(s) == "test" for s in specs)
    share = Counter(s.category for s in specs)
    for category, weight in sv.DEFAULT_WEIGHTS.items():
        assert abs(share[category] / 3000 - weight) < 0.03
    prompts = sv.eval_prompts("test", per_category=25, seed=0)
    assert prompts == sv.eval_prompts("test", per_category=25, seed=0)
    assert Counter(s.category for s in prompts) == {c: 25 for c in VIDEO_CATEGORIES}
    assert all(sv.split_of(s) == "test" for s in prompts)
    motion = Counter(s for s in prompts if s.category == "motion")  # a pool of 19: each once, six twice
    assert len(motion) == len(sv.specs_for("test", "motion")) == 19 and sorted(Counter(motion.values()).items()) \
        == [(1, 13), (2, 6)]
    assert len({s for s in prompts if s.category != "motion"}) == 50


# ------------------------------------------------------------------------------------------------ renderer
@pytest.mark.parametrize("size", [24, 32, 64])
def test_paths_stay_inside_move_as_captioned_and_never_overlap(size):
    rng = np.random.default_rng(size)
    for spec in per_category("train", 100, seed=size) + per_category("test", 30, seed=size):
        tracks = sv.clip_layout(spec, size, rng)
        assert [t.obj for t in tracks] == list(spec.objects)
        for track, direction, speed in zip(tracks, spec.directions, spec.speeds):
            path, r = track.positions(9), track.radius
            assert 3.0 <= r <= max(3.0, 0.15 * size)
            assert path.min() >= r + 1 - 1e-9 and path.max() <= size - r - 1 + 1e-9  # 1 px off the border
            ux, uy = sv.DIRECTION_VECTORS[direction]
            dx, dy = path[-1] - path[0]
            assert dx * uy == 0 and dy * ux == 0  # straight along the named axis, with its sign
            lo, hi = sv.SPEED_RANGES.get(speed, sv.ANY_SPEED)
            assert lo * size - 1e-9 <= dx * ux + dy * uy <= hi * size + 1e-9
            assert np.allclose(np.diff(path, axis=0), (path[-1] - path[0]) / 8)  # constant velocity
        if spec.category == "pair":
            a, b = tracks
            gaps = np.linalg.norm(a.positions(50) - b.positions(50), axis=1)
            reach = sv.outer_radius(a.obj.shape) * a.radius + sv.outer_radius(b.obj.shape) * b.radius
            assert gaps.min() > reach + sv.PAIR_GAP - 1e-9


def test_rendered_frames_keep_the_border_plain_and_show_the_shapes(gt):
    for r, _ in gt["train"]:
        clip = r.clip
        assert clip.shape == (9, 32, 32, 3) and clip.dtype == np.uint8
        border = np.concatenate([clip[:, 0], clip[:, -1], clip[:, :, 0], clip[:, :, -1]], axis=1)
        assert (border == r.background).all()  # every shape stays inside the canvas in every frame
        changed = (clip != np.array(r.background, dtype=np.uint8)).any(-1).sum((1, 2))
        assert changed.min() >= 9 * len(r.spec.objects)  # every frame shows its objects
        assert not np.array_equal(clip[0], clip[-1])


def test_dataset_layout_dtype_range_and_determinism():
    videos, captions, specs = sv.dataset(6, "train", seed=3, size=32, frames=5)
    assert videos.shape == (6, 5, 3, 32, 32) and videos.dtype == torch.float32
    assert 0 <= float(videos.min()) and float(videos.max()) <= 1 and float(videos.std()) > 0
    assert [parse_video_caption(c) for c in captions] == specs and all(sv.split_of(s) == "train" for s in specs)
    again, _, _ = sv.dataset(6, "train", seed=3, size=32, frames=5)
    assert torch.equal(videos, again)
    clip = sv.render_clip(specs[0], frames=2, size=32, rng=np.random.default_rng(0))
    assert clip.shape == (2, 32, 32, 3)
    for kwargs, match in (({"frames": 1}, "frames must be"), ({"size": 16}, "size must be")):
        with pytest.raises(ValueError, match=match):
            sv.dataset(2, **kwargs)


# ------------------------------------------------------------------------------------------------ verifier
def test_registered_and_not_differentiable():
    reward = load("shapes-video")
    assert isinstance(reward, ShapesVideoVerifier) and reward.name == "shapes-video" and not reward.differentiable


@pytest.mark.parametrize("split", SPLITS)
def test_ground_truth_clips_verify_and_their_motion_is_measured(gt, split):
    acc: dict[str, list[bool]] = {}
    for r, found in gt[split]:
        acc.setdefault(r.spec.category, []).append(verify_clip(r.clip, r.spec, found))
        truth = np.mean([math.hypot(*t.displacement) / 32 for t in r.tracks])
        assert abs(clip_motion(r.clip, found) - truth) < 0.02, (r.spec.caption(), truth)
    result = {c: float(np.mean(v)) for c, v in acc.items()}
    assert set(result) == set(VIDEO_CATEGORIES) and min(result.values()) >= 0.99, result


def test_reward_scores_whole_clips_end_to_end(gt):
    data = [r for r, _ in gt["test"][::10]]  # 2 clips per category
    videos, captions = as_videos([r.clip for r in data]), [r.spec.caption() for r in data]
    reward = ShapesVideoVerifier()
    scores = reward(videos, captions)
    assert scores.shape == (6,) and scores.dtype == torch.float32 and scores.tolist() == [1.0] * 6
    assert verify_clip(videos[0], captions[0]) and not verify_clip(videos[0].flip(0), captions[0])  # one tensor clip
    assert reward.evaluate(videos[::2], captions[::2]) == {"overall": 1.0, "motion": 1.0, "speed": 1.0, "pair": 1.0}
    assert reward(videos.flip(1), captions).tolist() == [0.0] * 6  # played backwards: every direction flips
    static = videos[:, :1].expand_as(videos)
    assert reward(static, captions).tolist() == [0.0] * 6  # a shape that does not move fails its caption
    moving, still = reward.motion(videos[::2]), reward.motion(static[::2])
    assert moving.shape == (3,) and float(moving.min()) >= 0.14 and float(still.abs().max()) < 1e-6


def test_tracked_motion_reward_pays_for_travel_not_flicker(gt):
    data = [r for r, _ in gt["test"][::10]]
    videos = as_videos([r.clip for r in data])
    reward = load("shapes-video-motion")
    assert isinstance(reward, ShapesVideoMotion) and not reward.differentiable and not reward.uses_prompts
    moving = reward(videos)  # no prompts needed
    assert moving.shape == (6,) and moving.dtype == torch.float32 and float(moving.min()) >= 0.14
    assert torch.equal(moving, ShapesVideoVerifier().motion(videos))
    speed = [r for r, _ in gt["test"] if r.spec.category == "speed" and len(r.spec.objects) == 1]
    by_speed = {v: reward(as_videos([r.clip for r in speed if r.spec.speeds == (v,)])) for v in ("slow", "quick")}
    assert min(map(len, by_speed.values())) >= 3 and float(by_speed["quick"].min()) > float(by_speed["slow"].max())
    # a still shape that blinks, or still frames with noise: much pixel change (`motion`), no travel
    still = videos[:, :1].expand_as(videos).clone()
    blink = still.clone()
    blink[:, 1::2] = blink[:, :1, :, :1, :1]  # every other frame is the background colour alone
    noisy = (still + 0.05 * torch.randn(still.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    pixel_motion = load("motion")
    for flicker in (blink, noisy):
        assert float(pixel_motion(flicker).mean()) > 0.1
        assert float(reward(flicker).abs().max()) < 0.02
    with pytest.raises(ValueError, match=r"'shapes-video-motion' scores whole clips"):
        reward(videos[:, 0])
    bad = videos.clone()
    bad[1, 2, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"batch indices \[1\] have NaN"):
        reward(bad)


def test_direction_speed_and_objects_are_checked(gt):
    for r, found in gt["train"] + gt["test"]:
        spec = r.spec
        assert not verify_clip(r.clip[::-1], spec, found[::-1])  # reversed
        across = {"left": ("up", "down"), "right": ("up", "down"), "up": ("left", "right"), "down": ("left", "right")}
        turned = next(d for d in across[spec.directions[0]] if d not in spec.directions)
        other = spec.objects[0]
        recolor = Obj(next(c for c in COLORS if c not in {o.color for o in spec.objects}), other.shape)
        reshape = Obj(other.color, next(s for s in SHAPES if s not in {o.shape for o in spec.objects}))
        wrong = [VideoSpec(spec.category, spec.objects, (turned, *spec.directions[1:]), spec.speeds)]
        wrong += [VideoSpec(spec.category, (o, *spec.objects[1:]), spec.directions, spec.speeds)
                  for o in (recolor, reshape)]
        if spec.category == "speed":
            wrong.append(with_speed(spec, "quick" if spec.speeds == ("slow",) else "slow"))
        if spec.category == "pair":
            wrong.append(VideoSpec("motion", spec.objects[:1], spec.directions[:1]))  # an extra object
        for w in wrong:
            assert not verify_clip(r.clip, w, found), (spec.caption(), w.caption())


def test_a_slow_clip_fails_quickly_end_to_end():
    spec = parse_video_caption("a green triangle moving slowly to the left")
    clips = [r.clip for r in renders([spec] * 4, seed=9)]
    reward = ShapesVideoVerifier()
    assert reward(as_videos(clips), spec.caption()).tolist() == [1.0] * 4
    assert reward(as_videos(clips), "a green triangle moving quickly to the left").tolist() == [0.0] * 4
    assert reward(as_videos(clips), "a green triangle moving left").tolist() == [1.0] * 4


def test_noise_videos_score_zero():
    g = torch.Generator().manual_seed(0)
    captions = [s.caption() for s in sv.sample_specs(60, "train", seed=5)]
    noise = torch.rand(60, 9, 3, 32, 32, generator=g)
    blank = torch.rand(20, 1, 3, 1, 1, generator=g).expand(20, 9, 3, 32, 32)
    reward = ShapesVideoVerifier()
    assert float(reward(noise, captions).mean()) <= 0.02
    assert float(reward(blank, captions[:20]).sum()) == 0 and float(reward.motion(blank).abs().max()) == 0


def test_one_missing_frame_in_five_is_tolerated(gt):
    for r, found in gt["test"][::8]:
        blank = np.broadcast_to(np.array(r.background, dtype=np.uint8), r.clip.shape[1:])
        one, two = r.clip.copy(), r.clip.copy()
        one[4] = blank
        two[[2, 6]] = blank
        assert verify_clip(one, r.spec, [*found[:4], [], *found[5:]])
        assert not verify_clip(two, r.spec, [*found[:2], [], *found[3:6], [], *found[7:]])
        assert verify_clip(one, r.spec) and not verify_clip(two, r.spec)  # the same from pixels


def test_soft_and_noisy_clips_still_verify(gt):
    """Decoded clips are softer and noisier than renders: a 3x3 binomial blur or N(0, 8/255) noise keeps them."""
    data = [r for r, _ in gt["test"][::5]]  # 4 clips per category
    videos, specs = as_videos([r.clip for r in data]), [r.spec for r in data]
    k = torch.tensor([0.25, 0.5, 0.25])
    kernel = (k[:, None] * k[None]).expand(3, 1, 3, 3)
    flat = videos.flatten(0, 1)
    blurred = torch.nn.functional.conv2d(torch.nn.functional.pad(flat, (1, 1, 1, 1), mode="replicate"), kernel,
                                         groups=3).view_as(videos)
    noisy = (videos + 8 / 255 * torch.randn(videos.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    reward = ShapesVideoVerifier()
    for degraded in (blurred, noisy):
        assert float(reward(degraded, [s.caption() for s in specs]).mean()) >= 0.95


@pytest.mark.parametrize("bg", [(0, 0, 0), (255, 255, 255), (140, 128, 116)])
def test_any_background(monkeypatch, bg):
    """Extremes beyond the renderer's own backgrounds (which the ground-truth clips cover)."""
    monkeypatch.setattr(sv, "background", lambda rng: bg)
    data = renders(per_category("test", 1, seed=sum(bg)) + per_category("train", 1, seed=1), seed=sum(bg))
    assert all((r.clip[:, 0, 0] == bg).all() for r in data)
    assert all(verify_clip(r.clip, r.spec) for r in data)


def test_motion_rules():
    assert displacement([0, 1, 2, 4], [1.0, 2.0, 3.0, 5.0], [7.0] * 4, frames=9) == pytest.approx((8.0, 0.0))
    with pytest.raises(ValueError, match="two distinct frames"):
        displacement([3], [1.0], [1.0], frames=9)
    assert direction_holds(-0.2, 0.05, "left") and not direction_holds(-0.2, 0.05, "right")
    assert not direction_holds(-0.05, 0.0, "left")  # under the minimum displacement
    assert not direction_holds(-0.2, 0.3, "left") and direction_holds(-0.2, 0.3, "down")  # the dominant axis
    assert direction_holds(0.0, -0.5, "up") and not direction_holds(0.0, -0.5, "down")


# ------------------------------------------------------------------------------------------------ errors
def test_bad_input_is_a_clear_error():
    reward = ShapesVideoVerifier()
    with pytest.raises(ValueError, match=r"whole clips.*\(B, F, 3, H, W\)"):
        reward(torch.rand(2, 3, 32, 32), "a red circle moving left")
    with pytest.raises(ValueError, match=r"whole clips"):
        reward.motion(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="got 2 images but 3 prompts"):
        reward(torch.rand(2, 9, 3, 32, 32), ["a red circle moving left"] * 3)
    with pytest.raises(ValueError, match="not in the video grammar"):
        reward(torch.rand(1, 9, 3, 32, 32), ["a red circle"])
    with pytest.raises(ValueError, match="at least 2 frames"):
        reward(torch.rand(1, 1, 3, 32, 32), ["a red circle moving left"])
    nan = torch.rand(3, 9, 3, 32, 32)
    nan[1, 4, 0, 5, 5] = float("nan")
    with pytest.raises(ValueError, match=r"indices \[1\].*NaN"):
        reward(nan, "a red circle moving left")
    with pytest.raises(ValueError, match="max_missing"):
        ShapesVideoVerifier(max_missing=1.5)
