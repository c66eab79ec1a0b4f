"""Video rewards on synthetic clips (a square translating over a 16x16 canvas), and video grids in run reports."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image

import flowalign.rewards as fr
from flowalign.rewards import MultiReward, Reward
from flowalign.rewards.video import (
    FrameReward,
    MotionReward,
    TemporalConsistency,
    VideoAlignReward,
    frame_indices,
    gaussian_blur,
)

PROMPTS = ["a red square", "a blue square"]


def square_clip(speed: float, frames: int = 6, n: int = 16, side: int = 4, batch: int = 2) -> torch.Tensor:
    """(batch, frames, 3, n, n): a white square on black moving right by ``speed`` px per frame."""
    v = torch.zeros(batch, frames, 3, n, n)
    top = n // 2 - side // 2
    for t in range(frames):
        x0 = 1 + round(speed * t)
        v[:, t, :, top:top + side, x0:x0 + side] = 1.0
    return v


def flicker(clip: torch.Tensor, std: float, seed: int = 0) -> torch.Tensor:
    return clip + std * torch.randn(clip.shape, generator=torch.Generator().manual_seed(seed))


class Brightness(Reward):
    """A differentiable image reward whose value depends on the prompt: weighted channel means."""

    name = "test-brightness"

    def score(self, images, prompts):
        w = torch.tensor([[1.0, 2.0, 3.0] if "red" in p else [3.0, 1.0, 0.5] for p in prompts])
        return (images.mean((-1, -2)) * w).sum(-1)


def random_clip(b=2, f=5, seed=0):
    return torch.rand(b, f, 3, 12, 10, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- FrameReward
@pytest.mark.parametrize("aggregate", ["mean", "min", "first", "last"])
def test_frame_reward_equals_manual_per_frame_loop(aggregate):
    clip, inner = random_clip(), Brightness()
    got = FrameReward(inner, aggregate=aggregate)(clip, PROMPTS)
    per_frame = torch.stack([inner(clip[:, t], PROMPTS) for t in range(clip.shape[1])], 1)  # (B, F)
    want = {"mean": per_frame.mean(1), "min": per_frame.min(1).values, "first": per_frame[:, 0],
            "last": per_frame[:, -1]}[aggregate]
    assert got.shape == (2,) and got.dtype == torch.float32
    torch.testing.assert_close(got, want)


def test_frame_reward_min_takes_the_worst_frame_and_every_subsamples():
    clip = torch.full((1, 7, 3, 8, 8), 0.8)
    clip[0, 3] = 0.1  # one dark frame
    inner = Brightness()
    assert FrameReward(inner, aggregate="min")(clip, "a red square").item() == pytest.approx(0.1 * 6)
    assert FrameReward(inner, aggregate="mean")(clip, "a red square").item() > 0.1 * 6 + 1.0
    # every=2 scores frames 0, 2, 4, 6: the dark frame 3 is skipped; every=4 keeps 0, 4 and the last, 6
    assert FrameReward(inner, aggregate="min", every=2)(clip, "a red square").item() == pytest.approx(0.8 * 6)
    assert frame_indices(7, 4) == [0, 4, 6] and frame_indices(7, 3) == [0, 3, 6] and frame_indices(1, 5) == [0]
    clip[0, 6] = 0.2  # the last frame is always kept
    assert FrameReward(inner, aggregate="min", every=4)(clip, "a red square").item() == pytest.approx(0.2 * 6)


def test_frame_reward_gradients_images_name_and_registry():
    inner = Brightness()
    reward = FrameReward(inner, aggregate="min")
    assert reward.name == "frames(test-brightness)" and reward.differentiable
    clip = random_clip().requires_grad_(True)
    reward(clip, PROMPTS).sum().backward()
    assert torch.isfinite(clip.grad).all()
    nonzero_frames = (clip.grad.abs().flatten(2).sum(-1) > 0).sum(1)
    assert nonzero_frames.tolist() == [1, 1]  # min: the gradient reaches exactly the worst frame of each clip
    img = random_clip()[:, 0]
    torch.testing.assert_close(reward(img, PROMPTS), inner(img, PROMPTS))  # images pass straight through
    built = fr.load("frames", reward="jpeg-compressibility", aggregate="last", name="jpeg-last")
    assert isinstance(built, FrameReward) and built.name == "jpeg-last"
    assert not built.differentiable and not built.uses_prompts
    assert built(random_clip(), None).shape == (2,)


def test_frame_reward_bad_arguments():
    with pytest.raises(ValueError, match="aggregate"):
        FrameReward(Brightness(), aggregate="median")
    with pytest.raises(ValueError, match="every"):
        FrameReward(Brightness(), every=0)
    with pytest.raises(TypeError, match="already scores whole clips"):
        FrameReward(MotionReward())
    with pytest.raises(ValueError, match="got 2 images but 3 prompts"):
        FrameReward(Brightness())(random_clip(), ["a", "b", "c"])


# ---------------------------------------------------------------- MotionReward
def test_motion_is_zero_when_static_and_grows_with_speed():
    m = MotionReward()
    scores = [m(square_clip(s), None) for s in (0, 1, 2, 3)]
    assert all(s.shape == (2,) and s.dtype == torch.float32 for s in scores)
    assert scores[0].abs().max().item() == 0.0
    values = [s[0].item() for s in scores]
    assert values == sorted(values) and values[1] > 0.5  # monotone in speed, O(1) at 1 px/frame
    # the documented reference: a full-contrast shape covering 1/16 of the frame moving a quarter of its width
    clip = torch.zeros(1, 6, 3, 32, 32)
    for t in range(6):
        clip[0, t, :, 12:20, 2 + 2 * t:10 + 2 * t] = 1.0
    assert m(clip).item() == pytest.approx(1.0, abs=0.1)


def test_motion_saturates_scores_flicker_and_gives_gradients():
    clip = square_clip(3)
    raw, capped = MotionReward()(clip), MotionReward(saturate=0.5)(clip)
    assert (raw > 0.5).all() and (capped < 0.5).all()
    torch.testing.assert_close(capped, 0.5 * torch.tanh(raw / 0.5))
    static = torch.full((2, 6, 3, 16, 16), 0.5)
    assert (MotionReward()(flicker(static, 0.1)) > 0.3).all()  # flicker alone looks like motion
    x = square_clip(1).requires_grad_(True)
    MotionReward()(x).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_blur_keeps_constants_and_mass():
    x = torch.rand(2, 3, 9, 7, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(gaussian_blur(torch.full_like(x, 0.3), 1.5), torch.full_like(x, 0.3))
    y = gaussian_blur(x, 1.0)
    assert y.shape == x.shape and y.std() < x.std()
    assert gaussian_blur(x, 0.0) is x


# ---------------------------------------------------------------- TemporalConsistency
@pytest.mark.parametrize("measure", ["reversal", "second-difference"])
def test_consistency_static_is_max_and_translation_beats_flicker(measure):
    c = TemporalConsistency(measure=measure)
    static = square_clip(0)
    assert c(static).tolist() == [0.0, 0.0]
    moving = square_clip(1)
    noisy = flicker(moving, 0.05)
    assert (c(moving) > c(noisy)).all() and (c(noisy) < 0).all()


def test_reversal_is_zero_for_translation_and_fades_but_not_for_flicker():
    c = TemporalConsistency()
    for speed in (0.5, 1, 2):  # slower than the square's width (4 px) per frame
        assert c(square_clip(speed)).abs().max().item() == 0.0
    fade = torch.linspace(0, 1, 6).view(1, 6, 1, 1, 1).expand(2, 6, 3, 16, 16)
    assert c(fade).abs().max().item() == 0.0
    static = torch.full((2, 6, 3, 16, 16), 0.5)
    assert (c(flicker(static, 0.02)) < -0.3).all()  # faint flicker already costs O(1)
    # the second difference penalises sharp translation; the reversal measure does not
    assert (TemporalConsistency(measure="second-difference")(square_clip(1)) < -0.01).all()


def test_consistency_gradients_and_feature_space():
    x = flicker(square_clip(1), 0.05).requires_grad_(True)
    TemporalConsistency()(x).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, 8))
    c = TemporalConsistency(measure="second-difference", backbone=backbone)
    assert c(square_clip(0)).abs().max().item() < 1e-12
    y = flicker(square_clip(1), 0.2).requires_grad_(True)
    score = c(y)
    assert (score < c(square_clip(1)) + 1e-9).all()
    score.sum().backward()
    assert y.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="one row per frame"):
        TemporalConsistency(backbone=lambda im: im.mean())(square_clip(1))


# ---------------------------------------------------------------- shapes, registry, MultiReward
@pytest.mark.parametrize("reward", [MotionReward(), TemporalConsistency()])
def test_video_rewards_reject_bad_shapes(reward):
    with pytest.raises(ValueError, match=rf"{reward.name!r} scores video.*\(2, 3, 16, 16\)"):
        reward(torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match="at least"):
        reward(torch.rand(2, 1, 3, 16, 16))
    with pytest.raises(ValueError, match="3 RGB channels"):
        reward(torch.rand(2, 6, 16, 16, 3))
    with pytest.raises(TypeError, match="float pixels"):
        reward(torch.zeros(2, 6, 3, 16, 16, dtype=torch.uint8))


def test_bad_arguments_name_the_argument():
    for kwargs, what in [({"scale": 0}, "scale"), ({"blur": -1}, "blur"), ({"size": 2}, "size"),
                         ({"saturate": float("nan")}, "saturate")]:
        with pytest.raises(ValueError, match=what):
            MotionReward(**kwargs)
    with pytest.raises(ValueError, match="measure"):
        TemporalConsistency(measure="l2")
    with pytest.raises(TypeError, match="backbone"):
        TemporalConsistency(backbone=3)


def test_registry_and_multi_reward_with_weights_on_video():
    assert {"frames", "motion", "temporal-consistency", "videoalign"} <= set(fr.available())
    assert isinstance(fr.load("motion"), MotionReward)
    assert isinstance(fr.load("temporal-consistency", measure="second-difference"), TemporalConsistency)
    multi = MultiReward({"motion": 1.0, "temporal-consistency": 0.5})
    assert multi.differentiable and not multi.uses_prompts
    clean, noisy = square_clip(1), flicker(square_clip(1), 0.1)
    total = multi(clean)
    m, c = multi.last_scores["motion"], multi.last_scores["temporal-consistency"]
    torch.testing.assert_close(total, m + 0.5 * c)
    torch.testing.assert_close(multi(clean, weights={"temporal-consistency": 2.0}), m + 2.0 * c)
    assert (multi(noisy) < multi(clean)).all()  # flicker gains motion but loses more consistency
    assert (MotionReward()(noisy) > MotionReward()(clean)).all()
    x = clean.clone().requires_grad_(True)
    multi(x).sum().backward()
    assert x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="scores video"):
        multi(torch.rand(2, 3, 16, 16))


# ---------------------------------------------------------------- VideoAlignReward (no weights offline)
class StubVideoReward:
    """Stands in for VideoAlign's inference class: records its inputs, returns fixed per-head scores."""

    def __init__(self):
        self.seen = None

    def reward_from_frames(self, videos, prompts, use_norm=True):
        self.seen = (videos, prompts, use_norm)
        b = len(videos)
        return {"VQ": torch.arange(b) + 1.0, "MQ": torch.full((b,), 10.0), "TA": [0.5] * b,
                "Overall": torch.zeros(b)}


