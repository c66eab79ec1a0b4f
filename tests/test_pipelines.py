"""The diffusers plug-in: the guided pipeline equals the pipe without guidance, mimics its outputs, and guides."""

import sys

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import gen

import flowalign as fa
from flowalign.models import tiny
from flowalign.pipelines import GuidedPipeline, custom_pipeline_path, guided
from flowalign.rewards import Reward
from flowalign.sampling.guidance import RewardGuidance

PROMPTS = ["a red circle", "two blue squares"]
FAMILIES = ["sd3", "flux", "wan"]
#: tiny sizes; FLUX non-square (exercises packing with h != w)
SIZES = {"sd3": dict(height=32, width=32), "flux": dict(height=32, width=48),
         "wan": dict(height=16, width=16, num_frames=5)}


class Brightness(Reward):
    """Mean pixel value (frames averaged by Reward for video): a small differentiable pixel reward."""

    name = "brightness"
    uses_prompts = False

    def score(self, images, prompts):
        return images.mean((1, 2, 3))


@pytest.fixture(scope="module")
def pipes():
    out = {}
    for family in FAMILIES:
        pipe = tiny.build(f"tiny-{family}")
        pipe.set_progress_bar_config(disable=True)
        out[family] = pipe
    return out


def first(out):
    """The images (or frames) of a pipeline output."""
    return out[0]


def both(pipe, family, output_type, steps=4, **kw):
    """(guided output, the pipe's own output) with the same arguments and seed."""
    kw = dict(prompt=PROMPTS, num_inference_steps=steps, generator=gen(1), output_type=output_type,
              **SIZES[family], **kw)
    ours = guided(pipe)(**kw)
    kw["generator"] = gen(1)
    return ours, pipe(**kw)


# ----------------------------------------------------------------------------- equality with the pipe
@pytest.mark.parametrize("family", FAMILIES)
def test_unguided_equals_the_pipe(pipes, family):
    ours, ref = both(pipes[family], family, "pt")
    assert type(ours) is type(ref)
    a, b = first(ours), first(ref)
    assert a.shape == b.shape and a.dtype == b.dtype
    h, w = SIZES[family]["height"], SIZES[family]["width"]
    assert a.shape == ((2, 5, 3, h, w) if family == "wan" else (2, 3, h, w))
    assert (a - b).abs().max().item() <= 1e-4
    # a meaningful comparison: not constant, and the two prompts/noises differ
    assert b.std() > 1e-3 and (b[0] - b[1]).abs().max() > 1e-3
    traj = ours.trajectory
    assert traj.num_steps == 4 and traj.log_probs is None and len(traj.prompts) == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_output_types_mimic_the_pipe(pipes, family):
    for output_type in ("np", "pil", "latent"):
        ours, ref = both(pipes[family], family, output_type, steps=2)
        a, b = first(ours), first(ref)
        assert type(a) is type(b), output_type
        if output_type == "pil":
            assert len(a) == len(b) == 2
            if family == "wan":  # a list of videos, each a list of frames
                a, b = [f for v in a for f in v], [f for v in b for f in v]
            assert all(isinstance(x, PIL.Image.Image) for x in a) and [x.size for x in a] == [x.size for x in b]
            diff = max(np.abs(np.asarray(x, dtype=int) - np.asarray(y, dtype=int)).max() for x, y in zip(a, b))
            assert diff <= 1  # uint8 rounding at most
        else:
            assert a.shape == b.shape and a.dtype == b.dtype, output_type
            assert np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max() <= 1e-4
    if family == "flux":
        assert first(ours).ndim == 3  # FLUX's latent output is the packed token sequence, as the pipe's


