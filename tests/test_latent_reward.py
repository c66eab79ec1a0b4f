"""Trainable latent (noise-aware) reward models and the recipe that distils a pixel reward into one."""

import json
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import gen
from safetensors.torch import load_file

import flowalign as fa
from flowalign.config import ConfigError, load_config
from flowalign.rewards import Reward
from flowalign.rewards.latent import (
    BackboneLatentReward,
    LatentRewardNet,
    TrainableLatentReward,
    text_encoder_from_model,
)
from flowalign.trainers import reward_model as rm
from flowalign.trainers.reward_model import RewardModelConfig, spearman, train_reward_model

PROMPTS = ["a red circle", "two blue squares", "a green star"]


class RedBrightness(Reward):
    """Mean red channel: a cheap pixel reward to distil (it need not be differentiable)."""

    name = "red-brightness"
    uses_prompts = False

    def score(self, images, prompts):
        return images[:, 0].mean((1, 2))


@pytest.fixture(scope="module")
def sd3_f64():
    return fa.load_model("tiny-sd3", dtype=torch.float64)


@pytest.fixture
def simple_decode(tiny_sd3, monkeypatch):
    """tiny-sd3's random VAE decoder makes pixel statistics a function that no model learns from ~100 samples
    (held-out Spearman ~0 while the training set is fitted to 0.9+); a pixel-wise decode keeps the recipe's
    "it learns" checks meaningful. Sampling, scoring, standardising and evaluation are unchanged."""
    monkeypatch.setattr(tiny_sd3, "decode", lambda x: torch.sigmoid(F.interpolate(x[:, :3], scale_factor=2)))
    return tiny_sd3


def _randomise(module, std=0.2):
    # FiLM layers start at zero (an identity modulation): randomise so every path carries gradient
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * std)


def _check_fd(score_fn, x, eps=1e-4, tol=1e-6):
    """Autograd directional derivatives of each sample's score vs central differences (float64)."""
    x = x.detach().requires_grad_(True)
    s = score_fn(x)
    (grad,) = torch.autograd.grad(s.sum(), x)
    torch.manual_seed(1)
    for _ in range(2):
        d = torch.randn_like(x)
        with torch.no_grad():
            # per sample (rows must not interact); float64, eps = 1e-4: measured error <= 3e-8 of the largest
            fd = (score_fn(x + eps * d) - score_fn(x - eps * d)) / (2 * eps)
        analytic = (grad * d).flatten(1).sum(1)
        err = (fd - analytic).abs().max() / analytic.abs().max()
        assert err < tol, (err, fd, analytic)
    return s, grad


def test_net_scores_and_gradient_match_finite_differences(tiny_sd3):
    net = LatentRewardNet(4, text_dim=64, width=16, depth=2, emb_dim=32, text_encoder=text_encoder_from_model(tiny_sd3))
    _randomise(net)
    x = torch.randn(3, 4, 16, 16)
    out = net(x, PROMPTS, sigma=torch.tensor([0.0, 0.5, 0.9]))
    assert out.shape == (3,) and out.dtype == torch.float32 and torch.isfinite(out).all()
    net.double()
    sigma = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    s, grad = _check_fd(lambda z: net.score(z, sigma, PROMPTS), x.double())
    assert grad.abs().sum() > 0
    assert not torch.allclose(net.score(x.double(), sigma.flip(0), PROMPTS), s)  # sigma matters
    assert not torch.allclose(net.score(x.double(), sigma, PROMPTS[::-1]), s)  # the prompt matters
    # video latents (B, C, f, h, w): frames are folded and pooled; identical frames score like the image
    video = x.double()[:, :, None].expand(-1, -1, 3, -1, -1)
    assert torch.allclose(net.score(video, sigma, PROMPTS), s, atol=1e-12)


