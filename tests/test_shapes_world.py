"""The bundled shapes world: loading, plain-diffusers compatibility, rewards, eval command, build script."""

import json

import pytest
import torch
from conftest import gen

import flowalign as fa
from flowalign import zoo
from flowalign.zoo import shapes_data as sd


@pytest.fixture(scope="module")
def shapes():
    return fa.load_model("shapes-sd3")


def test_loads_by_name_with_its_settings(shapes):
    assert shapes.family == "sd3" and shapes.default_size == (32, 32)
    assert shapes.max_sequence_length == 0 and shapes.default_guidance_scale == zoo.settings("shapes-sd3")[
        "guidance_scale"]
    traj = fa.sample(shapes, ["a red circle"], num_steps=4, generator=gen(0))
    assert traj.images.shape == (1, 3, 32, 32) and traj.latents.shape == (1, 5, 4, 16, 16)


def test_plain_diffusers_pipeline_gives_the_same_samples(shapes):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(zoo.path("shapes-sd3"), text_encoder_3=None, tokenizer_3=None)
    prompts = ["two green triangles", "a blue square to the left of a yellow circle"]
    ref = pipe(prompts, num_inference_steps=6, guidance_scale=4.0, height=32, width=32, max_sequence_length=0,
               output_type="pt", generator=gen(1)).images
    ours = fa.sample(shapes, prompts, num_steps=6, guidance_scale=4.0, generator=gen(1)).images
    assert (ours - ref).abs().max() <= 1e-4


def test_shapes_clip_reward_prefers_the_right_caption():
    reward = fa.rewards.load("shapes-clip")
    assert reward.differentiable
    pix, caps, specs = sd.dataset(48, "test", seed=3)
    right = reward(pix, caps)
    wrong = reward(pix, caps[1:] + caps[:1])
    assert right.shape == (48,) and (right > wrong).float().mean() > 0.8
    pix.requires_grad_(True)
    reward(pix, caps).sum().backward()
    assert torch.isfinite(pix.grad).all() and pix.grad.abs().sum() > 0


def test_eval_command_prints_per_category_accuracy(tmp_path, capsys):
    from flowalign.cli import main

    assert main(["eval", "--model", "shapes-sd3", "--reward", "shapes-geneval", "--split", "test", "--n", "2",
                 "--steps", "4", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for cat in ["overall", *sd.CATEGORIES]:
        assert cat in out
    record = json.loads((tmp_path / "eval.json").read_text())
    assert record["n"] == 8 and 0 <= record["overall"] <= 1 and (tmp_path / "grid.png").exists()


def test_eval_command_loads_a_runs_lora(tmp_path, capsys):
    from flowalign.cli import main

    trained = fa.load_model("shapes-sd3")
    trained.add_lora(rank=4)
    with torch.no_grad():
        for name, p in trained.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    trained.save_lora(tmp_path / "lora")
    loaded = fa.load_model("shapes-sd3")
    loaded.load_lora(tmp_path / "lora")
    base = fa.load_model("shapes-sd3")
    x = [fa.sample(m, ["a red circle"], num_steps=3, generator=gen(0)).images for m in (trained, loaded, base)]
    assert torch.allclose(x[0], x[1], atol=1e-5) and (x[0] - x[2]).abs().max() > 1e-2

    grids = []
    for name, extra in (("plain", []), ("lora", ["--lora", str(tmp_path / "lora")])):
        assert main(["eval", "--n", "1", "--steps", "3", "--out", str(tmp_path / name), *extra]) == 0
        assert json.loads((tmp_path / name / "eval.json").read_text())["n"] == 4
        grids.append((tmp_path / name / "grid.png").read_bytes())
    capsys.readouterr()
    assert grids[0] != grids[1]  # the same prompts and seeds, sampled with and without the LoRA
    with pytest.raises(FileNotFoundError, match="No LoRA"):
        loaded.load_lora(tmp_path / "missing")


def test_build_script_runs_end_to_end_on_a_tiny_budget(tmp_path):
    from flowalign.zoo.build_shapes import BuildConfig, build

    cfg = BuildConfig(n_train_images=128, clip_steps=2, clip_batch=16, vae_steps=2, vae_batch=8, sd3_steps=2,
                      sd3_batch=8, retrieval_n=2, toy2d_steps=2)
    report = build(cfg=cfg, out_root=tmp_path)
    assert {"toy2d", "clip", "vae", "sd3"} <= set(report)
    assert fa.load_model("toy2d").__class__.__name__ == "Toy2DModel"
    model = fa.load_model(str(tmp_path / "shapes-sd3"))
    assert model.default_size == (32, 32) and model.max_sequence_length == 0
    assert fa.sample(model, ["a red circle"], num_steps=2).images.shape == (1, 3, 32, 32)
    assert not list(tmp_path.glob("*.tmp"))


def test_splits_hold_out_compositions():
    train = {s.caption() for s in sd.specs_for("train") if s.category != "single"}
    test = {s.caption() for s in sd.specs_for("test") if s.category != "single"}
    assert test and not (train & test)
    for cat in sd.CATEGORIES:
        assert sd.specs_for("test", cat)
    _, caps, _ = sd.dataset(300, "train", seed=0)
    assert not (set(caps) & test)


def test_every_caption_fits_the_text_encoder_without_truncation():
    from flowalign.models.tiny import WORDS
    from flowalign.zoo.build_shapes import TEXT_LEN, tokenizer

    tok = tokenizer()
    assert all(len(tok(w).input_ids) == 3 for w in WORDS)  # BOS, the word, EOS
    assert max(len(tok(s.caption()).input_ids) for s in sd.all_specs()) <= TEXT_LEN
