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
    cfg = bw.WanBuildConfig(n_train_clips=24, vae_steps=2, vae_frame_steps=1, vae_frame_batch=4, vae_batch=2,
                            vae_eval_every=1, vae_eval_n=2, decoder_time_steps=2, decoder_time_warmup=1, wan_steps=3,
                            wan_batch=4, eval_every=0, recon_n=4, threads=1)
    report = bw.build(cfg, out_root=out)
    return out / "shapes-wan", report


def test_build_writes_a_loadable_pipeline_and_report(built):
    path, report = built
    assert (path / "model_index.json").exists() and (path / "flowalign.json").exists()
    assert json.loads((path / "flowalign.json").read_text())["native_size"] == [32, 32, 9]
    for key in ("render_seconds", "vae", "wan", "total_seconds"):
        assert key in report
    recon = report["vae"]["recon_test"]
    assert 0.0 <= recon["verifier"] <= 1.0 and 0.0 <= recon["frames_ok"] <= 1.0 and recon["mse"] > 0
    assert recon["pair_change"] >= 0 and recon["truth_pair_change"] > 0
    assert report["vae"]["decoder_time"]["final_mse"] > 0
    assert [row["step"] for row in report["vae"]["curve"]] == [1, 2]
    assert (path.parent / "build_report_shapes-wan.json").exists()
    assert not (path.parent / "shapes-wan.tmp").exists()
    assert not (path.parent / "shapes-wan.vae.pt").exists()  # the stage checkpoint goes once the build succeeds


def killed_after_two_calls(fn):
    """``fn``, but a SIGINT-like interrupt on its third call: a build step killed mid-stage."""
    calls = []

    def wrapped(*args):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return fn(*args)

    return wrapped


def test_a_killed_vae_stage_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch):
    from flowalign.zoo import shapes_video

    torch.set_num_threads(1)
    clips, _, _ = shapes_video.dataset(8, "train", seed=0, size=32, frames=9)
    cfg = bw.WanBuildConfig(n_train_clips=8, vae_steps=4, vae_frame_steps=1, vae_frame_batch=4, vae_batch=2,
                            vae_eval_every=0, vae_save_every=2)
    straight, _ = bw.train_vae(cfg, clips)

    windows = bw._windows
    ckpt = tmp_path / "vae.pt"
    monkeypatch.setattr(bw, "_windows", killed_after_two_calls(windows))
    with pytest.raises(KeyboardInterrupt):
        bw.train_vae(cfg, clips, ckpt)
    assert torch.load(ckpt, weights_only=False)["step"] == 2
    monkeypatch.setattr(bw, "_windows", windows)
    resumed, _ = bw.train_vae(cfg, clips, ckpt)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    # a checkpoint written with other VAE settings is not resumed
    other = bw.WanBuildConfig(n_train_clips=8, vae_steps=4, vae_batch=2, vae_eval_every=0, vae_lr=5e-4)
    assert bw._vae_key(other) != bw._vae_key(cfg)


def test_a_killed_transformer_stage_resumes_to_the_uninterrupted_weights(built, tmp_path, monkeypatch):
    from flowalign.zoo import shapes_video

    torch.set_num_threads(1)
    vae = bw.load_vae(built[0])
    clips, captions, _ = shapes_video.dataset(8, "train", seed=0, size=32, frames=9)
    cfg = bw.WanBuildConfig(n_train_clips=8, wan_steps=4, wan_batch=2, wan_save_every=2, eval_every=0)
    straight = bw.train_wan(cfg, clips, captions, vae, tmp_path / "straight")

    loss = bw.flow_matching_loss
    ckpt = tmp_path / "transformer.pt"
    monkeypatch.setattr(bw, "flow_matching_loss", killed_after_two_calls(loss))
    with pytest.raises(KeyboardInterrupt):
        bw.train_wan(cfg, clips, captions, vae, tmp_path / "resumed", ckpt)
    assert torch.load(ckpt, weights_only=False)["step"] == 2
    monkeypatch.setattr(bw, "flow_matching_loss", loss)
    resumed = bw.train_wan(cfg, clips, captions, vae, tmp_path / "resumed", ckpt)
    assert resumed["final_loss_avg50"] == straight["final_loss_avg50"]
    a = transformer_weights(tmp_path / "straight")
    b = transformer_weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # a checkpoint written with another patch, step count or VAE is not resumed
    key = bw._wan_key(bw.WanBuildConfig(), vae)
    assert bw._wan_key(bw.WanBuildConfig(wan_patch=(1, 4, 4)), vae) != key
    assert bw._wan_key(bw.WanBuildConfig(wan_steps=5), vae) != key
    assert bw._wan_key(bw.WanBuildConfig(wan_save_every=7), vae) == key
    vae.register_to_config(latents_mean=[m + 1e-3 for m in vae.config.latents_mean])
    assert bw._wan_key(bw.WanBuildConfig(), vae) != key


def transformer_weights(folder):
    from safetensors.torch import load_file

    return load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors")