def test_backbone_runs_the_generator_blocks_and_gradient_matches_finite_differences(sd3_f64):
    tr = sd3_f64.transformer
    x = torch.randn(2, 4, 16, 16, dtype=torch.float64)
    sigma = torch.tensor([0.3, 0.8], dtype=torch.float64)
    # with every block, the backbone's tokens through the transformer's own output layer are its velocity
    full = BackboneLatentReward(sd3_f64, num_blocks=len(tr.transformer_blocks)).double()
    text = full.encode_text(PROMPTS[:2])
    with torch.no_grad():
        h, temb = full.features(x, sigma, text)
        out = tr.proj_out(tr.norm_out(h, temb)).reshape(2, 8, 8, 2, 2, 4)
        out = torch.einsum("nhwpqc->nchpwq", out).reshape(2, 4, 16, 16)
        ref = tr(hidden_states=x, timestep=sigma * 1000, return_dict=False, **text)[0]
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)

    bb = BackboneLatentReward(sd3_f64, num_blocks=1, hidden=32)
    _randomise(bb, 0.05)
    bb.double()
    assert set(bb.state_dict()) == {k for k in bb.state_dict() if k.startswith("head.")}  # the generator is no part
    s, grad = _check_fd(lambda z: bb.score(z, sigma, PROMPTS[:2]), x)
    assert torch.isfinite(s).all() and grad.abs().sum() > 0
    assert all(p.grad is None for p in tr.parameters())  # frozen generator: nothing accumulated
    with torch.no_grad():
        r = bb(x.float(), PROMPTS[:2], sigma=0.5)
    assert r.shape == (2,) and r.dtype == torch.float32


def test_backbone_ignores_a_lora_being_trained_on_the_generator():
    model = fa.load_model("tiny-sd3", dtype=torch.float64)
    bb = BackboneLatentReward(model, num_blocks=2, hidden=32).double()
    x, sigma = torch.randn(2, 4, 16, 16, dtype=torch.float64), torch.tensor([0.5, 0.5], dtype=torch.float64)
    with torch.no_grad():
        before = bb.score(x, sigma, PROMPTS[:2])
        model.add_lora(rank=4)
        for name, p in model.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
        assert torch.equal(bb.score(x, sigma, PROMPTS[:2]), before)
        cond = model.encode(PROMPTS[:2], guidance_scale=1.0)
        v_lora = model.velocity(x, 0.5, cond, 1.0)  # the LoRA is back on after the reward's pass
        bb.base_weights = False
        assert not torch.allclose(bb.score(x, sigma, PROMPTS[:2]), before)
        model.transformer.disable_adapters()
        assert not torch.allclose(model.velocity(x, 0.5, cond, 1.0), v_lora)


def test_save_load_round_trip_gives_identical_scores(tiny_sd3, tmp_path):
    net = LatentRewardNet(4, text_dim=64, width=16, depth=2, text_encoder=text_encoder_from_model(tiny_sd3),
                          mean=0.3, std=0.02, base_model="tiny-sd3", name="latent-red")
    bb = BackboneLatentReward(tiny_sd3, num_blocks=1, hidden=32, mean=-1.0, std=2.0, base_model="tiny-sd3")
    for r in (net, bb):
        _randomise(r, 0.05)
    x, sigma = torch.randn(3, 4, 16, 16), torch.tensor([0.0, 0.4, 0.9])
    for r, sub in ((net, "net"), (bb, "bb")):
        r.save(tmp_path / sub)
        assert (tmp_path / sub / "latent_reward.safetensors").exists()
        assert json.loads((tmp_path / sub / "latent_reward.json").read_text())["arch"] == r.arch
        loaded = fa.rewards.load("latent", path=str(tmp_path / sub), model=tiny_sd3)
        assert type(loaded) is type(r) and loaded.name == r.name
        with torch.no_grad():
            assert torch.equal(loaded(x, PROMPTS, sigma=sigma), r(x, PROMPTS, sigma=sigma))
    assert torch.equal(net.mean + net.std * net.predict(x, sigma, net.encode_text(PROMPTS)),
                       net.score(x, sigma, PROMPTS))
    with pytest.raises(TypeError, match="BackboneLatentReward"):
        LatentRewardNet.from_pretrained(tmp_path / "bb", model=tiny_sd3)
    with pytest.raises(ValueError, match="trained latent reward model"):
        fa.rewards.load("latent")
    with pytest.raises(FileNotFoundError, match="latent_reward.safetensors"):
        fa.rewards.load("latent", path=str(tmp_path / "nothing"))
    with pytest.raises(NotImplementedError, match="SD3 generators only"):
        BackboneLatentReward(types.SimpleNamespace(family="flux"))


