"""GPU checks that CPU CI cannot run: the CUDA and bf16 paths of the sampler.

On the tiny pipelines moved to CUDA: ODE equals the diffusers pipeline (fp32), the on-policy log-prob ratio
is 1 (fp32 and bf16), for SD3, FLUX and Wan. Writes benchmarks/results/gpu_check.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import flowalign as fa
from flowalign.models import tiny

PROMPTS = ["a red circle", "two blue squares"]


def check(name: str, dtype: torch.dtype) -> dict:
    pipe = tiny.build(name)
    model = fa.load_model(pipe, device="cuda", dtype=dtype)
    h, w, f = tiny.TINY_SIZES[name]
    kw = {"height": h, "width": w} | ({"num_frames": f} if f else {})
    gen = lambda: torch.Generator("cuda").manual_seed(0)  # noqa: E731
    out = {"model": name, "dtype": str(dtype)}
    ode = fa.sample(model, PROMPTS, num_steps=4, generator=gen(), **kw)
    ref = pipe(PROMPTS, num_inference_steps=4, output_type="pt", generator=gen(), **kw)
    ref = ref.frames if f else ref.images
    out["ode_vs_pipeline_max_abs"] = (ode.images.float() - ref.float()).abs().max().item()
    for sampler in ["flow-sde", "dance-sde", "cps"]:
        traj = fa.sample(model, PROMPTS, num_steps=4, sampler=sampler, generator=gen(), **kw)
        lp = fa.log_prob(model, traj)
        out[f"{sampler}_max_abs_logprob_diff"] = (lp - traj.log_probs[:, traj.stochastic]).abs().max().item()
    return out


def main() -> None:
    assert torch.cuda.is_available(), "needs a CUDA device"
    results = [check(n, d) for n in tiny.TINY for d in (torch.float32, torch.bfloat16)]
    for r in results:
        print(json.dumps(r))
    path = Path(__file__).parent / "results" / "gpu_check.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                                "results": results}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
