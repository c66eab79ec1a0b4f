"""The bundled shapes-wan: loads by name and through plain diffusers, equals the pipeline, fits the size budget."""

from pathlib import Path

import torch

import flowalign as fa
from flowalign.zoo import build_shapes_wan as bw


def test_bundled_shapes_wan_loads_by_name_and_through_plain_diffusers():
    from diffusers import WanPipeline

    from flowalign import zoo

    path = zoo.path("shapes-wan")
    model = fa.load_model("shapes-wan")
    assert model.family == "wan" and model.is_video
    assert (model.default_size, model.default_num_frames) == ((32, 32), 9)
    pipe = WanPipeline.from_pretrained(path)
    prompt = "a blue square moving up"
    ref = pipe(prompt, num_inference_steps=3, guidance_scale=4.0, height=32, width=32, num_frames=9,
               max_sequence_length=bw.TEXT_LEN, generator=torch.Generator().manual_seed(1), output_type="pt").frames
    traj = fa.sample(model, [prompt], num_steps=3, generator=torch.Generator().manual_seed(1))
    assert traj.images.shape == (1, 9, 3, 32, 32)
    assert torch.allclose(traj.images, ref.float(), atol=1e-5)


def test_bundled_shapes_wan_fits_the_size_budget():
    from flowalign import zoo

    total = sum(f.stat().st_size for f in Path(zoo.path("shapes-wan")).rglob("*") if f.is_file())
    assert total <= 25 * 2**20, f"shapes-wan is {total / 2**20:.1f} MiB; the video world's budget is 25 MB"