def test_latent_net_guides_sampling_along_its_gradient(tiny_sd3):
    net = LatentRewardNet(4, text_dim=64, width=16, depth=2, text_encoder=text_encoder_from_model(tiny_sd3))
    _randomise(net)
    guide = fa.guidance.RewardGuidance({net: 1.0}, scale=2.0)
    x_T = tiny_sd3.noise(2, generator=gen(0))
    # one Euler step from sigma = 1: the guided minus the plain sample is dt * scale * the unit gradient of
    # the latent reward at (x_T, sigma = 1), so it must point along +grad r
    plain = fa.sample(tiny_sd3, PROMPTS[:2], num_steps=1, guidance_scale=1.0, latents=x_T)
    guided = fa.sample(tiny_sd3, PROMPTS[:2], num_steps=1, guidance_scale=1.0, latents=x_T, guidance=guide)
    x = x_T.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(net(x, PROMPTS[:2], sigma=1.0).sum(), x)
    cos = F.cosine_similarity((guided.x0 - plain.x0).flatten(1), grad.flatten(1))
    assert (cos > 0.999).all(), cos


def _cfg(tmp_path, **kw):
    base = {"model": "tiny-sd3", "reward": "red-brightness", "num_samples": 128, "group_size": 2, "num_steps": 2,
            "guidance_scale": 1.0, "sample_batch_size": 64, "eval_fraction": 0.25, "batch_size": 32,
            "train_steps": 200, "net_width": 16, "net_depth": 2, "head_dim": 32, "backbone_blocks": 1, "lr": 3e-3,
            "eval_sigmas": [0.0, 0.5, 0.9], "out": str(tmp_path), "progress": False, "device": "cpu"}
    return load_config(RewardModelConfig, {**base, **kw})


def test_train_net_end_to_end_learns_and_saves(simple_decode, tmp_path):
    cfg = _cfg(tmp_path / "run")
    m = train_reward_model(cfg, model=simple_decode, reward=RedBrightness())
    out = Path(cfg.out)
    for f in ("latent_reward.safetensors", "latent_reward.json", "metrics.json", "config.yaml", "samples.safetensors"):
        assert (out / f).exists(), f
    assert not (out / "checkpoint.pt").exists()
    if m["plot"]:
        assert (out / "spearman.png").stat().st_size > 0
    assert m["num_train"] == 96 and m["num_eval"] == 32 and len(m["spearman"]) == 3
    # seeded run (measured 0.59 trained vs -0.25 untrained at sigma = 0)
    assert m["spearman"][0] > 0.4 and m["spearman"][0] > m["spearman_init"][0] + 0.4
    assert m["loss_last50"] < m["loss_first"]
    # the saved model is the trained one, in the pixel reward's units
    lm = fa.rewards.load("latent", path=str(out), model=simple_decode)
    samples = load_file(str(out / "samples.safetensors"))
    prompts = [p for p in rm._prompts(cfg, 64) for _ in range(2)]
    with torch.no_grad():
        pred = lm(samples["latents"][96:], prompts[96:], sigma=0.0)
    assert abs(spearman(pred, samples["rewards"][96:]) - m["spearman"][0]) < 1e-6
    assert abs(lm.mean - samples["rewards"][:96].mean().item()) < 1e-6


def test_train_backbone_end_to_end(simple_decode, tmp_path):
    m = train_reward_model(_cfg(tmp_path, arch="backbone", train_steps=40), model=simple_decode,
                           reward=RedBrightness())
    assert (tmp_path / "latent_reward.safetensors").exists()
    assert m["spearman"][0] > m["spearman_init"][0] + 0.3  # measured 0.83 vs 0.12 at 60 steps
    assert m["trainable_params"] == sum(p.numel() for p in
                                        BackboneLatentReward(simple_decode, 1, hidden=32).parameters())


