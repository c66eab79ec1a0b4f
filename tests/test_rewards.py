"""Reward adapters on tiny random CLIPs built locally (no hub): shapes, gradients, video, registry, errors."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import flowalign.rewards as fr  # noqa: E402
from flowalign.rewards import MultiReward, Reward  # noqa: E402
from flowalign.rewards.preprocess import resize, resize_and_normalize  # noqa: E402

PROMPTS = ["a red circle", "two blue squares"]
TINY_OPEN_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"layers": 1, "width": 32, "patch_size": 8, "image_size": 32, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def hf_clip():
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig

    from flowalign.models.tiny import _clip_text_config, clip_tokenizer

    torch.manual_seed(0)
    vision = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=1, num_attention_heads=2, projection_dim=32)
    cfg = CLIPConfig(text_config=_clip_text_config().to_dict(), vision_config=vision.to_dict(),
                     projection_dim=32)
    return CLIPModel(cfg).eval(), clip_tokenizer()


@pytest.fixture(scope="module")
def oc_clip():
    import open_clip

    torch.manual_seed(0)
    vision = open_clip.model.CLIPVisionCfg(**TINY_OPEN_CLIP["vision_cfg"])
    text = open_clip.model.CLIPTextCfg(**TINY_OPEN_CLIP["text_cfg"])
    return open_clip.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text).eval()


def images(b=2, h=48, w=40, seed=0, **kw):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed), **kw)


def assert_scores(s, b=2):
    assert s.shape == (b,) and s.dtype == torch.float32 and torch.isfinite(s).all()


def assert_grad(reward, prompts=PROMPTS):
    x = images().requires_grad_(True)
    reward(x, prompts).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in reward.parameters())  # frozen: only the pixels get gradients


class Const(Reward):
    """Mean brightness times k: a cheap differentiable reward with an exact answer."""

    name = "const"

    def __init__(self, k: float = 1.0, name: str = "const"):
        super().__init__()
        self.k, self.name = k, name

    def score(self, images, prompts):
        return self.k * images.mean((1, 2, 3))


class Broken(Reward):
    name = "broken"

    def __init__(self, mode):
        super().__init__()
        self.mode = mode

    def score(self, images, prompts):
        n = len(prompts)
        return torch.full((n,), float("nan")) if self.mode == "nan" else torch.zeros(n, 1)


# --- preprocessing -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("fit", ["crop", "pad"])
def test_preprocess_gradcheck(fit):
    x = torch.rand(1, 3, 9, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: resize_and_normalize(t, 4, fit=fit), (x,))


def test_preprocess_shapes_and_aspect():
    x = torch.zeros(1, 3, 10, 20)
    x[..., 5:15] = 1.0  # a bright centre band of the width
    assert resize(x, 8, mode="nearest", fit="crop").mean() == 1.0  # the crop keeps only the centre
    padded = resize(torch.ones(1, 3, 10, 20), (8, 8), mode="nearest", fit="pad")
    assert padded.shape == (1, 3, 8, 8) and padded[..., :2, :].sum() == 0 and padded[..., 3:5, :].min() == 1
    assert resize_and_normalize(images(h=48, w=40), (32, 16)).shape == (2, 3, 32, 16)


# --- adapters ----------------------------------------------------------------------------------------------

def test_clip_transformers(hf_clip):
    model, tok = hf_clip
    r = fr.load("clip", model=model, tokenizer=tok)
    s = r(images(), PROMPTS)
    assert_scores(s)
    assert (s.abs() <= 1).all()  # a cosine
    assert_grad(r)
    logit = fr.load("clip", model=model, tokenizer=tok, scale="logit")(images(), PROMPTS)
    torch.testing.assert_close(logit, s * model.logit_scale.exp().item())


def test_clip_inference_mode_then_grad(hf_clip):
    r = fr.CLIPScore(model=hf_clip[0], tokenizer=hf_clip[1])
    with torch.inference_mode():
        first = r(images(), PROMPTS)
    assert_grad(r)  # text embeddings cached under inference mode still serve a backward pass
    torch.testing.assert_close(r(images(), PROMPTS), first.clone())


def test_clip_from_local_dir_matches_built_model(hf_clip, tmp_path):
    from transformers import CLIPImageProcessor

    model, tok = hf_clip
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(tmp_path)
    loaded = fr.load("clip", path=str(tmp_path))
    assert loaded.backbone.size == (32, 32)
    built = fr.CLIPScore(model=model, tokenizer=tok)
    torch.testing.assert_close(loaded(images(), PROMPTS), built(images(), PROMPTS))


def test_clip_open_clip(oc_clip):
    r = fr.CLIPScore(model=oc_clip)  # default tokenizer: open_clip's bundled BPE, offline
    assert_scores(r(images(), PROMPTS))
    assert_grad(r)


def test_pickscore(hf_clip):
    model, tok = hf_clip
    raw = fr.load("pickscore", model=model, tokenizer=tok)
    cos = fr.CLIPScore(model=model, tokenizer=tok)(images(), PROMPTS)
    torch.testing.assert_close(raw(images(), PROMPTS), cos * model.logit_scale.exp().item())
    normed = fr.PickScore(model=model, tokenizer=tok, normalize=True)
    torch.testing.assert_close(normed(images(), PROMPTS), raw(images(), PROMPTS) / 26)
    assert_grad(raw)


def test_hps_built_and_from_checkpoint(oc_clip, tmp_path):
    import open_clip

    r = fr.load("hps", model=oc_clip)
    s = r(images(), PROMPTS)
    assert_scores(s)
    assert_grad(r)
    # the real loading path: an open_clip architecture by name + an HPS-style {"state_dict": ...} checkpoint
    (tmp_path / "tiny-hps-test.json").write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(tmp_path / "tiny-hps-test.json")
    torch.save({"state_dict": oc_clip.state_dict()}, tmp_path / "hps.pt")
    loaded = fr.HPSv2(checkpoint=str(tmp_path / "hps.pt"), arch="tiny-hps-test")
    torch.testing.assert_close(loaded(images(), PROMPTS), s)


def test_aesthetic(hf_clip, tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    head = fr.AestheticMLP(input_size=32)
    r = fr.load("aesthetic", model=hf_clip[0], head=head)
    s = r(images(), None)  # prompts are optional: the aesthetic score ignores them
    assert_scores(s)
    torch.testing.assert_close(r(images(), PROMPTS), s)
    assert_grad(r)
    save_file(head.state_dict(), str(tmp_path / "head.safetensors"))
    from_file = fr.LaionAesthetic(model=hf_clip[0], head_path=str(tmp_path / "head.safetensors"))
    torch.testing.assert_close(from_file(images(), None), s)
    with pytest.raises(ValueError, match="head_path"):
        fr.LaionAesthetic(model=hf_clip[0])


def test_imagereward_missing_extra():
    with pytest.raises(ImportError, match=r"flowalign\[image-reward\]"):
        fr.load("imagereward")


def test_imagereward_scores_through_score_gard(hf_clip):
    class FakeImageReward(nn.Module):  # the package's interface: blip.tokenizer, score_gard(ids, mask, image)
        def __init__(self):
            super().__init__()
            self.blip = nn.Module()
            self.blip.tokenizer = hf_clip[1]
            self.mlp = nn.Linear(3, 1)

        def score_gard(self, ids, mask, image):
            assert image.shape[-2:] == (224, 224) and ids.shape == (image.shape[0], 35)
            assert self.device.type == "cpu"
            return self.mlp(image.mean((2, 3)))

    r = fr.ImageReward(model=FakeImageReward())
    assert_scores(r(images(), PROMPTS))
    assert_grad(r)


def test_jpeg_flat_more_compressible_than_noise():
    x = torch.cat([torch.full((1, 3, 64, 64), 0.5), images(1, 64, 64)])
    comp = fr.load("jpeg-compressibility")(x, None)
    incomp = fr.load("jpeg-incompressibility")(x, ["a", "b"])
    assert_scores(comp)
    assert comp[0] > comp[1] and incomp[0] < incomp[1]
    torch.testing.assert_close(comp, -incomp)
    x.requires_grad_(True)
    assert not fr.JpegCompressibility()(x).requires_grad  # non-differentiable rewards run under no_grad


def test_video_is_mean_over_frames(hf_clip):
    r = fr.CLIPScore(model=hf_clip[0], tokenizer=hf_clip[1])
    video = torch.rand(2, 3, 3, 48, 40, generator=torch.Generator().manual_seed(1))
    s = r(video, PROMPTS)
    assert_scores(s)
    per_frame = torch.stack([r(video[:, f], PROMPTS) for f in range(3)], 1)
    torch.testing.assert_close(s, per_frame.mean(1))
    assert_scores(fr.JpegIncompressibility()(video))


# --- MultiReward -------------------------------------------------------------------------------------------

def test_multireward_weighted_sum_and_parts(hf_clip):
    clip = fr.CLIPScore(model=hf_clip[0], tokenizer=hf_clip[1])
    multi = MultiReward({clip: 2.0, Const(3.0): -0.5, "jpeg-compressibility": 0.1})
    x = images()
    total = multi(x, PROMPTS)
    parts = {"clip": clip(x, PROMPTS), "const": 3.0 * x.mean((1, 2, 3)),
             "jpeg-compressibility": fr.JpegCompressibility()(x)}
    assert set(multi.last_scores) == set(parts) and multi.weights == {"clip": 2.0, "const": -0.5,
                                                                      "jpeg-compressibility": 0.1}
    for k, v in parts.items():
        torch.testing.assert_close(multi.last_scores[k], v)
    expected = 2.0 * parts["clip"] - 0.5 * parts["const"] + 0.1 * parts["jpeg-compressibility"]
    torch.testing.assert_close(total, expected)
    assert not multi.differentiable and MultiReward({clip: 1.0, Const(): 1.0}).differentiable
    torch.testing.assert_close(multi.scores(x, PROMPTS)["clip"], parts["clip"])
    # call-time weights override the given ones and keep the rest
    torch.testing.assert_close(multi(x, PROMPTS, weights={"clip": 0.0, "jpeg-compressibility": 0.0}),
                               -0.5 * parts["const"])
    with pytest.raises(ValueError, match="nope"):
        multi(x, PROMPTS, weights={"nope": 1.0})
    with pytest.raises(ValueError, match="distinct"):
        MultiReward({Const(): 1.0, Const(2.0): 1.0})
    x.requires_grad_(True)
    multi(x, PROMPTS).sum().backward()  # the differentiable parts still give a gradient
    assert x.grad.abs().sum() > 0


# --- registry ----------------------------------------------------------------------------------------------

def test_registry_names_paths_and_errors():
    assert {"clip", "pickscore", "hps", "aesthetic", "imagereward", "jpeg-compressibility",
            "jpeg-incompressibility"} <= set(fr.available())
    assert isinstance(fr.load("flowalign.rewards.jpeg:JpegCompressibility"), fr.JpegCompressibility)
    r = fr.load(f"{__name__}:Const", k=2.0)
    assert isinstance(r, Const) and r.k == 2.0 and fr.load(r) is r
    with pytest.raises(ValueError, match=r"Unknown reward 'pickscor'.*'pickscore'.*jpeg-compressibility"):
        fr.load("pickscor")
    with pytest.raises(ImportError, match="no_such_module"):
        fr.load("no_such_module:Thing")
    with pytest.raises(ValueError, match="no attribute 'Nope'"):
        fr.load("flowalign.rewards.jpeg:Nope")
    with pytest.raises(TypeError, match="not a flowalign.rewards.Reward"):
        fr.load("collections:OrderedDict")
    with pytest.raises(ValueError, match="already registered"):
        fr.register("clip")(Const)

    @fr.register("test-brightness")
    class Brightness(Reward):
        def score(self, images, prompts):
            return images.mean((1, 2, 3))

    assert isinstance(fr.load("test-brightness"), Brightness) and Brightness.name == "test-brightness"


# --- validation --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,match", [("nan", "'broken' returned non-finite"),
                                        ("shape", r"'broken' returned shape")])
def test_bad_reward_output_names_the_reward(mode, match):
    with pytest.raises(ValueError, match=match):
        Broken(mode)(images(), PROMPTS)


def test_input_validation():
    r = Const()
    torch.testing.assert_close(r(images(), "one prompt for all"), images().mean((1, 2, 3)))
    with pytest.raises(ValueError, match="2 images but 3 prompts"):
        r(images(), ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        r(torch.rand(3, 8, 8), PROMPTS)
    with pytest.raises(ValueError, match="3 RGB channels"):
        r(torch.rand(2, 8, 8, 3), PROMPTS)
    with pytest.raises(TypeError, match="uint8"):
        r(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), PROMPTS)
    with pytest.raises(ValueError, match="prompt"):
        r(images(), None)
    r.train()
    assert not r.training  # rewards are frozen evaluators
