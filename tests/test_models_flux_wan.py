"""FLUX and Wan adapters on tiny random pipelines: equality with diffusers, exact log-probs, sizes, LoRA."""

import pytest
import torch

import flowalign as fa
from flowalign.models import tiny

PROMPTS = ["a red circle", "two blue squares"]
SDE = ["flow-sde", "dance-sde", "cps"]
#: native sizes of the tiny pipelines, and a non-square one (exercises packing with h != w)
SIZES = {"flux": [dict(height=32, width=32), dict(height=32, width=48)],
         "wan": [dict(height=16, width=16, num_frames=5), dict(height=16, width=32, num_frames=9)]}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one intra-op thread is as fast, and far faster when other jobs share the cores
    (each op's thread barrier then waits for a descheduled thread)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def models(one_thread):
    return {"flux": fa.load_model("tiny-flux"), "wan": fa.load_model("tiny-wan")}


def pipe_output(model, prompts, k, seed, size, with_states=False, **kw):
    """The pipeline's own sample, through the same pipe object as the model.

    With ``with_states``, also the latents after every step, ``(B, T, ...)``, unpacked to flowalign's layout.
    """
    states = []

    def record(pipe, i, t, tensors):
        x = tensors["latents"]
        if model.family == "flux":
            s = model.size_multiple
            x = model.unpack(x, 2 * (size["height"] // s), 2 * (size["width"] // s))
        states.append(x.float().clone())
        return {}

    kw = dict(num_inference_steps=4, output_type="pt", generator=gen(seed),
              max_sequence_length=model.max_sequence_length, callback_on_step_end=record, **size, **kw)
    if model.family == "wan":
        out = model.pipe(prompt=prompts, num_videos_per_prompt=k, **kw).frames
    else:
        out = model.pipe(prompt=prompts, num_images_per_prompt=k, **kw).images
    return (out, torch.stack(states, dim=1)) if with_states else out


# ----------------------------------------------------------------------------- equality with diffusers
@pytest.mark.parametrize("family", ["flux", "wan"])
@pytest.mark.parametrize("k,size_idx", [(1, 0), (2, 1)])
def test_ode_equals_the_diffusers_pipeline(models, family, k, size_idx):
    model, size = models[family], SIZES[family][size_idx]
    traj = fa.sample(model, PROMPTS, num_steps=4, sampler="ode", generator=gen(0), num_images_per_prompt=k, **size)
    ref, states = pipe_output(model, PROMPTS, k, 0, size, with_states=True)
    assert traj.images.shape == ref.shape
    h, w = size["height"], size["width"]
    if family == "wan":
        assert ref.shape == (2 * k, size["num_frames"], 3, h, w)
    else:
        assert ref.shape == (2 * k, 3, h, w)
    assert (traj.images - ref).abs().max().item() <= 1e-4
    # every intermediate state too (the tiny VAEs are smooth, so pixels alone are a weak check)
    assert (traj.latents[:, 1:] - states).abs().max().item() <= 1e-4
    # the same sigmas as the pipeline's own scheduler after its call
    assert torch.equal(traj.sigmas, model.pipe.scheduler.sigmas.float())
    # a meaningful comparison: images are not constant and differ across prompts/noises
    assert traj.images.std() > 1e-3 and (traj.images[0] - traj.images[-1]).abs().max() > 1e-3


def test_flux_true_cfg_equals_the_pipeline(models):
    model, size = models["flux"], SIZES["flux"][0]
    neg = ["a cat", "a dog"]
    assert model.encode(PROMPTS, negative_prompt=neg).uncond is None  # off by default, as in the pipeline
    cond = model.encode(PROMPTS, negative_prompt=neg, true_cfg_scale=2.5)
    assert cond.uncond is not None and cond.extra["true_cfg_scale"] == 2.5
    traj = fa.sample(model, PROMPTS, num_steps=4, cond=cond, num_images_per_prompt=2, generator=gen(4), **size)
    ref, states = pipe_output(model, PROMPTS, 2, 4, size, with_states=True, negative_prompt=neg, true_cfg_scale=2.5)
    assert (traj.images - ref).abs().max().item() <= 1e-4
    assert (traj.latents[:, 1:] - states).abs().max().item() <= 1e-4
    plain = fa.sample(model, PROMPTS, num_steps=4, num_images_per_prompt=2, generator=gen(4), **size)
    assert (plain.images - traj.images).abs().max() > 1e-3


def test_flux_guidance_embedding_is_used(models):
    model, size = models["flux"], SIZES["flux"][0]
    a = fa.sample(model, PROMPTS, num_steps=4, guidance_scale=3.5, generator=gen(0), **size)
    b = fa.sample(model, PROMPTS, num_steps=4, guidance_scale=7.0, generator=gen(0), **size)
    ref, states = pipe_output(model, PROMPTS, 1, 0, size, with_states=True, guidance_scale=7.0)
    assert (b.images - ref).abs().max().item() <= 1e-4
    assert (b.latents[:, 1:] - states).abs().max().item() <= 1e-4
    assert (a.latents[:, -1] - b.latents[:, -1]).abs().max() > 1e-4


def test_flux_pack_unpack_inverse(models):
    model = models["flux"]
    x = torch.randn(2, 4, 8, 12, generator=gen(0))
    tokens = model.pack(x)
    assert tokens.shape == (2, 4 * 6, 16)
    assert torch.equal(model.unpack(tokens, 8, 12), x)
    # the pipeline's own unpacking (at pixel size 16x24 with VAE factor 2) agrees
    assert torch.equal(type(model.pipe)._unpack_latents(tokens, 16, 24, model.vae_scale_factor), x)


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_per_sample_sigma(models, family):
    model, size = models[family], SIZES[family][0]
    cond = model.encode(PROMPTS)
    x = model.noise(2, generator=gen(0), **size)
    sig = torch.tensor([0.9, 0.4])
    v = model.velocity(x, sig, cond)
    assert v.dtype == torch.float32 and v.shape == x.shape
    for i in range(2):
        vi = model.velocity(x[i:i + 1], sig[i], cond.index([i]))
        assert (v[i:i + 1] - vi).abs().max().item() <= 1e-5


# ----------------------------------------------------------------------------- SDEs
@pytest.mark.parametrize("family", ["flux", "wan"])
@pytest.mark.parametrize("sampler", SDE)
def test_on_policy_log_prob(models, family, sampler):
    model, size = models[family], SIZES[family][0]
    traj = fa.sample(model, PROMPTS, num_steps=4, sampler=sampler, generator=gen(1), **size)
    assert traj.log_probs.shape == (2, 4) and torch.isfinite(traj.log_probs).all()
    assert (traj.log_probs != 0).any()
    lp = fa.log_prob(model, traj)
    assert (lp - traj.log_probs).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_eta_zero_flow_sde_is_the_ode(models, family):
    model, size = models[family], SIZES[family][0]
    ode = fa.sample(model, PROMPTS, num_steps=4, generator=gen(2), **size)
    sto = fa.sample(model, PROMPTS, num_steps=4, sampler="flow-sde", eta=0.0, generator=gen(2), **size)
    assert (ode.latents - sto.latents).abs().max().item() <= 1e-5


# ----------------------------------------------------------------------------- decode / encode / sizes
@pytest.mark.parametrize("family", ["flux", "wan"])
def test_decode_is_differentiable_and_encode_inverts_shapes(models, family):
    model, size = models[family], SIZES[family][0]
    z = model.noise(1, generator=gen(0), **size).requires_grad_(True)
    px = model.decode(z)
    expected = (1, size["num_frames"], 3, 16, 16) if family == "wan" else (1, 3, 32, 32)
    assert px.shape == expected and 0 <= px.min() and px.max() <= 1
    px.mean().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert model.encode_images(px.detach()).shape == z.shape


def test_sizes_and_defaults(models):
    flux, wan = models["flux"], models["wan"]
    assert flux.size_multiple == 4 and flux.default_size == (32, 32) and flux.default_num_frames is None
    assert flux.pipeline_default_size() == (256, 256)  # default_sample_size 128 x VAE factor 2
    assert flux.latent_shape(3, 32, 48) == (3, 4, 16, 24)
    assert flux.default_guidance_scale == 3.5 and not flux.uses_cfg
    assert wan.size_multiple == 16 and wan.temporal_factor == 4 and wan.is_video
    assert wan.default_size == (16, 16) and wan.default_num_frames == 5
    assert wan.pipeline_default_size() == (480, 832) and wan.pipeline_default_num_frames() == 81
    assert wan.latent_shape(2, 16, 32, 9) == (2, 16, 3, 2, 4)
    assert wan.default_guidance_scale == 5.0 and wan.uses_cfg


def test_bad_sizes_raise(models):
    flux, wan = models["flux"], models["wan"]
    with pytest.raises(ValueError, match="multiples of 4"):
        fa.sample(flux, PROMPTS, num_steps=2, height=30, width=32)
    with pytest.raises(ValueError, match="image model"):
        flux.noise(1, 32, 32, num_frames=5)
    with pytest.raises(ValueError, match="multiples of 16"):
        fa.sample(wan, PROMPTS, num_steps=2, height=24, width=16, num_frames=5)
    with pytest.raises(ValueError, match="1 \\+ a multiple of 4"):
        fa.sample(wan, PROMPTS, num_steps=2, height=16, width=16, num_frames=6)


def test_wan_cfg_off_needs_no_uncond(models):
    wan = models["wan"]
    cond = wan.encode(PROMPTS, guidance_scale=1.0)
    assert cond.uncond is None
    with pytest.raises(ValueError, match="without CFG"):
        wan.velocity(wan.noise(2, generator=gen(0)), 0.5, cond, guidance_scale=5.0)
    size = SIZES["wan"][0]
    traj = fa.sample(wan, PROMPTS, num_steps=4, guidance_scale=1.0, generator=gen(3), **size)
    ref, states = pipe_output(wan, PROMPTS, 1, 3, size, with_states=True, guidance_scale=1.0)
    assert (traj.images - ref).abs().max().item() <= 1e-4
    assert (traj.latents[:, 1:] - states).abs().max().item() <= 1e-4


def test_wan_unipc_scheduler_is_replaced_by_flow_match_euler():
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    pipe = tiny.build("tiny-wan")
    pipe.scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                             flow_shift=5.0)
    model = fa.load_model(pipe)
    assert isinstance(model.scheduler, FlowMatchEulerDiscreteScheduler) and model.scheduler.config.shift == 5.0
    ref = FlowMatchEulerDiscreteScheduler(shift=5.0)
    ref.set_timesteps(6)
    assert torch.equal(model.sigmas(6), ref.sigmas)
    assert isinstance(pipe.scheduler, UniPCMultistepScheduler)  # the user's pipe is left alone


def test_wan22_expanded_timesteps_equal_the_pipeline(models):
    """Wan 2.2 TI2V layout: one timestep per latent token (``expand_timesteps=True``)."""
    from diffusers import WanPipeline

    p = models["wan"].pipe
    pipe = WanPipeline(tokenizer=p.tokenizer, text_encoder=p.text_encoder, vae=p.vae, scheduler=p.scheduler,
                       transformer=p.transformer, expand_timesteps=True)
    model, size = fa.load_model(pipe), SIZES["wan"][1]
    traj = fa.sample(model, PROMPTS, num_steps=4, generator=gen(0), **size)
    ref, states = pipe_output(model, PROMPTS, 1, 0, size, with_states=True)
    assert (traj.images - ref).abs().max().item() <= 1e-4
    assert (traj.latents[:, 1:] - states).abs().max().item() <= 1e-4


def test_wan_two_expert_pipelines_are_refused(models):
    from diffusers import WanPipeline

    p = models["wan"].pipe
    pipe = WanPipeline(tokenizer=p.tokenizer, text_encoder=p.text_encoder, vae=p.vae, scheduler=p.scheduler,
                       transformer=p.transformer, transformer_2=p.transformer, boundary_ratio=0.9)
    with pytest.raises(NotImplementedError, match="transformer_2"):
        fa.load_model(pipe)


# ----------------------------------------------------------------------------- LoRA
def _perturb_lora(model, seed=1):
    g = gen(seed)
    with torch.no_grad():
        for name, p in model.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("family", ["flux", "wan"])
@pytest.mark.parametrize("alpha", [4.0, None])
def test_lora_roundtrip_into_a_fresh_pipeline(family, alpha, tmp_path):
    """``alpha=None`` is the default 2 * rank: the saved adapter metadata must carry it to the loading pipe."""
    name, size = f"tiny-{family}", SIZES[family][0]
    model = fa.load_model(name)
    base = fa.sample(model, PROMPTS[:1], num_steps=4, generator=gen(0), **size)
    model.add_lora(rank=4, alpha=alpha)
    trainable = [n for n, p in model.transformer.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    if family == "flux":  # the single blocks' proj_out gets a LoRA, the final output projection does not
        lora_modules = {n for n, m in model.transformer.named_modules() if hasattr(m, "lora_A")}
        assert "single_transformer_blocks.0.proj_out" in lora_modules and "proj_out" not in lora_modules
        assert "single_transformer_blocks.0.proj_mlp" in lora_modules
        assert "transformer_blocks.0.attn.add_q_proj" in lora_modules
    _perturb_lora(model)
    model.save_lora(tmp_path)
    pipe = tiny.build(name)
    pipe.load_lora_weights(str(tmp_path))
    ours = fa.sample(model, PROMPTS[:1], num_steps=4, generator=gen(0), **size)
    theirs, states = pipe_output(fa.load_model(pipe), PROMPTS[:1], 1, 0, size, with_states=True)
    assert (ours.latents[:, -1] - base.latents[:, -1]).abs().max() > 1e-2  # the LoRA changes the samples
    assert (ours.images - theirs).abs().max().item() <= 1e-4
    assert (ours.latents[:, 1:] - states).abs().max().item() <= 1e-4