def test_resume_gives_the_uninterrupted_result(simple_decode, tmp_path, monkeypatch):
    kw = {"train_steps": 20, "save_every": 8, "loss": "bt"}
    full = _cfg(tmp_path / "full", **kw)
    train_reward_model(full, model=simple_decode, reward=RedBrightness())
    cut = _cfg(tmp_path / "cut", samples_from=str(tmp_path / "full"), **kw)  # the same samples, not redrawn
    with pytest.raises(ValueError, match="drawn with other settings"):
        train_reward_model(_cfg(tmp_path / "other", samples_from=str(tmp_path / "full"), num_steps=3, **kw),
                           model=simple_decode, reward=RedBrightness())
    calls = {"n": 0}
    losses = rm._losses

    def crash_at_step_13(*a):
        calls["n"] += 1
        if calls["n"] == 13:
            raise KeyboardInterrupt
        return losses(*a)

    monkeypatch.setattr(rm, "_losses", crash_at_step_13)
    with pytest.raises(KeyboardInterrupt):
        train_reward_model(cut, model=simple_decode, reward=RedBrightness())
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)["step"] == 8
    monkeypatch.setattr(rm, "_losses", losses)
    saved = (tmp_path / "cut" / "config.yaml").read_text()
    with pytest.raises(ValueError, match="other settings.*lr differ"):
        train_reward_model(_cfg(tmp_path / "cut", samples_from=str(tmp_path / "full"), **{**kw, "lr": 1e-2}),
                           model=simple_decode, reward=RedBrightness())
    assert (tmp_path / "cut" / "config.yaml").read_text() == saved  # a wrong rerun touches nothing
    m = train_reward_model(cut, model=simple_decode, reward=RedBrightness())
    assert m["resumed_from"] == 8
    a, b = TrainableLatentReward.read(tmp_path / "full"), TrainableLatentReward.read(tmp_path / "cut")
    assert all(torch.equal(a[1][k], b[1][k]) for k in a[1])
    assert json.loads((tmp_path / "full" / "metrics.json").read_text())["spearman"] == m["spearman"]


def test_main_runs_a_yaml_config_with_overrides(tmp_path, capsys):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("task: reward-model\nmodel: tiny-sd3\nreward: test_latent_reward:RedBrightness\n"
                   "num_samples: 16\ngroup_size: 2\nnum_steps: 2\nguidance_scale: 1.0\nbatch_size: 8\n")
    m = rm.main(cfg, ["train_steps=5", "net_width=8", "net_depth=1", f"out={tmp_path / 'run'}", "progress=false",
                      "eval_fraction=0.25", "eval_sigmas=[0,0.5]"])
    assert m["train_steps"] == 5 and m["num_eval"] == 4 and len(m["spearman_x0_hat"]) == 2
    assert (tmp_path / "run" / "latent_reward.safetensors").exists()
    text = capsys.readouterr().out
    assert "spearman" in text and "x0_hat pixel" in text and "wrote" in text


def test_spearman_matches_hand_computed_values():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert spearman(a, a ** 3) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    # ties get their average rank: ranks [1, 2.5, 2.5, 4] vs [1, 2, 3, 4] -> 0.9486832980505138 (scipy)
    assert spearman(torch.tensor([1.0, 2.0, 2.0, 3.0]), torch.tensor([1.0, 2.0, 3.0, 4.0])) == pytest.approx(
        0.9486832980505138)
    assert spearman(torch.tensor([3.0, 1.0, 2.0]), torch.tensor([1.0, 2.0, 3.0])) == pytest.approx(-0.5)
    assert rm.pair_accuracy(torch.tensor([0.0, 1.0, 1.0, 0.0]), torch.tensor([0.0, 1.0, 0.0, 1.0]), 2) == 0.5


def test_config_errors_and_the_shipped_config():
    root = Path(__file__).resolve().parents[1]
    cfg = load_config(RewardModelConfig, root / "configs/reward/shapes-clip-latent.yaml")
    assert cfg.task == "reward-model" and cfg.model == "shapes-sd3" and cfg.reward == "shapes-clip"
    with pytest.raises(ConfigError, match="Unknown config key 'arhc'.*Did you mean 'arch'"):
        load_config(RewardModelConfig, None, ["arhc=net"])
    with pytest.raises(ConfigError, match="arch='mlp' is not allowed; choose one of: net, backbone"):
        load_config(RewardModelConfig, None, ["arch=mlp"])
    with pytest.raises(ConfigError, match="group_size=1 is invalid.*Bradley-Terry"):
        load_config(RewardModelConfig, None, ["loss=bt", "group_size=1"])
    with pytest.raises(ConfigError, match="train_steps.*expects int"):
        load_config(RewardModelConfig, None, ["train_steps=many"])
    with pytest.raises(ConfigError, match="prompts.*existing text file"):
        load_config(RewardModelConfig, None, ["prompts=no/such/file.txt"])
