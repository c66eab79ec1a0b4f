"""Sampling overheads, as ratios measured in one script (these machines are noisy).

1. ``fa.sample`` ODE vs the diffusers pipeline call, same SD3 model, seed, steps, CFG and size: wall time and
   peak memory (peak RSS of a fresh process on CPU; ``torch.cuda.max_memory_allocated`` on GPU).
2. SDE sampling with log-prob recording (flow-sde) vs ODE sampling: wall-time overhead.

Usage: python benchmarks/bench_sampling.py [--device cuda] [--size small|sd35m] [--dtype bfloat16]
Writes benchmarks/results/sampling_<device>_<size>.json and .png.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
PROMPTS = ["a red circle to the left of a blue square", "three green triangles", "a yellow star", "two pink circles"]


def build(size: str, dtype: torch.dtype, device: str):
    """An SD3 pipeline with random weights: 'small' (8 layers, 64x64) or 'sd35m' (SD3.5-medium transformer)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    from flowalign.models import tiny

    torch.manual_seed(0)
    if size == "small":
        tr = SD3Transformer2DModel(
            sample_size=32,
            patch_size=2,
            in_channels=4,
            num_layers=8,
            attention_head_dim=32,
            num_attention_heads=4,
            joint_attention_dim=64,
            caption_projection_dim=128,
            pooled_projection_dim=64,
            out_channels=4,
            pos_embed_max_size=64,
        )
        vae = AutoencoderKL(
            block_out_channels=(16, 32),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            use_quant_conv=False,
            use_post_quant_conv=False,
            shift_factor=0.0609,
            scaling_factor=1.5035,
        )
        te_cfg, hw = tiny._clip_text_config(), 64
    else:  # the SD3.5-medium transformer config (2.5B params), small text encoders (their cost is one-off)
        tr = SD3Transformer2DModel(
            sample_size=128,
            patch_size=2,
            in_channels=16,
            num_layers=24,
            attention_head_dim=64,
            num_attention_heads=24,
            joint_attention_dim=4096,
            caption_projection_dim=1536,
            pooled_projection_dim=2048,
            out_channels=16,
            pos_embed_max_size=384,
            dual_attention_layers=tuple(range(13)),
            qk_norm="rms_norm",
        )
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=16,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            use_quant_conv=False,
            use_post_quant_conv=False,
            shift_factor=0.0609,
            scaling_factor=1.5035,
        )
        te_cfg, hw = tiny._clip_text_config(hidden=1024, projection=1024), 512
    pipe = StableDiffusion3Pipeline(
        transformer=tr,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=CLIPTextModelWithProjection(te_cfg),
        tokenizer=tiny.clip_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(te_cfg),
        tokenizer_2=tiny.clip_tokenizer(),
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe, hw


def run_once(kind: str, pipe, hw: int, steps: int, batch: int):
    import flowalign as fa

    gen = torch.Generator().manual_seed(0)
    prompts = (PROMPTS * batch)[:batch]
    if kind == "pipe":
        return pipe(
            prompts, num_inference_steps=steps, guidance_scale=4.5, height=hw, width=hw, output_type="pt", generator=gen
        ).images
    model = fa.load_model(pipe)
    sampler = "ode" if kind == "fa-ode" else "flow-sde"
    return fa.sample(
        model, prompts, num_steps=steps, sampler=sampler, guidance_scale=4.5, height=hw, width=hw, generator=gen
    ).images


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timing(pipe, hw, steps, batch, reps, device) -> dict:
    kinds = ["pipe", "fa-ode", "fa-flow-sde"]
    for k in kinds:  # warm-up
        run_once(k, pipe, hw, steps, batch)
    times = {k: [] for k in kinds}
    for _ in range(reps):  # interleaved, so drifts in machine load hit every kind alike
        for k in kinds:
            _sync(device)
            t0 = time.perf_counter()
            run_once(k, pipe, hw, steps, batch)
            _sync(device)
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "seconds_median": med,
        "seconds_all": times,
        "ratio_fa_ode_over_pipe": med["fa-ode"] / med["pipe"],
        "ratio_sde_logprob_over_ode": med["fa-flow-sde"] / med["fa-ode"],
    }


def peak_memory(kind: str, args, pipe=None, hw=None) -> float:
    """Peak memory of one sampling call in MiB: CUDA allocator peak above the resident weights, or the peak
    RSS increase of a fresh process on CPU."""
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run_once(kind, pipe, hw, args.steps, args.batch)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    cmd = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--size",
        args.size,
        "--steps",
        str(args.steps),
        "--batch",
        str(args.batch),
        "--dtype",
        args.dtype,
    ]
    return float(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])


def child(args) -> None:
    pipe, hw = build(args.size, getattr(torch, args.dtype), "cpu")
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run_once(args.child, pipe, hw, args.steps, args.batch)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(8, 3))
    med = result["timing"]["seconds_median"]
    ax[0].bar(list(med), list(med.values()), color=["gray", "tab:blue", "tab:orange"])
    ax[0].set_ylabel("seconds (median)")
    ax[0].set_title(f"{result['size']} SD3, {result['steps']} steps, batch {result['batch']}")
    mem = result["peak_memory_mib"]
    ax[1].bar(list(mem), list(mem.values()), color=["gray", "tab:blue"])
    ax[1].set_ylabel("peak MiB above weights" + (" (RSS)" if result["device"] == "cpu" else " (CUDA)"))
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", default="small", choices=["small", "sd35m"])
    p.add_argument("--dtype", default="float32")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    with torch.device(args.device):  # initialise the random weights on the target device (fast on GPU)
        pipe, hw = build(args.size, getattr(torch, args.dtype), args.device)
    result = {
        "device": args.device,
        "size": args.size,
        "dtype": args.dtype,
        "steps": args.steps,
        "batch": args.batch,
        "height": hw,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
    }
    result["timing"] = timing(pipe, hw, args.steps, args.batch, args.reps, args.device)
    result["peak_memory_mib"] = {k: peak_memory(k, args, pipe, hw) for k in ["pipe", "fa-ode"]}
    result["ratio_peak_memory_fa_over_pipe"] = result["peak_memory_mib"]["fa-ode"] / result["peak_memory_mib"]["pipe"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"sampling_{args.device.split(':')[0]}_{args.size}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2))
    plot(result, RESULTS / f"{stem}.png")
    t = result["timing"]
    print(
        f"fa.sample ODE / pipeline: time {t['ratio_fa_ode_over_pipe']:.3f}, "
        f"peak memory {result['ratio_peak_memory_fa_over_pipe']:.3f}; "
        f"flow-sde+log-prob / ODE: time {t['ratio_sde_logprob_over_ode']:.3f}"
    )


if __name__ == "__main__":
    main()