def test_videoalign_argument_and_dependency_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="head"):
        VideoAlignReward(path=str(tmp_path), head="aesthetic")
    with pytest.raises(ValueError, match="path="):
        VideoAlignReward()
    with pytest.raises(FileNotFoundError, match="model_config.json"):
        VideoAlignReward(path=str(tmp_path))
    (tmp_path / "model_config.json").write_text("{}")
    import flowalign.rewards.video as video

    def missing(module, extra):
        raise ImportError(f"{module!r} is needed; install it with `pip install 'flowalign[{extra}]'`.")

    monkeypatch.setattr(video, "require", missing)
    with pytest.raises(ImportError, match=r"flowalign\[videoalign\]"):
        VideoAlignReward(path=str(tmp_path))
    monkeypatch.setattr(video, "require", lambda module, extra: None)
    with pytest.raises(ImportError, match="PYTHONPATH"):
        VideoAlignReward(path=str(tmp_path), module="no_such_videoalign_module")
    with pytest.raises(ImportError, match="VideoVLMRewardInference"):
        VideoAlignReward(path=str(tmp_path), module="json")
    with pytest.raises(TypeError, match="reward_from_frames"):
        VideoAlignReward(model=object())


@pytest.mark.parametrize("head, want", [("vq", [1.0, 2.0]), ("mq", [10.0, 10.0]), ("ta", [0.5, 0.5]),
                                        ("overall", [11.5, 12.5])])