def test_num_images_per_prompt_and_latents(pipes):
    ours, ref = both(pipes["sd3"], "sd3", "pt", num_images_per_prompt=2, guidance_scale=4.5)
    assert first(ours).shape == (4, 3, 32, 32)
    assert (first(ours) - first(ref)).abs().max().item() <= 1e-4
    assert ours.trajectory.prompts == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    # Wan names it num_videos_per_prompt, as the pipe does
    pipe = pipes["wan"]
    out = guided(pipe)(PROMPTS[:1], num_videos_per_prompt=2, num_inference_steps=2, generator=gen(0),
                       output_type="pt", **SIZES["wan"])
    ref = pipe(PROMPTS[:1], num_videos_per_prompt=2, num_inference_steps=2, generator=gen(0), output_type="pt",
               **SIZES["wan"])
    assert first(out).shape == (2, 5, 3, 16, 16) and (first(out) - first(ref)).abs().max().item() <= 1e-4
    # given latents in the pipe's own layout (FLUX: packed)
    flux = pipes["flux"]
    lat = guided(flux)(PROMPTS, num_inference_steps=2, generator=gen(3), output_type="latent", **SIZES["flux"])
    noise = torch.randn(first(lat).shape, generator=gen(4))
    a = guided(flux)(PROMPTS, num_inference_steps=2, latents=noise, output_type="pt", **SIZES["flux"])
    b = flux(PROMPTS, num_inference_steps=2, latents=noise, output_type="pt", **SIZES["flux"])
    assert (first(a) - first(b)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family,extra", [
    ("sd3", dict(negative_prompt=["a cat", "a dog"], guidance_scale=4.5)),
    ("flux", dict(negative_prompt="a cat", true_cfg_scale=2.5, guidance_scale=7.0)),
    ("wan", dict(negative_prompt="a cat", max_sequence_length=16)),
])
def test_negative_prompt_true_cfg_and_text_length_follow_the_pipe(pipes, family, extra):
    ours, ref = both(pipes[family], family, "pt", steps=2, **extra)
    assert (first(ours) - first(ref)).abs().max().item() <= 1e-4
    plain = guided(pipes[family])(PROMPTS, num_inference_steps=2, generator=gen(1), output_type="pt", **SIZES[family])
    assert (first(plain) - first(ours)).abs().max() > 1e-4  # the arguments did something
    gp = guided(pipes[family])
    gp(PROMPTS, num_inference_steps=1, output_type="latent", **SIZES[family], **extra)
    assert gp.model.max_sequence_length == (256 if family == "sd3" else 512)  # a per-call override is undone


def test_return_dict_false_gives_a_tuple(pipes):
    gp = guided(pipes["flux"])
    out = gp(PROMPTS[0], num_inference_steps=2, generator=gen(0), output_type="pt", return_dict=False, **SIZES["flux"])
    assert isinstance(out, tuple) and len(out) == 1 and out[0].shape == (1, 3, 32, 48)
    assert gp.last_trajectory is not None and gp.last_trajectory.num_steps == 2


def test_defaults_follow_the_pipe(pipes):
    sd3 = guided(pipes["sd3"])
    out = sd3(PROMPTS[0], generator=gen(0), **SIZES["sd3"])
    assert out.trajectory.num_steps == 28 and out.trajectory.guidance_scale == 7.0  # the pipe's defaults
    assert isinstance(out.images, list) and isinstance(out.images[0], PIL.Image.Image)  # output_type "pil"
    wan = guided(pipes["wan"])
    assert wan._defaults["num_inference_steps"] == 50
    out = wan(PROMPTS[0], num_inference_steps=2, generator=gen(0), **SIZES["wan"])
    assert isinstance(out.frames, np.ndarray) and out.frames.shape == (1, 5, 16, 16, 3)  # Wan's default "np"
    # a FlowModel brings its own defaults (here 16x16 and CFG 3; the pipe's are 32x32 and 7)
    model = fa.load_model(pipes["sd3"]).configure({"native_size": [16, 16], "guidance_scale": 3.0})
    out = guided(model)(PROMPTS[0], num_inference_steps=2, output_type="pt")
    assert out.images.shape == (1, 3, 16, 16) and out.trajectory.guidance_scale == 3.0


# ----------------------------------------------------------------------------- guidance and samplers
def test_reward_guidance_raises_the_reward(pipes):
    pipe = pipes["sd3"]
    kw = dict(prompt=PROMPTS, num_inference_steps=4, output_type="pt", **SIZES["sd3"])
    plain = guided(pipe)(generator=gen(2), **kw).images
    # normalised gradients: the tiny random VAE barely changes mean brightness, so step along the unit gradient
    # (measured rises of the mean pixel: 0.0026-0.0031 at scale 3, 0.0074-0.0081 at scale 10)
    weak = guided(pipe, guidance=RewardGuidance(Brightness(), scale=3.0, normalize=True))(generator=gen(2), **kw)
    gp = guided(pipe, guidance=RewardGuidance(Brightness(), scale=10.0, normalize=True))
    bright = gp(generator=gen(2), **kw).images
    assert (bright - plain).abs().max() > 0.1
    rise, weak_rise = (x.mean((1, 2, 3)) - plain.mean((1, 2, 3)) for x in (bright, weak.images))
    assert (weak_rise > 0.0015).all() and (rise > weak_rise + 0.002).all()
    # a per-call override switches it off again: back to the pipe's own output
    off = gp(generator=gen(2), guidance=None, **kw).images
    assert (off - plain).abs().max().item() <= 1e-6
    # and an SDE sampler per call records log-probs
    traj = gp(generator=gen(2), sampler="flow-sde", eta=0.5, **kw).trajectory
    assert traj.sampler == "flow-sde" and traj.eta == 0.5 and traj.log_probs.shape == (2, 4)


