"""Sampler invariants on a tiny random SD3 pipeline: equality with diffusers, exact log-probs, errors."""

import pytest
import torch
from conftest import gen

import flowalign as fa
from flowalign.sampling import GuidanceOutput

PROMPTS = ["a red circle", "two blue squares"]
SDE = ["flow-sde", "dance-sde", "cps"]


@pytest.mark.parametrize("cfg,k", [(7.0, 1), (1.0, 2), (4.5, 2)])
def test_ode_equals_the_diffusers_pipeline(tiny_sd3, cfg, k):
    traj = fa.sample(tiny_sd3, PROMPTS, num_steps=4, guidance_scale=cfg, num_images_per_prompt=k, generator=gen(3))
    ref = tiny_sd3.pipe(PROMPTS, num_inference_steps=4, guidance_scale=cfg, num_images_per_prompt=k, height=32,
                        width=32, output_type="pt", generator=gen(3)).images
    assert traj.images.shape == ref.shape == (2 * k, 3, 32, 32)
    assert (traj.images - ref).abs().max().item() <= 1e-4
    assert traj.log_probs is None
    assert traj.latents.shape == (2 * k, 5, 4, 16, 16)
    assert traj.sigmas[0] == 1 and traj.sigmas[-1] == 0


@pytest.mark.parametrize("sampler", SDE)
def test_on_policy_ratio_is_exactly_one(tiny_sd3, sampler):
    traj = fa.sample(tiny_sd3, PROMPTS, num_steps=4, sampler=sampler, guidance_scale=4.5, generator=gen(1))
    assert traj.log_probs.shape == (2, 4) and torch.isfinite(traj.log_probs).all()
    lp = fa.log_prob(tiny_sd3, traj)
    n_stoch = 3 if sampler == "cps" else 4  # CPS's last step (sigma_next = 0) is deterministic
    assert lp.shape == (2, 4) and int((traj.log_probs != 0).all(0).sum()) == n_stoch
    assert (lp - traj.log_probs).abs().max().item() <= 1e-5
    ratio = torch.exp(lp - traj.log_probs)
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-5)


@pytest.mark.parametrize("sampler", SDE)
def test_eta_zero_reproduces_the_ode(tiny_sd3, sampler):
    ode = fa.sample(tiny_sd3, PROMPTS, num_steps=4, generator=gen(2))
    sto = fa.sample(tiny_sd3, PROMPTS, num_steps=4, sampler=sampler, eta=0.0, generator=gen(2))
    assert (ode.latents - sto.latents).abs().max().item() <= 1e-5


def test_log_prob_has_gradients_for_the_transformer(tiny_sd3):
    traj = fa.sample(tiny_sd3, PROMPTS, num_steps=3, sampler="flow-sde", generator=gen(0))
    lp = fa.log_prob(tiny_sd3, traj, steps=[1])
    assert lp.shape == (2, 1) and lp.requires_grad
    lp.sum().backward()
    grads = [p.grad for p in tiny_sd3.transformer.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    tiny_sd3.transformer.zero_grad(set_to_none=True)


def test_deterministic_under_a_generator(tiny_sd3):
    a = fa.sample(tiny_sd3, PROMPTS, num_steps=3, sampler="dance-sde", generator=gen(5))
    b = fa.sample(tiny_sd3, PROMPTS, num_steps=3, sampler="dance-sde", generator=gen(5))
    c = fa.sample(tiny_sd3, PROMPTS, num_steps=3, sampler="dance-sde", generator=gen(6))
    assert torch.equal(a.latents, b.latents) and torch.equal(a.log_probs, b.log_probs)
    assert not torch.allclose(a.latents, c.latents)


def test_sde_window_is_ode_outside(tiny_sd3):
    traj = fa.sample(tiny_sd3, PROMPTS, num_steps=5, sampler="flow-sde", sde_window=(1, 3), generator=gen(0))
    assert traj.stochastic.tolist() == [False, True, True, False, False]
    assert torch.all(traj.log_probs[:, [0, 3, 4]] == 0) and torch.all(traj.log_probs[:, 1:3] != 0)
    ode = fa.sample(tiny_sd3, PROMPTS, num_steps=5, generator=gen(0))
    assert torch.allclose(traj.latents[:, 1], ode.latents[:, 1], atol=1e-6)  # step 0 was deterministic
    assert not torch.allclose(traj.latents[:, 2], ode.latents[:, 2])
    lp = fa.log_prob(tiny_sd3, traj)
    assert lp.shape == (2, 2) and (lp - traj.log_probs[:, 1:3]).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="sde_window"):
        fa.sample(tiny_sd3, PROMPTS, num_steps=5, sampler="flow-sde", sde_window=(3, 9))