def test_videoalign_heads_with_a_stub_backend(head, want):
    stub = StubVideoReward()
    reward = VideoAlignReward(model=stub, head=head, use_norm=False)
    assert not reward.differentiable and reward.name == "videoalign"
    clip = square_clip(1).requires_grad_(True)
    out = reward(clip, PROMPTS)
    assert out.tolist() == want and out.dtype == torch.float32 and not out.requires_grad
    videos, prompts, use_norm = stub.seen
    assert len(videos) == 2 and videos[0].shape == (6, 3, 16, 16) and videos[0].max().item() == 255.0
    assert prompts == PROMPTS and use_norm is False
    with pytest.raises(ValueError, match="scores video"):
        reward(torch.rand(2, 3, 16, 16), PROMPTS)
    with pytest.raises(ValueError, match="prompt"):
        reward(clip, None)


# ---------------------------------------------------------------- run report with video grids
def _gif(path, frames=3, colour=(255, 0, 0)):
    imgs = [Image.new("RGB", (8, 8), tuple(c * (i + 1) // frames for c in colour)) for i in range(frames)]
    imgs[0].save(path, save_all=True, append_images=imgs[1:], duration=100, loop=0)


def test_report_embeds_first_and_last_gif(tmp_path):
    from flowalign.trainers.loop import TrainConfig
    from flowalign.trainers.report import sample_grids, write_report

    (tmp_path / "samples").mkdir()
    for epoch in (0, 5, 10):
        _gif(tmp_path / "samples" / f"epoch-{epoch:04d}.gif")
    history = [{"epoch": 0, "step": 0, "eval/motion": 0.2}, {"epoch": 10, "step": 10, "eval/motion": 0.9}]
    write_report(tmp_path, history, TrainConfig())
    report = (tmp_path / "report.md").read_text()
    assert "| ![before](samples/epoch-0000.gif) | ![after](samples/epoch-0010.gif) |" in report
    assert "epoch-0005" not in report
    # an epoch with both a PNG and a GIF uses the animation; PNG-only epochs still count
    Image.new("RGB", (8, 8)).save(tmp_path / "samples" / "epoch-0010.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "samples" / "epoch-0020.png")
    assert [p.name for p in sample_grids(tmp_path / "samples")] == [
        "epoch-0000.gif", "epoch-0005.gif", "epoch-0010.gif", "epoch-0020.png"]


def test_report_keeps_png_grids(tmp_path):
    from flowalign.trainers.loop import TrainConfig
    from flowalign.trainers.report import write_report

    (tmp_path / "samples").mkdir()
    for epoch in (0, 4):
        Image.new("RGB", (8, 8)).save(tmp_path / "samples" / f"epoch-{epoch:04d}.png")
    history = [{"epoch": 0, "step": 0, "eval/x": 0.0}, {"epoch": 4, "step": 4, "eval/x": 1.0}]
    write_report(tmp_path, history, TrainConfig())
    assert "| ![before](samples/epoch-0000.png) | ![after](samples/epoch-0004.png) |" in (
        tmp_path / "report.md").read_text()
    assert dataclasses.is_dataclass(TrainConfig)
