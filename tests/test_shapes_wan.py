"""shapes-wan: the build script produces a WanPipeline folder that plain diffusers and flowalign load, and
flowalign's ODE equals the pipeline's output on it."""

import json

import pytest
import torch

import flowalign as fa
from flowalign.zoo import build_shapes_wan as bw


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("zoo")
    cfg = bw.WanBuildConfig(n_train_clips=24, vae_steps=2, vae_batch=2, wan_steps=3, wan_batch=4, eval_every=0,
                            recon_n=4, threads=1)
    report = bw.build(cfg, out_root=out)
    return out / "shapes-wan", report


def test_build_writes_a_loadable_pipeline_and_report(built):
    path, report = built
    assert (path / "model_index.json").exists() and (path / "flowalign.json").exists()
    assert json.loads((path / "flowalign.json").read_text())["native_size"] == [32, 32, 9]
    for key in ("render_seconds", "vae", "wan", "total_seconds"):
        assert key in report
    assert 0.0 <= report["vae"]["recon_verifier_test"] <= 1.0
    assert (path.parent / "build_report_shapes-wan.json").exists()
    assert not (path.parent / "shapes-wan.tmp").exists()


def test_vae_latent_statistics_normalise_the_training_latents(built):
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(built[0] / "vae")
    assert len(vae.config.latents_mean) == len(vae.config.latents_std) == vae.config.z_dim
    assert all(s > 0 for s in vae.config.latents_std)


def test_flowalign_ode_equals_the_wan_pipeline(built):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(built[0])
    model = fa.load_model(str(built[0]))
    assert model.family == "wan" and model.default_size == (32, 32) and model.default_num_frames == 9
    prompt = "a red circle moving left"
    ref = pipe(prompt, num_inference_steps=4, guidance_scale=4.0, height=32, width=32, num_frames=9,
               max_sequence_length=bw.TEXT_LEN, generator=torch.Generator().manual_seed(0), output_type="pt").frames
    traj = fa.sample(model, [prompt], num_steps=4, guidance_scale=4.0, generator=torch.Generator().manual_seed(0))
    assert traj.images.shape == (1, 9, 3, 32, 32)
    assert torch.allclose(traj.images, ref.float(), atol=1e-5)


def test_flow_matching_loss_uses_the_empty_prompt_for_dropout():
    g = torch.Generator().manual_seed(0)
    calls = []

    class Probe(torch.nn.Module):
        def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=False):
            calls.append(encoder_hidden_states.clone())
            return (torch.zeros_like(hidden_states),)

    lat = torch.zeros(4, 8, 5, 8, 8)
    embs = torch.stack([torch.full((3, 2), float(i)) for i in range(3)])  # caption i -> all entries i
    cap_idx = torch.tensor([0, 1, 0, 1])
    loss = bw.flow_matching_loss(Probe(), lat, embs, cap_idx, empty=2, batch=64, caption_dropout=1.0, g=g)
    assert torch.isfinite(loss)
    assert torch.all(calls[0] == 2.0)  # every caption dropped to the empty prompt