def test_a_transformer_only_build_reuses_a_vae_and_takes_a_finer_patch(built, tmp_path):
    from diffusers import WanPipeline

    cfg = bw.WanBuildConfig(n_train_clips=8, wan_steps=2, wan_batch=2, wan_patch=(1, 2, 2), eval_every=0, recon_n=2,
                            threads=1)
    report = bw.build(cfg, out_root=tmp_path, vae_from=built[0])
    assert report["vae"]["from"] == str(built[0])
    pipe = WanPipeline.from_pretrained(tmp_path / "shapes-wan")
    assert tuple(pipe.transformer.config.patch_size) == (1, 2, 2)
    source = bw.load_vae(built[0])
    for (name, a), b in zip(source.state_dict().items(), pipe.vae.state_dict().values()):
        assert torch.equal(a, b), name
    assert not (tmp_path / "shapes-wan.transformer.pt").exists()
    with pytest.raises(FileNotFoundError, match="no VAE folder"):
        bw.load_vae(tmp_path)


def test_the_decoder_time_stage_trains_only_the_decoders_temporal_weights():
    from flowalign.zoo import shapes_video

    torch.set_num_threads(1)
    clips, _, _ = shapes_video.dataset(6, "train", seed=0, size=32, frames=9)
    vae = bw.shapes_wan_vae(0).eval()  # the per-frame start: its decoder repeats every frame after the first
    with torch.no_grad():
        before = vae.decode(vae.encode(bw.to_vae(clips[:2])).latent_dist.mode()).sample.permute(0, 2, 1, 3, 4)
    assert bw.frame_pair_change(before) == 0
    start = {k: v.clone() for k, v in vae.state_dict().items()}
    cfg = bw.WanBuildConfig(decoder_time_steps=3, decoder_time_warmup=1, decoder_time_lr=1e-2)
    bw.train_decoder_time(cfg, vae, clips)
    changed = {k for k, v in vae.state_dict().items() if not torch.equal(v, start[k])}
    assert changed and all(k.startswith("decoder.") for k in changed)
    for name, m in vae.decoder.named_modules():  # the current frame's weights of each 3x3x3 conv keep their values
        if type(m).__name__ == "WanCausalConv3d" and tuple(m.kernel_size) == (3, 3, 3):
            assert torch.equal(m.weight[:, :, -1], start[f"decoder.{name}.weight"][:, :, -1]), name
    assert not any(p.requires_grad for p in vae.parameters()) and not vae.training
    with torch.no_grad():
        after = vae.decode(vae.encode(bw.to_vae(clips[:2])).latent_dist.mode()).sample.permute(0, 2, 1, 3, 4)
    assert bw.frame_pair_change(after) > 0


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



def test_the_vae_starts_as_a_per_frame_autoencoder():
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    clip = torch.rand(1, 3, 9, 32, 32, generator=g) * 2 - 1
    edited = clip.clone()
    edited[:, :, 1] = torch.rand(3, 32, 32, generator=g) * 2 - 1  # frame 1 feeds latent frame 1 only

    def round_trip(vae, x):
        z = vae.encode(x).latent_dist.mode()
        return z, vae.decode(z).sample

    with torch.no_grad():
        vae = bw.shapes_wan_vae(0)
        (z, out), (z_edit, out_edit) = round_trip(vae, clip), round_trip(vae, edited)
        assert torch.equal(z[:, :, 2:], z_edit[:, :, 2:]) and not torch.equal(z[:, :, 1], z_edit[:, :, 1])
        assert torch.equal(out[:, :, 3:], out_edit[:, :, 3:])  # latent frame 1 decodes to frames 1-2
        # the random temporal weights of the plain layout carry frame 1 into every later latent frame
        plain = bw.shapes_wan_vae(0, per_frame_start=False)
        assert not torch.equal(round_trip(plain, clip)[0][:, :, 4], round_trip(plain, edited)[0][:, :, 4])


def test_zoo_build_cli_passes_settings_and_vae_to_the_shapes_wan_build(built, tmp_path, monkeypatch, capsys):
    from flowalign.cli import main

    seen = {}
    monkeypatch.setattr(bw, "build", lambda cfg, vae_from=None, **kw: seen.update(cfg=cfg, vae_from=vae_from, **kw))
    assert main(["zoo", "build", "--only", "shapes-wan", "--vae-from", str(built[0]), "--out", str(tmp_path),
                 "--set", "wan_patch=[1,2,2]", "wan_steps=6000"]) == 0
    assert seen["cfg"].wan_patch == (1, 2, 2) and seen["cfg"].wan_steps == 6000
    assert seen["vae_from"] == built[0] and seen["out_root"] == tmp_path
    for argv, message in [(["--only", "shapes-wan", "--set", "wan_stps=3"], "Did you mean 'wan_steps'"),
                          (["--only", "shapes-sd3", "--set", "wan_steps=3"], "apply to `--only shapes-wan` alone")]:
        assert main(["zoo", "build", *argv]) == 2
        assert message in capsys.readouterr().err