def test_errors_are_clear(pipes):
    gp = guided(pipes["sd3"])
    with pytest.raises(TypeError, match=r"\['colour'\].*supported ones are.*'num_inference_steps'"):
        gp(PROMPTS, colour="red")
    with pytest.raises(TypeError, match=r"callback_on_step_end.*argument of StableDiffusion3Pipeline"):
        gp(PROMPTS, callback_on_step_end=lambda *a: {})
    with pytest.raises(TypeError, match="true_cfg_scale"):
        gp(PROMPTS, true_cfg_scale=2.0)  # a FLUX argument, not SD3's
    with pytest.raises(ValueError, match="output_type"):
        gp(PROMPTS, num_inference_steps=1, output_type="jpg")
    with pytest.raises(ValueError, match="prompt is required"):
        gp(num_inference_steps=1)
    with pytest.raises(ValueError, match="Unknown sampler"):
        guided(pipes["sd3"], sampler="heun")
    with pytest.raises(ValueError, match="Unsupported pipeline class"):
        guided(torch.nn.Linear(1, 1))


def test_attributes_forward_to_the_pipe(pipes):
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = tiny.build("tiny-sd3")
    pipe.set_progress_bar_config(disable=True)
    gp = guided(pipe)
    assert isinstance(gp, GuidedPipeline)
    assert gp.transformer is pipe.transformer and gp.scheduler is pipe.scheduler and gp.vae is pipe.vae
    assert gp.to("cpu") is gp
    # swapping the scheduler through the wrapper changes the pipe, and the sampler follows it
    kw = dict(prompt=PROMPTS[0], num_inference_steps=3, output_type="pt", **SIZES["sd3"])
    before = gp(generator=gen(0), **kw).images
    gp.scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.shift == 1.0
    after = gp(generator=gen(0), **kw).images
    ref = pipe(generator=gen(0), **kw).images
    assert (after - before).abs().max() > 1e-4 and (after - ref).abs().max().item() <= 1e-4


# ----------------------------------------------------------------------------- the custom-pipeline route
def test_custom_pipeline_folders_load_offline(pipes, tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline
    from diffusers.utils import dynamic_modules_utils

    # diffusers copies a custom pipeline.py into its modules cache (and puts that on sys.path): keep both local
    monkeypatch.setattr(dynamic_modules_utils, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))

    for family in FAMILIES:  # all three in one process: diffusers runs every local pipeline.py as one module
        pipe = pipes[family]
        pipe.save_pretrained(tmp_path / family)
        custom = DiffusionPipeline.from_pretrained(tmp_path / family, custom_pipeline=custom_pipeline_path(family),
                                                   trust_remote_code=True)
        custom.set_progress_bar_config(disable=True)
        assert isinstance(custom, type(pipe)) and type(custom).__name__.startswith("FlowalignGuided")
        kw = dict(prompt=PROMPTS, num_inference_steps=3, output_type="pt", **SIZES[family])
        a, b = first(custom(generator=gen(5), **kw)), first(pipe(generator=gen(5), **kw))
        assert (a - b).abs().max().item() <= 1e-4
        if family != "sd3":
            continue
        # the flowalign keyword arguments
        out = custom(generator=gen(5), flowalign_sampler="flow-sde", flowalign_eta=0.7, **kw)
        assert out.trajectory.log_probs.shape == (2, 3) and custom.last_trajectory is out.trajectory
        guide = RewardGuidance(Brightness(), scale=10.0, normalize=True)
        bright = custom(generator=gen(5), flowalign_guidance=guide, **kw).images
        assert (bright.mean((1, 2, 3)) > b.mean((1, 2, 3)) + 0.004).all()  # measured +0.0067, +0.0079
        with pytest.raises(TypeError, match="flowalign_guidance"):
            custom(guidance=None, **kw)
        # saved under the stock class name: loads with plain diffusers and flowalign
        custom.save_pretrained(tmp_path / "resaved")
        again = DiffusionPipeline.from_pretrained(tmp_path / "resaved")
        assert type(again).__name__ == "StableDiffusion3Pipeline"
        assert fa.load_model(str(tmp_path / "resaved")).family == "sd3"


def test_custom_pipeline_path_and_classes():
    import os

    from flowalign.pipelines import FlowalignGuidedWanPipeline

    for family in FAMILIES:
        assert os.path.isfile(os.path.join(custom_pipeline_path(family), "pipeline.py"))
    assert custom_pipeline_path("FluxPipeline") == custom_pipeline_path("flux")
    with pytest.raises(ValueError, match="Unknown family"):
        custom_pipeline_path("sdxl")
    wan = FlowalignGuidedWanPipeline.from_pipe(tiny.build("tiny-wan"))
    wan.set_progress_bar_config(disable=True)
    out = wan("a red circle", num_inference_steps=2, generator=gen(0), output_type="pt", **SIZES["wan"])
    assert out.frames.shape == (1, 5, 3, 16, 16)