def test_shared_initial_noise_per_prompt_group(tiny_sd3):
    traj = fa.sample(tiny_sd3, PROMPTS, num_steps=2, sampler="flow-sde", num_images_per_prompt=3,
                     same_noise_per_prompt=True, generator=gen(0))
    x = traj.latents[:, 0]
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2]) and not torch.equal(x[2], x[3])
    assert not torch.equal(traj.x0[0], traj.x0[1])  # the SDE still explores
    assert traj.prompts == [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3


class ConstantShift:
    """A guidance that pushes every mean by a constant: enough to test the bookkeeping."""

    def __init__(self, under_guided):
        self.log_prob_under_guided_mean = under_guided

    def __call__(self, ctx):
        return GuidanceOutput(mean_shift=torch.full_like(ctx.x, 0.05))


@pytest.mark.parametrize("under_guided", [True, False])
def test_guided_log_probs_are_reproducible(tiny_sd3, under_guided):
    plain = fa.sample(tiny_sd3, PROMPTS, num_steps=3, sampler="flow-sde", generator=gen(0))
    traj = fa.sample(tiny_sd3, PROMPTS, num_steps=3, sampler="flow-sde", generator=gen(0),
                     guidance=ConstantShift(under_guided))
    assert not torch.allclose(plain.x0, traj.x0)
    assert (traj.guidance_shifts is not None) == under_guided
    assert (fa.log_prob(tiny_sd3, traj) - traj.log_probs).abs().max() <= 1e-5


def test_velocity_guidance_with_the_ode(tiny_sd3):
    class Push:
        log_prob_under_guided_mean = False

        def __call__(self, ctx):
            return GuidanceOutput(velocity=ctx.v - 0.1)

    a = fa.sample(tiny_sd3, PROMPTS, num_steps=3, generator=gen(0))
    b = fa.sample(tiny_sd3, PROMPTS, num_steps=3, generator=gen(0), guidance=Push())
    # Euler: the first step moves by dt * (v - 0.1), i.e. 0.1 * (sigma_0 - sigma_1) further than unguided
    expected = 0.1 * (a.sigmas[0] - a.sigmas[1])
    assert torch.allclose(b.latents[:, 1] - a.latents[:, 1], torch.full_like(a.x0, expected.item()), atol=1e-5)
    assert b.log_probs is None


def test_bad_input_errors(tiny_sd3, tmp_path):
    with pytest.raises(ValueError, match="Unknown sampler 'euler'"):
        fa.sample(tiny_sd3, PROMPTS, sampler="euler")
    with pytest.raises(ValueError, match="eta must be >= 0"):
        fa.sample(tiny_sd3, PROMPTS, sampler="flow-sde", eta=-0.5)
    with pytest.raises(ValueError, match="multiples of 4"):
        fa.sample(tiny_sd3, PROMPTS, height=30, width=32)
    with pytest.raises(ValueError, match="num_steps must be >= 1"):
        fa.sample(tiny_sd3, PROMPTS, num_steps=0)
    with pytest.raises(TypeError, match="prompts must be"):
        fa.sample(tiny_sd3, [1, 2])
    with pytest.raises(ValueError, match="Unknown model 'no-such-model'"):
        fa.load_model("no-such-model")
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        fa.load_model(str(tmp_path))
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    with pytest.raises(ValueError, match="Unsupported pipeline class 'StableDiffusionXLPipeline'"):
        fa.load_model(str(tmp_path))
    with pytest.raises(ValueError, match="no log-probs"):
        fa.log_prob(tiny_sd3, fa.sample(tiny_sd3, PROMPTS, num_steps=2))
    with pytest.raises(ValueError, match="Unknown dtype"):
        fa.load_model("tiny-sd3", dtype="float8")


def test_save_and_reload_through_plain_diffusers(tiny_sd3, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    tiny_sd3.save_pretrained(tmp_path / "pipe")
    again = fa.load_model(str(tmp_path / "pipe"))
    a = fa.sample(tiny_sd3, PROMPTS, num_steps=2, generator=gen(0))
    b = fa.sample(again, PROMPTS, num_steps=2, generator=gen(0))
    assert (a.images - b.images).abs().max() <= 1e-5
    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path / "pipe")
    assert type(fa.load_model(pipe)).__name__ == "SD3Model"


def test_lora_export_loads_in_diffusers(tmp_path):
    model = fa.load_model("tiny-sd3")
    model.add_lora(rank=4)
    trainable = [p for p in model.transformer.parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n, p in model.transformer.named_parameters() if p.requires_grad)
    with torch.no_grad():
        for p in trainable:
            p.add_(0.1 * torch.randn_like(p))
    model.save_lora(tmp_path / "lora")
    fresh = fa.load_model("tiny-sd3")
    base = fa.sample(fresh, PROMPTS, num_steps=2, generator=gen(0)).images
    fresh.pipe.load_lora_weights(str(tmp_path / "lora"))
    with_lora = fa.sample(fresh, PROMPTS, num_steps=2, generator=gen(0)).images
    ours = fa.sample(model, PROMPTS, num_steps=2, generator=gen(0)).images
    assert (with_lora - ours).abs().max() <= 1e-4 and (with_lora - base).abs().max() > 1e-3
    model.save_pretrained(tmp_path / "merged")
    merged = fa.sample(fa.load_model(str(tmp_path / "merged")), PROMPTS, num_steps=2, generator=gen(0)).images
    assert (merged - ours).abs().max() <= 1e-4
